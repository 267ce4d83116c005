"""The CogSeg ablation of the paper's Tables 1 and 2, trained with the shared engine (:mod:`covidkit.engine`).

Variants (each adds to the one before):

====================  =========================================================================
``U-Net``             segmentation decoder alone, cross-entropy
``+SR (1 L1)``        + SR decoder (MSE to the full-resolution slice) + L1 between the two
                      decoders' features at the finest U-Net scale
``+SR (4 L1)``        L1 at all four scales
``+RMI``              + RMI (R = 3) on the segmentation logits
``+edge-guided RMI``  the RMI term made edge-guided (R = 3 everywhere + R = 5 on predicted edges): CogSeg
====================  =========================================================================

Each variant trains in ``<run_dir>/<slug>/`` (engine files: ``metrics.csv``, checkpoints, plots) and is
evaluated, with its last-epoch weights, on the test split; the table goes to ``<run_dir>/ablation.csv``, with
an ``untrained`` row (the networks' common starting point) as the baseline. There is no validation split in
the paper, so no checkpoint is picked on test scores.

Two things every variant shares, beyond the paper (both fixed the smoke run's constant maps, see the README):
the segmentation head starts at the class prior (:meth:`CogSeg.init_class_prior`), and the cross-entropy
weights each class by ``frequency ** -class_balance`` (``class_balance = 0``: the paper's plain CE), so that
the rare classes (consolidation and effusion, under 1 % of the pixels each) get a share of the gradient that
the auxiliary losses do not drown.

Stage 10 (``covidkit.stages.ct_cogseg``) runs it on each dataset of a profile.
"""
from __future__ import annotations

import functools
import re
from dataclasses import InitVar, asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from covidkit.ct.cogseg.model import CogSeg, CogSegConfig
from covidkit.ct.cogseg.losses import CogSegLoss, CogSegLossConfig
from covidkit.ct.cogseg.medseg import CLASS_NAMES, NUM_CLASSES, CTSegDataset, CTSlices, augment_paper, load_ct_dataset
from covidkit.ct.cogseg.metrics import ConfusionMatrix, summarize
from covidkit.deprecated import warn_renamed

VARIANTS: dict[str, CogSegLossConfig] = {
    "U-Net": CogSegLossConfig(sr=False, feature_scales=0, rmi="none"),
    "+SR (1 L1)": CogSegLossConfig(sr=True, feature_scales=1, rmi="none"),
    "+SR (4 L1)": CogSegLossConfig(sr=True, feature_scales=4, rmi="none"),
    "+RMI": CogSegLossConfig(sr=True, feature_scales=4, rmi="rmi"),
    "+edge-guided RMI": CogSegLossConfig(sr=True, feature_scales=4, rmi="edge"),
}
TABLE_COLUMNS = ["variant", "mIoU", "DSC", "sensitivity", "specificity"]
UNTRAINED = "untrained"  # the baseline row: the networks' starting point (the U-Net's, with the same seed)
OUTPUT_COLUMNS = ["lesion % pred", "lesion % true", "lesion % pred sd", "slice r"]


@dataclass
class AblationConfig:
    """What to train and how. ``output_size`` is the output (and label) side; the network sees ``output_size // 2``.

    ``augment``: the paper's rotations and scales of the training slices (it used them on the small MedSeg
    set). ``class_balance``: exponent of the cross-entropy's inverse class-frequency weights (0: plain CE).
    ``max_train_slices`` / ``max_test_slices`` cap the splits (None: all).
    """

    input_dir: str
    run_dir: str
    dataset: str = "medseg"
    output_size: int = 512
    base_channels: int = 32
    epochs: int = 40
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    class_balance: float = 0.5
    augment: bool = True
    seed: int = 42
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    max_train_slices: int | None = None
    max_test_slices: int | None = None
    max_steps: int | None = None  # optimizer steps per variant (a dry run); None: the epochs'
    num_workers: int = 0
    progress: bool = True
    size: InitVar[int | None] = None  # deprecated name of output_size

    def __post_init__(self, size: int | None):
        if size is not None:
            warn_renamed("AblationConfig.size", "AblationConfig.output_size")
            self.output_size = size
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; known: {list(VARIANTS)}")
        if self.output_size % 32:
            raise ValueError(f"output_size must be a multiple of 32 (the input, output_size // 2, passes 4 poolings), "
                             f"got {self.output_size}")


