"""Deterministic planning helpers: seeds, ids and class counts, all from numpy Generators."""
from __future__ import annotations

import numpy as np

# One independent random stream per dataset, so adding a dataset never changes another one.
STREAMS = {"siim": 1, "nih": 2, "rsna": 3}


def stream(seed: int, name: str) -> np.random.Generator:
    """The planning Generator of dataset ``name`` for ``seed``."""
    key = STREAMS.get(name)
    if key is None:  # datasets added later get a stable key from their name
        key = int.from_bytes(name.encode(), "little") % (2 ** 31)
    return np.random.default_rng(np.random.SeedSequence([seed, key]))


def new_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2 ** 63))


def hex_id(rng: np.random.Generator, used: set[str], n: int = 12) -> str:
    """A fresh lowercase hex id of ``n`` characters, like the anonymised SIIM ids."""
    while True:
        value = rng.bytes((n + 1) // 2).hex()[:n]
        if value not in used:
            used.add(value)
            return value


def uuid_like(rng: np.random.Generator, used: set[str]) -> str:
    """A fresh id shaped like a UUID (8-4-4-4-12 hex), like the RSNA patientIds."""
    while True:
        h = rng.bytes(16).hex()
        value = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        if value not in used:
            used.add(value)
            return value


def numeric_uid(rng: np.random.Generator, root: str = "1.2.276.0.7230010.3.1") -> str:
    """A syntactically valid DICOM UID under ``root`` (at most 64 characters)."""
    return f"{root}.{rng.integers(1, 5)}.{rng.integers(10 ** 9, 10 ** 10)}.{rng.integers(10 ** 9, 10 ** 10)}"


def class_counts(n: int, probs: dict[str, float], rng: np.random.Generator) -> list[str]:
    """``n`` labels in the proportions ``probs`` (largest remainder), shuffled.

    Every class appears at least once when ``n >= len(probs)``, so tiny datasets have them all.
    """
    names = list(probs)
    p = np.array([probs[k] for k in names], np.float64)
    p /= p.sum()
    counts = np.floor(n * p).astype(int)
    for i in np.argsort(-(n * p - counts))[: n - counts.sum()]:
        counts[i] += 1
    if n >= len(names):
        for i in np.nonzero(counts == 0)[0]:
            counts[i] += 1
            counts[np.argmax(counts)] -= 1
    labels = [name for name, c in zip(names, counts) for _ in range(c)]
    return [labels[i] for i in rng.permutation(n)]
