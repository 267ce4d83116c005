"""Notebook 03: K-fold Faster R-CNN opacity detector on SIIM, out-of-fold predictions, OOF AP@0.5.

One model per validation split of ``folds.csv`` (from 00), started from the NIH backbone of 01.
Each model is trained at ``train_size`` with box-aware augmentations, validated each epoch
(opacity AP@0.5 at ``infer_size``), and its *last* epoch predicts its held-out images: the epoch
count is fixed beforehand, so the out-of-fold AP is not tuned on the data it reports on.

``fold_groups`` merges the K folds into fewer splits (split = fold % fold_groups, so patients
still never cross a split), for cheap runs that still give every image an out-of-fold
prediction; ``folds_to_run`` restricts the run to some splits (the OOF then covers those only).

Multi-GPU: ``torchrun --nproc_per_node 4 -m covidkit.train.fasterrcnn --profile full``.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.optim.lr_scheduler import LinearLR, LRScheduler, SequentialLR
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from covidkit.boxes import scale_boxes
from covidkit.data.detection import OpacityDataset, truth_boxes
from covidkit.data.siim import COMPETITION, prepared_train_table
from covidkit.models.fasterrcnn import DetectorSpec, build_fasterrcnn, inference_size
from covidkit.train.nih import backbone_path
from covidkit.oof import OofPredictions, box_rows, opacity_ap, write_oof
from covidkit.train import (
    TrainConfig, collate_lists, cosine_with_floor, fit, init_distributed, load_weights, seed_everything, to_device,
)
from covidkit.train.distributed import all_gather_object, barrier, device_for, dist_info
from covidkit.profiles import config_from_params
from covidkit.transforms import DetectionAugment, detection_transform

NOTEBOOK = "03_train_siim_fasterrcnn"
OOF_CSV = "oof.csv"
UNTRAINED_OOF_CSV = "oof_untrained.csv"


def output_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / NOTEBOOK


def fasterrcnn_models(run_dir: str | Path) -> list[Path]:
    """The fold models of a run: each split's last-epoch checkpoint (what predicted its OOF images).

    A checkpoint holds ``model`` (the state dict) and ``config.hparams`` (this notebook's
    parameters: ``FasterRcnnConfig(**hparams).detector_spec()`` rebuilds the network).
    """
    found = output_dir(run_dir).glob("split*/last.pt")
    return sorted(found, key=lambda p: int(p.parent.name.removeprefix("split")))


@dataclass
class FasterRcnnConfig:
    """Parameters of notebook 03 (names as in its ``parameters`` cell and the profile section)."""

    input_dir: str
    run_dir: str
    seed: int = 42
    backbone: str | None = None  # NIH backbone checkpoint; None: the one 01 saved in run_dir
    train_size: int = 512
    infer_size: int = 1024
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
    warmup_steps: int = 0  # linear warm-up from lr / 10 before the cosine (torchvision's detection recipe)
    augment: dict = field(default_factory=dict)  # DetectionAugment fields to override (e.g. rotate_degrees)
    clip_grad_norm: float | None = 10.0
    fold_groups: int | None = None  # None: one model per fold of folds.csv
    folds_to_run: list[int] | None = None  # None: every split
    eval_every: int = 1  # validation AP every this many epochs (and at the last, which predicts the OOF images)
    eval_batch_size: int = 8
    num_workers: int = 4
    amp: bool = True
    resume: bool = True
    progress: bool = True

    @classmethod
    def from_params(cls, params: dict) -> FasterRcnnConfig:
        """From a profile section (unknown keys are an error)."""
        return config_from_params(cls, params, NOTEBOOK)

    def augmentations(self) -> DetectionAugment:
        return DetectionAugment(**self.augment)

    @property
    def backbone_checkpoint(self) -> Path:
        return Path(self.backbone) if self.backbone else backbone_path(self.run_dir)

    def detector_spec(self) -> DetectorSpec:
        return DetectorSpec(
            train_size=self.train_size, trainable_layers=self.trainable_layers, fpn_layers=self.fpn_layers,
            anchor_sizes=self.anchor_sizes, anchor_scales=self.anchor_scales, rpn_fg_iou=self.rpn_fg_iou, proposals_train=self.proposals_train, proposals_test=self.proposals_test,
            box_batch_size_per_image=self.box_batch_size_per_image, box_positive_fraction=self.box_positive_fraction,
            representation_size=self.representation_size,
            frozen_batchnorm=self.frozen_batchnorm,
        )


@dataclass
class FasterRcnnResult:
    oof: OofPredictions  # last-epoch predictions of every split's model on its held-out images
    untrained_oof: OofPredictions  # the same images, predicted by the detector before training
    oof_ap: float
    untrained_ap: float
    fold_ap: pd.DataFrame  # per split: trained and untrained AP
    metrics: pd.DataFrame  # per split and epoch (the engine's metrics.csv rows)
    out_dir: Path


def training_table(cfg: FasterRcnnConfig) -> pd.DataFrame:
    """The prepared train table of 00 with its validation ``split`` column."""
    table = prepared_train_table(Path(cfg.run_dir) / "prepared", Path(cfg.input_dir) / COMPETITION)
    if table.empty:
        raise ValueError(f"no prepared training image under {Path(cfg.run_dir) / 'prepared'} (run 00 first)")
    table["split"] = table["fold"] % cfg.fold_groups if cfg.fold_groups else table["fold"]
    return table


def splits_to_run(table: pd.DataFrame, cfg: FasterRcnnConfig) -> list[int]:
    splits = sorted(int(s) for s in table["split"].unique())
    if cfg.folds_to_run is None:
        return splits
    unknown = sorted(set(cfg.folds_to_run) - set(splits))
    if unknown:
        raise ValueError(f"folds_to_run {unknown} are not among the splits {splits}")
    return sorted(cfg.folds_to_run)


def detection_step(model: nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, dict]:
    images, targets = batch
    images = to_device(images, device, non_blocking=True)
    targets = [{"boxes": t["boxes"].as_subclass(torch.Tensor).to(device), "labels": t["labels"].to(device)}
               for t in targets]
    losses = model(images, targets)
    return sum(losses.values()), losses


OPTIMIZERS = ("sgd", "adamw")


def make_optimizer(model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD with momentum (torchvision's detection recipe) or AdamW, over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, floor: float) -> LRScheduler:
    """``warmup_steps`` of linear warm-up from ``lr_0 / 10``, then the cosine with a floor over the rest.

    Without warm-up the randomly initialised heads' first AdamW steps at lr 1e-3 blew the losses up (README).
    """
    if warmup_steps < 1:
        return cosine_with_floor(optimizer, total_steps, floor)
    if warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be fewer than the run's {total_steps} steps")
    warmup = LinearLR(optimizer, start_factor=0.1, total_iters=warmup_steps)
    cosine = cosine_with_floor(optimizer, total_steps - warmup_steps, floor)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


@torch.no_grad()
def predict_oof(model: nn.Module, table: pd.DataFrame, size: int, device: torch.device, batch_size: int,
                num_workers: int = 0, progress: bool = False) -> OofPredictions:
    """Boxes in original pixels for every row of ``table`` (each rank predicts a shard; all get all)."""
    info = dist_info()
    dataset = OpacityDataset(table, detection_transform(DetectionAugment(), train=False))
    shard = Subset(dataset, range(info.rank, len(dataset), info.world_size))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_lists)
    parts = []
    model.eval()
    with inference_size(model, size):
        for images, targets in tqdm(loader, desc="predict", leave=False, disable=not (progress and info.is_main)):
            outputs = model(to_device(images, device))
            for image, target, out in zip(images, targets, outputs):
                row = table.iloc[target["index"]]
                boxes = scale_boxes(out["boxes"].float().cpu().numpy(), tuple(image.shape[-2:]),
                                    (row["orig_height"], row["orig_width"]))
                parts.append(box_rows(row["image_id"], row["fold"], boxes, out["scores"].float().cpu().numpy()))
    parts = [p for rank_parts in all_gather_object(parts) for p in rank_parts]
    return OofPredictions.from_parts(parts, table[["image_id", "fold"]])


def make_evaluate(val_table: pd.DataFrame, cfg: FasterRcnnConfig, latest: list[OofPredictions] | None = None):
    """The engine's per-epoch ``evaluate``: opacity AP@0.5 of the held-out split.

    ``latest``, when given, keeps the most recent epoch's predictions (the last epoch's are the OOF).
    """
    truth = truth_boxes(val_table)

    def evaluate(model: nn.Module, device: torch.device) -> dict[str, float]:
        oof = predict_oof(model, val_table, cfg.infer_size, device, cfg.eval_batch_size, cfg.num_workers)
        if latest is not None:
            latest[:] = [oof]
        return {"val_ap50": opacity_ap(oof, truth)}
    return evaluate


def build_model(cfg: FasterRcnnConfig) -> nn.Module:
    return build_fasterrcnn(backbone_checkpoint=cfg.backbone_checkpoint, spec=cfg.detector_spec())


def train_split(table: pd.DataFrame, split: int, cfg: FasterRcnnConfig) -> tuple[OofPredictions, pd.DataFrame]:
    """Train on every split but ``split``; returns the last epoch's predictions on ``split`` and the metrics."""
    train_table, val_table = table[table["split"] != split], table[table["split"] == split]
    train_set = OpacityDataset(train_table, detection_transform(cfg.augmentations(), train=True, size=cfg.train_size))
    seed_everything(cfg.seed)
    model = build_model(cfg)
    latest: list[OofPredictions] = []  # the last evaluated epoch's held-out predictions: the OOF
    train_cfg = TrainConfig(
        run_dir=str(output_dir(cfg.run_dir) / f"split{split}"), epochs=cfg.epochs, batch_size=cfg.batch_size,
        seed=cfg.seed, num_workers=cfg.num_workers, amp=cfg.amp, clip_grad_norm=cfg.clip_grad_norm,
        eval_every=cfg.eval_every, monitor="val_ap50", monitor_mode="max", progress=cfg.progress, hparams={**asdict(cfg), "split": split},
    )
    result = fit(
        model, train_set, detection_step,
        functools.partial(make_optimizer, name=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay),
        train_cfg, scheduler_fn=functools.partial(warmup_cosine, warmup_steps=cfg.warmup_steps, floor=cfg.lr_floor),
        evaluate=make_evaluate(val_table, cfg, latest), collate_fn=collate_lists, resume=cfg.resume,
    )
    if not latest:  # a finished run found by resume: fit returned without training or evaluating
        load_weights(result.last_checkpoint, model)
        device = next(model.parameters()).device
        latest.append(predict_oof(model, val_table, cfg.infer_size, device, cfg.eval_batch_size, cfg.num_workers,
                                  cfg.progress))
    return latest[0], pd.DataFrame(result.history).assign(split=split)


