"""Segmentation metrics of the CogSeg paper: IoU, Dice (DSC), sensitivity, specificity.

Pixel counts are accumulated over the whole test set in a confusion matrix (one class against the rest for each
class), then per class: IoU = TP / (TP + FP + FN), DSC = 2 TP / (2 TP + FP + FN), sensitivity = TP / (TP + FN),
specificity = TN / (TN + FP). A ratio with a zero denominator (class absent from truth and prediction) is NaN
and is left out of the averages. ``mIoU``, ``DSC``, ``sensitivity``, ``specificity`` are the means over the
lesion classes (ground-glass, consolidation, pleural effusion), as the paper reports them.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from covidkit.ct.cogseg.medseg import CLASS_NAMES, LESION_CLASSES

METRICS = ("IoU", "DSC", "sensitivity", "specificity")


class ConfusionMatrix:
    """``[C, C]`` pixel counts, rows = truth, columns = prediction; ``ignore_index`` pixels are skipped."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, target: torch.Tensor, pred: torch.Tensor) -> None:
        target, pred = torch.as_tensor(target).flatten().long(), torch.as_tensor(pred).flatten().long()
        if target.shape != pred.shape:
            raise ValueError(f"target and prediction differ in size: {target.numel()} vs {pred.numel()}")
        keep = target != self.ignore_index
        index = target[keep] * self.num_classes + pred[keep]
        counts = torch.bincount(index.cpu(), minlength=self.num_classes ** 2)
        self.matrix += counts.reshape(self.num_classes, self.num_classes)

    def per_class(self) -> dict[str, np.ndarray]:
        """Each metric per class, ``[C]`` arrays (NaN where undefined)."""
        m = self.matrix.double().numpy()
        tp = np.diag(m)
        fp = m.sum(axis=0) - tp
        fn = m.sum(axis=1) - tp
        tn = m.sum() - tp - fp - fn
        with np.errstate(divide="ignore", invalid="ignore"):
            return {
                "IoU": tp / (tp + fp + fn),
                "DSC": 2 * tp / (2 * tp + fp + fn),
                "sensitivity": tp / (tp + fn),
                "specificity": tn / (tn + fp),
            }


def summarize(cm: ConfusionMatrix, class_names: Sequence[str] = CLASS_NAMES,
              lesion_classes: Sequence[int] = LESION_CLASSES) -> dict[str, float]:
    """Flat dict: ``mIoU, DSC, sensitivity, specificity`` (lesion means) and ``<metric>/<class>`` per class."""
    per_class = cm.per_class()
    out = {}
    for metric, values in per_class.items():
        lesion = values[list(lesion_classes)]
        name = "mIoU" if metric == "IoU" else metric
        out[name] = float(np.nanmean(lesion)) if np.isfinite(lesion).any() else float("nan")
    for metric, values in per_class.items():
        for c, value in enumerate(values):
            out[f"{metric}/{class_names[c]}"] = float(value)
    return out
