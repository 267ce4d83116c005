"""Weighted boxes fusion + NMS (covidkit.ensemble) on hand-checkable cases, and notebook 05 under papermill."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from covidkit.boxes import format_boxes_column, label_from_boxes
from covidkit.ensemble import (
    FusionParams, ap_table, best_fusion, fuse_boxes, fuse_oof, grid_fusions, grid_search, operating_point,
    precision_recall, tuned_out_of_fold,
)
from covidkit.stages.ensemble_wbf import markdown_table
from covidkit.oof import OofPredictions, box_rows, fold_mean_ap, opacity_ap, read_oof, write_oof
from covidkit.pipeline import load_profile

EMPTY = np.zeros((0, 4))


def test_two_models_agreeing_give_one_box_at_the_score_weighted_mean():
    boxes, scores = fuse_boxes([[[10, 10, 50, 50]], [[12, 10, 52, 50]]], [[0.8], [0.6]], image_hw=(100, 200))
    # x1 = (0.8 * 10 + 0.6 * 12) / 1.4; the score is the mean of the two (both models found it)
    np.testing.assert_allclose(boxes, [[(0.8 * 10 + 0.6 * 12) / 1.4, 10, (0.8 * 50 + 0.6 * 52) / 1.4, 50]], atol=1e-4)
    np.testing.assert_allclose(scores, [0.7], atol=1e-6)


def test_a_box_of_one_model_of_two_keeps_half_its_score_with_avg_and_all_of_it_with_max():
    _, scores = fuse_boxes([[[10, 10, 50, 50]], EMPTY], [[0.8], []], image_hw=(100, 100))
    np.testing.assert_allclose(scores, [0.4], atol=1e-6)
    _, scores = fuse_boxes([[[10, 10, 50, 50]], EMPTY], [[0.8], []], (100, 100), FusionParams(conf_type="max"))
    np.testing.assert_allclose(scores, [0.8], atol=1e-6)


def test_weights_pull_the_box_towards_the_heavier_model():
    boxes, scores = fuse_boxes([[[10, 10, 50, 50]], [[12, 10, 52, 50]]], [[0.8], [0.6]], (100, 200),
                               FusionParams(weights=(3, 1)))
    np.testing.assert_allclose(boxes[0, 0], (3 * 0.8 * 10 + 0.6 * 12) / (3 * 0.8 + 0.6), atol=1e-4)
    np.testing.assert_allclose(scores, [(3 * 0.8 + 0.6) / 2 / 4 * 2], atol=1e-6)  # sum(w s) / n * min(L, n) / sum(w)


def test_fusion_in_pixels_does_not_depend_on_the_image_aspect():
    """Boxes are normalised per axis: stretching the image and its boxes stretches the fused boxes."""
    a = [[100, 40, 300, 160], [500, 50, 700, 150]]
    b = [[110, 42, 305, 165]]  # IoU 0.88 with a[0]
    boxes, scores = fuse_boxes([a, b], [[0.9, 0.3], [0.7]], image_hw=(200, 800))
    stretch = np.array([2.5, 1, 2.5, 1])
    wide, wide_scores = fuse_boxes([np.array(a) * stretch, np.array(b) * stretch], [[0.9, 0.3], [0.7]],
                                   image_hw=(200, 2000))
    np.testing.assert_allclose(wide, boxes * stretch, rtol=1e-5)
    np.testing.assert_allclose(wide_scores, scores)
    assert len(boxes) == 2 and scores[0] == pytest.approx(0.8) and scores[1] == pytest.approx(0.15)


def test_boxes_outside_the_image_are_clipped_and_degenerate_ones_dropped():
    boxes, scores = fuse_boxes([[[-20, 10, 50, 120], [60, 60, 60, 90]]], [[0.5, 0.9]], (100, 100),
                               FusionParams(weights=(1,)))
    np.testing.assert_allclose(boxes, [[0, 10, 50, 100]], atol=1e-4)
    np.testing.assert_allclose(scores, [0.5])


def test_nms_after_the_fusion_removes_fused_boxes_that_still_overlap():
    """IoU 0.5 is below WBF's 0.55, so both boxes survive the fusion; NMS at 0.4 keeps the better."""
    one_model = dict(boxes_list=[[[0, 0, 10, 10], [0, 0, 10, 20]]], scores_list=[[0.9, 0.6]], image_hw=(20, 20))
    boxes, scores = fuse_boxes(**one_model, params=FusionParams(weights=(1,), nms_iou_thr=0.4))
    np.testing.assert_allclose(boxes, [[0, 0, 10, 10]], atol=1e-4)
    np.testing.assert_allclose(scores, [0.9])
    _, scores = fuse_boxes(**one_model, params=FusionParams(weights=(1,), nms_iou_thr=None))
    np.testing.assert_allclose(scores, [0.9, 0.6])


