"""Synthetic external unlabelled radiographs, with planted near-duplicates of the SIIM images.

``input/external/synthetic/<study>/<series>/<image>.{dcm,png}``: most images are new radiographs of the SIIM
generator (new patients, every study class, in the SIIM proportions); a share (``SynthConfig.external_duplicates``)
are near-duplicates of SIIM training and test images, as public sets hold copies of the competition's own
images: re-encoded (DICOM of another style, 8- or 16-bit PNG, sometimes through JPEG), cropped up to
``MAX_CROP`` a side, flipped, resized, re-windowed (contrast and gamma), in combinations. Both kinds share
one layout, one mix of formats and new anonymised ids, so nothing but the pixels tells a copy.

Beside the folder, not in it (a reader of the folder must not take them for images):
``synthetic_duplicates.csv`` (which file copies which SIIM image, how: the ground truth of the
deduplication) and ``synthetic_labels.csv`` (the hidden labels of the new images, for measuring
pseudo-labels; the pipeline never reads either).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from covidkit.data.external import EXTERNAL
from covidkit.data.siim import COMPETITION, dicom_paths
from covidkit.dicom import read_dicom
from covidkit.synth.config import SynthConfig
from covidkit.synth.dicomio import sample_style, to_stored, write_dicom
from covidkit.synth.plan import hex_id, new_seed, stream
from covidkit.synth.siim import StudyPlan, StudyTask, plan_split, render_study
from covidkit.synth.tasks import map_tasks

NAME = "synthetic"  # input/external/synthetic/
DUPLICATES_CSV = f"{NAME}_duplicates.csv"
LABELS_CSV = f"{NAME}_labels.csv"
DUPLICATE_COLUMNS = ["path", "siim_image_id", "siim_study_id", "siim_split", "transforms"]
LABEL_COLUMNS = ["path", "study_id", "study_class", "boxes", "label"]  # boxes, label: as train_image_level.csv
# Formats of every external file, copy or not: DICOM (a SIIM-like style) or PNG.
FORMATS = {"dicom": 0.6, "png8": 0.2, "png16": 0.2}
MAX_CROP = 0.1  # of a side
# Probability of each transformation of a copy (independent; the re-encoding always happens).
P_CROP, P_FLIP, P_RESIZE, P_WINDOW, P_JPEG = 0.5, 0.4, 0.6, 0.6, 0.2


def external_folder(out: str | Path) -> Path:
    return Path(out) / EXTERNAL / NAME


def duplicates_csv(out: str | Path) -> Path:
    return Path(out) / EXTERNAL / DUPLICATES_CSV


def labels_csv(out: str | Path) -> Path:
    return Path(out) / EXTERNAL / LABELS_CSV


def _draw_format(rng: np.random.Generator) -> str:
    return str(rng.choice(list(FORMATS), p=list(FORMATS.values())))


def write_image(stem: Path, img: np.ndarray, fmt: str, rng: np.random.Generator, ids: tuple[str, str, str, str]
                ) -> Path:
    """Write float ``img`` (0..1, bright = dense) as ``stem.dcm`` or ``stem.png``; returns the path.

    ``ids``: study, series, image and patient ids of a DICOM. A 16-bit PNG spans part of its range, as
    PadChest's and BIMCV's do.
    """
    stem.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "dicom":
        style = sample_style(rng)
        study, series, image, patient = ids
        path = stem.with_suffix(".dcm")
        write_dicom(path, to_stored(img, style), style, study_uid=study, series_uid=series, sop_uid=image,
                    patient_id=patient, patient_sex=str(rng.choice(["F", "M"])))
        return path
    if fmt == "png8":
        pixels = np.rint(img * 255).astype(np.uint8)
    else:
        low, high = rng.uniform(0, 4000), rng.uniform(20000, 65535)
        pixels = np.rint(low + img * (high - low)).astype(np.uint16)
    path = stem.with_suffix(".png")
    if not cv2.imwrite(str(path), pixels):
        raise RuntimeError(f"PNG encoding failed for {path}")
    return path


# ------------------------------------------------------------------------------------------- new radiographs

@dataclass(frozen=True)
class NewStudyTask:
    study: StudyTask
    formats: tuple[str, ...]    # per image
    seed: int


def render_new_study(task: NewStudyTask) -> list[dict]:
    """A new study of the SIIM generator; the images drawn as PNG are converted from the DICOM it writes."""
    rows = render_study(task.study)
    rng = np.random.default_rng(task.seed)
    study = task.study.study
    out = []
    for image, row, fmt in zip(study.images, rows, task.formats):
        dicom = Path(task.study.root) / study.split / study.study_id / image.series_id / f"{image.image_id}.dcm"
        path = dicom
        if fmt != "dicom":
            img = read_dicom(dicom).pixels.astype(np.float32) / 255
            path = write_image(dicom.with_suffix(""), img, fmt, rng, ("", "", "", ""))
            dicom.unlink()
        out.append({"path": path.relative_to(Path(task.study.root) / study.split).as_posix(),
                    "study_id": study.study_id, "study_class": study.study_class,
                    "boxes": row["boxes"], "label": row["label"]})
    return out


def _trim(studies: list[StudyPlan], n: int) -> list[StudyPlan]:
    """The first studies holding ``n`` images in all (the last one's extra images cut)."""
    kept, left = [], n
    for study in studies:
        if left <= 0:
            break
        kept.append(replace(study, images=study.images[:left]))
        left -= len(kept[-1].images)
    return kept


# ------------------------------------------------------------------------------------------- near-duplicates

@dataclass(frozen=True)
class CopyTask:
    source: str                 # the SIIM DICOM
    stem: str                   # the copy's path without suffix
    ids: tuple[str, str, str, str]
    seed: int


def transform_copy(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Float ``img`` -> a near-duplicate and the names of what was done (crop, flip, resize, window, jpeg)."""
    done = []
    if rng.random() < P_CROP:
        h, w = img.shape
        left, top, right, bottom = rng.uniform(0, MAX_CROP, 4)
        img = img[int(top * h): h - int(bottom * h), int(left * w): w - int(right * w)]
        done.append(f"crop({left:.3f},{top:.3f},{right:.3f},{bottom:.3f})")
    if rng.random() < P_FLIP:
        img = img[:, ::-1]
        done.append("flip")
    if rng.random() < P_RESIZE:
        scale = rng.uniform(0.3, 0.9)
        h, w = img.shape
        img = cv2.resize(np.ascontiguousarray(img), (max(32, round(w * scale)), max(32, round(h * scale))),
                         interpolation=cv2.INTER_AREA)
        done.append(f"resize({scale:.2f})")
    if rng.random() < P_WINDOW:
        lo, hi, gamma = rng.uniform(0, 0.12), rng.uniform(0.85, 1.0), float(np.exp(rng.uniform(-0.5, 0.5)))
        img = np.clip((img - lo) / (hi - lo), 0, 1) ** gamma
        done.append(f"window({lo:.2f},{hi:.2f},{gamma:.2f})")
    if rng.random() < P_JPEG:
        quality = int(rng.integers(70, 96))
        _, data = cv2.imencode(".jpg", np.rint(img * 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, quality])
        img = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255
        done.append(f"jpeg({quality})")
    return np.ascontiguousarray(img, dtype=np.float32), done


def write_copy(task: CopyTask) -> tuple[str, str]:
    """Write one near-duplicate of a SIIM image; returns its path and what was done to it."""
    rng = np.random.default_rng(task.seed)
    img = read_dicom(task.source).pixels.astype(np.float32) / 255
    img, done = transform_copy(img, rng)
    fmt = _draw_format(rng)
    path = write_image(Path(task.stem), img, fmt, rng, task.ids)
    return str(path), " ".join([*done, fmt])


# ------------------------------------------------------------------------------------------------- the set

def write_external(out: Path, cfg: SynthConfig) -> str:
    """Write ``external/synthetic/``, ``external/synthetic_duplicates.csv`` and ``external/synthetic_labels.csv``.

    Needs the SIIM competition folder in ``out`` (written first). Nothing when ``cfg.external_images`` is 0.
    """
    if cfg.external_images == 0 or cfg.test_only:
        return ""
    out = Path(out)
    folder = external_folder(out)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty: remove it first (its images would mix with the new ones)")
    sources = [(split, image_id, path) for split in ("train", "test")
               for image_id, path in dicom_paths(out / COMPETITION, split).items()]
    rng = stream(cfg.seed, "external")
    n_copies = min(round(cfg.external_duplicates * cfg.external_images), len(sources))
    n_new = cfg.external_images - n_copies
    used: set[str] = set()

    studies = _trim(plan_split(NAME, n_new, rng, used), n_new)
    new_tasks = [NewStudyTask(StudyTask(s, str(folder.parent), cfg.min_size, cfg.max_size),
                              tuple(_draw_format(rng) for _ in s.images), new_seed(rng)) for s in studies]
    picks = rng.choice(len(sources), n_copies, replace=False)
    copy_tasks = []
    for k in picks:
        study, series, image, patient = (hex_id(rng, used) for _ in range(4))
        copy_tasks.append(CopyTask(str(sources[k][2]), str(folder / study / series / image),
                                   (study, series, image, patient), new_seed(rng)))
    new_rows = map_tasks(render_new_study, new_tasks, cfg.workers, desc="external studies")
    copies = map_tasks(write_copy, copy_tasks, cfg.workers, desc="external copies")

    truth = pd.DataFrame([
        {"path": Path(path).relative_to(folder).as_posix(), "siim_image_id": sources[k][1],
         "siim_study_id": Path(sources[k][2]).parent.parent.name, "siim_split": sources[k][0], "transforms": done}
        for k, (path, done) in zip(picks, copies)], columns=DUPLICATE_COLUMNS).sort_values("path", ignore_index=True)
    truth.to_csv(duplicates_csv(out), index=False)
    labels = pd.DataFrame([r for rows in new_rows for r in rows], columns=LABEL_COLUMNS)
    labels = labels.sort_values("path", ignore_index=True)
    labels.to_csv(labels_csv(out), index=False)
    n_test = int((truth["siim_split"] == "test").sum())
    return (f"{folder}: {cfg.external_images} unlabelled images, {n_copies} of them near-duplicates of SIIM images "
            f"({n_copies - n_test} train, {n_test} test; ground truth in {duplicates_csv(out)})")
