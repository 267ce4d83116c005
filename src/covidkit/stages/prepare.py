"""Stage 00: DICOM to PNG for the competition folder, ``meta.csv``, the grouped folds, the prepared size.

Reads ``<input_dir>/siim-covid19-detection/`` (Kaggle layout: ``train/``, ``test/``, the CSVs).
Writes ``<run_dir>/prepared/``: ``<split>/<image_id>.png`` (square, ``prepared_size``), ``meta.csv`` (one row
per DICOM: original size, photometric, status and error), ``folds.csv`` (grouped, stratified K folds) and
``meta.json`` (the size, which every later stage reads). Re-running finishes an interrupted run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from covidkit.data.siim import COMPETITION
from covidkit.layout import RunLayout
from covidkit.prepare import PrepareSummary, prepare
from covidkit.stages import StageConfig, stage_main, write_settings


# What this stage reads (covidkit.records fingerprints them: a change reruns it): dataset folders of
# <input_dir> ("weights": pretrained files), and the stages whose outputs it reads.
DATASETS = ['siim-covid19-detection']
UPSTREAM = []


def outputs(layout: RunLayout, settings: dict) -> list[Path]:
    """What this stage writes (covidkit.records hashes it; default: the stage's folder): the prepared folder."""
    return [layout.prepare.dir]


@dataclass
class Config(StageConfig):
    prepared_size: int = 512  # side of the square PNGs
    folds: int = 5  # K of the grouped, stratified folds
    seed: int = 42  # of the fold assignment
    workers: int | None = None  # processes (None: all cores)


Result = PrepareSummary


def run(cfg: Config) -> PrepareSummary:
    write_settings(cfg)
    return prepare_folder(cfg, Path(cfg.input_dir) / COMPETITION, cfg.layout.prepare.dir)


def prepare_folder(cfg: Config, competition_dir: str | Path, output_dir: str | Path, split: str = "all",
                   progress: bool = True) -> PrepareSummary:
    """``covidkit.prepare.prepare`` with this stage's settings (what ``covidkit prepare`` runs too)."""
    return prepare(competition_dir, output_dir, size=cfg.prepared_size, split=split, workers=cfg.workers,
                   folds=cfg.folds, seed=cfg.seed, progress=progress)


def describe(result: PrepareSummary) -> str:
    return result.line()


def main(argv: list[str] | None = None) -> None:
    stage_main(__name__, argv)


if __name__ == "__main__":
    main()
