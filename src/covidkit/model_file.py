"""Model files: a plain dict of tensors and builtin types, written atomically, read with ``weights_only``.

The one format the models (``covidkit.models``: backbones, study models, YOLO's resume state) and the training
engine (``covidkit.engine``: ``last.pt``, ``best.pt``) share, so that loading a model never imports the engine.
A tagged file carries ``"format": "<kind>/<version>"``, checked when it is read, and every saved file has its
SHA-256 beside it (``<file>.sha256``): a truncated or corrupted file is named, never loaded as garbage.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from covidkit.atomic import atomic_path, atomic_write_text

HASH_SUFFIX = ".sha256"


class CorruptFileError(ValueError):
    """A model file or checkpoint that does not match its hash, or cannot be read at all."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def hash_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + HASH_SUFFIX)


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` to a temp file, then move it into place; its SHA-256 goes to ``<path>.sha256``.

    The old hash file goes first: a run killed between the two moves leaves a file without a hash (read, its
    tag checked), never a file with another file's hash. A full disk raises ``covidkit.atomic.DiskFullError``.
    """
    path = Path(path)
    with atomic_path(path, needed=_tensor_bytes(state) or None) as tmp:
        torch.save(state, tmp)
        digest = file_sha256(tmp)
        hash_path(path).unlink(missing_ok=True)
    atomic_write_text(hash_path(path), digest + "\n")
    return path


def verify_file(path: str | Path, what: str = "model file") -> None:
    """Raise ``CorruptFileError`` when ``path`` does not match the SHA-256 saved beside it (none saved: pass)."""
    path, sidecar = Path(path), hash_path(path)
    if not sidecar.is_file():
        return
    expected = sidecar.read_text().strip()
    if expected and file_sha256(path) != expected:
        raise CorruptFileError(f"{what} {path} is corrupted or truncated: its SHA-256 does not match {sidecar.name}")


def read_file(path: str | Path, what: str = "model file", map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` of a file checked against its hash; one clear error when unreadable."""
    path = Path(path)
    verify_file(path, what)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as err:  # truncated zip, bad pickle
        if isinstance(err, FileNotFoundError):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CorruptFileError(f"{what} {path} is corrupted or truncated ({first[:120]})") from None


def load_tagged(path: str | Path, fmt: str, what: str, made_by: str) -> dict[str, Any]:
    """A model file saved as a dict with ``"format": fmt``; clear errors when it is missing or another kind."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist (run {made_by} first)")
    ckpt = read_file(path, what)
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        raise ValueError(f"{path} is not a covidkit {what} (format {fmt})")
    return ckpt
