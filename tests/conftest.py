"""Shared fixtures: a tiny synthetic competition, made once per test session (per xdist worker)."""
from __future__ import annotations

from pathlib import Path

import pytest

TINY = dict(seed=7, train_studies=12, test_studies=5, nih_images=6, rsna_images=6, max_size=640,
            nih_size=256, rsna_size=256, workers=1, ct=False)


@pytest.fixture(scope="session")
def tiny_input(tmp_path_factory) -> Path:
    """An ``input/`` folder with every synthetic dataset, small."""
    from covidkit.synth import SynthConfig, write_all

    out = tmp_path_factory.mktemp("input")
    write_all(out, SynthConfig(**TINY))
    return out


@pytest.fixture(scope="session")
def real_radiograph() -> Path:
    """The one real chest radiograph we have: a PA chest CR, MONOCHROME1, uncompressed."""
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("RG1_UNCR.dcm", download=False))


# --------------------------------------------------------------------------- models folder (F; W's app tests use it)

TINY_PREPARED_SIZE = 64


def _tiny_run(run_dir: Path) -> Path:
    """A run folder holding what 00, 01, 03, 04, 05 and 06 leave for ``export_models``, where the layout says.

    Real models, two folds each, initialised with fixed seeds instead of trained (seconds, not
    minutes): a resnet18 Faster R-CNN as 03 saves it, the YOLO nano as ultralytics saves it, the
    study model as 06 saves it, and 05's fusion parameters and operating point.
    """
    import json

    import cv2
    import numpy as np
    import pandas as pd
    import torch

    from covidkit.ensemble import FusionParams
    from covidkit.layout import RunLayout
    from covidkit.models.backbones import build_classifier, save_backbone
    from covidkit.models.fasterrcnn import DetectorSpec, build_fasterrcnn, save_detector
    from covidkit.models.study import StudySpec, build_study_model, save_study_model
    from covidkit.models.yolo import load_model, setup_ultralytics
    from covidkit.layout import DETECTOR_FILE

    layout = RunLayout(run_dir)
    (layout.prepare.dir / "train").mkdir(parents=True)
    cv2.imwrite(str(layout.prepare.png("train", "a")), np.zeros((TINY_PREPARED_SIZE,) * 2, np.uint8))
    layout.prepare.meta_json.write_text(json.dumps({"prepared_size": TINY_PREPARED_SIZE}))
    pd.DataFrame({"image_id": list("abcd"), "label": ["negative", "typical", "typical", "atypical"],
                  "fold": [0, 1, 0, 1]}).to_csv(layout.prepare.folds_csv, index=False)

    torch.manual_seed(0)
    save_backbone(build_classifier("resnet18", 15), layout.nih_pretrain.backbone, "resnet18")
    spec = DetectorSpec(input_size=TINY_PREPARED_SIZE, fpn_layers=(3, 4), anchor_sizes=(8, 16, 32), proposals_train=64,
                        proposals_test=32, box_batch_size_per_image=32, representation_size=32)
    for split in (0, 1):
        torch.manual_seed(split)
        save_detector(build_fasterrcnn(arch="resnet18", spec=spec), "resnet18", spec, TINY_PREPARED_SIZE,
                      layout.siim_fasterrcnn.fold(split) / DETECTOR_FILE)

    setup_ultralytics(run_dir)
    for fold in (0, 1):
        fold_dir = layout.siim_yolo.fold(fold)
        (fold_dir / "weights").mkdir(parents=True)
        torch.manual_seed(fold)
        load_model("yolo11n.yaml").save(fold_dir / "weights" / "best.pt")
        (fold_dir / "results.csv").write_text("epoch,metrics/mAP50(B)\n1,0.0\n")
        (fold_dir / "covidkit_config.json").write_text('{"imgsz": 64}')

    FusionParams(skip_box_thr=0.001).save(layout.ensemble_wbf.fusion)
    layout.ensemble_wbf.operating_point.write_text('{"threshold": 0.25}')
    spec = StudySpec(encoder="resnet18", width=8, input_size=64, prepared_size=TINY_PREPARED_SIZE)
    for split in (0, 1):
        torch.manual_seed(split)
        save_study_model(build_study_model(spec), spec, layout.study_level.model(split))
    return run_dir


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory) -> Path:
    """A run folder with the outputs of 00-06 that 07 exports (see ``_tiny_run``); treat it as read-only."""
    return _tiny_run(tmp_path_factory.mktemp("tiny_run"))


@pytest.fixture(scope="session")
def models_dir(tiny_run_dir, tmp_path_factory) -> Path:
    """A real models folder, as ``covidkit.export.export_models`` writes it, of tiny seeded models.

    Two folds each of Faster R-CNN (resnet18), YOLO (nano, 64 px) and the study model (resnet18);
    prepared size 64 px. Built once per session (a few seconds); treat it as read-only.
    """
    from covidkit.export import export_models

    return export_models(tiny_run_dir, tmp_path_factory.mktemp("exported") / "models")
