"""Stage 03: K-fold Faster R-CNN opacity detector on SIIM, out-of-fold predictions, OOF AP@0.5.

One model per fold of 00, started from the NIH backbone of 01. Each model is trained at
``input_size`` with box-aware augmentations, validated each epoch (opacity AP@0.5 at ``infer_size``), and its
*last* epoch predicts its held-out images: the epoch count is fixed beforehand, so the out-of-fold AP is not
tuned on the data it reports on. ``fold_groups`` merges the K folds into fewer folds (patients still never
cross); ``train_folds`` restricts the run to some of them (the OOF then covers those only).

Reads ``<run_dir>/prepared/`` (00), 01's ``backbone.pt`` (or ``backbone``), the training labels. Writes
``<run_dir>/03_train_siim_fasterrcnn/``: ``fold<k>/`` (the engine's runs: checkpoints, ``metrics.csv``, plots;
``detector.pt``, the fold model 07 exports), ``oof.csv`` + ``oof_images.csv`` (the shared OOF format, original
pixels), ``oof_untrained.csv`` (the untrained baseline), ``summary.json`` (OOF AP@0.5 beside its baselines: the
untrained detector's and the prior-box detector's, ``covidkit.baselines.prior_box_oof``, on the same folds).
Multi-GPU: ``torchrun --nproc_per_node 4 -m covidkit.stages.siim_fasterrcnn --profile full``.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from typing import ClassVar
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from covidkit.baselines import prior_box_oof
from covidkit.deprecated import moved
from covidkit.derived import derived
from covidkit.data.detection import OpacityDataset, truth_boxes
from covidkit.data.siim import COMPETITION
from covidkit.engine import (
    TrainConfig, collate_lists, cosine_with_floor, fit, init_distributed, load_weights, seed_everything, to_device,
)
from covidkit.engine.distributed import all_gather_object, barrier, device_for, dist_info
from covidkit.engine.kfold import MODEL_FOLD, check_train_folds, fold_table, run_folds
from covidkit.engine.optim import optimizer_fn
from covidkit.models.backbones import backbone_file, load_backbone
from covidkit.models.fasterrcnn import DetectorSpec, build_fasterrcnn, predict_boxes, save_detector
from covidkit.oof import OofPredictions, from_prepared, opacity_ap, restrict, write_oof
from covidkit.learning import (
    AP_MARGIN, DETECTOR_FIGURE, LearningCheck, PRIOR_BOXES, image_score_spread, prior_box_check, read_json, training_truth,
)
from covidkit.layout import RunLayout
from covidkit.pseudo import add_pseudo_rows, stage_rows
from covidkit.stages import StageConfig, stage_main, write_settings
from covidkit.transforms import DetectionAugment, detection_transform



# What this stage reads (covidkit.records fingerprints them: a change reruns it): dataset folders of
# <input_dir> ("weights": pretrained files), and the stages whose outputs it reads.
DATASETS = ['siim-covid19-detection']
UPSTREAM = ['00_prepare_data', '01_pretrain_nih_resnext']


@dataclass
class Config(StageConfig):
    # deprecated setting names (covidkit.stages)
    RENAMED: ClassVar[dict[str, str]] = {"folds": "train_folds", "splits": "train_folds"}
    seed: int = 42
    backbone: str | None = None  # NIH backbone checkpoint; None: the one 01 saved in the run folder
    input_size: int = 512  # training resolution
    infer_size: int = 1024  # validation / out-of-fold resolution
    # the detector's shape (see covidkit.models.DetectorSpec): torchvision's defaults, small in smoke
    trainable_layers: int = 5
    fpn_layers: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    anchor_scales: list[float] = field(default_factory=lambda: [1.0])
    rpn_fg_iou: float = 0.7
    proposals_train: int = 2000
    proposals_test: int = 1000
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    representation_size: int = 1024
    frozen_batchnorm: bool = True  # False: the backbone's batch norms train (smoke: a barely pretrained backbone)
    epochs: int = 12
    batch_size: int = 8
    optimizer: str = "sgd"  # "sgd" (momentum) or "adamw" (learns faster from weak backbones: smoke)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_floor: float = 0.05
    augment: dict = field(default_factory=dict)  # DetectionAugment fields to override (e.g. rotate_degrees)
    clip_grad_norm: float | None = 10.0
    pseudo_labels: str | None = None  # 08's pseudo_labels.csv (a round, docs/pseudo-labels.md); None: none
    pseudo_weight: float = 1.0  # sampling weight: how often a pseudo-labelled image is drawn against a labelled one
    fold_groups: int | None = None  # None: one model per fold of folds.csv
    train_folds: list[int] | None = None  # folds to train (see fold_groups); None: every fold
    eval_every: int = 1  # validation AP every this many epochs (and at the last, which predicts the OOF images)
    eval_batch_size: int = 8
    workers: int = 4  # DataLoader workers
    amp: bool = True
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        check_train_folds(self.train_folds)

    def augmentations(self) -> DetectionAugment:
        return DetectionAugment(**self.augment)

    @property
    def backbone_checkpoint(self) -> Path:
        path = backbone_file(self.backbone, self.layout.nih_pretrain.backbone)
        if path is None:
            raise ValueError(f"backbone must be a .pt/.pth file (or None: 01's), got {self.backbone!r}")
        return path

    def detector_spec(self) -> DetectorSpec:
        """The detector's shape: this Config's fields of DetectorSpec's names."""
        return derived(DetectorSpec, self)


