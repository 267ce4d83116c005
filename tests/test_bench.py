"""covidkit bench prepare runs end to end and reports its numbers (no timing is asserted)."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import pytest
from pydicom.data import get_testdata_file

from covidkit.bench.prepare import bench_prepare, naive_convert
from covidkit.dicom import read_dicom
from covidkit.prepare import resize_square


def test_bench_on_the_real_radiographs(capsys):
    result = bench_prepare(images=4, size=64, workers=2)
    assert (result.images, result.workers, result.size) == (4, 2, 64)
    assert min(result.naive_s, result.decode_s, result.prepare_s) > 0
    assert result.speedup == pytest.approx(result.naive_s / result.prepare_s)
    assert result.overhead == pytest.approx(result.prepare_s / result.decode_s)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("prepare benchmark: 4 DICOMs (copies of RG1_UNCR / RG1_J2KR) -> 64 px PNG")
    assert [line.split()[0] for line in lines[2:5]] == ["naive", "decode", "covidkit"]
    assert "target >= 1.7x" in lines[5] and "target <= 1.3x" in lines[6]


def test_bench_takes_the_first_images_of_a_competition(tmp_path, capsys):
    for i, name in enumerate(["MR_small.dcm", "CT_small.dcm", "MR_small_RLE.dcm"]):
        dst = tmp_path / "train" / f"study{i}" / "series" / f"image{i}.dcm"
        dst.parent.mkdir(parents=True)
        shutil.copyfile(get_testdata_file(name, download=False), dst)
    result = bench_prepare(images=2, size=32, workers=1, input_dir=tmp_path)
    assert result.images == 2
    assert f"from {tmp_path}" in capsys.readouterr().out


def test_naive_baseline_gives_the_same_picture_as_prepare(tmp_path):
    # Same recipe, so within a grey level (the baseline truncates, prepare rounds).
    path = Path(get_testdata_file("RG1_UNCR.dcm", download=False))
    naive_convert(path, tmp_path / "naive.png", 256)
    naive = cv2.imread(str(tmp_path / "naive.png"), cv2.IMREAD_UNCHANGED)
    ours = resize_square(read_dicom(path).pixels, 256)
    assert abs(naive.astype(int) - ours).max() <= 1


def test_bench_scale_runs_every_step_on_fabricated_tables(capsys):
    """``covidkit bench scale`` at a small size: every step runs on the fabricated tables (figures: README)."""
    from covidkit.cli import main

    assert main(["bench", "scale", "--train-images", "80", "--test-images", "8", "--boxes", "10"]) == 0
    out = capsys.readouterr().out
    for step in ("OOF opacity AP", "05 fusion", "06 none rule", "06 study stacker", "07 competition metric"):
        assert step in out
