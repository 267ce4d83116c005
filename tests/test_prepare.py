"""covidkit prepare on a small competition tree of real DICOMs (RG1, pydicom's files) and broken ones."""
from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import UID

from covidkit.cli import main
from covidkit.data.siim import STUDY_COLUMNS
from covidkit.prepare import META_COLUMNS, prepare, write_png_atomic

# image_id: (split, study_id, pydicom test file); PatientIDs: RG1 -> 9RG1, MR_small -> 4MR1,
# CT_small -> 1CT1, JPGLossless -> none (its study is its group).
GOOD = {
    "rg1_uncr": ("train", "st_rg1", "RG1_UNCR.dcm"),
    "rg1_j2kr": ("train", "st_rg1", "RG1_J2KR.dcm"),
    "rg1_j2ki": ("train", "st_rg1_lossy", "RG1_J2KI.dcm"),
    "mr_rle": ("train", "st_mr", "MR_small_RLE.dcm"),
    "mr_jpegls": ("train", "st_mr_ls", "MR_small_jpeg_ls_lossless.dcm"),
    "ct": ("train", "st_ct", "CT_small.dcm"),
    "us_jpegll": ("train", "st_us", "JPGLosslessP14SV1_1s_1f_8b.dcm"),
    "mr_plain": ("test", "st_test", "MR_small.dcm"),
    "emri_rle": ("test", "st_test", "emri_small_RLE.dcm"),
}
LABELS = {"st_rg1": 1, "st_rg1_lossy": 1, "st_mr": 0, "st_mr_ls": 0, "st_ct": 1, "st_us": 0, "st_bad": 2}
BAD = {  # image_id: start of the error
    "bad_truncated": "truncated pixel data",
    "bad_text": "not a DICOM file",
    "bad_nopixels": "no pixel data",
    "bad_mpeg2": "unsupported transfer syntax",
}


def sample(name: str) -> Path:
    return Path(get_testdata_file(name, download=False))


