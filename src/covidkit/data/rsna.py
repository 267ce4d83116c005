"""The RSNA Pneumonia Detection Challenge, and its conversion to a YOLO dataset for pretraining.

Kaggle layout of ``rsna-pneumonia-detection-challenge/``::

    stage_2_train_images/<patientId>.dcm     one chest radiograph per patient
    stage_2_train_labels.csv                 patientId,x,y,width,height,Target

``stage_2_train_labels.csv`` has one row per box (``Target`` 1) and one row without a box
(``Target`` 0, empty coordinates) for each image without pneumonia; boxes are in original pixels.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from covidkit.boxes import EMPTY, as_boxes
from covidkit.data import yolo_format
from covidkit.prepare import Task, run_tasks

COMPETITION = "rsna-pneumonia-detection-challenge"
IMAGES_DIR = "stage_2_train_images"
LABELS_CSV = "stage_2_train_labels.csv"
LABEL_COLUMNS = ["patientId", "x", "y", "width", "height", "Target"]


def read_labels(path: str | Path) -> pd.DataFrame:
    """``stage_2_train_labels.csv`` -> one row per image: ``image_id, boxes`` (``[N, 4]`` x1, y1, x2, y2).

    Raises ValueError on missing columns, a ``Target`` 1 row without a box, or an image with both
    ``Target`` 0 and ``Target`` 1 rows.
    """
    df = pd.read_csv(path, dtype={"patientId": str})
    missing = [c for c in LABEL_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    positive = df["Target"] == 1
    coords = df[["x", "y", "width", "height"]]
    incomplete = positive & coords.isna().any(axis=1)
    if incomplete.any():
        raise ValueError(f"{path}: Target 1 rows without a box for {df.loc[incomplete, 'patientId'].tolist()[:5]}")
    mixed = df.groupby("patientId")["Target"].nunique() > 1
    if mixed.any():
        raise ValueError(f"{path}: images with both Target 0 and 1 rows: {mixed[mixed].index.tolist()[:5]}")
    boxes = df.loc[positive, ["patientId"]].assign(
        x1=df["x"], y1=df["y"], x2=df["x"] + df["width"], y2=df["y"] + df["height"])
    per_image = {pid: as_boxes(g[["x1", "y1", "x2", "y2"]].to_numpy()) for pid, g in boxes.groupby("patientId")}
    ids = df["patientId"].drop_duplicates().sort_values()
    return pd.DataFrame({"image_id": ids.to_numpy(), "boxes": [per_image.get(i, EMPTY.copy()) for i in ids]})


@dataclass
class RsnaYoloDataset:
    """A converted RSNA dataset: ``data_yaml`` to train on, ``meta`` one row per image (``status``)."""

    root: Path
    data_yaml: Path
    meta: pd.DataFrame

    @property
    def failed(self) -> pd.DataFrame:
        return self.meta[self.meta["status"] == "failed"]


def convert_to_yolo(rsna_dir: str | Path, out_dir: str | Path, size: int = 512, val_fraction: float = 0.1,
                    seed: int = 42, workers: int | None = None, limit: int | None = None) -> RsnaYoloDataset:
    """DICOMs + labels -> ``out_dir/images/*.png`` (``size`` square), ``labels/*.txt``, ``rsna.yaml``.

    Uses the DICOM-to-PNG step of ``covidkit.prepare`` (all cores, atomic writes, a re-run skips
    finished images, unreadable files become ``failed`` rows of ``meta.csv``). The validation
    split is stratified by whether an image has boxes (one image per patient: no grouping
    needed). ``limit`` keeps a stratified sample of that many images (quick runs).
    """
    rsna_dir, out_dir = Path(rsna_dir), Path(out_dir)
    labels = read_labels(rsna_dir / LABELS_CSV)
    has_box = np.array([len(b) > 0 for b in labels["boxes"]])
    if limit is not None and limit < len(labels):
        labels, _ = train_test_split(labels, train_size=limit, random_state=seed, stratify=_strata(has_box, limit))
        labels = labels.sort_values("image_id").reset_index(drop=True)
    images = out_dir / "images"
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    tasks = [Task(i, i, "train", rsna_dir / IMAGES_DIR / f"{i}.dcm", images / f"{i}.png", size)
             for i in labels["image_id"]]
    rows = [row for row, _ in run_tasks(tasks, workers or os.cpu_count() or 1, desc="RSNA DICOM -> PNG")]
    meta = pd.DataFrame(rows).drop(columns=["study_id", "split"]).merge(labels, on="image_id")
    meta = meta.sort_values("image_id").reset_index(drop=True)
    ok = meta[meta["status"] == "ok"]
    for row in ok.itertuples(index=False):
        yolo_format.write_labels(yolo_format.label_path(out_dir, row.image_id), row.boxes,
                                 (int(row.orig_height), int(row.orig_width)))
    meta["n_boxes"] = [len(b) for b in meta["boxes"]]
    meta.drop(columns=["boxes"]).to_csv(out_dir / "meta.csv", index=False)

    if ok.empty:
        raise ValueError(f"no RSNA image could be read; see the errors in {out_dir / 'meta.csv'}")
    has_box_ok = np.array([len(b) > 0 for b in ok["boxes"]])
    n_val = max(1, round(val_fraction * len(ok)))
    train_ids, val_ids = train_test_split(ok["image_id"].to_numpy(), test_size=n_val, random_state=seed,
                                          stratify=_strata(has_box_ok, n_val))
    data_yaml = yolo_format.write_split(out_dir, "rsna", [images / f"{i}.png" for i in sorted(train_ids)],
                                        [images / f"{i}.png" for i in sorted(val_ids)])
    return RsnaYoloDataset(out_dir, data_yaml, meta)


def _strata(has_box: np.ndarray, n_first: int) -> np.ndarray | None:
    """``has_box`` as strata when both parts of a split (``n_first`` and the rest) can hold both kinds."""
    counts = np.bincount(has_box.astype(int), minlength=2)
    if counts.min() < 2 or min(n_first, len(has_box) - n_first) < 2:
        return None
    return has_box
