"""Prediction from an exported models folder: one image, a whole competition folder, the CLI, the benchmark."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from covidkit.boxes import parse_prediction_string
from covidkit.data.siim import COMPETITION, IMAGE_CLASSES, STUDY_CLASSES, dicom_paths, strip_suffix
from covidkit.export import MANIFEST, read_manifest
from covidkit.predict import Predictor, hflip_boxes, predict_competition
from covidkit.submission import validate_files


@pytest.fixture(scope="module")
def predictor(models_dir) -> Predictor:
    return Predictor.load(models_dir)


@pytest.fixture
def competition(tiny_input, tmp_path):
    """A copy of the tiny competition's test images and sample submission (the tests damage it)."""
    source, target = tiny_input / COMPETITION, tmp_path / COMPETITION
    shutil.copytree(source / "test", target / "test")
    shutil.copyfile(source / "sample_submission.csv", target / "sample_submission.csv")
    return target


def _image(seed: int, shape=(64, 64)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_the_manifest_lists_every_fold_model_with_its_hash(models_dir):
    manifest = read_manifest(models_dir)
    assert {name: len(files) for name, files in manifest["models"].items()} == {"fasterrcnn": 2, "yolo": 2, "study": 2}
    assert set(manifest["sha256"]) == {*sum(manifest["models"].values(), []), "fusion.json"}
    assert manifest["versions"]["torch"] and manifest["prepared_size"] == 64
    assert manifest["priors"]["study"] == {"negative": 0.25, "typical": 0.5, "indeterminate": 0.0, "atypical": 0.25}
    assert manifest["box_threshold"] == 0.25  # 05's operating point
    assert manifest["none_rule"] == "head" and manifest["hflip_tta"] is False  # no 06 summary in the tiny run


def test_a_changed_model_file_is_refused(models_dir, tmp_path):
    copy = shutil.copytree(models_dir, tmp_path / "models")
    with open(copy / "yolo" / "fold1.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="does not match its SHA-256"):
        read_manifest(copy)
    (copy / MANIFEST).unlink()
    with pytest.raises(FileNotFoundError, match="export_models"):
        Predictor.load(copy)


def test_an_image_gets_boxes_in_its_original_pixels_and_probabilities(predictor):
    result = predictor.predict(_image(0, shape=(300, 200)))
    assert result.boxes.shape == (len(result.scores), 4) and len(result.scores) > 0
    assert (result.boxes[:, [0, 1]] >= 0).all()
    assert (result.boxes[:, 2] <= 200).all() and (result.boxes[:, 3] <= 300).all()
    assert (result.boxes[:, 2] > result.boxes[:, 0]).all() and (np.diff(result.scores) <= 0).all()
    assert list(result.study_probs) == STUDY_CLASSES and sum(result.study_probs.values()) == pytest.approx(1, abs=1e-5)
    assert 0 <= result.none_prob <= 1
    assert {"resize", "fasterrcnn", "yolo", "fusion", "study", "total"} <= set(result.timings)
    with pytest.raises(ValueError, match="uint8"):
        predictor.predict(np.zeros((64, 64), np.float32))


def test_with_flip_tta_a_mirrored_image_gets_the_mirrored_prediction(models_dir):
    """TTA predicts each image and its flip; for a mirrored input the two views swap, so the result mirrors."""
    tta = Predictor.load(models_dir, hflip_tta=True)
    image = _image(1)
    plain, mirrored = tta.predict(image), tta.predict(np.ascontiguousarray(image[:, ::-1]))
    assert len(plain.scores) == len(mirrored.scores) > 0
    order_a, order_b = np.lexsort(plain.boxes.T[::-1]), np.lexsort(hflip_boxes(mirrored.boxes, 64).T[::-1])
    np.testing.assert_allclose(hflip_boxes(mirrored.boxes, 64)[order_b], plain.boxes[order_a], atol=1e-2)
    np.testing.assert_allclose(mirrored.scores[order_b], plain.scores[order_a], atol=1e-4)
    assert mirrored.study_probs == pytest.approx(plain.study_probs, abs=1e-5)
    assert mirrored.none_prob == pytest.approx(plain.none_prob, abs=1e-5)
    assert hflip_boxes([[10, 1, 30, 2]], 100).tolist() == [[70, 1, 90, 2]]


def _rows(path) -> dict[str, list]:
    frame = pd.read_csv(path, dtype=str)
    return {row_id: parse_prediction_string(text) for row_id, text in zip(frame["id"], frame["PredictionString"])}


def test_every_sample_row_is_predicted_and_the_submission_is_valid(competition, models_dir, tmp_path):
    out = tmp_path / "sub" / "submission.csv"
    result = predict_competition(competition, models_dir, out, workers=1, progress=False)
    sample = competition / "sample_submission.csv"
    assert validate_files(out, sample) == []
    rows = _rows(out)
    assert list(rows) == pd.read_csv(sample)["id"].tolist()
    assert result.failed == {} and result.images == len(dicom_paths(competition, "test"))
    for row_id, preds in rows.items():
        labels = [p.label for p in preds]
        if row_id.endswith("_study"):
            assert labels == STUDY_CLASSES
            assert sum(p.conf for p in preds) == pytest.approx(1, abs=1e-4)
        else:
            assert labels[-1] == "none" and set(labels[:-1]) <= set(IMAGE_CLASSES) and labels.count("none") == 1
    assert "0 images unreadable" in result.log.read_text()
    _assert_a_study_gets_the_mean_of_its_images(competition, models_dir, rows)


def _assert_a_study_gets_the_mean_of_its_images(competition, models_dir, rows) -> None:
    from covidkit.dicom import read_dicom

    paths = dicom_paths(competition, "test")
    study_of = {i: p.parent.parent.name for i, p in paths.items()}
    study = max(set(study_of.values()), key=list(study_of.values()).count)  # one with several images if any
    predictor = Predictor.load(models_dir)
    probs = [predictor.predict(read_dicom(paths[i]).pixels).study_probs for i, s in study_of.items() if s == study]
    expected = np.mean([[p[c] for c in STUDY_CLASSES] for p in probs], axis=0)
    assert [p.conf for p in rows[f"{study}_study"]] == pytest.approx(expected, abs=1e-5)


def test_unreadable_images_get_prior_rows_and_a_log_line(competition, models_dir, tmp_path):
    paths = dicom_paths(competition, "test")
    truncated, deleted = sorted(paths)[:2]
    data = paths[truncated].read_bytes()
    paths[truncated].write_bytes(data[: len(data) // 3])
    deleted_study = paths[deleted].parent.parent.name
    paths[deleted].unlink()

    out = tmp_path / "submission.csv"
    result = predict_competition(competition, models_dir, out, workers=0, progress=False)
    assert validate_files(out, competition / "sample_submission.csv") == []
    assert set(result.failed) == {truncated, deleted}
    assert "truncated" in result.failed[truncated].lower() and "no DICOM file" in result.failed[deleted]
    priors = read_manifest(models_dir)["priors"]
    rows = _rows(out)
    for image_id in (truncated, deleted):
        assert [(p.label, p.conf) for p in rows[f"{image_id}_image"]] == [("none", pytest.approx(priors["none"]))]
    if not any(p.parent.parent.name == deleted_study for p in dicom_paths(competition, "test").values()):
        study = rows[f"{deleted_study}_study"]
        assert [p.conf for p in study] == pytest.approx([priors["study"][c] for c in STUDY_CLASSES])
    log = result.log.read_text()
    assert f"unreadable {truncated}_image" in log and f"unreadable {deleted}_image" in log


def test_cli_predict_validate_and_bench(competition, models_dir, tmp_path, capsys):
    from covidkit.cli import main

    out = tmp_path / "cli.csv"
    assert main(["predict", str(competition), str(models_dir), "--out", str(out), "--workers", "0", "--quiet"]) == 0
    assert main(["validate", str(out), "--sample", str(competition / "sample_submission.csv")]) == 0
    sample_ids = {strip_suffix(i) for i in pd.read_csv(competition / "sample_submission.csv")["id"]}
    assert {strip_suffix(i) for i in pd.read_csv(out)["id"]} == sample_ids

    assert main(["bench", "predict", str(models_dir), str(competition), "--n", "2"]) == 0
    table = capsys.readouterr().out
    for stage in ("decode", "fasterrcnn", "yolo", "fusion", "study", "bookkeeping", "whole",
                  "fusion + bookkeeping share"):
        assert stage in table
    with pytest.raises(SystemExit):  # the competition folder is a required argument
        main(["bench", "predict", str(models_dir)])
    assert main(["predict", str(competition), str(tmp_path), "--out", str(out)]) == 2  # not a models folder


def test_exported_fusion_parameters_are_05s(models_dir):
    assert json.loads((models_dir / "fusion.json").read_text())["skip_box_thr"] == 0.001


def test_export_needs_every_stage(tmp_path):
    from covidkit.export import export_models

    with pytest.raises(FileNotFoundError, match="no fold model"):
        export_models(tmp_path / "empty_run", tmp_path / "models")


@pytest.mark.slow
def test_notebook_07_exports_predicts_and_scores(tiny_run_dir, tiny_input, tmp_path):
    import nbformat

    from covidkit.pipeline import load_profile, notebooks_dir, run_notebook

    models, submission = tmp_path / "models", tmp_path / "submissions" / "submission.csv"
    run_dir = shutil.copytree(tiny_run_dir, tmp_path / "run")  # 07 writes its fresh test sets there
    run = run_notebook(notebooks_dir() / "07_make_submission.ipynb", load_profile("smoke"), tmp_path,
                       {"input_dir": str(tiny_input), "run_dir": str(run_dir), "models_dir": str(models),
                        "submission": str(submission), "workers": 0, "fresh_test_seeds": [3],
                        "fresh_test_studies": 2})
    assert read_manifest(models)["models"]["yolo"] == ["yolo/fold0.pt", "yolo/fold1.pt"]
    assert validate_files(submission, tiny_input / COMPETITION / "sample_submission.csv") == []
    text = "".join(o.get("text", "") for c in nbformat.read(run.output, 4).cells for o in c.get("outputs", []))
    for line in ("negative", "opacity", "study mAP", "mAP", "s per image", "fresh test sets (seeds 3)"):
        assert line in text
    assert len(pd.read_csv(run_dir / "fresh_tests" / "scores.csv")) == 1
