"""The shared training engine: one ``fit`` for every model in covidkit.

Shaped like torchvision's ``references/detection`` (a small epoch loop, distributed and checkpoint
helpers in their own modules). The task-specific part is two small callables; everything else
(seeds, AMP, DDP, checkpoints, resume, metrics, plots, progress bars) is the engine's.

The stages (``covidkit.stages``) are its users; ultralytics YOLO has its own trainer, which ``yolo`` gives the
same guarantees (seeds per epoch, exact resume, offline precision choice). Model files share the format of
``covidkit.model_file`` with the engine's checkpoints, so loading a model never imports the engine.

API (stable; other modules build on it)::

    from covidkit.engine import TrainConfig, cosine_with_floor, fit, load_weights, seed_everything

    cfg = TrainConfig(run_dir="runs/x/nih", epochs=10, batch_size=32, seed=42,
                      monitor="val_auc", monitor_mode="max", hparams={"lr": 1e-3, "arch": "resnext50"})
    seed_everything(cfg.seed)                 # before building the model: reproducible init
    model = build_model()
    result = fit(
        model, train_dataset, train_step, optimizer_fn, cfg,
        scheduler_fn=functools.partial(cosine_with_floor, floor=0.05),   # optional
        evaluate=evaluate,                   # optional: per-epoch metrics dict
        collate_fn=None, sampler=None, sample_weights=None,   # optional data plumbing
        device=None,                         # None: cuda:LOCAL_RANK / cuda / cpu
        resume=True,                         # continue from run_dir/last.pt if there is one
        on_epoch_end=None,                   # optional hook(epoch, row), every rank, after the checkpoint
    )
    load_weights(result.best_checkpoint, model)     # or result.last_checkpoint
    read_metrics(cfg.run_dir)                        # the history as a DataFrame

The callables (all receive the device; they move their batch themselves, e.g. with ``to_device``):

- ``train_step(model, batch, device) -> (loss, logs)``: ``loss`` a scalar tensor to backpropagate,
  ``logs`` a mapping of named floats/scalar tensors to average per epoch (e.g. a detection loss dict;
  same keys every step; not named ``loss``, the engine's name for the total). Runs inside autocast;
  ``model`` may be DDP-wrapped (call it, don't reach in).
- ``optimizer_fn(model) -> Optimizer``: gets the unwrapped model already on the device.
- ``scheduler_fn(optimizer, total_steps) -> LRScheduler``: ``total_steps`` is the number of
  ``scheduler.step()`` calls the engine will make: optimizer steps over all epochs when
  ``cfg.scheduler_interval == "step"``, else ``cfg.epochs``.
- ``evaluate(model, device) -> {"val_x": float, ...}``: called every ``cfg.eval_every`` epochs and
  at the last one, on every rank, with the unwrapped model in eval mode under ``torch.no_grad()``;
  it closes over its own validation loader. Values are averaged across ranks. It may also return
  ``(metrics, outputs)`` (e.g. its held-out predictions): ``fit`` returns the last evaluation's
  ``outputs`` as ``FitResult.outputs`` (None when no evaluation ran, e.g. a finished run resumed).
- ``sampler``: any Sampler with ``set_epoch(epoch)`` (so a resumed run draws the same order);
  under DDP it must also have ``num_replicas`` equal to the world size. ``sample_weights`` (one
  weight per sample, e.g. ``class_balanced_weights(labels)``) makes the engine build a
  ``WeightedSampler`` itself, which works under DDP. Neither: a shuffling ``DistributedSampler``.

What the engine does for each run (``cfg.run_dir``; only rank 0 writes):

- seeds python/numpy/torch from ``cfg.seed`` (+ rank); the shuffling order comes from a generator
  seeded ``cfg.seed + epoch``, DataLoader workers from a generator seeded by (seed, epoch, rank)
  (torch then seeds python, numpy and torch inside each worker);
- ``config.json``: the TrainConfig (with ``hparams``). A run folder that has a ``last.pt`` needs
  ``resume=True``, and a config equal to the saved one (``run_dir``, ``progress``, ``plots`` and
  ``num_workers`` may differ): anything else raises instead of silently mixing two runs;
- ``last.pt`` every epoch (atomic): model (unwrapped), optimizer, scheduler, GradScaler, epoch,
  the RNG states of every rank, the metrics history, the config; ``best.pt`` (model, epoch, history,
  config) whenever ``cfg.monitor`` improves;
- ``metrics.csv`` / ``metrics.json``: one row per epoch (``epoch, lr, train_loss, train_<log>...,
  <eval metrics>..., time_s``); ``plots/loss.png`` and one ``plots/<metric>.png`` per other metric;
- AMP (``torch.autocast`` + ``torch.amp.GradScaler``) on CUDA, float32 on CPU; gradient clipping
  and accumulation; DDP under ``torchrun`` (``WORLD_SIZE > 1``); tqdm bars and one line per epoch.

Around ``fit``: ``optim`` (``make_optimizer``, the one optimizer factory of every stage) and ``kfold`` (the
K-fold driver: one model per fold, its last evaluation predicting the held-out rows).

Modules: ``config`` (TrainConfig), ``loop`` (fit, train_one_epoch, FitResult), ``optim``, ``kfold``, ``checkpoint``,
``distributed``, ``loaders`` (samplers, DataLoader, collate), ``schedules``, ``seed``, ``device``,
``history`` (metrics files and plots), ``yolo`` (ultralytics training).
"""
from covidkit.engine.checkpoint import load_checkpoint, load_weights
from covidkit.model_file import save_checkpoint
from covidkit.engine.config import TrainConfig
from covidkit.engine.device import autocast_context, default_device, to_device
from covidkit.engine.distributed import DistInfo, init_distributed, is_main_process
from covidkit.engine.history import read_metrics
from covidkit.engine.loaders import WeightedSampler, class_balanced_weights, collate_lists
from covidkit.engine.loop import FitResult, fit, train_one_epoch
from covidkit.engine.schedules import cosine_with_floor
from covidkit.engine.seed import seed_everything

__all__ = [
    "DistInfo",
    "FitResult",
    "TrainConfig",
    "WeightedSampler",
    "autocast_context",
    "class_balanced_weights",
    "collate_lists",
    "cosine_with_floor",
    "default_device",
    "fit",
    "init_distributed",
    "is_main_process",
    "load_checkpoint",
    "load_weights",
    "read_metrics",
    "save_checkpoint",
    "seed_everything",
    "to_device",
    "train_one_epoch",
]
