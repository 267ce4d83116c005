"""Stage 04: YOLO fine-tuned on SIIM, one model per fold, out-of-fold boxes.

Reads ``<run_dir>/prepared/`` (00), ``<input_dir>/siim-covid19-detection/train_image_level.csv`` and 02's
weights. Writes ``<run_dir>/04_train_siim_yolo/``: ``data/`` (links to the PNGs, labels, one data YAML per
fold), ``fold<k>/`` (one ultralytics run per fold), ``oof.csv`` + ``oof_images.csv`` (the shared OOF
format of ``covidkit.oof``, original pixels), ``oof_untrained.csv`` (the untrained baseline), ``summary.json``
(per-fold and OOF AP@0.5, untrained AP, ``prior_box_ap50``: the prior-box detector's on the same folds). Each
fold's model predicts its held-out images with the weights ultralytics keeps: with ``val: false`` in ``hyp``
(both profiles) that is the last epoch, not a checkpoint picked on the images it is scored on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import numpy as np
import pandas as pd

from covidkit.baselines import prior_box_oof
from covidkit.data import yolo_format
from covidkit.images import read_grey
from covidkit.data.siim import COMPETITION
from covidkit.engine.kfold import MODEL_FOLD, check_train_folds, fold_table, folds_to_run, run_folds
from covidkit.engine.yolo import YoloRun, YoloTrainConfig, train_yolo
from covidkit.models.yolo import PREDICT_CONF, load_model, predict_boxes, setup_ultralytics
from covidkit.oof import OofPredictions, from_prepared, opacity_ap, per_fold_ap, write_oof
from covidkit.learning import (
    AP_MARGIN, DETECTOR_FIGURE, LearningCheck, PRIOR_BOXES, finite, image_score_spread, prior_box_check, read_json,
)
from covidkit.layout import RunLayout
from covidkit.pseudo import add_pseudo_rows, stage_rows
from covidkit.stages import StageConfig, stage_main, write_settings


# What this stage reads (covidkit.records fingerprints them: a change reruns it): dataset folders of
# <input_dir> ("weights": pretrained files), and the stages whose outputs it reads.
DATASETS = ['siim-covid19-detection']
UPSTREAM = ['00_prepare_data', '02_pretrain_rsna_yolo']


@dataclass
class Config(StageConfig):
    # deprecated setting names (covidkit.stages)
    RENAMED: ClassVar[dict[str, str]] = {"folds": "train_folds", "splits": "train_folds"}
    seed: int = 42
    model: str | None = None  # None: the weights of 02; or another .pt file, or a model YAML
    baseline_model: str | None = "yolo11l.yaml"  # untrained model YAML to compare with; None: skip
    input_size: int = 1024
    epochs: int = 30
    batch_size: int = 16  # total over all GPUs
    device: str | None = None  # None: every visible GPU, else the CPU; or "cpu", "0", "0,1,2,3"
    workers: int = 8
    fold_groups: int | None = None  # merge the folds of 00 into this many folds (as 03); None: 00's folds
    train_folds: list[int] | None = None  # folds to train (see fold_groups); None: all (OOF over every training image)
    conf: float = PREDICT_CONF  # lowest score kept in the OOF predictions (the AP needs the low ones)
    pseudo_labels: str | None = None  # 08's pseudo_labels.csv (a round, docs/pseudo-labels.md); None: none
    pseudo_weight: float = 1.0  # sampling weight: how often a pseudo-labelled image is drawn against a labelled one
    save_period: int = -1
    resume: bool = True
    hyp: dict = field(default_factory=dict)  # any other ultralytics training argument

    def __post_init__(self) -> None:
        check_train_folds(self.train_folds)

    def train_config(self) -> YoloTrainConfig:
        return YoloTrainConfig.from_stage(self, self.model or str(self.layout.rsna_yolo.weights))


@dataclass
class Result:
    runs: dict[int, YoloRun]
    oof: OofPredictions
    fold_ap: pd.Series
    ap: float
    baseline_ap: float | None
    prior_box_ap: float  # the prior-box detector (mean training box per lung zone), same images and folds
    out_dir: Path


def predict_table(model, table: pd.DataFrame, cfg: Config, conf: float, prepared_size: int) -> OofPredictions:
    """A YOLO's boxes on the rows of a prepared table, in original pixels."""
    images = [read_grey(p) for p in table["path"]]
    return from_prepared(table, predict_boxes(model, images, cfg.input_size, cfg.device, conf), prepared_size)


def untrained_predictions(table: pd.DataFrame, cfg: Config, prepared_size: int) -> OofPredictions:
    """The baseline: ``baseline_model`` at its random initial weights (seed ``cfg.seed``), on the same images.

    conf 0: an untrained head scores everything near its prior (~1e-4), below any threshold; its AP is that
    of its boxes, not of an empty prediction.
    """
    import torch

    torch.manual_seed(cfg.seed)
    return predict_table(load_model(cfg.baseline_model), table, cfg, 0.0, prepared_size)


