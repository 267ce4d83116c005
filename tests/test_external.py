"""External unlabelled radiographs: listing a nested folder of DICOM and PNG files, reading them as the
competition DICOMs are read, preparing them like stage 00, and the synthetic set with its planted copies."""
from __future__ import annotations

import contextlib
import io
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from covidkit.data.external import list_external, prepare_external, read_external, read_external_meta
from covidkit.data.siim import COMPETITION, dicom_paths
from covidkit.dicom import read_dicom
from covidkit.synth import SynthConfig, write_external, write_siim
from covidkit.synth.external import DUPLICATE_COLUMNS, duplicates_csv, external_folder, labels_csv


@pytest.fixture()
def mixed_folder(tmp_path, real_radiograph) -> Path:
    """A BIMCV-like nested folder, a VinBigData-like ``.dicom``, a DICOM without suffix, and non-images."""
    root = tmp_path / "mixed"
    rx = root / "sub-S01" / "ses-E01" / "mod-rx"
    rx.mkdir(parents=True)
    ramp = np.tile(np.linspace(1000, 40000, 300), (200, 1)).astype(np.uint16)
    cv2.imwrite(str(rx / "sub-S01_ses-E01_run-1_bp-chest_vp-ap_cr.png"), ramp)  # 16-bit, as BIMCV's
    (rx / "sub-S01_ses-E01_run-1_bp-chest_vp-ap_cr.json").write_text("{}")
    colour = np.zeros((50, 60, 3), np.uint8)
    colour[:, 30:] = (0, 0, 200)
    cv2.imwrite(str(root / "sub-S01" / "colour.png"), colour)
    cv2.imwrite(str(root / "sub-S01" / "photo.jpg"), np.full((40, 40), 90, np.uint8))
    (root / "train").mkdir()
    shutil.copyfile(real_radiograph, root / "train" / "000434271f63a053.dicom")
    shutil.copyfile(real_radiograph, root / "train" / "IM0001")  # a DICOM without suffix
    (root / "train" / "README").write_text("not an image, no suffix\n")
    (root / "labels.csv").write_text("a,b\n1,2\n")
    (root / ".hidden.png").write_bytes(b"")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def test_list_external_finds_images_only_with_unique_ids(mixed_folder):
    table = list_external(mixed_folder)
    assert table.to_dict("list") == {
        "image_id": ["broken", "sub-S01__colour", "sub-S01__photo",
                     "sub-S01__ses-E01__mod-rx__sub-S01_ses-E01_run-1_bp-chest_vp-ap_cr",
                     "train__000434271f63a053", "train__IM0001"],
        "path": ["broken.png", "sub-S01/colour.png", "sub-S01/photo.jpg",
                 "sub-S01/ses-E01/mod-rx/sub-S01_ses-E01_run-1_bp-chest_vp-ap_cr.png",
                 "train/000434271f63a053.dicom", "train/IM0001"],
        "format": ["png", "png", "jpeg", "png", "dicom", "dicom"],
    }


def test_ids_stay_unique_when_only_the_suffix_differs(tmp_path):
    for name in ("a.png", "a.jpg"):
        cv2.imwrite(str(tmp_path / name), np.zeros((8, 8), np.uint8))
    assert list_external(tmp_path)["image_id"].tolist() == ["a.jpg", "a.png"]


def test_read_external_converts_like_the_competition_images(mixed_folder, real_radiograph):
    dicom = read_external(mixed_folder / "train" / "IM0001")
    np.testing.assert_array_equal(dicom, read_dicom(real_radiograph).pixels)
    ramp = read_external(mixed_folder / "sub-S01/ses-E01/mod-rx/sub-S01_ses-E01_run-1_bp-chest_vp-ap_cr.png")
    assert ramp.dtype == np.uint8 and (ramp.min(), ramp.max()) == (0, 255)  # 16 bits min-max stretched
    assert np.all(np.diff(ramp[0].astype(int)) >= 0)
    colour = read_external(mixed_folder / "sub-S01" / "colour.png")
    assert colour.shape == (50, 60) and colour[0, 0] == 0 and colour[0, -1] == 255


