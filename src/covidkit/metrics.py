"""The competition metric: PASCAL VOC 2010 mAP at IoU > 0.5 over six classes.

The SIIM-FISABIO-RSNA COVID-19 Detection metric averages the VOC average precision of
``negative, typical, indeterminate, atypical`` (study rows) and ``none, opacity`` (image rows).
Study classes and ``none`` are scored as detections of the one-pixel box ``0 0 1 1``:

- a study row's ground truth is one box ``0 0 1 1`` of the study's class;
- an image row's ground truth is its opacity boxes, or one ``none 0 0 1 1`` box when it has none.

Decisions where the competition text is silent (each follows the VOC devkit or the TensorFlow
Object Detection API's PASCAL evaluator, the usual reference implementations):

- **IoU** uses continuous areas, ``(x2 - x1) * (y2 - y1)`` (no VOC ``+1`` pixel), so that
  ``0 0 1 1`` is the "one-pixel box" of the competition text. A match needs IoU strictly > 0.5.
- **Matching**: predictions of a class are pooled over all rows and sorted by confidence,
  descending, with a *stable* sort: ties keep submission order (row order in the file, then
  group order in the ``PredictionString``). Each prediction takes the ground-truth box of its row
  with the highest IoU; if that IoU > 0.5 and the box is still unmatched it is a true positive,
  otherwise (too low, or already matched: a duplicate) it is a false positive, as in VOC.
- **AP** is the area under the all-point interpolated precision envelope (VOC 2010+).
- **A class without ground truth** in the labels gets AP ``None`` and is left out of the mean,
  with a warning (the TF Object Detection API skips such classes and takes ``np.nanmean``).
  A class with ground truth but no prediction has AP 0.
- A submission row whose id is not in the labels is an error; a labelled row missing from the
  submission only adds false negatives; an empty ``PredictionString`` predicts nothing.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from covidkit.boxes import as_boxes, parse_prediction_string
from covidkit.data.siim import (
    ALL_CLASSES,
    IMAGE_CLASSES,
    STUDY_CLASSES,
    image_row_id,
    read_image_labels,
    read_study_labels,
    study_row_id,
)

IOU_THRESHOLD = 0.5
ONE_PIXEL_BOX = np.array([[0.0, 0.0, 1.0, 1.0]])


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU of every pair of ``[A, 4]`` and ``[B, 4]`` x1, y1, x2, y2 boxes -> ``[A, B]``."""
    a = as_boxes(boxes_a)[:, None, :]
    b = as_boxes(boxes_b)[None, :, :]
    inter_w = (np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])).clip(min=0)
    inter_h = (np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])).clip(min=0)
    inter = inter_w * inter_h
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def voc_ap(tp: np.ndarray, n_gt: int) -> float:
    """VOC 2010 AP of detections already sorted by confidence; ``tp[i]`` is True for a true positive.

    Hand-written because scikit-learn's ``average_precision_score`` does not fit: it scores
    labelled samples, so it cannot count ground-truth boxes that no detection found (recall
    must be divided by ``n_gt``), it groups tied scores, and it uses the step-wise precision,
    not the interpolated envelope.
    """
    if n_gt <= 0:
        raise ValueError("AP is undefined without ground truth (n_gt must be > 0)")
    tp = np.asarray(tp, dtype=bool)
    if tp.size == 0:
        return 0.0
    ctp = np.cumsum(tp)
    recall = ctp / n_gt
    precision = ctp / np.arange(1, tp.size + 1)
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * envelope[steps + 1]))


def match_detections(
    gt: Mapping[str, np.ndarray],
    row_ids: np.ndarray,
    scores: np.ndarray,
    boxes: np.ndarray,
    iou_threshold: float = IOU_THRESHOLD,
) -> np.ndarray:
    """True-positive flags of the detections in ``np.argsort(-scores, kind="stable")`` order.

    ``gt`` maps a row id to its ``[N, 4]`` ground-truth boxes of this class; detection ``i`` is
    ``row_ids[i], scores[i], boxes[i]``. A detection is a true positive when the ground-truth box
    of its row with the highest IoU has IoU > ``iou_threshold`` and no earlier detection took it.
    """
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    rows = np.asarray(row_ids, dtype=object)[order]
    boxes = as_boxes(boxes)[order]
    tp = np.zeros(len(order), dtype=bool)
    by_row: dict[str, list[int]] = {}
    for rank, row in enumerate(rows):
        by_row.setdefault(row, []).append(rank)
    for row, ranks in by_row.items():
        row_gt = gt.get(row)
        if row_gt is None or len(row_gt) == 0:
            continue
        iou = box_iou(boxes[ranks], row_gt)
        best = iou.argmax(axis=1)
        best_iou = iou[np.arange(len(ranks)), best]
        matched = np.zeros(len(row_gt), dtype=bool)
        for rank, k, overlap in zip(ranks, best, best_iou):
            if overlap > iou_threshold and not matched[k]:
                matched[k] = True
                tp[rank] = True
    return tp


