"""Patient-grouped, label-stratified folds."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from covidkit.data.siim import STUDY_CLASSES
from covidkit.folds import make_folds, study_groups

FREQUENCIES = [0.27, 0.47, 0.18, 0.08]  # negative, typical, indeterminate, atypical, as in the real data


def synthetic_tables(n_studies: int = 300, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Studies with realistic labels; ~70 % of patients known, some with several studies;
    some studies with several images."""
    rng = np.random.default_rng(seed)
    studies = [f"study{i:04d}" for i in range(n_studies)]
    labels = rng.choice(STUDY_CLASSES, size=n_studies, p=FREQUENCIES)
    patients = [f"patient{rng.integers(0, n_studies // 2)}" if rng.random() < 0.7 else None for _ in studies]
    rows = [
        (f"{study}_img{j}", study, patient)
        for study, patient in zip(studies, patients)
        for j in range(rng.choice([1, 1, 1, 1, 2, 3]))
    ]
    images = pd.DataFrame(rows, columns=["image_id", "study_id", "patient_id"])
    return images, pd.DataFrame({"study_id": studies, "label": labels})


def test_output_columns_and_rows():
    images, labels = synthetic_tables()
    folds = make_folds(images, labels, k=5, seed=42)
    assert list(folds.columns) == ["image_id", "study_id", "patient_id", "label", "fold"]
    assert folds["image_id"].tolist() == images["image_id"].tolist()
    assert set(folds["fold"]) == set(range(5))
    assert folds["fold"].dtype.kind == "i"
    expected = folds["study_id"].map(labels.set_index("study_id")["label"])
    assert (folds["label"] == expected).all()


def test_no_patient_or_study_in_two_folds():
    images, labels = synthetic_tables()
    folds = make_folds(images, labels, k=5)
    assert folds.groupby("study_id")["fold"].nunique().max() == 1
    assert folds.dropna(subset=["patient_id"]).groupby("patient_id")["fold"].nunique().max() == 1
    # the table does have patients with several studies, so the grouping was needed
    assert images.dropna().groupby("patient_id")["study_id"].nunique().max() > 1


def test_class_proportions_per_fold_follow_the_data():
    images, labels = synthetic_tables()
    studies = make_folds(images, labels, k=5).drop_duplicates("study_id")
    overall = studies["label"].value_counts(normalize=True)
    per_fold = pd.crosstab(studies["fold"], studies["label"], normalize="index")
    assert (per_fold - overall).abs().max().max() < 0.04  # a grouped, unstratified split misses by ~.1
    sizes = studies["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 0.1 * len(studies)


def test_deterministic_for_a_seed_and_independent_of_row_order():
    images, labels = synthetic_tables()
    first = make_folds(images, labels, seed=7)
    assert first.equals(make_folds(images, labels, seed=7))
    shuffled = make_folds(images.sample(frac=1, random_state=1), labels.sample(frac=1, random_state=2), seed=7)
    assert shuffled.set_index("image_id")["fold"].sort_index().equals(first.set_index("image_id")["fold"].sort_index())
    assert not make_folds(images, labels, seed=8)["fold"].equals(first["fold"])


@pytest.mark.filterwarnings("ignore:The least populated class")
def test_studies_without_patient_are_their_own_group():
    images = pd.DataFrame({
        "image_id": ["a1", "a2", "b1", "c1", "d1", "e1"],
        "study_id": ["A", "A", "B", "C", "D", "E"],
        "patient_id": [np.nan, np.nan, "", "p1", "p1", None],
    })
    groups = study_groups(images)
    assert groups["C"] == groups["D"]
    assert groups[["A", "B", "C", "E"]].nunique() == 4
    labels = pd.DataFrame({"study_id": list("ABCDE"), "label": ["negative", "typical", "typical", "typical", "atypical"]})
    folds = make_folds(images, labels, k=2)
    fold = folds.set_index("image_id")["fold"]
    assert fold["a1"] == fold["a2"] and fold["c1"] == fold["d1"]
    assert sorted(folds["fold"].unique()) == [0, 1]


def test_studies_sharing_a_patient_through_any_image_are_joined():
    images = pd.DataFrame({
        "image_id": ["a1", "a2", "b1", "c1"],
        "study_id": ["A", "A", "B", "C"],
        "patient_id": ["p1", "p2", "p2", "p3"],
    })
    groups = study_groups(images)
    assert groups["A"] == groups["B"] != groups["C"]


def test_errors():
    images, labels = synthetic_tables(n_studies=40)
    with pytest.raises(ValueError, match=r"1 studies have no label, e\.g\. \['study0003'\]"):
        make_folds(images, labels[labels["study_id"] != "study0003"])
    unlabelled = labels.assign(label=lambda d: d["label"].where(d["study_id"] != "study0005"))
    with pytest.raises(ValueError, match="study0005"):
        make_folds(images, unlabelled)
    actual = labels.set_index("study_id").loc["study0001", "label"]
    other = next(c for c in STUDY_CLASSES if c != actual)
    conflicting = pd.concat([labels, pd.DataFrame({"study_id": ["study0001"], "label": [other]})])
    with pytest.raises(ValueError, match=r"1 studies have several labels, e\.g\. \['study0001'\]"):
        make_folds(images, conflicting)
    small = images[images["study_id"].isin(["study0000", "study0001"])].assign(patient_id=None)
    with pytest.raises(ValueError, match="k=5 folds need at least 5 patients"):
        make_folds(small, labels, k=5)
    with pytest.raises(ValueError, match="k must be at least 2"):
        make_folds(images, labels, k=1)
    with pytest.raises(ValueError, match="missing columns"):
        make_folds(images.drop(columns="patient_id"), labels)
