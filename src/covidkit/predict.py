"""Prediction with an exported models folder: one image (``Predictor``) or a whole competition folder.

``Predictor.load(models_dir)`` loads every fold model of a folder written by
``covidkit.export.export_models``. ``Predictor.predict(image)`` takes a uint8 grey radiograph
at its original size (what ``covidkit.dicom.read_dicom(...).pixels`` gives) and:

1. resizes it to 00's square prepared size, as the models were trained;
2. runs every fold of Faster R-CNN (03) and of YOLO (04), each also on the flipped image with
   ``hflip_tta`` (its boxes flipped back);
3. fuses all their boxes as notebook 05 does (``covidkit.ensemble.fuse_boxes`` with 05's
   parameters; a detector's weight is shared equally by its folds and views) and maps them to
   original pixels;
4. averages the study model's (06) class probabilities over its folds, or, when 06 fitted a study
   stacker (``covidkit.stacking``), the stacker's probabilities of each fold (fold k's study model and
   fold k's detectors, fed as out of fold); derives the image's ``none`` probability with
   ``covidkit.models.study.none_probability`` and the rule 06 chose (in the manifest).

``predict_competition`` does this for every test DICOM and writes a validated submission: a
study's probabilities are the mean over its images; an image that cannot be decoded still gets
its row (``none`` with the training prior) and a line in the log, so no row of
``sample_submission.csv`` is ever missing.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from covidkit.boxes import EMPTY, as_boxes, scale_boxes
from covidkit.data.siim import (
    IMAGE_SUFFIX, STUDY_CLASSES, STUDY_SUFFIX, dicom_paths, image_row_id, strip_suffix,
)
from covidkit.dicom import DicomError, read_dicom
from covidkit.engine.device import torch_device
from covidkit.ensemble import FusionParams, fuse_boxes
from covidkit.export import DETECTORS, read_manifest
from covidkit.prepare import init_worker, pool_context, resize_square
from covidkit.stacking import StudyStacker, box_features, stacker_features
from covidkit.submission import ImagePrediction, submission_frame, validate_submission, write_submission



@dataclass
class ImageResult:
    """One image's prediction. ``boxes``: ``[N, 4]`` fused opacity boxes in original pixels, best first."""

    boxes: np.ndarray
    scores: np.ndarray
    none_prob: float
    study_probs: dict[str, float]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (see Predictor.predict)


def hflip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Boxes of a horizontally flipped image of ``width`` -> boxes of the original image."""
    boxes = as_boxes(boxes).copy()
    boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
    return boxes


def yolo_device(device: torch.device) -> str:
    """ultralytics' device string of a torch device (``cpu``, ``0`` ...)."""
    return "cpu" if device.type == "cpu" else str(device.index or 0)


