"""DeCoVNet figures: the held-out ROC and precision-recall curves, and a localized lesion over slices."""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn import metrics as skm

import covidkit.plots  # noqa: F401  (picks a headless matplotlib backend outside notebooks)
from covidkit.ct.decovnet.localize import Localization


def plot_roc_pr(predictions: pd.DataFrame):
    """ROC and precision-recall curves of the held-out predictions, AUCs in the legends."""
    import matplotlib.pyplot as plt

    labels, probs = predictions["label"].to_numpy(), predictions["prob"].to_numpy()
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(10, 4.5))
    fpr, tpr, _ = skm.roc_curve(labels, probs)
    roc_ax.plot(fpr, tpr, label=f"DeCoVNet (AUC {skm.roc_auc_score(labels, probs):.3f})")
    roc_ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    roc_ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC")
    precision, recall, _ = skm.precision_recall_curve(labels, probs)
    pr_ax.step(recall, precision, where="post",
               label=f"DeCoVNet (AP {skm.average_precision_score(labels, probs):.3f})")
    pr_ax.axhline(labels.mean(), color="k", ls="--", lw=0.8, label="prevalence")
    pr_ax.set(xlabel="recall", ylabel="precision", title="precision-recall", ylim=(0, 1.02))
    for ax in (roc_ax, pr_ax):
        ax.legend(loc="lower right" if ax is roc_ax else "lower left")
    fig.tight_layout()
    return fig


def plot_localization(arrays: dict[str, np.ndarray], cam: np.ndarray, localization: Localization,
                      title: str = "", slices: int = 4):
    """Slices through the predicted lesion (or the lungs): image, CAM overlay, localized and true lesion."""
    import matplotlib.pyplot as plt

    image, lesions = arrays["image"], arrays.get("lesions")
    if localization.centre is not None:
        centre = int(round(localization.centre[0]))
        picks = np.clip(centre + np.arange(slices) - slices // 2, 0, len(image) - 1)
    else:
        picks = np.linspace(0, len(image) - 1, slices + 2)[1:-1].astype(int)
    fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 2.6), squeeze=False)
    for ax, t in zip(axes[0], picks):
        ax.imshow(image[t], cmap="gray", vmin=0, vmax=255)
        ax.imshow(cam[t], cmap="jet", alpha=0.35, vmin=0, vmax=1)
        if lesions is not None and lesions[t].any():
            ax.contour(lesions[t], [0.5], colors="lime", linewidths=1.0)
        if localization.lesion[t].any():
            ax.contour(localization.lesion[t], [0.5], colors="red", linewidths=1.0)
        if localization.centre is not None and int(round(localization.centre[0])) == t:
            ax.plot(localization.centre[2], localization.centre[1], "w+", ms=10)
        ax.set_title(f"slice {t}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{title}  (CAM: colours; localized lesion: red; labelled lesion: green; centre: +)", fontsize=9)
    fig.tight_layout()
    return fig