def untrained_oof(table: pd.DataFrame, cfg: FasterRcnnConfig) -> OofPredictions:
    """The baseline: the detector as training starts it (NIH backbone, random heads), on the same images."""
    seed_everything(cfg.seed)
    model = build_model(cfg)
    device = device_for(dist_info())
    return predict_oof(model.to(device), table, cfg.infer_size, device, cfg.eval_batch_size, cfg.num_workers,
                       cfg.progress)


def split_aps(oof: OofPredictions, baseline: OofPredictions, table: pd.DataFrame) -> pd.DataFrame:
    """Trained and untrained AP of each validation split (``nan`` where a split has no box)."""
    truth = truth_boxes(table)
    rows = []
    for split, ids in table.groupby("split")["image_id"]:
        if not oof.images["image_id"].isin(ids).any():
            continue
        rows.append({"split": split, "images": len(ids),
                     "boxes": int(sum(len(truth[i]) for i in ids)),
                     "ap50": opacity_ap(_subset(oof, ids), truth),
                     "untrained_ap50": opacity_ap(_subset(baseline, ids), truth)})
    return pd.DataFrame(rows).set_index("split")


def _subset(oof: OofPredictions, ids) -> OofPredictions:
    keep = set(ids)
    return OofPredictions(oof.boxes[oof.boxes["image_id"].isin(keep)], oof.images[oof.images["image_id"].isin(keep)])


