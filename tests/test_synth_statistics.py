"""The synthetic labels have the statistics of the real ones (docs/data.md): hierarchy, boxes per
image, box sizes and positions, image aspect, RSNA boxes. Bands are wide enough for the sample
sizes here and narrow enough to fail on the earlier generator (tight boxes around single lesions,
square films, few repeat patients)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidkit.synth import SynthConfig, write_rsna, write_siim
from covidkit.synth.dicomio import sample_size
from covidkit.synth.lesions import boxes_of, draw_study_pattern
from covidkit.synth.phantom import render_anatomy
from covidkit.synth.plan import stream
from covidkit.synth.siim import CLASS_PROBS, plan_split
from covidkit.synth.stats import rsna_label_statistics, siim_label_statistics

SMALL = SynthConfig(seed=1, train_studies=90, test_studies=2, rsna_images=100, rsna_test_images=2,
                    max_size=512, min_size=256, rsna_size=256, workers=1, ct=False)


@pytest.fixture(scope="module")
def siim_stats(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("siim_stats")
    write_siim(out, SMALL)
    return siim_label_statistics(out)


@lru_cache
def big_plan() -> pd.DataFrame:
    """One row per planned image of 3,000 training studies (planning only, nothing rendered)."""
    studies = plan_split("train", 3000, stream(7, "siim"), set())
    return pd.DataFrame([{"study": s.study_id, "patient": s.patient_id, "cls": s.study_class, "boxed": im.boxed,
                          "n_images": len(s.images)} for s in studies for im in s.images])


def test_plan_classes_and_images_per_study():
    plan = big_plan()
    per_study = plan.groupby("study").first()
    shares = per_study["cls"].value_counts(normalize=True)
    for name, p in CLASS_PROBS.items():
        assert abs(shares[name] - p) < 0.01
    assert 0.94 <= (per_study["n_images"] == 1).mean() <= 0.98  # real 96.2 %
    assert (per_study["n_images"] >= 3).sum() >= 1


def test_plan_patients_have_several_studies():
    per_patient = big_plan().groupby("patient")["study"].nunique()
    assert 1.5 <= per_patient.mean() <= 2.3  # real 1.86
    assert 0.55 <= (per_patient == 1).mean() <= 0.72  # real 63 %
    assert (per_patient >= 5).mean() >= 0.03 and per_patient.max() >= 10  # real 6 %, max 25


def test_plan_boxes_exactly_one_image_of_a_multi_image_positive_study():
    plan = big_plan()
    assert not plan.loc[plan["cls"] == "negative", "boxed"].any()
    multi = plan[(plan["n_images"] > 1) & (plan["cls"] != "negative")].groupby("study")["boxed"].sum()
    assert len(multi) >= 50 and (multi == 1).mean() >= 0.9  # real 175 of 177
    unboxed = 1 - plan.loc[plan["cls"] != "negative", "boxed"].mean()
    assert 0.04 <= unboxed <= 0.1  # real 6.6 % (the rendered boxes can still fall off the film)


def test_image_aspect_is_landscape_like_the_real_films():
    rng = np.random.default_rng(0)
    rows, cols = np.array([sample_size(rng, 512, 2500) for _ in range(2000)]).T
    aspect = np.percentile(cols / rows, [5, 50, 95])
    assert 1.15 <= aspect[1] <= 1.25 and aspect[0] >= 0.95 and aspect[2] <= 1.3  # real 0.99, 1.21, 1.23


def test_siim_boxes_are_readers_boxes_one_per_lung(siim_stats):
    s = siim_stats
    assert s["negative_images_boxed"] == 0
    assert s["boxes_per_image"]["typical"]["2"] >= 0.7  # real 88 %
    assert s["boxes_per_image"]["indeterminate"]["1"] >= 0.4  # real 62 %
    assert s["two_boxes_one_per_side"] >= 0.9  # real 99 %
    assert 0.35 <= s["box_left_share"] <= 0.65
    assert s["boxless_positive_images"] <= 0.15  # real 6.6 %


def test_siim_box_sizes_match_the_real_ones(siim_stats):
    s = siim_stats
    assert 0.05 <= s["box_area"][2] <= 0.11  # real median 0.075
    assert 0.17 <= s["box_width"][2] <= 0.27  # real 0.215
    assert 0.28 <= s["box_height"][2] <= 0.45  # real 0.362
    assert s["box_height"][4] >= 0.45 and s["box_width"][0] <= 0.15  # real 95th 0.653, 5th 0.103
    assert 0.06 <= s["box_area_median"]["typical"] <= 0.11  # real 0.084
    assert 1.1 <= s["aspect"][2] <= 1.3  # real 1.21


def test_box_centres_sit_in_the_lower_half_of_the_lungs():
    """Box centre's height within the lung box (0 top, 1 bottom): real median 0.57 typical, 0.68 atypical."""
    medians = {}
    for study_class in ("typical", "atypical"):
        centres = []
        for seed in range(14):
            rng = np.random.default_rng(500 + seed)
            chest = render_anatomy(rng)
            ys, _ = np.nonzero(chest.lungs.any(0))
            for box in boxes_of(draw_study_pattern(chest, rng, study_class)):
                centres.append(((box[1] + box[3]) / 2 - ys.min()) / (ys.max() - ys.min()))
        medians[study_class] = np.median(centres)
    assert 0.48 <= medians["typical"] <= 0.66
    assert 0.52 <= medians["atypical"] <= 0.8


def test_rsna_boxes_match_the_real_ones(tmp_path):
    write_rsna(tmp_path, SMALL)
    s = rsna_label_statistics(Path(tmp_path))
    assert 0.17 <= s["positive_share"] <= 0.27  # real 22.5 %
    assert 0.3 <= s["boxes_per_positive_image"]["2"] <= 0.8  # real 54 %
    assert 0.035 <= s["box_area"][2] <= 0.1  # real median 0.062
    assert 0.15 <= s["box_width"][2] <= 0.28 and 0.2 <= s["box_height"][2] <= 0.4  # real 0.21, 0.29
