"""``covidkit bench estimate``: what the full profile needs on the real data, on paper, from parts measured here.

None of the real data are on the machines this project is developed on, so the full run's cost is estimated
from three measurements and the full profile's settings:

- ``covidkit bench models --json``: one training step of each full-size model at batch 1 and 2 (seconds, and the
  activation memory autograd saves for the backward pass), and its parameter and optimizer memory; run on a GPU
  (``--device cuda``) it also gives the allocator's peak memory, and its seconds are used as they are;
- ``covidkit bench prepare --prepared-size 1024 --json`` on real-size DICOMs: core-seconds and bytes per image;
- optionally a full-profile dry run's ``dry_run.json``: each stage's peak host memory at full model size.

Training time = items per epoch x epochs x models (folds, ablation variants) x the measured seconds per item
(at the largest measured batch up to the profile's), divided, for CPU measurements, by ``gpu_factor`` (how much
faster one modern GPU runs the same step; stated, not measured). Inference (out-of-fold, test, TTA, per-epoch
validation) costs a third of a training item, at the inference size. GPU memory, from a GPU measurement: the
allocator's peak + ``CUDA_CONTEXT_MIB``; from a CPU one: weights + gradients + optimizer state + the activations
autograd keeps for the backward pass + ``CUDA_CONTEXT_MIB``, float32 (an upper bound under autocast). Both are
linear in the batch between measured sizes and without the allocator's fragmentation and cuDNN's workspaces.
Everything printed is an estimate.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from covidkit.bench.models import ModelCost, load_costs
from covidkit.profiles import load_profile, merge_section

# The real data sets (the issue and the datasets' own documentation).
SIIM_TRAIN, SIIM_TEST = 6334, 1263
NIH_TRAIN_VAL, NIH_ALL = 86524, 112120  # train_val_list.txt and every image
RSNA_TRAIN = 26684
MEDSEG_SLICES, RADIOPAEDIA_SLICES = 100, 829
DECOVNET_TRAIN, DECOVNET_TEST = 499, 131
NIH_PNG_MIB = 0.38  # NIH's 1024 px 8-bit PNGs: about 42 GB over 112,120 images
RSNA_DICOM_MIB = 0.15  # RSNA's 1024 px JPEG-baseline DICOMs: about 3.7 GB over 26,684 + 3,000 images
CT_VOLUME_MIB = 75.0  # assumed: a 512 x 512 x ~300 int16 volume, gzip-compressed NIfTI
CUDA_CONTEXT_MIB = 600
INFER_COST = 1 / 3  # an inference item against a training item (forward only)
GPU_FACTOR = 200.0  # one modern GPU under autocast against this 2-core CPU, per training item (README)
GPU_BOX_CORES = 8  # the CPU cores of the GPU box, for 00's DICOM decoding


@dataclass(frozen=True)
class Workload:
    """What one stage trains and infers with one of ``bench models``' networks."""

    stage: str
    model: str  # a name in covidkit.bench.models.MODELS
    train_items: float  # per epoch and model
    epochs: int
    models: int  # folds or ablation variants
    batch: int  # per GPU
    infer_items: float = 0.0  # after and during training, all models together
    infer_scale: float = 1.0  # pixels of an inference item over a training item's


def _full(notebook: str) -> dict:
    """The full profile's settings of a stage (``common``, then its section)."""
    return merge_section(load_profile("full"), notebook, {})


