"""Stage 10: the CogSeg ablation (CT lesion segmentation) of the paper's Tables 1 and 2.

The method is :mod:`covidkit.ct.cogseg` (:mod:`covidkit.ct.cogseg.ablation`: U-Net, + SR with 1 and 4 L1
feature terms, + RMI, + edge-guided RMI, each trained from the same seed and scored on the test slices
beside the untrained network). This stage runs it on each dataset of the profile, caps the slices and steps
in a dry run, and draws the figures.

Reads ``<input_dir>/medseg-covid19/`` and ``<input_dir>/medseg-radiopaedia/`` (the files published on
medicalsegmentation.com). Writes ``<run_dir>/10_ct_cogseg/``: ``<dataset>/<variant>/`` (engine runs),
``<dataset>/ablation.csv``, ``ablation.csv`` (every dataset), ``predictions_<dataset>.png`` and
``training_curves_<dataset>.png``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import pandas as pd

from covidkit.ct.cogseg.ablation import VARIANTS, AblationConfig, AblationResult, ablation_table, predict_masks, run_ablation
from covidkit.derived import derived
from covidkit.learning import DSC_MARGIN, LearningCheck, RIVAL_MARGIN
from covidkit.layout import RunLayout
from covidkit.stages import StageConfig, stage_main, write_settings


# What this stage reads (covidkit.records fingerprints them: a change reruns it): dataset folders of
# <input_dir> ("weights": pretrained files), and the stages whose outputs it reads.
DATASETS = ['medseg-covid19', 'medseg-radiopaedia']
UPSTREAM = []


@dataclass
class Config(StageConfig):
    RENAMED: ClassVar[dict[str, str]] = {"size": "output_size"}  # deprecated setting names (covidkit.stages)
    seed: int = 42
    datasets: list[str] = field(default_factory=lambda: ["medseg", "radiopaedia"])  # the paper's Tables 1 and 2
    output_size: int = 512  # output (label) side; the network sees output_size // 2
    base_channels: int = 32  # U-Net width at full resolution
    epochs: int = 40
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    class_balance: float = 0.5  # CE class weights frequency ** -class_balance (0: the paper's plain CE)
    augment: bool = True  # the paper's rotations and scales (on the small MedSeg set only)
    variants: list[str] | None = None  # None: all five ablation rows
    max_train_slices: int | None = None  # caps (None: all slices)
    max_test_slices: int | None = None
    workers: int = 0  # DataLoader workers
    progress: bool = True

    def ablation(self, dataset: str) -> AblationConfig:
        """One dataset's ablation settings: this Config's fields of AblationConfig's names, the paper's
        augmentation on MedSeg only, a dry run's caps."""
        return derived(
            AblationConfig, self, run_dir=str(self.layout.ct_cogseg.dataset(dataset)), dataset=dataset,
            augment=self.augment and dataset == "medseg", variants=list(self.variants or VARIANTS),
            max_train_slices=_cap(self.max_train_slices, self.max_items),
            max_test_slices=_cap(self.max_test_slices, self.max_items), num_workers=self.workers,
        )


def _cap(n: int | None, limit: int | None) -> int | None:
    return n if limit is None else limit if n is None else min(n, limit)


@dataclass
class Result:
    table: pd.DataFrame  # (dataset, variant) rows: lesion means, DSC per class, predicted vs true lesion share
    results: dict[str, AblationResult]  # per dataset: the trained networks, the slices
    out_dir: Path


def run(cfg: Config) -> Result:
    write_settings(cfg)
    from covidkit import plots
    from covidkit.ct.cogseg.medseg import CTSegDataset
    from covidkit.ct.cogseg.plots import plot_predictions
    from covidkit.engine import read_metrics

    out = cfg.layout.ct_cogseg
    results = {name: run_ablation(cfg.ablation(name)) for name in cfg.datasets}
    table = ablation_table(results)
    out.dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out.ablation)
    for name, result in results.items():
        test = CTSegDataset(result.test)
        predictions = {variant: predict_masks(model, test) for variant, model in result.models.items()}
        fig = plot_predictions(result.test, predictions, n=4)
        fig.suptitle(name, y=1.0)
        plots.save(fig, out.predictions(name), dpi=80)
        histories = {variant: read_metrics(path) for variant, path in result.run_dirs.items()}
        fig = plots.training_curves(histories, {"train_loss": "training loss", "train_ce": "cross-entropy",
                                                "val_DSC": "test DSC (curve only)"})
        plots.save(fig, out.training_curves(name), dpi=80)
    return Result(table, results, out.dir)


def describe(result: Result) -> str:
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        return result.table.round(4).to_string()


COGSEG_PLAIN, COGSEG_FULL = "U-Net", "+edge-guided RMI"  # rows of covidkit.ct.cogseg.ablation.VARIANTS


def learning_checks(layout: RunLayout, input_dir: Path | None) -> list[LearningCheck]:
    """Every variant's test DSC against the untrained network; the full method against the plain U-Net (a rival:
    ``RIVAL_MARGIN``, ties allowed)."""
    from covidkit.ct.cogseg.ablation import UNTRAINED

    stage, figure = "10_ct_cogseg", "test lesion DSC"
    if not layout.ct_cogseg.dir.is_dir():
        return []
    if not layout.ct_cogseg.ablation.is_file():
        return [LearningCheck.absent(stage, COGSEG_FULL, figure, "untrained",
                                     f"{layout.ct_cogseg.ablation.name} not written")]
    table = pd.read_csv(layout.ct_cogseg.ablation)
    checks = []
    for dataset, rows in table.groupby("dataset", sort=False):
        rows = rows.set_index("variant")
        if UNTRAINED not in rows.index:
            checks.append(LearningCheck.absent(stage, f"{COGSEG_FULL} ({dataset})", figure, "untrained",
                                               f"no row {UNTRAINED!r} in {layout.ct_cogseg.ablation.name}"))
        else:
            baseline = float(rows.loc[UNTRAINED, "DSC"])
            for variant, row in rows.drop(index=UNTRAINED).iterrows():
                checks.append(LearningCheck(stage, f"{variant} ({dataset})", figure, float(row["DSC"]), baseline,
                                            "untrained", DSC_MARGIN, float(row["lesion % pred sd"]) / 100))
        absent = [v for v in (COGSEG_PLAIN, COGSEG_FULL) if v not in rows.index]
        if absent:
            checks.append(LearningCheck.absent(stage, f"{COGSEG_FULL} ({dataset})", figure, COGSEG_PLAIN,
                                               f"no row {', '.join(map(repr, absent))} in the ablation"))
        else:
            checks.append(LearningCheck(stage, f"{COGSEG_FULL} ({dataset})", figure,
                                        float(rows.loc[COGSEG_FULL, "DSC"]), float(rows.loc[COGSEG_PLAIN, "DSC"]),
                                        COGSEG_PLAIN, RIVAL_MARGIN,
                                        float(rows.loc[COGSEG_FULL, "lesion % pred sd"]) / 100, rival=True))
    return checks


def main(argv: list[str] | None = None) -> None:
    stage_main(__name__, argv)


if __name__ == "__main__":
    main()
