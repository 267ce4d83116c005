"""Faults in one line each: what happened, where, and the setting or command that gets past it.

``explain`` turns a stage's error (raised in its notebook, or by ``covidkit run``) into that line: out of GPU
memory (stage, model, batch size, image size, the ``--set`` that lowers them), a data-loader worker killed
(the ``workers`` setting), a full disk (``covidkit.atomic.DiskFullError``: path, free space, what it needed),
a corrupted checkpoint or model file (``covidkit.model_file.CorruptFileError``). ``check_input`` says which
dataset files a stage lacks before it starts, and the layout it expects (``input/README.md``).
See docs/faults.md.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

LAYOUT_DOC = "input/README.md"

# the setting that names each stage's model (None: the stage has one fixed network)
MODEL_SETTINGS = {"01_pretrain_nih_resnext": "arch", "02_pretrain_rsna_yolo": "model",
                  "04_train_siim_yolo": "baseline_model", "06_study_level": "encoder"}
FIXED_MODELS = {"03_train_siim_fasterrcnn": "Faster R-CNN on 01's backbone", "10_ct_cogseg": "CogSeg U-Net",
                "11_ct_decovnet": "DeCoVNet", "07_make_submission": "the exported models",
                "05_ensemble_wbf": "none (box fusion)", "00_prepare_data": "none (image conversion)"}
SIZE_SETTINGS = ("input_size", "output_size", "lung_input_size", "prepared_size")


def _short(stage: str) -> str:
    return stage[:2]


def _halved(value):
    if isinstance(value, int) and value > 1:
        return max(1, value // 2)
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return [max(32, v // 2 // 32 * 32) for v in value]
    if isinstance(value, int):
        return value
    return None


def out_of_memory(stage: str, settings: dict) -> str:
    model = settings.get(MODEL_SETTINGS.get(stage, ""), FIXED_MODELS.get(stage, "?"))
    batch = settings.get("batch_size")
    size_key = next((k for k in SIZE_SETTINGS if k in settings), None)
    size = settings.get(size_key) if size_key else None
    lower = [f"--set {_short(stage)}.batch_size={_halved(batch)}"] if isinstance(batch, int) and batch > 1 else []
    if size_key and _halved(size) is not None and _halved(size) != size:
        new = _halved(size)
        lower.append(f"--set {_short(stage)}.{size_key}={str(new).replace(' ', '')}")
    advice = (f"lower them: covidkit pipeline {' '.join(lower)} (with your --profile)" if lower
              else "run it on a larger GPU or on the CPU (--set device=cpu)")
    return (f"{stage} ran out of GPU memory (model {model}, batch_size {batch}, {size_key or 'image size'} {size}): "
            f"{advice}")


def worker_killed(stage: str, settings: dict, message: str) -> str:
    workers = settings.get("workers")
    return (f"{stage}: a data-loader worker was killed ({message.strip().rstrip('.')}), most likely by the host's "
            f"memory limit: lower the workers setting (now {workers}), e.g. covidkit pipeline "
            f"--set {_short(stage)}.workers=0")


def explain(stage: str, settings: dict, ename: str, evalue: str) -> str | None:
    """The one line for a known fault (the error's class name and message); None for any other error."""
    first = (evalue.strip().splitlines() or [""])[0]
    if ename == "OutOfMemoryError" or "CUDA out of memory" in evalue:
        return out_of_memory(stage, settings)
    if "DataLoader worker" in evalue and "killed" in evalue:
        return worker_killed(stage, settings, first)
    if ename == "DiskFullError":
        return f"{stage}: {first}"
    if ename in ("OSError", "RuntimeError") and ("No space left on device" in evalue or "[Errno 28]" in evalue):
        from covidkit.atomic import disk_full_error

        path = re.search(r"'([^']+)'", evalue)
        return f"{stage}: {disk_full_error(path.group(1) if path else settings.get('run_dir', '.'))}"
    if ename == "CorruptFileError":
        return f"{stage}: {first}"
    return None


# --------------------------------------------------------------------------- the datasets a stage needs

SIIM = "siim-covid19-detection"
NEEDS = {  # stage -> (dataset folder, files and folders it must hold)
    "00_prepare_data": (SIIM, ["train_study_level.csv", "train_image_level.csv", "sample_submission.csv",
                               "train/", "test/"]),
    "01_pretrain_nih_resnext": ("nih-chest-xrays", ["Data_Entry_2017.csv"]),
    "02_pretrain_rsna_yolo": ("rsna-pneumonia-detection-challenge", ["stage_2_train_labels.csv",
                                                                     "stage_2_train_images/"]),
    "03_train_siim_fasterrcnn": (SIIM, ["train_study_level.csv", "train_image_level.csv"]),
    "04_train_siim_yolo": (SIIM, ["train_study_level.csv", "train_image_level.csv"]),
    "05_ensemble_wbf": (SIIM, ["train_image_level.csv"]),
    "06_study_level": (SIIM, ["train_study_level.csv", "train_image_level.csv"]),
    "07_make_submission": (SIIM, ["sample_submission.csv", "test/"]),
    "11_ct_decovnet": ("ct-covid-volumes", ["labels.csv", "volumes/"]),
}


class InputError(FileNotFoundError):
    """A dataset folder, or part of it, is missing."""


def _missing_studies(csv: Path, folder: Path, id_column: str, suffix: str) -> str | None:
    """Studies a label file lists that have no folder (a half-copied dataset)."""
    ids = pd.read_csv(csv, usecols=[id_column])[id_column].astype(str)
    ids = ids[ids.str.endswith(suffix)].str.removesuffix(suffix) if suffix else ids
    present = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    missing = sorted(set(ids) - present)
    if not missing:
        return None
    return (f"{folder} lacks {len(missing)} of the {ids.nunique()} study folders {csv.name} lists "
            f"(e.g. {', '.join(missing[:3])}): half-copied?")


def input_problem(stage: str, input_dir: str | Path) -> str | None:
    """What of its dataset ``stage`` lacks under ``input_dir``; None when all is there."""
    if stage not in NEEDS:
        return None
    dataset, needed = NEEDS[stage]
    root = Path(input_dir) / dataset
    if not root.is_dir():
        return f"{stage} needs {root}/, which does not exist"
    absent = [n for n in needed if not (root / n.rstrip("/")).exists()]
    if absent:
        return f"{stage}: {root} lacks {', '.join(absent)}"
    if dataset == SIIM:
        halves = [_missing_studies(root / csv, root / split, "id", "_study")
                  for csv, split in (("train_study_level.csv", "train"), ("sample_submission.csv", "test"))
                  if f"{split}/" in needed]
        return next((f"{stage}: {h}" for h in halves if h), None)
    if stage == "01_pretrain_nih_resnext" and not any(root.glob("images*/images/*.png")):
        return f"{stage}: {root} has no images_*/images/*.png"
    if stage == "02_pretrain_rsna_yolo" and not any((root / "stage_2_train_images").glob("*.dcm")):
        return f"{stage}: {root / 'stage_2_train_images'} has no .dcm file"
    return None


def check_input(stage: str, input_dir: str | Path) -> None:
    """``InputError`` naming what is missing and where the expected layout is described."""
    problem = input_problem(stage, input_dir)
    if problem:
        raise InputError(f"{problem}; the layout expected is in {LAYOUT_DOC} (or run `covidkit synth --out "
                         f"{input_dir}` for synthetic data)")
