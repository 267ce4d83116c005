"""CogSeg figures: predicted masks over slices, and the training curves of the ablation variants."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

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


def plot_loss_curves(run_dirs: Mapping[str, Path], metrics: tuple[str, ...] = ("train_loss", "train_ce", "val_DSC")):
    """One panel per metric of the engine's ``metrics.csv``, one line per variant, x axis: epoch."""
    from covidkit.engine.history import read_metrics

    histories = {name: read_metrics(path) for name, path in run_dirs.items()}
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for name, history in histories.items():
            if metric in history:
                ax.plot(history["epoch"], history[metric], marker="o", markersize=3, label=name)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    return fig

