"""covidkit bench prepare runs end to end and reports its numbers (no timing is asserted)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import pytest
from pydicom.data import get_testdata_file

from covidkit.bench.prepare import bench_prepare, naive_convert
from covidkit.dicom import read_dicom
from covidkit.prepare import resize_square


def test_bench_on_the_real_radiographs(capsys, tmp_path):
    result = bench_prepare(images=4, size=64, workers=2, json_path=tmp_path / "prepare.json")
    sources = [Path(get_testdata_file(name, download=False)).stat().st_size for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm")]
    assert result.dicom_bytes == pytest.approx(sum(sources) / 2)
    assert 0 < result.png_bytes < 64 * 64  # an 8-bit 64 px PNG of a radiograph compresses
    assert result.dicom_pixels == 1955 * 1841  # RG1, both variants
    saved = json.loads((tmp_path / "prepare.json").read_text())
    assert saved["png_bytes"] == result.png_bytes and saved["prepare_core_s"] == pytest.approx(result.prepare_s * 2 / 4)
    assert (result.images, result.workers, result.size) == (4, 2, 64)
    assert min(result.naive_s, result.decode_s, result.prepare_s) > 0
    assert result.speedup == pytest.approx(result.naive_s / result.prepare_s)
    assert result.overhead == pytest.approx(result.prepare_s / result.decode_s)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("prepare benchmark: 4 DICOMs (copies of RG1_UNCR / RG1_J2KR) -> 64 px PNG")
    assert [line.split()[0] for line in lines[2:5]] == ["naive", "decode", "covidkit"]
    assert lines[5].startswith("per image: DICOM ")
    assert "target >= 1.7x" in lines[6] and "target <= 1.3x" in lines[7]


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


def _fake_costs(path: Path, seconds: float) -> None:
    from covidkit.bench.models import MODELS

    path.write_text(json.dumps([{"name": name, "params_mib": 100.0, "optimizer_mib": 100.0,
                                 "seconds": {"1": seconds, "2": 2 * seconds}, "activation_mib": {"1": 60.0, "2": 110.0}}
                                for name in MODELS]))


def test_bench_estimate_scales_with_the_measured_parts(tmp_path):
    """The estimate table: a row per full-profile stage, hours proportional to the measured step time and
    inverse to the GPU factor, GPU memory growing with the batch, the dry run's host memory beside."""
    from covidkit.bench.estimate import GPU_FACTOR, estimate, gpu_memory_mib, workloads
    from covidkit.bench.models import load_costs

    prepare = tmp_path / "prepare.json"
    prepare.write_text(json.dumps({"size": 1024, "dicom_bytes": 16 * 2**20, "dicom_pixels": 3000**2,
                                   "png_bytes": 2**20, "prepare_core_s": 2.0}))
    (tmp_path / "dry_run.json").write_text(json.dumps([{"stage": "01_pretrain_nih_resnext", "seconds": 30.0,
                                                        "peak_rss_mib": 4321.0}]))

    def hours(seconds: float, factor: float | None = None) -> dict[str, float]:
        _fake_costs(tmp_path / "models.json", seconds)
        table = estimate(tmp_path / "models.json", prepare, gpu_factor=factor, dry_run=tmp_path / "dry_run.json")
        rows = [line.split("|") for line in table.splitlines() if line.startswith("| ")]
        return {row[1].strip(): row for row in rows}

    one, two, fast = hours(100.0), hours(200.0), hours(100.0, factor=2 * GPU_FACTOR)
    for stage in ("00", "01", "02", "03", "04", "05", "06", "07", "10", "11"):
        assert stage in one
    for stage in ("01", "02", "03", "04", "06", "10", "11"):
        h1, h2, hf = (float(t[stage][4]) for t in (one, two, fast))
        assert h1 > 0 and h2 == pytest.approx(2 * h1, rel=0.05) and hf == pytest.approx(h1 / 2, rel=0.05)
    assert "4,321" in one["01"][8]
    cost = load_costs(tmp_path / "models.json")[0]
    assert gpu_memory_mib(cost, 8) - gpu_memory_mib(cost, 1) == pytest.approx(7 * 50.0)
    assert {w.stage: w.models for w in workloads()}["03"] == 5  # the full profile's folds
    disk = {row[1].strip(): float(row[2].replace(",", "")) for row in
            (line.split("|") for line in estimate(tmp_path / "models.json", prepare).splitlines())
            if len(row) == 4 and row[2].strip()[:1].isdigit()}
    assert disk["SIIM DICOMs (input)"] == pytest.approx((6334 + 1263) * 16 / 1024, rel=0.01)


