"""Did each stage's model learn? Held-out figures against their trivial, untrained or rival baselines.

Every trained model of the pipeline leaves a held-out figure in its run folder (out-of-fold AP, held-out
AUROC, DSC ...) and, beside it, baselines: the same network before training, a trivial rule that looks at
no pixel (the class priors, the prior-box detector and the box-count rule of ``covidkit.baselines``, an
HU-histogram classifier, chance), or a rival trained model (the better single detector for a fusion, the
plain U-Net for CogSeg). Each (figure, baseline) pair is one ``LearningCheck``; its verdict is

- ``learned``: the figure is clearly above the baseline (by ``margin``) and the outputs vary over the
  held-out items (a constant map or probability ranks nothing, whatever its mean says);
- ``tie``: against a rival trained model only (``rival=True``), the figure is within ``margin`` of it either
  way: the margin is the seed-to-seed spread, so neither is better. Shown, not counted as a failure;
- ``not above``: below the baseline plus the margin (against a rival: below it by more than the margin);
- ``constant``: the outputs do not vary;
- ``missing``: the stage ran (its folder exists) but the figure or its baseline is not in its outputs.

The report lists every check and puts a red banner on each failed one (``not above``, ``constant``,
``missing``); ``covidkit pipeline`` lists them in its last lines. The checks read only what the stages
wrote (``check_run``), so they apply to any finished run folder.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from covidkit.layout import RunLayout

# "Clearly above" a trivial or untrained baseline, in each figure's units. An AP or AUROC difference smaller
# than these is within what a few hundred synthetic images give by chance.
AP_MARGIN = 0.05
AUROC_MARGIN = 0.05
DSC_MARGIN = 0.05
# Against a rival trained model (the fusion against the better detector, CogSeg against its plain U-Net): an
# assumed seed-to-seed spread of an OOF AP or a test DSC (not yet measured: covidkit bench seeds); within it "tie".
RIVAL_MARGIN = 0.02
MIN_SPREAD = 1e-3  # standard deviation of a model's outputs over the held-out items below which it is constant

LEARNED, TIE, NOT_ABOVE, CONSTANT, MISSING = "learned", "tie", "not above", "constant", "missing"
FAILED = (NOT_ABOVE, CONSTANT, MISSING)


@dataclass(frozen=True)
class LearningCheck:
    """One model's held-out figure beside one baseline: a row of a results table (stage, model, figure, value,
    baseline_name, baseline, verdict)."""

    stage: str  # the notebook, e.g. "03_train_siim_fasterrcnn"
    model: str  # what was checked, e.g. "Faster R-CNN"
    figure: str  # e.g. "OOF opacity AP@0.5"
    value: float
    baseline: float
    baseline_name: str  # e.g. "untrained", "class priors", "prior boxes", "chance"
    margin: float  # the figure must exceed the baseline by more than this
    spread: float | None = None  # standard deviation of the outputs over the held-out items, when measured
    rival: bool = False  # the baseline is another trained model: within the margin either way is a tie
    missing: str | None = None  # what the stage did not write (the check could not be computed)

    @classmethod
    def absent(cls, stage: str, model: str, figure: str, baseline_name: str, why: str) -> LearningCheck:
        """The check of a stage that ran but left no figure or baseline to compare."""
        return cls(stage, model, figure, math.nan, math.nan, baseline_name, math.nan, missing=why)

    @property
    def constant(self) -> bool:
        return self.spread is not None and not self.spread >= MIN_SPREAD

    @property
    def status(self) -> str:
        """One of ``learned``, ``tie``, ``not above``, ``constant``, ``missing``."""
        if self.missing is not None:
            return MISSING
        if self.constant:
            return CONSTANT
        if self.value > self.baseline + self.margin:
            return LEARNED
        if self.rival and self.value >= self.baseline - self.margin:
            return TIE
        return NOT_ABOVE

    @property
    def learned(self) -> bool:
        return self.status == LEARNED

    @property
    def failed(self) -> bool:
        """Not learned, and not a tie with a rival trained model: the report's red banner."""
        return self.status in FAILED

    @property
    def verdict(self) -> str:
        """The status, then why (e.g. ``not above (needs > 0.150)``)."""
        status = self.status
        if status == MISSING:
            return f"missing: {self.missing}"
        if status == CONSTANT:
            return f"constant output (spread {self.spread:.2g})"
        if status == TIE:
            return f"tie (within {self.margin:.2f}, the seed-to-seed spread)"
        if status == NOT_ABOVE:
            return f"not above the baseline (needs > {self.baseline + self.margin:.3f})"
        return LEARNED

    def line(self) -> str:
        if self.status == MISSING:
            return f"{self.stage} {self.model}: {self.figure} against {self.baseline_name}: {self.verdict}"
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