@dataclass
class Result:
    oof: OofPredictions  # last-epoch predictions of every fold's model on its held-out images
    untrained_oof: OofPredictions  # the same images, predicted by the detector before training
    oof_ap: float
    untrained_ap: float
    prior_box_ap: float  # the prior-box detector (mean training box per lung zone), same images and folds
    fold_ap: pd.DataFrame  # per fold: trained and untrained AP
    metrics: pd.DataFrame  # per fold and epoch (the engine's metrics.csv rows)
    out_dir: Path


def training_table(cfg: Config) -> pd.DataFrame:
    """00's prepared train table with its ``model_fold`` column (a dry run's few rows per fold)."""
    return fold_table(cfg.layout.prepare.train_table(Path(cfg.input_dir) / COMPETITION), cfg.fold_groups,
                      cfg.max_items)


def detection_step(model: nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, dict]:
    images, targets = batch
    images = to_device(images, device, non_blocking=True)
    targets = [{"boxes": t["boxes"].as_subclass(torch.Tensor).to(device), "labels": t["labels"].to(device)}
               for t in targets]
    losses = model(images, targets)
    return sum(losses.values()), losses


@torch.no_grad()
def predict_oof(model: nn.Module, table: pd.DataFrame, prepared_size: int, size: int, device: torch.device,
                batch_size: int, workers: int = 0, progress: bool = False) -> OofPredictions:
    """Boxes in original pixels for every row of ``table`` (prepared squares of ``prepared_size``, resized by the
    model to ``size``); each rank predicts a shard, all get all."""
    info = dist_info()
    dataset = OpacityDataset(table, detection_transform(DetectionAugment(), train=False))
    shard = Subset(dataset, range(info.rank, len(dataset), info.world_size))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=workers, collate_fn=collate_lists)
    rows, predictions = [], []
    for images, targets in tqdm(loader, desc="predict", leave=False, disable=not (progress and info.is_main)):
        predictions += predict_boxes(model, to_device(images, device), size)
        rows += [target["index"] for target in targets]
    gathered = [p for rank in all_gather_object((rows, predictions)) for p in zip(*rank)]
    gathered.sort(key=lambda item: item[0])
    return from_prepared(table.iloc[[i for i, _ in gathered]], [p for _, p in gathered], prepared_size)