def workloads() -> list[Workload]:
    """The full profile's training and inference, per stage, on the real data's sizes."""
    nih, rsna, frcnn = _full("01_pretrain_nih_resnext"), _full("02_pretrain_rsna_yolo"), _full("03_train_siim_fasterrcnn")
    yolo, study = _full("04_train_siim_yolo"), _full("06_study_level")
    cogseg, decov = _full("10_ct_cogseg"), _full("11_ct_decovnet")
    folds = _full("00_prepare_data")["folds"]
    views = 2 if study["hflip_tta"] else 1
    siim_fold_train = SIIM_TRAIN * (folds - 1) / folds
    test_passes = SIIM_TEST * folds * views  # 07: every fold model, every view
    cogseg_train = (0.7 * MEDSEG_SLICES * (10 if cogseg["augment"] else 1)  # 5 rotations + 4 scales + the slice
                    + 0.7 * RADIOPAEDIA_SLICES)
    return [
        Workload("01", "01 ResNeXt-101 32x8d classifier, 224 px", NIH_TRAIN_VAL * (1 - nih["val_fraction"]),
                 nih["epochs"], 1, nih["batch_size"], NIH_TRAIN_VAL * nih["val_fraction"] * nih["epochs"]),
        Workload("02", "02/04 YOLO11-L, 640 px", RSNA_TRAIN * (1 - rsna["val_fraction"]), rsna["epochs"], 1,
                 rsna["batch_size"], RSNA_TRAIN * rsna["val_fraction"] * rsna["epochs"]),
        Workload("03", "03 Faster R-CNN ResNeXt-101 FPN, 512 px", siim_fold_train, frcnn["epochs"], folds,
                 frcnn["batch_size"], SIIM_TRAIN + test_passes, (frcnn["infer_size"] / frcnn["input_size"]) ** 2),
        Workload("04", "02/04 YOLO11-L, 640 px", siim_fold_train, yolo["epochs"], folds, yolo["batch_size"],
                 SIIM_TRAIN + test_passes),
        Workload("06", "06 study U-Net, ResNeXt-101 encoder, 512 px", siim_fold_train, study["epochs"], folds,
                 study["batch_size"], SIIM_TRAIN * views + test_passes),
        Workload("10", "10 CogSeg, 256 -> 512 px", cogseg_train, cogseg["epochs"], 5, cogseg["batch_size"],
                 0.3 * (MEDSEG_SLICES + RADIOPAEDIA_SLICES) * 5),
        Workload("11", "11 DeCoVNet, 64 x 224 x 336", DECOVNET_TRAIN, decov["epochs"], 1, decov["batch_size"],
                 DECOVNET_TEST * decov["epochs"]),
    ]


def measured_on_gpu(cost: ModelCost) -> bool:
    return cost.device.startswith("cuda")


def seconds_per_item(cost: ModelCost, batch: int) -> float:
    """A training item's seconds at ``batch``: at the largest measured batch up to it, and at least at batch 2
    (closer to a large batch's per-item cost than batch 1)."""
    sizes = sorted(cost.seconds)
    fitting = [b for b in sizes if b <= max(batch, 2)] or sizes[:1]
    return cost.seconds[fitting[-1]] / fitting[-1]


def gpu_hours(work: Workload, cost: ModelCost, gpu_factor: float) -> float:
    """Measured on a GPU: its seconds; measured on the CPU: divided by ``gpu_factor``."""
    factor = 1.0 if measured_on_gpu(cost) else gpu_factor
    items = work.train_items * work.epochs * work.models + work.infer_items * INFER_COST * work.infer_scale
    return items * seconds_per_item(cost, work.batch) / factor / 3600


def _linear(values: dict[int, float], batch: int) -> float:
    """``values`` at ``batch``: measured, or on the line through the two nearest measured batch sizes (the smallest
    batch's figure also holds what does not grow with the batch)."""
    if batch in values:
        return values[batch]
    sizes = sorted(values)
    lower, upper = [b for b in sizes if b < batch], [b for b in sizes if b > batch]
    a, b = (lower[-1], upper[0]) if lower and upper else (sizes[-2], sizes[-1]) if lower else (sizes[0], sizes[1])
    return values[a] + (batch - a) * (values[b] - values[a]) / (b - a)


def gpu_memory_mib(cost: ModelCost, batch: int) -> float:
    """Measured on a GPU: the allocator's peak plus the CUDA context; else weights, gradients, optimizer state and
    float32 activations added up."""
    if cost.peak_mib:
        return _linear(cost.peak_mib, batch) + CUDA_CONTEXT_MIB
    return 2 * cost.params_mib + cost.optimizer_mib + _linear(cost.activation_mib, batch) + CUDA_CONTEXT_MIB


def disk_gib(prepare: dict) -> dict[str, float]:
    """The inputs and what the run writes, in GiB."""
    png_1024 = prepare["png_bytes"] * (1024 / prepare["size"]) ** 2 / 2**30
    siim = SIIM_TRAIN + SIIM_TEST
    return {
        "SIIM DICOMs (input)": siim * prepare["dicom_bytes"] / 2**30,
        "NIH PNGs (input)": NIH_ALL * NIH_PNG_MIB / 1024,
        "RSNA DICOMs (input)": (RSNA_TRAIN + 3000) * RSNA_DICOM_MIB / 1024,
        "CT volumes (input, assumed)": (DECOVNET_TRAIN + DECOVNET_TEST) * CT_VOLUME_MIB / 1024,
        "00 prepared PNGs, 1024 px": siim * png_1024,
        "02 RSNA PNGs, 640 px": RSNA_TRAIN * png_1024 * (640 / 1024) ** 2,
    }