def test_max_boxes_keeps_each_models_best_and_skip_box_thr_drops_weak_ones():
    a = [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]
    boxes, scores = fuse_boxes([a], [[0.2, 0.9, 0.5]], (100, 100), FusionParams(weights=(1,), max_boxes=2))
    np.testing.assert_allclose(scores, [0.9, 0.5])
    _, scores = fuse_boxes([a], [[0.2, 0.9, 0.5]], (100, 100), FusionParams(weights=(1,), skip_box_thr=0.3))
    np.testing.assert_allclose(scores, [0.9, 0.5])


def test_no_box_at_all_gives_an_empty_result():
    boxes, scores = fuse_boxes([EMPTY, EMPTY], [[], []], (100, 100))
    assert boxes.shape == (0, 4) and scores.shape == (0,)


def test_fusion_params_round_trip_and_reject_bad_values(tmp_path):
    params = FusionParams(weights=(2, 1), iou_thr=0.4, skip_box_thr=0.01, conf_type="max", nms_iou_thr=None)
    assert FusionParams.load(params.save(tmp_path / "fusion.json")) == params
    with pytest.raises(ValueError, match="conf_type"):
        FusionParams(conf_type="mean")
    with pytest.raises(ValueError, match="unknown fusion parameters"):
        FusionParams.from_dict({"iou": 0.5})
    with pytest.raises(ValueError, match="3 box sets"):
        fuse_boxes([EMPTY] * 3, [[]] * 3, (10, 10))


def _oof(rows: dict[str, tuple[list, list]], images: list[str]) -> OofPredictions:
    parts = [box_rows(i, 0, boxes, scores) for i, (boxes, scores) in rows.items()]
    return OofPredictions.from_parts(parts, pd.DataFrame({"image_id": images, "fold": 0}))


def test_fuse_oof_uses_the_images_both_models_evaluated_in_original_pixels():
    a = _oof({"i1": ([[10, 20, 50, 60]], [0.8]), "i2": ([[0, 0, 5, 5]], [0.3])}, ["i1", "i2", "i3"])
    b = _oof({"i1": ([[10, 20, 50, 60]], [0.6]), "i4": ([[1, 1, 2, 2]], [0.9])}, ["i1", "i2", "i4"])
    fused = fuse_oof([a, b], {"i1": (100, 80), "i2": (10, 10), "i3": (5, 5), "i4": (5, 5)})
    assert sorted(fused.images["image_id"]) == ["i1", "i2"]
    rows = fused.boxes.set_index("image_id")
    np.testing.assert_allclose(rows.loc["i1", ["x1", "y1", "x2", "y2"]].to_numpy(float), [10, 20, 50, 60], atol=1e-3)
    assert rows.loc["i1", "score"] == pytest.approx(0.7)
    assert rows.loc["i2", "score"] == pytest.approx(0.15)
    with pytest.raises(KeyError, match="no original size"):
        fuse_oof([a, b], {"i1": (100, 80)})


def test_grid_search_finds_the_iou_threshold_that_merges_two_half_right_boxes():
    """Each model's box has IoU 0.48 with the truth (a miss); their mean is the truth (a hit),
    but the two boxes overlap only 0.18, so they merge at iou_thr 0.1 and not at 0.55."""
    truth = {"i": np.array([[35, 0, 135, 100]])}
    a = _oof({"i": ([[0, 0, 100, 100]], [0.9])}, ["i"])
    b = _oof({"i": ([[70, 0, 170, 100]], [0.9])}, ["i"])
    sizes = {"i": (100, 200)}
    best, table = grid_search([a, b], sizes, truth, {"iou_thr": [0.55, 0.1], "skip_box_thr": [0.0, 0.5]})
    assert best == FusionParams(iou_thr=0.1)
    assert len(table) == 4 and table["ap50"].iloc[0] == pytest.approx(1.0)
    assert opacity_ap(fuse_oof([a, b], sizes, best), truth) == pytest.approx(1.0)
    assert opacity_ap(fuse_oof([a, b], sizes), truth) == 0.0
    assert ap_table({"a": a, "b": b}, truth)["ap50"].tolist() == [0.0, 0.0]


