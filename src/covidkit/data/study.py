"""The study-level training dataset (06) over the prepared PNGs: the image, its study's class, its box mask."""
from __future__ import annotations

import numpy as np
import torch
from torchvision import tv_tensors

from covidkit.data.prepared import PreparedImages
from covidkit.data.siim import STUDY_CLASSES
from covidkit.pseudo import SOFT_COLUMNS, WEIGHT


def box_mask(shape: tuple[int, int], boxes: np.ndarray) -> np.ndarray:
    """A uint8 mask of ``shape``: 1 inside any box (pixel coordinates), 0 elsewhere."""
    mask = np.zeros(shape, np.uint8)
    for x1, y1, x2, y2 in boxes:
        mask[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))] = 1
    return mask


class StudyImageDataset(PreparedImages):
    """``(image, target)`` per row of a prepared train table; ``target``: ``label``, ``none``, ``mask``.

    The transform moves the mask with the image (``tv_tensors.Mask``).
    """

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        grey, boxes = self.image_and_boxes(index)
        image, mask = self.transform(tv_tensors.Image(torch.from_numpy(grey)[None]),
                                     tv_tensors.Mask(torch.from_numpy(box_mask(grey.shape, boxes))[None]))
        row = self.table.iloc[index]
        target = {"label": STUDY_CLASSES.index(row["label"]), "none": float(len(boxes) == 0),
                  "mask": mask.as_subclass(torch.Tensor).float()}
        if WEIGHT in self.table:  # a round with pseudo-labels (covidkit.pseudo.with_soft_labels)
            target["soft"] = torch.tensor([row[c] for c in SOFT_COLUMNS], dtype=torch.float32)
            target["weight"] = float(row[WEIGHT])
        return image, target
