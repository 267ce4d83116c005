"""Faults (issue 32): a killed run resumes, a full disk, a corrupted checkpoint, out of memory, no GPU, missing
data; each says what happened in one line and leaves the earlier outputs intact (docs/faults.md)."""
from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from covidkit.atomic import DiskFullError
from covidkit.engine import TrainConfig, fit
from covidkit.engine.checkpoint import LAST, PREVIOUS, load_checkpoint, resume_checkpoint
from covidkit.model_file import CorruptFileError, load_tagged, save_checkpoint

SRC = Path(__file__).resolve().parents[1] / "src"


# --------------------------------------------------------------------------- a tiny engine run


def tiny_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


def step(model, batch, device):
    x, y = (t.to(device) for t in batch)
    return nn.functional.cross_entropy(model(x), y), {}


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def train_cfg(run_dir: Path, epochs: int = 3) -> TrainConfig:
    return TrainConfig(run_dir=str(run_dir), epochs=epochs, batch_size=4, seed=1, progress=False, plots=False)


# --------------------------------------------------------------------------- disk full


def test_disk_full_while_checkpointing_names_the_path_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """A write that fails with ENOSPC halfway through epoch 2's last.pt: one line naming the file, the free space
    and what it needed; epoch 1's last.pt still loads, and the run resumes from it once there is space."""
    real_save, calls = torch.save, []

    def save_until_full(obj, f, *args, **kwargs):
        if ".last.tmp" in str(f):
            calls.append(f)
            if len(calls) == 2:  # epoch 2: half the bytes reach the disk, then it is full
                buffer = io.BytesIO()
                real_save(obj, buffer)
                Path(f).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    run = tmp_path / "run"
    with pytest.raises(DiskFullError) as caught:
        fit(tiny_model(), tiny_data(), step, sgd, train_cfg(run))
    message = str(caught.value)
    assert "\n" not in message and f"disk full writing {run / LAST}" in message
    assert " free on its file system" in message and "it needed about" in message
    assert load_checkpoint(run / LAST)["epoch"] == 1  # the previous checkpoint, intact
    assert not [p.name for p in run.glob(".*tmp*")]

    monkeypatch.setattr(torch, "save", real_save)  # space freed: the same call resumes at epoch 1
    result = fit(tiny_model(), tiny_data(), step, sgd, train_cfg(run), resume=True)
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert load_checkpoint(run / LAST)["epoch"] == 3 and load_checkpoint(run / PREVIOUS)["epoch"] == 2


def test_disk_full_while_writing_the_submission_keeps_the_previous_one(tmp_path, monkeypatch):
    from covidkit.submission import write_submission

    path = tmp_path / "submission.csv"
    probs = {"negative": 0.7, "typical": 0.1, "indeterminate": 0.1, "atypical": 0.1}
    write_submission(path, {}, {"s1": probs})
    before = path.read_bytes()

    def full(self, target, *args, **kwargs):
        Path(target).write_text("id,Predict")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    with pytest.raises(DiskFullError, match=rf"disk full writing {path}: .* free on its file system"):
        write_submission(path, {}, {"s1": {**probs, "negative": 0.1, "typical": 0.7}})
    assert path.read_bytes() == before and not list(tmp_path.glob(".*tmp*"))


