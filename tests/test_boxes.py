"""Box formats: the ``boxes`` column, ``label`` / ``PredictionString`` text, scale and clip."""
from __future__ import annotations

import numpy as np
import pytest

from covidkit import boxes as boxes_module
from covidkit.boxes import (
    Prediction,
    as_boxes,
    clip_boxes,
    format_boxes_column,
    format_prediction_string,
    label_from_boxes,
    parse_boxes_column,
    parse_prediction_string,
    scale_boxes,
)

# the first row of the real train_image_level.csv (image 000a312787f2, study 5776db0cec75)
REAL_BOXES = ("[{'x': 789.28836, 'y': 582.43035, 'width': 1026.65662, 'height': 1917.30292}, "
              "{'x': 2245.91208, 'y': 591.20528, 'width': 1094.66162, 'height': 1761.54944}]")
REAL_LABEL = ("opacity 1 789.28836 582.43035 1815.94498 2499.73327 "
              "opacity 1 2245.91208 591.20528 3340.5737 2352.75472")


def test_as_boxes_shapes():
    assert as_boxes([]).shape == (0, 4)
    assert as_boxes([[1, 2, 3, 4]]).dtype == np.float64
    with pytest.raises(ValueError, match=r"shape \[N, 4\]"):
        as_boxes([1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"shape \[N, 4\]"):
        as_boxes([[1, 2, 3]])


def test_empty_results_are_fresh_arrays():
    # callers may write into what they get: the module's EMPTY constant must never be handed out
    assert as_boxes([]) is not boxes_module.EMPTY
    assert parse_boxes_column("") is not boxes_module.EMPTY


def test_parse_real_boxes_column_agrees_with_label():
    boxes = parse_boxes_column(REAL_BOXES)
    np.testing.assert_allclose(boxes, [[789.28836, 582.43035, 1815.94498, 2499.73327],
                                       [2245.91208, 591.20528, 3340.5737, 2352.75472]])
    from_label = np.array([p[2:] for p in parse_prediction_string(REAL_LABEL)])
    np.testing.assert_allclose(boxes, from_label)


@pytest.mark.parametrize("empty", [None, float("nan"), "", "  ", "nan", "[]"])
def test_parse_empty_boxes_column(empty):
    assert parse_boxes_column(empty).shape == (0, 4)


def test_boxes_column_round_trip():
    boxes = np.array([[10.5, 20.25, 110.5, 220.75], [0, 0, 5, 5]])
    text = format_boxes_column(boxes)
    assert text == ("[{'x': 10.5, 'y': 20.25, 'width': 100.0, 'height': 200.5}, "
                    "{'x': 0.0, 'y': 0.0, 'width': 5.0, 'height': 5.0}]")
    np.testing.assert_allclose(parse_boxes_column(text), boxes)
    assert format_boxes_column(np.zeros((0, 4))) == ""


def test_parse_prediction_string():
    preds = parse_prediction_string("opacity 0.5 1 2 3.5 4 none 0.1 0 0 1 1")
    assert preds == [Prediction("opacity", 0.5, 1, 2, 3.5, 4), Prediction("none", 0.1, 0, 0, 1, 1)]
    assert preds[0].conf == 0.5 and preds[1].label == "none"
    assert parse_prediction_string("") == []
    assert parse_prediction_string(float("nan")) == []
    assert parse_prediction_string(None) == []


def test_parse_prediction_string_errors():
    with pytest.raises(ValueError, match="7 tokens is not a multiple of 6"):
        parse_prediction_string("opacity 0.5 1 2 3 4 none")
    with pytest.raises(ValueError, match=r"group 2 \(none x 0 0 1 1\)"):
        parse_prediction_string("opacity 0.5 1 2 3 4 none x 0 0 1 1")


def test_format_prediction_string_round_trip():
    preds = [("opacity", 0.123456789, 10.5, 20, 300.25, 400), ("none", np.float32(0.25), 0, 0, 1, 1)]
    text = format_prediction_string(preds)
    assert text == "opacity 0.123457 10.5 20 300.25 400 none 0.25 0 0 1 1"
    assert [tuple(p) for p in parse_prediction_string(text)] == [
        ("opacity", 0.123457, 10.5, 20, 300.25, 400), ("none", 0.25, 0, 0, 1, 1)]
    assert format_prediction_string([]) == ""


def test_label_from_boxes():
    assert label_from_boxes([]) == "none 1 0 0 1 1"
    assert label_from_boxes([[1, 2, 3, 4], [5, 6, 7, 8]]) == "opacity 1 1 2 3 4 opacity 1 5 6 7 8"
    assert label_from_boxes(parse_boxes_column(REAL_BOXES)).split()[:6] == \
        ["opacity", "1", "789.288", "582.43", "1815.94", "2499.73"]


def test_scale_boxes_per_axis():
    boxes = [[100, 50, 300, 150]]
    # from 1000 high x 2000 wide to 500 x 500: x / 4, y / 2
    np.testing.assert_allclose(scale_boxes(boxes, (1000, 2000), (500, 500)), [[25, 25, 75, 75]])
    back = scale_boxes(scale_boxes(boxes, (1000, 2000), (512, 512)), (512, 512), (1000, 2000))
    np.testing.assert_allclose(back, boxes)
    assert scale_boxes([], (10, 10), (20, 20)).shape == (0, 4)


def test_clip_boxes_to_height_and_width():
    boxes = np.array([[-5, -5, 250, 90], [10, 20, 30, 40]])
    clipped = clip_boxes(boxes, (80, 200))  # 80 high, 200 wide
    np.testing.assert_array_equal(clipped, [[0, 0, 200, 80], [10, 20, 30, 40]])
    assert boxes[0, 0] == -5  # the input is left alone
