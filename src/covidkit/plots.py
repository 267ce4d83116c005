"""Figures people would rather look at than read: images with boxes, grids of examples."""
from __future__ import annotations

from collections.abc import Sequence

import matplotlib

if matplotlib.get_backend().lower() not in ("module://matplotlib_inline.backend_inline", "nbagg", "widget"):
    matplotlib.use("Agg")  # headless runs (CLI, papermill workers without a display)
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle


def draw_boxes(ax, boxes, color: str = "lime", scores: Sequence[float] | None = None, label: str | None = None):
    """Draw ``[N, 4]`` x1, y1, x2, y2 boxes on ``ax``, with their scores when given."""
    for i, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, dtype=float).reshape(-1, 4)):
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=1.5,
                               label=label if i == 0 else None))
        if scores is not None:
            ax.text(x1, y1, f"{scores[i]:.2f}", color="black", fontsize=7, va="bottom",
                    bbox={"facecolor": color, "edgecolor": "none", "pad": 1})


def image_grid(images: Sequence[np.ndarray], boxes: Sequence | None = None, titles: Sequence[str] | None = None,
               ncols: int = 4, size: float = 3.0, predicted: Sequence | None = None,
               predicted_scores: Sequence | None = None):
    """A grid of grey images with ground-truth boxes (green) and predicted boxes (orange, with scores)."""
    n = len(images)
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * size), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        if boxes is not None:
            draw_boxes(ax, boxes[i], color="lime", label="truth")
        if predicted is not None:
            draw_boxes(ax, predicted[i], color="orange", label="predicted",
                       scores=None if predicted_scores is None else predicted_scores[i])
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    return fig
