"""Did each stage's model learn? Held-out figures against their untrained or prior baselines.

Every trained model of the pipeline leaves a held-out figure in its run folder (out-of-fold AP, held-out
AUROC, DSC ...) and, beside it, a baseline: the same network before training, the class priors, chance,
or the best single model for a fusion. A stage has learned when its figure is clearly above that baseline
(by ``margin``) and its outputs vary across the held-out items (a constant map or probability ranks
nothing, whatever its mean says). The report puts a red banner on every check that fails, and
``covidkit pipeline`` lists them in its last lines.

The checks read only what the stages wrote (``check_run``), so they apply to any finished run folder.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from covidkit.layout import RunLayout

# "Clearly above" for each kind of figure, in its own units. An AP or AUROC difference smaller than these
# is within what a few hundred synthetic images give by chance.
AP_MARGIN = 0.05
AUROC_MARGIN = 0.05
DSC_MARGIN = 0.05
MIN_SPREAD = 1e-3  # standard deviation of a model's outputs over the held-out items below which it is constant


@dataclass(frozen=True)
class LearningCheck:
    """One model's held-out figure beside its baseline."""

    stage: str  # the notebook, e.g. "03_train_siim_fasterrcnn"
    model: str  # what was checked, e.g. "Faster R-CNN"
    figure: str  # e.g. "OOF opacity AP@0.5"
    value: float
    baseline: float
    baseline_name: str  # e.g. "untrained", "class priors", "chance"
    margin: float  # the figure must exceed the baseline by more than this
    spread: float | None = None  # standard deviation of the outputs over the held-out items, when measured

    @property
    def constant(self) -> bool:
        return self.spread is not None and not self.spread >= MIN_SPREAD

    @property
    def learned(self) -> bool:
        return bool(self.value > self.baseline + self.margin) and not self.constant

    @property
    def verdict(self) -> str:
        if self.constant:
            return f"constant output (spread {self.spread:.2g})"
        if not self.learned:
            return f"not clearly above the baseline (needs > {self.baseline + self.margin:.3f})"
        return "learned"

    def line(self) -> str:
        return (f"{self.stage} {self.model}: {self.figure} {self.value:.3f} against {self.baseline:.3f} "
                f"({self.baseline_name}): {self.verdict}")


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _truth(input_dir: Path | None) -> dict[str, np.ndarray] | None:
    from covidkit.data.siim import COMPETITION, read_image_labels

    path = None if input_dir is None else input_dir / COMPETITION / "train_image_level.csv"
    if path is None or not path.is_file():
        return None
    labels = read_image_labels(path)
    return dict(zip(labels["image_id"], labels["boxes"]))


def image_score_spread(boxes: pd.DataFrame, images: pd.DataFrame) -> float:
    """Standard deviation over the images of each image's best box score (0 where it has none)."""
    best = images["image_id"].map(boxes.groupby("image_id")["score"].max()).fillna(0.0)
    return float(best.std(ddof=0)) if len(best) else 0.0


def check_nih(layout: RunLayout, input_dir: Path | None) -> list[LearningCheck]:
    summary = _read_json(layout.nih.summary)
    if summary is None or summary.get("mean_auroc") is None or summary.get("untrained_mean_auroc") is None:
        return []
    counted = len(summary["counted_positives"])
    return [LearningCheck("01_pretrain_nih_resnext", "NIH backbone", f"held-out mean AUROC ({counted} labels)",
                          summary["mean_auroc"], summary["untrained_mean_auroc"], "untrained", AUROC_MARGIN)]


def check_fasterrcnn(layout: RunLayout, input_dir: Path | None) -> list[LearningCheck]:
    from covidkit.oof import opacity_ap, read_oof

    out = layout.fasterrcnn
    truth = _truth(input_dir)
    if truth is None or not out.oof.is_file() or not out.untrained_oof.is_file():
        return []
    oof, untrained = read_oof(out.oof), read_oof(out.untrained_oof)
    return [LearningCheck("03_train_siim_fasterrcnn", "Faster R-CNN", "OOF opacity AP@0.5", opacity_ap(oof, truth),
                          opacity_ap(untrained, truth), "untrained", AP_MARGIN,
                          image_score_spread(oof.boxes, oof.images))]


def check_yolo(layout: RunLayout, input_dir: Path | None) -> list[LearningCheck]:
    from covidkit.oof import read_oof

    out = layout.yolo
    summary = _read_json(out.summary)
    if summary is None or summary.get("oof_ap50") is None or summary.get("untrained_ap50") is None:
        return []
    oof = read_oof(out.oof)
    return [LearningCheck("04_train_siim_yolo", "YOLO", "OOF opacity AP@0.5", summary["oof_ap50"],
                          summary["untrained_ap50"], "untrained", AP_MARGIN, image_score_spread(oof.boxes, oof.images))]


