"""Fresh test sets: new synthetic test splits, predicted and scored with one models folder.

The test split of the synthetic data the pipeline trained on is the one development looked at. A fresh
test set is the SIIM test split of another seed, written alone (``covidkit synth --test-only``): models
trained on the training split of one seed have never seen it, and nobody tuned anything on it. Several
of them give the mean and the spread of the competition score, next to the score of a submission of
the training priors (no box, the class frequencies), the baseline every model must beat.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from covidkit.data.siim import COMPETITION, SOLUTION, SOLUTION_IMAGE_CSV, SOLUTION_STUDY_CSV, STUDY_CLASSES
from covidkit.metrics import ALL_CLASSES, score_files

SCORES_CSV = "scores.csv"  # one row per seed, then "mean" and "std"


@dataclass
class FreshTestSets:
    """The scores of every fresh test set (``per_seed``: one row per seed) and their summary."""

    per_seed: pd.DataFrame  # seed, images, studies, mAP, the six class APs, study_mAP, image_mAP, prior_mAP
    path: Path

    @property
    def mean(self) -> float:
        return float(self.per_seed["mAP"].mean())

    @property
    def std(self) -> float:
        return float(self.per_seed["mAP"].std(ddof=1)) if len(self.per_seed) > 1 else 0.0

    def summary(self) -> str:
        scores = ", ".join(f"{s:.3f}" for s in self.per_seed["mAP"])
        return (f"fresh test sets (seeds {', '.join(str(s) for s in self.per_seed['seed'])}): test score "
                f"{self.mean:.3f} +- {self.std:.3f} (each: {scores}); a submission of the priors: "
                f"{self.per_seed['prior_mAP'].mean():.3f}")


def write_fresh_test_set(out: Path, seed: int, test_studies: int) -> Path:
    """``covidkit synth --test-only``: the test split of ``seed`` in ``out`` (kept when already there)."""
    from covidkit.synth import SynthConfig, write_all

    competition = out / COMPETITION
    if not (out / SOLUTION / SOLUTION_STUDY_CSV).is_file():
        write_all(out, SynthConfig(seed=seed, test_studies=test_studies, test_only=True))
    return competition


def prior_submission(competition: Path, priors: dict, out_csv: Path) -> Path:
    """A submission without any image evidence: no box, ``none`` and the study classes at the training priors."""
    from covidkit.boxes import EMPTY
    from covidkit.predict import sample_ids
    from covidkit.submission import ImagePrediction, write_submission

    sample = pd.read_csv(competition / "sample_submission.csv", dtype=str)
    image_ids, study_ids = sample_ids(sample)
    images = {i: ImagePrediction(EMPTY.copy(), np.zeros(0), priors["none"]) for i in image_ids}
    studies = {s: [priors["study"][c] for c in STUDY_CLASSES] for s in study_ids}
    return write_submission(out_csv, images, studies, order=sample["id"])


def score_fresh_test_sets(models_dir: str | Path, out_dir: str | Path, seeds: list[int], test_studies: int = 80,
                          device: str = "cpu", hflip_tta: bool = False, workers: int | None = None,
                          progress: bool = True) -> FreshTestSets:
    """Write (or reuse) the test split of each seed under ``out_dir/seed<S>/``, predict it with
    ``models_dir`` as ``covidkit predict`` does, score it, and write ``out_dir/scores.csv``."""
    from covidkit.export import read_manifest
    from covidkit.predict import predict_competition

    out_dir = Path(out_dir)
    priors = read_manifest(models_dir, verify=False)["priors"]
    rows = []
    for seed in seeds:
        folder = out_dir / f"seed{seed}"
        competition = write_fresh_test_set(folder, seed, test_studies)
        labels = folder / SOLUTION
        prediction = predict_competition(competition, models_dir, folder / "submission.csv", device=device,
                                         hflip_tta=hflip_tta, workers=workers, progress=progress)
        scores = score_files(labels / SOLUTION_IMAGE_CSV, labels / SOLUTION_STUDY_CSV, prediction.submission)
        prior = score_files(labels / SOLUTION_IMAGE_CSV, labels / SOLUTION_STUDY_CSV,
                            prior_submission(competition, priors, folder / "prior_submission.csv"))
        rows.append({"seed": seed, "images": prediction.images, "studies": prediction.studies,
                     "mAP": scores["mAP"], **{c: scores[c] for c in ALL_CLASSES},
                     "study_mAP": scores["study_mAP"], "image_mAP": scores["image_mAP"], "prior_mAP": prior["mAP"]})
    per_seed = pd.DataFrame(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SCORES_CSV
    per_seed.to_csv(path, index=False)
    return FreshTestSets(per_seed, path)


def read_fresh_test_sets(out_dir: str | Path) -> FreshTestSets | None:
    """The scores ``score_fresh_test_sets`` wrote in ``out_dir``, or None."""
    path = Path(out_dir) / SCORES_CSV
    return FreshTestSets(pd.read_csv(path), path) if path.is_file() else None