def estimate(models_json: str | Path, prepare_json: str | Path, gpu_factor: float | None = None,
             dry_run: str | Path | None = None) -> str:
    """The estimate tables, as Markdown."""
    gpu_factor = gpu_factor or GPU_FACTOR
    costs = {c.name: c for c in load_costs(models_json)}
    prepare = json.loads(Path(prepare_json).read_text())
    peaks = {}
    if dry_run:
        peaks = {row["stage"][:2]: row["peak_rss_mib"] for row in json.loads(Path(dry_run).read_text())}
    on_gpu = sorted({f"{c.device} ({c.amp or 'float32'})" for c in costs.values() if measured_on_gpu(c)})
    source = (f"training steps measured on {', '.join(on_gpu)}" if on_gpu and all(map(measured_on_gpu, costs.values()))
              else f"GPU = {gpu_factor:g} x this CPU per training item (stated, not measured)")
    lines = [f"ESTIMATE: the full profile on the real data, from measured parts; {source}", "",
             "| stage | model | items x epochs x models | GPU h | GPU MiB b=1 | b=2 | profile batch | host MiB (CPU dry run) |",
             "|---|---|---|---|---|---|---|---|"]
    siim = SIIM_TRAIN + SIIM_TEST
    prepare_h = siim * prepare["prepare_core_s"] / GPU_BOX_CORES / 3600
    # RSNA's DICOMs are 1024 px: decoding scales with the pixels
    rsna_h = RSNA_TRAIN * prepare["prepare_core_s"] * 1024**2 / prepare["dicom_pixels"] / GPU_BOX_CORES / 3600
    rows = [("00", f"| 00 | DICOM -> 1024 px PNG ({GPU_BOX_CORES} CPU cores) | {siim:,} images | {prepare_h:.2f} (CPU) "
                   f"| | | | {_fmt(peaks.get('00'))} |"),
            ("02", f"| 02 | RSNA DICOM -> 640 px PNG ({GPU_BOX_CORES} CPU cores) | {RSNA_TRAIN:,} images "
                   f"| {rsna_h:.2f} (CPU) | | | | |"),
            ("05", f"| 05 | fusion and its grid (`bench scale`) | | < 0.1 (CPU) | | | | {_fmt(peaks.get('05'))} |"),
            ("07", f"| 07 | export, fusion, stacker, submission (`bench scale`); the models' test inference is "
                   f"in 03, 04, 06 | | < 0.1 (CPU) | | | | {_fmt(peaks.get('07'))} |")]
    total = prepare_h + rsna_h
    for work in workloads():
        cost = costs[work.model]
        hours = gpu_hours(work, cost, gpu_factor)
        total += hours
        rows.append((work.stage, (
            f"| {work.stage} | {work.model} | {work.train_items:,.0f} x {work.epochs} x {work.models} "
            f"| {hours:.{2 if hours < 1 else 1}f} | {gpu_memory_mib(cost, 1):,.0f} | {gpu_memory_mib(cost, 2):,.0f} "
            f"| {gpu_memory_mib(cost, work.batch):,.0f} (b={work.batch}) | {_fmt(peaks.get(work.stage))} |")))
    lines += [row for _, row in sorted(rows, key=lambda r: r[0])]  # stable: 02's data before its training
    lines += [f"| all | | | **{total:.0f}** | | | | |", "",
              "| disk | GiB |", "|---|---|"]
    disk = disk_gib(prepare)
    lines += [f"| {name} | {gib:,.1f} |" for name, gib in disk.items()]
    checkpoints = sum(2 * (c.params_mib + c.optimizer_mib) for c in costs.values()) * 5 / 1024
    lines += [f"| checkpoints (last + model file, 5 folds, upper bound) | {checkpoints:,.1f} |",
              f"| all | **{sum(disk.values()) + checkpoints:,.0f}** |"]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f}"
