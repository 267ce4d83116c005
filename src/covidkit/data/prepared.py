"""The prepared training images (``covidkit.prepare.train_table``) as a torch dataset base: each row's grey PNG
with its boxes in that PNG's pixels; the detection (03) and study (06) datasets build their targets on it."""
from __future__ import annotations

import numpy as np
import pandas as pd
from torch.utils.data import Dataset

from covidkit.boxes import scale_boxes
from covidkit.images import read_grey

TABLE_COLUMNS = ("image_id", "path", "orig_height", "orig_width", "boxes")


class PreparedImages(Dataset):
    """Rows of a prepared train table: each row's grey PNG with its boxes in that PNG's pixels."""

    def __init__(self, table: pd.DataFrame, transform) -> None:
        missing = [c for c in TABLE_COLUMNS if c not in table.columns]
        if missing:
            raise ValueError(f"prepared table lacks columns {missing}")
        self.table = table.reset_index(drop=True)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.table)

    def image_and_boxes(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        row = self.table.iloc[index]
        grey = read_grey(row["path"])
        return grey, scale_boxes(row["boxes"], (row["orig_height"], row["orig_width"]), grey.shape)
