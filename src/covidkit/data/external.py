"""External unlabelled radiographs: ``input/external/<name>/``, any folder of DICOM or PNG files, nested any way.

``list_external`` finds the images (DICOM by suffix ``.dcm``/``.dicom`` or by the ``DICM`` marker of a file
without suffix; PNG and JPEG by suffix; everything else, a CSV or a JSON sidecar, is ignored) and gives each an
``image_id`` made of its relative path. ``read_external`` loads one as the competition images are loaded:
DICOM through ``covidkit.dicom.read_dicom`` (modality and VOI LUT, min-max, MONOCHROME1 inverted), a PNG
or JPEG (8 or 16 bits, grey or colour) min-max stretched to 8 bits. ``prepare_external`` writes them as
the square PNGs of stage 00 (``covidkit.prepare.resize_square``, ``write_png_atomic``), with a ``meta.csv``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from covidkit.atomic import atomic_path, atomic_write_text
from covidkit.dicom import DicomError, read_dicom
from covidkit.prepare import (
    META_CSV,
    META_JSON,
    init_worker,
    pool_context,
    resize_square,
    write_png_atomic,
)

EXTERNAL = "external"  # input/external/<name>/
DICOM_SUFFIXES = (".dcm", ".dicom")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")
LIST_COLUMNS = ["image_id", "path", "format"]
EXTERNAL_META_COLUMNS = [*LIST_COLUMNS, "orig_height", "orig_width", "status", "error"]


def _is_dicom_file(path: Path) -> bool:
    """A file without a known suffix is a DICOM when it has the ``DICM`` marker after the 128-byte preamble."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def image_format(path: Path) -> str | None:
    """``"dicom"``, ``"png"``, ``"jpeg"``, or ``None`` for a file that is not an image."""
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if suffix == ".png":
        return "png"
    if suffix in (".jpg", ".jpeg"):
        return "jpeg"
    return "dicom" if not suffix and _is_dicom_file(path) else None


def external_id(relative: str) -> str:
    """A file name for a relative path: ``a/b/c.png`` -> ``a__b__c`` (the suffix kept only when needed)."""
    return PurePosixPath(relative).with_suffix("").as_posix().replace("/", "__")


def list_external(folder: str | Path) -> pd.DataFrame:
    """Every image under ``folder`` (hidden files and folders skipped), sorted by path.

    Columns: ``image_id`` (unique, from the relative path), ``path`` (relative, POSIX), ``format``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of radiographs")
    rows = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            fmt = None if name.startswith(".") else image_format(path)
            if fmt is not None:
                rows.append((path.relative_to(folder).as_posix(), fmt))
    table = pd.DataFrame(rows, columns=["path", "format"])
    ids = table["path"].map(external_id)
    clash = ids.duplicated(keep=False)  # a.png beside a.dcm: both keep their suffix
    ids[clash] = table.loc[clash, "path"].str.replace("/", "__")
    table.insert(0, "image_id", ids)
    return table[LIST_COLUMNS].sort_values("path", ignore_index=True)


def stretch_to_uint8(image: np.ndarray) -> np.ndarray:
    """Any grey image -> uint8 by min-max, as the DICOM conversion ends (a flat image becomes black)."""
    image = image.astype(np.float64)
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return np.zeros(image.shape, np.uint8)
    return np.rint((image - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def read_raster(path: str | Path) -> np.ndarray:
    """A PNG or JPEG (8 or 16 bits, grey, colour or with alpha) -> uint8 grey, min-max stretched."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise OSError(f"cannot read image {path}")
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    return stretch_to_uint8(image)


def read_external(path: str | Path, fmt: str | None = None) -> np.ndarray:
    """One external image as uint8 grey (0 = black), converted as the competition DICOMs are."""
    fmt = fmt or image_format(Path(path))
    if fmt == "dicom":
        return read_dicom(path).pixels
    if fmt in ("png", "jpeg"):
        return read_raster(path)
    raise ValueError(f"{path}: not a DICOM, PNG or JPEG file")


@dataclass(frozen=True)
class ExternalTask:
    image_id: str
    path: str                   # relative to the external folder
    format: str
    source: Path
    png: Path
    size: int


def prepare_external_one(task: ExternalTask) -> dict:
    """One external image -> its square PNG and its meta row (a failure is a row, never an exception)."""
    row = {"image_id": task.image_id, "path": task.path, "format": task.format, "status": "ok", "error": ""}
    try:
        image = read_external(task.source, task.format)
        write_png_atomic(task.png, resize_square(image, task.size))
        row.update(orig_height=image.shape[0], orig_width=image.shape[1])
    except Exception as e:  # bad input must not stop the run
        reason = str(e) if isinstance(e, DicomError) else f"{type(e).__name__}: {e}"
        row.update(status="failed", error=" ".join(reason.split()))
    return row


def external_png(output_dir: str | Path, image_id: str) -> Path:
    return Path(output_dir) / f"{image_id}.png"


def prepare_external(folder: str | Path, output_dir: str | Path, size: int = 512, workers: int | None = None,
                     progress: bool = True) -> pd.DataFrame:
    """Write every image of ``folder`` as ``output_dir/<image_id>.png`` (``size`` square), like stage 00 does.

    Also writes ``meta.csv`` (``EXTERNAL_META_COLUMNS``: the original size, status, one-line error) and
    ``meta.json`` (the size); returns the meta table. Suggested place in a run: ``prepared/external/<name>/``.
    """
    folder, output_dir = Path(folder), Path(output_dir)
    listing = list_external(folder)
    if listing.empty:
        raise FileNotFoundError(f"no DICOM, PNG or JPEG under {folder}")
    output_dir.mkdir(parents=True, exist_ok=True)
    tasks = [ExternalTask(r.image_id, r.path, r.format, folder / r.path, external_png(output_dir, r.image_id), size)
             for r in listing.itertuples()]
    workers = min(workers or os.cpu_count() or 1, len(tasks))
    bar = dict(total=len(tasks), desc=f"prepare {folder.name}", unit="img", disable=not progress)
    if workers <= 1:
        rows = [prepare_external_one(t) for t in tqdm(tasks, **bar)]
    else:
        with pool_context().Pool(workers, initializer=init_worker) as pool:
            rows = list(tqdm(pool.imap(prepare_external_one, tasks), **bar))
    meta = pd.DataFrame(rows, columns=EXTERNAL_META_COLUMNS)
    for col in ("orig_height", "orig_width"):
        meta[col] = pd.to_numeric(meta[col]).astype("Int64")
    with atomic_path(output_dir / META_CSV) as tmp:
        meta.to_csv(tmp, index=False)
    atomic_write_text(output_dir / META_JSON, f'{{"prepared_size": {size}}}\n')
    failed = int((meta["status"] == "failed").sum())
    print(f"{folder}: {len(meta) - failed} prepared, {failed} failed (see {output_dir / META_CSV})")
    return meta


def read_external_meta(prepared_dir: str | Path) -> pd.DataFrame:
    """``meta.csv`` of a prepared external folder, failed images left out, with the PNG paths."""
    prepared_dir = Path(prepared_dir)
    meta = pd.read_csv(prepared_dir / META_CSV, dtype={"image_id": str, "path": str}, keep_default_na=False)
    meta = meta[meta["status"] != "failed"].reset_index(drop=True)
    meta = meta.astype({"orig_height": int, "orig_width": int})
    meta["png"] = [str(external_png(prepared_dir, i)) for i in meta["image_id"]]
    return meta
