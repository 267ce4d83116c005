"""Checkpoints: ``last.pt`` (everything needed to resume), ``last.prev.pt`` (the one before it) and ``best.pt``
(weights and record).

A checkpoint is a plain dict of tensors and builtin types, so ``torch.load(weights_only=True)``
reads it: model (unwrapped from DDP), optimizer, scheduler, scaler, epoch (completed epochs),
rng (one state per rank), history (metric rows), config (TrainConfig as a dict), best, and the tag
``format``. Each file has its SHA-256 beside it (``covidkit.model_file``): a resume from a ``last.pt`` that is
truncated or corrupted falls back to ``last.prev.pt``, and says so in one line.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from covidkit.atomic import atomic_path, atomic_write_text
from covidkit.model_file import (
    CorruptFileError, _tensor_bytes, file_sha256, hash_path, read_file, unwrap,
)

LAST = "last.pt"
PREVIOUS = "last.prev.pt"  # the last.pt before the current one: what a resume falls back to
BEST = "best.pt"
TRAIN_STATE_FORMAT = "covidkit.train_state/1"
# Keys a best.pt keeps: enough to use the weights and know where they come from.
WEIGHT_KEYS = ("model", "epoch", "history", "config", "best")
RESUME_KEYS = ("model", "optimizer", "epoch", "rng", "history", "config")


def weights_only(state: dict[str, Any]) -> dict[str, Any]:
    """The subset of a training state that ``best.pt`` keeps (no optimizer, no RNG)."""
    return {k: state[k] for k in WEIGHT_KEYS if k in state}


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint checked against its hash; ``CorruptFileError`` (one line) when it cannot be trusted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = read_file(path, "checkpoint", map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CorruptFileError(f"checkpoint {path} holds no model state (not a covidkit checkpoint)")
    return ckpt


def load_weights(path: str | Path, model: nn.Module, strict: bool = True) -> dict[str, Any]:
    """Load a checkpoint's weights into ``model``; returns the checkpoint (epoch, history, ...)."""
    ckpt = load_checkpoint(path)
    unwrap(model).load_state_dict(ckpt["model"], strict=strict)
    return ckpt


def save_last(state: dict[str, Any], run_dir: str | Path) -> Path:
    """Write ``last.pt``; the one it replaces becomes ``last.prev.pt``.

    The new file is written in full (a temp file) before anything moves, so a full disk or a kill leaves the
    previous ``last.pt`` as it was. Hash files move first (see ``covidkit.model_file.save_checkpoint``).
    """
    run_dir = Path(run_dir)
    last, prev = run_dir / LAST, run_dir / PREVIOUS
    with atomic_path(last, needed=_tensor_bytes(state) or None) as tmp:
        torch.save({**state, "format": TRAIN_STATE_FORMAT}, tmp)
        digest = file_sha256(tmp)
        if last.is_file():
            hash_path(prev).unlink(missing_ok=True)
            if hash_path(last).is_file():
                os.replace(hash_path(last), hash_path(prev))
            os.replace(last, prev)
    atomic_write_text(hash_path(last), digest + "\n")
    return last


def has_checkpoint(run_dir: str | Path) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / LAST).exists() or (run_dir / PREVIOUS).exists()


def _resume_state(path: Path) -> dict[str, Any]:
    ckpt = load_checkpoint(path)
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if ckpt.get("format", TRAIN_STATE_FORMAT) != TRAIN_STATE_FORMAT or missing:
        raise CorruptFileError(f"checkpoint {path} is not a training state ({ckpt.get('format')}, lacks {missing})")
    return ckpt


def resume_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """The training state to resume ``run_dir`` from: ``last.pt``, or ``last.prev.pt`` when ``last.pt`` is
    missing, truncated or corrupted (one line on stderr). ``CorruptFileError`` when neither is good."""
    run_dir = Path(run_dir)
    problems = []
    for name in (LAST, PREVIOUS):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            ckpt = _resume_state(path)
        except CorruptFileError as err:
            problems.append(str(err))
            continue
        if problems:  # the bad last.pt goes: the next save must not keep it as the previous one
            print(f"covidkit: {problems[0]}; resuming from {path} (epoch {ckpt['epoch']})", file=sys.stderr)
            (run_dir / LAST).unlink(missing_ok=True)
            hash_path(run_dir / LAST).unlink(missing_ok=True)
        return ckpt
    raise CorruptFileError(f"cannot resume {run_dir}: {'; '.join(problems) or 'no checkpoint'}, and no good previous "
                           f"checkpoint; delete {run_dir} to train this run from the start")
