"""The SIIM opacity detection dataset over the prepared PNGs (``covidkit.prepare.train_table``)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torchvision import tv_tensors

from covidkit.data.prepared import PreparedImages

OPACITY = 1  # the opacity class index (0: background, as torchvision's detection models count)


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
