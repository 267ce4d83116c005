"""The K-fold driver: one model per fold, each trained on every other fold, and each fold's held-out rows
predicted by its own model (the out-of-fold predictions). Used by 03, 04 and 06.

A table's ``fold`` column holds 00's folds (``folds.csv``); ``fold_table`` adds ``model_fold``, the fold a
training stage holds out: 00's fold, or with ``fold_groups`` 00's folds merged into fewer (``fold % fold_groups``,
patients still never cross, ``covidkit.folds``). The stage gives ``run_folds`` a
``train_fold(fold, train_rows, held_out)`` that trains (``covidkit.engine.fit``) and predicts its held-out rows;
the driver picks the folds and the training rows (a dry run's few) and collects what each fold returns, in fold
order.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import pandas as pd

from covidkit.deprecated import moved
from covidkit.folds import model_folds

T = TypeVar("T")
TrainFold = Callable[[int, pd.DataFrame, pd.DataFrame], T]
MODEL_FOLD = "model_fold"  # a training table's column: the fold whose model holds the row out


def limit_rows(table: pd.DataFrame, n: int | None, by: str = MODEL_FOLD) -> pd.DataFrame:
    """``n`` rows of each ``by`` group (the table itself when ``n`` is None): with a ``label`` column, one of each
    label first, so that a dry run still sees every class."""
    if n is None:
        return table
    keys = [by, "label"] if "label" in table else [by]
    order = table.assign(_k=table.groupby(keys, sort=False).cumcount()).sort_values("_k", kind="stable")
    return order.groupby(by, sort=False, group_keys=False).head(n).drop(columns="_k").sort_index()


def training_rows(table: pd.DataFrame, fold: int, max_items: int | None) -> pd.DataFrame:
    """The rows that fold ``fold``'s model trains on (every other fold); in a dry run ``max_items`` of them in
    all (labels taking turns), as the held-out fold has."""
    train = table[table[MODEL_FOLD] != fold]
    if max_items is None:
        return train
    return train.loc[limit_rows(train.assign(**{MODEL_FOLD: -1}), max_items).index]


def fold_table(table: pd.DataFrame, fold_groups: int | None, max_items: int | None = None) -> pd.DataFrame:
    """``table`` (with 00's ``fold`` column) with its ``model_fold`` column; ``max_items`` rows per fold."""
    table = table.copy()
    table[MODEL_FOLD] = model_folds(table["fold"], fold_groups)
    return limit_rows(table, max_items)


def check_train_folds(train_folds) -> None:
    """A stage's ``train_folds`` is a list of model folds or None; a number is most likely 00's ``folds`` (how
    many folds) given to every stage, so the error says so before anything trains."""
    if train_folds is not None and (isinstance(train_folds, (int, str)) or
                                    not all(isinstance(f, int) and not isinstance(f, bool) for f in train_folds)):
        raise ValueError(f"train_folds is the list of folds to train (e.g. [0, 1]) or null for all, got "
                         f"{train_folds!r}; the number of folds is 00's setting: --set 00.folds=N")


def folds_to_run(table: pd.DataFrame, only: Sequence[int] | None = None) -> list[int]:
    """The table's model folds, or those of ``only`` (each must be one of them), in order."""
    folds = sorted(int(f) for f in table[MODEL_FOLD].unique())
    if only is None:
        return folds
    unknown = sorted(set(int(f) for f in only) - set(folds))
    if unknown:
        raise ValueError(f"folds {unknown} are not among the folds {folds}")
    return sorted(int(f) for f in only)


def run_folds(table: pd.DataFrame, train_fold: TrainFold, only: Sequence[int] | None = None,
              max_items: int | None = None) -> list[T]:
    """``train_fold(fold, training rows, held-out rows)`` for each fold to run; their results in fold order."""
    return [train_fold(fold, training_rows(table, fold, max_items), table[table[MODEL_FOLD] == fold])
            for fold in folds_to_run(table, only)]


__getattr__ = moved(__name__, {"splits_to_run": "covidkit.engine.kfold.folds_to_run"})  # deprecated names