def _finite(value) -> bool:
    return value is not None and bool(np.isfinite(value))


def check_nih(layout: RunLayout, input_dir: Path | None) -> list[LearningCheck]:
    stage, model = "01_pretrain_nih_resnext", "NIH backbone"
    if not layout.nih.dir.is_dir():
        return []
    summary = _read_json(layout.nih.summary)
    if summary is None or not _finite(summary.get("mean_auroc")) or not _finite(summary.get("untrained_mean_auroc")):
        return [LearningCheck.absent(stage, model, "held-out mean AUROC", "untrained",
                                     f"no mean_auroc and untrained_mean_auroc in {layout.nih.summary}")]
    counted = len(summary["counted_positives"])
    return [LearningCheck(stage, model, f"held-out mean AUROC ({counted} labels)",
                          summary["mean_auroc"], summary["untrained_mean_auroc"], "untrained", AUROC_MARGIN)]


DETECTOR_FIGURE = "OOF opacity AP@0.5"
PRIOR_BOXES = "prior boxes"  # covidkit.baselines.prior_box_oof


def _prior_box_check(stage: str, model: str, value: float, summary: dict | None, path: Path,
                     spread: float | None) -> LearningCheck:
    prior = None if summary is None else summary.get("prior_box_ap50")
    if not _finite(prior):
        return LearningCheck.absent(stage, model, DETECTOR_FIGURE, PRIOR_BOXES, f"no prior_box_ap50 in {path}")
    return LearningCheck(stage, model, DETECTOR_FIGURE, value, prior, PRIOR_BOXES, AP_MARGIN, spread)


def check_fasterrcnn(layout: RunLayout, input_dir: Path | None) -> list[LearningCheck]:
    """The OOF AP against the untrained twin's and the prior-box detector's."""
    from covidkit.oof import opacity_ap, read_oof

    stage, model, out = "03_train_siim_fasterrcnn", "Faster R-CNN", layout.fasterrcnn
    if not out.dir.is_dir():
        return []
    truth = _truth(input_dir)
    absent = [p for p in (out.oof, out.untrained_oof) if not p.is_file()]
    if truth is None or absent:
        why = f"{', '.join(p.name for p in absent)} not written" if absent else "no training labels (input_dir)"
        return [LearningCheck.absent(stage, model, DETECTOR_FIGURE, name, why) for name in ("untrained", PRIOR_BOXES)]
    oof, untrained = read_oof(out.oof), read_oof(out.untrained_oof)
    value, spread = opacity_ap(oof, truth), image_score_spread(oof.boxes, oof.images)
    return [LearningCheck(stage, model, DETECTOR_FIGURE, value, opacity_ap(untrained, truth), "untrained", AP_MARGIN,
                          spread),
            _prior_box_check(stage, model, value, _read_json(out.summary), out.summary, spread)]


