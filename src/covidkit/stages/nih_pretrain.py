"""Stage 01: multi-label pretraining of a ResNet-family backbone on NIH ChestX-ray14.

15 labels (14 findings + No Finding), BCE with logits, SGD with Nesterov momentum, the cosine
schedule with a floor, AMP on CUDA, per-label AUROC on a patient-grouped validation split, beside
the same network untrained; the last epoch's backbone is saved.

Reads ``<input_dir>/nih-chest-xrays/`` (Kaggle layout) and, with ``weights: imagenet``, torchvision's
ImageNet file in ``<input_dir>/weights/``. Writes ``<run_dir>/01_pretrain_nih_resnext/``: ``backbone.pt``
(what 03 and 06 load), ``auroc.csv`` (per label), ``train/`` (the engine's run: checkpoints, metrics, plots).
Multi-GPU: ``torchrun --nproc_per_node 4 -m covidkit.stages.nih_pretrain --profile full``.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from covidkit.data.nih import DATASET, LABELS, NihDataset, patient_split, read_nih_table
from covidkit.models import pretrained
from covidkit.models.backbones import build_classifier, save_backbone
from covidkit.engine import (
    TrainConfig, cosine_with_floor, fit, init_distributed, load_weights, read_metrics, seed_everything, to_device,
)
from covidkit.engine.distributed import all_gather_object, barrier, device_for, dist_info
from covidkit.engine.optim import optimizer_fn
from covidkit.learning import AUROC_MARGIN, LearningCheck, finite, read_json
from covidkit.layout import RunLayout
from covidkit.stages import StageConfig, stage_main, write_settings
from covidkit.transforms import ClassificationAugment, classification_transform

NOTEBOOK = "01_pretrain_nih_resnext"
MEAN_ROW = "mean of the counted labels"


# What this stage reads (covidkit.records fingerprints them: a change reruns it): dataset folders of
# <input_dir> ("weights": pretrained files), and the stages whose outputs it reads.
DATASETS = ['nih-chest-xrays', 'weights']
UPSTREAM = []


@dataclass
class Config(StageConfig):
    seed: int = 42
    arch: str = "resnext101_32x8d"
    weights: str | None = None  # "imagenet" (torchvision's file in input/weights/), a file or path; None: random
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "sgd"  # "sgd" (Nesterov momentum, the recipe) or "adamw" (learns in fewer steps: smoke)
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_floor: float = 0.05
    val_fraction: float = 0.1
    input_size: int = 224  # the centre crop the network sees (the short side is resized to 8/7 of it first)
    workers: int = 4  # DataLoader workers
    cache_images: bool = False  # keep the decoded images, resized, in memory (small data sets)
    min_positives: int = 10  # the reported mean AUROC counts the labels with this many validation positives (and negatives)
    amp: bool = True
    resume: bool = True
    progress: bool = True

    @property
    def resize(self) -> int:
        """The short side before the centre crop (256 for 224, as the ImageNet recipe)."""
        return round(self.input_size * 8 / 7)


@dataclass
class Result:
    backbone: Path
    metrics: pd.DataFrame  # one row per epoch (the engine's metrics.csv)
    auroc: pd.DataFrame  # per label (validation split, last epoch): auroc, untrained_auroc, positives, negatives, counted
    summary: dict  # SUMMARY_JSON
    out_dir: Path


def bce_step(model: nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, dict]:
    images, targets = to_device(batch, device, non_blocking=True)
    return nn.functional.binary_cross_entropy_with_logits(model(images), targets), {}


def predict_probabilities(model: nn.Module, dataset, device: torch.device, batch_size: int,
                          num_workers: int = 0, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid outputs and targets of ``dataset``, each rank predicting a shard; all ranks get all rows."""
    info = dist_info()
    shard = Subset(dataset, range(info.rank, len(dataset), info.world_size))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers)
    probs, targets = [], []
    for images, target in tqdm(loader, desc="predict", disable=not (progress and info.is_main), leave=False):
        probs.append(torch.sigmoid(model(images.to(device)).float()).cpu())
        targets.append(target)
    local = (torch.cat(probs).numpy(), torch.cat(targets).numpy()) if probs else (
        np.zeros((0, len(LABELS)), np.float32), np.zeros((0, len(LABELS)), np.float32))
    gathered = all_gather_object(local)
    return np.concatenate([g[0] for g in gathered]), np.concatenate([g[1] for g in gathered])