def test_disk_full_while_preparing_stops_with_the_png_path(tmp_path, monkeypatch):
    """Not a 'failed' row per image (a bad DICOM is one): the run stops, naming the file and the free space."""
    import numpy as np

    from covidkit import prepare

    def full(fd, mode="r", *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prepare.os, "fdopen", full)
    with pytest.raises(DiskFullError, match=rf"disk full writing {tmp_path / 'a.png'}: .* it needed about"):
        prepare.write_png_atomic(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- corrupted files


def test_a_corrupted_last_checkpoint_falls_back_to_the_previous_one(tmp_path, capfd):
    run = tmp_path / "run"
    fit(tiny_model(), tiny_data(), step, sgd, train_cfg(run, epochs=2))
    data = bytearray((run / LAST).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the zip may still read, the hash does not match
    (run / LAST).write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=rf"checkpoint {run / LAST} is corrupted or truncated"):
        load_checkpoint(run / LAST)

    result = fit(tiny_model(), tiny_data(), step, sgd, train_cfg(run, epochs=2), resume=True)
    err = capfd.readouterr().err
    assert f"{run / LAST} is corrupted" in err and f"resuming from {run / PREVIOUS} (epoch 1)" in err
    assert [row["epoch"] for row in result.history] == [1, 2]  # epoch 2 trained again, epoch 1 kept
    assert load_checkpoint(run / LAST)["epoch"] == 2

    (run / LAST).write_bytes((run / LAST).read_bytes()[:1000])  # truncated, and the previous one too
    (run / PREVIOUS).write_bytes(b"")
    with pytest.raises(CorruptFileError, match=rf"cannot resume {run}: .*truncated.* delete {run}"):
        fit(tiny_model(), tiny_data(), step, sgd, train_cfg(run, epochs=2), resume=True)
    with pytest.raises(CorruptFileError, match="cannot resume"):
        resume_checkpoint(run)


def test_a_truncated_fold_model_is_named_never_loaded(tmp_path):
    path = tmp_path / "split0" / "detector.pt"
    save_checkpoint({"format": "covidkit.detector/1", "model": tiny_model().state_dict()}, path)
    assert load_tagged(path, "covidkit.detector/1", "Faster R-CNN detector", "03")["format"] == "covidkit.detector/1"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(CorruptFileError, match=rf"Faster R-CNN detector {path} is corrupted or truncated"):
        load_tagged(path, "covidkit.detector/1", "Faster R-CNN detector", "03")
    path.with_name("detector.pt.sha256").unlink()  # no hash to check: the broken zip is still caught
    with pytest.raises(CorruptFileError, match=rf"{path} is corrupted or truncated \("):
        load_tagged(path, "covidkit.detector/1", "Faster R-CNN detector", "03")


def test_a_corrupted_models_folder_is_named(models_dir, tmp_path):
    import shutil

    from covidkit.export import MANIFEST, read_manifest

    broken = tmp_path / "models"
    shutil.copytree(models_dir, broken)
    fold = broken / "fasterrcnn" / "fold0.pt"
    fold.write_bytes(fold.read_bytes()[:-10])
    with pytest.raises(ValueError, match=rf"{fold} does not match its SHA-256"):
        read_manifest(broken)
    (broken / MANIFEST).write_text('{"format": "covidk')
    with pytest.raises(ValueError, match=rf"{broken / MANIFEST} is truncated or corrupted"):
        read_manifest(broken)


# --------------------------------------------------------------------------- out of memory, workers


def test_out_of_memory_names_stage_model_sizes_and_the_set_that_lowers_them(tiny_input, tmp_path, monkeypatch,
                                                                            capsys):
    """`covidkit run 01` whose training step runs out of GPU memory (patched: the CPU has no such limit)."""
    from covidkit import cli
    from covidkit.stages import nih_pretrain

    def oom_step(model, batch, device):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(nih_pretrain, "bce_step", oom_step)
    rc = cli.main(["run", "01", "--input", str(tiny_input), "--run-dir", str(tmp_path / "run"),
                   "--set", "dry_run=true", "--set", "progress=false"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("covidkit run: error:")]
    assert rc == 1 and len(err) == 1
    assert err[0] == ("covidkit run: error: 01_pretrain_nih_resnext ran out of GPU memory (model resnet18, batch_size "
                      "16, input_size 96): lower them: covidkit pipeline --set 01.batch_size=8 --set "
                      "01.input_size=48 (with your --profile)")


def test_a_killed_data_loader_worker_names_the_workers_setting():
    from covidkit.faults import explain

    line = explain("03_train_siim_fasterrcnn", {"workers": 4, "batch_size": 8},
                   "RuntimeError", "DataLoader worker (pid(s) 4242) exited unexpectedly")
    assert line is None  # not a kill: the error as it is
    line = explain("03_train_siim_fasterrcnn", {"workers": 4, "batch_size": 8},
                   "RuntimeError", "DataLoader worker (pid 4242) is killed by signal: Killed. ")
    assert "workers setting (now 4)" in line and "--set 03.workers=0" in line and "\n" not in line


def test_the_runner_explains_a_notebook_fault_and_marks_the_stage(tiny_input, tmp_path, monkeypatch):
    """Through papermill: out of memory in a kernel is one line (the stage's settings from the profile), the
    record says failed; a KeyboardInterrupt marks the stage interrupted and says how to continue."""
    import nbformat

    from covidkit.pipeline import PipelineError, PipelineInterrupted, run_pipeline
    from covidkit.records import read_record

    books = tmp_path / "notebooks"
    (books / "profiles").mkdir(parents=True)
    (books / "profiles" / "smoke.yaml").write_text("common: {}\n06_study_level: {encoder: plain, batch_size: 8, input_size: 512}\n")
    for name, code in (("06_study_level", "import torch\nraise torch.cuda.OutOfMemoryError('CUDA out of memory')"),
                       ("10_ct_cogseg", "raise KeyboardInterrupt")):
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell("run_dir = 'x'\nbatch_size = 1\ninput_size = 1\nencoder = 'plain'",
                                              metadata={"tags": ["parameters"]}),
                    nbformat.v4.new_code_cell(code)]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, books / f"{name}.ipynb")
    monkeypatch.setenv("COVIDKIT_NOTEBOOKS", str(books))
    run = tmp_path / "run"
    with pytest.raises(PipelineError, match=r"^06_study_level ran out of GPU memory \(model plain, batch_size 8, "
                                            r"input_size 512\): lower them: covidkit pipeline --set 06.batch_size=4 "
                                            r"--set 06.input_size=256"):
        run_pipeline("smoke", input_dir=tiny_input, run_dir=run, only=["06"])
    assert read_record(run, "06_study_level")["status"] == "failed"
    with pytest.raises(PipelineInterrupted, match="interrupted during 10_ct_cogseg: it is marked incomplete.*"
                                                  "Run the same command again"):
        run_pipeline("smoke", input_dir=tiny_input, run_dir=run, only=["10"])
    assert read_record(run, "10_ct_cogseg")["status"] == "interrupted"


