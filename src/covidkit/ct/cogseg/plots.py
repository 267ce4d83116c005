"""CogSeg figures: predicted masks over slices (training curves: ``covidkit.plots.training_curves``)."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

import covidkit.plots  # noqa: F401  (picks a headless matplotlib backend outside notebooks)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from covidkit.ct.cogseg.medseg import CLASS_NAMES, CTSlices  # noqa: E402

# ground-glass yellow, consolidation red, effusion cyan
CLASS_COLORS = np.array([[0, 0, 0], [1.0, 0.85, 0.0], [0.9, 0.1, 0.1], [0.0, 0.8, 0.9]])


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """A grey ``[H, W]`` image in [0, 1] with the lesion labels of ``mask`` painted in: ``[H, W, 3]``."""
    rgb = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=2)
    lesion = mask > 0
    rgb[lesion] = (1 - alpha) * rgb[lesion] + alpha * CLASS_COLORS[mask[lesion]]
    return rgb


def lesion_rich_slices(masks: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` slices with the most lesion pixels (the interesting ones to look at)."""
    counts = (masks > 0).reshape(len(masks), -1).sum(axis=1)
    return np.sort(np.argsort(-counts, kind="stable")[:n])


def plot_predictions(slices: CTSlices, predictions: Mapping[str, np.ndarray], n: int = 4,
                     size: float = 2.6):
    """Rows: ``n`` lesion-rich slices; columns: the slice, the truth, then each model's prediction."""
    rows = lesion_rich_slices(slices.masks, min(n, len(slices)))
    columns = ["slice", "truth", *predictions]
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(len(columns) * size, len(rows) * size),
                             squeeze=False)
    for r, i in enumerate(rows):
        panels = [np.repeat(slices.images[i][..., None], 3, axis=2), overlay(slices.images[i], slices.masks[i])]
        panels += [overlay(slices.images[i], pred[i]) for pred in predictions.values()]
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(panel)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
        axes[r, 0].set_ylabel(slices.ids[i], fontsize=8)
    legend = [Patch(color=CLASS_COLORS[k], label=CLASS_NAMES[k]) for k in range(1, len(CLASS_NAMES))]
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig
