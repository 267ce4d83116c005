"""Boxes as the competition writes them, and as the models see them.

Inside covidkit a set of boxes is a float array of shape ``[N, 4]`` in ``x1, y1, x2, y2``
pixel coordinates. The CSVs carry them in two text forms:

- the ``boxes`` column of ``train_image_level.csv``: a Python literal list of dicts
  ``[{'x': .., 'y': .., 'width': .., 'height': ..}]``, empty for images without opacity;
- ``label`` / ``PredictionString``: groups of six tokens ``class conf x1 y1 x2 y2``.
"""
from __future__ import annotations

import ast
import math
from typing import NamedTuple

import numpy as np

EMPTY = np.zeros((0, 4), dtype=np.float64)


class Prediction(NamedTuple):
    label: str
    conf: float
    x1: float
    y1: float
    x2: float
    y2: float


def as_boxes(boxes) -> np.ndarray:
    """Any sequence of ``x1, y1, x2, y2`` rows -> float64 array ``[N, 4]``."""
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return EMPTY.copy()
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4], got {arr.shape}")
    return arr


def parse_boxes_column(value) -> np.ndarray:
    """The ``boxes`` cell of ``train_image_level.csv`` -> ``[N, 4]`` x1, y1, x2, y2."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() in ("", "nan"):
        return EMPTY.copy()
    items = ast.literal_eval(str(value))
    return as_boxes([[d["x"], d["y"], d["x"] + d["width"], d["y"] + d["height"]] for d in items])


def format_boxes_column(boxes) -> str:
    """``[N, 4]`` -> the ``boxes`` cell (empty string when there is no box)."""
    boxes = as_boxes(boxes)
    if len(boxes) == 0:
        return ""
    items = [
        {"x": round(float(x1), 5), "y": round(float(y1), 5),
         "width": round(float(x2 - x1), 5), "height": round(float(y2 - y1), 5)}
        for x1, y1, x2, y2 in boxes
    ]
    return repr(items)


def parse_prediction_string(value) -> list[Prediction]:
    """``"opacity 0.5 1 2 3 4 none 0.1 0 0 1 1"`` -> predictions. Raises ValueError on malformed text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    tokens = str(value).split()
    if len(tokens) % 6:
        raise ValueError(f"{len(tokens)} tokens is not a multiple of 6 (class conf x1 y1 x2 y2)")
    out = []
    for i in range(0, len(tokens), 6):
        label, *numbers = tokens[i:i + 6]
        try:
            conf, x1, y1, x2, y2 = (float(t) for t in numbers)
        except ValueError as err:
            raise ValueError(f"group {i // 6 + 1} ({' '.join(tokens[i:i + 6])}): {err}") from None
        out.append(Prediction(label, conf, x1, y1, x2, y2))
    return out


def format_prediction_string(predictions) -> str:
    """Iterable of ``(label, conf, x1, y1, x2, y2)`` -> ``PredictionString`` text."""
    parts = []
    for label, conf, x1, y1, x2, y2 in predictions:
        parts.append(f"{label} {conf:.6g} {x1:.6g} {y1:.6g} {x2:.6g} {y2:.6g}")
    return " ".join(parts)


def label_from_boxes(boxes) -> str:
    """The ``label`` cell of ``train_image_level.csv`` for these ground-truth boxes."""
    boxes = as_boxes(boxes)
    if len(boxes) == 0:
        return "none 1 0 0 1 1"
    return format_prediction_string(("opacity", 1, *b) for b in boxes)


def scale_boxes(boxes, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> np.ndarray:
    """Rescale ``[N, 4]`` boxes from an image of size ``from_hw`` to one of size ``to_hw``."""
    boxes = as_boxes(boxes)
    sy = to_hw[0] / from_hw[0]
    sx = to_hw[1] / from_hw[1]
    return boxes * np.array([sx, sy, sx, sy])


def clip_boxes(boxes, hw: tuple[int, int]) -> np.ndarray:
    """Clip ``[N, 4]`` boxes to an image of size ``hw``."""
    boxes = as_boxes(boxes).copy()
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, hw[1])
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, hw[0])
    return boxes
