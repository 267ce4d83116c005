"""The K-fold driver: one model per validation split, each trained on every other split, and each split's
held-out rows predicted by its own model (the out-of-fold predictions). Used by 03, 04 and 06.

A table's ``fold`` column holds 00's folds (``folds.csv``); ``fold_table`` adds the validation ``split``
(``fold_groups`` merges the folds into fewer splits, patients still never cross, ``covidkit.folds``). The stage
gives ``run_folds`` a ``train_fold(split, train_rows, held_out)`` that trains (``covidkit.engine.fit``) and
predicts its held-out rows; the driver picks the splits and the training rows (a dry run's few) and collects
what each split returns, in split order.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import pandas as pd

from covidkit.folds import validation_splits

T = TypeVar("T")
TrainFold = Callable[[int, pd.DataFrame, pd.DataFrame], T]


def limit_rows(table: pd.DataFrame, n: int | None, by: str = "split") -> pd.DataFrame:
    """``n`` rows of each ``by`` group (the table itself when ``n`` is None): with a ``label`` column, one of each
    label first, so that a dry run still sees every class."""
    if n is None:
        return table
    keys = [by, "label"] if "label" in table else [by]
    order = table.assign(_k=table.groupby(keys, sort=False).cumcount()).sort_values("_k", kind="stable")
    return order.groupby(by, sort=False, group_keys=False).head(n).drop(columns="_k").sort_index()


def training_rows(table: pd.DataFrame, split: int, max_items: int | None) -> pd.DataFrame:
    """The rows that validation split ``split``'s model trains on (every other split); in a dry run
    ``max_items`` of them in all (labels taking turns), as the held-out split has."""
    train = table[table["split"] != split]
    if max_items is None:
        return train
    return train.loc[limit_rows(train.assign(split=-1), max_items).index]


def fold_table(table: pd.DataFrame, fold_groups: int | None, max_items: int | None = None) -> pd.DataFrame:
    """``table`` (with 00's ``fold`` column) with its validation ``split`` column; ``max_items`` rows per split."""
    table = table.copy()
    table["split"] = validation_splits(table["fold"], fold_groups)
    return limit_rows(table, max_items)


def splits_to_run(table: pd.DataFrame, only: Sequence[int] | None = None) -> list[int]:
    """The table's validation splits, or those of ``only`` (each must be one of them), in order."""
    splits = sorted(int(s) for s in table["split"].unique())
    if only is None:
        return splits
    unknown = sorted(set(int(s) for s in only) - set(splits))
    if unknown:
        raise ValueError(f"folds {unknown} are not among the splits {splits}")
    return sorted(int(s) for s in only)


def run_folds(table: pd.DataFrame, train_fold: TrainFold, only: Sequence[int] | None = None,
              max_items: int | None = None) -> list[T]:
    """``train_fold(split, training rows, held-out rows)`` for each split to run; their results in split order."""
    return [train_fold(split, training_rows(table, split, max_items), table[table["split"] == split])
            for split in splits_to_run(table, only)]
