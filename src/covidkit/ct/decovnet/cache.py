"""Per-case caches of the DeCoVNet stages: arrays saved with a key that names what made them.

A cached ``.npz`` is reused only when its stored ``key`` equals the key of the current settings, input files
and models; anything else (another spacing or input size, a regenerated volume, a retrained lung U-Net, a
damaged file) computes it again.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import torch


def save_npz(path: Path, **arrays) -> Path:
    """``np.savez`` of the arrays that are not None, atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{k: v for k, v in arrays.items() if v is not None})
    tmp.replace(path)
    return path


def source_stamp(path: Path | None) -> str | None:
    """Names, sizes and modification times of a file or of a DICOM folder's files: changes when the data do."""
    if path is None:
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_key(**parts) -> str:
    """What made a cached file, as a string stored beside its arrays."""
    return json.dumps(parts, sort_keys=True, default=str)


def data_digest(files: list[Path], labels: list[int] | None = None) -> str:
    """SHA-256 of the cache keys of ``files`` (and their labels): names the data a network is trained on, so
    that resuming a finished run on other data fails instead of silently reusing the old network."""
    digest = hashlib.sha256()
    for path in files:
        with np.load(path) as arrays:
            digest.update(str(arrays["key"]).encode() if "key" in arrays.files else path.name.encode())
    digest.update(json.dumps(None if labels is None else [int(label) for label in labels]).encode())
    return digest.hexdigest()


def is_cached(path: Path, key: str) -> bool:
    """Whether ``path`` holds arrays computed for ``key``: a changed setting, volume or lung model (or an
    unreadable file) means computing them again, never reusing another run's arrays."""
    if not path.is_file():
        return False
    try:
        with np.load(path) as arrays:
            return "key" in arrays.files and str(arrays["key"]) == key
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False
