"""Trivial baselines (covidkit.baselines): the prior-box detector and the box-count study rule, on hand-made data."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from covidkit.baselines import (
    PRIOR_SCORE, box_count_rule, mean_zone_boxes, prior_box_oof, study_box_counts,
)
from covidkit.oof import opacity_ap
from covidkit.study_scores import study_aps

LEFT, RIGHT = [0.1, 0.2, 0.4, 0.7], [0.6, 0.25, 0.9, 0.75]  # normalised boxes, centre x 0.25 and 0.75


def _table(boxes_per_image: list[list[list[float]]], sizes: list[tuple[int, int]], folds: list[int]) -> pd.DataFrame:
    """A prepared table: boxes given normalised, stored in original pixels."""
    rows = []
    for k, (boxes, (h, w), fold) in enumerate(zip(boxes_per_image, sizes, folds)):
        pixels = np.array(boxes, dtype=float).reshape(-1, 4) * [w, h, w, h]
        rows.append({"image_id": f"i{k}", "fold": fold, "model_fold": fold, "orig_height": h, "orig_width": w,
                     "boxes": pixels})
    return pd.DataFrame(rows)


def test_zone_means_are_the_mean_normalised_box_of_each_half():
    table = _table([[LEFT, RIGHT], [[0.2, 0.3, 0.4, 0.5]], []], [(100, 200), (50, 80), (10, 10)], [0, 1, 2])
    means = mean_zone_boxes(table)
    np.testing.assert_allclose(means[0], [(0.1 + 0.2) / 2, (0.2 + 0.3) / 2, 0.4, (0.7 + 0.5) / 2])
    np.testing.assert_allclose(means[1], RIGHT)
    assert np.isnan(mean_zone_boxes(table.iloc[[1]])[1]).all()  # no right box: no right prior


def test_prior_boxes_on_images_whose_boxes_sit_at_the_mean_get_ap_one():
    sizes = [(1000, 800), (600, 600), (512, 700), (900, 1200)]
    table = _table([[LEFT, RIGHT]] * 4, sizes, [0, 0, 1, 1])
    oof = prior_box_oof(table, by="model_fold")
    truth = dict(zip(table["image_id"], table["boxes"]))
    assert len(oof.boxes) == 8 and (oof.boxes["score"] == PRIOR_SCORE).all()
    assert oof.images["fold"].tolist() == [0, 0, 1, 1]
    assert opacity_ap(oof, truth) == pytest.approx(1.0)
    # scaled to each image's size: image i2's right box in its own pixels
    right = oof.boxes[oof.boxes["image_id"] == "i2"].iloc[1][["x1", "y1", "x2", "y2"]].to_numpy(float)
    np.testing.assert_allclose(right, np.array(RIGHT) * [700, 512, 700, 512])


def test_prior_boxes_come_from_the_other_folds_only():
    """Fold 0's boxes sit far from fold 1's: the held-out images get the other fold's mean and miss."""
    far_left = [0.0, 0.0, 0.1, 0.1]
    table = _table([[LEFT], [LEFT], [far_left], [far_left]], [(100, 100)] * 4, [0, 0, 1, 1])
    oof = prior_box_oof(table, by="model_fold")
    truth = dict(zip(table["image_id"], table["boxes"]))
    assert opacity_ap(oof, truth) == 0.0
    np.testing.assert_allclose(oof.boxes[oof.boxes["image_id"] == "i0"][["x1", "y1", "x2", "y2"]].to_numpy(float),
                               [np.array(far_left) * 100])
    only = prior_box_oof(table, by="model_fold", image_ids=["i3"])  # the held-out images asked for, priors from all
    assert only.images["image_id"].tolist() == ["i3"] and len(only.boxes) == 1


def _studies():
    """Six single-image studies in two folds; fold 0: counts 0, 1, 2 labelled negative, atypical, typical."""
    images = pd.DataFrame({
        "image_id": [f"i{k}" for k in range(6)], "study_id": [f"s{k}" for k in range(6)],
        "fold": [0, 0, 0, 1, 1, 1], "model_fold": [0, 0, 0, 1, 1, 1],
        "label": ["negative", "atypical", "typical", "negative", "typical", "typical"]})
    # boxes above 0.5: i0 none (one below), i1 one, i2 three (capped at 2), i3 none, i4 one, i5 two
    boxes = pd.DataFrame({"image_id": ["i0", "i1", "i2", "i2", "i2", "i4", "i5", "i5"],
                          "score": [0.4, 0.9, 0.6, 0.7, 0.8, 0.5, 0.9, 0.9]})
    return images, boxes


def test_box_counts_per_study_are_capped_and_thresholded():
    images, boxes = _studies()
    assert study_box_counts(images, boxes, 0.5).to_dict() == {"s0": 0, "s1": 1, "s2": 2, "s3": 0, "s4": 1, "s5": 2}
    # a study of two images counts its busiest image
    two = images.assign(study_id=["s0", "s0", "s2", "s3", "s4", "s5"])
    assert study_box_counts(two, boxes, 0.5)["s0"] == 1


