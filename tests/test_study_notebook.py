"""Notebook 06 under papermill, with the smoke profile's section (fewer epochs), on the tiny synthetic competition."""
from __future__ import annotations

import json
import math

import cv2
import nbformat
import pandas as pd
import pytest

from covidkit.prepare import train_table
from covidkit.data.siim import COMPETITION, STUDY_CLASSES


@pytest.mark.slow
def test_notebook_06_in_the_smoke_profile(tiny_input, tmp_path):
    import papermill

    from covidkit.pipeline import REPO_ROOT, load_profile, notebook_parameters, notebooks_dir
    from covidkit.prepare import prepare
    from covidkit.layout import RunLayout
    from covidkit.models.study import load_study_model, predict_outputs

    run_dir = tmp_path / "run"
    prepare(tiny_input / COMPETITION, run_dir / "prepared", size=96, workers=1, folds=5, progress=False)
    book = notebooks_dir() / "06_study_level.ipynb"
    params = notebook_parameters(book, load_profile("smoke"), {"input_dir": str(tiny_input), "run_dir": str(run_dir),
                                                               "epochs": 2})
    settings = params["overrides"]
    assert settings["fold_groups"] == 2 and settings["encoder"] == "plain" and settings["hflip_tta"] is True
    book_out = tmp_path / "06.ipynb"
    RunLayout(run_dir).study_level.dir.mkdir()
    RunLayout(run_dir).study_level.stacker.write_text("{}")  # an earlier run's: must not reach 07
    papermill.execute_notebook(str(book), str(book_out), parameters=params, kernel_name="python3", cwd=str(REPO_ROOT),
                               progress_bar=False)

    # one model per fold, loadable, predicting any-size images
    out = RunLayout(run_dir).study_level
    models = out.models()
    assert [p.parent.name for p in models] == ["fold0", "fold1"]
    model, spec = load_study_model(models[0])
    assert spec.prepared_size == 96 and spec.input_size == params["overrides"]["input_size"]
    table = train_table(run_dir / "prepared", tiny_input / COMPETITION)
    assert predict_outputs(model, spec, [cv2.imread(table["path"][0], cv2.IMREAD_GRAYSCALE)])[0].shape == (1, 4)

    # every training image and study is out of fold exactly once, with probabilities summing to 1
    images = pd.read_csv(out.oof_images, dtype={"image_id": str, "study_id": str})
    studies = pd.read_csv(out.oof_studies, dtype={"study_id": str})
    assert sorted(images["image_id"]) == sorted(table["image_id"])
    assert sorted(studies["study_id"]) == sorted(table["study_id"].unique())
    probs = studies[[f"p_{c}" for c in STUDY_CLASSES]].to_numpy()
    assert abs(probs.sum(1) - 1).max() < 1e-5
    summary = json.loads(out.summary.read_text())
    assert math.isfinite(summary["study_ap"]["mAP"])
    assert out.confusion.is_file()
    assert len(pd.read_csv(out.none_comparison)) == 3  # no detector boxes here

    text = "\n".join(o.get("text", "") for c in nbformat.read(book_out, as_version=4).cells for o in c.get("outputs", []))
    assert f"out-of-fold study mAP: {summary['study_ap']['mAP']:.3f}" in text
    # without 05's boxes the none rule is chosen out of fold among the classifier's own estimates
    assert summary["none_rule"]["chosen"] in ("head", "negative") and "none rule for 07" in text
    assert settings["stack_boxes"] and "no stacker" in text  # the smoke profile stacks, but 05 did not run here
    assert not out.stacker.exists()  # the stale one was removed
