"""Stage 11: DeCoVNet, CT volume classification (COVID-19 or not) and weakly supervised lesion localization.

The method is :mod:`covidkit.ct.decovnet` (:func:`covidkit.ct.decovnet.method.run_decovnet`): volumes
resampled and windowed, a 2D lung U-Net, DeCoVNet trained on the training cases, the held-out cases scored
and their lesion localized from the class activation map. This stage fills its settings from the profile,
caps the cases and steps in a dry run, and draws the figures.

Reads ``<input_dir>/ct-covid-volumes/`` (``labels.csv``, ``volumes/``, optional ``lesions/``). Writes
``<run_dir>/11_ct_decovnet/``: ``prepared/`` and ``inputs/`` (cached arrays), ``lung_unet/`` and
``classifier/`` (engine runs), ``predictions.csv`` (held-out cases), ``metrics.json`` / ``metrics.csv``,
``roc_pr.png``, ``training_curves.png``, ``localization_<case>.png``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path
from types import SimpleNamespace

import pandas as pd

from covidkit.ct.decovnet.localize import LocalizationConfig
from covidkit.ct.decovnet.lungmask import UnsupervisedLungConfig
from covidkit.ct.decovnet.method import AugmentConfig, DeCoVNetConfig, DeCoVNetRun, predict_volume, run_decovnet
from covidkit.ct.decovnet.volumes import DATASET_DIR
from covidkit.derived import derived
from covidkit.learning import AUROC_MARGIN, LearningCheck, finite, read_json
from covidkit.layout import RunLayout
from covidkit.stages import StageConfig, stage_main, write_settings


# What this stage reads (covidkit.records fingerprints them: a change reruns it): dataset folders of
# <input_dir> ("weights": pretrained files), and the stages whose outputs it reads.
DATASETS = ['ct-covid-volumes']
UPSTREAM = []


MILD_AUGMENT = {"rotation": 5.0, "translate": 0.05, "scale": [0.9, 1.1], "shear": 0.0, "brightness": [1.0, 1.0],
                "contrast": [1.0, 1.0]}


@dataclass
class Config(StageConfig):
    RENAMED: ClassVar[dict[str, str]] = {"lung_size": "lung_input_size"}  # deprecated setting names (covidkit.stages)
    seed: int = 42
    target_spacing: list[float] = field(default_factory=lambda: [5.0, 1.0, 1.0])  # mm (z, y, x)
    input_size: list[int] = field(default_factory=lambda: [224, 336])  # classifier slices (height, width)
    lung_input_size: int = 256  # U-Net slice side
    lung_width: int = 16  # U-Net channels at full resolution
    lung_epochs: int = 10
    lung_slices_per_case: int = 32  # U-Net training slices per case
    lung_min_dice: float = 0.5  # below this Dice with the unsupervised mask, the U-Net's mask is replaced by it
    lung_batch_size: int = 16  # U-Net slices per step
    lung_lr: float = 1e-3  # U-Net, Adam
    unsupervised: dict = field(default_factory=dict)  # UnsupervisedLungConfig fields to override (e.g. air_hu)
    epochs: int = 100  # classifier
    lr: float = 1e-3  # Adam, cosine decay (the paper: 1e-5 at batch 1; the README says why not here)
    weight_decay: float = 0.0  # classifier
    batch_size: int = 8  # volumes per step
    mask_outside_lungs: bool = True  # the image channel is 0 outside the lung mask
    input_window: list[float] | None = field(default_factory=lambda: [-800.0, -200.0])  # HU to 0-1; None: 8-bit window
    # AugmentConfig fields to override ({}: the released code's); None: no augmentation. Default: milder geometry,
    # no brightness or contrast (better on dev seeds 61-63 with input_window: docs/ct.md)
    augment: dict | None = field(default_factory=lambda: dict(MILD_AUGMENT))
    test_fraction: float = 0.3  # hold-out when labels.csv has no split column
    workers: int = 0  # DataLoader workers
    # hit_rate's rule: "density" (no CAM; better on every dev seed) or "cam"; or a dict of LocalizationConfig fields
    localization: str | dict = "density"
    examples: int = 4  # positive held-out cases drawn with their CAM
    progress: bool = True

    def method(self) -> DeCoVNetConfig:
        """The method's settings: this Config's fields of DeCoVNetConfig's names (the paper's where this stage
        does not set them), the nested ones from their dicts, a dry run's caps."""
        rule = {"rule": self.localization} if isinstance(self.localization, str) else self.localization
        return derived(
            DeCoVNetConfig, self, num_workers=self.workers, max_cases=self.max_items,
            augment=None if self.augment is None else derived(AugmentConfig, SimpleNamespace(**self.augment)),
            unsupervised=derived(UnsupervisedLungConfig, SimpleNamespace(**self.unsupervised)),
            localization=derived(LocalizationConfig, SimpleNamespace(**rule)),
        )


