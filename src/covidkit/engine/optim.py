"""The optimizer factory every stage trains with: SGD with momentum (the recipes) or AdamW."""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adamw")


def make_optimizer(model: nn.Module, name: str, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4,
                   nesterov: bool = True) -> torch.optim.Optimizer:
    """``name`` over the trainable parameters: "sgd" (momentum, Nesterov unless ``nesterov`` is False) or
    "adamw" (``momentum`` unused)."""
    check_optimizer(name)
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def optimizer_fn(cfg, nesterov: bool = True) -> Callable[[nn.Module], torch.optim.Optimizer]:
    """The engine's ``optimizer_fn`` from a stage Config's ``optimizer``, ``lr``, ``momentum``, ``weight_decay``."""
    return functools.partial(make_optimizer, name=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
                             weight_decay=cfg.weight_decay, nesterov=nesterov)


def check_optimizer(name: str) -> None:
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
