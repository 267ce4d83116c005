"""The run report: a self-contained HTML page, from run folders written by the real writers."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from covidkit.prepare import train_table
from covidkit.data.siim import COMPETITION, SOLUTION, STUDY_CLASSES, read_image_labels
from covidkit.oof import OofPredictions, box_rows, write_oof
from covidkit.report import write_report

SECTIONS = ["Did every model learn?", "Stages: wall time", "Settings each stage ran with", "Opacity detectors", "Study classes and none", "Submission score",
            "Fresh test sets", "Out-of-fold examples", "Test examples", "Pseudo-labels (08)", "Pseudo-label rounds"]


def _assert_self_contained(page: str) -> None:
    assert "http://" not in page and "https://" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<link" not in page and "<script" not in page


def test_empty_run_folder_says_not_run(tmp_path):
    path = write_report(tmp_path / "run")
    page = path.read_text()
    assert path == tmp_path / "run" / "report.html"
    for title in SECTIONS:
        assert title in page
    assert page.count('class="missing"') >= len(SECTIONS)
    _assert_self_contained(page)


def _detector_oof(table: pd.DataFrame, rng, jitter: float) -> OofPredictions:
    """Every true box moved a little and scored, plus a false box per image."""
    parts = []
    for image_id, fold, boxes, h, w in zip(table["image_id"], table["fold"], table["boxes"],
                                           table["orig_height"], table["orig_width"]):
        moved = boxes + rng.normal(0, jitter, boxes.shape) if len(boxes) else np.zeros((0, 4))
        false = np.array([[0.1 * w, 0.1 * h, 0.3 * w, 0.3 * h]])
        scores = np.concatenate([rng.uniform(0.5, 1.0, len(moved)), rng.uniform(0, 0.5, 1)])
        parts.append(box_rows(image_id, fold, np.vstack([moved, false]), scores))
    return OofPredictions.from_parts(parts, table[["image_id", "fold"]])


@pytest.fixture(scope="module")
def full_run(tiny_input, models_dir, tmp_path_factory):
    """A run folder with every notebook's outputs, written by the package's own writers."""
    from covidkit.fresh_tests import score_fresh_test_sets
    from covidkit.layout import RunLayout
    from covidkit.pipeline import NotebookRun, write_stage_record
    from covidkit.prepare import prepare
    from covidkit.stages import ensemble_wbf, pseudo_label, write_settings
    from covidkit.stages import prepare as prepare_stage
    from covidkit.stages.study_level import Config, write_tables
    from covidkit.study_scores import PROB_COLUMNS, none_comparison, study_probabilities, summarise
    from covidkit.submission import ImagePrediction, write_submission

    run = tmp_path_factory.mktemp("run")
    competition = tiny_input / COMPETITION
    prepare(competition, run / "prepared", size=64, workers=1, folds=2, progress=False)
    write_settings(prepare_stage.Config(input_dir=str(tiny_input), run_dir=str(run), prepared_size=64, folds=2))
    table = train_table(run / "prepared", competition)
    rng = np.random.default_rng(0)
    layout = RunLayout(run)
    write_oof(layout.siim_fasterrcnn.oof, _detector_oof(table, rng, 3.0))
    write_oof(layout.siim_yolo.oof, _detector_oof(table, rng, 6.0))
    ensemble_wbf.run(ensemble_wbf.Config(input_dir=str(tiny_input), run_dir=str(run)))

    images = table[["image_id", "study_id", "fold", "label"]].assign(model_fold=table["fold"],
                                                                       has_box=table["boxes"].map(len) > 0)
    probs = rng.dirichlet(np.ones(4), len(images)) + 2 * np.eye(4)[[STUDY_CLASSES.index(c) for c in images["label"]]]
    images[PROB_COLUMNS] = probs / probs.sum(1, keepdims=True)
    images["p_none_head"] = np.where(images["has_box"], 0.3, 0.7)
    studies = study_probabilities(images)
    write_tables(Config(run_dir=str(run)), images, studies, summarise(images, studies), None,
                 none_comparison(images, studies))

    sample = pd.read_csv(competition / "sample_submission.csv")
    test_images = read_image_labels(tiny_input / SOLUTION / "test_image_level.csv")
    predictions = {i: ImagePrediction(b + 2.0, np.full(len(b), 0.8), 0.5) for i, b in
                   zip(test_images["image_id"], test_images["boxes"])}
    studies_test = {i[:-len("_study")]: [0.25] * 4 for i in sample["id"] if i.endswith("_study")}
    submission = write_submission(run / "submission.csv", predictions, studies_test, order=sample["id"])
    score_fresh_test_sets(models_dir, layout.submission.fresh_tests, seeds=[5], test_studies=2, workers=0,
                          progress=False)
    pseudo_label.run(pseudo_label.Config(input_dir=str(tiny_input), run_dir=str(run), include_test=True,
                                         models_dir=str(models_dir), device="cpu", progress=False))
    write_stage_record(layout, [NotebookRun("00_prepare_data", layout.notebooks / "00.ipynb", 12.5, 321.0)], False)
    return run, submission


def test_report_of_a_complete_run(full_run, tiny_input):
    run, submission = full_run
    page = write_report(run, submission, input_dir=tiny_input).read_text()
    _assert_self_contained(page)
    for title in SECTIONS:
        assert title in page
    assert 'class="missing"' not in page
    for model in ("Faster R-CNN", "YOLO", "WBF ensemble"):
        assert model in page
    for name in (*STUDY_CLASSES, "mAP", "study_negative", "opacity", "00_prepare_data", "321.0"):
        assert name in page
    # the settings 05 ran with, as its run recorded them in its folder's config.yaml
    import yaml

    from covidkit.layout import RunLayout
    from covidkit.stages import ensemble_wbf

    settings = yaml.safe_load(RunLayout(run).settings("05_ensemble_wbf").read_text())
    assert settings["run_dir"] == str(run) and settings["iou_thr"] == ensemble_wbf.Config().iou_thr
    assert "<details><summary>05_ensemble_wbf</summary><pre>" in page and "iou_thr: " in page
    # each figure beside its baselines: 05's fusion against the better detector and the prior boxes (05's table
    # row); 03 and 04 ran without writing their baselines, so their checks say missing
    from covidkit.layout import RunLayout

    table = pd.read_csv(RunLayout(run).ensemble_wbf.ap_table, index_col=0)["ap50"]
    assert f"<td>prior boxes</td><td>{table['prior boxes']:.3f}</td>" in page
    assert "prior boxes AP@0.5" in page
    assert re.search(r"<td>YOLO alone</td>|<td>Faster R-CNN alone</td>", page)
    assert "did not learn: 03_train_siim_fasterrcnn Faster R-CNN: OOF opacity AP@0.5 against untrained: missing" in page
    assert "<th>baseline</th><th>baseline value</th>" in page
    # figures: detector PR, study PR, confusion matrix, OOF examples, test examples, 08's pseudo-boxes
    assert page.count("data:image/png;base64,") == 6
    rounds = page.split("<h2>Pseudo-label rounds</h2>")[1]
    assert "One round" in rounds and "fresh test score (07)" in rounds
    # the submission's score, as covidkit score prints it
    from covidkit.metrics import format_scores, score_files

    scores = score_files(tiny_input / SOLUTION / "test_image_level.csv", tiny_input / SOLUTION / "test_study_level.csv",
                         submission)
    assert f"{scores['mAP']:.4f}" in page and format_scores(scores).splitlines()[1].split()[0] in page


def test_each_missing_part_only_blanks_its_section(full_run, tiny_input, tmp_path):
    import shutil

    run, _ = full_run
    partial = tmp_path / "partial"
    shutil.copytree(run, partial)
    shutil.rmtree(partial / "05_ensemble_wbf")
    shutil.rmtree(partial / "06_study_level")
    page = write_report(partial, submission_csv=None, input_dir=tiny_input).read_text()
    assert "05 single-vs-fused table: not run" in page
    assert "06_study_level" in page and page.count('class="missing"') == 4  # 05 table, 06, score, test examples
    assert "Faster R-CNN (03)" in page and "YOLO (04)" in page
    _assert_self_contained(page)


def test_with_a_study_stacker_the_report_shows_both_and_the_stackers_curves(full_run, tiny_input, tmp_path):
    import json
    import shutil

    from covidkit.stages.study_level import study_section
    from covidkit.layout import RunLayout
    from covidkit.study_scores import study_aps

    run, _ = full_run
    stacked_run = tmp_path / "stacked"
    shutil.copytree(run, stacked_run)
    out = RunLayout(stacked_run).study_level
    studies = pd.read_csv(out.oof_studies, dtype={"study_id": str})
    reversed_probs = studies.assign(**{f"p_{c}": studies[f"p_{c}"].to_numpy()[::-1] for c in STUDY_CLASSES})
    reversed_probs.to_csv(out.oof_studies_stacked, index=False)
    summary = json.loads(out.summary.read_text())
    summary["study_ap_stacked"] = study_aps(reversed_probs)
    summary["box_count_rule"] = {**study_aps(studies.assign(**{f"p_{c}": 0.25 for c in STUDY_CLASSES})),
                                 "threshold": 0.5, "studies": len(studies)}
    out.summary.write_text(json.dumps(summary))

    plain, stacked = study_section(RunLayout(run)), study_section(RunLayout(stacked_run))
    assert "study model + boxes (07)" in stacked and "study model + boxes" not in plain
    assert f"{summary['study_ap_stacked']['mAP']:.3f}" in stacked
    assert "box-count rule" in stacked and "box-count rule" not in plain  # the stacker's trivial baseline, beside it
    figures = lambda page: re.findall(r'src="(data:image/png;base64,[^"]*)"', page)  # noqa: E731
    assert figures(stacked)[0] != figures(plain)[0]  # the PR curves are drawn from the stacker's probabilities


def test_a_dry_runs_report_says_the_learning_checks_do_not_apply(full_run, tiny_input, tmp_path):
    import shutil

    from covidkit.layout import RunLayout
    from covidkit.pipeline import NotebookRun, write_stage_record
    from covidkit.report import DRY_RUN_CHECKS

    run, _ = full_run
    dry = tmp_path / "dry"
    shutil.copytree(run, dry)
    layout = RunLayout(dry)
    assert layout.stage_record.is_file() and not layout.is_dry_run
    write_stage_record(layout, [NotebookRun("00_prepare_data", layout.notebooks / "00.ipynb", 12.0, 900.0)], True)
    assert layout.is_dry_run and not layout.stage_record.exists()  # a dry run over a run folder relabels it
    normal = write_report(run, input_dir=tiny_input).read_text()
    page = write_report(dry, input_dir=tiny_input).read_text()
    learning = re.compile(r"Did every model learn\?</h2>\s*<p class=\"missing\">([^<]*)</p>")
    assert learning.search(normal) is None or learning.search(normal).group(1) != DRY_RUN_CHECKS
    assert learning.search(page).group(1) == DRY_RUN_CHECKS and 'class="banner"' not in page
