"""Model files: a plain dict of tensors and builtin types, written atomically, read with ``weights_only``.

The one format the models (``covidkit.models``: backbones, study models, YOLO's resume state) and the training
engine (``covidkit.engine``: ``last.pt``, ``best.pt``) share, so that loading a model never imports the engine.
A tagged file carries ``"format": "<kind>/<version>"``, checked when it is read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from covidkit.atomic import atomic_path


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` to a temp file, then move it into place."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_tagged(path: str | Path, fmt: str, what: str, made_by: str) -> dict[str, Any]:
    """A model file saved as a dict with ``"format": fmt``; clear errors when it is missing or another kind."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist (run {made_by} first)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        raise ValueError(f"{path} is not a covidkit {what} (format {fmt})")
    return ckpt