def check_fusion(layout: RunLayout, input_dir: Path | None) -> list[LearningCheck]:
    from covidkit.stages.ensemble_wbf import ENSEMBLE, TUNED_OOF

    if not layout.ensemble.ap_table.is_file():
        return []
    table = pd.read_csv(layout.ensemble.ap_table, index_col=0)["ap50"]
    row = TUNED_OOF if TUNED_OOF in table.index else ENSEMBLE
    best = table.loc[["Faster R-CNN", "YOLO"]].idxmax()
    return [LearningCheck("05_ensemble_wbf", row, "OOF opacity AP@0.5", float(table[row]), float(table[best]),
                          f"{best} alone", 0.0)]


def check_study(layout: RunLayout, input_dir: Path | None) -> list[LearningCheck]:
    from covidkit.study_scores import PROB_COLUMNS

    summary = _read_json(layout.study.summary)
    if summary is None:
        return []
    prior = summary["prior"]
    spread = float(pd.read_csv(layout.study.oof_studies)[PROB_COLUMNS].std(ddof=0).max())
    checks = [LearningCheck("06_study_level", "study model", "OOF study mAP", summary["study_ap"]["mAP"],
                            prior["mAP"], "class priors", AP_MARGIN, spread)]
    if "study_ap_stacked" in summary:
        checks.append(LearningCheck("06_study_level", "study model + boxes (stacker)", "OOF study mAP",
                                    summary["study_ap_stacked"]["mAP"], prior["mAP"], "class priors", AP_MARGIN))
    if "none_rule" in summary:
        rule = summary["none_rule"]
        checks.append(LearningCheck("06_study_level", f"none ({rule['chosen']})", "OOF none AP",
                                    rule["ap_out_of_fold"], prior["none"], "the share of images without a box",
                                    AP_MARGIN))
    return checks


def check_fresh_tests(layout: RunLayout, input_dir: Path | None) -> list[LearningCheck]:
    from covidkit.fresh_tests import read_fresh_test_sets

    fresh = read_fresh_test_sets(layout.submission.fresh_tests)
    if fresh is None or fresh.per_seed.empty:
        return []
    return [LearningCheck("07_make_submission", "submission", f"test score, mean of {len(fresh.per_seed)} fresh "
                          "test sets", fresh.mean, float(fresh.per_seed["prior_mAP"].mean()), "priors' submission",
                          AP_MARGIN)]


def check_cogseg(layout: RunLayout, input_dir: Path | None) -> list[LearningCheck]:
    from covidkit.ct.cogseg.ablation import UNTRAINED

    if not layout.cogseg.ablation.is_file():
        return []
    table = pd.read_csv(layout.cogseg.ablation)
    checks = []
    for dataset, rows in table.groupby("dataset", sort=False):
        rows = rows.set_index("variant")
        if UNTRAINED not in rows.index:
            continue
        baseline = float(rows.loc[UNTRAINED, "DSC"])
        for variant, row in rows.drop(index=UNTRAINED).iterrows():
            checks.append(LearningCheck("10_ct_cogseg", f"{variant} ({dataset})", "test lesion DSC", float(row["DSC"]),
                                        baseline, "untrained", DSC_MARGIN, float(row["lesion % pred sd"]) / 100))
    return checks


def check_decovnet(layout: RunLayout, input_dir: Path | None) -> list[LearningCheck]:
    metrics = _read_json(layout.decovnet.metrics)
    if metrics is None or not np.isfinite(metrics.get("roc_auc", np.nan)):
        return []
    probs = pd.read_csv(layout.decovnet.predictions)["prob"]
    return [LearningCheck("11_ct_decovnet", "DeCoVNet", f"held-out ROC AUC ({metrics['n']} volumes)",
                          metrics["roc_auc"], 0.5, "chance", AUROC_MARGIN, float(probs.std(ddof=0)))]


CHECKS: list[Callable[[RunLayout, Path | None], list[LearningCheck]]] = [
    check_nih, check_fasterrcnn, check_yolo, check_fusion, check_study, check_fresh_tests, check_cogseg, check_decovnet,
]


def check_run(run_dir: str | Path, input_dir: str | Path | None = None) -> list[LearningCheck]:
    """Every check whose stage left its files in ``run_dir`` (``input_dir``: for the training labels)."""
    layout = RunLayout(run_dir)
    input_dir = Path(input_dir) if input_dir is not None else None
    return [check for fn in CHECKS for check in fn(layout, input_dir)]
