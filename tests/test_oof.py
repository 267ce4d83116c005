"""The out-of-fold prediction format: round trip, checks, and the opacity AP computed from it."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from covidkit.oof import (
    BOX_COLUMNS,
    OofPredictions,
    box_rows,
    images_path,
    opacity_ap,
    per_fold_ap,
    read_oof,
    write_oof,
)


def _example() -> OofPredictions:
    parts = [
        box_rows("img_a", 0, [[10.5, 20.25, 110.0, 220.0], [300, 300, 400, 380]], [0.9, 0.25]),
        box_rows("img_b", 1, np.zeros((0, 4)), []),
        box_rows("img_c", 1, [[1, 2, 3, 4]], [0.125]),
    ]
    images = pd.DataFrame({"image_id": ["img_a", "img_b", "img_c", "img_d"], "fold": [0, 1, 1, 0]})
    return OofPredictions.from_parts(parts, images)


def test_round_trip_keeps_every_value(tmp_path):
    oof = _example()
    boxes_csv, images_csv = write_oof(tmp_path / "model" / "oof.csv", oof)
    assert images_csv == tmp_path / "model" / "oof_images.csv"
    assert boxes_csv.read_text().splitlines()[0] == ",".join(BOX_COLUMNS)
    back = read_oof(boxes_csv)
    pd.testing.assert_frame_equal(back.boxes, oof.boxes)
    pd.testing.assert_frame_equal(back.images, oof.images)
    assert len(back.boxes) == 3 and set(back.images["image_id"]) == {"img_a", "img_b", "img_c", "img_d"}


def test_numeric_looking_ids_stay_strings(tmp_path):
    oof = OofPredictions.from_parts([box_rows("000123", 2, [[0, 0, 5, 5]], [0.5])],
                                    pd.DataFrame({"image_id": ["000123"], "fold": [2]}))
    back = read_oof(write_oof(tmp_path / "oof.csv", oof)[0])
    assert back.boxes["image_id"].tolist() == ["000123"]
    assert back.images["image_id"].tolist() == ["000123"]


def test_images_path_names_the_companion(tmp_path):
    assert images_path(tmp_path / "oof_yolo.csv") == tmp_path / "oof_yolo_images.csv"


def test_missing_companion_is_a_clear_error(tmp_path):
    _example().boxes.to_csv(tmp_path / "oof.csv", index=False)
    with pytest.raises(FileNotFoundError, match="oof_images.csv"):
        read_oof(tmp_path / "oof.csv")


def test_inconsistent_inputs_are_rejected():
    with pytest.raises(ValueError, match="2 boxes but 1 scores"):
        box_rows("x", 0, [[0, 0, 1, 1], [0, 0, 2, 2]], [0.5])
    with pytest.raises(ValueError, match="not in the evaluated images"):
        OofPredictions.from_parts([box_rows("x", 0, [[0, 0, 1, 1]], [0.5])],
                                  pd.DataFrame({"image_id": ["y"], "fold": [0]}))
    with pytest.raises(ValueError, match="evaluated twice"):
        OofPredictions.from_parts([], pd.DataFrame({"image_id": ["y", "y"], "fold": [0, 1]}))
    with pytest.raises(ValueError, match="missing columns"):
        OofPredictions(pd.DataFrame({"image_id": ["x"]}), pd.DataFrame({"image_id": ["x"], "fold": [0]}))


def test_opacity_ap_counts_ground_truth_of_images_without_predictions():
    truth = {"img_a": np.array([[10, 20, 110, 220]]), "img_b": np.zeros((0, 4)),
             "img_c": np.zeros((0, 4)), "img_d": np.array([[0, 0, 50, 50]])}
    oof = _example()
    # img_a's 0.9 box hits, the 0.25 box and img_c's box are false positives; img_d's box is never
    # found (it has no prediction row): precision 1 up to recall 1/2, so AP = 0.5.
    assert opacity_ap(oof, truth) == pytest.approx(0.5)
    folds = per_fold_ap(oof, truth)
    assert folds[0] == pytest.approx(0.5)  # img_a found, img_d missed
    assert math.isnan(folds[1])  # fold 1 has no ground-truth box


def test_concat_joins_folds_and_refuses_overlap():
    oof = _example()
    fold0 = OofPredictions(oof.boxes[oof.boxes["fold"] == 0], oof.images[oof.images["fold"] == 0])
    fold1 = OofPredictions(oof.boxes[oof.boxes["fold"] == 1], oof.images[oof.images["fold"] == 1])
    joined = OofPredictions.concat([fold0, fold1])
    assert sorted(joined.predictions()) == sorted(oof.predictions())
    with pytest.raises(ValueError, match="evaluated twice"):
        OofPredictions.concat([fold0, fold0])


def test_ap_needs_ground_truth_for_every_evaluated_image():
    with pytest.raises(KeyError, match="no ground truth"):
        opacity_ap(_example(), {"img_a": np.zeros((0, 4))})
