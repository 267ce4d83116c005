"""``covidkit bench prepare``: ``covidkit prepare`` against a naive loop and against decoding alone.

- naive loop: one process, one file after another: ``dcmread``, ``apply_voi_lut`` (float64),
  invert, min-max, ``cv2.resize``, ``cv2.imwrite`` with default settings (the public SIIM recipe);
- decode alone: ``dcmread`` + ``pixel_array`` and nothing else, in a pool of the same size;
- prepare: ``covidkit.prepare.prepare`` on a competition folder holding the same files.

Targets (2 cores): prepare at least 1.7x the naive loop's images/s, and its time at most 1.3x
the decode-alone time (what remains for VOI, resize, PNG and bookkeeping).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_voi_lut

from covidkit.data.siim import dicom_paths
from covidkit.prepare import init_worker, pool_context, prepare

SPEEDUP_TARGET = 1.7
OVERHEAD_TARGET = 1.3
RADIOGRAPHS = ("RG1_UNCR.dcm", "RG1_J2KR.dcm")  # the real PA chest CR: uncompressed, lossless JPEG 2000


@dataclass(frozen=True)
class PrepareBench:
    images: int
    workers: int
    size: int
    source: str
    naive_s: float
    decode_s: float
    prepare_s: float
    repeats: int = 1
    dicom_bytes: float = 0.0  # per image, the source files
    dicom_pixels: float = 0.0  # per image, rows x columns of the source files
    png_bytes: float = 0.0  # per image, what prepare wrote: the prepared footprint

    @property
    def prepare_core_s(self) -> float:
        """Seconds of one core per image in ``covidkit prepare`` (the pool's time times its workers)."""
        return self.prepare_s * self.workers / self.images

    @property
    def speedup(self) -> float:
        """prepare's images/s over the naive loop's."""
        return self.naive_s / self.prepare_s

    @property
    def overhead(self) -> float:
        """prepare's time over decoding alone."""
        return self.prepare_s / self.decode_s

    def table(self) -> str:
        rows = [
            ("naive loop (1 process)", self.naive_s),
            (f"decode only ({self.workers} workers)", self.decode_s),
            (f"covidkit prepare ({self.workers} workers)", self.prepare_s),
        ]
        lines = [
            f"prepare benchmark: {self.images} DICOMs ({self.source}) -> {self.size} px PNG, "
            f"{self.workers} workers, {os.cpu_count()} CPUs, best of {self.repeats}",
            f"{'method':<34}{'seconds':>9}{'images/s':>10}",
            *(f"{name:<34}{sec:>9.2f}{self.images / sec:>10.2f}" for name, sec in rows),
            f"per image: DICOM {self.dicom_bytes / 2**20:.2f} MiB, prepared PNG {self.png_bytes / 2**20:.2f} MiB, "
            f"{self.prepare_core_s:.2f} core-seconds in prepare",
            verdict(f"prepare / naive images/s: {self.speedup:.2f}x", self.speedup >= SPEEDUP_TARGET,
                     f">= {SPEEDUP_TARGET}x"),
            verdict(f"prepare / decode-only time: {self.overhead:.2f}x", self.overhead <= OVERHEAD_TARGET,
                     f"<= {OVERHEAD_TARGET}x"),
        ]
        return "\n".join(lines)


def verdict(text: str, ok: bool, target: str) -> str:
    return f"{text:<44}target {target:<9}{'OK' if ok else 'MISSED'}"


def naive_convert(src: Path, dst: Path, size: int) -> None:
    """The baseline, as the public SIIM notebooks wrote it."""
    ds = pydicom.dcmread(src)
    data = apply_voi_lut(ds.pixel_array, ds)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        data = np.amax(data) - data
    data = data - np.min(data)
    data = data / np.max(data)
    image = (data * 255).astype(np.uint8)
    cv2.imwrite(str(dst), cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA))


def decode_only(path: Path) -> tuple[int, ...]:
    return pydicom.dcmread(path).pixel_array.shape


