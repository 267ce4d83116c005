"""Checkpoints: ``last.pt`` (everything needed to resume) and ``best.pt`` (weights and record).

A checkpoint is a plain dict of tensors and builtin types, so ``torch.load(weights_only=True)``
reads it: model (unwrapped from DDP), optimizer, scheduler, scaler, epoch (completed epochs),
rng (one state per rank), history (metric rows), config (TrainConfig as a dict), best.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from covidkit.model_file import unwrap

LAST = "last.pt"
BEST = "best.pt"
# Keys a best.pt keeps: enough to use the weights and know where they come from.
WEIGHT_KEYS = ("model", "epoch", "history", "config", "best")


def weights_only(state: dict[str, Any]) -> dict[str, Any]:
    """The subset of a training state that ``best.pt`` keeps (no optimizer, no RNG)."""
    return {k: state[k] for k in WEIGHT_KEYS if k in state}


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def load_weights(path: str | Path, model: nn.Module, strict: bool = True) -> dict[str, Any]:
    """Load a checkpoint's weights into ``model``; returns the checkpoint (epoch, history, ...)."""
    ckpt = load_checkpoint(path)
    unwrap(model).load_state_dict(ckpt["model"], strict=strict)
    return ckpt
