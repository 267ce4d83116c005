"""A self-contained models folder: every fold model of 03, 04 and 06, the fusion parameters, a manifest.

What ``covidkit predict`` and ``covidkit serve`` take, and what a Kaggle dataset would hold::

    manifest.json          format, versions, the files with their SHA-256, sizes, priors, 06's none rule,
                           05's box score threshold for display
    fusion.json            the WBF parameters chosen in 05 (covidkit.ensemble.FusionParams)
    stacker.json           06's study stacker (covidkit.stacking), when 06 fitted one
    fasterrcnn/fold<k>.pt  03's models (covidkit.models.fasterrcnn.save_detector: weights, spec, inference size)
    yolo/fold<k>.pt        04's ultralytics weights, as trained
    study/fold<k>.pt       06's study models (covidkit.models.study.save_study_model), as trained

Every model file carries what rebuilds its network, so exporting copies files and never rebuilds a stage's
configuration. ``export_models(run_dir, out_dir)`` builds the folder from a run folder; ``read_manifest``
reads it back and checks every file against its hash.
"""
from __future__ import annotations

import json
import platform
import shutil
import warnings
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd

from covidkit.deprecated import moved
from covidkit.data.siim import STUDY_CLASSES, read_image_labels, read_study_labels
from covidkit.ensemble import FusionParams
from covidkit.layout import RunLayout

MODELS_FORMAT = "covidkit.models/1"
MANIFEST = "manifest.json"
DETECTORS = ("fasterrcnn", "yolo")  # the order of FusionParams.weights
PACKAGES = ("covidkit", "torch", "torchvision", "ultralytics", "ensemble-boxes", "numpy", "pydicom")

FUSION_JSON = "fusion.json"  # 05's FusionParams
STACKER_JSON = "stacker.json"  # 06's study stacker (covidkit.stacking)


# --------------------------------------------------------------------------- the models of a run folder


def yolo_weights(layout: RunLayout) -> list[Path]:
    """04's fold models: the weights each ``fold<k>`` run predicted its OOF images with."""
    from covidkit.engine.yolo import finished_run

    return [finished_run(run).weights for run in layout.siim_yolo.folds("results.csv")]


def box_threshold(layout: RunLayout) -> float:
    """The box score threshold a reader is shown by default: 05's best-F1 operating point (0: every box)."""
    path = layout.ensemble_wbf.operating_point
    return float(json.loads(path.read_text())["threshold"]) if path.is_file() else 0.0


def none_rule(layout: RunLayout) -> str:
    """The image ``none`` rule 06 chose (its ``summary.json``); ``head`` for a run without that choice."""
    path = layout.study_level.summary
    summary = json.loads(path.read_text()) if path.is_file() else {}
    return summary.get("none_rule", {}).get("chosen", "head")


# --------------------------------------------------------------------------- priors


def training_priors(competition_dir: str | Path) -> dict:
    """The class frequencies of the training labels: what an image that cannot be read gets.

    ``study``: the share of each study class over the studies; ``none``: the share of images
    without an opacity box.
    """
    competition_dir = Path(competition_dir)
    studies = read_study_labels(competition_dir / "train_study_level.csv")
    images = read_image_labels(competition_dir / "train_image_level.csv")
    shares = studies["label"].value_counts(normalize=True)
    return {"study": {c: float(shares.get(c, 0.0)) for c in STUDY_CLASSES},
            "none": float(np.mean([len(b) == 0 for b in images["boxes"]]))}


def folds_priors(layout: RunLayout) -> dict:
    """Priors from 00's ``folds.csv`` alone (no image labels there: ``none`` takes P(negative))."""
    folds = pd.read_csv(layout.prepare.folds_csv, dtype={"image_id": str})
    shares = folds["label"].value_counts(normalize=True)
    study = {c: float(shares.get(c, 0.0)) for c in STUDY_CLASSES}
    return {"study": study, "none": study["negative"]}


# --------------------------------------------------------------------------- export and manifest


