"""Trivial baselines of CT volume classification: rules that see only a volume's HU histogram.

A volume classifier is worth its cost only if it beats these: the share of voxels in a density range
(:func:`hu_share`, no training; -700 to -200 HU is ground glass and partial volume) and a logistic regression
on the whole volume's 64-bin HU histogram (:func:`histogram_baseline_auc`). Neither looks at where the
density is, so neither can tell a COVID-19 pattern from another disease of the same extent.
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

HIST_RANGE = (-1024.0, 200.0)  # HU; voxels outside are counted in the end bins


def hu_histogram(volume_hu: np.ndarray, bins: int = 64, hu_range: tuple[float, float] = HIST_RANGE) -> np.ndarray:
    """Share of the volume's voxels in each of ``bins`` equal HU bins over ``hu_range`` (clipped into it)."""
    values = np.clip(np.asarray(volume_hu, np.float32).ravel(), *hu_range)
    counts, _ = np.histogram(values, bins=bins, range=hu_range)
    return counts / max(1, values.size)


def hu_share(volume_hu: np.ndarray, lo: float = -700.0, hi: float = -200.0) -> float:
    """Share of the volume's voxels with ``lo <= HU < hi``."""
    values = np.asarray(volume_hu)
    return float(np.mean((values >= lo) & (values < hi)))


def histogram_model(seed: int = 0, folds: int = 5):
    """Standardised histogram -> logistic regression, its L2 strength chosen by inner cross-validation."""
    return make_pipeline(StandardScaler(), LogisticRegressionCV(
        Cs=np.logspace(-4, 2, 7), cv=StratifiedKFold(folds, shuffle=True, random_state=seed), scoring="roc_auc",
        solver="liblinear", max_iter=1000))


def _fit(model, hists: np.ndarray, labels: np.ndarray):
    with warnings.catch_warnings():  # scikit-learn 1.8+ announces LogisticRegressionCV's new defaults
        warnings.simplefilter("ignore", FutureWarning)
        return model.fit(np.asarray(hists), labels)


def histogram_baseline_auc(train_hists: np.ndarray, train_labels: np.ndarray, test_hists: np.ndarray,
                           test_labels: np.ndarray, seed: int = 0) -> float:
    """Held-out ROC AUC of the histogram logistic regression trained on the training volumes."""
    train_labels, test_labels = np.asarray(train_labels).astype(int), np.asarray(test_labels).astype(int)
    if len(np.unique(test_labels)) < 2:
        return float("nan")
    folds = int(min(5, np.bincount(train_labels, minlength=2).min()))
    if folds < 2:
        return float("nan")
    model = _fit(histogram_model(seed, folds), train_hists, train_labels)
    return float(skm.roc_auc_score(test_labels, model.predict_proba(np.asarray(test_hists))[:, 1]))


def share_auc(shares: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of a share used as the score (higher share: COVID-19), no training."""
    return float(skm.roc_auc_score(np.asarray(labels).astype(int), np.asarray(shares, float)))
