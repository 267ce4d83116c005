"""Synthetic RSNA Pneumonia Detection Challenge data (``rsna-pneumonia-detection-challenge/``).

``stage_2_train_images/<patientId>.dcm`` and ``stage_2_test_images/<patientId>.dcm`` (8-bit
MONOCHROME2 JPEG baseline secondary captures, ``rsna_size`` square), ``stage_2_train_labels.csv``
(one row per box; one ``Target`` 0 row with empty coordinates for an image without opacity),
``stage_2_detailed_class_info.csv`` (one row per label row) and ``stage_2_sample_submission.csv``.
About 22.5 % of the images show lung opacities (1 box 44 %, 2 boxes 54 %, 3 2 %: one reader's box per
affected lung zone, ~0.21 x 0.29 of the image), 44.5 % another abnormality without opacity (a large
heart, emphysema, a nodule, a pneumothorax ...), 33 % none, as in the real training set.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from covidkit.synth.config import SynthConfig
from covidkit.synth.dicomio import write_rsna_dicom
from covidkit.synth.lesions import anatomy_mods, boxes_of, draw_findings, sample_zone, zone_opacity
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
from covidkit.synth.plan import class_counts, new_seed, numeric_uid, stream, uuid_like
from covidkit.synth.tasks import map_tasks

DATASET = "rsna-pneumonia-detection-challenge"
OPACITY, NOT_NORMAL, NORMAL = "Lung Opacity", "No Lung Opacity / Not Normal", "Normal"
CLASS_PROBS = {OPACITY: 0.225, NOT_NORMAL: 0.445, NORMAL: 0.33}
N_BOXES = ([1, 2, 3], [0.436, 0.542, 0.022])  # boxes (opacity zones) per positive image
# Abnormal without lung opacity, as the RSNA readers used the class.
NOT_NORMAL_FINDINGS = ["Cardiomegaly", "Emphysema", "Nodule", "Pneumothorax", "Pleural_Thickening",
                       "Fibrosis", "Atelectasis", "Hernia"]


@dataclass(frozen=True)
class RsnaImage:
    split: str                   # train or test
    patient_id: str
    uids: tuple[str, str, str]   # study, series, SOP instance
    label: str
    findings: tuple[str, ...]
    n_opacities: int
    sex: str
    age: int
    view: str
    seed: int


def plan_split(split: str, n: int, rng: np.random.Generator, used: set[str]) -> list[RsnaImage]:
    images = []
    for label in class_counts(n, CLASS_PROBS, rng):
        findings = ()
        if label == NOT_NORMAL:
            k = int(rng.choice([1, 2], p=[0.75, 0.25]))
            findings = tuple(rng.choice(NOT_NORMAL_FINDINGS, size=k, replace=False).tolist())
        images.append(RsnaImage(
            split=split, patient_id=uuid_like(rng, used), uids=tuple(numeric_uid(rng) for _ in range(3)),
            label=label, findings=findings,
            n_opacities=int(rng.choice(N_BOXES[0], p=N_BOXES[1])) if label == OPACITY else 0,
            sex="F" if rng.random() < 0.43 else "M", age=int(rng.integers(5, 90)),
            view="AP" if rng.random() < 0.46 else "PA", seed=new_seed(rng),
        ))
    return images


@dataclass(frozen=True)
class RsnaTask:
    image: RsnaImage
    root: str
    size: int


def render_image(task: RsnaTask) -> np.ndarray:
    """Render and write one image; returns its opacity boxes ``[N, 4]`` in pixels."""
    image = task.image
    rng = np.random.default_rng(image.seed)
    findings = list(image.findings)
    chest = render_anatomy(rng, anatomy_mods(findings, rng), view=image.view, female=image.sex == "F")
    draw_findings(chest, rng, findings)
    lesions = []
    first = int(rng.integers(2))
    for k in range(image.n_opacities):  # one zone per lung; a third one: a second zone in the first lung
        side, region = (first + k) % 2, k // 2
        zone = sample_zone(rng, (0.62, 0.12), 0.45, 0.72, u_center=rng.uniform(0.4, 0.7))
        if region:
            zone = sample_zone(rng, (0.3, 0.05), 0.3, 0.6, u_center=rng.uniform(0.4, 0.7))
        lesions += zone_opacity(chest, rng, side, zone, region, 0.5)
    add_devices(chest, rng, p=0.35)
    exposure = sample_exposure(rng)
    hw = (task.size, task.size)
    matrix = sample_view(chest, hw, rng)
    img = acquire(develop(chest, exposure, rng), matrix, hw, exposure, rng)
    if rng.random() < 0.3:
        add_marker(img, rng)
    folder = "stage_2_train_images" if image.split == "train" else "stage_2_test_images"
    write_rsna_dicom(Path(task.root) / folder / f"{image.patient_id}.dcm", np.rint(img * 255).astype(np.uint8),
                     patient_id=image.patient_id, uids=image.uids, sex=image.sex, age=image.age,
                     view=image.view, spacing=0.143)
    boxes = np.round(transform_boxes(boxes_of(lesions), matrix, hw))
    return boxes[(boxes[:, 2] - boxes[:, 0] >= 8) & (boxes[:, 3] - boxes[:, 1] >= 8)]


def label_tables(images: list[RsnaImage], boxes: list[np.ndarray]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``stage_2_train_labels.csv`` and ``stage_2_detailed_class_info.csv``: one row per box."""
    labels, classes = [], []
    for image, found in zip(images, boxes):
        # An opacity whose box fell off the film leaves an image the readers would call not normal.
        label = image.label if image.label != OPACITY or len(found) else NOT_NORMAL
        for x1, y1, x2, y2 in found if label == OPACITY else [(np.nan,) * 4]:
            labels.append({"patientId": image.patient_id, "x": x1, "y": y1, "width": x2 - x1,
                           "height": y2 - y1, "Target": int(label == OPACITY)})
            classes.append({"patientId": image.patient_id, "class": label})
    return (pd.DataFrame(labels, columns=["patientId", "x", "y", "width", "height", "Target"]),
            pd.DataFrame(classes, columns=["patientId", "class"]))


def write_rsna(out: Path, cfg: SynthConfig) -> str:
    """Write ``rsna-pneumonia-detection-challenge/`` into ``out``."""
    root = Path(out) / DATASET
    rng = stream(cfg.seed, "rsna")
    used: set[str] = set()
    images = plan_split("train", cfg.rsna_images, rng, used) + plan_split("test", cfg.n_rsna_test, rng, used)
    boxes = map_tasks(render_image, [RsnaTask(im, str(root), cfg.rsna_size) for im in images], cfg.workers,
                      desc="RSNA images")
    train = [i for i, im in enumerate(images) if im.split == "train"]
    labels, classes = label_tables([images[i] for i in train], [boxes[i] for i in train])
    root.mkdir(parents=True, exist_ok=True)
    labels.to_csv(root / "stage_2_train_labels.csv", index=False)
    classes.to_csv(root / "stage_2_detailed_class_info.csv", index=False)
    test_ids = [im.patient_id for im in images if im.split == "test"]
    pd.DataFrame({"patientId": test_ids, "PredictionString": ["0.5 0 0 100 100"] * len(test_ids)}).to_csv(
        root / "stage_2_sample_submission.csv", index=False)
    per_image = classes.drop_duplicates("patientId")["class"].value_counts()
    counts = ", ".join(f"{c} {int(per_image.get(c, 0))}" for c in CLASS_PROBS)
    return (f"{root}: {len(train)} train images ({counts}; {int(labels['Target'].sum())} boxes), "
            f"{len(test_ids)} test images")
