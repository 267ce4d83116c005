"""The engine's configuration: one plain dataclass, saved as ``config.json`` in the run folder."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

AMP_DTYPES = ("float16", "bfloat16")
SCHEDULER_INTERVALS = ("step", "epoch")
MONITOR_MODES = ("max", "min")
# Fields that may change when a run is resumed without changing what it computes.
RESUMABLE_CHANGES = frozenset({"run_dir", "progress", "plots", "num_workers"})
# "train_folds" (03's folds to train; "folds" and "splits" its earlier names, still in the checkpoints of then) picks
# which fold models a stage trains, not what one of them trains: a fold's run resumes under any of the names.
RESUMABLE_HPARAMS = frozenset({"run_dir", "progress", "resume", "workers", "num_workers", "eval_batch_size",
                               "train_folds", "folds", "splits"})


@dataclass
class TrainConfig:
    """How to train; the task's own hyperparameters go in ``hparams`` (recorded, never read)."""

    run_dir: str
    epochs: int
    batch_size: int
    seed: int = 42
    num_workers: int = 0
    shuffle: bool = True
    drop_last: bool = False
    accumulate_steps: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps in all (a dry run's limit); None: all epochs
    clip_grad_norm: float | None = None
    amp: bool = True  # CUDA only; CPU always trains in float32
    amp_dtype: str = "float16"  # float16 uses a GradScaler, bfloat16 does not need one
    scheduler_interval: str = "step"
    eval_every: int = 1
    monitor: str | None = None  # metric that picks best.pt, e.g. "val_ap50"
    monitor_mode: str = "max"
    deterministic: bool = False  # cuDNN deterministic kernels (slower); CPU runs are deterministic anyway
    sync_batchnorm: bool = False
    find_unused_parameters: bool = False
    progress: bool = True
    plots: bool = True
    hparams: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.run_dir = str(self.run_dir)
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        for name in ("epochs", "batch_size", "accumulate_steps", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"TrainConfig.num_workers must be >= 0, got {self.num_workers}")
        _check_choice("amp_dtype", self.amp_dtype, AMP_DTYPES)
        _check_choice("scheduler_interval", self.scheduler_interval, SCHEDULER_INTERVALS)
        _check_choice("monitor_mode", self.monitor_mode, MONITOR_MODES)
        try:
            json.dumps(self.hparams)
        except TypeError as err:
            raise TypeError(f"TrainConfig.hparams must be JSON-serialisable: {err}") from None

    @property
    def path(self) -> Path:
        return Path(self.run_dir)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return cls(**d)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Fields that differ between a saved and a current config, except the harmless ones."""
    saved, current = _as_json(saved), _as_json(current)
    for d in (saved, current):  # a stage's settings of how it runs, not of what it trains
        if isinstance(d.get("hparams"), dict):
            d["hparams"] = {k: v for k, v in d["hparams"].items() if k not in RESUMABLE_HPARAMS}
    keys = sorted(set(saved) | set(current))
    return [
        f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}"
        for k in keys
        if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k)
    ]


def _as_json(d: dict[str, Any]) -> dict[str, Any]:
    """Tuples and lists compare equal after a JSON round trip, as they do in config.json."""
    return json.loads(json.dumps(d))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"TrainConfig.{name} must be one of {choices}, got {value!r}")