def dicom_path(root: Path, split: str, study: str, image_id: str) -> Path:
    path = root / split / study / f"{study}_series" / f"{image_id}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_bad_files(root: Path) -> None:
    rg1 = sample("RG1_UNCR.dcm").read_bytes()
    dicom_path(root, "train", "st_bad", "bad_truncated").write_bytes(rg1[: len(rg1) // 3])
    dicom_path(root, "train", "st_bad", "bad_text").write_text("not an image\n" * 50)
    ds = pydicom.dcmread(sample("RG1_UNCR.dcm"))
    del ds.PixelData
    ds.save_as(dicom_path(root, "train", "st_bad", "bad_nopixels"))
    ds = pydicom.dcmread(sample("MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")
    ds.PixelData = encapsulate([ds.PixelData])
    ds["PixelData"].VR = "OB"
    ds.save_as(dicom_path(root, "train", "st_bad", "bad_mpeg2"))


def write_study_labels(root: Path) -> None:
    onehot = np.eye(4, dtype=int)[list(LABELS.values())]
    df = pd.DataFrame(onehot, columns=STUDY_COLUMNS)
    df.insert(0, "id", [f"{s}_study" for s in LABELS])
    df.to_csv(root / "train_study_level.csv", index=False)


def build_competition(root: Path, images: dict[str, tuple[str, str, str]], bad: bool, labels: bool) -> Path:
    for image_id, (split, study, name) in images.items():
        shutil.copyfile(sample(name), dicom_path(root, split, study, image_id))
    if bad:
        write_bad_files(root)
    if labels:
        write_study_labels(root)
    return root


def run_quiet(*args, **kwargs):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = prepare(*args, progress=False, **kwargs)
    return summary, out.getvalue()


def read_png(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The full tree, prepared once with two worker processes."""
    root = build_competition(tmp_path_factory.mktemp("siim"), GOOD, bad=True, labels=True)
    out = tmp_path_factory.mktemp("prepared")
    summary, printed = run_quiet(root, out, size=256, workers=2, folds=2, seed=0)
    return root, out, summary, printed


def test_summary_counts_and_line(prepared):
    _, _, summary, printed = prepared
    assert (summary.ok, summary.failed, summary.skipped) == (len(GOOD), len(BAD), 0)
    assert printed.splitlines()[-1] == f"{len(GOOD)} ok, {len(BAD)} failed, 0 skipped (already done)"
    for image_id, reason in BAD.items():
        assert any(line.startswith(f"failed train/{image_id}: {reason}") for line in printed.splitlines())


def test_meta_csv_has_one_row_per_dicom(prepared):
    _, out, summary, _ = prepared
    meta = pd.read_csv(out / "meta.csv", dtype={"patient_id": str}).fillna({"patient_id": "", "error": ""})
    assert list(meta.columns) == META_COLUMNS
    assert sorted(meta["image_id"]) == sorted([*GOOD, *BAD])
    assert list(zip(meta["split"], meta["image_id"])) == sorted(zip(meta["split"], meta["image_id"]))
    rows = meta.set_index("image_id")
    for image_id, (split, study, name) in GOOD.items():
        ds = pydicom.dcmread(sample(name), stop_before_pixels=True)
        row = rows.loc[image_id]
        assert (row["split"], row["study_id"], row["status"], row["error"]) == (split, study, "ok", "")
        assert (row["orig_height"], row["orig_width"]) == (ds.Rows, ds.Columns)
        assert row["photometric"] == ds.PhotometricInterpretation
        assert row["transfer_syntax"] == ds.file_meta.TransferSyntaxUID
        assert str(row["patient_id"]) == str(ds.get("PatientID", ""))
    for image_id, reason in BAD.items():
        row = rows.loc[image_id]
        assert (row["split"], row["study_id"], row["status"]) == ("train", "st_bad", "failed")
        assert row["error"].startswith(reason)
    assert summary.meta["image_id"].tolist() == meta["image_id"].tolist()


def test_pngs_for_good_images_only_and_no_temporary_files(prepared):
    _, out, _, _ = prepared
    for image_id, (split, _, _) in GOOD.items():
        image = read_png(out / split / f"{image_id}.png")
        assert image.shape == (256, 256) and image.dtype == np.uint8
    for image_id in BAD:
        assert not (out / "train" / f"{image_id}.png").exists()
    assert sorted(p.name for p in out.rglob("*") if p.is_file() and p.suffix != ".png") == ["folds.csv", "meta.csv", "meta.json"]


def test_png_contents(prepared):
    _, out, _, _ = prepared
    png = {image_id: read_png(out / split / f"{image_id}.png") for image_id, (split, _, _) in GOOD.items()}
    np.testing.assert_array_equal(png["rg1_j2kr"], png["rg1_uncr"])
    assert np.abs(png["rg1_j2ki"].astype(int) - png["rg1_uncr"]).max() <= 3  # measured 2 at 256-512 px
    # the same MR slice through RLE, JPEG-LS and uncompressed; 64 px enlarged to 256
    np.testing.assert_array_equal(png["mr_rle"], png["mr_plain"])
    np.testing.assert_array_equal(png["mr_jpegls"], png["mr_plain"])
    chest = png["rg1_uncr"]
    lungs = max(chest[25:77, 51:102].mean(), chest[25:77, 154:205].mean())
    mediastinum = chest[77:179, 115:141].mean()
    assert lungs + 50 < mediastinum


def test_folds_group_patients(prepared):
    _, out, summary, _ = prepared
    folds = pd.read_csv(out / "folds.csv", keep_default_na=False)
    train_ok = [i for i, (split, _, _) in GOOD.items() if split == "train"]
    assert sorted(folds["image_id"]) == sorted(train_ok)
    assert set(folds["fold"]) == {0, 1}
    by_image = folds.set_index("image_id")["fold"]
    assert by_image["rg1_uncr"] == by_image["rg1_j2kr"] == by_image["rg1_j2ki"]  # patient 9RG1
    assert by_image["mr_rle"] == by_image["mr_jpegls"]  # patient 4MR1, two studies
    assert summary.folds is not None and len(summary.folds) == len(folds)


SMALL = {k: GOOD[k] for k in ("rg1_uncr", "mr_rle", "ct", "us_jpegll")}


def test_rerun_redoes_only_what_is_missing(tmp_path):
    root = build_competition(tmp_path / "siim", SMALL, bad=True, labels=False)
    out = tmp_path / "out"
    first, _ = run_quiet(root, out, size=128, workers=1)
    pngs = sorted((out / "train").glob("*.png"))
    assert len(pngs) == len(SMALL)
    mtimes = {p.name: p.stat().st_mtime_ns for p in pngs}
    (out / "train" / "ct.png").unlink()
    (out / "train" / ".mr_rle.x1y2.tmp").write_bytes(b"half a png")  # as a killed run leaves it

    second, printed = run_quiet(root, out, size=128, workers=2)
    assert (second.ok, second.skipped, second.failed) == (1, len(SMALL) - 1, len(BAD))
    assert printed.splitlines()[-1] == f"1 ok, {len(BAD)} failed, {len(SMALL) - 1} skipped (already done)"
    for p in sorted((out / "train").glob("*.png")):
        assert (p.stat().st_mtime_ns == mtimes[p.name]) == (p.name != "ct.png")
    assert not list(out.rglob("*.tmp"))
    pd.testing.assert_frame_equal(second.meta, first.meta)  # skipped rows come from the headers

    with pytest.raises(ValueError, match="prepared at 128 px, not 64"):  # another size: another folder
        run_quiet(root, out, size=64, workers=1)
    resized, _ = run_quiet(root, tmp_path / "out64", size=64, workers=1)
    assert (resized.ok, resized.skipped) == (len(SMALL), 0)
    assert read_png(tmp_path / "out64" / "train" / "ct.png").shape == (64, 64)


def test_splits_prepared_apart_share_one_meta(tmp_path):
    images = {"mr_plain": GOOD["mr_plain"], "mr_rle": GOOD["mr_rle"]}
    root = build_competition(tmp_path / "siim", images, bad=False, labels=False)
    run_quiet(root, tmp_path / "out", size=32, split="test", workers=1)
    summary, _ = run_quiet(root, tmp_path / "out", size=32, split="train", workers=1)
    assert summary.ok == 1
    meta = pd.read_csv(tmp_path / "out" / "meta.csv")
    assert list(zip(meta["split"], meta["image_id"])) == [("test", "mr_plain"), ("train", "mr_rle")]


def test_cli_strict_exit_code(tmp_path, capsys):
    root = build_competition(tmp_path / "siim", {"mr_rle": GOOD["mr_rle"]}, bad=True, labels=False)
    args = ["prepare", str(root), str(tmp_path / "out"), "--prepared-size", "32", "--workers", "1"]
    assert main(args) == 0
    assert main([*args, "--strict"]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == f"0 ok, {len(BAD)} failed, 1 skipped (already done)"
    clean = build_competition(tmp_path / "clean", {"mr_rle": GOOD["mr_rle"]}, bad=False, labels=False)
    assert main(["prepare", str(clean), str(tmp_path / "out2"), "--prepared-size", "32", "--strict"]) == 0


def test_empty_input_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no DICOM"):
        prepare(tmp_path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_png_write_failure_leaves_nothing(tmp_path, monkeypatch):
    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr("covidkit.prepare.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_png_atomic(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    assert list(tmp_path.iterdir()) == []
