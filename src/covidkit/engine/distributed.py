"""torchrun / DistributedDataParallel plumbing: process group from the environment, rank helpers.

``torchrun --nproc_per_node N script.py`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``; a plain ``python script.py`` sets none and runs as one process.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def dist_info() -> DistInfo:
    """The current process's place in the process group (single process when there is none)."""
    if not is_initialized():
        return DistInfo()
    return DistInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size())


def is_main_process() -> bool:
    return dist_info().is_main


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); idempotent.

    Without ``WORLD_SIZE > 1`` in the environment nothing happens and a single-process DistInfo
    comes back.
    """
    if is_initialized():
        return dist_info()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return DistInfo()
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world_size} but {missing} are not set: launch with torchrun")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():  # NCCL needs a GPU per process
            raise RuntimeError(f"process {local_rank} of {world_size} has no GPU of its own: this machine has "
                               f"{torch.cuda.device_count()}; launch torchrun with --nproc_per_node at most that")
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, init_method="env://")
    return dist_info()


def device_for(info: DistInfo) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when GPUs are visible, else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank if info.distributed else torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a one-element list without a process group)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_across_ranks(values: Mapping[str, float]) -> dict[str, float]:
    """Average each named value over the ranks that reported it."""
    gathered = all_gather_object(dict(values))
    keys = sorted({k for d in gathered for k in d})
    return {k: sum(d[k] for d in gathered if k in d) / sum(k in d for d in gathered) for k in keys}
