"""The epoch loop: ``train_one_epoch`` (one pass over the loader) and ``fit`` (a whole run with
seeds, resume, checkpoints, evaluation, metrics and plots). See the package docstring for the API."""
from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from covidkit.engine import distributed as D
from covidkit.atomic import atomic_write_text
from covidkit.engine.checkpoint import BEST, LAST, has_checkpoint, resume_checkpoint, save_last, weights_only
from covidkit.model_file import save_checkpoint
from covidkit.engine.config import TrainConfig, config_differences
from covidkit.engine.device import amp_enabled, autocast_context
from covidkit.engine.history import best_row, plot_metrics, write_metrics
from covidkit.engine.loaders import make_train_loader, make_train_sampler
from covidkit.engine.seed import derived_seed, rng_state, seed_everything, set_rng_state

TrainStep = Callable[[nn.Module, Any, torch.device], tuple[torch.Tensor, Mapping[str, Any]]]
# evaluate returns its metrics, or (metrics, outputs): ``fit`` returns the last evaluation's outputs
EvalFn = Callable[[nn.Module, torch.device], Mapping[str, float] | tuple[Mapping[str, float], Any]]
OptimizerFn = Callable[[nn.Module], Optimizer]
SchedulerFn = Callable[[Optimizer, int], LRScheduler]
EpochHook = Callable[[int, dict[str, float]], None]

CONFIG_JSON = "config.json"


@dataclass
class FitResult:
    run_dir: Path
    history: list[dict[str, float]]
    best_epoch: int | None = None
    best_value: float | None = None
    outputs: Any = None  # what the last evaluation returned beside its metrics (None: no evaluation ran)

    @property
    def last_checkpoint(self) -> Path:
        return self.run_dir / LAST

    @property
    def best_checkpoint(self) -> Path | None:
        return self.run_dir / BEST if self.best_epoch is not None else None


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    train_step: TrainStep,
    optimizer: Optimizer,
    device: torch.device,
    cfg: TrainConfig,
    scaler: torch.amp.GradScaler,
    scheduler: LRScheduler | None = None,
    show_progress: bool = True,
    desc: str = "train",
    max_batches: int | None = None,
) -> dict[str, float]:
    """One pass over ``loader`` (its first ``max_batches``); returns this rank's mean ``loss`` and mean of each log.

    ``scheduler``, when given, steps after every optimizer step (per-iteration schedules).
    """
    model.train()
    n_batches = len(loader) if max_batches is None else min(len(loader), max_batches)
    accum = cfg.accumulate_steps
    sums: dict[str, float] = defaultdict(float)
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc=desc, leave=False, disable=not show_progress, dynamic_ncols=True)
    for i, batch in enumerate(bar):
        if i == n_batches:
            break
        group_start = i - i % accum
        group_size = min(accum, n_batches - group_start)
        steps_now = i + 1 == group_start + group_size
        with _grad_sync(model, steps_now):
            with autocast_context(device, cfg.amp, cfg.amp_dtype):
                loss, logs = train_step(model, batch, device)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"{desc}: loss is {value} at batch {i} (logs: {_floats(logs)})")
            scaler.scale(loss / group_size).backward()
        if steps_now:
            _optimizer_step(model, optimizer, scaler, cfg.clip_grad_norm)
            if scheduler is not None:
                scheduler.step()
        sums["loss"] += value
        for name, v in _floats(logs).items():
            sums[name] += v
        bar.set_postfix(loss=f"{sums['loss'] / (i + 1):.4f}", refresh=False)
    return {name: total / n_batches for name, total in sums.items()}