def package_versions() -> dict[str, str | None]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def export_models(run_dir: str | Path, out_dir: str | Path, competition_dir: str | Path | None = None,
                  hflip_tta: bool = False) -> Path:
    """Copy every fold model of 03, 04 and 06 of ``run_dir``, 05's ``fusion.json`` and a manifest to ``out_dir``.

    06's ``stacker.json`` goes with them when 06 fitted one (``stack_boxes``).

    ``hflip_tta``: whether the models are meant to predict each image flipped too (07's setting, which
    06 validated them with); recorded for the Kaggle bundle's notebook.
    ``competition_dir`` (with the training CSVs) gives the priors used for unreadable images;
    without it they come from 00's ``folds.csv``. Without 05's ``fusion.json`` the default
    ``FusionParams`` are written, with a warning. ``out_dir`` is replaced. Returns ``out_dir``.
    """
    from covidkit.engine.yolo import finished_run
    from covidkit.model_file import file_sha256

    layout, out_dir = RunLayout(run_dir), Path(out_dir)
    sources = {"fasterrcnn": layout.siim_fasterrcnn.models(),
               "yolo": yolo_weights(layout), "study": layout.study_level.models()}
    missing = [name for name, paths in sources.items() if not paths]
    if missing:
        raise FileNotFoundError(f"{layout.root} has no fold model for {missing} (run notebooks 03, 04 and 06 first)")
    size = layout.prepare.size
    final, out_dir = out_dir, out_dir.with_name(f".{out_dir.name}.tmp")  # moved over the old one once complete
    if out_dir.exists():
        shutil.rmtree(out_dir)
    for name in sources:
        (out_dir / name).mkdir(parents=True)

    files: dict[str, list[str]] = {name: [] for name in sources}
    for name in sources:
        for k, source in enumerate(sources[name]):
            shutil.copyfile(source, out_dir / name / f"fold{k}.pt")
            files[name].append(f"{name}/fold{k}.pt")

    if layout.ensemble_wbf.fusion.is_file():
        fusion = FusionParams.load(layout.ensemble_wbf.fusion)
    else:
        warnings.warn(f"{layout.ensemble_wbf.fusion} not found (run 05 first): exporting the default fusion parameters")
        fusion = FusionParams()
    fusion.save(out_dir / FUSION_JSON)
    stacker = STACKER_JSON if layout.study_level.stacker.is_file() else None
    if stacker:
        counts = {name: len(paths) for name, paths in sources.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"06's study stacker reads each fold's detectors and study model together, as out of "
                             f"fold: 03, 04 and 06 need one model per fold each, got {counts}")
        shutil.copyfile(layout.study_level.stacker, out_dir / stacker)
    hashed = [*sum(files.values(), []), FUSION_JSON, *([stacker] if stacker else [])]

    manifest = {
        "format": MODELS_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_run": str(layout.root.resolve()),
        "versions": package_versions(),
        "prepared_size": size,
        "detectors": list(DETECTORS),
        "models": files,
        "yolo_imgsz": [finished_run(p.parent.parent).imgsz for p in sources["yolo"]],
        "fusion": FUSION_JSON,
        "stacker": stacker,
        "none_rule": none_rule(layout),
        "box_threshold": box_threshold(layout),
        "hflip_tta": hflip_tta,
        "priors": training_priors(competition_dir) if competition_dir else folds_priors(layout),
        "sha256": {rel: file_sha256(out_dir / rel) for rel in hashed},
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    out_dir.rename(final)
    return final


def read_manifest(models_dir: str | Path, verify: bool = True) -> dict:
    """The manifest of a models folder; with ``verify``, every listed file is checked against its hash."""
    from covidkit.model_file import file_sha256

    models_dir = Path(models_dir)
    path = models_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {models_dir} a folder written by export_models?")
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        raise ValueError(f"{path} is truncated or corrupted (not JSON): export the models folder again") from None
    if manifest.get("format") != MODELS_FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {MODELS_FORMAT!r}")
    for rel, digest in manifest["sha256"].items():
        if not (models_dir / rel).is_file():
            raise FileNotFoundError(f"{models_dir / rel} (listed in the manifest) is missing")
        if verify and file_sha256(models_dir / rel) != digest:
            raise ValueError(f"{models_dir / rel} does not match its SHA-256 in the manifest (changed or corrupt)")
    return manifest


__getattr__ = moved(__name__, {"sha256": "covidkit.model_file.file_sha256"})  # one file hash in the package
