"""NIH ChestX-ray14: layout, labels and the multi-label classification dataset.

Kaggle layout of ``nih-chest-xrays/`` (the ``nih-chest-xrays/data`` dataset)::

    Data_Entry_2017.csv       Image Index,Finding Labels,Follow-up #,Patient ID,...
                              (Finding Labels: pipe-separated, e.g. "Effusion|Mass", or "No Finding")
    images_001/images/00000001_000.png
    ...
    images_012/images/....png

Images are found wherever they lie below the folder (``**/*.png``), so the unsplit layout
``images/*.png`` of the NIH download works too.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import GroupShuffleSplit
from torch.utils.data import Dataset
from torchvision import tv_tensors

from covidkit import images
from covidkit.deprecated import moved

DATASET = "nih-chest-xrays"
ENTRY_CSV = "Data_Entry_2017.csv"
NO_FINDING = "No Finding"
FINDINGS = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
]
LABELS = [*FINDINGS, NO_FINDING]


def read_nih_table(nih_dir: str | Path) -> pd.DataFrame:
    """One row per image of ``Data_Entry_2017.csv`` found on disk.

    Columns: ``image_id, patient_id, path`` and one 0/1 column per name in ``LABELS``.
    Raises ``ValueError`` on an unknown label or when no listed image is on disk.
    """
    nih_dir = Path(nih_dir)
    entries = pd.read_csv(nih_dir / ENTRY_CSV, dtype={"Image Index": str, "Patient ID": str})
    missing = [c for c in ("Image Index", "Finding Labels", "Patient ID") if c not in entries.columns]
    if missing:
        raise ValueError(f"{nih_dir / ENTRY_CSV}: missing columns {missing}")
    paths = {p.name: p for p in nih_dir.rglob("*.png")}
    found = entries["Image Index"].isin(paths)
    if not found.any():
        raise ValueError(f"none of the {len(entries)} images of {ENTRY_CSV} is under {nih_dir}")
    entries = entries[found]
    table = pd.DataFrame({
        "image_id": entries["Image Index"].to_numpy(),
        "patient_id": entries["Patient ID"].to_numpy(),
        "path": [str(paths[name]) for name in entries["Image Index"]],
    })
    return pd.concat([table, multi_hot(entries["Finding Labels"])], axis=1)


def multi_hot(findings: pd.Series) -> pd.DataFrame:
    """Pipe-separated ``Finding Labels`` -> one 0/1 column per name in ``LABELS``."""
    split = findings.fillna("").astype(str).str.split("|")
    unknown = sorted({name for names in split for name in names} - set(LABELS))
    if unknown:
        raise ValueError(f"unknown NIH labels {unknown}; expected names from {LABELS}")
    return pd.DataFrame([[int(name in names) for name in LABELS] for names in split], columns=LABELS)


def patient_split(table: pd.DataFrame, val_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and validation rows, no patient in both."""
    splitter = GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    train_idx, val_idx = next(splitter.split(table, groups=table["patient_id"]))
    return table.iloc[train_idx].reset_index(drop=True), table.iloc[val_idx].reset_index(drop=True)


def resize_short_side(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` scaled so that its short side is ``size`` (area interpolation when shrinking)."""
    height, width = image.shape[:2]
    scale = size / min(height, width)
    hw = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, hw, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


class NihDataset(Dataset):
    """``(image, target)``: the transformed image and the float multi-hot vector over ``LABELS``.

    ``cache_size``: decode each image once, keep it in memory with its short side scaled to
    ``cache_size`` (the transform's first resize), and read it from there in later epochs: on
    small runs decoding the 1024-pixel PNGs costs as much as a low-resolution training step.
    """

    def __init__(self, table: pd.DataFrame, transform, cache_size: int | None = None) -> None:
        self.paths = table["path"].tolist()
        self.targets = torch.tensor(table[LABELS].to_numpy(dtype=np.float32))
        self.transform = transform
        self.cache_size = cache_size
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def grey(self, index: int) -> np.ndarray:
        if self.cache_size is None:
            return images.read_grey(self.paths[index])
        if index not in self._cache:
            self._cache[index] = self._decode(index)
        return self._cache[index]

    def _decode(self, index: int) -> np.ndarray:
        return resize_short_side(images.read_grey(self.paths[index]), self.cache_size)

    def fill_cache(self, threads: int) -> None:
        """Decode every image not cached yet, ``threads`` at a time (OpenCV releases the GIL while it decodes)."""
        if self.cache_size is None:
            raise ValueError("fill_cache needs a cache_size")
        missing = [i for i in range(len(self)) if i not in self._cache]
        with ThreadPoolExecutor(max(1, threads)) as pool:
            self._cache.update(zip(missing, pool.map(self._decode, missing)))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = tv_tensors.Image(torch.from_numpy(self.grey(index))[None])
        return self.transform(image), self.targets[index]


__getattr__ = moved(__name__, {"read_grey": "covidkit.images.read_grey"})
