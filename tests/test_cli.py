"""The console script: installed, answers --help without heavy imports, works with networking off."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from covidkit.pipeline import notebooks_dir

COMMANDS = ["synth", "prepare", "score", "validate", "predict", "pipeline", "run", "serve", "bench", "kaggle"]


def covidkit() -> str:
    exe = Path(sys.executable).with_name("covidkit")
    assert exe.exists(), "the covidkit console script is not installed in this environment"
    return str(exe)


def test_help_lists_every_command():
    out = subprocess.run([covidkit(), "--help"], capture_output=True, text=True, check=True).stdout
    for command in COMMANDS:
        assert command in out


def test_help_does_not_import_torch_or_pydicom():
    code = "import sys, covidkit.cli as c; c.build_parser(); print(sorted(m for m in ('torch','pydicom','pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_synth_prepare_and_a_notebook_run_with_networking_off(tmp_path):
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("user namespaces are not available here")
    offline = ["unshare", "-rn", covidkit()]
    subprocess.run([*offline, "synth", "--out", str(tmp_path), "--seed", "3", "--train-studies", "8",
                    "--test-studies", "2", "--nih-images", "2", "--rsna-images", "2", "--max-size", "600",
                    "--ct-volumes", "2"], check=True, capture_output=True, timeout=300)
    assert len(pd.read_csv(tmp_path / "ct-covid-volumes" / "labels.csv")) == 2
    done = subprocess.run([*offline, "prepare", str(tmp_path / "siim-covid19-detection"), str(tmp_path / "prep"),
                           "--prepared-size", "128", "--workers", "2", "--folds", "2", "--strict"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    meta = pd.read_csv(tmp_path / "prep" / "meta.csv")
    assert (meta["status"] == "ok").all() and len(meta) >= 6
    # a notebook through papermill: its kernel must answer without a loopback interface (notebook 00 with a
    # profile of 2 folds, which this little data allows)
    books = tmp_path / "notebooks"
    (books / "profiles").mkdir(parents=True)
    shutil.copy(notebooks_dir() / "00_prepare_data.ipynb", books)
    (books / "profiles" / "offline.yaml").write_text("00_prepare_data:\n  prepared_size: 128\n  folds: 2\n")
    run = subprocess.run([*offline, "pipeline", "--profile", "offline", "--only", "00", "--input", str(tmp_path),
                          "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "COVIDKIT_NOTEBOOKS": str(books)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(pd.read_csv(tmp_path / "run" / "prepared" / "meta.csv")) == len(meta)


def test_user_errors_are_one_line_without_traceback(tmp_path, capsys):
    from covidkit.cli import main

    code = main(["score", "--image-level", str(tmp_path / "missing.csv"), "--study-level", "x", "--submission", "y"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("covidkit score: error:") and "missing.csv" in err
    assert "Traceback" not in err
    assert main(["pipeline", "--profile", "nope", "--input", str(tmp_path)]) == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err


def test_synth_options_left_out_take_synth_configs_defaults(monkeypatch, tmp_path):
    import covidkit.synth
    from covidkit.cli import build_parser
    from covidkit.synth import SynthConfig

    written = []
    monkeypatch.setattr(covidkit.synth, "write_all", lambda out, cfg: written.append(cfg))
    args = build_parser().parse_args(["synth", "--out", str(tmp_path)])
    assert args.func(args) == 0
    assert written == [SynthConfig()]
    args = build_parser().parse_args(["synth", "--out", str(tmp_path), "--seed", "3", "--nih-images", "7", "--no-ct"])
    args.func(args)
    assert written[1] == SynthConfig(seed=3, nih_images=7, ct=False)


def test_prepare_options_left_out_take_stage_00s_config_defaults(monkeypatch, tmp_path):
    import covidkit.stages.prepare as stage
    from covidkit.cli import build_parser

    calls = []
    monkeypatch.setattr(stage, "prepare", lambda *a, **kw: calls.append(kw) or stage.PrepareSummary(
        ok=0, failed=0, skipped=0, meta=pd.DataFrame()))
    args = build_parser().parse_args(["prepare", str(tmp_path / "in"), str(tmp_path / "out")])
    assert args.func(args) == 0
    cfg = stage.Config()
    assert {k: calls[0][k] for k in ("size", "workers", "folds", "seed")} == \
        {"size": cfg.prepared_size, "workers": cfg.workers, "folds": cfg.folds, "seed": cfg.seed}
    args = build_parser().parse_args(["prepare", str(tmp_path / "in"), str(tmp_path / "out"), "--prepared-size", "64",
                                      "--folds", "3"])
    args.func(args)
    assert (calls[1]["size"], calls[1]["folds"], calls[1]["seed"]) == (64, 3, cfg.seed)


def test_stage_module_runs_with_python_dash_m(tiny_input, tmp_path):
    """``python -m covidkit.stages.<stage>`` (what torchrun launches): the module finds its own stage although
    it runs as ``__main__``."""
    done = subprocess.run([sys.executable, "-m", "covidkit.stages.prepare", "--profile", "smoke", "--input",
                           str(tiny_input), "--run-dir", str(tmp_path / "run"), "--set", "prepared_size=64",
                           "--set", "folds=2", "--set", "workers=1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "prepared" / "meta.csv").is_file()