def per_label_auroc(probs: np.ndarray, targets: np.ndarray) -> pd.DataFrame:
    """AUROC of each label (``nan`` where the split has only one class of it), with the class counts."""
    rows = []
    for k, label in enumerate(LABELS):
        positives = int(targets[:, k].sum())
        negatives = len(targets) - positives
        auc = roc_auc_score(targets[:, k], probs[:, k]) if positives and negatives else math.nan
        rows.append({"label": label, "auroc": auc, "positives": positives, "negatives": negatives})
    return pd.DataFrame(rows).set_index("label")


def counted_labels(auroc: pd.DataFrame, min_positives: int) -> pd.Series:
    """Labels with at least ``min_positives`` positives and as many negatives: enough to measure an AUROC."""
    return (auroc["positives"] >= min_positives) & (auroc["negatives"] >= min_positives)


def mean_auroc(auroc: pd.DataFrame, min_positives: int = 1) -> float:
    """Mean AUROC over the counted labels (``nan`` when none is counted)."""
    counted = auroc.loc[counted_labels(auroc, min_positives), "auroc"]
    return float(counted.mean()) if len(counted) else math.nan


def auroc_table(probs: np.ndarray, untrained_probs: np.ndarray, targets: np.ndarray, min_positives: int) -> pd.DataFrame:
    """Per label: AUROC of the trained and of the untrained network, class counts, whether it is counted."""
    table = per_label_auroc(probs, targets)
    table.insert(1, "untrained_auroc", per_label_auroc(untrained_probs, targets)["auroc"])
    table["counted"] = counted_labels(table, min_positives)
    return table


def auroc_summary(table: pd.DataFrame, min_positives: int, train_images: int) -> dict:
    """The reported figure: mean AUROC over the counted labels, trained and untrained, and what it counts."""
    counted = table[table["counted"]]
    number = lambda x: None if math.isnan(x) else round(float(x), 4)  # noqa: E731  (JSON has no nan)
    return {
        "mean_auroc": number(counted["auroc"].mean()) if len(counted) else None,
        "untrained_mean_auroc": number(counted["untrained_auroc"].mean()) if len(counted) else None,
        "min_positives": min_positives,
        "counted_positives": {label: int(n) for label, n in counted["positives"].items()},
        "validation_images": int(table["positives"].iloc[0] + table["negatives"].iloc[0]),
        "train_images": train_images,
    }