def fit(
    model: nn.Module,
    train_data: Dataset,
    train_step: TrainStep,
    optimizer_fn: OptimizerFn,
    cfg: TrainConfig,
    *,
    scheduler_fn: SchedulerFn | None = None,
    evaluate: EvalFn | None = None,
    collate_fn: Callable | None = None,
    sampler: Sampler | None = None,
    sample_weights: Sequence[float] | torch.Tensor | None = None,
    device: torch.device | str | None = None,
    resume: bool = False,
    on_epoch_end: EpochHook | None = None,
) -> FitResult:
    """Train ``model`` in place for ``cfg.epochs`` epochs, writing the run folder ``cfg.run_dir``.

    With ``resume=True`` a run continues from ``last.pt`` (a finished run returns at once; no
    checkpoint: a fresh start). Under torchrun (``WORLD_SIZE > 1``) it trains with DDP.
    """
    info = D.init_distributed()
    device = torch.device(device) if device is not None else D.device_for(info)
    ckpt = _checkpoint_to_resume(cfg, resume)
    if cfg.monitor and evaluate is None and not cfg.monitor.startswith("train_"):
        raise ValueError(f"monitor {cfg.monitor!r} needs an evaluate function (or a train_* metric)")
    _configure_cudnn(cfg)
    seed_everything(cfg.seed + info.rank)
    run = _build_run(model, train_data, optimizer_fn, scheduler_fn, sampler, sample_weights, cfg, info, device)
    if ckpt is not None:
        history, start = _restore(ckpt, run)
    else:
        history, start = [], 0
        if info.is_main:
            atomic_write_text(cfg.path / CONFIG_JSON, json.dumps(cfg.to_dict(), indent=2))

    show = cfg.progress and info.is_main
    epochs = tqdm(range(start, run.epochs), desc="epochs", initial=start, total=run.epochs, disable=not show)
    outputs = None
    for epoch in epochs:
        row, evaluated = _run_epoch(run, epoch, train_data, train_step, evaluate, collate_fn, show)
        history.append(row)
        if evaluated is not None:
            outputs = evaluated.outputs
        state = _training_state(run, epoch + 1, history)  # every rank: gathers the RNG states
        if info.is_main:
            _write_epoch(state, cfg, history)
            epochs.write(_summary(history[-1], run.epochs))
        if on_epoch_end is not None:
            _isolated_rng(on_epoch_end, epoch + 1, history[-1])
    D.barrier()
    return _result(cfg, history, outputs)


@dataclass
class _Run:
    """What one ``fit`` call trains with."""

    cfg: TrainConfig
    info: D.DistInfo
    device: torch.device
    model: nn.Module  # the bare module: checkpoints, evaluation
    net: nn.Module  # what train_step calls: the DDP wrapper under torchrun, else the model
    optimizer: Optimizer
    scheduler: LRScheduler | None
    scaler: torch.amp.GradScaler
    sampler: Sampler
    epochs: int  # cfg.epochs, or fewer when cfg.max_steps ends the run earlier
    steps_per_epoch: int  # optimizer steps


def _build_run(
    model: nn.Module,
    train_data: Dataset,
    optimizer_fn: OptimizerFn,
    scheduler_fn: SchedulerFn | None,
    sampler: Sampler | None,
    sample_weights: Sequence[float] | torch.Tensor | None,
    cfg: TrainConfig,
    info: D.DistInfo,
    device: torch.device,
) -> _Run:
    model.to(device)
    if cfg.sync_batchnorm and info.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = optimizer_fn(model)
    train_sampler = make_train_sampler(train_data, cfg, info, sampler, sample_weights)
    batches = _batches_per_epoch(len(train_sampler), cfg)
    if batches == 0:
        raise ValueError(f"no training batch: {len(train_sampler)} samples per rank, batch size {cfg.batch_size}")
    steps_per_epoch = math.ceil(batches / cfg.accumulate_steps)
    epochs = cfg.epochs if cfg.max_steps is None else min(cfg.epochs, math.ceil(cfg.max_steps / steps_per_epoch))
    total_steps = epochs * steps_per_epoch if cfg.max_steps is None else min(epochs * steps_per_epoch, cfg.max_steps)
    steps = total_steps if cfg.scheduler_interval == "step" else epochs
    scaler = torch.amp.GradScaler(device.type, enabled=amp_enabled(device, cfg.amp) and cfg.amp_dtype == "float16")
    return _Run(
        cfg=cfg,
        info=info,
        device=device,
        model=model,
        net=_wrap_ddp(model, device, cfg) if info.distributed else model,
        optimizer=optimizer,
        scheduler=scheduler_fn(optimizer, steps) if scheduler_fn is not None else None,
        scaler=scaler,
        sampler=train_sampler,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
    )


