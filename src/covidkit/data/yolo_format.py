"""Datasets in the YOLO (ultralytics) format, and the SIIM training images written as one.

Layout of a YOLO dataset here::

    images/<id>.png          the image (for SIIM: a link to the prepared PNG)
    labels/<id>.txt          one line per box: "0 cx cy w h", normalised to 0..1; empty: no box
    <name>_train.txt         image paths, one a line
    <name>_val.txt
    <name>.yaml              data.yaml: path, train, val, names

ultralytics finds each label by replacing ``/images/`` with ``/labels/`` in the image path, so
several folds share one ``images/`` + ``labels/`` and differ only in their lists.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from tqdm import tqdm

from covidkit.boxes import as_boxes, clip_boxes

CLASS_NAMES = ("opacity",)


def yolo_lines(boxes, hw: tuple[int, int], class_id: int = 0) -> list[str]:
    """``[N, 4]`` x1, y1, x2, y2 boxes in an image of size ``hw`` -> ``"c cx cy w h"`` lines (0..1).

    Boxes are clipped to the image; those left without area are dropped.
    """
    boxes = clip_boxes(as_boxes(boxes), hw)
    height, width = hw
    lines = []
    for x1, y1, x2, y2 in boxes:
        if x2 <= x1 or y2 <= y1:
            continue
        cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
        lines.append(f"{class_id} {cx:.6f} {cy:.6f} {(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}")
    return lines


def read_yolo_labels(path: str | Path, hw: tuple[int, int]) -> np.ndarray:
    """A ``labels/*.txt`` file -> ``[N, 4]`` x1, y1, x2, y2 boxes in an image of size ``hw``."""
    rows = np.array([line.split() for line in Path(path).read_text().splitlines() if line.strip()],
                    dtype=np.float64).reshape(-1, 5)
    height, width = hw
    cx, cy, w, h = rows[:, 1] * width, rows[:, 2] * height, rows[:, 3] * width, rows[:, 4] * height
    return as_boxes(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1))


def write_labels(path: Path, boxes, hw: tuple[int, int]) -> None:
    """Write one label file (empty for an image without boxes)."""
    lines = yolo_lines(boxes, hw)
    path.write_text("".join(f"{line}\n" for line in lines))


def link_image(source: Path, target: Path) -> None:
    """``target`` -> ``source`` as a symbolic link (a copy where links are not allowed)."""
    if target.is_symlink() or target.exists():
        target.unlink()
    try:
        target.symlink_to(source.resolve())
    except OSError:
        shutil.copyfile(source, target)


def write_image_list(path: Path, images: Iterable[str | Path]) -> Path:
    path.write_text("".join(f"{image}\n" for image in images))
    return path


def write_data_yaml(path: Path, train_list: Path, val_list: Path, names: Sequence[str] = CLASS_NAMES) -> Path:
    """The ``data.yaml`` ultralytics trains on (absolute paths)."""
    spec = {
        "path": str(path.parent.resolve()),
        "train": str(train_list.resolve()),
        "val": str(val_list.resolve()),
        "names": dict(enumerate(names)),
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def write_split(root: Path, name: str, train_images: Sequence[Path], val_images: Sequence[Path]) -> Path:
    """``<name>_train.txt``, ``<name>_val.txt`` and ``<name>.yaml`` in ``root``; returns the YAML."""
    if not len(train_images) or not len(val_images):
        raise ValueError(f"split {name}: {len(train_images)} training and {len(val_images)} validation images; "
                         "both must be non-empty")
    _drop_stale_cache(root)
    train_list = write_image_list(root / f"{name}_train.txt", train_images)
    val_list = write_image_list(root / f"{name}_val.txt", val_images)
    return write_data_yaml(root / f"{name}.yaml", train_list, val_list)


def image_path(root: Path, image_id: str) -> Path:
    """Where a YOLO dataset keeps an image (ultralytics finds its labels by replacing ``images`` with ``labels``)."""
    return Path(root) / "images" / f"{image_id}.png"


def label_path(root: Path, image_id: str) -> Path:
    return Path(root) / "labels" / f"{image_id}.txt"


def write_siim_dataset(table: pd.DataFrame, root: str | Path) -> Path:
    """Images (links to the prepared PNGs) and labels of every row of ``prepared_train_table``.

    Boxes are in original pixels; the prepared PNG is the image stretched to a square, so the
    normalised coordinates are the same in both and the original size is all that is needed.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for row in tqdm(table.itertuples(index=False), total=len(table), desc="YOLO labels", unit="img", leave=False):
        link_image(Path(row.path), image_path(root, row.image_id))
        write_labels(label_path(root, row.image_id), row.boxes, (row.orig_height, row.orig_width))
    return root


def write_siim_fold(table: pd.DataFrame, root: str | Path, fold: int, column: str = "fold") -> Path:
    """The data YAML of fold ``fold`` of ``table[column]``: validate on it, train on the others."""
    root = Path(root)
    is_val = table[column].to_numpy() == fold
    paths = np.array([image_path(root, i) for i in table["image_id"]], dtype=object)
    return write_split(root, f"fold{fold}", list(paths[~is_val]), list(paths[is_val]))


def _drop_stale_cache(root: Path) -> None:
    # ultralytics caches parsed labels in labels.cache, keyed by a hash of the file sizes; labels
    # rewritten with the same sizes (a changed box) would be read from the stale cache.
    cache = root / "labels.cache"
    if cache.exists():
        os.unlink(cache)