class FasterRcnnFold:
    """One fold of 03, from its ``fasterrcnn/fold<k>.pt``."""

    def __init__(self, path: Path, device: torch.device) -> None:
        from covidkit.models.fasterrcnn import load_detector

        self.model, self.infer_size = load_detector(path, device)
        self.device = device

    def __call__(self, square: np.ndarray, hflip_tta: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(boxes, scores)`` in ``square``'s pixels, per view (the image, then its flip)."""
        from covidkit.models.fasterrcnn import predict_boxes

        # what 03's evaluation transform gives: float in [0, 1], grey repeated to three channels
        x = torch.from_numpy(square).to(self.device).float().div_(255.0).expand(3, -1, -1)
        views = [x, x.flip(-1)] if hflip_tta else [x]
        return _unflipped(predict_boxes(self.model, views, self.infer_size), square.shape[1])


class YoloFold:
    """One fold of 04: its ultralytics weights and training ``imgsz``."""

    def __init__(self, path: Path, imgsz: int, device: torch.device) -> None:
        from covidkit.models.yolo import load_model

        self.model = load_model(path)
        self.imgsz = imgsz
        self.device = yolo_device(device)

    def __call__(self, square: np.ndarray, hflip_tta: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        from covidkit.models.yolo import predict_boxes

        views = [square, np.ascontiguousarray(square[:, ::-1])] if hflip_tta else [square]
        return _unflipped(predict_boxes(self.model, views, self.imgsz, self.device), square.shape[1])


def _unflipped(views: list[tuple[np.ndarray, np.ndarray]], width: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The second view, when there is one, predicted the flipped image: flip its boxes back."""
    return [(hflip_boxes(b, width) if i else as_boxes(b), np.asarray(s, np.float64)) for i, (b, s) in enumerate(views)]


class Predictor:
    """Every fold model of a models folder, and how to combine them (see the module docstring)."""

    def __init__(self, detectors: dict[str, list], study: list, fusion: FusionParams, manifest: dict,
                 device: torch.device, hflip_tta: bool, stacker: StudyStacker | None = None) -> None:
        self.detectors = detectors
        self.study = study  # [(model, StudySpec)]
        self.fusion = fusion
        self.stacker = stacker
        self.manifest = manifest
        self.device = device
        self.hflip_tta = hflip_tta
        self.prepared_size = int(manifest["prepared_size"])
        self.none_rule = manifest.get("none_rule", "head")
        self.box_threshold = float(manifest.get("box_threshold", 0.0))  # what a reader is shown by default
        self._lock = threading.Lock()  # ultralytics' predictors keep per-call state: one image at a time

    @classmethod
    def load(cls, models_dir: str | Path, device: str | torch.device = "cpu", hflip_tta: bool = False) -> Predictor:
        """Load (and hash-check) every model of ``models_dir``."""
        from covidkit.models.yolo import setup_ultralytics
        from covidkit.models.study import load_study_model

        models_dir = Path(models_dir)
        manifest = read_manifest(models_dir)
        device = torch_device(device)  # auto: CUDA when there is one; cuda without one: the CPU, warned
        # ultralytics keeps settings and fonts in a writable folder (the models folder may be read-only)
        setup_ultralytics(Path(tempfile.gettempdir()) / "covidkit-predict")
        files = manifest["models"]
        detectors = {
            "fasterrcnn": [FasterRcnnFold(models_dir / rel, device) for rel in files["fasterrcnn"]],
            "yolo": [YoloFold(models_dir / rel, imgsz, device) for rel, imgsz in zip(files["yolo"],
                                                                                    manifest["yolo_imgsz"])],
        }
        study = [load_study_model(models_dir / rel, device) for rel in files["study"]]
        fusion = FusionParams.load(models_dir / manifest["fusion"])
        if len(fusion.weights) != len(DETECTORS):
            raise ValueError(f"fusion.json has {len(fusion.weights)} weights for the detectors {DETECTORS}")
        stacker = StudyStacker.load(models_dir / manifest["stacker"]) if manifest.get("stacker") else None
        return cls(detectors, study, fusion, manifest, device, hflip_tta, stacker)

    @property
    def versions(self) -> dict:
        """Package versions the models were exported with, the models' hashes, this run's settings."""
        return {"exported_with": self.manifest["versions"], "created": self.manifest["created"],
                "models": self.manifest["sha256"], "device": str(self.device), "hflip_tta": self.hflip_tta}

    @property
    def priors(self) -> dict:
        """``{"study": {class: p}, "none": p}``: the training frequencies, for images that cannot be read."""
        return self.manifest["priors"]

    def _square(self, image: np.ndarray, size: int, cache: dict[int, np.ndarray]) -> np.ndarray:
        if size not in cache:
            cache[size] = image if image.shape == (size, size) else resize_square(image, size)
        return cache[size]

    def predict(self, image: np.ndarray) -> ImageResult:
        """Fused opacity boxes, ``none`` and study probabilities of one uint8 grey image of any size.

        ``timings`` (seconds): ``resize``, one entry per detector, ``fusion``, ``study`` and
        ``total`` (the whole call, bookkeeping included). Safe to call from several threads (calls
        run one after another).
        """
        with self._lock:
            return self._predict(image)

    def _predict(self, image: np.ndarray) -> ImageResult:
        from covidkit.models.study import none_probability, predict_outputs

        start = time.perf_counter()
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 2 or min(image.shape) < 1:
            raise ValueError(f"expected a non-empty 2-D uint8 grey image, got {image.dtype} of shape {image.shape}")
        timings: dict[str, float] = {}
        squares: dict[int, np.ndarray] = {}
        tick = time.perf_counter()
        square = self._square(image, self.prepared_size, squares)
        timings["resize"] = time.perf_counter() - tick

        per_fold = {}  # detector -> [fold -> [view -> (boxes, scores) in original pixels]]
        for name in DETECTORS:
            tick = time.perf_counter()
            per_fold[name] = [[(scale_boxes(b, square.shape, image.shape), s) for b, s in fold(square, self.hflip_tta)]
                              for fold in self.detectors[name]]
            timings[name] = time.perf_counter() - tick

        tick = time.perf_counter()
        boxes_list, scores_list, weights = [], [], []
        for name, weight in zip(DETECTORS, self.fusion.weights):
            views = [view for fold in per_fold[name] for view in fold]
            boxes_list += [b for b, _ in views]
            scores_list += [s for _, s in views]
            weights += [weight / len(views)] * len(views)
        boxes, scores = fuse_boxes(boxes_list, scores_list, image.shape, self.fusion, weights)
        timings["fusion"] = time.perf_counter() - tick

        tick = time.perf_counter()
        study_probs, none_head = [], []
        for model, spec in self.study:
            probs, none = predict_outputs(model, spec, [self._square(image, spec.prepared_size, squares)],
                                          self.device, self.hflip_tta)
            study_probs.append(probs[0])
            none_head.append(none[0])
        probs = np.mean(study_probs, axis=0)
        none_prob = none_probability(float(probs[STUDY_CLASSES.index("negative")]), scores,
                                     float(np.mean(none_head)), rule=self.none_rule)
        if self.stacker is not None:
            probs = self._stacked(study_probs, per_fold, image.shape)
        timings["study"] = time.perf_counter() - tick
        timings["total"] = time.perf_counter() - start
        return ImageResult(boxes=boxes, scores=scores, none_prob=float(none_prob),
                           study_probs={c: float(p) for c, p in zip(STUDY_CLASSES, probs)}, timings=timings)

    def _stacked(self, study_probs: list[np.ndarray], per_fold: dict[str, list], image_hw: tuple[int, int]) -> np.ndarray:
        """The study stacker's probabilities, averaged over the folds.

        06 fitted the stacker on out-of-fold rows: one study model's probabilities (with the flip TTA) and
        05's fusion of one Faster R-CNN and one YOLO, each on the unflipped image. Each fold here is fed
        the same way (fold k's three models, unflipped boxes), and the stacker's outputs are averaged, so
        it sees inputs of the kind it was fitted on rather than a fusion of every fold and view.
        """
        stacked = []
        for k, probs in enumerate(study_probs):
            unflipped = [per_fold[name][k][0] for name in DETECTORS]
            boxes, scores = fuse_boxes([b for b, _ in unflipped], [s for _, s in unflipped], image_hw, self.fusion)
            feats = box_features(boxes, scores, image_hw)
            stacked.append(self.stacker.predict_proba(stacker_features(probs, feats))[0])
        return np.mean(stacked, axis=0)


# --------------------------------------------------------------------------- a whole competition folder


def decode(task: tuple[str, Path]) -> tuple[str, np.ndarray | None, str]:
    """``(image_id, pixels or None, error)`` of one DICOM: a bad file is a result, not an exception."""
    image_id, path = task
    try:
        return image_id, read_dicom(path).pixels, ""
    except (DicomError, OSError) as err:
        return image_id, None, f"{type(err).__name__}: {err}"


def _bounded_imap(pool, fn, tasks: list, ahead: int) -> Iterator:
    """``pool.imap(fn, tasks)`` with at most ``ahead`` results waiting: decoded images are large, and
    on a CPU the models are slower than the decoders (``imap`` would hold the whole test set).
    The first ``ahead`` tasks are submitted at once, before the first result is asked for."""
    remaining = iter(tasks)
    pending = deque(pool.apply_async(fn, (task,)) for task in itertools.islice(remaining, ahead))

    def results() -> Iterator:
        while pending:
            result = pending.popleft().get()
            pending.extend(pool.apply_async(fn, (task,)) for task in itertools.islice(remaining, 1))
            yield result
    return results()


@contextlib.contextmanager
def _decoder(workers: int) -> Iterator:
    """A lazy ``map(fn, tasks)``: in this process, or (``workers`` > 0) a pool that decodes ahead of the models."""
    if workers <= 0:
        yield map
        return
    with pool_context().Pool(workers, initializer=init_worker) as pool:
        yield functools.partial(_bounded_imap, pool, ahead=2 * workers + 1)


def default_workers() -> int:
    """Decoding processes beside the main one (which runs the models): one core of the machine's, at least 1."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


@dataclass
class CompetitionPrediction:
    """What ``predict_competition`` did: the submission, the log and the images it could not read."""

    submission: Path
    log: Path
    images: int
    studies: int
    failed: dict[str, str]  # image_id -> reason
    seconds: float

    def summary(self) -> str:
        """What a user wants to see at the end: rows, unreadable images, time per image, where the log is."""
        rows = self.images + self.studies
        return (f"{self.submission}: {rows} rows ({self.studies} studies, {self.images} images), "
                f"{len(self.failed)} images unreadable (prior rows, listed in the log), "
                f"{self.seconds / max(self.images, 1):.2f} s per image ({self.seconds:.0f} s in all); log: {self.log}")


def sample_ids(sample: pd.DataFrame) -> tuple[list[str], list[str]]:
    ids = sample["id"].astype(str)
    images = [strip_suffix(i) for i in ids if i.endswith(IMAGE_SUFFIX)]
    studies = [strip_suffix(i) for i in ids if i.endswith(STUDY_SUFFIX)]
    return images, studies


def predict_competition(competition_dir: str | Path, models_dir: str | Path, out_csv: str | Path,
                        device: str = "cpu", hflip_tta: bool = False, workers: int | None = None,
                        progress: bool = True) -> CompetitionPrediction:
    """Predict every row of ``sample_submission.csv`` from the DICOMs of ``<competition_dir>/test``.

    Writes ``out_csv`` (validated against the sample first) and ``<out_csv>.log`` (a summary and
    one line per image that could not be read). ``workers``: decoding processes (default
    :func:`default_workers`; 0 decodes in this process).
    """
    start = time.perf_counter()
    competition_dir, out_csv = Path(competition_dir), Path(out_csv)
    sample = pd.read_csv(competition_dir / "sample_submission.csv", dtype=str)
    image_ids, study_ids = sample_ids(sample)
    paths = dicom_paths(competition_dir, "test")
    failed = {i: "no DICOM file in test/ for this image" for i in image_ids if i not in paths}
    tasks = [(i, paths[i]) for i in image_ids if i in paths]
    images: dict[str, ImagePrediction] = {}
    per_study: dict[str, list[list[float]]] = defaultdict(list)
    with _decoder(default_workers() if workers is None else workers) as imap:
        decoded = imap(decode, tasks)  # the pool starts decoding while the models load
        predictor = Predictor.load(models_dir, device=device, hflip_tta=hflip_tta)
        for image_id, pixels, error in tqdm(decoded, total=len(tasks), desc="predict", unit="image",
                                            disable=not progress):
            if pixels is None:
                failed[image_id] = error
                continue
            result = predictor.predict(pixels)
            images[image_id] = ImagePrediction(result.boxes, result.scores, result.none_prob)
            per_study[paths[image_id].parent.parent.name].append([result.study_probs[c] for c in STUDY_CLASSES])
    priors = predictor.priors
    for image_id in failed:
        images[image_id] = ImagePrediction(EMPTY.copy(), np.zeros(0), priors["none"])
    prior = [priors["study"][c] for c in STUDY_CLASSES]
    studies = {s: np.mean(per_study[s], axis=0) if per_study.get(s) else prior for s in study_ids}

    frame = submission_frame(images, studies, order=sample["id"])
    problems = validate_submission(frame, sample)
    if problems:
        raise ValueError(f"the submission would be invalid ({len(problems)} problems), e.g. "
                         + "; ".join(str(p) for p in problems[:3]))
    write_submission(out_csv, images, studies, order=sample["id"])
    seconds = time.perf_counter() - start
    log = _write_log(out_csv, len(image_ids), len(study_ids), failed, seconds, predictor)
    return CompetitionPrediction(out_csv, log, len(image_ids), len(study_ids), failed, seconds)


def _write_log(out_csv: Path, n_images: int, n_studies: int, failed: dict[str, str], seconds: float,
               predictor: Predictor) -> Path:
    log = out_csv.with_name(out_csv.name + ".log")
    lines = [f"{out_csv}: {n_studies} studies, {n_images} images, {len(failed)} images unreadable "
             f"(predicted with the training prior), {seconds:.1f} s, device {predictor.device}, "
             f"hflip TTA {'on' if predictor.hflip_tta else 'off'}"]
    lines += [f"unreadable {image_row_id(i)}: {reason}" for i, reason in sorted(failed.items())]
    log.write_text("\n".join(lines) + "\n")
    for line in lines[1:]:
        print(line, file=sys.stderr)
    return log


def score_if_labelled(competition_dir: str | Path, submission_csv: str | Path) -> dict | None:
    """The competition metric of ``submission_csv`` when the test labels lie beside the competition
    (``siim-covid19-detection-solution/``, synthetic data only), else ``None``."""
    from covidkit.data.siim import SOLUTION, SOLUTION_IMAGE_CSV, SOLUTION_STUDY_CSV
    from covidkit.metrics import score_files

    solution = Path(competition_dir).parent / SOLUTION
    if not (solution / SOLUTION_IMAGE_CSV).is_file():
        return None
    return score_files(solution / SOLUTION_IMAGE_CSV, solution / SOLUTION_STUDY_CSV, submission_csv)
