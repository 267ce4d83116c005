"""Learning-rate schedules as ``LambdaLR`` factories ``(optimizer, total_steps) -> scheduler``."""
from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def cosine_with_floor(optimizer: Optimizer, total_steps: int, floor: float = 0.05) -> LambdaLR:
    """Cosine decay from ``lr_0`` to ``floor * lr_0`` over ``total_steps`` steps, then flat.

    ``lr_t = ((1 + cos(pi * t / T)) / 2 * (1 - floor) + floor) * lr_0`` (the NIH and study models).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must lie in [0, 1], got {floor}")

    def factor(step: int) -> float:
        t = min(step, total_steps) / total_steps
        return (1.0 + math.cos(math.pi * t)) / 2.0 * (1.0 - floor) + floor

    return LambdaLR(optimizer, factor)