def _run_epoch(
    run: _Run,
    epoch: int,
    train_data: Dataset,
    train_step: TrainStep,
    evaluate: EvalFn | None,
    collate_fn: Callable | None,
    show: bool,
) -> tuple[dict[str, float], _Evaluation | None]:
    """Train one epoch, step a per-epoch scheduler, evaluate when due; returns the epoch's row and the evaluation
    (None when none was due)."""
    cfg = run.cfg
    started = time.perf_counter()
    row: dict[str, float] = {"epoch": epoch + 1, "lr": run.optimizer.param_groups[0]["lr"]}
    loader = make_train_loader(
        train_data, run.sampler, cfg, epoch, run.info, collate_fn, pin_memory=run.device.type == "cuda"
    )
    per_step = run.scheduler if cfg.scheduler_interval == "step" else None
    max_batches = None if cfg.max_steps is None else (cfg.max_steps - epoch * run.steps_per_epoch) * cfg.accumulate_steps
    logs = train_one_epoch(
        run.net, loader, train_step, run.optimizer, run.device, cfg, run.scaler, per_step,
        show_progress=show, desc=f"epoch {epoch + 1}/{run.epochs}", max_batches=max_batches,
    )
    if run.scheduler is not None and per_step is None:
        run.scheduler.step()
    row.update({f"train_{k}": v for k, v in D.mean_across_ranks(logs).items()})
    evaluation = None
    if evaluate is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == run.epochs):
        evaluation = _evaluate(run.model, evaluate, run.device)
        row.update(evaluation.metrics)
        if cfg.monitor and cfg.monitor not in row:
            raise KeyError(f"monitor {cfg.monitor!r} is not among the epoch's metrics {sorted(row)}")
    row["time_s"] = time.perf_counter() - started
    return row, evaluation


def _training_state(run: _Run, epoch: int, history: list[dict[str, float]]) -> dict[str, Any]:
    """The content of last.pt after ``epoch`` completed epochs."""
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
        "scaler": run.scaler.state_dict(),
        "epoch": epoch,
        "rng": D.all_gather_object(rng_state()),
        "history": history,
        "config": run.cfg.to_dict(),
        "world_size": run.info.world_size,
    }


def _grad_sync(model: nn.Module, steps_now: bool) -> contextlib.AbstractContextManager:
    """DDP all-reduces gradients only on the micro-batch that ends an accumulation group."""
    if isinstance(model, DistributedDataParallel) and not steps_now:
        return model.no_sync()
    return contextlib.nullcontext()


def _optimizer_step(
    model: nn.Module, optimizer: Optimizer, scaler: torch.amp.GradScaler, clip_grad_norm: float | None
) -> None:
    if clip_grad_norm is not None:
        scaler.unscale_(optimizer)  # clip true gradients, not scaled ones
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def _floats(logs: Mapping[str, Any]) -> dict[str, float]:
    if "loss" in logs:
        raise ValueError("train_step logs must not be named 'loss' (the engine logs the total loss as 'loss')")
    return {name: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for name, v in logs.items()}


def _batches_per_epoch(samples: int, cfg: TrainConfig) -> int:
    return samples // cfg.batch_size if cfg.drop_last else math.ceil(samples / cfg.batch_size)


@dataclass
class _Evaluation:
    metrics: dict[str, float]  # averaged over ranks
    outputs: Any  # what evaluate returned beside its metrics (this rank's), or None


