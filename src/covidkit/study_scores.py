"""The study model's out-of-fold tables and their scores (06): per-image and per-study probabilities, the
competition's AP of the study classes and of ``none``, and the choice of the ``none`` rule.

Columns of an image table: ``image_id, study_id, model_fold, fold, label, has_box, p_<class>..., p_none_head``
(``model_fold``: the fold whose model predicted the image, ``covidkit.engine.kfold``); a study table:
``study_id, model_fold, label, p_<class>...`` (the mean over the study's images).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from covidkit.data.siim import STUDY_CLASSES
from covidkit.metrics import ONE_PIXEL_BOX, average_precision
from covidkit.models.study import NEGATIVE, NONE_RULES, none_probability
from covidkit.oof import OofPredictions

PROB_COLUMNS = [f"p_{c}" for c in STUDY_CLASSES]
AUTO = "auto"  # none_rule: chosen on the out-of-fold images


def study_probabilities(images: pd.DataFrame) -> pd.DataFrame:
    """Per study: the mean of its images' probabilities (``study_id, model_fold, label, p_<class>...``)."""
    return (images.groupby("study_id", sort=True)
            .agg({"model_fold": "first", "label": "first", **{c: "mean" for c in PROB_COLUMNS}})
            .reset_index())


def study_aps(studies: pd.DataFrame) -> dict[str, float]:
    """The competition AP of each study class (each study one ``0 0 1 1`` box) and their mean ``mAP``."""
    aps = {}
    for c, col in zip(STUDY_CLASSES, PROB_COLUMNS):
        gt = {s: ONE_PIXEL_BOX for s, label in zip(studies["study_id"], studies["label"]) if label == c}
        aps[c] = average_precision(gt, [(s, p, 0, 0, 1, 1) for s, p in zip(studies["study_id"], studies[col])])
    aps["mAP"] = float(np.nanmean([aps[c] for c in STUDY_CLASSES]))
    return aps


def none_ap(images: pd.DataFrame, none_probs) -> float:
    """The competition AP of ``none`` (an image without box is one ``0 0 1 1`` box) for given probabilities."""
    gt = {i: ONE_PIXEL_BOX for i, has_box in zip(images["image_id"], images["has_box"]) if not has_box}
    return average_precision(gt, [(i, float(p), 0, 0, 1, 1) for i, p in zip(images["image_id"], none_probs)])


def none_candidates(images: pd.DataFrame, studies: pd.DataFrame) -> dict[str, np.ndarray]:
    """The ``none`` estimates compared in 06, per image: the head, the image's and the study's P(negative)."""
    study_neg = images["study_id"].map(studies.set_index("study_id")[PROB_COLUMNS[NEGATIVE]])
    return {"head": images["p_none_head"].to_numpy(), "negative": images[PROB_COLUMNS[NEGATIVE]].to_numpy(),
            "study_negative": study_neg.to_numpy()}


def max_box_scores(images: pd.DataFrame, boxes: OofPredictions) -> np.ndarray:
    """The highest OOF box score of each image of ``images`` (0 where it has no box)."""
    best = boxes.boxes.groupby("image_id")["score"].max()
    return images["image_id"].map(best).fillna(0.0).to_numpy(np.float64)


def rule_probabilities(images: pd.DataFrame, boxes: OofPredictions | None) -> dict[str, np.ndarray]:
    """Per image, the ``none`` probability of each rule of ``none_probability`` (``boxes``: the detectors'
    OOF boxes; without them the rules that need boxes are left out)."""
    scores = max_box_scores(images, boxes) if boxes is not None else np.zeros(len(images))
    rules = NONE_RULES if boxes is not None else tuple(r for r in NONE_RULES if r != "boxes")
    return {rule: np.array([none_probability(neg, [s], head, rule=rule) for neg, s, head in
                            zip(images[PROB_COLUMNS[NEGATIVE]], scores, images["p_none_head"])])
            for rule in rules}


def choose_none_rule(images: pd.DataFrame, boxes: OofPredictions | None, setting: str = AUTO) -> dict:
    """The ``none`` rule 07 applies, and an honest OOF AP of that choice.

    ``setting`` ``auto``: the rule with the best ``none`` AP on all OOF images is chosen. Its honest score
    takes, for each fold of 00, the rule that scores best on the other folds' images, scored on that fold's
    images; the score is the mean over the folds (the rules' probabilities have different scales, so the
    folds are not pooled). A named rule is used as it is and scored the same way. Returns ``chosen``,
    ``ap_out_of_fold``, and each rule's ``ap`` on all images.
    """
    probs = rule_probabilities(images, boxes)
    aps = {rule: none_ap(images, p) for rule, p in probs.items()}
    folds = images["fold"].to_numpy()
    per_fold = []
    for fold in np.unique(folds):
        here = folds == fold
        rule = setting if setting != AUTO else max(probs, key=lambda r: none_ap(images[~here], probs[r][~here]))
        per_fold.append(none_ap(images[here], probs[rule][here]))
    chosen = setting if setting != AUTO else max(aps, key=aps.get)
    return {"chosen": chosen, "ap_out_of_fold": float(np.nanmean(per_fold)), "ap": aps}


def none_comparison(images: pd.DataFrame, studies: pd.DataFrame, boxes: OofPredictions | None = None) -> pd.DataFrame:
    """OOF ``none`` AP of each candidate, best first.

    Without boxes: the image head, the image's P(negative), the study's mean P(negative), which are
    also what ``none_probability`` gives for the rules ``head`` and ``negative`` when no box is
    found. With the detectors' OOF ``boxes`` (e.g. 05's fused ``oof.csv``): one row per rule of
    ``none_probability`` (named after the rule, as the profile's ``none_rule``), and the classifier
    estimates alone for comparison. Only images the boxes were evaluated on are compared, so every
    row scores the same images.
    """
    if boxes is not None:
        images = images[images["image_id"].isin(set(boxes.images["image_id"]))]
        studies = studies[studies["study_id"].isin(set(images["study_id"]))]
    candidates = none_candidates(images, studies)
    if boxes is not None:
        candidates = {f"{name} (classifier alone)": p for name, p in candidates.items()}
        candidates.update(rule_probabilities(images, boxes))
    rows = [{"candidate": name, "none_ap": none_ap(images, p), "images": len(images)} for name, p in candidates.items()]
    return pd.DataFrame(rows).sort_values("none_ap", ascending=False, kind="stable").set_index("candidate")


def summarise(images: pd.DataFrame, studies: pd.DataFrame) -> dict:
    """OOF study APs, ``none`` AP of each candidate, the class priors (about the AP of a constant guess)."""
    priors = studies["label"].value_counts(normalize=True).reindex(STUDY_CLASSES, fill_value=0).to_dict()
    return {
        "study_ap": study_aps(studies),
        "none_ap": {name: none_ap(images, p) for name, p in none_candidates(images, studies).items()},
        "prior": {**priors, "mAP": float(np.mean(list(priors.values()))), "none": float((~images["has_box"]).mean())},
        "studies": len(studies), "images": len(images),
    }
