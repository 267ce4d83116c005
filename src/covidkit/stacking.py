"""Study classes from the study model and the detectors' boxes together (fitted in 06, applied in 07).

The four study classes are defined by *where* opacities lie (bilateral and basal, one-sided or upper,
lobar or nodular), and the detectors' fused boxes say where. The stacker is a multinomial logistic
regression (scikit-learn) on per-image features:

- the study model's class log-probabilities;
- per lung zone row (upper, middle, lower third of the image), the highest fused box score on the
  more affected side and on the less affected side. Sides are sorted rather than kept as image left and
  right because the class definitions are symmetric: the features, and so the prediction, do not change
  when the image is mirrored (which keeps 07's flip test-time augmentation exact);
- the pattern of the boxes, weighted by their scores: how many (the sum of the scores: many nodules), how
  large (the mean box area as a fraction of the image: a lobar consolidation is large), how peripheral
  (the mean distance of the box centres from the image's vertical midline, 0 at it, 1 at the edge: typical
  opacities are peripheral, indeterminate ones may be central) and how low (the mean height of the box
  centres, 0 at the top, 1 at the bottom: typical opacities are basal); then the best box alone: its score
  and its area. Also symmetric.

It is fitted on out-of-fold rows (06's study model, 05's fused boxes), so it learns how far to trust
each source from predictions like the ones it will see on the test images. Its coefficients are kept as
plain numbers in JSON (no pickle in a models folder) and applied with numpy.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

ZONE_ROWS = 3
BOX_FEATURE_NAMES = (*(f"box_{row}_{side}" for side in ("worse", "better") for row in ("upper", "middle", "lower")),
                     "box_count", "box_area", "box_periphery", "box_height", "best_box_score", "best_box_area")
FEATURE_NAMES = ("log_p_negative", "log_p_typical", "log_p_indeterminate", "log_p_atypical", *BOX_FEATURE_NAMES)


def box_features(boxes, scores, image_hw: tuple[int, int]) -> np.ndarray:
    """``[12]`` (``BOX_FEATURE_NAMES``): per zone row (upper, middle, lower) the best box score on the worse side,
    then on the better one; then the boxes' pattern: the sum of their scores, and their score-weighted mean area
    (fraction of the image), distance from the vertical midline (0 at it, 1 at the image's edge) and height of
    the centre (0 at the top, 1 at the bottom); then the best box's score and area.

    A box belongs to the zone of its centre; a zone without a box scores 0, an image without boxes is all 0.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.clip(np.asarray(scores, np.float64).reshape(-1), 0, None)
    if len(boxes) != len(scores):
        raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores")
    h, w = image_hw
    grid = np.zeros((ZONE_ROWS, 2))
    pattern = np.zeros(6)
    if len(boxes):
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2 / w, (boxes[:, 1] + boxes[:, 3]) / 2 / h
        row = np.clip((cy * ZONE_ROWS).astype(int), 0, ZONE_ROWS - 1)
        side = np.clip((cx * 2).astype(int), 0, 1)
        np.maximum.at(grid, (row, side), scores)
        total = scores.sum()
        if total > 0:
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (h * w)
            best = int(np.argmax(scores))
            pattern = np.array([total, (scores * area).sum() / total, (scores * np.abs(2 * cx - 1)).sum() / total,
                                (scores * cy).sum() / total, scores[best], area[best]])
    return np.concatenate([grid.max(1), grid.min(1), pattern])


def stacker_features(study_probs, box_feats) -> np.ndarray:
    """``[N, 16]``: the study model's log-probabilities ``[N, 4]`` beside ``box_features`` ``[N, 12]``."""
    probs = np.atleast_2d(np.asarray(study_probs, np.float64))
    feats = np.atleast_2d(np.asarray(box_feats, np.float64))
    n = len(BOX_FEATURE_NAMES)
    if probs.shape[1] != 4 or feats.shape[1] != n or len(probs) != len(feats):
        raise ValueError(f"expected [N, 4] probabilities and [N, {n}] box features, got {probs.shape} and {feats.shape}")
    return np.hstack([np.log(np.clip(probs, 1e-6, 1.0)), feats])


def oof_box_features(image_ids, boxes: pd.DataFrame, sizes: Mapping[str, tuple[int, int]]) -> np.ndarray:
    """``box_features`` of each image id from an OOF box table (``image_id, x1, y1, x2, y2, score``)."""
    groups = {i: g for i, g in boxes.groupby("image_id")}
    empty = boxes.iloc[:0]
    out = []
    for image_id in image_ids:
        part = groups.get(image_id, empty)
        out.append(box_features(part[["x1", "y1", "x2", "y2"]].to_numpy(), part["score"].to_numpy(), sizes[image_id]))
    return np.array(out).reshape(-1, len(BOX_FEATURE_NAMES))


@dataclass
class StudyStacker:
    """A fitted stacker: standardisation, then a softmax over ``coef @ x + intercept`` (numpy only)."""

    mean: list[float]
    scale: list[float]
    coef: list[list[float]]  # [classes, features]
    intercept: list[float]
    C: float

    def predict_proba(self, features) -> np.ndarray:
        """``[N, 4]`` class probabilities of ``stacker_features`` rows."""
        x = (np.atleast_2d(np.asarray(features, np.float64)) - self.mean) / self.scale
        logits = x @ np.asarray(self.coef).T + self.intercept
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(1, keepdims=True)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"features": list(FEATURE_NAMES), **asdict(self)}, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> StudyStacker:
        data = json.loads(Path(path).read_text())
        if tuple(data.pop("features")) != FEATURE_NAMES:
            raise ValueError(f"{path}: written for other features than {FEATURE_NAMES}")
        return cls(**data)


def fit_stacker(features, labels, C: float = 1.0) -> StudyStacker:
    """Fit on ``stacker_features`` rows and class indices (0-3; every class must be present)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = np.asarray(features, np.float64), np.asarray(labels)
    if set(np.unique(y)) != {0, 1, 2, 3}:
        raise ValueError(f"the stacker needs examples of all four classes, got {sorted(set(np.unique(y)))}")
    scaler = StandardScaler().fit(x)  # a constant feature (no box in a zone anywhere) gets scale 1: it stays 0
    model = LogisticRegression(C=C, max_iter=5000).fit(scaler.transform(x), y)
    return StudyStacker(scaler.mean_.tolist(), scaler.scale_.tolist(), model.coef_.tolist(), model.intercept_.tolist(), C)


def out_of_fold_probs(features, labels, folds, C: float = 1.0) -> np.ndarray:
    """``[N, 4]``: each row predicted by a stacker fitted on the rows of the other ``folds`` (00's fold of
    each row: grouped by patient, so no patient is on both sides)."""
    from sklearn.model_selection import PredefinedSplit

    x, y = np.asarray(features, np.float64), np.asarray(labels)
    probs = np.zeros((len(y), 4))
    for train, test in PredefinedSplit(np.asarray(folds)).split():
        probs[test] = fit_stacker(x[train], y[train], C).predict_proba(x[test])
    return probs
