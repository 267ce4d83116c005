"""``covidkit bench scale``: the cheap stages on tables of the real competition's size, with fabricated predictions.

The synthetic runs have a few hundred images; the competition has 6,334 training and 1,263 test images, and a
full run's detectors give up to 100 boxes per image, per model and fold. This benchmark fabricates tables of
that size (true boxes, and per detector the true boxes found with noise plus false ones, scores between) and
times, with the process's peak resident memory, what runs on them after the training:

- the out-of-fold opacity AP of one detector (``covidkit.oof.opacity_ap``),
- 05: the weighted boxes fusion of both detectors' OOF boxes, a grid of three weightings and its honest
  out-of-fold score, and the best-F1 operating point,
- 06: the image ``none`` rule chosen out of fold, the study stacker's features and its out-of-fold fit,
- 07: a test image's fusion of every fold and view, the submission writer, its validation and the metric.

Each step runs at the full size and at a quarter of it; the ratio of the times gives the growth exponent
(1.0: linear; n log n from a quarter to the whole of 6,334 is about 1.1). A step above ``EXPONENT_LIMIT``
is flagged.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from covidkit.bench.memory import peak_rss_mib, reset_peak_rss
from covidkit.data.siim import STUDY_CLASSES

TRAIN_IMAGES, TEST_IMAGES = 6334, 1263  # the competition's
BOXES_PER_MODEL = 100  # per image, model and fold: what the detectors keep at a low confidence threshold
FOLDS = 5
EXPONENT_LIMIT = 1.3


@dataclass
class Step:
    name: str
    seconds: dict[str, float]  # per scale ("1/4", "1")
    peak_mib: float  # the process's peak resident memory during the step, at full size

    @property
    def exponent(self) -> float:
        small, full = self.seconds["1/4"], self.seconds["1"]
        return math.log(max(full, 1e-6) / max(small, 1e-6)) / math.log(4)


def _boxes(rng: np.random.Generator, n: int, width: float, height: float) -> np.ndarray:
    x1, y1 = rng.uniform(0, 0.8 * width, n), rng.uniform(0, 0.8 * height, n)
    w, h = rng.uniform(0.05, 0.2, n) * width, rng.uniform(0.05, 0.2, n) * height
    return np.stack([x1, y1, x1 + w, y1 + h], 1)


@dataclass
class Tables:
    """Fabricated competition-sized tables."""

    truth: dict[str, np.ndarray]
    sizes: dict[str, tuple[int, int]]
    images: pd.DataFrame  # 06's OOF image table
    detectors: list  # OofPredictions of Faster R-CNN and YOLO
    test_ids: list[str]
    test_studies: list[str]


def fabricate(n_train: int, n_test: int, boxes: int = BOXES_PER_MODEL, seed: int = 0) -> Tables:
    from covidkit.oof import OofPredictions

    rng = np.random.default_rng(seed)
    ids = [f"{i:012x}" for i in range(n_train)]
    sizes = {i: (int(h), int(w)) for i, h, w in zip(ids, rng.integers(2000, 3500, n_train), rng.integers(2000, 3500, n_train))}
    truth = {i: _boxes(rng, int(rng.choice([0, 1, 2, 3], p=[0.3, 0.2, 0.4, 0.1])), sizes[i][1], sizes[i][0]) for i in ids}
    folds = rng.permutation(np.arange(n_train) % FOLDS)
    detectors = []
    for _ in range(2):
        parts = []
        for image_id, fold in zip(ids, folds):
            h, w = sizes[image_id]
            found = truth[image_id] + rng.normal(0, 20, truth[image_id].shape)
            b = np.vstack([found, _boxes(rng, boxes - len(found), w, h)])
            s = np.concatenate([rng.uniform(0.3, 0.9, len(found)), rng.uniform(0.001, 0.6, boxes - len(found))])
            parts.append((image_id, fold, b, s))
        frame = pd.DataFrame({"image_id": np.repeat([p[0] for p in parts], boxes),
                              "fold": np.repeat([p[1] for p in parts], boxes)})
        frame[["x1", "y1", "x2", "y2"]] = np.vstack([p[2] for p in parts])
        frame["score"] = np.concatenate([p[3] for p in parts])
        detectors.append(OofPredictions(frame, pd.DataFrame({"image_id": ids, "fold": folds})))
    labels = np.array(STUDY_CLASSES)[rng.permutation(np.arange(n_train) % len(STUDY_CLASSES))]
    probs = rng.dirichlet(np.ones(4), n_train)
    images = pd.DataFrame({"image_id": ids, "study_id": [f"s{i}" for i in ids], "fold": folds, "model_fold": folds,
                           "label": labels, "has_box": [len(truth[i]) > 0 for i in ids]})
    images[[f"p_{c}" for c in STUDY_CLASSES]] = probs
    images["p_none_head"] = rng.uniform(0, 1, n_train)
    test_ids = [f"t{i:011x}" for i in range(n_test)]
    return Tables(truth, sizes, images, detectors, test_ids, [f"u{i:011x}" for i in range(n_test)])


def _steps(t: Tables) -> dict[str, Callable[[], object]]:
    from covidkit.ensemble import (FusionParams, fuse_boxes, fuse_oof, grid_fusions, operating_point,
                                   tuned_out_of_fold)
    from covidkit.metrics import score_submission
    from covidkit.oof import opacity_ap
    from covidkit.stacking import fit_stacker, oof_box_features, out_of_fold_probs, stacker_features
    from covidkit.submission import ImagePrediction, submission_frame, validate_submission
    from covidkit.study_scores import choose_none_rule

    params = FusionParams()
    rng = np.random.default_rng(1)
    fused = {}

    def fusion():
        fused["oof"] = fuse_oof(t.detectors, t.sizes, params)

    def grid():
        tuned_out_of_fold(grid_fusions(t.detectors, t.sizes, {"weights": [[1, 1], [1, 2], [2, 1]]}, base=params),
                          t.truth)

    def stacker():
        x = stacker_features(t.images[[f"p_{c}" for c in STUDY_CLASSES]].to_numpy(),
                             oof_box_features(t.images["image_id"], fused["oof"].boxes, t.sizes))
        y = t.images["label"].map(STUDY_CLASSES.index).to_numpy()
        out_of_fold_probs(x, y, t.images["fold"].to_numpy())
        fit_stacker(x, y)

    test_lists = [_boxes(rng, BOXES_PER_MODEL, 3000, 3000) for _ in range(2 * FOLDS * 2)]  # detectors x folds x views
    test_scores = [rng.uniform(0.001, 0.9, BOXES_PER_MODEL) for _ in test_lists]
    predictions = {}

    def predict_fusion():
        for image_id in t.test_ids:
            boxes, scores = fuse_boxes(test_lists, test_scores, (3000, 3000), params, [1 / len(test_lists)] * len(test_lists))
            predictions[image_id] = ImagePrediction(boxes[:BOXES_PER_MODEL], scores[:BOXES_PER_MODEL], 0.5)

    frames = {}

    def write():
        studies = {s: [0.25] * 4 for s in t.test_studies}
        order = [f"{s}_study" for s in t.test_studies] + [f"{i}_image" for i in t.test_ids]
        frames["submission"] = submission_frame(predictions, studies, order=order)
        frames["sample"] = pd.DataFrame({"id": order, "PredictionString": ""})

    def validate():
        assert not validate_submission(frames["submission"], frames["sample"])

    def score():
        labels = pd.DataFrame({"image_id": t.test_ids, "boxes": [_boxes(rng, 2, 3000, 3000) for _ in t.test_ids]})
        studies = pd.DataFrame({"study_id": t.test_studies, "label": rng.choice(STUDY_CLASSES, len(t.test_studies))})
        score_submission(labels, studies, frames["submission"])

    return {
        "OOF opacity AP, one detector": lambda: opacity_ap(t.detectors[0], t.truth),
        "05 fusion of the OOF boxes": fusion,
        "05 grid of 3 weightings, scored out of fold": grid,
        "05 operating point (best F1)": lambda: operating_point(fused["oof"], t.truth),
        "06 none rule chosen out of fold": lambda: choose_none_rule(t.images, fused["oof"]),
        "06 study stacker, features and out-of-fold fit": stacker,
        "07 test-image fusion (5 folds x 2 models x 2 views)": predict_fusion,
        "07 submission frame": write,
        "07 validation": validate,
        "07 competition metric": score,
    }


def _measure(fn: Callable[[], object]) -> tuple[float, float]:
    """Seconds and the process's peak resident memory (MiB) while ``fn`` ran (not traced: tracing slows Python)."""
    reset_peak_rss()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, peak_rss_mib()