# --------------------------------------------------------------------------- no GPU, missing data


def test_cuda_without_a_gpu_falls_back_to_the_cpu_with_one_line(monkeypatch, capfd, models_dir):
    from covidkit.engine.device import torch_device
    from covidkit.kaggle import submission_notebook
    from covidkit.models.yolo import resolve_device
    from covidkit.predict import Predictor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert torch_device("auto") == torch.device("cpu") and torch_device(None) == torch.device("cpu")
    assert torch_device("cuda", "07.device") == torch.device("cpu")
    assert capfd.readouterr().err == ("covidkit: warning: 07.device is 'cuda' but no CUDA device is visible: running "
                                      "on the CPU (set 07.device to cpu or auto to silence this)\n")
    assert resolve_device("0") == "cpu" and "no CUDA device" in capfd.readouterr().err
    predictor = Predictor.load(models_dir, device="cuda")
    assert predictor.device == torch.device("cpu")
    parameters = submission_notebook("bundle", hflip_tta=True).cells[1].source
    assert 'device = "auto"' in parameters


def test_missing_or_half_copied_data_is_named_with_the_expected_layout(tiny_input, tmp_path):
    import shutil

    from covidkit.faults import InputError, check_input
    from covidkit.pipeline import run_pipeline

    with pytest.raises(InputError, match=rf"00_prepare_data needs {tmp_path / 'siim-covid19-detection'}/, which "
                                         r"does not exist; the layout expected is in input/README.md"):
        run_pipeline("smoke", input_dir=tmp_path, run_dir=tmp_path / "run", only=["00"])

    copy = tmp_path / "input"
    shutil.copytree(tiny_input / "siim-covid19-detection", copy / "siim-covid19-detection")
    check_input("00_prepare_data", copy)
    study = sorted((copy / "siim-covid19-detection" / "train").iterdir())[0]
    shutil.rmtree(study)
    with pytest.raises(InputError, match=rf"train lacks 1 of the \d+ study folders train_study_level.csv lists "
                                         rf"\(e.g. {study.name}\): half-copied\?; the layout expected is in input/README"):
        check_input("00_prepare_data", copy)
    (copy / "siim-covid19-detection" / "sample_submission.csv").unlink()
    with pytest.raises(InputError, match="lacks sample_submission.csv"):
        check_input("07_make_submission", copy)