def run_fasterrcnn(cfg: FasterRcnnConfig) -> FasterRcnnResult:
    """Train every split's model, write ``oof.csv`` and ``oof_untrained.csv`` (+ ``_images``), report the APs."""
    info = init_distributed()
    out = output_dir(cfg.run_dir)
    table = training_table(cfg)
    pieces, metrics = [], []
    for split in splits_to_run(table, cfg):
        oof, history = train_split(table, split, cfg)
        pieces.append(oof)
        metrics.append(history)
    oof = OofPredictions.concat(pieces)
    evaluated = table[table["image_id"].isin(oof.images["image_id"])]
    baseline = untrained_oof(evaluated, cfg)
    truth = truth_boxes(evaluated)
    if info.is_main:
        write_oof(out / OOF_CSV, oof)
        write_oof(out / UNTRAINED_OOF_CSV, baseline)
    barrier()
    return FasterRcnnResult(
        oof=oof, untrained_oof=baseline, oof_ap=opacity_ap(oof, truth), untrained_ap=opacity_ap(baseline, truth),
        fold_ap=split_aps(oof, baseline, evaluated), metrics=pd.concat(metrics, ignore_index=True), out_dir=out,
    )


def main(argv: list[str] | None = None) -> None:
    from covidkit.profiles import profile_argument_parser, section_parameters

    args = profile_argument_parser(__doc__.splitlines()[0]).parse_args(argv)
    params = section_parameters(args.profile, NOTEBOOK, input_dir=args.input, run_dir=args.run_dir)
    result = run_fasterrcnn(FasterRcnnConfig.from_params(params))
    if dist_info().is_main:
        print(result.fold_ap.to_string(float_format="%.3f"))
        print(f"OOF opacity AP@0.5: {result.oof_ap:.4f} (untrained: {result.untrained_ap:.4f})")
        print(f"OOF predictions: {result.out_dir / OOF_CSV}")


if __name__ == "__main__":
    main()
