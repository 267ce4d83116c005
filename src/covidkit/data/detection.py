"""The SIIM opacity detection dataset over the prepared PNGs (``covidkit.data.siim.prepared_train_table``)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from covidkit.boxes import scale_boxes
from covidkit.data.nih import read_grey
from covidkit.models.fasterrcnn import OPACITY

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


class OpacityDataset(PreparedImages):
    """``(image, target)`` per row of a prepared train table.

    ``target`` has ``boxes`` (``tv_tensors.BoundingBoxes``, XYXY, in the pixels of the returned
    image), ``labels`` (all ``OPACITY``) and ``index`` (the row, to map predictions back). Images
    without opacity have no boxes: they are the detector's negatives.
    """

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        grey, boxes = self.image_and_boxes(index)
        target = {
            "boxes": tv_tensors.BoundingBoxes(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                              format="XYXY", canvas_size=grey.shape),
            "labels": torch.full((len(boxes),), OPACITY, dtype=torch.int64),
            "index": index,
        }
        return self.transform(tv_tensors.Image(torch.from_numpy(grey)[None]), target)


def truth_boxes(table: pd.DataFrame) -> dict[str, np.ndarray]:
    """``{image_id: [N, 4] boxes in original pixels}`` of a prepared train table (for the AP)."""
    return dict(zip(table["image_id"], table["boxes"]))
