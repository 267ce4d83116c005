"""Cross-validation folds: stratified by study label, grouped by patient.

A patient may have several studies and a study several images; all of them must land in the
same fold, or a model would be validated on a patient it was trained on. The group of a study
is its patient (``PatientID``), or the study itself when the patient is unknown. Studies that
share a patient, even through different images, are joined into one group.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold

from covidkit.deprecated import moved


def _is_missing(values: pd.Series) -> pd.Series:
    return values.isna() | (values.astype(str).str.strip() == "")


def study_groups(images: pd.DataFrame) -> pd.Series:
    """Group number of every study (index: ``study_id``, sorted): studies linked by a patient share one.

    The numbering depends only on the data, not on the row order of ``images``.
    """
    has_patient = ~_is_missing(images["patient_id"])
    studies = pd.Index(sorted(images["study_id"].unique()))
    patients = pd.Index(images.loc[has_patient, "patient_id"].astype(str).unique())
    # A graph of studies and patients, one edge per (study, patient) seen on an image: its
    # connected components are the groups (a study without patient is a component by itself).
    # Studies are the first nodes, so components are numbered in study order.
    rows = studies.get_indexer(images.loc[has_patient, "study_id"])
    cols = len(studies) + patients.get_indexer(images.loc[has_patient, "patient_id"].astype(str))
    n = len(studies) + len(patients)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    return pd.Series(component[: len(studies)], index=studies, name="group")


def _study_table(images: pd.DataFrame, study_labels: pd.DataFrame) -> pd.DataFrame:
    """One row per study of ``images``: ``study_id, label, group``, sorted by ``study_id``."""
    labels = study_labels.drop_duplicates(["study_id", "label"])
    conflicting = labels["study_id"][labels["study_id"].duplicated()].unique().tolist()
    if conflicting:
        raise ValueError(f"{len(conflicting)} studies have several labels, e.g. {conflicting[:5]}")
    table = study_groups(images).rename_axis("study_id").reset_index()
    table = table.merge(labels[["study_id", "label"]], on="study_id", how="left")
    unlabelled = table.loc[_is_missing(table["label"]), "study_id"].tolist()
    if unlabelled:
        raise ValueError(f"{len(unlabelled)} studies have no label, e.g. {unlabelled[:5]}")
    return table.sort_values("study_id", ignore_index=True)


def make_folds(images: pd.DataFrame, study_labels: pd.DataFrame, k: int = 5, seed: int = 42) -> pd.DataFrame:
    """Assign each image a fold in ``0..k-1``.

    ``images``: ``image_id, study_id, patient_id`` (patient_id may be NaN or empty);
    ``study_labels``: ``study_id, label``. Returns ``image_id, study_id, patient_id, label, fold``
    in the row order of ``images``. Studies are split with scikit-learn's ``StratifiedGroupKFold``
    (stratified by label, grouped by patient), one sample per study so that a study with many
    images does not weigh more. The split depends only on the data and ``seed``, not on the
    row order of the inputs (studies are sorted by id first).
    """
    missing = [c for c in ("image_id", "study_id", "patient_id") if c not in images.columns]
    missing += [f"study_labels.{c}" for c in ("study_id", "label") if c not in study_labels.columns]
    if missing:
        raise ValueError(f"missing columns {missing}")
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    studies = _study_table(images, study_labels)
    n_groups = studies["group"].nunique()
    if k > n_groups:
        raise ValueError(f"k={k} folds need at least {k} patients (groups), got {n_groups}")
    studies["fold"] = -1
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, val) in enumerate(splitter.split(studies, studies["label"], groups=studies["group"])):
        studies.loc[val, "fold"] = fold
    out = images[["image_id", "study_id", "patient_id"]].merge(
        studies[["study_id", "label", "fold"]], on="study_id", how="left", validate="many_to_one",
    )
    return out.astype({"fold": int})


def model_folds(folds, fold_groups: int | None):
    """The training stages' fold of each row (the fold whose model holds it out): its fold of 00, or
    ``fold % fold_groups`` (00's folds merged into fewer, larger ones: a cheap run trains fewer models and still
    predicts every image out of fold; patients still never cross)."""
    return folds % fold_groups if fold_groups else folds


__getattr__ = moved(__name__, {"validation_splits": "covidkit.folds.model_folds"})  # deprecated names
