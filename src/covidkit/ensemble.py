"""Weighted boxes fusion (WBF) of several detectors' opacity boxes, then NMS.

Each model gives ``[N, 4]`` boxes in the image's original pixels with ``[N]`` scores. The boxes
are normalised to ``[0, 1]`` by the image's width and height (``ensemble_boxes`` expects that),
fused with ``ensemble_boxes.weighted_boxes_fusion`` (one list per model, one weight per list),
passed through NMS (``torchvision.ops.nms``) to drop fused boxes that still overlap, and mapped
back to original pixels.

Stage 05 (``covidkit.stages.ensemble_wbf``) fuses the out-of-fold predictions of 03 (Faster R-CNN) and
04 (YOLO) with :func:`fuse_oof`, compares the opacity AP@0.5 of each model and of the fusion on the same
images (:func:`ap_table`), and may choose the parameters on a small grid (:func:`grid_search`, with an
honest score of that choice from :func:`tuned_out_of_fold`); the chosen ones are saved
(:meth:`FusionParams.save`) for 07, which fuses every fold model's boxes per test image with
:func:`fuse_boxes`.
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from ensemble_boxes import weighted_boxes_fusion
from torchvision.ops import nms

from covidkit.boxes import EMPTY, as_boxes
from covidkit.metrics import match_detections
from covidkit.deprecated import moved
from covidkit.oof import OofPredictions, fold_mean_ap, opacity_ap
from covidkit.oof import restrict as _restrict

CONF_TYPES = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")


@dataclass(frozen=True)
class FusionParams:
    """Parameters of :func:`fuse_boxes`.

    ``weights``: one per detector, in the order the detectors are given (05 and 07: Faster R-CNN,
    YOLO). ``iou_thr``, ``skip_box_thr``, ``conf_type``: those of ``weighted_boxes_fusion``.
    ``nms_iou_thr``: NMS after the fusion (``None``: no NMS). ``max_boxes``: each model's
    best-scored boxes kept before the fusion (``None``: all). WBF's clustering is a Python loop
    over the boxes (about 80 us each): 07 fuses every fold of both detectors per image, and their
    low-scored tails (100 boxes per model at confidence 0.001) would cost more than a detector.
    """

    weights: tuple[float, ...] = (1.0, 1.0)
    iou_thr: float = 0.55
    skip_box_thr: float = 0.0
    conf_type: str = "avg"
    nms_iou_thr: float | None = 0.5
    max_boxes: int | None = 20

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if self.conf_type not in CONF_TYPES:
            raise ValueError(f"conf_type must be one of {CONF_TYPES}, got {self.conf_type!r}")
        if not 0 < self.iou_thr <= 1 or not 0 <= self.skip_box_thr < 1:
            raise ValueError(f"iou_thr must be in (0, 1] and skip_box_thr in [0, 1), got {self.iou_thr}, "
                             f"{self.skip_box_thr}")
        if not self.weights or min(self.weights) < 0 or sum(self.weights) <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {self.weights}")

    def to_dict(self) -> dict:
        return {**asdict(self), "weights": list(self.weights)}

    @classmethod
    def from_dict(cls, values: Mapping) -> FusionParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown fusion parameters {unknown} (known: {sorted(known)})")
        return cls(**values)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> FusionParams:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _normalised(boxes: np.ndarray, scores: np.ndarray, image_hw: tuple[int, int],
                max_boxes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Boxes divided by the image size and clipped to [0, 1]; zero-area boxes dropped (WBF would warn);
    the ``max_boxes`` best kept."""
    height, width = image_hw
    boxes = (as_boxes(boxes) / np.array([width, height, width, height], dtype=np.float64)).clip(0.0, 1.0)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores")
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return _top(boxes[keep], scores[keep], max_boxes)


