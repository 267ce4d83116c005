"""The prepared folder: DICOM -> PNG for a competition folder, and its tables read back.

``prepare`` writes ``OUTPUT/<split>/<image_id>.png``, ``meta.csv``, ``folds.csv`` and ``meta.json`` (the size
every later stage reads: ``prepared_size``); ``train_table`` joins them with the labels for training.

All cores work through a process pool; every PNG is written to a temporary file in its folder
and moved in place, so an interrupted run leaves no half-written image, and a re-run only does
what is missing (an existing PNG of the right size is kept and only its header is re-read).
A file that cannot be read is recorded in ``meta.csv`` with ``status = failed`` and a one-line
``error``; it never stops the run.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from covidkit.atomic import DiskFullError, atomic_write_text, disk_full_error, is_disk_full
from covidkit.data.siim import dicom_paths, read_image_labels, read_study_labels
from covidkit.dicom import DicomError, DicomInfo, read_dicom, read_info

SPLITS = ("train", "test")
META_COLUMNS = [
    "image_id", "study_id", "patient_id", "split", "orig_height", "orig_width",
    "photometric", "bits_stored", "transfer_syntax", "status", "error",
]
MAX_PRINTED_FAILURES = 10
# The prepared folder: <split>/<image_id>.png and these (covidkit.layout.Prepared names them in a run folder)
META_CSV = "meta.csv"  # one row per DICOM found
FOLDS_CSV = "folds.csv"  # the grouped, stratified folds of the training images
META_JSON = "meta.json"  # the folder's facts: the size of its square PNGs


@dataclass
class PrepareSummary:
    """Counts of this run (``ok``: converted now, ``skipped``: PNG already there), ``meta.csv``, folds."""

    ok: int
    failed: int
    skipped: int
    meta: pd.DataFrame
    folds: pd.DataFrame | None = None

    def line(self) -> str:
        return f"{self.ok} ok, {self.failed} failed, {self.skipped} skipped (already done)"


@dataclass(frozen=True)
class Task:
    image_id: str
    study_id: str
    split: str
    dicom: Path
    png: Path
    size: int


def png_path(output_dir: str | Path, split: str, image_id: str) -> Path:
    return Path(output_dir) / split / f"{image_id}.png"


def prepared_size(prepared_dir: str | Path) -> int:
    """The side of a prepared folder's square PNGs, as ``prepare`` recorded it."""
    path = Path(prepared_dir) / META_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: prepare the data first (notebook 00, covidkit prepare)")
    return int(json.loads(path.read_text())["prepared_size"])


def _check_size(output_dir: Path, size: int) -> None:
    """A folder holds PNGs of one size: asking another of a folder prepared earlier is an error."""
    if (output_dir / META_JSON).is_file() and prepared_size(output_dir) != size:
        raise ValueError(f"{output_dir} was prepared at {prepared_size(output_dir)} px, not {size}: use another "
                         "folder (or delete this one)")


def image_sizes(prepared_dir: str | Path) -> dict[str, tuple[int, int]]:
    """``{image_id: (orig_height, orig_width)}`` of every image a prepared folder converted."""
    meta = pd.read_csv(Path(prepared_dir) / META_CSV, dtype={"image_id": str})
    meta = meta[meta["status"] != "failed"]
    return {i: (int(h), int(w)) for i, h, w in zip(meta["image_id"], meta["orig_height"], meta["orig_width"])}


