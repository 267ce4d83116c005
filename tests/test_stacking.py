"""The study stacker: box features, fitting, its out-of-fold AP, JSON round trip, 06's fit and 07's use."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from covidkit.data.siim import STUDY_CLASSES
from covidkit.oof import OofPredictions, box_rows, write_oof
from covidkit.layout import RunLayout
from covidkit.stacking import BOX_FEATURE_NAMES, StudyStacker, box_features, fit_stacker, out_of_fold_probs, stacker_features

STACKER_JSON = "stacker.json"

W, H = 2000, 2400


def _box(row: int, side: int, size: float = 200) -> list[float]:
    """A box centred in zone ``row`` (0 upper .. 2 lower), ``side`` 0 left of the image, 1 right."""
    cx, cy = (0.25 + 0.5 * side) * W, (row + 0.5) / 3 * H
    return [cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2]


def test_box_features_take_the_best_box_per_zone_worse_side_first_then_the_pattern():
    boxes = [_box(2, 0), _box(2, 0), _box(2, 1), _box(0, 1)]
    scores = [0.3, 0.6, 0.2, 0.9]
    # rows upper, middle, lower: worse side 0.9, 0, 0.6; better side 0, 0, 0.2; then the sum of the scores, the
    # boxes' mean area (200 x 200 of 2000 x 2400), distance from the midline (centres at a quarter: 0.5) and
    # height (three boxes at 5/6 of it, the best one at 1/6), then the best box's score and area
    area = 200 * 200 / (W * H)
    height = ((0.3 + 0.6 + 0.2) * 5 / 6 + 0.9 / 6) / 2.0
    np.testing.assert_allclose(box_features(boxes, scores, (H, W)),
                               [0.9, 0, 0.6, 0, 0, 0.2, 2.0, area, 0.5, height, 0.9, area])
    np.testing.assert_allclose(box_features(np.zeros((0, 4)), [], (H, W)), np.zeros(12))
    with pytest.raises(ValueError, match="2 boxes but 1 scores"):
        box_features(boxes[:2], scores[:1], (H, W))


def test_box_pattern_features_tell_one_large_central_box_from_small_peripheral_ones():
    central = [[0.3 * W, 0.2 * H, 0.7 * W, 0.8 * H]]
    nodules = [[x * W, y * H, x * W + 60, y * H + 60] for x, y in ((0.05, 0.3), (0.9, 0.5), (0.06, 0.7))]
    count_c, area_c, periphery_c = box_features(central, [0.8], (H, W))[6:9]
    count_n, area_n, periphery_n = box_features(nodules, [0.5, 0.5, 0.5], (H, W))[6:9]
    assert count_n > count_c and area_c > 50 * area_n and periphery_c == pytest.approx(0.0)
    assert periphery_n > 0.8
    # a box's weight is its score: a faint large box moves the area less than a confident one
    mixed = box_features(central + nodules[:1], [0.1, 0.9], (H, W))
    assert mixed[7] < 0.5 * area_c
    # ... and is not the best box: that is the confident small one
    assert mixed[10] == pytest.approx(0.9) and mixed[11] == pytest.approx(60 * 60 / (W * H))


def test_box_height_tells_basal_boxes_from_upper_ones():
    basal = [_box(2, 0), _box(2, 1)]
    upper = [_box(0, 0), _box(0, 1)]
    assert box_features(basal, [0.7, 0.7], (H, W))[9] == pytest.approx(5 / 6)
    assert box_features(upper, [0.7, 0.7], (H, W))[9] == pytest.approx(1 / 6)
    assert box_features(basal[:1] + upper[:1], [0.9, 0.3], (H, W))[9] == pytest.approx((0.9 * 5 + 0.3) / 6 / 1.2)


def test_box_features_do_not_change_when_the_image_is_mirrored():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1, (12, 2)) * [W, H]
    boxes = np.hstack([xy, xy + rng.uniform(50, 400, (12, 2))])
    scores = rng.uniform(0, 1, 12)
    mirrored = boxes.copy()
    mirrored[:, [0, 2]] = W - boxes[:, [2, 0]]
    np.testing.assert_allclose(box_features(mirrored, scores, (H, W)), box_features(boxes, scores, (H, W)))


# Radiological patterns of the four classes as box zones (what synth draws): none; both lower zones; one side;
# one upper or middle zone, found less often. Each box found with a detector's probability, scores noisy.
def _pattern(label: int, rng: np.random.Generator) -> tuple[list, list]:
    wanted = {0: [], 1: [(2, 0), (2, 1)], 2: [(r, 0) for r in rng.choice(3, 2, replace=False)],
              3: [(int(rng.integers(2)), int(rng.integers(2)))]}[label]
    boxes = [_box(r, s) for r, s in wanted if rng.random() < 0.8]
    scores = list(rng.uniform(0.3, 0.9, len(boxes)))
    for _ in range(rng.poisson(1.0)):  # false positives anywhere
        boxes.append(_box(int(rng.integers(3)), int(rng.integers(2))))
        scores.append(rng.uniform(0.0, 0.4))
    return boxes, scores


def _dataset(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.choice(4, n, p=[0.3, 0.4, 0.2, 0.1])
    feats = np.array([box_features(*_pattern(y, rng), (H, W)) for y in labels])
    probs = rng.dirichlet(np.ones(4), n)  # a study model that knows nothing
    return stacker_features(probs, feats), labels


def _map(labels: np.ndarray, probs: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    return float(np.mean([average_precision_score(labels == k, probs[:, k]) for k in range(4)]))


def test_the_stacker_learns_the_classes_from_where_the_boxes_are(tmp_path):
    x, y = _dataset(240, seed=1)
    folds = np.arange(len(y)) % 5
    oof = out_of_fold_probs(x, y, folds)
    assert np.allclose(oof.sum(1), 1) and _map(y, oof) > 0.6  # class priors: mean AP about 0.25
    # out of fold: a fold's rows are predicted without its labels (here: shuffled within fold 0)
    shuffled = y.copy()
    shuffled[folds == 0] = np.random.default_rng(0).permutation(y[folds == 0])
    np.testing.assert_allclose(out_of_fold_probs(x, shuffled, folds)[folds == 0], oof[folds == 0])
    assert not np.allclose(out_of_fold_probs(x, shuffled, folds)[folds == 1], oof[folds == 1])
    assert _map(y, np.exp(x[:, :4])) < 0.45  # the uninformed study model alone

    stacker = fit_stacker(x, y)
    x_new, y_new = _dataset(200, seed=2)
    assert _map(y_new, stacker.predict_proba(x_new)) > 0.6
    loaded = StudyStacker.load(stacker.save(tmp_path / STACKER_JSON))
    np.testing.assert_allclose(loaded.predict_proba(x_new), stacker.predict_proba(x_new), rtol=1e-12)
    # the fitted numbers are scikit-learn's: the same probabilities
    from sklearn.linear_model import LogisticRegression

    reference = LogisticRegression(max_iter=5000).fit((x - stacker.mean) / stacker.scale, y)
    np.testing.assert_allclose(stacker.predict_proba(x_new), reference.predict_proba((x_new - stacker.mean) / stacker.scale),
                               atol=1e-6)


def test_the_stacker_refuses_missing_classes_and_other_features(tmp_path):
    x, y = _dataset(60, seed=3)
    with pytest.raises(ValueError, match="all four classes"):
        fit_stacker(x[y != 3], y[y != 3])
    with pytest.raises(ValueError, match=r"\[N, 4\] probabilities and \[N, 12\] box features"):
        stacker_features(np.ones((3, 4)) / 4, np.zeros((3, 4)))
    path = fit_stacker(x, y).save(tmp_path / STACKER_JSON)
    data = json.loads(path.read_text())
    data["features"] = data["features"][:-1]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="other features"):
        StudyStacker.load(path)


def _fake_06_and_05(run_dir, n: int = 80) -> pd.DataFrame:
    """06's OOF image table (an uninformed study model) and 05's OOF boxes drawn from the class patterns."""
    rng = np.random.default_rng(4)
    labels = [STUDY_CLASSES[k] for k in np.arange(n) % 4]
    ids = [f"img{i:03d}" for i in range(n)]
    probs = rng.dirichlet(np.ones(4), n)
    images = pd.DataFrame({"image_id": ids, "study_id": [f"st{i:03d}" for i in range(n)], "model_fold": np.arange(n) % 2,
                           "fold": np.arange(n) % 5, "label": labels, "has_box": [lab != "negative" for lab in labels]})
    for c, col in zip(STUDY_CLASSES, probs.T):
        images[f"p_{c}"] = col
    images["p_none_head"] = 0.5
    parts = [box_rows(i, f, *_pattern(STUDY_CLASSES.index(lab), rng)) for i, f, lab in zip(ids, images["fold"], labels)]
    oof = OofPredictions.from_parts([p for p in parts if len(p)], images[["image_id", "fold"]])
    layout = RunLayout(run_dir)
    write_oof(layout.ensemble_wbf.fused_oof, oof)
    layout.prepare.dir.mkdir(parents=True)
    pd.DataFrame({"image_id": ids, "orig_height": H, "orig_width": W, "status": "ok"}).to_csv(
        layout.prepare.meta_csv, index=False)
    return images


def test_06_fits_the_stacker_on_the_oof_rows_and_05s_boxes(tmp_path):
    from covidkit.stages.study_level import Config, fused_boxes, stack_with_boxes
    from covidkit.study_scores import study_aps

    images = _fake_06_and_05(tmp_path)
    cfg = Config(input_dir="input", run_dir=str(tmp_path), stack_boxes=True)
    studies = stack_with_boxes(images, fused_boxes(cfg), cfg)
    assert sorted(studies["study_id"]) == sorted(images["study_id"])
    assert np.allclose(studies[[f"p_{c}" for c in STUDY_CLASSES]].sum(axis=1), 1)
    assert study_aps(studies)["mAP"] > 0.7
    assert cfg.layout.study_level.stacker.is_file()

    cfg.layout.ensemble_wbf.fused_oof.unlink()
    with pytest.warns(UserWarning, match="run 05 first"):
        assert fused_boxes(cfg) is None


def test_07_applies_the_exported_stacker_fold_by_fold(tiny_run_dir, tmp_path):
    """The stacker travels in the models folder (hashed); 07 feeds it each fold's models as 06 fed it out of
    fold (one study model, one fusion of one Faster R-CNN and one YOLO) and averages its outputs."""
    from covidkit.models.study import predict_outputs
    from covidkit.export import export_models, read_manifest
    from covidkit.predict import Predictor

    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)
    x, y = _dataset(120, seed=5)
    stacker = fit_stacker(x, y)
    stacker.save(RunLayout(run).study_level.stacker)
    models = export_models(run, tmp_path / "models")
    manifest = read_manifest(models)
    assert manifest["stacker"] == STACKER_JSON and STACKER_JSON in manifest["sha256"]

    image = np.random.default_rng(6).integers(0, 256, (80, 64), dtype=np.uint8)
    stacked, plain = Predictor.load(models, hflip_tta=True), Predictor.load(models, hflip_tta=True)
    plain.stacker = None
    a, b = stacked.predict(image), plain.predict(image)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)  # the submission's boxes: every fold and view
    assert a.none_prob == b.none_prob  # none is the study model's and the boxes' as before
    assert sum(a.study_probs.values()) == pytest.approx(1.0)

    # with the box features' weights zeroed, the stacker reads each fold's study model alone
    blind = StudyStacker(**{**stacker.__dict__, "coef": [row[:4] + [0.0] * len(BOX_FEATURE_NAMES) for row in stacker.coef]})
    stacked.stacker = blind
    per_fold = [predict_outputs(model, spec, [image], hflip_tta=True)[0][0] for model, spec in stacked.study]
    expected = np.mean([blind.predict_proba(stacker_features(p, np.zeros(len(BOX_FEATURE_NAMES))))[0] for p in per_fold], axis=0)
    assert list(stacked.predict(image).study_probs.values()) == pytest.approx(expected.tolist(), abs=1e-6)
    averaged_first = blind.predict_proba(stacker_features(np.mean(per_fold, axis=0), np.zeros(len(BOX_FEATURE_NAMES))))[0]
    assert not np.allclose(expected, averaged_first, atol=1e-4)  # averaging after the stacker is not before


def test_export_refuses_a_stacker_without_one_model_per_fold(tiny_run_dir, tmp_path):
    from covidkit.export import export_models

    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)
    x, y = _dataset(120, seed=5)
    fit_stacker(x, y).save(RunLayout(run).study_level.stacker)
    shutil.rmtree(RunLayout(run).study_level.fold(1))
    with pytest.raises(ValueError, match="one model per fold"):
        export_models(run, tmp_path / "models")
