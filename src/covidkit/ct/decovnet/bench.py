"""``covidkit bench decovnet``: seconds per volume of the whole DeCoVNet inference.

Whole inference = resample + window + unsupervised lung mask, U-Net lung mask slice by slice (the
unsupervised one where they disagree grossly), crop and resize, the classifier,
the class activation map and the lesion localization (reading the files is not counted). The paper
reports 1.93 s per volume on a GPU. The networks are untrained here: speed does not depend on the
weights. Volumes are synthetic (``slices`` x ``size`` x ``size``) unless ``input_dir`` holds a
``ct-covid-volumes/`` folder, whose first ``volumes`` cases are timed.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from covidkit.ct.decovnet.model import DeCoVNet
from covidkit.ct.decovnet.method import DeCoVNetConfig, classifier_arrays, lung_mask, predict_volume, prepare_volume
from covidkit.ct.decovnet.lungmask import LungUNet
from covidkit.ct.decovnet.volumes import DATASET_DIR, CTVolume, read_cases, read_volume


def _volumes(n: int, slices: int, size: int, input_dir: Path | None, seed: int) -> list[CTVolume]:
    if input_dir is not None:
        cases = read_cases(Path(input_dir) / DATASET_DIR)[:n]
        return [read_volume(c.volume) for c in cases]
    from covidkit.synth.ct_volumes import synth_volume

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        v = synth_volume(rng, slices, size, positive=i % 2 == 0)
        out.append(CTVolume(v.hu.astype(np.float32), v.spacing))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_decovnet(volumes: int = 4, slices: int = 120, size: int = 512, input_dir: Path | None = None,
                   device: str | None = None, input_size: tuple[int, int] = (224, 336), lung_input_size: int = 256,
                   target_spacing: tuple[float, float, float] = (5.0, 1.0, 1.0), seed: int = 0) -> pd.DataFrame:
    """Time the inference stages on ``volumes`` volumes (after one warm-up volume); prints and returns
    one row per volume with the seconds of each stage and the total."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = DeCoVNetConfig(target_spacing=target_spacing, input_size=input_size, lung_input_size=lung_input_size)
    lung_model = LungUNet(width=cfg.lung_width).to(dev).eval()
    model = DeCoVNet(input_size=input_size).to(dev).eval()
    data = _volumes(volumes + 1, slices, size, input_dir, seed)
    rows = []
    for i, volume in enumerate(data):
        times = {}
        start = time.perf_counter()
        prepared = prepare_volume(volume, cfg)
        times["prepare_s"] = time.perf_counter() - start
        lungs, _ = lung_mask(lung_model, prepared.image, prepared.lungs, cfg, dev)
        _sync(dev)
        times["lung_mask_s"] = time.perf_counter() - start - sum(times.values())
        arrays = classifier_arrays(prepared.image, lungs, None, cfg.input_size)
        times["crop_s"] = time.perf_counter() - start - sum(times.values())
        predict_volume(model, arrays, cfg, dev)
        _sync(dev)
        times["classify_cam_localize_s"] = time.perf_counter() - start - sum(times.values())
        times["total_s"] = time.perf_counter() - start
        if i > 0:  # the first volume warms up kernels and allocators
            rows.append({"volume": i, "shape": "x".join(map(str, volume.shape)),
                         "input_slices": arrays["image"].shape[0], **times})
    table = pd.DataFrame(rows)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(table.round(3).to_string(index=False))
    print(f"DeCoVNet inference on {name}: {table['total_s'].mean():.2f} s per volume "
          f"(input {input_size[0]}x{input_size[1]}, U-Net at {lung_input_size}; paper: 1.93 s on a GPU)")
    return table
