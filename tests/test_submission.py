"""Writing submissions and checking them against sample_submission.csv."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from covidkit import cli
from covidkit.boxes import parse_prediction_string
from covidkit.submission import (
    ImagePrediction,
    Problem,
    image_prediction_string,
    study_prediction_string,
    submission_frame,
    validate_files,
    validate_submission,
    write_submission,
)

SAMPLE_IDS = ["s1_study", "s2_study", "i1_image", "i2_image"]
VALID_ROWS = [
    ("s1_study", "negative 0.1 0 0 1 1 typical 0.6 0 0 1 1 indeterminate 0.2 0 0 1 1 atypical 0.1 0 0 1 1"),
    ("s2_study", "typical 1 0 0 1 1"),
    ("i1_image", "opacity 0.75 10.5 20 300 400.25 none 0.2 0 0 1 1"),
    ("i2_image", "none 1 0 0 1 1"),
]


# --------------------------------------------------------------------------- writing


def test_image_prediction_string():
    text = image_prediction_string([[10.5, 20, 300, 400.25], [1, 2, 3, 4]], [0.75, 0.5], none_prob=0.2)
    assert text == "opacity 0.75 10.5 20 300 400.25 opacity 0.5 1 2 3 4 none 0.2 0 0 1 1"
    assert image_prediction_string(np.zeros((0, 4)), [], none_prob=0.9) == "none 0.9 0 0 1 1"


def test_image_prediction_string_rejects_bad_input():
    with pytest.raises(ValueError, match="2 boxes but 1 scores"):
        image_prediction_string([[0, 0, 1, 1], [0, 0, 2, 2]], [0.5], none_prob=0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        image_prediction_string([[0, 0, 1, 1]], [1.5], none_prob=0.1)


def test_study_prediction_string_from_mapping_and_sequence():
    expected = "negative 0.1 0 0 1 1 typical 0.6 0 0 1 1 indeterminate 0.2 0 0 1 1 atypical 0.1 0 0 1 1"
    assert study_prediction_string([0.1, 0.6, 0.2, 0.1]) == expected
    assert study_prediction_string({"typical": 0.6, "atypical": 0.1, "negative": 0.1, "indeterminate": 0.2}) == expected


def test_study_prediction_string_rejects_bad_input():
    with pytest.raises(ValueError, match="exactly the classes"):
        study_prediction_string({"negative": 1.0})
    with pytest.raises(ValueError, match="expected 4"):
        study_prediction_string([0.5, 0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        study_prediction_string([0.5, float("nan"), 0, 0])


IMAGES = {
    "i1": ImagePrediction(np.array([[10.5, 20, 300, 400.25]]), np.array([0.75]), 0.2),
    "i2": ImagePrediction(np.zeros((0, 4)), np.zeros(0), 1.0),
}
STUDIES = {"s1": [0.1, 0.6, 0.2, 0.1], "s2": {"negative": 0, "typical": 1, "indeterminate": 0, "atypical": 0}}


def test_write_submission_round_trip(tmp_path):
    path = write_submission(tmp_path / "out" / "submission.csv", IMAGES, STUDIES)
    assert path.read_text().splitlines()[0] == "id,PredictionString"
    frame = pd.read_csv(path)
    assert frame["id"].tolist() == ["s1_study", "s2_study", "i1_image", "i2_image"]
    i1 = parse_prediction_string(frame.set_index("id").loc["i1_image", "PredictionString"])
    assert [tuple(p) for p in i1] == [("opacity", 0.75, 10.5, 20, 300, 400.25), ("none", 0.2, 0, 0, 1, 1)]
    assert [p.name for p in tmp_path.joinpath("out").iterdir()] == ["submission.csv"]  # no temp file left
    reference = tmp_path / "reference.txt"
    reference.write_text("")
    assert path.stat().st_mode == reference.stat().st_mode  # the usual permissions, not a temp file's 0600


def test_written_submission_is_valid(tmp_path):
    sample = tmp_path / "sample.csv"
    pd.DataFrame({"id": SAMPLE_IDS, "PredictionString": "none 1 0 0 1 1"}).to_csv(sample, index=False)
    path = write_submission(tmp_path / "submission.csv", IMAGES, STUDIES, order=SAMPLE_IDS[::-1])
    assert pd.read_csv(path)["id"].tolist() == SAMPLE_IDS[::-1]
    assert validate_files(path, sample) == []


def test_write_submission_checks_order_and_ids(tmp_path):
    with pytest.raises(ValueError, match="1 rows without prediction"):
        submission_frame(IMAGES, STUDIES, order=[*SAMPLE_IDS, "i3_image"])
    with pytest.raises(ValueError, match="1 predictions not in it"):
        submission_frame(IMAGES, STUDIES, order=SAMPLE_IDS[1:])
    with pytest.raises(ValueError, match="without their suffix"):
        submission_frame({"i1_image": IMAGES["i1"]}, {})
    with pytest.raises(ValueError, match="rows without prediction"):
        write_submission(tmp_path / "bad.csv", IMAGES, STUDIES, order=["x_image"])
    assert list(tmp_path.iterdir()) == []  # nothing written on failure


def test_write_submission_replaces_an_old_file(tmp_path):
    path = tmp_path / "submission.csv"
    path.write_text("old")
    write_submission(path, IMAGES, {})
    assert pd.read_csv(path)["id"].tolist() == ["i1_image", "i2_image"]


# --------------------------------------------------------------------------- checking


def write_csv(path, rows, header="id,PredictionString"):
    path.write_text("\n".join([header, *(",".join(r) for r in rows)]) + "\n")
    return path


@pytest.fixture
def sample(tmp_path):
    return write_csv(tmp_path / "sample_submission.csv", [(i, "none 1 0 0 1 1") for i in SAMPLE_IDS])


def problems_of(tmp_path, sample, rows, header="id,PredictionString"):
    return [str(p) for p in validate_files(write_csv(tmp_path / "sub.csv", rows, header), sample)]


def test_problem_prints_as_one_line():
    assert str(Problem(7, "abc_image", "confidence 1.3 not in [0, 1]")) == "line 7 (abc_image): confidence 1.3 not in [0, 1]"
    assert str(Problem(1, None, "bad header")) == "line 1: bad header"
    assert str(Problem(None, "abc_study", "missing from the submission")) == "abc_study: missing from the submission"


def test_valid_file(tmp_path, sample):
    assert problems_of(tmp_path, sample, VALID_ROWS) == []


def test_missing_duplicated_and_unknown_ids(tmp_path, sample):
    rows = [VALID_ROWS[0], VALID_ROWS[2], VALID_ROWS[0], ("x_image", "none 1 0 0 1 1"), VALID_ROWS[3]]
    assert problems_of(tmp_path, sample, rows) == [
        "line 4 (s1_study): duplicate id (first on line 2)",
        "line 5 (x_image): id not in the sample submission",
        "s2_study: missing from the submission",
    ]


def test_wrong_columns(tmp_path, sample):
    rows = [(i, s) for i, s in VALID_ROWS]
    assert problems_of(tmp_path, sample, rows, header="Id,PredictionString") == [
        "line 1: columns are Id,PredictionString; expected exactly id,PredictionString",
    ]
    rows = [(i, s, "x") for i, s in VALID_ROWS]
    assert problems_of(tmp_path, sample, rows, header="id,PredictionString,extra") == [
        "line 1: columns are id,PredictionString,extra; expected exactly id,PredictionString",
    ]


@pytest.mark.parametrize("row_id, text, message", [
    ("i1_image", "opacity 1.3 0 0 10 10", "confidence 1.3 not in [0, 1]"),
    ("i1_image", "opacity -0.1 0 0 10 10", "confidence -0.1 not in [0, 1]"),
    ("i1_image", "opacity nan 0 0 10 10", "confidence nan not in [0, 1]"),
    ("i1_image", "opacity high 0 0 10 10", "confidence 'high' is not a number"),
    ("i1_image", "opacity 0.5 0 0 10", "5 tokens is not a multiple of 6 (class conf x1 y1 x2 y2)"),
    ("i1_image", "opacity 0.5 0 0 ten 10", "box '0 0 ten 10' is not four numbers"),
    ("i1_image", "opacity 0.5 0 0 inf 10", "box 0 0 inf 10 has non-finite coordinates"),
    ("i1_image", "opacity 0.5 10 0 10 10", "box 10 0 10 10: x1 must be < x2"),
    ("i1_image", "opacity 0.5 0 20 10 10", "box 0 20 10 10: y1 must be < y2"),
    ("i1_image", "typical 0.5 0 0 1 1", "unknown class 'typical' for an image row (expected one of none, opacity)"),
    ("s1_study", "opacity 0.5 0 0 1 1",
     "unknown class 'opacity' for a study row (expected one of negative, typical, indeterminate, atypical)"),
    ("s1_study", "negative 0.5 0 0 2 2", "class negative needs the box 0 0 1 1, got 0 0 2 2"),
    ("i1_image", "", "empty PredictionString (each row needs at least one prediction)"),
])
def test_prediction_string_problems(tmp_path, sample, row_id, text, message):
    rows = [(i, text if i == row_id else s) for i, s in VALID_ROWS]
    line = SAMPLE_IDS.index(row_id) + 2
    assert problems_of(tmp_path, sample, rows) == [f"line {line} ({row_id}): {message}"]


def test_problems_name_their_group(tmp_path, sample):
    rows = [(i, "none 1 0 0 1 1 opacity 2 0 0 1 1 opacity 0.5 5 5 1 1" if i == "i2_image" else s)
            for i, s in VALID_ROWS]
    assert problems_of(tmp_path, sample, rows) == [
        "line 5 (i2_image): confidence 2 not in [0, 1] (group 2)",
        "line 5 (i2_image): box 5 5 1 1: x1 must be < x2 (group 3)",
        "line 5 (i2_image): box 5 5 1 1: y1 must be < y2 (group 3)",
    ]


def test_blank_line_keeps_line_numbers(tmp_path, sample):
    rows = [VALID_ROWS[0], ("",), VALID_ROWS[1], ("i1_image", "opacity 9 0 0 1 1"), VALID_ROWS[3]]
    assert problems_of(tmp_path, sample, rows) == [
        "line 3: empty id",
        "line 5 (i1_image): confidence 9 not in [0, 1]",
    ]


def test_unreadable_files_give_one_problem(tmp_path, sample):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert [str(p) for p in validate_files(empty, sample)] == [
        f"{empty}: empty file (expected the header id,PredictionString)",
    ]
    assert [str(p) for p in validate_files(tmp_path / "nope.csv", sample)] == [f"{tmp_path / 'nope.csv'}: no such file"]
    binary = tmp_path / "image.png"
    binary.write_bytes(bytes(range(256)) * 8)
    assert [str(p) for p in validate_files(binary, sample)] == [
        f"{binary}: not a readable CSV ('utf-8' codec can't decode byte 0x80 in position 128: invalid start byte)",
    ]


def test_rows_with_a_wrong_number_of_fields(tmp_path, sample):
    rows = [("i1_image", "none 1 0 0 1 1", "x"), *VALID_ROWS[1:], ("s1_study",), ("s2_study", "a", "b", "c")]
    assert problems_of(tmp_path, sample, rows) == [
        "line 2 (i1_image): 3 field(s), expected 2",
        "line 6 (s1_study): 1 field(s), expected 2",
        "line 7 (s2_study): 4 field(s), expected 2",
    ]


def test_unusable_sample_raises(tmp_path):
    sub = write_csv(tmp_path / "sub.csv", VALID_ROWS)
    with pytest.raises(ValueError, match="no id column"):
        validate_files(sub, write_csv(tmp_path / "bad_sample.csv", [("a",)], header="x"))
    with pytest.raises(ValueError, match="cannot read the sample"):
        validate_files(sub, tmp_path / "missing_sample.csv")


def test_validate_submission_on_frames():
    sub = pd.DataFrame(VALID_ROWS, columns=["id", "PredictionString"])
    sample = pd.DataFrame({"id": SAMPLE_IDS})
    assert validate_submission(sub, sample) == []
    sub.loc[1, "PredictionString"] = "typical 1.5 0 0 1 1"
    sub.loc[3, "PredictionString"] = np.nan  # an empty cell, as pandas reads it by default
    assert validate_submission(sub, sample) == [
        Problem(3, "s2_study", "confidence 1.5 not in [0, 1]"),
        Problem(5, "i2_image", "empty PredictionString (each row needs at least one prediction)"),
    ]


def test_cli_validate_valid(tmp_path, sample, capsys):
    sub = write_csv(tmp_path / "sub.csv", VALID_ROWS)
    assert cli.main(["validate", str(sub), "--sample", str(sample)]) == 0
    assert capsys.readouterr().out.strip() == f"{sub}: valid"


def test_cli_validate_invalid(tmp_path, sample, capsys):
    rows = [(i, "opacity 1.3 0 0 10 10" if i == "i1_image" else s) for i, s in VALID_ROWS[:3]]
    sub = write_csv(tmp_path / "sub.csv", rows)
    assert cli.main(["validate", str(sub), "--sample", str(sample)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "line 4 (i1_image): confidence 1.3 not in [0, 1]",
        "i2_image: missing from the submission",
        f"{sub}: INVALID (2 problems)",
    ]


def test_cli_validate_empty_file(tmp_path, sample, capsys):
    sub = tmp_path / "sub.csv"
    sub.write_text("")
    assert cli.main(["validate", str(sub), "--sample", str(sample)]) == 1
    assert "empty file" in capsys.readouterr().err
