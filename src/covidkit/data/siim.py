"""The SIIM-FISABIO-RSNA COVID-19 Detection competition: file layout, ids and labels.

Kaggle layout of ``siim-covid19-detection/``::

    train/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    test/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    train_image_level.csv   id,boxes,label,StudyInstanceUID      (id = "<SOP>_image")
    train_study_level.csv   id,Negative for Pneumonia,Typical Appearance,
                            Indeterminate Appearance,Atypical Appearance  (id = "<Study>_study")
    sample_submission.csv   id,PredictionString
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

COMPETITION = "siim-covid19-detection"
# Synthetic data only: the hidden test labels, in the two training CSV formats.
SOLUTION = "siim-covid19-detection-solution"
SOLUTION_IMAGE_CSV = "test_image_level.csv"
SOLUTION_STUDY_CSV = "test_study_level.csv"

STUDY_COLUMNS = [
    "Negative for Pneumonia",
    "Typical Appearance",
    "Indeterminate Appearance",
    "Atypical Appearance",
]
# Class names as they appear in a submission, in the order of STUDY_COLUMNS.
STUDY_CLASSES = ["negative", "typical", "indeterminate", "atypical"]
IMAGE_CLASSES = ["none", "opacity"]
ALL_CLASSES = STUDY_CLASSES + IMAGE_CLASSES

IMAGE_SUFFIX = "_image"
STUDY_SUFFIX = "_study"


def image_row_id(image_id: str) -> str:
    return f"{image_id}{IMAGE_SUFFIX}"


def study_row_id(study_id: str) -> str:
    return f"{study_id}{STUDY_SUFFIX}"


def strip_suffix(row_id: str) -> str:
    """``"abc_image"`` -> ``"abc"``; ``"abc_study"`` -> ``"abc"``."""
    for suffix in (IMAGE_SUFFIX, STUDY_SUFFIX):
        if row_id.endswith(suffix):
            return row_id[: -len(suffix)]
    raise ValueError(f"row id {row_id!r} ends in neither {IMAGE_SUFFIX} nor {STUDY_SUFFIX}")


def read_study_labels(path: str | Path) -> pd.DataFrame:
    """``train_study_level.csv`` -> columns ``study_id, label`` (label in STUDY_CLASSES)."""
    df = pd.read_csv(path)
    missing = [c for c in ["id", *STUDY_COLUMNS] if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    onehot = df[STUDY_COLUMNS].to_numpy()
    bad = onehot.sum(axis=1) != 1
    if bad.any():
        raise ValueError(f"{path}: rows without exactly one class: {df.loc[bad, 'id'].tolist()[:5]}")
    return pd.DataFrame({
        "study_id": df["id"].map(strip_suffix),
        "label": [STUDY_CLASSES[i] for i in onehot.argmax(axis=1)],
    })


def read_image_labels(path: str | Path) -> pd.DataFrame:
    """``train_image_level.csv`` -> columns ``image_id, study_id, boxes`` (boxes: list of x1,y1,x2,y2)."""
    from covidkit.boxes import parse_boxes_column

    df = pd.read_csv(path)
    missing = [c for c in ["id", "boxes", "label", "StudyInstanceUID"] if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    return pd.DataFrame({
        "image_id": df["id"].map(strip_suffix),
        "study_id": df["StudyInstanceUID"].astype(str),
        "boxes": df["boxes"].map(parse_boxes_column),
    })


def dicom_paths(competition_dir: str | Path, split: str) -> dict[str, Path]:
    """``{image_id: path}`` for every ``<split>/<study>/<series>/<image>.dcm``."""
    root = Path(competition_dir) / split
    return {p.stem: p for p in sorted(root.glob("*/*/*.dcm"))}