def check_yolo(layout: RunLayout, input_dir: Path | None) -> list[LearningCheck]:
    """The OOF AP (04's summary.json) against the untrained model's and the prior-box detector's."""
    from covidkit.oof import read_oof

    stage, model, out = "04_train_siim_yolo", "YOLO", layout.yolo
    if not out.dir.is_dir():
        return []
    summary = _read_json(out.summary)
    if summary is None or not _finite(summary.get("oof_ap50")) or not out.oof.is_file():
        why = f"no oof_ap50 in {out.summary}" if out.oof.is_file() else f"{out.oof.name} not written"
        return [LearningCheck.absent(stage, model, DETECTOR_FIGURE, name, why) for name in ("untrained", PRIOR_BOXES)]
    oof = read_oof(out.oof)
    value, spread = summary["oof_ap50"], image_score_spread(oof.boxes, oof.images)
    untrained = (LearningCheck(stage, model, DETECTOR_FIGURE, value, summary["untrained_ap50"], "untrained", AP_MARGIN,
                               spread) if _finite(summary.get("untrained_ap50")) else
                 LearningCheck.absent(stage, model, DETECTOR_FIGURE, "untrained",
                                      f"no untrained_ap50 in {out.summary}"))
    return [untrained, _prior_box_check(stage, model, value, summary, out.summary, spread)]


def check_fusion(layout: RunLayout, input_dir: Path | None) -> list[LearningCheck]:
    """The fusion's OOF AP (05's table) against the better single detector (a rival: ``RIVAL_MARGIN``, ties
    allowed) and against the prior-box detector."""
    from covidkit.oof import read_oof
    from covidkit.stages.ensemble_wbf import ENSEMBLE, TUNED_OOF

    stage, out = "05_ensemble_wbf", layout.ensemble
    if not out.dir.is_dir():
        return []
    if not out.ap_table.is_file():
        return [LearningCheck.absent(stage, ENSEMBLE, DETECTOR_FIGURE, name, f"{out.ap_table.name} not written")
                for name in ("the better detector alone", PRIOR_BOXES)]
    table = pd.read_csv(out.ap_table, index_col=0)["ap50"]
    row = TUNED_OOF if TUNED_OOF in table.index else ENSEMBLE
    value = float(table[row])
    singles = table.reindex(["Faster R-CNN", "YOLO"]).dropna()
    if singles.empty:
        rival = LearningCheck.absent(stage, row, DETECTOR_FIGURE, "the better detector alone",
                                     f"no single detector's AP in {out.ap_table.name}")
    else:
        best = singles.idxmax()
        rival = LearningCheck(stage, row, DETECTOR_FIGURE, value, float(singles[best]), f"{best} alone", RIVAL_MARGIN,
                              rival=True)
    if PRIOR_BOXES in table.index and np.isfinite(table[PRIOR_BOXES]):
        fused = read_oof(out.fused_oof) if out.fused_oof.is_file() else None
        spread = None if fused is None else image_score_spread(fused.boxes, fused.images)
        prior = LearningCheck(stage, row, DETECTOR_FIGURE, value, float(table[PRIOR_BOXES]), PRIOR_BOXES, AP_MARGIN,
                              spread)
    else:
        prior = LearningCheck.absent(stage, row, DETECTOR_FIGURE, PRIOR_BOXES,
                                     f"no row {PRIOR_BOXES!r} in {out.ap_table.name}")
    return [rival, prior]


STUDY_FIGURE = "OOF study mAP"
BOX_COUNT_RULE = "box-count rule"  # covidkit.baselines.box_count_rule


