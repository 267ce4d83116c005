"""Synthetic NIH ChestX-ray14 data, in the Kaggle layout (``nih-chest-xrays/``).

``images_0NN/images/<patient:08d>_<follow-up:03d>.png`` (8-bit grey, ``nih_size`` square),
``Data_Entry_2017.csv`` with the real header (the bracketed column pairs split by their comma,
and a trailing empty column), and ``train_val_list.txt`` / ``test_list.txt`` split by patient.
Labels follow the real frequencies (No Finding ~54 %, 1.6 findings per abnormal image), chronic
findings persist across a patient's follow-ups, and every finding is drawn visibly (see
``lesions.FINDING_DRAWERS``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from covidkit.synth.config import SynthConfig
from covidkit.synth.lesions import NIH_FINDINGS, anatomy_mods, draw_findings
from covidkit.synth.phantom import (
    acquire, add_devices, add_marker, develop, render_anatomy, sample_exposure, sample_view,
)
from covidkit.synth.plan import new_seed, stream
from covidkit.synth.tasks import map_tasks

DATASET = "nih-chest-xrays"
DATA_ENTRY = "Data_Entry_2017.csv"
# The real header: its bracketed names contain commas, so pandas reads 12 columns
# ("OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]", "Unnamed: 11").
HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
NO_FINDING = "No Finding"
P_NO_FINDING = 0.54
# Share of all images with each finding in the real data (112,120 images).
FREQUENCY = {
    "Infiltration": 0.177, "Effusion": 0.119, "Atelectasis": 0.103, "Nodule": 0.056, "Mass": 0.052,
    "Pneumothorax": 0.047, "Consolidation": 0.042, "Pleural_Thickening": 0.030, "Cardiomegaly": 0.025,
    "Emphysema": 0.022, "Edema": 0.021, "Fibrosis": 0.015, "Pneumonia": 0.013, "Hernia": 0.002,
}
CHRONIC = ("Cardiomegaly", "Emphysema", "Fibrosis", "Hernia", "Pleural_Thickening", "Nodule", "Mass")
ORIGINAL_SIZES = [(2500, 2048), (2048, 2500), (2992, 2991), (3056, 2544), (2021, 2021), (2682, 2749), (2894, 2729)]
SPACINGS = [0.143, 0.139, 0.168, 0.171]


@dataclass(frozen=True)
class NihImage:
    name: str
    folder: str
    findings: tuple[str, ...]
    follow_up: int
    patient: int
    patient_seed: int
    age: int
    sex: str
    view: str
    seed: int
    original: tuple[int, int]    # width, height
    spacing: float


def sample_findings(rng: np.random.Generator) -> list[str]:
    """Findings of one image: none with the real probability, else each by its real share."""
    if rng.random() < P_NO_FINDING:
        return []
    while True:
        found = [name for name in NIH_FINDINGS if rng.random() < FREQUENCY[name] / (1 - P_NO_FINDING)]
        if found:
            return found


def plan_images(cfg: SynthConfig, rng: np.random.Generator) -> list[NihImage]:
    images: list[NihImage] = []
    patient = 0
    while len(images) < cfg.nih_images:
        patient += 1
        n = min(int(rng.geometric(0.5)), cfg.nih_images - len(images))
        patient_seed, sex, age = new_seed(rng), "F" if rng.random() < 0.44 else "M", int(rng.integers(2, 90))
        chronic: list[str] = []
        for follow_up in range(n):
            findings = sample_findings(rng)
            if chronic and rng.random() < 0.7:
                findings = sorted(set(findings) | set(chronic), key=NIH_FINDINGS.index)
            chronic = [f for f in findings if f in CHRONIC] or chronic
            index = len(images)
            width, height = ORIGINAL_SIZES[rng.integers(len(ORIGINAL_SIZES))]
            images.append(NihImage(
                name=f"{patient:08d}_{follow_up:03d}.png",
                folder=f"images_{index // cfg.nih_per_folder + 1:03d}",
                findings=tuple(findings), follow_up=follow_up, patient=patient, patient_seed=patient_seed,
                age=min(95, age + follow_up // 3), sex=sex, view="PA" if rng.random() < 0.6 else "AP",
                seed=new_seed(rng), original=(width, height), spacing=float(rng.choice(SPACINGS)),
            ))
    return ensure_both_kinds(images)


def ensure_both_kinds(images: list[NihImage]) -> list[NihImage]:
    """Tiny sets: make sure there is at least one normal and one abnormal image."""
    if len(images) >= 2 and len({bool(im.findings) for im in images}) == 1:
        last = images[-1]
        findings = () if last.findings else ("Effusion",)
        images[-1] = replace(last, findings=findings)
    return images


@dataclass(frozen=True)
class NihTask:
    image: NihImage
    root: str
    size: int


def render_image(task: NihTask) -> None:
    image = task.image
    rng = np.random.default_rng(image.seed)
    findings = list(image.findings)
    chest = render_anatomy(np.random.default_rng(image.patient_seed), anatomy_mods(findings, rng),
                           view=image.view, female=image.sex == "F")
    draw_findings(chest, rng, findings)
    add_devices(chest, rng, p=0.35)
    exposure = sample_exposure(rng)
    hw = (task.size, task.size)
    img = acquire(develop(chest, exposure, rng), sample_view(chest, hw, rng), hw, exposure, rng)
    if rng.random() < 0.3:
        add_marker(img, rng)
    path = Path(task.root) / image.folder / "images" / image.name
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.rint(img * 255).astype(np.uint8)):
        raise OSError(f"could not write {path}")


def data_entry_line(im: NihImage) -> str:
    labels = "|".join(im.findings) or NO_FINDING
    width, height = im.original
    return (f"{im.name},{labels},{im.follow_up},{im.patient},{im.age},{im.sex},{im.view},"
            f"{width},{height},{im.spacing},{im.spacing},")


def split_by_patient(images: list[NihImage], rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """~25 % of the patients (all their images) go to the test list."""
    patients = sorted({im.patient for im in images})
    test = {p for p in patients if rng.random() < 0.25}
    if len(patients) >= 2 and not test:
        test = {patients[-1]}
    if len(test) == len(patients) and len(patients) >= 2:
        test.discard(patients[0])
    names = sorted(im.name for im in images)
    test_names = {im.name for im in images if im.patient in test}
    return [n for n in names if n not in test_names], [n for n in names if n in test_names]


def write_nih(out: Path, cfg: SynthConfig) -> str:
    """Write ``nih-chest-xrays/`` into ``out``."""
    root = Path(out) / DATASET
    rng = stream(cfg.seed, "nih")
    images = plan_images(cfg, rng)
    map_tasks(render_image, [NihTask(im, str(root), cfg.nih_size) for im in images], cfg.workers, desc="NIH images")
    root.mkdir(parents=True, exist_ok=True)
    # Written by hand: csv/pandas would quote the header names that contain commas.
    (root / DATA_ENTRY).write_text("\n".join([HEADER, *map(data_entry_line, images)]) + "\n")
    train_val, test = split_by_patient(images, rng)
    (root / "train_val_list.txt").write_text("".join(f"{n}\n" for n in train_val))
    (root / "test_list.txt").write_text("".join(f"{n}\n" for n in test))
    counts = {name: sum(name in im.findings for im in images) for name in NIH_FINDINGS}
    normal = sum(not im.findings for im in images)
    labels = [f"{NO_FINDING} {normal}"] + [f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]) if v]
    return (f"{root}: {len(images)} images of {len({im.patient for im in images})} patients "
            f"({len(train_val)} train/val, {len(test)} test); {', '.join(labels)}")
