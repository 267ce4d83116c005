"""Deduplication of external radiographs against the competition's: the planted near-duplicates of a synthetic
set are found with their sources, and no distinct radiograph of the same generator is taken for a copy."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from covidkit.data.external import prepare_external
from covidkit.data.siim import COMPETITION
from covidkit.dedup import (
    MATCH_COLUMNS,
    DedupConfig,
    competition_images,
    decide,
    find_duplicates,
    kept_images,
    match,
    pixel_check,
    precision_recall,
    save_pairs,
    signature,
    signatures,
)
from covidkit.prepare import prepare
from covidkit.synth import SynthConfig, write_external, write_siim
from covidkit.synth.external import duplicates_csv, external_folder

# 30 copies among 60 external images, matched against ~60 competition images: every pair of distinct
# radiographs of one generator is a chance of a false match (60 x 8 candidates checked pixel by pixel).
CFG = SynthConfig(seed=11, train_studies=40, test_studies=16, max_size=320, min_size=256, workers=2, ct=False,
                  external_images=60, external_duplicates=0.5)
PREPARED_SIZE = 256


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The input folder, the prepared competition folder and the prepared external folder."""
    out = tmp_path_factory.mktemp("input")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        write_siim(out, CFG)
        write_external(out, CFG)
        prepared = out / "prepared"
        prepare(out / COMPETITION, prepared, size=PREPARED_SIZE, workers=1, folds=2, progress=False)
        external = prepared / "external" / "synthetic"
        prepare_external(external_folder(out), external, size=PREPARED_SIZE, workers=1, progress=False)
    return out, prepared, external


@pytest.fixture(scope="module")
def matches(folders) -> pd.DataFrame:
    _, prepared, external = folders
    return find_duplicates(prepared, external, DedupConfig())


@pytest.mark.xfail(strict=True, reason="issue 33: one copy of 30 (crop, resize, strong window, JPEG 73 of a "
                   "~250 px image) keeps too little detail for the fine check (NCC 0.33, threshold 0.78); "
                   "the mark comes off the day the check finds it")
def test_finds_every_planted_copy_and_nothing_else(folders, matches):
    out, _, _ = folders
    truth = pd.read_csv(duplicates_csv(out), dtype=str)
    assert set(truth["siim_split"]) == {"train", "test"}
    scores = precision_recall(matches, truth)
    assert scores["planted"] == 30
    assert (scores["precision"], scores["recall"]) == (1.0, 1.0), matches.merge(
        truth, left_on="external_path", right_on="path", how="outer").to_string()
    # the margin: copies well above the threshold, distinct images well below
    copies = matches["external_path"].isin(truth["path"])
    assert matches.loc[copies, "ncc"].min() > matches.loc[~copies, "ncc"].max() + 0.02


def test_match_table_and_actions(matches, folders):
    out, _, _ = folders
    truth = pd.read_csv(duplicates_csv(out), dtype=str).set_index("path")
    assert list(matches.columns) == MATCH_COLUMNS
    for row in matches[matches["duplicate"]].itertuples():
        assert row.action == "drop"  # default: a copy of a train image is dropped too
        assert row.flipped == ("flip" in truth.loc[row.external_path, "transforms"])
    assert (matches.loc[~matches["duplicate"], "action"] == "keep").all()
    mapped = decide(matches, DedupConfig(train_duplicates="map"))
    dup = mapped["duplicate"]
    assert (mapped.loc[dup & (mapped["siim_split"] == "test"), "action"] == "drop").all()
    train = dup & (mapped["siim_split"] == "train")
    assert (mapped.loc[train, "action"] == "map").all()
    assert (mapped.loc[train, "mapped_to"] == mapped.loc[train, "siim_image_id"]).all()
    kept = kept_images(mapped)
    assert len(kept) == (~dup).sum() + train.sum()
    assert not kept["siim_split"][kept["duplicate"]].eq("test").any()


def test_no_test_image_is_taken_for_a_copy_of_a_training_image(folders):
    """The competition's own splits hold distinct patients: matched against each other, nothing is a copy."""
    _, prepared, _ = folders
    images = competition_images(prepared)
    test, train = images[images["split"] == "test"], images[images["split"] == "train"]
    cfg = DedupConfig()
    found = match(signatures(test, cfg), signatures(train, cfg, reference=True), cfg)
    assert len(found) == len(test)
    assert found["ncc"].max() < cfg.threshold


def test_pixel_check_undoes_crop_flip_and_contrast():
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.random((300, 360), np.float32), (0, 0), 10)
    image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    copy = image[20:290, 30:340][:, ::-1]  # 10 % of the height, 14 % of the width cropped, mirrored
    copy = (255 * (copy / 255.0) ** 1.6).astype(np.uint8)
    cfg = DedupConfig()
    found = pixel_check(signature(copy, cfg), signature(image, cfg, reference=True), cfg)
    assert found.ncc > 0.95 and found.flipped
    crop_x, crop_y = found.crops(signature(copy, cfg).image.shape, signature(image, cfg).image.shape)
    assert abs(crop_x - 50 / 360) <= 0.01 and abs(crop_y - 30 / 300) <= 0.01
    other = cv2.normalize(cv2.GaussianBlur(rng.random((300, 360), np.float32), (0, 0), 10), None, 0, 255,
                          cv2.NORM_MINMAX).astype(np.uint8)
    assert pixel_check(signature(other, cfg), signature(image, cfg, reference=True), cfg).ncc < 0.5


def test_save_pairs_writes_a_figure(folders, matches, tmp_path):
    _, prepared, external = folders
    path = save_pairs(matches, prepared, external, tmp_path / "pairs.png", n=4)
    figure = cv2.imread(str(path))
    assert figure is not None and figure.shape[0] > figure.shape[1]  # four rows of two images