def fuse_normalised(boxes_list: Sequence[np.ndarray], scores_list: Sequence[np.ndarray], params: FusionParams,
                    weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """WBF then NMS of boxes already in [0, 1]; returns ``[N, 4]`` boxes and scores, best first."""
    if not any(len(s) for s in scores_list):
        return EMPTY.copy(), np.zeros(0)
    labels = [np.zeros(len(s)) for s in scores_list]
    boxes, scores, _ = weighted_boxes_fusion(
        [b.tolist() for b in boxes_list], [s.tolist() for s in scores_list], labels, weights=list(weights),
        iou_thr=params.iou_thr, skip_box_thr=params.skip_box_thr, conf_type=params.conf_type)
    boxes, scores = np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(scores, dtype=np.float64)
    if params.nms_iou_thr is not None and len(scores) > 1:
        keep = nms(torch.from_numpy(boxes), torch.from_numpy(scores), params.nms_iou_thr).numpy()
        boxes, scores = boxes[keep], scores[keep]
    # WBF's avg can exceed 1 only with allows_overflow; clip guards the submission's [0, 1] anyway
    return boxes, scores.clip(0.0, 1.0)


def fuse_boxes(boxes_list: Sequence, scores_list: Sequence, image_hw: tuple[int, int],
               params: FusionParams = FusionParams(), weights: Sequence[float] | None = None,
               ) -> tuple[np.ndarray, np.ndarray]:
    """Fuse the boxes of several models on one image of size ``image_hw`` (height, width).

    ``boxes_list[i]``: ``[N_i, 4]`` boxes of model ``i`` in original pixels, ``scores_list[i]``
    their scores. ``weights`` (one per model) defaults to ``params.weights``. Returns the fused
    ``[N, 4]`` boxes in original pixels and their scores, best first.
    """
    weights = params.weights if weights is None else tuple(weights)
    if not len(boxes_list) == len(scores_list) == len(weights):
        raise ValueError(f"{len(boxes_list)} box sets, {len(scores_list)} score sets and {len(weights)} weights")
    normalised = [_normalised(b, s, image_hw, params.max_boxes) for b, s in zip(boxes_list, scores_list)]
    boxes, scores = fuse_normalised([b for b, _ in normalised], [s for _, s in normalised], params, weights)
    height, width = image_hw
    return boxes * np.array([width, height, width, height], dtype=np.float64), scores


# --------------------------------------------------------------------------- out-of-fold predictions


def common_images(oofs: Sequence[OofPredictions]) -> list[str]:
    """The images every model was evaluated on, sorted."""
    ids = set(oofs[0].images["image_id"])
    for oof in oofs[1:]:
        ids &= set(oof.images["image_id"])
    return sorted(ids)


def _top(boxes: np.ndarray, scores: np.ndarray, k: int | None) -> tuple[np.ndarray, np.ndarray]:
    if k is None or len(scores) <= k:
        return boxes, scores
    keep = np.argsort(-scores, kind="stable")[:k]
    return boxes[keep], scores[keep]


def _rows_by_image(boxes: pd.DataFrame, image_ids: Sequence[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each of ``image_ids``' boxes and scores from an OOF box table: one sort, then array slices (a pandas
    selection per image costs more than the fusion itself on the competition's 6,334 images)."""
    order = np.argsort(boxes["image_id"].to_numpy(dtype=str), kind="stable")
    ids = boxes["image_id"].to_numpy(dtype=str)[order]
    coords = boxes[["x1", "y1", "x2", "y2"]].to_numpy(np.float64)[order]
    scores = boxes["score"].to_numpy(np.float64)[order]
    starts = np.searchsorted(ids, image_ids, side="left")
    ends = np.searchsorted(ids, image_ids, side="right")
    return [coords[a:b] for a, b in zip(starts, ends)], [scores[a:b] for a, b in zip(starts, ends)]


@dataclass
class _NormalisedOof:
    """Per image, each model's normalised boxes and scores: grouped once, fused many times (the grid)."""

    image_ids: list[str]
    folds: list[int]
    sizes: list[tuple[int, int]]
    per_model: list[list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=list)  # [image][model]

    @classmethod
    def build(cls, oofs: Sequence[OofPredictions], sizes: Mapping[str, tuple[int, int]]) -> _NormalisedOof:
        ids = common_images(oofs)
        missing = [i for i in ids if i not in sizes]
        if missing:
            raise KeyError(f"{len(missing)} images have no original size, e.g. {missing[:5]}")
        folds = oofs[0].images.set_index("image_id")["fold"]
        data = cls(ids, [int(folds[i]) for i in ids], [sizes[i] for i in ids])
        per_model = [_rows_by_image(oof.boxes, ids) for oof in oofs]
        for k, hw in enumerate(data.sizes):
            data.per_model.append([_normalised(boxes[k], scores[k], hw) for boxes, scores in per_model])
        return data

    def fuse(self, params: FusionParams, weights: Sequence[float]) -> OofPredictions:
        ids, folds, boxes, scores = [], [], [], []
        for image_id, fold, (height, width), row in zip(self.image_ids, self.folds, self.sizes, self.per_model):
            row = [_top(b, s, params.max_boxes) for b, s in row]
            fused, fused_scores = fuse_normalised([b for b, _ in row], [s for _, s in row], params, weights)
            ids += [image_id] * len(fused_scores)
            folds += [fold] * len(fused_scores)
            boxes.append(fused * np.array([width, height, width, height]))
            scores.append(fused_scores)
        frame = pd.DataFrame(np.concatenate([EMPTY, *boxes]), columns=["x1", "y1", "x2", "y2"])
        frame.insert(0, "fold", np.asarray(folds, dtype=int))
        frame.insert(0, "image_id", ids)
        frame["score"] = np.concatenate([np.zeros(0), *scores])
        return OofPredictions(frame, pd.DataFrame({"image_id": self.image_ids, "fold": self.folds}))


def fuse_oof(oofs: Sequence[OofPredictions], sizes: Mapping[str, tuple[int, int]],
             params: FusionParams = FusionParams(), weights: Sequence[float] | None = None) -> OofPredictions:
    """The fused out-of-fold predictions of several models on the images they share.

    ``sizes``: ``{image_id: (height, width)}`` in original pixels (:func:`read_image_sizes`).
    Each image keeps the fold of the first model's OOF.
    """
    weights = params.weights if weights is None else tuple(weights)
    if len(weights) != len(oofs):
        raise ValueError(f"{len(oofs)} models but {len(weights)} weights")
    return _NormalisedOof.build(oofs, sizes).fuse(params, weights)


def ap_table(oofs: Mapping[str, OofPredictions], truth: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Opacity AP@0.5 of each named model (index: the names), with image and box counts: ``ap50`` over all its
    images, ``ap50_fold_mean`` the mean of its folds' (:func:`fold_mean_ap`)."""
    rows = [{"model": name, "images": len(oof.images), "predicted_boxes": len(oof.boxes),
             "ap50": opacity_ap(oof, truth), "ap50_fold_mean": fold_mean_ap(oof, truth)} for name, oof in oofs.items()]
    return pd.DataFrame(rows).set_index("model")


def grid_fusions(oofs: Sequence[OofPredictions], sizes: Mapping[str, tuple[int, int]], grid: Mapping[str, Sequence],
                 base: FusionParams = FusionParams()) -> list[tuple[FusionParams, OofPredictions]]:
    """Every combination of ``grid`` (``{field: values}``, varied from ``base``) with its fused OOF predictions."""
    data = _NormalisedOof.build(oofs, sizes)
    keys = list(grid)
    combos = [replace(base, **dict(zip(keys, values))) for values in itertools.product(*(grid[k] for k in keys))]
    return [(params, data.fuse(params, params.weights)) for params in combos]


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _best(aps) -> int:
    """Index of the best AP, the first on ties; a NaN AP (no true box to find) counts as the worst."""
    return int(np.argmax(np.nan_to_num(np.asarray(aps, dtype=float), nan=-1.0)))


def best_fusion(fusions: Sequence[tuple[FusionParams, OofPredictions]], truth: Mapping[str, np.ndarray],
                grid: Mapping[str, Sequence]) -> tuple[FusionParams, pd.DataFrame]:
    """The parameters of ``fusions`` with the best OOF AP@0.5 (ties: the first, so put the defaults first) and a
    frame with one row per combination (its ``grid`` fields and ``ap50``), best first."""
    aps = [opacity_ap(oof, truth) for _, oof in fusions]
    rows = [{**{k: _plain(getattr(params, k)) for k in grid}, "ap50": ap} for (params, _), ap in zip(fusions, aps)]
    table = pd.DataFrame(rows).sort_values("ap50", ascending=False, kind="stable").reset_index(drop=True)
    return fusions[_best(aps)][0], table


def grid_search(oofs: Sequence[OofPredictions], sizes: Mapping[str, tuple[int, int]],
                truth: Mapping[str, np.ndarray], grid: Mapping[str, Sequence],
                base: FusionParams = FusionParams()) -> tuple[FusionParams, pd.DataFrame]:
    """The ``FusionParams`` with the best fused OOF AP@0.5 over ``grid`` (``{field: values}``).

    Returns the best parameters (ties: the first in grid order, so put the defaults first) and a
    frame with one row per combination and its ``ap50``, best first.
    """
    return best_fusion(grid_fusions(oofs, sizes, grid, base), truth, grid)


def tuned_out_of_fold(fusions: Sequence[tuple[FusionParams, OofPredictions]],
                      truth: Mapping[str, np.ndarray]) -> tuple[OofPredictions, dict[int, FusionParams]]:
    """An honest score for parameters tuned on OOF images: each fold's images take the fusion that scores best
    on the *other* folds' images. Returns those predictions and the parameters chosen per fold.

    Each image's fusion depends on that image alone, so the grid is fused once and only the AP is
    recomputed per fold.
    """
    images = fusions[0][1].images
    folds = sorted(int(f) for f in images["fold"].unique())
    if len(folds) < 2:
        raise ValueError(f"tuning out of fold needs images of at least two folds, got folds {folds}")
    parts, chosen = [], {}
    for fold in folds:
        others = images.loc[images["fold"] != fold, "image_id"]
        params, oof = fusions[_best([opacity_ap(_restrict(oof, others), truth) for _, oof in fusions])]
        chosen[int(fold)] = params
        parts.append(_restrict(oof, images.loc[images["fold"] == fold, "image_id"]))
    return OofPredictions.concat(parts), chosen


def precision_recall(oof: OofPredictions, truth: Mapping[str, np.ndarray],
                     iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """The (recall, precision) points of ``oof``'s opacity detections, by descending score."""
    gt = {i: as_boxes(truth[i]) for i in oof.images["image_id"]}
    n_gt = sum(len(b) for b in gt.values())
    boxes = oof.boxes
    tp = match_detections(gt, boxes["image_id"].to_numpy(dtype=object), boxes["score"].to_numpy(),
                          boxes[["x1", "y1", "x2", "y2"]].to_numpy(), iou_threshold)
    hits = np.cumsum(tp)
    return hits / max(n_gt, 1), hits / np.arange(1, len(tp) + 1)


def operating_point(oof: OofPredictions, truth: Mapping[str, np.ndarray], iou_threshold: float = 0.5) -> dict:
    """The box score threshold with the best F1 at IoU > ``iou_threshold`` on out-of-fold boxes.

    What a reader is shown by default (``covidkit serve``): the AP ranks every box, a person looks at the
    few above a threshold. Returns ``threshold``, ``f1``, ``precision``, ``recall``.
    """
    recall, precision = precision_recall(oof, truth, iou_threshold)
    if not len(recall) or not recall.max() > 0:
        return {"threshold": 1.0, "f1": 0.0, "precision": 0.0, "recall": 0.0}
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1))
    scores = np.sort(oof.boxes["score"].to_numpy())[::-1]
    return {"threshold": float(scores[best]), "f1": float(f1[best]), "precision": float(precision[best]),
            "recall": float(recall[best])}


__getattr__ = moved(__name__, {"restrict": "covidkit.oof.restrict"})
