"""Training samplers and the per-epoch DataLoader, built so that every epoch's order and
augmentation randomness are a function of (seed, epoch, rank) only: a resumed run repeats them."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from covidkit.engine.config import TrainConfig
from covidkit.engine.distributed import DistInfo
from covidkit.engine.seed import loader_generator


class WeightedSampler(Sampler[int]):
    """``WeightedRandomSampler`` that draws from a generator seeded ``seed + epoch`` and splits its
    draw across DDP ranks (rank r takes draws r, r + R, r + 2R, ...).

    Torch's own ``WeightedRandomSampler`` knows neither epochs nor ranks, hence this class.
    """

    def __init__(
        self,
        weights: Sequence[float] | torch.Tensor,
        num_samples: int | None = None,
        replacement: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        if self.weights.ndim != 1 or len(self.weights) == 0:
            raise ValueError(f"weights must be a non-empty 1-D sequence, got shape {tuple(self.weights.shape)}")
        if not torch.isfinite(self.weights).all() or (self.weights < 0).any() or self.weights.sum() <= 0:
            raise ValueError("weights must be finite, non-negative and not all zero")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        total = len(self.weights) if num_samples is None else num_samples
        self.num_samples = math.ceil(total / num_replicas)  # per rank
        self.total_size = self.num_samples * num_replicas
        if not replacement and self.total_size > int((self.weights > 0).sum()):
            raise ValueError(f"cannot draw {self.total_size} samples without replacement")
        self.replacement = replacement
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        draw = torch.multinomial(self.weights, self.total_size, self.replacement, generator=g)
        return iter(draw[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


def class_balanced_weights(labels: Sequence[Any]) -> torch.Tensor:
    """One weight per sample, ``1 / count(its class)``: every class is drawn equally often."""
    classes, inverse, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    if len(classes) == 0:
        raise ValueError("labels is empty")
    return torch.as_tensor(1.0 / counts[inverse.ravel()], dtype=torch.double)


def collate_lists(batch: Sequence[Sequence[Any]]) -> tuple[list[Any], ...]:
    """``[(img, target), ...]`` -> ``([img, ...], [target, ...])``: detection batches of any sizes."""
    return tuple(list(field) for field in zip(*batch))


def make_train_sampler(
    dataset: Dataset,
    cfg: TrainConfig,
    info: DistInfo,
    sampler: Sampler | None = None,
    sample_weights: Sequence[float] | torch.Tensor | None = None,
) -> Sampler:
    """The caller's sampler (checked), a ``WeightedSampler`` from weights, or a shuffling
    ``DistributedSampler`` (also for one process: it shuffles with a generator seeded seed + epoch)."""
    if sampler is not None and sample_weights is not None:
        raise ValueError("pass either sampler or sample_weights, not both")
    if sample_weights is not None:
        if len(sample_weights) != len(dataset):
            raise ValueError(f"{len(sample_weights)} sample weights for a dataset of {len(dataset)}")
        return WeightedSampler(sample_weights, seed=cfg.seed, num_replicas=info.world_size, rank=info.rank)
    if sampler is not None:
        if not callable(getattr(sampler, "set_epoch", None)):
            raise TypeError(
                f"{type(sampler).__name__} has no set_epoch(epoch): a resumed run could not repeat its order; "
                "use covidkit.engine.WeightedSampler, DistributedSampler, or pass sample_weights"
            )
        if info.distributed and getattr(sampler, "num_replicas", None) != info.world_size:
            raise ValueError(
                f"{type(sampler).__name__} does not split data across the {info.world_size} ranks "
                "(its num_replicas must equal the world size); pass sample_weights to get a DDP-aware sampler"
            )
        return sampler
    return DistributedSampler(
        dataset, num_replicas=info.world_size, rank=info.rank, shuffle=cfg.shuffle, seed=cfg.seed
    )


def make_train_loader(
    dataset: Dataset,
    sampler: Sampler,
    cfg: TrainConfig,
    epoch: int,
    info: DistInfo,
    collate_fn: Callable | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A fresh loader per epoch: its order and worker seeds depend only on (seed, epoch, rank)."""
    sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        drop_last=cfg.drop_last,
        generator=loader_generator(cfg.seed, epoch, info.rank),
    )
