"""Figures people would rather look at than read: images with boxes, grids of examples."""
from __future__ import annotations

from collections.abc import Sequence

import matplotlib

if matplotlib.get_backend().lower() not in ("module://matplotlib_inline.backend_inline", "nbagg", "widget"):
    matplotlib.use("Agg")  # headless runs (CLI, papermill workers without a display)
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle


def save(fig, path, dpi: int = 100) -> None:
    """Write ``fig`` to ``path`` (its folder made) and close it."""
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)


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


def confusion_figure(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str], title: str):
    """Counts of each (true, predicted) class pair (scikit-learn's display)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ConfusionMatrixDisplay.from_predictions(truth, predicted, labels=list(labels), ax=ax, colorbar=False, cmap="Blues")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def training_curves(runs: dict[str, "pd.DataFrame"], columns: dict[str, str], x: str = "epoch",
                    markers: dict[str, bool] | None = None):
    """One panel per metric ``columns`` ({column: axis label}), one line per run (``runs``: name -> metrics
    rows with ``x``); rows where a metric is missing (not validated that epoch) are skipped."""
    fig, axes = plt.subplots(1, len(columns), figsize=(5 * len(columns), 3.5), squeeze=False)
    for ax, (column, label) in zip(axes.flat, columns.items()):
        for name, rows in runs.items():
            if column not in rows:
                continue
            shown = rows[[x, column]].dropna()
            ax.plot(shown[x], shown[column], "o-" if (markers or {}).get(column) else "-", label=name)
        ax.set(xlabel=x, ylabel=label)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def oof_examples(table, oof, n: int = 8, top: int = 3, titles: dict[str, str] | None = None):
    """Prepared training images with their true boxes (green) and their ``top`` best out-of-fold boxes (orange).

    ``table``: a prepared train table (``covidkit.prepare.train_table``); ``oof``: a detector's
    ``OofPredictions`` (original pixels). The images with the most true boxes are shown.
    """
    from covidkit.boxes import scale_boxes
    from covidkit.images import read_grey

    shown = table[table["image_id"].isin(set(oof.images["image_id"]))]
    shown = shown.assign(n=shown["boxes"].map(len)).sort_values(["n", "image_id"], ascending=[False, True]).head(n)
    groups = {i: g for i, g in oof.boxes.groupby("image_id")}
    images, truths, preds, scores = [], [], [], []
    for row in shown.itertuples(index=False):
        img = read_grey(row.path)
        orig = (row.orig_height, row.orig_width)
        mine = groups.get(row.image_id, oof.boxes.iloc[:0]).nlargest(top, "score")
        images.append(img)
        truths.append(scale_boxes(row.boxes, orig, img.shape))
        preds.append(scale_boxes(mine[["x1", "y1", "x2", "y2"]].to_numpy(), orig, img.shape))
        scores.append(mine["score"].to_numpy())
    names = [(titles or {}).get(r.image_id, f"{r.label} · {r.image_id}") for r in shown.itertuples()]
    return image_grid(images, truths, titles=names, predicted=preds, predicted_scores=scores)


def pr_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str):
    """Precision against recall, one line per name (``curves``: name -> (recall, precision))."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, (recall, precision) in curves.items():
        ax.plot(recall, precision, label=name)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
