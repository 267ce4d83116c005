"""Pseudo-labels: the table stage 08 writes, and the training rows stages 03, 04 and 06 add from it.

``pseudo_labels.csv`` holds one row per image predicted by a round's models folder (``PSEUDO_COLUMNS``):
``image_id``, ``source`` (``external`` or ``test``), ``dataset`` (the external folder's name, or ``test``),
``path`` (the prepared PNG, 00's size), ``orig_height``, ``orig_width``, the four study-class probabilities
``p_<class>`` (the soft study label, summing to 1), ``p_none`` (the image has no opacity), ``boxes``
(the pseudo-boxes in original pixels, as ``train_image_level.csv`` writes them), ``scores`` (their fused scores,
space separated) and ``mapped_to`` (the competition training image an external copy was mapped to, or empty).

``training_rows`` turns the table into rows shaped like ``covidkit.prepare.train_table`` (``label``: the most
probable class; ``boxes``: the pseudo-boxes; ``fold`` and ``model_fold`` -1, so no fold ever holds one out),
with ``pseudo`` true and the soft labels. ``sampled`` repeats them by a sampling weight (the detectors);
``with_soft_labels`` gives every row a soft label and a loss weight (the study model).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from covidkit.atomic import atomic_path
from covidkit.boxes import as_boxes, format_boxes_column, parse_boxes_column
from covidkit.data.siim import STUDY_CLASSES

SOFT_COLUMNS = [f"p_{c}" for c in STUDY_CLASSES]
PSEUDO_COLUMNS = ["image_id", "source", "dataset", "path", "orig_height", "orig_width", *SOFT_COLUMNS, "p_none",
                  "boxes", "scores", "mapped_to"]
PSEUDO_FOLD = -1  # the fold and model_fold of a pseudo-labelled row: never a held-out fold
WEIGHT = "sample_weight"  # the loss weight of a row (06): 1 for a labelled image, pseudo_weight for a pseudo one


def empty_table() -> pd.DataFrame:
    return pd.DataFrame(columns=PSEUDO_COLUMNS)


def write_pseudo_labels(table: pd.DataFrame, path: str | Path) -> Path:
    """Write the table (``boxes`` as ``[N, 4]`` arrays, ``scores`` as arrays) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = table.copy()
    out["boxes"] = [format_boxes_column(b) for b in out["boxes"]]
    out["scores"] = [" ".join(f"{s:.4f}" for s in np.asarray(v, float)) for v in out["scores"]]
    with atomic_path(path) as tmp:
        out[PSEUDO_COLUMNS].to_csv(tmp, index=False, float_format="%.6f")
    return path


def read_pseudo_labels(path: str | Path) -> pd.DataFrame:
    """The table with ``boxes`` as ``[N, 4]`` arrays and ``scores`` as float arrays."""
    table = pd.read_csv(path, dtype={"image_id": str, "mapped_to": str, "boxes": str, "scores": str},
                        keep_default_na=False)
    missing = [c for c in PSEUDO_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path} is no pseudo-label table: no column {', '.join(missing)}")
    table["boxes"] = [parse_boxes_column(b) for b in table["boxes"]]
    table["scores"] = [np.array(s.split(), float) for s in table["scores"]]
    return table


def training_rows(path: str | Path, max_items: int | None = None) -> pd.DataFrame:
    """The table as training rows (the columns of ``covidkit.prepare.train_table``, plus ``pseudo`` and the soft
    labels); a dry run's ``max_items`` rows. Empty when the table is."""
    table = read_pseudo_labels(path)
    if max_items is not None:
        table = table.head(max_items)
    probs = table[SOFT_COLUMNS].to_numpy(float).reshape(-1, len(STUDY_CLASSES))
    return pd.DataFrame({
        "image_id": table["image_id"], "study_id": table["image_id"], "patient_id": table["image_id"],
        "label": [STUDY_CLASSES[i] for i in probs.argmax(1)] if len(table) else [],
        "fold": PSEUDO_FOLD, "model_fold": PSEUDO_FOLD, "path": table["path"],
        "orig_height": table["orig_height"].astype(int), "orig_width": table["orig_width"].astype(int),
        "boxes": [as_boxes(b) for b in table["boxes"]], "pseudo": True,
        **{c: table[c].astype(float) for c in SOFT_COLUMNS},
    }).reset_index(drop=True)


def sampled(rows: pd.DataFrame, weight: float, seed: int) -> pd.DataFrame:
    """The pseudo rows by a sampling weight: each appears ``floor(weight)`` times, and once more with probability
    ``weight - floor(weight)`` (drawn once, seeded), so that ``weight`` is how often an image counts against a
    labelled one (1: as often; 0.5: half of them, each once)."""
    if weight < 0:
        raise ValueError(f"pseudo_weight must be >= 0, got {weight}")
    whole, frac = divmod(float(weight), 1.0)
    counts = np.full(len(rows), int(whole)) + (np.random.default_rng(seed).random(len(rows)) < frac)
    return rows.loc[rows.index.repeat(counts)].reset_index(drop=True)


def with_soft_labels(rows: pd.DataFrame, pseudo_weight: float) -> pd.DataFrame:
    """Every row with a soft label (``SOFT_COLUMNS``: a labelled image's one-hot) and a loss weight (``WEIGHT``:
    1 for a labelled image, ``pseudo_weight`` for a pseudo-labelled one)."""
    rows = rows.copy()
    pseudo = rows["pseudo"].fillna(False).astype(bool) if "pseudo" in rows else pd.Series(False, index=rows.index)
    for c, column in zip(STUDY_CLASSES, SOFT_COLUMNS):
        one_hot = (rows["label"] == c).astype(float)
        rows[column] = rows[column].where(pseudo, one_hot) if column in rows else one_hot
    rows[WEIGHT] = np.where(pseudo, float(pseudo_weight), 1.0)
    return rows


def add_pseudo_rows(table: pd.DataFrame, pseudo: pd.DataFrame | None) -> pd.DataFrame:
    """A fold's training rows and the pseudo-labelled ones (``pseudo`` false for the former): what 03, 04 and 06
    train each fold's model on; never its held-out rows."""
    if pseudo is None or pseudo.empty:
        return table
    return pd.concat([table.assign(pseudo=False), pseudo], ignore_index=True)


def stage_rows(cfg, sampling: bool) -> pd.DataFrame | None:
    """The pseudo-labelled training rows of a training stage's Config (its ``pseudo_labels``, ``pseudo_weight``,
    ``seed``, ``max_items``): repeated by the weight (``sampling``: the detectors) or carrying it as a loss
    weight (the study model, ``with_soft_labels``); None without a table."""
    if not cfg.pseudo_labels:
        return None
    rows = training_rows(cfg.pseudo_labels, cfg.max_items)
    return sampled(rows, cfg.pseudo_weight, cfg.seed) if sampling else rows