def run(cfg: Config) -> Result:
    write_settings(cfg)
    setup_ultralytics(cfg.run_dir)
    out = cfg.layout.siim_yolo
    table = fold_table(cfg.layout.prepare.train_table(Path(cfg.input_dir) / COMPETITION), cfg.fold_groups,
                       cfg.max_items)
    prepared_size = cfg.layout.prepare.size
    folds = folds_to_run(table, cfg.train_folds)
    data_root = yolo_format.write_siim_dataset(table, out.data)
    pseudo = stage_rows(cfg, sampling=True)  # a round's pseudo-labelled images: in every fold's training list only
    if pseudo is not None:
        yolo_format.write_siim_dataset(pseudo.drop_duplicates("image_id"), data_root)

    def train_fold(fold: int, train_rows: pd.DataFrame, held_out: pd.DataFrame):
        train_rows = add_pseudo_rows(train_rows, pseudo)
        data_yaml = yolo_format.write_siim_fold(pd.concat([train_rows, held_out]), data_root, fold, column=MODEL_FOLD)
        run = train_yolo(cfg.train_config(), data_yaml, out.fold(fold), resume=cfg.resume)
        return run, predict_table(load_model(run.weights), held_out, cfg, cfg.conf, prepared_size)

    trained = run_folds(table, train_fold, folds, cfg.max_items)
    runs = {fold: run for fold, (run, _) in zip(folds, trained)}
    pieces = [oof for _, oof in trained]
    oof = OofPredictions.concat(pieces)
    write_oof(out.oof, oof)

    truth = dict(zip(table["image_id"], table["boxes"]))
    baseline_ap = None
    if cfg.baseline_model:
        untrained = untrained_predictions(table[table[MODEL_FOLD].isin(folds)], cfg, prepared_size)
        write_oof(out.untrained_oof, untrained)
        baseline_ap = opacity_ap(untrained, truth)
    result = Result(runs=runs, oof=oof, fold_ap=per_fold_ap(oof, truth), ap=opacity_ap(oof, truth),
                    baseline_ap=baseline_ap,
                    prior_box_ap=opacity_ap(prior_box_oof(table, MODEL_FOLD, image_ids=oof.images["image_id"]), truth),
                    out_dir=out.dir)
    summary = {"oof_ap50": _number(result.ap), "untrained_ap50": _number(result.baseline_ap),
               "prior_box_ap50": _number(result.prior_box_ap),
               "fold_ap50": {int(k): _number(v) for k, v in result.fold_ap.items()},
               "folds": folds, "images": len(oof.images), "model": cfg.train_config().model}
    out.summary.write_text(json.dumps(summary, indent=2))
    return result


def _number(value: float | None) -> float | None:
    """JSON has no NaN (AP of a fold without ground-truth boxes): None instead."""
    return None if value is None or np.isnan(value) else float(value)


def describe(result: Result) -> str:
    return (result.fold_ap.to_string(float_format="%.4f") + f"\nOOF opacity AP@0.5: {result.ap:.4f}"
            f"   untrained: {result.baseline_ap}   prior boxes: {result.prior_box_ap:.4f}\n"
            f"OOF predictions: {result.out_dir}")


def learning_checks(layout: RunLayout, input_dir: Path | None) -> list[LearningCheck]:
    """The OOF AP (04's summary.json) against the untrained model's and the prior-box detector's."""
    from covidkit.oof import read_oof

    stage, model, out = "04_train_siim_yolo", "YOLO", layout.siim_yolo
    if not out.dir.is_dir():
        return []
    summary = read_json(out.summary)
    if summary is None or not finite(summary.get("oof_ap50")) or not out.oof.is_file():
        why = f"no oof_ap50 in {out.summary}" if out.oof.is_file() else f"{out.oof.name} not written"
        return [LearningCheck.absent(stage, model, DETECTOR_FIGURE, name, why) for name in ("untrained", PRIOR_BOXES)]
    oof = read_oof(out.oof)
    value, spread = summary["oof_ap50"], image_score_spread(oof.boxes, oof.images)
    untrained = (LearningCheck(stage, model, DETECTOR_FIGURE, value, summary["untrained_ap50"], "untrained", AP_MARGIN,
                               spread) if finite(summary.get("untrained_ap50")) else
                 LearningCheck.absent(stage, model, DETECTOR_FIGURE, "untrained",
                                      f"no untrained_ap50 in {out.summary}"))
    return [untrained, prior_box_check(stage, model, value, summary, out.summary, spread)]


def main(argv: list[str] | None = None) -> None:
    stage_main(__name__, argv)


if __name__ == "__main__":
    main()