def bench_scale(n_train: int = TRAIN_IMAGES, n_test: int = TEST_IMAGES, boxes: int = BOXES_PER_MODEL,
                print_table: bool = True) -> list[Step]:
    """Every step at a quarter and at the full size; prints the table (seconds, peak MiB, exponent)."""
    results: dict[str, Step] = {}
    for scale, factor in (("1/4", 4), ("1", 1)):
        tables = fabricate(max(n_train // factor, 20), max(n_test // factor, 5), boxes)
        for name, fn in _steps(tables).items():
            seconds, peak = _measure(fn)
            step = results.setdefault(name, Step(name, {}, 0.0))
            step.seconds[scale] = seconds
            step.peak_mib = peak
    steps = list(results.values())
    if print_table:
        print(f"{n_train} training and {n_test} test images, {boxes} boxes per image, model and fold; "
              f"{FOLDS} folds")
        print(f"{'step':<52} {'s (1/4)':>8} {'s (all)':>8} {'RSS MiB':>9} {'growth':>7}")
        for s in steps:
            flag = "  worse than n log n" if s.exponent > EXPONENT_LIMIT else ""
            print(f"{s.name:<52} {s.seconds['1/4']:>8.2f} {s.seconds['1']:>8.2f} {s.peak_mib:>9.0f} "
                  f"{s.exponent:>7.2f}{flag}")
    return steps
