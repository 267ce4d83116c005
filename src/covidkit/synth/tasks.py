"""Running the per-image (or per-study) render tasks, in a process pool when asked to."""
from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

import cv2
from tqdm.auto import tqdm

T = TypeVar("T")
R = TypeVar("R")


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core: no nested OpenCV threads


def map_tasks(fn: Callable[[T], R], tasks: Iterable[T], workers: int | None, desc: str) -> list[R]:
    """``[fn(t) for t in tasks]`` with a progress bar; results in task order whatever ``workers``.

    Each task carries its own seed, so the output does not depend on how tasks are scheduled.
    """
    tasks = list(tasks)
    workers = (os.cpu_count() or 1) if workers is None else workers
    workers = min(workers, len(tasks))
    if workers <= 1:
        return [fn(t) for t in tqdm(tasks, desc=desc, unit="img")]
    # spawn: safe even when the caller has imported torch or started threads
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker) as pool:
        return list(tqdm(pool.map(fn, tasks), total=len(tasks), desc=desc, unit="img"))
