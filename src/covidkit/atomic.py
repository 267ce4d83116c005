"""Atomic file writes: write a temp file beside the target, then ``os.replace`` it into place,
so that a run killed mid-write leaves the previous file, never a truncated one.

A write that fails because the disk is full raises ``DiskFullError``: one line naming the path, the free space
and roughly what the write needed; the previous file is left as it was.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

# what torch.save's C++ writer says when a write fails (it keeps no errno)
_TORCH_WRITE_FAILED = ("file write failed", "failed writing file", "unexpected pos")


class DiskFullError(OSError):
    """No space left for a write; ``str()`` is the one-line message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)

    def __str__(self) -> str:
        return self.strerror


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(path: str | Path) -> int | None:
    """Free space on the file system of ``path`` (or of its nearest existing folder)."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def is_disk_full(err: BaseException) -> bool:
    if isinstance(err, DiskFullError):
        return True
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(err, RuntimeError) and any(s in str(err) for s in _TORCH_WRITE_FAILED)


def disk_full_error(path: str | Path, needed: int | None = None, written: int | None = None) -> DiskFullError:
    """The one-line error of a write to ``path`` that found the disk full."""
    free = free_bytes(path)
    need = (f"it needed about {human_bytes(needed)}" if needed else
            f"it needed more than the {human_bytes(written)} written when it failed" if written else
            "its size is unknown")
    return DiskFullError(errno.ENOSPC, f"disk full writing {path}: {human_bytes(free) if free is not None else '?'} "
                                       f"free on its file system, {need}; the previous file (if any) is intact. "
                                       f"Free some space and run the same command again")


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


@contextlib.contextmanager
def atomic_path(path: str | Path, needed: int | None = None) -> Iterator[Path]:
    """Yield a temp path (same folder and suffix) to write; it replaces ``path`` on success.

    ``needed``: the bytes the write is expected to take, for the message when the disk is full (default: the
    size of the file it replaces).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as err:
        if is_disk_full(err) and not isinstance(err, DiskFullError):
            raise disk_full_error(path, needed or _size(path), _size(tmp)) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path, needed=len(text.encode())) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path, needed=len(data)) as tmp:
        tmp.write_bytes(data)