def make_evaluate(val_table: pd.DataFrame, cfg: Config, prepared_size: int):
    """The engine's per-epoch ``evaluate``: opacity AP@0.5 of the held-out fold, and its predictions (the last
    evaluated epoch's are the OOF: ``FitResult.outputs``)."""
    truth = truth_boxes(val_table)

    def evaluate(model: nn.Module, device: torch.device) -> tuple[dict[str, float], OofPredictions]:
        oof = predict_oof(model, val_table, prepared_size, cfg.infer_size, device, cfg.eval_batch_size, cfg.workers)
        return {"val_ap50": opacity_ap(oof, truth)}, oof
    return evaluate


def build_model(cfg: Config) -> nn.Module:
    return build_fasterrcnn(backbone_checkpoint=cfg.backbone_checkpoint, spec=cfg.detector_spec())


def train_fold(fold: int, train_table: pd.DataFrame, val_table: pd.DataFrame, cfg: Config,
               prepared_size: int) -> tuple[OofPredictions, pd.DataFrame]:
    """The K-fold driver's ``train_fold``: train on ``train_table``; returns the last epoch's predictions on
    ``val_table`` (fold ``fold``) and the metrics.

    The fold's model goes to ``fold<k>/detector.pt`` (weights and what rebuilds the network). A round's
    pseudo-labelled images (``pseudo_labels``) join ``train_table``, never ``val_table``.
    """
    train_table = add_pseudo_rows(train_table, stage_rows(cfg, sampling=True))
    train_set = OpacityDataset(train_table, detection_transform(cfg.augmentations(), train=True, size=cfg.input_size))
    seed_everything(cfg.seed)
    model = build_model(cfg)
    train_cfg = TrainConfig(
        run_dir=str(cfg.layout.siim_fasterrcnn.fold(fold)), epochs=cfg.epochs, batch_size=cfg.batch_size,
        seed=cfg.seed, num_workers=cfg.workers, amp=cfg.amp, clip_grad_norm=cfg.clip_grad_norm, max_steps=cfg.max_steps,
        eval_every=cfg.eval_every, monitor="val_ap50", monitor_mode="max", progress=cfg.progress,
        # "split": the key a run's checkpoints were fingerprinted with (resume); renaming it would restart them
        hparams={**asdict(cfg), "split": fold},
    )
    result = fit(
        model, train_set, detection_step, optimizer_fn(cfg, nesterov=False), train_cfg,
        scheduler_fn=functools.partial(cosine_with_floor, floor=cfg.lr_floor),
        evaluate=make_evaluate(val_table, cfg, prepared_size), collate_fn=collate_lists, resume=cfg.resume,
    )
    oof = result.outputs
    if oof is None:  # a finished run found by resume: fit returned without training or evaluating
        load_weights(result.last_checkpoint, model)
        device = next(model.parameters()).device
        oof = predict_oof(model, val_table, prepared_size, cfg.infer_size, device, cfg.eval_batch_size,
                          cfg.workers, cfg.progress)
    if dist_info().is_main:
        save_detector(model, load_backbone(cfg.backbone_checkpoint)[0], cfg.detector_spec(), cfg.infer_size,
                      cfg.layout.siim_fasterrcnn.model(fold))
    return oof, pd.DataFrame(result.history).assign(fold=fold)


def untrained_oof(table: pd.DataFrame, cfg: Config, prepared_size: int) -> OofPredictions:
    """The baseline: the detector as training starts it (NIH backbone, random heads), on the same images."""
    seed_everything(cfg.seed)
    model = build_model(cfg)
    device = device_for(dist_info())
    return predict_oof(model.to(device), table, prepared_size, cfg.infer_size, device, cfg.eval_batch_size,
                       cfg.workers, cfg.progress)