def with_mean_row(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` and a last row holding the means over its counted labels (what ``auroc.csv`` holds)."""
    counted = table[table["counted"]]
    mean = pd.DataFrame({"auroc": [counted["auroc"].mean()], "untrained_auroc": [counted["untrained_auroc"].mean()],
                         "counted": [True]}, index=pd.Index([MEAN_ROW], name=table.index.name))
    return pd.concat([table, mean])


def make_evaluate(dataset, cfg: Config):
    """The engine's per-epoch ``evaluate``: validation BCE and the mean AUROC over the counted labels."""
    def evaluate(model: nn.Module, device: torch.device) -> dict[str, float]:
        probs, targets = predict_probabilities(model, dataset, device, cfg.batch_size, cfg.workers)
        p = torch.from_numpy(probs).clamp(1e-7, 1 - 1e-7)
        loss = nn.functional.binary_cross_entropy(p, torch.from_numpy(targets)).item()
        return {"val_loss": loss, "val_auroc": mean_auroc(per_label_auroc(probs, targets), cfg.min_positives)}
    return evaluate


def predict_eval(model: nn.Module, dataset, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """``predict_probabilities`` in eval mode without gradients."""
    model.eval()
    with torch.no_grad():
        return predict_probabilities(model, dataset, next(model.parameters()).device, cfg.batch_size,
                                     cfg.workers, cfg.progress)


def run(cfg: Config) -> Result:
    """Train, report per-label AUROC beside the untrained network's, save the last epoch's backbone.

    The last epoch, not the best one on the validation split: the AUROC is measured on that split,
    so picking the epoch there would flatter it (the cosine schedule ends at its floor anyway).
    """
    write_settings(cfg)
    info = init_distributed()
    out = cfg.layout.nih_pretrain
    table = read_nih_table(Path(cfg.input_dir) / DATASET)
    train_table, val_table = patient_split(table, cfg.val_fraction, cfg.seed)
    if cfg.max_items is not None:
        train_table, val_table = train_table.head(cfg.max_items), val_table.head(cfg.max_items)
    aug = ClassificationAugment(resize=cfg.resize, crop=cfg.input_size)
    cache_size = cfg.resize if cfg.cache_images else None
    train_set = NihDataset(train_table, classification_transform(aug, train=True), cache_size)
    val_set = NihDataset(val_table, classification_transform(aug, train=False), cache_size)
    if cfg.cache_images:
        for dataset in (train_set, val_set):
            dataset.fill_cache(torch.get_num_threads())

    seed_everything(cfg.seed)
    weights = pretrained.resolve(cfg.weights, cfg.input_dir, cfg.arch, NOTEBOOK)
    model = build_classifier(cfg.arch, len(LABELS), weights).to(device_for(info))
    untrained_probs, _ = predict_eval(model, val_set, cfg)
    train_cfg = TrainConfig(
        run_dir=str(out.train), epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
        num_workers=cfg.workers, amp=cfg.amp, max_steps=cfg.max_steps, progress=cfg.progress,
        hparams=asdict(cfg),
    )
    result = fit(
        model, train_set, bce_step,
        optimizer_fn(cfg), train_cfg, scheduler_fn=functools.partial(cosine_with_floor, floor=cfg.lr_floor),
        evaluate=make_evaluate(val_set, cfg), resume=cfg.resume,
    )
    load_weights(result.last_checkpoint, model)
    probs, targets = predict_eval(model, val_set, cfg)
    auroc = auroc_table(probs, untrained_probs, targets, cfg.min_positives)
    summary = auroc_summary(auroc, cfg.min_positives, len(train_set))
    if info.is_main:
        with_mean_row(auroc).to_csv(out.auroc_csv)
        out.summary.write_text(json.dumps(summary, indent=2))
        save_backbone(model, out.backbone, cfg.arch, labels=LABELS, seed=cfg.seed,
                      val_mean_auroc=summary["mean_auroc"])
    barrier()
    return Result(out.backbone, read_metrics(train_cfg.run_dir), auroc, summary, out.dir)


def describe(result: Result) -> str:
    return (with_mean_row(result.auroc).to_string(float_format="%.3f")
            + f"\nmean AUROC {result.summary['mean_auroc']} (untrained {result.summary['untrained_mean_auroc']})"
            + f"\nbackbone: {result.backbone}")


def learning_checks(layout: RunLayout, input_dir: Path | None) -> list[LearningCheck]:
    stage, model = "01_pretrain_nih_resnext", "NIH backbone"
    if not layout.nih_pretrain.dir.is_dir():
        return []
    summary = read_json(layout.nih_pretrain.summary)
    if summary is None or not finite(summary.get("mean_auroc")) or not finite(summary.get("untrained_mean_auroc")):
        return [LearningCheck.absent(stage, model, "held-out mean AUROC", "untrained",
                                     f"no mean_auroc and untrained_mean_auroc in {layout.nih_pretrain.summary}")]
    counted = len(summary["counted_positives"])
    return [LearningCheck(stage, model, f"held-out mean AUROC ({counted} labels)",
                          summary["mean_auroc"], summary["untrained_mean_auroc"], "untrained", AUROC_MARGIN)]


def main(argv: list[str] | None = None) -> None:
    stage_main(__name__, argv)


if __name__ == "__main__":
    main()
