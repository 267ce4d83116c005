"""The console script: installed, answers --help without heavy imports, works with networking off."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

COMMANDS = ["synth", "prepare", "score", "validate", "bench", "pipeline"]


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
def test_synth_and_prepare_run_with_networking_off(tmp_path):
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("user namespaces are not available here")
    offline = ["unshare", "-rn", covidkit()]
    subprocess.run([*offline, "synth", "--out", str(tmp_path), "--seed", "3", "--train-studies", "8",
                    "--test-studies", "2", "--nih-images", "2", "--rsna-images", "2", "--max-size", "600"],
                   check=True, capture_output=True, timeout=300)
    done = subprocess.run([*offline, "prepare", str(tmp_path / "siim-covid19-detection"), str(tmp_path / "prep"),
                           "--size", "128", "--workers", "2", "--folds", "2", "--strict"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    meta = pd.read_csv(tmp_path / "prep" / "meta.csv")
    assert (meta["status"] == "ok").all() and len(meta) >= 6


def test_user_errors_are_one_line_without_traceback(tmp_path, capsys):
    from covidkit.cli import main

    code = main(["score", "--image-level", str(tmp_path / "missing.csv"), "--study-level", "x", "--submission", "y"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("covidkit score: error:") and "missing.csv" in err
    assert "Traceback" not in err
    assert main(["pipeline", "--profile", "nope", "--input", str(tmp_path)]) == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err
