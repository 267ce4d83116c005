"""Stage 11: DeCoVNet, CT volume classification (COVID-19 or not) and weakly supervised lesion localization.

The method is :mod:`covidkit.ct.decovnet` (:func:`covidkit.ct.decovnet.pipeline.run_decovnet`): volumes
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
from pathlib import Path

import pandas as pd

from covidkit.ct.decovnet.localize import LocalizationConfig
from covidkit.ct.decovnet.pipeline import AugmentConfig, DeCoVNetConfig, DeCoVNetRun, predict_volume, run_decovnet
from covidkit.ct.decovnet.volumes import DATASET_DIR
from covidkit.stages import StageConfig, stage_main


@dataclass
class Config(StageConfig):
    seed: int = 42
    target_spacing: list[float] = field(default_factory=lambda: [5.0, 1.0, 1.0])  # mm (z, y, x)
    input_size: list[int] = field(default_factory=lambda: [224, 336])  # classifier slices (height, width)
    lung_size: int = 256  # U-Net slice side
    lung_width: int = 16  # U-Net channels at full resolution
    lung_epochs: int = 10
    lung_slices_per_case: int = 32  # U-Net training slices per case
    lung_min_dice: float = 0.5  # below this Dice with the unsupervised mask, the U-Net's mask is replaced by it
    epochs: int = 100  # classifier
    lr: float = 1e-3  # Adam, cosine decay (the paper: 1e-5 at batch 1; the README says why not here)
    batch_size: int = 8  # volumes per step
    mask_outside_lungs: bool = True  # the image channel is 0 outside the lung mask
    # intensity augmentation (factors on the 8-bit window): the released code's; [1, 1] turns it off (docs/ct.md)
    brightness: list[float] = field(default_factory=lambda: [0.5, 1.5])
    contrast: list[float] = field(default_factory=lambda: [0.7, 1.3])
    test_fraction: float = 0.3  # hold-out when labels.csv has no split column
    workers: int = 0  # DataLoader workers
    localization: str = "density"  # hit_rate's rule: "density" (no CAM; better on every dev seed) or "cam"
    examples: int = 4  # positive held-out cases drawn with their CAM
    progress: bool = True

    def method(self) -> DeCoVNetConfig:
        """The method's settings (the paper's where this stage does not set them)."""
        return DeCoVNetConfig(
            target_spacing=tuple(self.target_spacing), input_size=tuple(self.input_size), test_fraction=self.test_fraction,
            seed=self.seed, lung_size=self.lung_size, lung_width=self.lung_width, lung_epochs=self.lung_epochs,
            lung_slices_per_case=self.lung_slices_per_case, lung_min_dice=self.lung_min_dice, epochs=self.epochs,
            lr=self.lr, batch_size=self.batch_size, mask_outside_lungs=self.mask_outside_lungs,
            augment=AugmentConfig(brightness=tuple(self.brightness), contrast=tuple(self.contrast)),
            num_workers=self.workers, progress=self.progress, max_cases=self.max_items,
            max_steps=self.max_steps, localization=LocalizationConfig(rule=self.localization),
        )


@dataclass
class Result:
    run: DeCoVNetRun  # metrics, predictions, the two networks, the cached inputs
    out_dir: Path

    @property
    def metrics(self) -> dict:
        return self.run.metrics


def run(cfg: Config) -> Result:
    from covidkit import plots
    from covidkit.ct.decovnet.plots import plot_localization, plot_roc_pr
    from covidkit.engine import read_metrics

    out = cfg.layout.decovnet
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


def main(argv: list[str] | None = None) -> None:
    stage_main(__name__, argv)


if __name__ == "__main__":
    main()