@dataclass
class AblationResult:
    table: pd.DataFrame  # one row per variant: lesion means and per-class metrics
    run_dirs: dict[str, Path]
    models: dict[str, CogSeg]  # last-epoch weights, on the CPU, eval mode
    train: CTSlices
    test: CTSlices


def slug(name: str) -> str:
    """``"+SR (4 L1)"`` -> ``"sr_4_l1"``: a folder name."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def cogseg_train_step(model, batch, device, loss_fn: CogSegLoss):
    """The engine's ``train_step``: forward (with the SR branch when the loss uses it), the CogSeg loss."""
    low, image, mask = (t.to(device, non_blocking=True) for t in batch)
    outputs = model(low, with_sr=loss_fn.cfg.sr)
    loss = loss_fn(outputs, mask, image)
    return loss, dict(loss_fn.last_parts)


@torch.no_grad()
def predict_masks(model: CogSeg, dataset: CTSegDataset, device: torch.device | str = "cpu",
                  batch_size: int = 8) -> np.ndarray:
    """Argmax label maps ``[N, H, W]`` uint8 of the segmentation path."""
    was_training = model.training
    model.eval()
    preds = []
    for low, _, _ in DataLoader(dataset, batch_size=batch_size):
        preds.append(model.predict_proba(low.to(device)).argmax(dim=1).to("cpu", torch.uint8))
    model.train(was_training)
    return torch.cat(preds).numpy()