def average_precision(
    gt: Mapping[str, np.ndarray],
    preds: Iterable[tuple[str, float, float, float, float, float]],
    iou_threshold: float = IOU_THRESHOLD,
) -> float:
    """VOC AP of one class: ``gt`` is ``{row_id: [N, 4] boxes}``, ``preds`` are
    ``(row_id, conf, x1, y1, x2, y2)``; a match needs IoU > ``iou_threshold``.
    Returns ``nan`` when ``gt`` holds no box.

    >>> average_precision({"a": [[0, 0, 10, 10]]}, [("a", 0.9, 0, 0, 10, 10), ("a", 0.8, 0, 0, 10, 10)])
    1.0
    """
    gt = {row: as_boxes(b) for row, b in gt.items()}
    n_gt = sum(len(b) for b in gt.values())
    if n_gt == 0:
        return math.nan
    preds = list(preds)
    row_ids = np.array([p[0] for p in preds], dtype=object)
    scores = np.array([p[1] for p in preds], dtype=np.float64)
    boxes = np.array([p[2:6] for p in preds], dtype=np.float64).reshape(-1, 4)
    return voc_ap(match_detections(gt, row_ids, scores, boxes, iou_threshold), n_gt)


def ground_truth(image_labels: pd.DataFrame, study_labels: pd.DataFrame) -> dict[str, dict[str, np.ndarray]]:
    """``{class: {row_id: [N, 4] boxes}}`` from the frames of ``read_image_labels`` / ``read_study_labels``.

    Image rows take their opacity boxes from the ``boxes`` column (the ``label`` column of the CSV
    says the same thing in another form); an image without box is one ``none 0 0 1 1``.
    """
    unknown = sorted(set(study_labels["label"]) - set(STUDY_CLASSES))
    if unknown:
        raise ValueError(f"study labels {unknown} are not in {STUDY_CLASSES}")
    gt: dict[str, dict[str, np.ndarray]] = {c: {} for c in ALL_CLASSES}
    for study_id, label in zip(study_labels["study_id"], study_labels["label"]):
        gt[label][study_row_id(study_id)] = ONE_PIXEL_BOX
    for image_id, boxes in zip(image_labels["image_id"], image_labels["boxes"]):
        boxes = as_boxes(boxes)
        if len(boxes):
            gt["opacity"][image_row_id(image_id)] = boxes
        else:
            gt["none"][image_row_id(image_id)] = ONE_PIXEL_BOX
    return gt


def _labelled_rows(image_labels: pd.DataFrame, study_labels: pd.DataFrame) -> set[str]:
    rows = [study_row_id(s) for s in study_labels["study_id"]] + [image_row_id(i) for i in image_labels["image_id"]]
    _raise_on_duplicates(rows, "labels")
    return set(rows)


def _raise_on_duplicates(ids: list[str], what: str) -> None:
    counts = pd.Series(ids).value_counts()
    duplicated = counts[counts > 1].index.tolist()
    if duplicated:
        raise ValueError(f"{what}: {len(duplicated)} ids appear more than once, e.g. {duplicated[:5]}")