def train_table(prepared_dir: str | Path, competition_dir: str | Path) -> pd.DataFrame:
    """The prepared training images with everything a model needs, one row per image.

    Joins ``meta.csv`` (successfully prepared train images), ``folds.csv`` and the image-level
    labels. Columns: ``image_id, study_id, patient_id, label, fold, path, orig_height, orig_width,
    boxes`` where ``boxes`` are ``[N, 4]`` arrays in original pixels (see
    ``covidkit.boxes.scale_boxes`` for the prepared size).
    """
    prepared_dir = Path(prepared_dir)
    meta = pd.read_csv(prepared_dir / META_CSV, dtype={"image_id": str, "study_id": str})
    meta = meta[(meta["split"] == "train") & (meta["status"] != "failed")]
    folds = pd.read_csv(prepared_dir / FOLDS_CSV, dtype={"image_id": str})[["image_id", "label", "fold"]]
    labels = read_image_labels(Path(competition_dir) / "train_image_level.csv")[["image_id", "boxes"]]
    table = meta.merge(folds, on="image_id").merge(labels, on="image_id")
    table["path"] = [str(png_path(prepared_dir, "train", i)) for i in table["image_id"]]
    columns = ["image_id", "study_id", "patient_id", "label", "fold", "path", "orig_height", "orig_width", "boxes"]
    table = table[columns].sort_values("image_id").reset_index(drop=True)
    if table.empty:
        raise ValueError(f"no prepared training image under {prepared_dir} (run 00 first)")
    return table


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Stretch to ``size x size`` (boxes scale by ``size / orig``): area averaging when shrinking."""
    shrinking = image.shape[0] * image.shape[1] >= size * size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def write_png_atomic(path: Path, image: np.ndarray) -> None:
    """Encode, write to a temporary file beside ``path``, then rename it over ``path``."""
    # OpenCV's default PNG settings: measured the fastest on 512 px radiographs (3 ms, 118 kB;
    # IMWRITE_PNG_COMPRESSION=1: 6 ms, 125 kB).
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError(f"PNG encoding failed for {path}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.tobytes())
        os.replace(tmp, path)
    except BaseException as err:
        os.unlink(tmp)
        if is_disk_full(err):  # stops the run (one line), unlike an unreadable DICOM
            raise disk_full_error(path, needed=len(data)) from None
        raise


def _is_done(task: Task) -> bool:
    """A readable PNG of the requested size (Pillow reads the header only)."""
    try:
        with Image.open(task.png) as png:
            return png.size == (task.size, task.size)
    except (OSError, SyntaxError):
        return False


def _row(task: Task, info: DicomInfo | None = None, error: str = "") -> dict:
    row = {"image_id": task.image_id, "study_id": task.study_id, "split": task.split,
           "status": "failed" if error else "ok", "error": error}
    if info is not None:
        row.update(patient_id=info.patient_id, orig_height=info.height, orig_width=info.width,
                   photometric=info.photometric, bits_stored=info.bits_stored,
                   transfer_syntax=info.transfer_syntax)
    return row


def prepare_one(task: Task) -> tuple[dict, bool]:
    """One DICOM -> its PNG and its meta row; ``True`` when the PNG was already there."""
    try:
        if _is_done(task):
            return _row(task, read_info(task.dicom)), True
        image = read_dicom(task.dicom)
        write_png_atomic(task.png, resize_square(image.pixels, task.size))
        return _row(task, image.info), False
    except DiskFullError:
        raise
    except Exception as e:  # bad input must not stop the run: it becomes a failed row
        reason = str(e) if isinstance(e, DicomError) else f"{type(e).__name__}: {e}"
        return _row(task, error=" ".join(reason.split())), False


def pool_context() -> multiprocessing.context.BaseContext:
    """Workers fork from a clean server process, not from the caller.

    A child forked from a process whose OpenCV (or OpenMP, torch) thread pool has run can hang
    on the pool's locks; the fork server is started once per process, with this module loaded.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def init_worker() -> None:
    cv2.setNumThreads(1)  # one image per process; OpenCV's own threads would only compete


def run_tasks(tasks: list[Task], workers: int, desc: str = "prepare", progress: bool = True) -> list[tuple[dict, bool]]:
    """``prepare_one`` over ``tasks`` in a pool of ``workers`` processes (in this process when 1)."""
    bar = dict(total=len(tasks), desc=desc, unit="img", disable=not progress)
    if workers <= 1 or len(tasks) <= 1:
        return [prepare_one(t) for t in tqdm(tasks, **bar)]
    with pool_context().Pool(min(workers, len(tasks)), initializer=init_worker) as pool:
        return list(tqdm(pool.imap_unordered(prepare_one, tasks), **bar))


def _tasks(input_dir: Path, output_dir: Path, splits: list[str], size: int) -> list[Task]:
    return [
        Task(image_id, path.parent.parent.name, split, path, png_path(output_dir, split, image_id), size)
        for split in splits
        for image_id, path in dicom_paths(input_dir, split).items()
    ]


