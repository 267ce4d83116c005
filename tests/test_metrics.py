"""The competition metric against cases computed by hand."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from covidkit import cli
from covidkit.boxes import format_boxes_column, label_from_boxes
from covidkit.data.siim import STUDY_CLASSES, STUDY_COLUMNS, read_image_labels, read_study_labels
from covidkit.metrics import (
    average_precision,
    box_iou,
    format_scores,
    match_detections,
    score_files,
    score_submission,
    voc_ap,
)

BOX = [0, 0, 10, 10]


# --------------------------------------------------------------------------- IoU and AP


def test_box_iou_pairs():
    iou = box_iou([[0, 0, 10, 10], [0, 0, 1, 1]], [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 1, 1]])
    expected = [[1, 50 / 150, 0, 1 / 100], [1 / 100, 0, 0, 1]]
    np.testing.assert_allclose(iou, expected)


def test_box_iou_degenerate_and_empty():
    assert box_iou([[0, 0, 0, 0]], [[0, 0, 0, 0]]).tolist() == [[0.0]]
    assert box_iou(np.zeros((0, 4)), [BOX]).shape == (0, 1)


def test_voc_ap_uses_the_interpolated_envelope():
    # TP FP FP TP TP, 4 ground-truth boxes: precision 1 .5 .33 .5 .6 at recall .25 .25 .25 .5 .75.
    # Envelope: 1 on (0, .25], .6 on (.25, .75], nothing beyond: .25 + .25*.6 + .25*.6 = .55
    # (the step-wise, non-interpolated sum would give .525).
    assert voc_ap(np.array([1, 0, 0, 1, 1], bool), 4) == pytest.approx(0.55)


def test_voc_ap_edge_cases():
    assert voc_ap(np.array([], bool), 3) == 0.0
    assert voc_ap(np.array([0, 0], bool), 1) == 0.0
    with pytest.raises(ValueError, match="without ground truth"):
        voc_ap(np.array([1], bool), 0)


def test_average_precision_perfect_and_missed():
    gt = {"a": [BOX], "b": [[20, 20, 40, 40], [50, 50, 60, 60]]}
    perfect = [("a", 0.9, *BOX), ("b", 0.8, 20, 20, 40, 40), ("b", 0.7, 50, 50, 60, 60)]
    assert average_precision(gt, perfect) == 1.0
    # the last box never found: recall stops at 2/3 with precision 1
    assert average_precision(gt, perfect[:2]) == pytest.approx(2 / 3)


def test_duplicate_detection_is_a_false_positive():
    gt = {"a": [[0, 0, 10, 10], [20, 20, 30, 30]]}
    preds = [("a", 0.9, 0, 0, 10, 10), ("a", 0.8, 0, 0, 10, 10), ("a", 0.7, 20, 20, 30, 30)]
    # TP FP TP: precision 1 .5 .67 at recall .5 .5 1 -> .5*1 + .5*2/3
    assert average_precision(gt, preds) == pytest.approx(0.5 + 1 / 3)


def test_best_gt_already_matched_gives_false_positive_as_in_voc():
    gt = {"a": [[0, 0, 10, 10], [0, 0, 10, 12]]}
    # second detection: IoU .952 with the matched first box, .875 with the free second box
    preds = [("a", 0.9, 0, 0, 10, 10), ("a", 0.8, 0, 0, 10, 10.5)]
    tp = match_detections({k: np.array(v, float) for k, v in gt.items()},
                          np.array(["a", "a"], dtype=object), np.array([0.9, 0.8]),
                          np.array([p[2:] for p in preds], float))
    assert tp.tolist() == [True, False]
    assert average_precision(gt, preds) == pytest.approx(0.5)


def test_iou_must_exceed_one_half():
    gt = {"a": [BOX]}
    assert average_precision(gt, [("a", 0.9, 0, 0, 10, 5)]) == 0.0  # IoU exactly .5
    assert average_precision(gt, [("a", 0.9, 0, 0, 10, 5.1)]) == 1.0  # IoU .51


def test_detection_matches_only_its_own_row():
    gt = {"a": [BOX], "b": []}
    assert average_precision(gt, [("b", 0.9, *BOX), ("c", 0.8, *BOX)]) == 0.0
    assert average_precision(gt, [("b", 0.9, *BOX), ("a", 0.5, *BOX)]) == pytest.approx(0.5)


def test_ties_keep_submission_order():
    gt = {"a": [BOX], "b": [BOX]}
    wrong_a, right_b = ("a", 0.5, 50, 50, 60, 60), ("b", 0.5, *BOX)
    # FP then TP: precision .5 at recall .5 -> .25; TP then FP: precision 1 at recall .5 -> .5
    assert average_precision(gt, [wrong_a, right_b]) == pytest.approx(0.25)
    assert average_precision(gt, [right_b, wrong_a]) == pytest.approx(0.5)


def test_ties_within_a_row_match_in_submission_order():
    # two tied detections of one box: the first listed takes it
    tp = match_detections({"a": np.array([BOX], float)}, np.array(["a", "a"], dtype=object),
                          np.array([0.5, 0.5]), np.array([[0, 0, 10, 9], BOX], float))
    assert tp.tolist() == [True, False]


def test_average_precision_without_predictions_or_ground_truth():
    assert average_precision({"a": [BOX]}, []) == 0.0
    assert math.isnan(average_precision({"a": np.zeros((0, 4))}, [("a", 0.9, *BOX)]))
    assert math.isnan(average_precision({}, []))


# --------------------------------------------------------------------------- a tiny hand-built set

STUDIES = {"s1": "negative", "s2": "typical", "s3": "typical", "s4": "indeterminate", "s5": "atypical"}
IMAGES = {  # image: (study, opacity boxes)
    "i1": ("s1", []),
    "i2": ("s2", [[10, 10, 50, 50], [60, 60, 100, 100]]),
    "i3": ("s3", [[0, 0, 40, 40]]),
    "i4": ("s4", []),
    "i5": ("s5", [[20, 20, 60, 80]]),
}


def study_string(negative, typical, indeterminate, atypical):
    return " ".join(f"{c} {p} 0 0 1 1" for c, p in zip(STUDY_CLASSES, (negative, typical, indeterminate, atypical)))


# Hand computation, per class (predictions sorted by confidence; n = number of GT boxes):
#   negative      n=1  s1 .6 TP first                                         -> 1
#   typical       n=2  s2 .5 TP, s5 .4 FP, s1 .3 FP, s4 .3 FP, s3 .2 TP        -> .5*1 + .5*.4 = .7
#   indeterminate n=1  s3 .6 FP, s4 .3 TP                                      -> .5
#   atypical      n=1  s2 .3 FP, s5 .15 TP                                     -> .5
#   none          n=2  i1 .9 TP, i3 .5 FP, i4 .4 TP, i2 .1 FP, i5 .05 FP       -> .5 + .5*2/3
#   opacity       n=4  i5 .9 TP, i2 .8 TP, i2 .7 FP (duplicate), i3 .6 FP (IoU .14),
#                      i2 .3 TP, i1 .2 FP -> envelope 1, 1, .6 on recall steps of .25 -> .65
SUBMISSION = {
    "s1_study": study_string(0.6, 0.3, 0.05, 0.05),
    "s2_study": study_string(0.1, 0.5, 0.1, 0.3),
    "s3_study": study_string(0.1, 0.2, 0.6, 0.1),
    "s4_study": study_string(0.3, 0.3, 0.3, 0.1),
    "s5_study": study_string(0.1, 0.4, 0.1, 0.15),
    "i1_image": "none 0.9 0 0 1 1 opacity 0.2 10 10 30 30",
    "i2_image": "opacity 0.8 12 12 50 50 opacity 0.7 12 12 50 50 opacity 0.3 60 60 100 100 none 0.1 0 0 1 1",
    "i3_image": "opacity 0.6 20 20 60 60 none 0.5 0 0 1 1",
    "i4_image": "none 0.4 0 0 1 1",
    "i5_image": "opacity 0.9 20 20 60 80 none 0.05 0 0 1 1",
}
EXPECTED = {
    "negative": 1.0, "typical": 0.7, "indeterminate": 0.5, "atypical": 0.5,
    "none": 0.5 + 1 / 3, "opacity": 0.65,
}


def image_labels_frame(images=IMAGES):
    return pd.DataFrame({
        "id": [f"{i}_image" for i in images],
        "boxes": [format_boxes_column(b) for _, b in images.values()],
        "label": [label_from_boxes(b) for _, b in images.values()],
        "StudyInstanceUID": [s for s, _ in images.values()],
    })


def study_labels_frame(studies=STUDIES):
    rows = [[f"{s}_study", *(int(label == c) for c in STUDY_CLASSES)] for s, label in studies.items()]
    return pd.DataFrame(rows, columns=["id", *STUDY_COLUMNS])


def submission_frame(rows=SUBMISSION):
    return pd.DataFrame({"id": list(rows), "PredictionString": list(rows.values())})


@pytest.fixture
def csvs(tmp_path):
    paths = {name: tmp_path / f"{name}.csv" for name in ("image", "study", "sub")}
    image_labels_frame().to_csv(paths["image"], index=False)
    study_labels_frame().to_csv(paths["study"], index=False)
    submission_frame().to_csv(paths["sub"], index=False)
    return paths


def test_six_class_mean_by_hand(csvs):
    scores = score_files(csvs["image"], csvs["study"], csvs["sub"])
    for c, ap in EXPECTED.items():
        assert scores[c] == pytest.approx(ap), c
    assert scores["mAP"] == pytest.approx(sum(EXPECTED.values()) / 6)
    assert scores["study_mAP"] == pytest.approx((1 + 0.7 + 0.5 + 0.5) / 4)
    assert scores["image_mAP"] == pytest.approx((0.5 + 1 / 3 + 0.65) / 2)
    assert scores["n_gt"] == {"negative": 1, "typical": 2, "indeterminate": 1, "atypical": 1, "none": 2, "opacity": 4}
    assert scores["n_pred"] == {"negative": 5, "typical": 5, "indeterminate": 5, "atypical": 5, "none": 5, "opacity": 6}


def test_score_cli_table(csvs, capsys):
    code = cli.main(["score", "--image-level", str(csvs["image"]), "--study-level", str(csvs["study"]),
                     "--submission", str(csvs["sub"])])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"^typical\s+0\.7000\s+2\s+5$", out, re.M)
    assert re.search(r"^opacity\s+0\.6500\s+4\s+6$", out, re.M)
    assert re.search(rf"^mAP\s+{sum(EXPECTED.values()) / 6:.4f}$", out, re.M)


def test_score_cli_json(csvs, capsys):
    code = cli.main(["score", "--image-level", str(csvs["image"]), "--study-level", str(csvs["study"]),
                     "--submission", str(csvs["sub"]), "--json"])
    scores = json.loads(capsys.readouterr().out)
    assert code == 0
    assert scores["mAP"] == pytest.approx(sum(EXPECTED.values()) / 6)
    assert scores["none"] == pytest.approx(EXPECTED["none"])


def perfect_submission():
    rows = {f"{s}_study": f"{label} 1 0 0 1 1" for s, label in STUDIES.items()}
    for i, (_, boxes) in IMAGES.items():
        rows[f"{i}_image"] = label_from_boxes(boxes)
    return submission_frame(rows)


def labels(tmp_path, images=IMAGES, studies=STUDIES):
    """The label frames, through the CSV readers the scorer uses."""
    image_labels_frame(images).to_csv(tmp_path / "image.csv", index=False)
    study_labels_frame(studies).to_csv(tmp_path / "study.csv", index=False)
    return read_image_labels(tmp_path / "image.csv"), read_study_labels(tmp_path / "study.csv")


def test_perfect_submission_scores_one(tmp_path):
    scores = score_submission(*labels(tmp_path), perfect_submission())
    assert scores["mAP"] == 1.0
    assert all(scores[c] == 1.0 for c in EXPECTED)


def test_class_prior_submission(tmp_path):
    # Every row gets the same confidence for a class, so ties are broken by row order (i1..i5, s1..s5):
    #   negative s1 first TP -> 1; typical FP TP TP -> .5*2/3 + .5*2/3 = 2/3;
    #   indeterminate TP 4th -> 1/4; atypical TP 5th -> 1/5;
    #   none i1 TP, i2 FP, i3 FP, i4 TP -> .5*1 + .5*.5 = .75; opacity: no prediction -> 0
    prior = {"negative": 0.2, "typical": 0.4, "indeterminate": 0.2, "atypical": 0.2}
    rows = {f"{i}_image": "none 0.4 0 0 1 1" for i in IMAGES}
    rows |= {f"{s}_study": study_string(*prior.values()) for s in STUDIES}
    scores = score_submission(*labels(tmp_path), submission_frame(rows))
    expected = {"negative": 1, "typical": 2 / 3, "indeterminate": 1 / 4, "atypical": 1 / 5, "none": 0.75, "opacity": 0}
    for c, ap in expected.items():
        assert scores[c] == pytest.approx(ap), c
    assert scores["mAP"] == pytest.approx(sum(expected.values()) / 6)


def test_missing_row_adds_only_false_negatives(tmp_path):
    rows = dict(SUBMISSION)
    del rows["i5_image"]
    scores = score_submission(*labels(tmp_path), submission_frame(rows))
    # opacity: i2 .8 TP, i2 .7 FP, i3 .6 FP, i2 .3 TP, i1 .2 FP with 4 GT -> .25*1 + .25*.5
    assert scores["opacity"] == pytest.approx(0.375)
    assert scores["none"] == pytest.approx(EXPECTED["none"])
    assert scores["n_gt"]["opacity"] == 4


def test_empty_prediction_string_predicts_nothing(csvs):
    submission_frame(dict(SUBMISSION, i3_image="")).to_csv(csvs["sub"], index=False)
    scores = score_files(csvs["image"], csvs["study"], csvs["sub"])
    # opacity: TP TP FP TP FP with 4 GT -> envelope 1, 1, .75 -> .6875; none loses the i3 FP -> 1
    assert scores["opacity"] == pytest.approx(0.6875)
    assert scores["none"] == pytest.approx(1.0)


def test_class_without_ground_truth_is_left_out(tmp_path):
    studies = {s: ("typical" if label == "atypical" else label) for s, label in STUDIES.items()}
    with pytest.warns(UserWarning, match="'atypical' has no ground truth"):
        scores = score_submission(*labels(tmp_path, studies=studies), perfect_submission())
    assert scores["atypical"] is None
    assert scores["n_gt"]["atypical"] == 0
    # s5 now typical but predicted atypical: typical misses s5 -> recall 2/3 at precision 1
    assert scores["typical"] == pytest.approx(2 / 3)
    assert scores["mAP"] == pytest.approx((1 + 2 / 3 + 1 + 1 + 1) / 5)
    assert "left out of the means: atypical" in format_scores(scores)


def test_unknown_row_is_an_error(tmp_path):
    rows = dict(SUBMISSION, other_image="none 1 0 0 1 1")
    with pytest.raises(ValueError, match=r"1 ids are not in the labels, e\.g\. \['other_image'\]"):
        score_submission(*labels(tmp_path), submission_frame(rows))


def test_unknown_class_and_malformed_string_are_errors(tmp_path):
    image_labels, study_labels = labels(tmp_path)
    with pytest.raises(ValueError, match="i1_image: unknown class 'pneumonia'"):
        score_submission(image_labels, study_labels, submission_frame(dict(SUBMISSION, i1_image="pneumonia 1 0 0 1 1")))
    with pytest.raises(ValueError, match="i1_image: 5 tokens"):
        score_submission(image_labels, study_labels, submission_frame(dict(SUBMISSION, i1_image="none 1 0 0 1")))


def test_duplicate_submission_rows_are_an_error(tmp_path):
    sub = pd.concat([submission_frame(), submission_frame().iloc[:1]])
    with pytest.raises(ValueError, match="appear more than once"):
        score_submission(*labels(tmp_path), sub)