def _gather_predictions(submission: pd.DataFrame, labelled: set[str]) -> dict[str, tuple]:
    """``{class: (row_ids, scores, boxes)}`` from the ``id, PredictionString`` rows, in file order."""
    missing = [c for c in ("id", "PredictionString") if c not in submission.columns]
    if missing:
        raise ValueError(f"submission: missing columns {missing}")
    ids = submission["id"].astype(str).tolist()
    _raise_on_duplicates(ids, "submission")
    unknown = [i for i in ids if i not in labelled]
    if unknown:
        raise ValueError(f"submission: {len(unknown)} ids are not in the labels, e.g. {unknown[:5]}")
    gathered: dict[str, list] = {c: [] for c in ALL_CLASSES}
    for row_id, text in zip(ids, submission["PredictionString"]):
        try:
            predictions = parse_prediction_string(text)
        except ValueError as err:
            raise ValueError(f"submission row {row_id}: {err}") from None
        for p in predictions:
            if p.label not in gathered:
                raise ValueError(f"submission row {row_id}: unknown class {p.label!r} (expected one of {ALL_CLASSES})")
            gathered[p.label].append((row_id, p.conf, p.x1, p.y1, p.x2, p.y2))
    return {
        c: (
            np.array([p[0] for p in preds], dtype=object),
            np.array([p[1] for p in preds], dtype=np.float64),
            np.array([p[2:] for p in preds], dtype=np.float64).reshape(-1, 4),
        )
        for c, preds in gathered.items()
    }


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def score_submission(
    image_labels: pd.DataFrame,
    study_labels: pd.DataFrame,
    submission: pd.DataFrame,
    iou_threshold: float = IOU_THRESHOLD,
) -> dict:
    """Score a submission frame (``id, PredictionString``) against the labels.

    ``image_labels`` has ``image_id, boxes`` (``read_image_labels``), ``study_labels`` has
    ``study_id, label`` (``read_study_labels``). Returns ``mAP`` (mean over the classes with
    ground truth), one AP per class (``None`` without ground truth), ``study_mAP`` and
    ``image_mAP`` (the means over the four study and two image classes), and the counts
    ``n_gt`` / ``n_pred`` per class.
    """
    labelled = _labelled_rows(image_labels, study_labels)
    gt = ground_truth(image_labels, study_labels)
    predictions = _gather_predictions(submission, labelled)
    scores: dict = {}
    n_gt = {c: int(sum(len(b) for b in gt[c].values())) for c in ALL_CLASSES}
    for c in ALL_CLASSES:
        if n_gt[c] == 0:
            warnings.warn(f"class {c!r} has no ground truth in the labels: left out of the mAP", stacklevel=2)
            scores[c] = None
            continue
        scores[c] = voc_ap(match_detections(gt[c], *predictions[c], iou_threshold), n_gt[c])
    return {
        "mAP": _mean([scores[c] for c in ALL_CLASSES]),
        **scores,
        "study_mAP": _mean([scores[c] for c in STUDY_CLASSES]),
        "image_mAP": _mean([scores[c] for c in IMAGE_CLASSES]),
        "n_gt": n_gt,
        "n_pred": {c: len(predictions[c][0]) for c in ALL_CLASSES},
    }


def read_submission(path: str | Path) -> pd.DataFrame:
    """A submission CSV as strings (ids stay as written, an empty ``PredictionString`` is ``""``)."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def score_files(image_level_csv: str | Path, study_level_csv: str | Path, submission_csv: str | Path) -> dict:
    """:func:`score_submission` of CSV files in the ``train_image_level.csv`` /
    ``train_study_level.csv`` / ``sample_submission.csv`` formats."""
    return score_submission(
        read_image_labels(image_level_csv), read_study_labels(study_level_csv), read_submission(submission_csv),
    )


def format_scores(scores: dict) -> str:
    """The result of :func:`score_submission` as a text table."""
    def ap(value: float | None) -> str:
        return "   n/a" if value is None else f"{value:.4f}"

    lines = [f"{'class':<14} {'AP':>6} {'GT':>7} {'pred':>7}"]
    for c in ALL_CLASSES:
        lines.append(f"{c:<14} {ap(scores[c]):>6} {scores['n_gt'][c]:>7} {scores['n_pred'][c]:>7}")
    lines.append(f"{'study mAP':<14} {ap(scores['study_mAP']):>6}")
    lines.append(f"{'image mAP':<14} {ap(scores['image_mAP']):>6}")
    lines.append(f"{'mAP':<14} {ap(scores['mAP']):>6}")
    excluded = [c for c in ALL_CLASSES if scores[c] is None]
    if excluded:
        lines.append(f"(no ground truth, left out of the means: {', '.join(excluded)})")
    return "\n".join(lines)