def test_prepare_external_writes_square_pngs_and_records_failures(mixed_folder, tmp_path):
    out = tmp_path / "prepared"
    with contextlib.redirect_stdout(io.StringIO()):
        meta = prepare_external(mixed_folder, out, size=64, workers=1, progress=False)
    rows = meta.set_index("image_id")
    assert rows.loc["broken", "status"] == "failed" and "cannot read" in rows.loc["broken", "error"]
    ok = read_external_meta(out)
    assert len(ok) == len(meta) - 1
    for row in ok.itertuples():
        assert cv2.imread(row.png, cv2.IMREAD_UNCHANGED).shape == (64, 64)
    assert tuple(rows.loc["train__IM0001", ["orig_height", "orig_width"]]) == read_dicom(
        mixed_folder / "train" / "IM0001").pixels.shape
    assert not (out / "broken.png").exists()


SMALL = SynthConfig(seed=3, train_studies=8, test_studies=4, max_size=320, min_size=256, workers=1, ct=False,
                    external_images=14, external_duplicates=0.5)


@pytest.fixture(scope="module")
def small_external(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("input")
    write_siim(out, SMALL)
    write_external(out, SMALL)
    return out


def test_synthetic_external_folder_and_its_ground_truth(small_external):
    out = small_external
    table = list_external(external_folder(out))
    assert len(table) == SMALL.external_images
    assert set(table["format"]) == {"dicom", "png"}
    assert duplicates_csv(out).parent == external_folder(out).parent  # beside the folder, not in it
    truth = pd.read_csv(duplicates_csv(out), dtype=str)
    assert list(truth.columns) == DUPLICATE_COLUMNS and len(truth) == 7
    assert set(truth["path"]) < set(table["path"])
    siim = {s: dicom_paths(out / COMPETITION, s) for s in ("train", "test")}
    for row in truth.itertuples():
        assert row.siim_image_id in siim[row.siim_split]
        assert siim[row.siim_split][row.siim_image_id].parent.parent.name == row.siim_study_id
    labels = pd.read_csv(labels_csv(out), dtype=str)
    assert sorted(labels["path"]) == sorted(set(table["path"]) - set(truth["path"]))


def undo_geometry(source: np.ndarray, transforms: str, shape: tuple[int, int]) -> np.ndarray:
    """The source cropped, mirrored and resized as the ground truth says its copy was."""
    crop = re.search(r"crop\(([\d.]+),([\d.]+),([\d.]+),([\d.]+)\)", transforms)
    if crop:
        left, top, right, bottom = map(float, crop.groups())
        h, w = source.shape
        source = source[int(top * h): h - int(bottom * h), int(left * w): w - int(right * w)]
    if "flip" in transforms:
        source = source[:, ::-1]
    return cv2.resize(np.ascontiguousarray(source), shape[::-1], interpolation=cv2.INTER_AREA)


def test_each_copy_is_its_source_transformed_as_recorded(small_external):
    """Undo the recorded crop, flip and resize: the copy's pixels rank as its source's (window, gamma and
    JPEG keep the order), and not as another SIIM image's."""
    out = small_external
    truth = pd.read_csv(duplicates_csv(out), dtype=str)
    assert all(t.split()[-1] in ("dicom", "png8", "png16") for t in truth["transforms"])
    siim = {**dicom_paths(out / COMPETITION, "train"), **dicom_paths(out / COMPETITION, "test")}
    for row in truth.itertuples():
        copy = read_external(external_folder(out) / row.path)
        source = undo_geometry(read_dicom(siim[row.siim_image_id]).pixels, row.transforms, copy.shape)
        assert spearmanr(copy.ravel(), source.ravel())[0] > 0.95, row
        other = next(i for i in siim if i != row.siim_image_id)
        unrelated = cv2.resize(read_dicom(siim[other]).pixels, copy.shape[::-1])
        assert spearmanr(copy.ravel(), unrelated.ravel())[0] < 0.9


def test_no_external_images_by_default(tmp_path):
    assert SynthConfig().external_images == 0
    assert write_external(tmp_path, SynthConfig(ct=False)) == ""
    assert not (tmp_path / "external").exists()