@torch.no_grad()
def _evaluate(model: nn.Module, evaluate: EvalFn, device: torch.device) -> _Evaluation:
    """``evaluate`` on this rank (bare model, eval mode, no grad); metrics averaged over ranks."""
    model.eval()
    try:
        returned = evaluate(model, device)
    finally:
        model.train()
    metrics, outputs = returned if isinstance(returned, tuple) else (returned, None)
    return _Evaluation(D.mean_across_ranks({name: float(v) for name, v in metrics.items()}), outputs)


def _write_epoch(state: dict[str, Any], cfg: TrainConfig, history: list[dict[str, float]]) -> None:
    """Rank 0: last.pt, best.pt when the monitored metric improved, metrics files, plots."""
    run_dir = cfg.path
    best = best_row(history, cfg.monitor, cfg.monitor_mode) if cfg.monitor else None
    if best is not None:
        state["best"] = {"metric": cfg.monitor, "mode": cfg.monitor_mode, "epoch": best["epoch"],
                         "value": best[cfg.monitor]}
    save_last(state, run_dir)  # the last.pt it replaces becomes last.prev.pt
    if best is not None and best["epoch"] == state["epoch"]:
        save_checkpoint(weights_only(state), run_dir / BEST)
    write_metrics(history, run_dir)
    if cfg.plots:
        plot_metrics(history, run_dir)


def _checkpoint_to_resume(cfg: TrainConfig, resume: bool) -> dict[str, Any] | None:
    last = cfg.path / LAST
    if not has_checkpoint(cfg.path):
        return None
    if not resume:
        raise FileExistsError(f"{last} exists: pass resume=True to continue that run, or use a new run_dir")
    ckpt = resume_checkpoint(cfg.path)  # last.pt, or last.prev.pt when last.pt is corrupted
    differences = config_differences(ckpt["config"], cfg.to_dict())
    if differences:
        raise ValueError(f"cannot resume {last}: the config changed ({'; '.join(differences)})")
    return ckpt


def _restore(ckpt: dict[str, Any], run: _Run) -> tuple[list[dict[str, float]], int]:
    """Load a resumed run's state; returns (history, completed epochs)."""
    run.model.load_state_dict(ckpt["model"])  # in place: a DDP wrapper keeps pointing at these tensors
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if run.scheduler is not None:
        run.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt["scaler"]:  # empty when saved by a disabled (CPU / bf16) scaler
        run.scaler.load_state_dict(ckpt["scaler"])
    epoch = ckpt["epoch"]
    if len(ckpt["rng"]) == run.info.world_size:
        set_rng_state(ckpt["rng"][run.info.rank])
    else:
        warnings.warn(
            f"checkpoint from {len(ckpt['rng'])} processes resumed on {run.info.world_size}: "
            "random streams are reseeded, the run will not repeat an uninterrupted one exactly",
            stacklevel=3,
        )
        seed_everything(derived_seed(run.cfg.seed, epoch, run.info.rank))
    return list(ckpt["history"]), epoch


def _wrap_ddp(model: nn.Module, device: torch.device, cfg: TrainConfig) -> DistributedDataParallel:
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=cfg.find_unused_parameters,
    )


def _configure_cudnn(cfg: TrainConfig) -> None:
    if cfg.deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def _isolated_rng(hook: EpochHook, epoch: int, row: dict[str, float]) -> None:
    """Run a hook without letting it move the training's random streams (checkpointed before it)."""
    state = rng_state()
    try:
        hook(epoch, dict(row))
    finally:
        set_rng_state(state)


def _summary(row: Mapping[str, float], epochs: int) -> str:
    values = "  ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch")
    return f"epoch {row['epoch']}/{epochs}  {values}"


def _result(cfg: TrainConfig, history: list[dict[str, float]], outputs: Any) -> FitResult:
    best = best_row(history, cfg.monitor, cfg.monitor_mode) if cfg.monitor else None
    if best is None:
        return FitResult(cfg.path, history, outputs=outputs)
    return FitResult(cfg.path, history, int(best["epoch"]), best[cfg.monitor], outputs)
