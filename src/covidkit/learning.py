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
``missing``); ``covidkit pipeline`` lists them in its last lines. Each stage module declares its own checks
(``learning_checks(layout, input_dir)``, with the helpers of this module); they read only what the stage wrote,
so ``check_run`` applies to any finished run folder.
"""
from __future__ import annotations

import json
import math
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
# Against a rival trained model (the fusion against the better detector, CogSeg against its plain U-Net): the
# seed-to-seed spread of an OOF opacity AP (SD 0.021-0.022 over evaluation seeds 301-302, covidkit bench seeds);
# within it "tie". A test DSC on 30 CT slices spreads more (docs/development-log.md).
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


def read_json(path: Path) -> dict | None:
    """A stage's JSON output, or None when it was not written."""
    return json.loads(path.read_text()) if path.is_file() else None


def training_truth(input_dir: Path | None) -> dict[str, np.ndarray] | None:
    """``{image_id: true boxes}`` of the SIIM training labels under ``input_dir`` (None when absent)."""
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


def finite(value) -> bool:
    """A written, finite number (JSON writes a NaN figure as null)."""
    return value is not None and bool(np.isfinite(value))


DETECTOR_FIGURE = "OOF opacity AP@0.5"
PRIOR_BOXES = "prior boxes"  # covidkit.baselines.prior_box_oof


def prior_box_check(stage: str, model: str, value: float, summary: dict | None, path: Path,
                    spread: float | None) -> LearningCheck:
    """A detector's OOF AP against the prior-box detector's, as its stage's summary recorded it."""
    prior = None if summary is None else summary.get("prior_box_ap50")
    if not finite(prior):
        return LearningCheck.absent(stage, model, DETECTOR_FIGURE, PRIOR_BOXES, f"no prior_box_ap50 in {path}")
    return LearningCheck(stage, model, DETECTOR_FIGURE, value, prior, PRIOR_BOXES, AP_MARGIN, spread)


def check_run(run_dir: str | Path, input_dir: str | Path | None = None) -> list[LearningCheck]:
    """Every check of each stage whose folder is in ``run_dir`` (``input_dir``: for the training labels), in stage
    order: each stage module declares its own, ``learning_checks(layout, input_dir) -> list[LearningCheck]``. A
    stage that ran but left no figure or baseline for a check gets that check with the verdict ``missing``."""
    from covidkit.stages import STAGES, stage_module

    layout = RunLayout(run_dir)
    input_dir = Path(input_dir) if input_dir is not None else None
    checks = []
    for notebook in STAGES:
        declared = getattr(stage_module(notebook), "learning_checks", None)
        if declared is not None:
            checks += declared(layout, input_dir)
    return checks