def test_activation_memory_is_what_autograd_saves_beside_the_weights():
    import torch
    from torch import nn

    from covidkit.bench.models import saved_for_backward

    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))
    for batch in (1024, 2048):
        x = torch.randn(batch, 256)
        loss, mib = saved_for_backward(model, lambda: model(x).mean())
        # the input (saved by the first layer) and the ReLU's output (saved by the ReLU and the second layer);
        # the weights are parameters, not activations
        assert mib == pytest.approx(2 * batch * 256 * 4 / 2**20)
        loss.backward()


def test_bench_estimate_uses_gpu_measurements_as_they_are(tmp_path):
    """Costs measured on a GPU (``bench models --device cuda``): hours from their seconds at the profile's batch,
    no GPU factor; memory from the allocator's measured peak."""
    from covidkit.bench.estimate import CUDA_CONTEXT_MIB, estimate, gpu_memory_mib, workloads
    from covidkit.bench.models import MODELS, load_costs

    prepare = tmp_path / "prepare.json"
    prepare.write_text(json.dumps({"size": 1024, "dicom_bytes": 2**20, "dicom_pixels": 3000**2,
                                   "png_bytes": 2**20, "prepare_core_s": 2.0}))
    (tmp_path / "models.json").write_text(json.dumps([
        {"name": name, "params_mib": 100.0, "optimizer_mib": 100.0, "device": "cuda:0", "amp": "bfloat16",
         "seconds": {"1": 0.1, "2": 0.12, "8": 0.4}, "activation_mib": {"1": 60.0, "2": 110.0, "8": 410.0},
         "peak_mib": {"1": 500.0, "2": 600.0, "8": 1200.0}} for name in MODELS]))
    table = estimate(tmp_path / "models.json", prepare, gpu_factor=1000.0)
    assert "measured on cuda:0 (bfloat16)" in table and "stated" not in table
    cost = load_costs(tmp_path / "models.json")[0]
    assert gpu_memory_mib(cost, 8) == 1200.0 + CUDA_CONTEXT_MIB and gpu_memory_mib(cost, 4) == 800.0 + CUDA_CONTEXT_MIB
    rows = {row[1].strip(): row for row in (line.split("|") for line in table.splitlines() if line.startswith("| "))}
    work = {w.stage: w for w in workloads()}["11"]
    per_item = {1: 0.1, 2: 0.06, 8: 0.05}[max(b for b in (1, 2, 8) if b <= max(work.batch, 2))]
    items = work.train_items * work.epochs * work.models + work.infer_items / 3 * work.infer_scale
    assert float(rows["11"][4]) == pytest.approx(items * per_item / 3600, abs=0.006)


def test_bench_models_measures_a_full_size_model_on_the_cpu():
    """One real measurement (DeCoVNet, the cheapest full-size model): a step's seconds and saved activations; the
    allocator's peak is a GPU figure only."""
    from covidkit.bench.models import measure

    cost = measure("11 DeCoVNet, 64 x 224 x 336", batches=(1,))
    assert cost.seconds[1] > 0 and cost.activation_mib[1] > 100 and cost.params_mib > 0
    assert (cost.device, cost.amp, cost.peak_mib) == ("cpu", None, {})