def _link_competition(root: Path, files: list[Path], copy: bool) -> list[Path]:
    """``root/train/<study>/<series>/<image>.dcm`` for each file (copies or symlinks)."""
    paths = []
    for i, src in enumerate(files):
        dst = root / "train" / f"study{i:05d}" / f"series{i:05d}" / f"image{i:05d}.dcm"
        dst.parent.mkdir(parents=True)
        if copy:
            shutil.copyfile(src, dst)
        else:
            dst.symlink_to(src.resolve())
        paths.append(dst)
    return paths


def _source_files(images: int, input_dir: Path | None) -> tuple[list[Path], str]:
    if input_dir is None:
        radiographs = [Path(get_testdata_file(name, download=False)) for name in RADIOGRAPHS]
        return [radiographs[i % 2] for i in range(images)], "copies of RG1_UNCR / RG1_J2KR"
    found = [*dicom_paths(input_dir, "train").values(), *dicom_paths(input_dir, "test").values()]
    if not found:
        raise FileNotFoundError(f"no DICOM in {input_dir}/{{train,test}}/<study>/<series>/*.dcm")
    return found[:images], f"from {input_dir}"


def _timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def _naive_loop(paths: list[Path], out: Path, size: int) -> None:
    out.mkdir()
    for i, path in enumerate(paths):
        naive_convert(path, out / f"{i:05d}.png", size)


def _decode_pool(paths: list[Path], workers: int) -> None:
    with pool_context().Pool(min(workers, len(paths)), initializer=init_worker) as pool:
        list(pool.imap_unordered(decode_only, paths))


def _prepare_quiet(competition: Path, out: Path, size: int, workers: int) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        summary = prepare(competition, out, size=size, split="train", workers=workers, progress=False)
    if summary.failed:
        print(f"note: {summary.failed} of the benchmark's DICOMs failed in prepare")


def _mean_bytes(paths) -> float:
    sizes = [path.stat().st_size for path in paths]
    return sum(sizes) / max(len(sizes), 1)


def _mean_pixels(paths) -> float:
    sizes = [int(ds.Rows) * int(ds.Columns) for ds in (pydicom.dcmread(path, stop_before_pixels=True) for path in paths)]
    return sum(sizes) / max(len(sizes), 1)


def bench_prepare(images: int = 48, size: int = 512, workers: int | None = None,
                  input_dir: Path | None = None, repeats: int = 1, json_path: str | Path | None = None) -> PrepareBench:
    """Time the three ways on the same ``images`` DICOMs; print the table and return the numbers.

    With ``repeats > 1`` the three run in turn that many times and each keeps its best time
    (on a shared machine, the round least disturbed by other work).
    """
    workers = workers or os.cpu_count() or 1
    files, source = _source_files(images, input_dir)
    times: dict[str, list[float]] = {"naive": [], "decode": [], "prepare": []}
    with tempfile.TemporaryDirectory(prefix="covidkit-bench-") as tmp:
        tmp = Path(tmp)
        paths = _link_competition(tmp / "input", files, copy=input_dir is None)
        for path in paths:  # same start for all three: files in the page cache
            path.read_bytes()
        # Untimed: import the decoder plugins here and start the pools' fork server.
        _naive_loop(paths[:2], tmp / "warmup", size)
        _decode_pool(paths[:2], workers)
        for round_ in range(repeats):  # fresh output folders for every timing
            times["naive"].append(_timed(_naive_loop, paths, tmp / f"naive{round_}", size))
            times["decode"].append(_timed(_decode_pool, paths, workers))
            times["prepare"].append(_timed(_prepare_quiet, tmp / "input", tmp / f"prepared{round_}", size, workers))
        png_bytes = _mean_bytes((tmp / "prepared0").rglob("*.png"))
    result = PrepareBench(
        images=len(paths), workers=workers, size=size, source=source,
        naive_s=min(times["naive"]), decode_s=min(times["decode"]), prepare_s=min(times["prepare"]),
        repeats=repeats, dicom_bytes=_mean_bytes(files), dicom_pixels=_mean_pixels(files), png_bytes=png_bytes,
    )
    print(result.table())
    if json_path:
        Path(json_path).write_text(json.dumps({**asdict(result), "prepare_core_s": result.prepare_core_s}, indent=1))
    return result


# --------------------------------------------------------------------------- bench_predict