def test_the_count_rule_scores_each_fold_with_the_other_folds_frequencies():
    images, boxes = _studies()
    studies = box_count_rule(images, boxes, 0.5).set_index("study_id")
    p = studies[["p_negative", "p_typical", "p_indeterminate", "p_atypical"]]
    # fold 1 scored with fold 0: count 0 -> negative, 1 -> atypical, 2 -> typical
    assert p.loc["s3"].tolist() == [1, 0, 0, 0] and p.loc["s4"].tolist() == [0, 0, 0, 1]
    assert p.loc["s5"].tolist() == [0, 1, 0, 0]
    # fold 0 scored with fold 1: count 0 -> negative, 1 -> typical, 2 -> typical
    assert p.loc["s0"].tolist() == [1, 0, 0, 0] and p.loc["s1"].tolist() == [0, 1, 0, 0]
    assert studies.loc["s2", "count"] == 2 and studies.loc["s2", "label"] == "typical"
    aps = study_aps(studies.reset_index())
    assert aps["negative"] == 1.0 and 0 < aps["typical"] < 1  # s1 (atypical) ties with the three typical


def test_a_count_no_training_study_has_falls_back_to_the_class_frequencies():
    images, boxes = _studies()
    images = images.assign(fold=[0, 0, 0, 0, 0, 1])  # fold 1: s5 only (count 2); fold 0's studies see no count 1
    studies = box_count_rule(images, boxes, 0.5).set_index("study_id")
    assert studies.loc["s1", ["p_negative", "p_typical", "p_indeterminate", "p_atypical"]].tolist() == [0, 1, 0, 0]
    # s5 (count 2) scored with fold 0's count-2 study (s2, typical)
    assert studies.loc["s5", "p_typical"] == 1.0
    # fold 0's count 0 studies: none in fold 1 -> fold 1's class frequencies (typical)
    assert studies.loc["s0", "p_typical"] == 1.0


def test_06_scores_the_count_rule_at_the_fused_boxes_best_f1_threshold():
    """Hits at 0.9, a false box at 0.2 on each negative image: the operating point is 0.9, so the counts are the
    true ones (0, 1, 2), which tell the labels apart here: every present class has AP 1."""
    from covidkit.oof import OofPredictions, box_rows
    from covidkit.stages.study_level import count_rule_summary

    box = [10, 10, 50, 50]
    truth = {"i0": [], "i1": [box], "i2": [box, [60, 10, 100, 50]], "i3": [], "i4": [box], "i5": [box, [60, 60, 90, 90]]}
    truth = {i: np.array(b, dtype=float).reshape(-1, 4) for i, b in truth.items()}
    images = pd.DataFrame({"image_id": list(truth), "study_id": [f"s{k}" for k in range(6)], "fold": [0, 0, 0, 1, 1, 1],
                           "model_fold": [0, 0, 0, 1, 1, 1],
                           "label": ["negative", "atypical", "typical"] * 2})
    parts = [box_rows(i, f, b, np.full(len(b), 0.9)) for i, f, b in zip(images["image_id"], images["fold"], truth.values())]
    parts += [box_rows(i, f, [[0, 0, 5, 5]], [0.2]) for i, f in (("i0", 0), ("i3", 1))]
    boxes = OofPredictions.from_parts(parts, images[["image_id", "fold"]])
    summary = count_rule_summary(images, boxes, truth)
    assert summary["threshold"] == 0.9 and summary["studies"] == 6
    assert summary["negative"] == summary["typical"] == summary["atypical"] == summary["mAP"] == 1.0
    assert np.isnan(summary["indeterminate"])  # no indeterminate study


def test_05_prior_boxes_take_each_folds_boxes_from_the_other_folds():
    from covidkit.stages.ensemble_wbf import prior_boxes

    truth = {"a": np.array([[10.0, 10, 40, 40]]), "b": np.array([[20.0, 20, 60, 60]]), "c": np.zeros((0, 4))}
    sizes = {"a": (100, 100), "b": (200, 200), "c": (100, 50)}
    oof = prior_boxes(pd.DataFrame({"image_id": ["a", "b", "c"], "fold": [0, 1, 1]}), truth, sizes)
    rows = oof.boxes.set_index("image_id")[["x1", "y1", "x2", "y2"]]
    np.testing.assert_allclose(rows.loc["a"], [10, 10, 30, 30])  # b's box, normalised, at a's size
    np.testing.assert_allclose(rows.loc[["b"]], [[20, 20, 80, 80]])  # a's box at b's size
    np.testing.assert_allclose(rows.loc[["c"]], [[5, 10, 20, 40]])  # a's box at c's 100 x 50
    assert opacity_ap(oof, truth) == 0.0  # neither overlaps its image's box by IoU > 0.5
