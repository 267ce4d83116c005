"""Synthetic SIIM-FISABIO-RSNA COVID-19 Detection data, in the Kaggle layout.

``siim-covid19-detection/`` gets ``train/`` and ``test/`` DICOM trees, ``train_image_level.csv``,
``train_study_level.csv`` and ``sample_submission.csv``; ``siim-covid19-detection-solution/``
gets the test labels in the two training formats (used for scoring only).

Like the real data (figures in docs/data.md): study classes in the real proportions, patients
with 1 to 25 studies (mean ~1.86), ~4 % of studies with 2-5 images (same lesions, another exposure
and file style; the reader boxed exactly one of them), opacity patterns that follow the
radiological definitions of each class with one reader's box per affected lung zone (a typical
study: two boxes, one per lung), some positive images without boxes (a faint opacity nobody
boxed, or a poor film), landscape films (width / height ~1.21), and DICOM styles drawn
independently of the class.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from covidkit.boxes import format_boxes_column, label_from_boxes
from covidkit.data.siim import (
    COMPETITION,
    SOLUTION,
    SOLUTION_IMAGE_CSV,
    SOLUTION_STUDY_CSV,
    STUDY_CLASSES,
    STUDY_COLUMNS,
    image_row_id,
    study_row_id,
)
from covidkit.synth.config import SynthConfig
from covidkit.synth.dicomio import RECIPES, sample_size, sample_style, to_stored, write_dicom
from covidkit.synth.lesions import boxes_of, draw_study_pattern
from covidkit.synth.phantom import (
    acquire,
    add_devices,
    add_marker,
    develop,
    render_anatomy,
    sample_exposure,
    sample_view,
    transform_boxes,
)
from covidkit.synth.plan import class_counts, hex_id, new_seed, stream
from covidkit.synth.tasks import map_tasks

CLASS_PROBS = {"negative": 0.277, "typical": 0.472, "indeterminate": 0.173, "atypical": 0.078}
# Real SIIM train set: images per study, studies per patient (5 or more: a tail up to 25, mean ~7.5).
IMAGES_PER_STUDY = ([1, 2, 3, 4, 5], [0.962, 0.034, 0.0025, 0.001, 0.0005])
STUDIES_PER_PATIENT = ([1, 2, 3, 4], [0.632, 0.184, 0.086, 0.038])  # the remaining 6 %: 5 or more
MAX_STUDIES_PER_PATIENT = 25
# Positive single-image studies whose reader drew no box (a faint opacity, or a poor film): with the
# unboxed extra images of multi-image studies, ~5 % of typical and indeterminate images and ~19 %
# of atypical ones stay without a box, as in the real labels.
UNBOXED = {"typical": 0.01, "indeterminate": 0.01, "atypical": 0.14}
# Framing of the landscape SIIM films: lung box / image ~0.73 wide and ~0.72 high, as in the real set.
STRETCH, ROI_HEIGHT = (1.0, 1.15), 1.45
MIN_BOX_SIDE = 8  # pixels; smaller remnants of a box clipped by the film edge are dropped


@dataclass(frozen=True)
class ImagePlan:
    image_id: str
    series_id: str
    seed: int
    boxed: bool                 # False: the reader drew no box on this image
    recipe: int | None          # index into dicomio.RECIPES, or None for a random style


@dataclass(frozen=True)
class StudyPlan:
    split: str
    study_id: str
    study_class: str
    patient_id: str
    patient_seed: int           # anatomy: shared by the studies of one patient
    sex: str
    seed: int                   # lesions and devices
    view: str                   # AP or PA
    faint: bool                 # opacities too faint to have been boxed
    poor: bool                  # a poor film (any class)
    images: tuple[ImagePlan, ...]


def studies_per_patient(rng: np.random.Generator, cap: int) -> int:
    """Studies of one patient, drawn from the real distribution (mean ~1.86), at most ``cap``."""
    values, probs = STUDIES_PER_PATIENT
    if rng.random() < sum(probs):
        k = int(rng.choice(values, p=np.array(probs) / sum(probs)))
    else:
        k = 5 + int(rng.geometric(1 / 3.5)) - 1  # 5, 6, ... with mean ~7.5
    return max(1, min(k, MAX_STUDIES_PER_PATIENT, cap))


def plan_split(split: str, n: int, rng: np.random.Generator, used: set[str]) -> list[StudyPlan]:
    """Studies of one split: classes, patients, images and which of them carry boxes.

    Patients have 1 to 25 studies as in the real set (no patient in two splits); in a positive
    study with several images the reader boxed exactly one of them (rarely none).
    """
    owners: list[tuple[str, int, str]] = []
    cap = max(2, n // 20)  # a small split is not one patient's
    while len(owners) < n:
        patient = (hex_id(rng, used), new_seed(rng), "F" if rng.random() < 0.45 else "M")
        owners += [patient] * studies_per_patient(rng, cap)
    owners = owners[:n]
    studies = []
    for study_class, patient in zip(class_counts(n, CLASS_PROBS, rng), owners):
        positive = study_class != "negative"
        n_images = int(rng.choice(IMAGES_PER_STUDY[0], p=IMAGES_PER_STUDY[1]))
        unboxed = positive and (rng.random() < (UNBOXED[study_class] if n_images == 1 else 0.011))
        faint = unboxed and rng.random() < 0.7
        poor = (unboxed and not faint) or rng.random() < 0.02  # a poor film, boxed when the opacity shows
        boxed_k = int(rng.integers(n_images)) if positive and not unboxed else -1
        images = []
        for k in range(n_images):
            series_id = images[0].series_id if k and rng.random() < 0.5 else hex_id(rng, used)
            images.append(ImagePlan(hex_id(rng, used), series_id, new_seed(rng), k == boxed_k, None))
        studies.append(StudyPlan(
            split=split, study_id=hex_id(rng, used), study_class=study_class, patient_id=patient[0],
            patient_seed=patient[1], sex=patient[2], seed=new_seed(rng),
            view="AP" if rng.random() < 0.45 else "PA", faint=faint, poor=poor, images=tuple(images),
        ))
    return studies


def assign_recipes(studies: list[StudyPlan], rng: np.random.Generator) -> list[StudyPlan]:
    """Give each DICOM style recipe to one random image, so even tiny sets show the variety."""
    slots = [(i, k) for i, s in enumerate(studies) for k in range(len(s.images))]
    picks = rng.permutation(len(slots))[: len(RECIPES)]
    chosen = {slots[p]: r for r, p in enumerate(picks)}
    return [
        replace(s, images=tuple(replace(im, recipe=chosen.get((i, k))) for k, im in enumerate(s.images)))
        for i, s in enumerate(studies)
    ]


@dataclass(frozen=True)
class StudyTask:
    study: StudyPlan
    root: str                   # the competition folder
    min_size: int
    max_size: int


def render_study(task: StudyTask) -> list[dict]:
    """Render and write every image of a study; returns one label row per image."""
    study = task.study
    chest = render_anatomy(np.random.default_rng(study.patient_seed), view=study.view, female=study.sex == "F")
    rng = np.random.default_rng(study.seed)
    # Everything but the lesions is drawn first, so that a study and its copy with another
    # class differ only by the lesions (the tests compare such twins).
    add_devices(chest, rng)
    faint_severity = rng.uniform(0.3, 0.45)
    chest.severity = faint_severity if study.faint else 1.0
    lesions = draw_study_pattern(chest, rng, study.study_class)
    canvas_boxes = boxes_of(lesions)
    rows = []
    for k, image in enumerate(study.images):
        rng = np.random.default_rng(image.seed)
        style = sample_style(rng, RECIPES[image.recipe] if image.recipe is not None else None)
        hw = sample_size(rng, task.min_size, task.max_size)
        exposure = sample_exposure(rng, poor=study.poor)
        matrix = sample_view(chest, hw, rng, stretch=STRETCH, roi_height=ROI_HEIGHT)
        img = acquire(develop(chest, exposure, rng), matrix, hw, exposure, rng)
        if rng.random() < 0.3:
            add_marker(img, rng)
        boxes = transform_boxes(canvas_boxes, matrix, hw) if image.boxed else np.zeros((0, 4))
        keep = (boxes[:, 2] - boxes[:, 0] >= MIN_BOX_SIDE) & (boxes[:, 3] - boxes[:, 1] >= MIN_BOX_SIDE)
        boxes = np.round(boxes[keep], 5)  # as written in the boxes column, so that label and boxes agree
        path = Path(task.root) / study.split / study.study_id / image.series_id / f"{image.image_id}.dcm"
        write_dicom(path, to_stored(img, style), style, study_uid=study.study_id, series_uid=image.series_id,
                    sop_uid=image.image_id, patient_id=study.patient_id, patient_sex=study.sex, instance=k + 1)
        rows.append({"id": image_row_id(image.image_id), "boxes": format_boxes_column(boxes),
                     "label": label_from_boxes(boxes), "StudyInstanceUID": study.study_id})
    return rows


def study_table(studies: list[StudyPlan]) -> pd.DataFrame:
    onehot = [[int(s.study_class == c) for c in STUDY_CLASSES] for s in studies]
    df = pd.DataFrame(onehot, columns=STUDY_COLUMNS)
    df.insert(0, "id", [study_row_id(s.study_id) for s in studies])
    return df.sort_values("id", ignore_index=True)


def image_table(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["id", "boxes", "label", "StudyInstanceUID"])
    return df.sort_values("id", ignore_index=True)


def sample_submission(studies: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """Study rows first, then image rows, as in the real file."""
    return pd.DataFrame({
        "id": list(studies["id"]) + list(images["id"]),
        "PredictionString": ["negative 1 0 0 1 1"] * len(studies) + ["none 1 0 0 1 1"] * len(images),
    })


def write_siim(out: Path, cfg: SynthConfig) -> str:
    """Write ``siim-covid19-detection/`` and ``siim-covid19-detection-solution/`` into ``out``.

    With ``cfg.test_only``: the test split alone (``test/``, ``sample_submission.csv`` and the solution
    folder), a fresh test set for models trained on another seed's training split.
    """
    out = Path(out)
    root, solution = out / COMPETITION, out / SOLUTION
    rng = stream(cfg.seed, "siim")
    used: set[str] = set()
    splits = {"test": cfg.test_studies} if cfg.test_only else {"train": cfg.train_studies, "test": cfg.test_studies}
    studies = [s for split, n in splits.items() for s in plan_split(split, n, rng, used)]
    studies = assign_recipes(studies, rng)
    tasks = [StudyTask(s, str(root), cfg.min_size, cfg.max_size) for s in studies]
    rows = map_tasks(render_study, tasks, cfg.workers, desc="SIIM studies")

    tables = {}
    for split in splits:
        in_split = [i for i, s in enumerate(studies) if s.split == split]
        tables[split] = (study_table([studies[i] for i in in_split]),
                         image_table([r for i in in_split for r in rows[i]]))
    root.mkdir(parents=True, exist_ok=True)
    solution.mkdir(parents=True, exist_ok=True)
    if "train" in tables:
        tables["train"][0].to_csv(root / "train_study_level.csv", index=False)
        tables["train"][1].to_csv(root / "train_image_level.csv", index=False)
    sample_submission(*tables["test"]).to_csv(root / "sample_submission.csv", index=False)
    tables["test"][0].to_csv(solution / SOLUTION_STUDY_CSV, index=False)
    tables["test"][1].to_csv(solution / SOLUTION_IMAGE_CSV, index=False)
    return summarize(root, solution, tables)


def summarize(root: Path, solution: Path, tables: dict) -> str:
    lines = [f"{root}:"]
    for split, (study_df, image_df) in tables.items():
        counts = ", ".join(f"{c} {int(study_df[col].sum())}" for c, col in zip(STUDY_CLASSES, STUDY_COLUMNS))
        boxed = int((image_df["label"] != "none 1 0 0 1 1").sum())
        lines.append(f"  {split}: {len(study_df)} studies ({counts}); {len(image_df)} images, {boxed} with boxes")
    lines.append(f"  test labels for scoring: {solution}")
    return "\n".join(lines)