def test_parameters_tuned_out_of_fold_are_chosen_on_the_other_folds():
    """Fold 0's image needs the two boxes merged (iou_thr 0.1, as above); fold 1's image has two true
    opacities overlapping by IoU 0.18, one found by each model, which must stay apart (0.55). Tuned on
    all images 0.55 wins (two hits against one); out of fold each fold gets the other's choice."""
    half_right = ([[0, 0, 100, 100]], [0.9]), ([[70, 0, 170, 100]], [0.9])
    truth = {"i": np.array([[35, 0, 135, 100]]), "j": np.array([[0, 0, 100, 100], [70, 0, 170, 100]])}
    images = pd.DataFrame({"image_id": ["i", "j"], "fold": [0, 1]})
    a, b = (OofPredictions.from_parts([box_rows(i, f, *half_right[m]) for i, f in zip(images["image_id"], images["fold"])],
                                      images) for m in (0, 1))
    grid = {"iou_thr": [0.55, 0.1]}
    fusions = grid_fusions([a, b], {"i": (100, 200), "j": (100, 200)}, grid)
    best, table = best_fusion(fusions, truth, grid)
    assert best == FusionParams(iou_thr=0.55) and table["ap50"].iloc[0] > 0
    honest, chosen = tuned_out_of_fold(fusions, truth)
    assert chosen == {0: FusionParams(iou_thr=0.55), 1: FusionParams(iou_thr=0.1)}
    assert sorted(honest.images["image_id"]) == ["i", "j"]
    assert opacity_ap(honest, truth) == 0.0
    with pytest.raises(ValueError, match="two folds"):
        tuned_out_of_fold(grid_fusions([_oof({}, ["i"]), _oof({}, ["i"])], {"i": (100, 200)}, grid), truth)


def test_a_score_tuned_per_fold_is_the_mean_of_its_folds_aps():
    """Fold 0's boxes score on a lower scale than fold 1's (fused with other weights): each fold ranks its hit
    first (AP 1 each), but over both folds fold 1's false box outranks fold 0's hit. A fold without a true
    box has no AP and is left out of the mean."""
    images = pd.DataFrame({"image_id": ["i", "j", "k"], "fold": [0, 1, 2]})
    truth = {"i": np.array([[0, 0, 10, 10]]), "j": np.array([[0, 0, 10, 10]]), "k": EMPTY}
    oof = OofPredictions.from_parts([box_rows("i", 0, [[0, 0, 10, 10]], [0.1]),
                                     box_rows("j", 1, [[0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.5]),
                                     box_rows("k", 2, [[0, 0, 10, 10]], [0.05])], images)
    assert opacity_ap(oof, truth) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert fold_mean_ap(oof, truth) == pytest.approx(1.0)
    table = ap_table({"tuned per fold": oof}, truth)
    assert table.loc["tuned per fold", "ap50_fold_mean"] == pytest.approx(1.0)


def test_precision_recall_points_by_descending_score():
    truth = {"i": np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), "j": EMPTY}
    oof = _oof({"i": ([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.7]), "j": ([[0, 0, 10, 10]], [0.8])}, ["i", "j"])
    recall, precision = precision_recall(oof, truth)
    np.testing.assert_allclose(recall, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(precision, [1.0, 0.5, 2 / 3])


def test_operating_point_is_the_best_f1_threshold():
    truth = {"i": np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), "j": EMPTY}
    # by score: hit (0.9), false (0.8), hit (0.7), false (0.3): F1 0.67, 0.5, 0.8, 0.67
    oof = _oof({"i": ([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], [0.9, 0.7, 0.3]),
                "j": ([[0, 0, 10, 10]], [0.8])}, ["i", "j"])
    point = operating_point(oof, truth)
    assert point == pytest.approx({"threshold": 0.7, "f1": 0.8, "precision": 2 / 3, "recall": 1.0})
    assert operating_point(_oof({"j": ([[0, 0, 10, 10]], [0.8])}, ["i", "j"]), truth)["f1"] == 0.0


