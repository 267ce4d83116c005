"""Stage 07: the models folder, the submission, its score, and the honest score on fresh test sets.

1. Export every fold model of 03, 04 and 06, 05's fusion parameters, 06's stacker and a manifest (hashes,
   priors, the ``none`` rule, the display threshold) into one self-contained models folder
   (``covidkit.export``): what ``covidkit predict``, ``covidkit serve`` and ``covidkit kaggle bundle`` take.
2. Predict every row of the competition's ``sample_submission.csv`` from the test DICOMs
   (``covidkit.predict.predict_competition``), validated before it is written.
3. Score it when the test labels lie beside the competition (synthetic data only).
4. With ``fresh_test_seeds``: the test split of each seed, written alone, predicted and scored with the same
   models folder, beside a submission of the priors (``covidkit.fresh_tests``).

Reads the run folder's 00-06 outputs and ``<input_dir>/siim-covid19-detection/test/``. Writes
``<run_dir>/models/`` (or ``models_dir``), ``submission`` and its ``.log``, ``<run_dir>/fresh_tests/``.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from covidkit.boxes import parse_prediction_string
from covidkit.data.siim import COMPETITION, SOLUTION_IMAGE_CSV, SOLUTION_STUDY_CSV, read_image_labels
from covidkit.metrics import format_scores, score_files
from covidkit.engine.device import default_device
from covidkit.fresh_tests import FreshTestSets, score_fresh_test_sets
from covidkit.export import export_models
from covidkit.predict import CompetitionPrediction, predict_competition, score_if_labelled
from covidkit.learning import AP_MARGIN, LearningCheck
from covidkit.layout import RunLayout
from covidkit.report import (
    Missing, examples_figure, figure_html, image_meta, pick_examples, require, table_html,
)
from covidkit.stages import StageConfig, stage_main, write_settings


# What this stage reads (covidkit.records fingerprints them: a change reruns it): dataset folders of
# <input_dir> ("weights": pretrained files), and the stages whose outputs it reads.
DATASETS = ['siim-covid19-detection']
UPSTREAM = ['00_prepare_data', '01_pretrain_nih_resnext', '02_pretrain_rsna_yolo', '03_train_siim_fasterrcnn', '04_train_siim_yolo', '05_ensemble_wbf', '06_study_level']


def outputs(layout: RunLayout, settings: dict) -> list[Path]:
    """What this stage writes (covidkit.records hashes it; default: the stage's folder): the exported models, the
    fresh test sets, and the submission file of ``settings`` (relative to the repository)."""
    from covidkit.profiles import REPO_ROOT

    submission = [REPO_ROOT / settings["submission"]] if settings.get("submission") else []
    return [layout.submission.models, layout.submission.fresh_tests, *submission]


@dataclass
class Config(StageConfig):
    models_dir: str | None = None  # where to export the models; None: <run_dir>/models
    submission: str = "submissions/submission.csv"  # the submission to write
    device: str | None = None  # "cpu", "cuda" ...; None: cuda when a GPU is visible, else cpu
    hflip_tta: bool = False  # also predict each image flipped, and average
    workers: int | None = None  # decoding processes beside the models, None: one core less than all
    fresh_test_seeds: list[int] = field(default_factory=list)  # seeds of fresh synthetic test sets to score
    fresh_test_studies: int = 80  # studies in each fresh test set


@dataclass
class Result:
    models: Path
    prediction: CompetitionPrediction
    scores: dict | None  # the metric on the competition's test labels, when they exist
    fresh: FreshTestSets | None


def run(cfg: Config) -> Result:
    write_settings(cfg)
    competition = Path(cfg.input_dir) / COMPETITION
    device = cfg.device or str(default_device())
    models = export_models(cfg.run_dir, cfg.models_dir or cfg.layout.submission.models, competition_dir=competition,
                           hflip_tta=cfg.hflip_tta)
    prediction = predict_competition(competition, models, cfg.submission, device=device, hflip_tta=cfg.hflip_tta,
                                     workers=cfg.workers)
    fresh = None
    if cfg.fresh_test_seeds:
        studies = cfg.fresh_test_studies if cfg.max_items is None else min(cfg.fresh_test_studies, cfg.max_items)
        fresh = score_fresh_test_sets(models, cfg.layout.submission.fresh_tests, cfg.fresh_test_seeds,
                                      studies, device=device, hflip_tta=cfg.hflip_tta,
                                      workers=cfg.workers)
    return Result(models, prediction, score_if_labelled(competition, cfg.submission), fresh)


def describe(result: Result) -> str:
    from covidkit.metrics import format_scores

    lines = [f"models: {result.models}", result.prediction.summary()]
    if result.scores:
        lines.append(format_scores(result.scores))
    if result.fresh is not None:
        lines.append(result.fresh.summary())
    return "\n".join(lines)


def learning_checks(layout: RunLayout, input_dir: Path | None) -> list[LearningCheck]:
    from covidkit.fresh_tests import read_fresh_test_sets

    fresh = read_fresh_test_sets(layout.submission.fresh_tests)
    if fresh is None or fresh.per_seed.empty:
        return []
    return [LearningCheck("07_make_submission", "submission", f"test score, mean of {len(fresh.per_seed)} fresh "
                          "test sets", fresh.mean, float(fresh.per_seed["prior_mAP"].mean()), "priors' submission",
                          AP_MARGIN)]


def submission_section(submission_csv: Path | None, solution_dir: Path | None) -> str:
    """The submission's competition score per class, when its test labels exist."""
    if submission_csv is None or not Path(submission_csv).is_file():
        raise Missing(f"not run: no submission ({submission_csv})")
    if solution_dir is None:
        raise Missing(f"{submission_csv} written; not scored: no test labels (solution folder)")
    solution_dir = Path(solution_dir)
    require(solution_dir / SOLUTION_IMAGE_CSV, solution_dir / SOLUTION_STUDY_CSV)
    scores = score_files(solution_dir / SOLUTION_IMAGE_CSV, solution_dir / SOLUTION_STUDY_CSV, submission_csv)
    return f"<p>{html.escape(str(submission_csv))}</p><pre>{html.escape(format_scores(scores))}</pre>"


def fresh_tests_section(layout: RunLayout) -> str:
    """07's scores on fresh test sets (``covidkit.fresh_tests``): per seed, their mean and spread."""
    from covidkit.fresh_tests import read_fresh_test_sets

    fresh = read_fresh_test_sets(layout.submission.fresh_tests)
    if fresh is None:
        raise Missing("not run: no fresh_tests/scores.csv (07's fresh_test_seeds)")
    return f"<p>{html.escape(fresh.summary())}</p>" + table_html(fresh.per_seed.set_index("seed"), digits=3)


def test_examples_section(layout: RunLayout, submission_csv: Path | None, solution_dir: Path | None) -> str:
    """Test images with the submission's boxes (and the true boxes when the test labels exist)."""
    if submission_csv is None or not Path(submission_csv).is_file():
        raise Missing(f"not run: no submission ({submission_csv})")
    sub = pd.read_csv(submission_csv, dtype=str, keep_default_na=False)
    sub = sub[sub["id"].str.endswith("_image")]
    predicted = {row_id[:-len("_image")]: [p for p in parse_prediction_string(text) if p.label == "opacity"]
                 for row_id, text in zip(sub["id"], sub["PredictionString"])}
    truth: dict[str, np.ndarray] = {}
    if solution_dir is not None and (Path(solution_dir) / SOLUTION_IMAGE_CSV).is_file():
        labels = read_image_labels(Path(solution_dir) / SOLUTION_IMAGE_CSV)
        truth = dict(zip(labels["image_id"], labels["boxes"]))
    meta = image_meta(layout)
    ids = [i for i in pick_examples(sorted(predicted), truth) if layout.prepare.png("test", i).is_file()]
    if not ids:
        raise Missing("not run: no prepared test image of the submission")
    fig = examples_figure(
        [layout.prepare.png("test", i) for i in ids], [truth.get(i, np.zeros((0, 4))) for i in ids],
        [np.array([[p.x1, p.y1, p.x2, p.y2] for p in predicted[i]]).reshape(-1, 4) for i in ids],
        [np.array([p.conf for p in predicted[i]]) for i in ids], [meta[i] for i in ids], [i[:12] for i in ids])
    return f"<p>Green: truth (when labelled), orange: submitted boxes with score.</p>{figure_html(fig)}"


REPORT_SECTIONS = [  # the run report's sections of this stage (covidkit.report)
    ("Submission score (07)", lambda r: submission_section(r.submission_csv, r.solution_dir)),
    ("Fresh test sets (07)", lambda r: fresh_tests_section(r.layout)),
    ("Test examples", lambda r: test_examples_section(r.layout, r.submission_csv, r.solution_dir)),
]


def main(argv: list[str] | None = None) -> None:
    stage_main(__name__, argv)


if __name__ == "__main__":
    main()