def output_summary(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Whether the predicted maps follow the slices: the lesion percentage of the pixels predicted and true,
    its standard deviation over slices (``lesion % pred sd``: 0 for a constant map), and ``slice r``, the Pearson correlation over slices of the predicted and true lesion fractions (NaN when
    the predicted fraction does not vary from slice to slice: a constant map)."""
    pred_frac = (pred > 0).reshape(len(pred), -1).mean(axis=1)
    true_frac = (truth > 0).reshape(len(truth), -1).mean(axis=1)
    constant = pred_frac.std() == 0 or true_frac.std() == 0
    r = float("nan") if constant else float(np.corrcoef(pred_frac, true_frac)[0, 1])
    return {"lesion % pred": 100 * float(pred_frac.mean()), "lesion % true": 100 * float(true_frac.mean()),
            "lesion % pred sd": 100 * float(pred_frac.std()), "slice r": r}


def evaluate_model(model: CogSeg, dataset: CTSegDataset, device: torch.device | str = "cpu",
                   batch_size: int = 8) -> dict[str, float]:
    """The paper's metrics (:mod:`covidkit.ct.cogseg.metrics`) of ``model`` on ``dataset``, and
    :func:`output_summary`."""
    pred = predict_masks(model, dataset, device, batch_size)
    cm = ConfusionMatrix(NUM_CLASSES)
    cm.update(dataset.masks, torch.from_numpy(pred))
    return {**summarize(cm), **output_summary(pred, dataset.masks.numpy())}


def _val_metrics(model, device, dataset: CTSegDataset, batch_size: int) -> dict[str, float]:
    metrics = evaluate_model(model, dataset, device, batch_size)
    return {f"val_{k}": metrics[k] for k in ("mIoU", "DSC", "lesion % pred")}


def _adam(model, lr: float, weight_decay: float):
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)


def load_splits(cfg: AblationConfig) -> tuple[CTSlices, CTSlices]:
    """The train and test slices of ``cfg.dataset`` at ``cfg.output_size``, capped, the training split augmented."""
    train, test = load_ct_dataset(Path(cfg.input_dir), cfg.dataset, cfg.output_size)
    if cfg.max_train_slices:
        train = train.subset(slice(0, cfg.max_train_slices))
    if cfg.max_test_slices:
        test = test.subset(slice(0, cfg.max_test_slices))
    if cfg.augment:
        train = augment_paper(train)
    return train, test


def class_frequencies(masks: torch.Tensor) -> torch.Tensor:
    """Fraction of the pixels of ``masks`` in each class, ``[NUM_CLASSES]``."""
    counts = torch.bincount(masks.flatten(), minlength=NUM_CLASSES)[:NUM_CLASSES].double()
    return (counts / counts.sum()).float()


def class_weights(frequencies: torch.Tensor, exponent: float) -> torch.Tensor | None:
    """Cross-entropy weights ``frequency ** -exponent``, scaled so that the mean weight per pixel is 1 (the loss
    keeps its size); None for ``exponent == 0``. 0.5 (inverse square root) is the usual compromise between
    plain CE, under which classes of under 1 % of the pixels learn slowly, and full inverse frequency, which
    over-segments them."""
    if not exponent:
        return None
    weights = frequencies.clamp_min(1e-6) ** -exponent
    return weights / (frequencies * weights).sum()


def build_variant(name: str, cfg: AblationConfig, train: CTSegDataset) -> tuple[CogSeg, CogSegLoss]:
    """The untrained network of variant ``name`` (seeded by ``cfg.seed``) and its loss, both set from the
    training masks: the class weights of the CE and, matching them, the head's starting prior."""
    from covidkit.engine import seed_everything

    loss_cfg = VARIANTS[name]
    frequencies = class_frequencies(train.masks)
    weights = class_weights(frequencies, cfg.class_balance)
    seed_everything(cfg.seed)
    model = CogSeg(CogSegConfig(num_classes=NUM_CLASSES, base_channels=cfg.base_channels, sr=loss_cfg.sr))
    # the minimum of the (weighted) CE for a network that cannot yet tell pixels apart
    model.init_class_prior(frequencies if weights is None else frequencies * weights)
    return model, CogSegLoss(NUM_CLASSES, loss_cfg, weights)


def train_variant(name: str, cfg: AblationConfig, train: CTSegDataset, test: CTSegDataset,
                  device: torch.device | str | None = None) -> tuple[CogSeg, Path]:
    """Train one ablation variant in ``<run_dir>/<slug>``; returns the model (last epoch, CPU, eval) and folder."""
    from covidkit.engine import TrainConfig, cosine_with_floor, fit

    run_dir = Path(cfg.run_dir) / slug(name)
    model, loss_fn = build_variant(name, cfg, train)
    train_cfg = TrainConfig(
        run_dir=str(run_dir), epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
        num_workers=cfg.num_workers, drop_last=len(train) > cfg.batch_size, progress=cfg.progress,
        max_steps=cfg.max_steps,
        hparams={"variant": name, "model": asdict(model.cfg), "loss": asdict(loss_fn.cfg), "lr": cfg.lr,
                 "weight_decay": cfg.weight_decay, "class_balance": cfg.class_balance, "dataset": cfg.dataset,
                 "size": cfg.output_size, "augment": cfg.augment, "train_slices": len(train)},
    )
    fit(
        model, train, functools.partial(cogseg_train_step, loss_fn=loss_fn),
        functools.partial(_adam, lr=cfg.lr, weight_decay=cfg.weight_decay), train_cfg,
        scheduler_fn=functools.partial(cosine_with_floor, floor=0.05),
        evaluate=functools.partial(_val_metrics, dataset=test, batch_size=cfg.batch_size),
        device=device, resume=True,  # an interrupted variant continues; a finished one is loaded, not retrained
    )
    return model.eval(), run_dir


def run_ablation(cfg: AblationConfig, device: torch.device | str | None = None) -> AblationResult:
    """Train and evaluate every variant of ``cfg.variants``; writes ``<run_dir>/ablation.csv``."""
    from covidkit.engine import default_device, is_main_process

    device = torch.device(device) if device else default_device()
    train, test = load_splits(cfg)
    train_ds, test_ds = CTSegDataset(train), CTSegDataset(test)
    untrained, _ = build_variant("U-Net", cfg, train_ds)
    rows, run_dirs, models = [{"variant": UNTRAINED, **evaluate_model(untrained.eval(), test_ds)}], {}, {}
    for name in cfg.variants:
        model, run_dirs[name] = train_variant(name, cfg, train_ds, test_ds, device)
        rows.append({"variant": name, **evaluate_model(model, test_ds, device, cfg.batch_size)})
        models[name] = model.cpu()
    table = pd.DataFrame(rows)
    if is_main_process():
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        table.to_csv(Path(cfg.run_dir) / "ablation.csv", index=False)
    return AblationResult(table, run_dirs, models, train, test)


def ablation_table(results: dict[str, AblationResult]) -> pd.DataFrame:
    """The paper's table for each dataset: lesion-mean mIoU, DSC, sensitivity, specificity, DSC per lesion class,
    and the :func:`output_summary` columns (predicted against true lesion percentage, slice correlation)."""
    per_class = [f"DSC/{c}" for c in CLASS_NAMES[1:]]
    columns = TABLE_COLUMNS + per_class + OUTPUT_COLUMNS
    tables = [r.table[columns].assign(dataset=name) for name, r in results.items()]
    return pd.concat(tables, ignore_index=True).set_index(["dataset", "variant"])