# --------------------------------------------------------------------------- killed and started again


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the runner and everything it started (the notebook kernel runs in its own session)."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        tree = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


@pytest.mark.slow
def test_a_run_killed_in_a_training_stage_resumes_it_and_skips_the_finished_ones(tiny_input, tmp_path):
    """`covidkit pipeline --dry-run` through 00-07 (not 02: 04 starts from the untrained nano; no baselines of 04, no fresh test sets, no flipped images),
    SIGKILLed right after 03's first checkpoint (03 trains two epochs per split: batch 4 of the dry run's 4
    images, 2 steps), then started again: 00 and 01 are skipped, 03 resumes its split at epoch 1 (the epoch-1 row
    is the checkpoint's, not retrained), the submission is valid; a third start skips every stage."""
    from covidkit.submission import validate_files

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "covidkit.cli", "pipeline", "--input", str(tiny_input), "--run-dir", str(run),
           "--dry-run", "--only", "00", "01", "03", "04", "05", "06", "07", "--set", "03.batch_size=4",
           "--set", "04.model=yolo11n.yaml", "--set", "04.baseline_model=null", "--set", "07.fresh_test_seeds=[]",
           "--set", "hflip_tta=false", "--set", "progress=false"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        stage = run / "03_train_siim_fasterrcnn"
        deadline = time.monotonic() + 600
        try:
            while not list(stage.glob("*/last.pt")):
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint of 03 in time"
                time.sleep(0.02)
        finally:
            _kill_tree(proc)
    split = list(stage.glob("*/last.pt"))[0].parent
    killed_at = load_checkpoint(split / LAST)
    assert killed_at["epoch"] == 1, "the kill came after epoch 2: nothing left to resume"
    config_written = (split / "config.json").stat().st_mtime_ns

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    lines = again.stdout.splitlines() + again.stderr.splitlines()
    for done in ("00_prepare_data", "01_pretrain_nih_resnext"):
        assert any(line.startswith(f"{done}: skipped, complete") for line in lines), done
    assert any(line.startswith("03_train_siim_fasterrcnn: runs: running before: resuming it") for line in lines)
    resumed = load_checkpoint(split / LAST)
    assert resumed["epoch"] == 2
    assert resumed["history"][0] == killed_at["history"][0]  # epoch 1 as the killed run left it (its time too)
    assert (split / "config.json").stat().st_mtime_ns == config_written  # written by a fresh start only
    sample = tiny_input / "siim-covid19-detection" / "sample_submission.csv"
    assert validate_files(run / "submission.csv", sample) == []

    third = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    skipped = [line for line in third.stdout.splitlines() + third.stderr.splitlines() if ": skipped, complete" in line]
    assert len(skipped) == 7, third.stdout[-3000:]
    record = json.loads((run / "dry_run.json").read_text())
    assert len(record) == 7 and all(r["skipped"] and r["seconds"] > 0 for r in record)  # the timings of the runs