def test_markdown_table():
    frame = pd.DataFrame({"model": ["a", "b"], "ap50": [0.5, 0.25]}).set_index("model")
    assert markdown_table(frame) == "| model | ap50 |\n|---|---|\n| a | 0.5000 |\n| b | 0.2500 |\n"


# --------------------------------------------------------------------------- notebook 05


def _tiny_05_inputs(input_dir, run_dir) -> None:
    """Four positive images: each detector finds two of them (score 0.6), the other detector the other two,
    and each has one false positive (0.3) on a different negative image; YOLO evaluated an image 03 did not.

    Single models: two hits, then the false positive: AP = 0.5 each. Fused with the smoke profile's ``max``
    confidence and equal weights (a box one model alone found keeps its score): the four hits at 0.6, then the
    two false positives at 0.3: AP = 1.0.
    """
    truth = {f"p{k}": [[100, 50, 200, 150]] for k in range(4)} | {"n0": [], "n1": []}
    competition = input_dir / "siim-covid19-detection"
    competition.mkdir(parents=True)
    pd.DataFrame({"id": [f"{i}_image" for i in truth], "boxes": [format_boxes_column(b) for b in truth.values()],
                  "label": [label_from_boxes(b) for b in truth.values()],
                  "StudyInstanceUID": [f"s{i}" for i in truth]}).to_csv(competition / "train_image_level.csv",
                                                                         index=False)
    ids = [*truth, "extra"]
    (run_dir / "prepared").mkdir(parents=True)
    pd.DataFrame({"image_id": ids, "split": "train", "orig_height": 300, "orig_width": 400,
                  "status": "ok"}).to_csv(run_dir / "prepared" / "meta.csv", index=False)
    hit = ([[100, 50, 200, 150]], [0.6])
    write_oof(run_dir / "03_train_siim_fasterrcnn" / "oof.csv",
              _oof({"p0": hit, "p1": hit, "n0": ([[10, 10, 60, 60]], [0.3])}, list(truth)))
    write_oof(run_dir / "04_train_siim_yolo" / "oof.csv",
              _oof({"p2": hit, "p3": hit, "n1": ([[300, 200, 390, 290]], [0.3]), "extra": ([[0, 0, 9, 9]], [0.99])},
                   ids))


@pytest.mark.slow
def test_notebook_05_in_the_smoke_profile(tmp_path):
    from covidkit.pipeline import run_pipeline

    input_dir, run_dir = tmp_path / "input", tmp_path / "run"
    _tiny_05_inputs(input_dir, run_dir)
    runs = run_pipeline("smoke", input_dir=input_dir, run_dir=run_dir, only=["05"])
    assert [r.name for r in runs] == ["05_ensemble_wbf"]

    out = run_dir / "05_ensemble_wbf"
    table = pd.read_csv(out / "ap_table.csv").set_index("model")
    # one fold: the prior-box detector has no other fold to take its boxes from, so it predicts none
    assert table["ap50"].to_dict() == pytest.approx({"Faster R-CNN": 0.5, "YOLO": 0.5, "WBF ensemble": 1.0,
                                                     "prior boxes": 0.0})
    assert (table["images"] == 6).all()
    assert "| WBF ensemble | 6 |" in (out / "ap_table.md").read_text()
    params = FusionParams.load(out / "fusion.json")
    section = load_profile("smoke")["05_ensemble_wbf"]
    grid = section["grid"]
    assert params.iou_thr in grid.get("iou_thr", [section["iou_thr"]])
    assert json.loads((out / "fusion.json").read_text())["weights"] == [1, 1]
    # every combination of the profile's grid is scored
    assert len(pd.read_csv(out / "grid.csv")) == math.prod(len(values) for values in grid.values()) > 1
    fused = read_oof(out / "oof.csv")
    assert sorted(fused.images["image_id"]) == sorted(["p0", "p1", "p2", "p3", "n0", "n1"])
    # the fused hits score 0.6, the false boxes 0.3: the best F1 shows the hits only
    assert json.loads((out / "operating_point.json").read_text()) == pytest.approx(
        {"threshold": 0.6, "f1": 1.0, "precision": 1.0, "recall": 1.0})
    assert (out / "pr_curves.png").stat().st_size > 0