def _make_output_dirs(output_dir: Path, splits: list[str]) -> None:
    for split in splits:
        (output_dir / split).mkdir(parents=True, exist_ok=True)
        for stale in (output_dir / split).glob(".*.tmp"):  # left by a run that was killed
            stale.unlink()


def _merge_meta(rows: list[dict], meta_csv: Path, splits: list[str]) -> pd.DataFrame:
    """This run's rows plus the rows of the other splits from an earlier ``meta.csv``."""
    meta = pd.DataFrame(rows, columns=META_COLUMNS)
    if meta_csv.exists():
        old = pd.read_csv(meta_csv, dtype=str, keep_default_na=False)
        meta = pd.concat([old[~old["split"].isin(splits)], meta], ignore_index=True)
    for col in ("orig_height", "orig_width", "bits_stored"):
        meta[col] = pd.to_numeric(meta[col], errors="coerce").astype("Int64")
    for col in ("image_id", "study_id", "patient_id", "photometric", "transfer_syntax", "error"):
        meta[col] = meta[col].fillna("").astype(str)
    return meta.sort_values(["split", "image_id"], ignore_index=True)


def _write_csv_atomic(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def _write_folds(meta: pd.DataFrame, input_dir: Path, output_dir: Path, k: int, seed: int) -> pd.DataFrame:
    from covidkit.folds import make_folds  # scikit-learn: not needed by the workers

    train = meta[(meta["split"] == "train") & (meta["status"] == "ok")]
    try:
        folds = make_folds(train[["image_id", "study_id", "patient_id"]],
                           read_study_labels(input_dir / "train_study_level.csv"), k=k, seed=seed)
    except ValueError as err:  # the PNGs and meta.csv are already written: say what is missing
        raise ValueError(f"images prepared, but no {k} folds could be made: {err}") from None
    _write_csv_atomic(folds, output_dir / FOLDS_CSV)
    return folds


def prepare(
    input_dir: str | Path,
    output_dir: str | Path,
    size: int = 512,
    split: str = "all",
    workers: int | None = None,
    folds: int = 5,
    seed: int = 42,
    progress: bool = True,
) -> PrepareSummary:
    """Convert the DICOMs of ``input_dir`` (Kaggle layout) to ``size x size`` PNGs in ``output_dir``.

    Writes ``<split>/<image_id>.png``, ``meta.csv`` (one row per DICOM found) and, when the train
    split is prepared and ``train_study_level.csv`` exists, ``folds.csv`` (``make_folds`` with
    ``k=folds, seed=seed`` over the images that converted). Prints a summary line.
    """
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be one of train, test, all; got {split!r}")
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    _check_size(output_dir, size)
    splits = list(SPLITS) if split == "all" else [split]
    tasks = _tasks(input_dir, output_dir, splits, size)
    if not tasks:
        raise FileNotFoundError(f"no DICOM in {input_dir}/{{{','.join(splits)}}}/<study>/<series>/*.dcm")
    _make_output_dirs(output_dir, splits)
    results = run_tasks(tasks, workers or os.cpu_count() or 1, desc=f"prepare {split}", progress=progress)

    meta = _merge_meta([row for row, _ in results], output_dir / META_CSV, splits)
    _write_csv_atomic(meta, output_dir / META_CSV)
    atomic_write_text(output_dir / META_JSON, json.dumps({"prepared_size": size}) + "\n")
    fold_table = None
    if "train" in splits and (input_dir / "train_study_level.csv").exists():
        fold_table = _write_folds(meta, input_dir, output_dir, folds, seed)

    failed = sorted((r["split"], r["image_id"], r["error"]) for r, _ in results if r["status"] == "failed")
    skipped = sum(skipped for _, skipped in results)
    summary = PrepareSummary(ok=len(results) - len(failed) - skipped, failed=len(failed), skipped=skipped,
                             meta=meta, folds=fold_table)
    _print_report(summary, failed, output_dir / META_CSV)
    return summary


def _print_report(summary: PrepareSummary, failed: list[tuple[str, str, str]], meta_csv: Path) -> None:
    for split, image_id, error in failed[:MAX_PRINTED_FAILURES]:
        print(f"failed {split}/{image_id}: {error}")
    if len(failed) > MAX_PRINTED_FAILURES:
        print(f"... and {len(failed) - MAX_PRINTED_FAILURES} more failed: see {meta_csv}")
    print(summary.line())