def check_study(layout: RunLayout, input_dir: Path | None) -> list[LearningCheck]:
    """The study model against the class priors; the stacker (study model + boxes) against the priors and the
    box-count rule on 05's boxes; the none rule against the share of images without a box."""
    from covidkit.study_scores import PROB_COLUMNS

    stage, out = "06_study_level", layout.study
    if not out.dir.is_dir():
        return []
    summary = _read_json(out.summary)
    if summary is None or not out.oof_studies.is_file():
        return [LearningCheck.absent(stage, "study model", STUDY_FIGURE, "class priors",
                                     f"{out.summary.name} or {out.oof_studies.name} not written")]
    prior = summary["prior"]
    spread = float(pd.read_csv(out.oof_studies)[PROB_COLUMNS].std(ddof=0).max())
    checks = [LearningCheck(stage, "study model", STUDY_FIGURE, summary["study_ap"]["mAP"],
                            prior["mAP"], "class priors", AP_MARGIN, spread)]
    if "study_ap_stacked" in summary:
        stacker, stacked = "study model + boxes (stacker)", summary["study_ap_stacked"]["mAP"]
        checks.append(LearningCheck(stage, stacker, STUDY_FIGURE, stacked, prior["mAP"], "class priors", AP_MARGIN))
        rule = summary.get("box_count_rule", {}).get("mAP")
        checks.append(LearningCheck(stage, stacker, STUDY_FIGURE, stacked, rule, BOX_COUNT_RULE, AP_MARGIN)
                      if _finite(rule) else
                      LearningCheck.absent(stage, stacker, STUDY_FIGURE, BOX_COUNT_RULE,
                                           f"no box_count_rule in {out.summary.name}"))
    if "none_rule" in summary:
        rule = summary["none_rule"]
        checks.append(LearningCheck(stage, f"none ({rule['chosen']})", "OOF none AP",
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


COGSEG_PLAIN, COGSEG_FULL = "U-Net", "+edge-guided RMI"  # rows of covidkit.ct.cogseg.ablation.VARIANTS


def check_cogseg(layout: RunLayout, input_dir: Path | None) -> list[LearningCheck]:
    """Every variant's test DSC against the untrained network; the full method against the plain U-Net (a rival:
    ``RIVAL_MARGIN``, ties allowed)."""
    from covidkit.ct.cogseg.ablation import UNTRAINED

    stage, figure = "10_ct_cogseg", "test lesion DSC"
    if not layout.cogseg.dir.is_dir():
        return []
    if not layout.cogseg.ablation.is_file():
        return [LearningCheck.absent(stage, COGSEG_FULL, figure, "untrained",
                                     f"{layout.cogseg.ablation.name} not written")]
    table = pd.read_csv(layout.cogseg.ablation)
    checks = []
    for dataset, rows in table.groupby("dataset", sort=False):
        rows = rows.set_index("variant")
        if UNTRAINED not in rows.index:
            checks.append(LearningCheck.absent(stage, f"{COGSEG_FULL} ({dataset})", figure, "untrained",
                                               f"no row {UNTRAINED!r} in {layout.cogseg.ablation.name}"))
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


HU_HISTOGRAM_KEYS = ("hist_auc", "hu_share_auc")  # 11's held-out AUCs of HU-histogram classifiers


def check_decovnet(layout: RunLayout, input_dir: Path | None) -> list[LearningCheck]:
    """The held-out ROC AUC against the better HU-histogram classifier (chance for runs that predate it)."""
    stage, model, figure = "11_ct_decovnet", "DeCoVNet", "held-out ROC AUC"
    out = layout.decovnet
    if not out.dir.is_dir():
        return []
    metrics = _read_json(out.metrics)
    if metrics is None or not _finite(metrics.get("roc_auc")) or not out.predictions.is_file():
        return [LearningCheck.absent(stage, model, figure, "HU histogram",
                                     f"no finite roc_auc in {out.metrics.name} or no {out.predictions.name}")]
    probs = pd.read_csv(out.predictions)["prob"]
    histogram = [metrics[k] for k in HU_HISTOGRAM_KEYS if _finite(metrics.get(k))]
    baseline, name = (max(histogram), "HU histogram") if histogram else (0.5, "chance")
    n = metrics.get("n", len(probs))
    return [LearningCheck(stage, model, f"{figure} ({n} volumes)", metrics["roc_auc"], baseline, name, AUROC_MARGIN,
                          float(probs.std(ddof=0)))]


CHECKS: list[Callable[[RunLayout, Path | None], list[LearningCheck]]] = [
    check_nih, check_fasterrcnn, check_yolo, check_fusion, check_study, check_fresh_tests, check_cogseg, check_decovnet,
]


def check_run(run_dir: str | Path, input_dir: str | Path | None = None) -> list[LearningCheck]:
    """Every check of each stage whose folder is in ``run_dir`` (``input_dir``: for the training labels); a stage
    that ran but left no figure or baseline for a check gets that check with the verdict ``missing``."""
    layout = RunLayout(run_dir)
    input_dir = Path(input_dir) if input_dir is not None else None
    return [check for fn in CHECKS for check in fn(layout, input_dir)]