def fold_aps(oof: OofPredictions, baseline: OofPredictions, table: pd.DataFrame) -> pd.DataFrame:
    """Trained and untrained AP of each model fold (``nan`` where a fold has no box)."""
    truth = truth_boxes(table)
    rows = []
    for fold, ids in table.groupby(MODEL_FOLD)["image_id"]:
        if not oof.images["image_id"].isin(ids).any():
            continue
        rows.append({"fold": fold, "images": len(ids),
                     "boxes": int(sum(len(truth[i]) for i in ids)),
                     "ap50": opacity_ap(restrict(oof, ids), truth),
                     "untrained_ap50": opacity_ap(restrict(baseline, ids), truth)})
    return pd.DataFrame(rows).set_index("fold")


def run(cfg: Config) -> Result:
    """Train every fold's model, write ``oof.csv`` and ``oof_untrained.csv`` (+ ``_images``), report the APs."""
    write_settings(cfg)
    info = init_distributed()
    out = cfg.layout.siim_fasterrcnn
    table = training_table(cfg)
    prepared_size = cfg.layout.prepare.size
    folds = run_folds(table, functools.partial(train_fold, cfg=cfg, prepared_size=prepared_size), cfg.train_folds,
                      cfg.max_items)
    oof = OofPredictions.concat([oof for oof, _ in folds])
    evaluated = table[table["image_id"].isin(oof.images["image_id"])]
    baseline = untrained_oof(evaluated, cfg, prepared_size)
    truth = truth_boxes(evaluated)
    result = Result(
        oof=oof, untrained_oof=baseline, oof_ap=opacity_ap(oof, truth), untrained_ap=opacity_ap(baseline, truth),
        prior_box_ap=opacity_ap(prior_box_oof(table, MODEL_FOLD, image_ids=oof.images["image_id"]), truth),
        fold_ap=fold_aps(oof, baseline, evaluated), metrics=pd.concat([history for _, history in folds], ignore_index=True), out_dir=out.dir,
    )
    if info.is_main:
        write_oof(out.oof, oof)
        write_oof(out.untrained_oof, baseline)
        aps = {"oof_ap50": result.oof_ap, "untrained_ap50": result.untrained_ap, "prior_box_ap50": result.prior_box_ap}
        summary = {k: None if math.isnan(v) else v for k, v in aps.items()}  # JSON has no NaN (a fold without box)
        out.summary.write_text(json.dumps({**summary, "images": len(oof.images)}, indent=2))
    barrier()
    return result


def describe(result: Result) -> str:
    return (result.fold_ap.to_string(float_format="%.3f") + f"\nOOF opacity AP@0.5: {result.oof_ap:.4f} "
            f"(untrained: {result.untrained_ap:.4f}, prior boxes: {result.prior_box_ap:.4f})\n"
            f"OOF predictions: {result.out_dir}")


def learning_checks(layout: RunLayout, input_dir: Path | None) -> list[LearningCheck]:
    """The OOF AP against the untrained twin's and the prior-box detector's."""
    from covidkit.oof import opacity_ap, read_oof

    stage, model, out = "03_train_siim_fasterrcnn", "Faster R-CNN", layout.siim_fasterrcnn
    if not out.dir.is_dir():
        return []
    truth = training_truth(input_dir)
    absent = [p for p in (out.oof, out.untrained_oof) if not p.is_file()]
    if truth is None or absent:
        why = f"{', '.join(p.name for p in absent)} not written" if absent else "no training labels (input_dir)"
        return [LearningCheck.absent(stage, model, DETECTOR_FIGURE, name, why) for name in ("untrained", PRIOR_BOXES)]
    oof, untrained = read_oof(out.oof), read_oof(out.untrained_oof)
    value, spread = opacity_ap(oof, truth), image_score_spread(oof.boxes, oof.images)
    return [LearningCheck(stage, model, DETECTOR_FIGURE, value, opacity_ap(untrained, truth), "untrained", AP_MARGIN,
                          spread),
            prior_box_check(stage, model, value, read_json(out.summary), out.summary, spread)]


def main(argv: list[str] | None = None) -> None:
    stage_main(__name__, argv)


__getattr__ = moved(__name__, {"DETECTOR_FILE": "covidkit.layout.DETECTOR_FILE"})


if __name__ == "__main__":
    main()
