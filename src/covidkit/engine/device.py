"""Where tensors go, and autocast that is a no-op on CPU."""
from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Mapping
from typing import Any

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def default_device() -> torch.device:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_device(name: str | torch.device | None = "auto", setting: str = "device") -> torch.device:
    """The device a ``device`` setting names: ``auto`` (or None) is CUDA when there is one, else the CPU; a CUDA
    device on a machine without one falls back to the CPU with a one-line warning naming ``setting``."""
    if name is None or str(name) == "auto":
        return default_device()
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        warn_no_cuda(setting, name)
        return torch.device("cpu")
    return device


def warn_no_cuda(setting: str, value) -> None:
    """The one line said when a setting asks for a GPU on a machine without one."""
    print(f"covidkit: warning: {setting} is {str(value)!r} but no CUDA device is visible: running on the CPU "
          f"(set {setting} to cpu or auto to silence this)", file=sys.stderr)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's parameters (or buffers) are, the device its inputs must go to; the CPU for a model
    without either."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


def amp_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"amp dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def amp_enabled(device: torch.device, enabled: bool) -> bool:
    """Mixed precision only on CUDA: on CPU the same code trains in float32."""
    return enabled and torch.device(device).type == "cuda"


def autocast_context(
    device: torch.device | str, enabled: bool = True, dtype: torch.dtype | str = torch.float16
) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on CUDA when enabled; a null context otherwise."""
    device = torch.device(device)
    if not amp_enabled(device, enabled):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype(dtype) if isinstance(dtype, str) else dtype)


def to_device(obj: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """Move every tensor inside nested lists, tuples and dicts (detection batches) to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, non_blocking) for v in obj)
    return obj