@dataclass
class Result:
    run: DeCoVNetRun  # metrics, predictions, the two networks, the cached inputs
    out_dir: Path

    @property
    def metrics(self) -> dict:
        return self.run.metrics


def run(cfg: Config) -> Result:
    write_settings(cfg)
    from covidkit import plots
    from covidkit.ct.decovnet.plots import plot_localization, plot_roc_pr
    from covidkit.engine import read_metrics

    out = cfg.layout.ct_decovnet
    method = cfg.method()
    decovnet = run_decovnet(Path(cfg.input_dir) / DATASET_DIR, out.dir, method)
    predictions = decovnet.predictions
    if predictions["label"].nunique() == 2:
        plots.save(plot_roc_pr(predictions), out.roc_pr)
    curves = plots.training_curves({"DeCoVNet": read_metrics(out.classifier)},
                                   {"train_loss": "training loss", "val_loss": "held-out loss", "val_auc": "held-out AUC"})
    plots.save(curves, out.training_curves)
    positives = predictions[predictions["label"] == 1].sort_values("prob", ascending=False).head(cfg.examples)
    for row in positives.itertuples():
        arrays = decovnet.case_arrays(row.case_id)
        prob, cam, localization = predict_volume(decovnet.model, arrays, method)
        fig = plot_localization(arrays, cam, localization, title=f"{row.case_id}: P(COVID) {prob:.2f}, hit {row.hit}")
        plots.save(fig, out.localization(row.case_id))
    return Result(decovnet, out.dir)


def describe(result: Result) -> str:
    return pd.Series(result.metrics, name="held-out").to_string() + f"\nfolder: {result.out_dir}"


HU_HISTOGRAM_KEYS = ("hist_auc", "hu_share_auc")  # 11's held-out AUCs of HU-histogram classifiers


def learning_checks(layout: RunLayout, input_dir: Path | None) -> list[LearningCheck]:
    """The held-out ROC AUC against the better HU-histogram classifier (chance for runs that predate it)."""
    stage, model, figure = "11_ct_decovnet", "DeCoVNet", "held-out ROC AUC"
    out = layout.ct_decovnet
    if not out.dir.is_dir():
        return []
    metrics = read_json(out.metrics)
    if metrics is None or not finite(metrics.get("roc_auc")) or not out.predictions.is_file():
        return [LearningCheck.absent(stage, model, figure, "HU histogram",
                                     f"no finite roc_auc in {out.metrics.name} or no {out.predictions.name}")]
    probs = pd.read_csv(out.predictions)["prob"]
    histogram = [metrics[k] for k in HU_HISTOGRAM_KEYS if finite(metrics.get(k))]
    baseline, name = (max(histogram), "HU histogram") if histogram else (0.5, "chance")
    n = metrics.get("n", len(probs))
    return [LearningCheck(stage, model, f"{figure} ({n} volumes)", metrics["roc_auc"], baseline, name, AUROC_MARGIN,
                          float(probs.std(ddof=0)))]


def main(argv: list[str] | None = None) -> None:
    stage_main(__name__, argv)


if __name__ == "__main__":
    main()
