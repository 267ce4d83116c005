"""Trivial baselines: what a rule that looks at no pixel scores, out of fold, beside each trained model.

- ``prior_box_oof``: the prior-box detector of opacity. Each held-out image gets, for each lung zone (the
  image's left and right half), the mean training box whose centre lies in that zone (normalised x1, y1, x2,
  y2 from the other folds' images, scaled to the image's size), all at one constant score. A detector must
  beat it to show it looks at the image rather than at where opacities usually are.
- ``box_count_rule``: the study classes from the count of a study's fused boxes above an operating score
  (0, 1, 2 or more; more boxes mean typical more often), each count's class frequencies taken from the
  other folds' studies. A study model with boxes must beat it to show it uses more than the box count.

Both read only labels, folds and sizes (and the detectors' boxes for the count rule); they import no stage.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from covidkit.boxes import as_boxes
from covidkit.data.siim import STUDY_CLASSES
from covidkit.oof import OofPredictions, box_rows

ZONES = ("image-left", "image-right")  # by the box centre's x, in halves of the image width
PRIOR_SCORE = 0.5  # every prior box's score: constant, so its AP counts how often the mean box hits
MAX_COUNT = 2  # box counts at or above this are one bin ("2 or more")


def normalised_boxes(table: pd.DataFrame) -> np.ndarray:
    """Every box of a prepared table (``boxes`` in original pixels, ``orig_height``, ``orig_width``), as
    ``[N, 4]`` fractions of its image's width and height."""
    parts = [as_boxes(b) / np.array([w, h, w, h], dtype=np.float64)
             for b, h, w in zip(table["boxes"], table["orig_height"], table["orig_width"]) if len(b)]
    return np.concatenate(parts) if parts else np.zeros((0, 4))


def zone_of(boxes: np.ndarray) -> np.ndarray:
    """The zone index (``ZONES``) of each normalised box: its centre's half of the image."""
    centre_x = (boxes[:, 0] + boxes[:, 2]) / 2
    return (centre_x >= 0.5).astype(int)


def mean_zone_boxes(table: pd.DataFrame) -> np.ndarray:
    """``[len(ZONES), 4]`` mean normalised box of each zone over ``table``'s boxes (``nan`` rows: no box there)."""
    boxes = normalised_boxes(table)
    zones = zone_of(boxes)
    return np.array([boxes[zones == z].mean(0) if (zones == z).any() else np.full(4, np.nan)
                     for z in range(len(ZONES))])


def prior_box_oof(table: pd.DataFrame, by: str = "model_fold", score: float = PRIOR_SCORE,
                  image_ids: Sequence[str] | None = None) -> OofPredictions:
    """The prior-box detector, out of fold: each image of ``table`` (``image_ids`` only, when given) gets the
    mean zone boxes of the table's images in other ``by`` groups, scaled to its size, at ``score``.

    ``table``: ``image_id, fold, boxes, orig_height, orig_width`` and the ``by`` column. The OOF rows carry
    the image's ``fold``, as every detector's.
    """
    held_out = table if image_ids is None else table[table["image_id"].isin(set(image_ids))]
    parts = []
    for group, rows in held_out.groupby(by, sort=True):
        means = mean_zone_boxes(table[table[by] != group])
        means = means[~np.isnan(means).any(axis=1)]
        for image_id, fold, h, w in zip(rows["image_id"], rows["fold"], rows["orig_height"], rows["orig_width"]):
            parts.append(box_rows(image_id, fold, means * np.array([w, h, w, h], dtype=np.float64),
                                  np.full(len(means), score)))
    return OofPredictions.from_parts(parts, held_out[["image_id", "fold"]])


def study_box_counts(images: pd.DataFrame, boxes: pd.DataFrame, threshold: float) -> pd.Series:
    """Per study of ``images`` (``image_id, study_id``): the most boxes scoring ``>= threshold`` on one of its
    images, capped at ``MAX_COUNT`` (index: study_id)."""
    kept = boxes[boxes["score"] >= threshold].groupby("image_id").size()
    per_image = images["image_id"].map(kept).fillna(0).astype(int).clip(upper=MAX_COUNT)
    return per_image.groupby(images["study_id"].to_numpy()).max().rename_axis("study_id")


def count_class_frequencies(counts: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``[MAX_COUNT + 1, len(STUDY_CLASSES)]``: each count's class frequencies; a count no study has gets
    the class frequencies of all studies."""
    onehot = np.eye(len(STUDY_CLASSES))[[STUDY_CLASSES.index(c) for c in labels]].reshape(-1, len(STUDY_CLASSES))
    overall = onehot.mean(0) if len(onehot) else np.full(len(STUDY_CLASSES), 1 / len(STUDY_CLASSES))
    table = np.empty((MAX_COUNT + 1, len(STUDY_CLASSES)))
    for count in range(MAX_COUNT + 1):
        here = counts == count
        table[count] = onehot[here].mean(0) if here.any() else overall
    return table


def box_count_rule(images: pd.DataFrame, boxes: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """The box-count rule's out-of-fold study probabilities: ``study_id, model_fold, label, p_<class>...`` (as
    ``covidkit.study_scores.study_probabilities``), each study scored with the count frequencies of the
    other folds' studies.

    ``images``: ``image_id, study_id, fold, model_fold, label`` (a study's images share one fold); ``boxes``: the
    fused OOF boxes (``image_id, score``).
    """
    counts = study_box_counts(images, boxes, threshold)
    studies = images.groupby("study_id", sort=True).agg(model_fold=("model_fold", "first"),
                                                        fold=("fold", "first"), label=("label", "first")).reset_index()
    studies["count"] = studies["study_id"].map(counts).to_numpy()
    probs = np.empty((len(studies), len(STUDY_CLASSES)))
    for fold in studies["fold"].unique():
        here = (studies["fold"] == fold).to_numpy()
        frequencies = count_class_frequencies(studies.loc[~here, "count"].to_numpy(),
                                              studies.loc[~here, "label"].to_numpy())
        probs[here] = frequencies[studies.loc[here, "count"].to_numpy()]
    columns = [f"p_{c}" for c in STUDY_CLASSES]
    return studies[["study_id", "model_fold", "label", "count"]].join(pd.DataFrame(probs, columns=columns))
