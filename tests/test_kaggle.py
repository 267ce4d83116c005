"""``covidkit kaggle bundle``: the Kaggle dataset, and its notebook run the way Kaggle runs it.

The wheels come from a cache that ``make test`` fills before the suite (``covidkit kaggle wheels``: the
download is the registry's, the rest runs offline); ``COVIDKIT_WHEEL_CACHE`` names another one.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from importlib.metadata import distribution
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from covidkit.data.siim import COMPETITION
from covidkit.kaggle import NOTEBOOK, BundleError, make_bundle, prediction_requirements, provided_by_kaggle
from covidkit.pipeline import REPO_ROOT


def wheel_cache() -> Path:
    cache = Path(os.environ.get("COVIDKIT_WHEEL_CACHE", REPO_ROOT / ".venv" / "kaggle-wheels"))
    if not any(cache.glob("*.whl")):
        pytest.skip(f"no wheel cache at {cache}: `make test` downloads it (covidkit kaggle wheels --out {cache})")
    return cache


def test_the_wheels_are_what_prediction_needs_beyond_torch():
    wanted = prediction_requirements("3.11")
    for name in ("pydicom", "pylibjpeg-openjpeg", "ensemble-boxes", "ultralytics", "opencv-python-headless", "numba"):
        assert name in wanted, name
    provided = provided_by_kaggle("3.11")
    assert {"torch", "torchvision", "numpy"} <= provided and not provided & set(wanted)
    for training_only in ("papermill", "scikit-learn", "nibabel", "fastapi", "opencv-python"):
        assert training_only not in wanted
    assert all(version for version in wanted.values())


def test_the_bundle_refuses_what_cannot_work(models_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(models_dir, broken)
    (broken / "fusion.json").write_text("{}")
    with pytest.raises(BundleError, match="not a usable models folder: .*SHA-256"):
        make_bundle(broken, tmp_path / "out", offline=True)

    no_study = tmp_path / "no_study"
    shutil.copytree(models_dir, no_study)
    manifest = json.loads((no_study / "manifest.json").read_text())
    manifest["models"]["study"] = []
    (no_study / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="no model for study"):
        make_bundle(no_study, tmp_path / "out", offline=True)

    with pytest.raises(BundleError, match=r"no wheel for Python 3\.99 on manylinux x86_64: .*pandas"):
        make_bundle(models_dir, tmp_path / "out", python="3.99", wheel_cache=wheel_cache(), offline=True)
    with pytest.raises(BundleError, match="version like 3.11"):
        make_bundle(models_dir, tmp_path / "out", python="py3")


def _kaggle_like_venv(path: Path) -> Path:
    """A fresh virtual environment holding only torch, torchvision and the notebook kernel, as Kaggle's image.

    They are not copied (a CUDA torch is gigabytes): a ``.pth`` file adds a folder of links to the
    installed distributions of their closure, and nothing else of this environment is visible.
    """
    from covidkit.kaggle import _closure

    venv.EnvBuilder(with_pip=True).create(path)
    python = path / "bin" / "python"
    # ensurepip's old setuptools would hide the one torch needs (the image's, below)
    subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True, capture_output=True)
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    overlay = path / "kaggle-image"
    overlay.mkdir()
    for name in _closure(["torch", "torchvision", "ipykernel"], "3.11"):
        dist = distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source = Path(dist.locate_file(top))
            if source.exists() and not (overlay / top).exists():
                (overlay / top).symlink_to(source)
    (site / "kaggle-image.pth").write_text(str(overlay) + "\n")
    return python


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_the_bundle_submits_offline_as_kaggle_runs_it(models_dir, tiny_input, tmp_path):
    """Built from a models folder; then, networking off, its notebook in a fresh environment that has only
    torch and torchvision installs covidkit from the bundle and writes what ``covidkit predict`` writes."""
    if subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode != 0:
        pytest.skip("user namespaces are not available here")
    from covidkit.predict import predict_competition

    bundle = make_bundle(models_dir, tmp_path / "bundle", wheel_cache=wheel_cache(), offline=True,
                         title="covidkit test bundle")
    names = sorted(p.name for p in bundle.out_dir.iterdir())
    assert names == ["README.md", "dataset-metadata.json", "models", NOTEBOOK, "wheels"]
    meta = json.loads((bundle.out_dir / "dataset-metadata.json").read_text())
    assert meta["title"] == "covidkit test bundle" and meta["id"].endswith("/covidkit-test-bundle")
    assert any(p.name.startswith("covidkit-") for p in bundle.wheels)
    book = nbformat.read(bundle.out_dir / NOTEBOOK, as_version=4)
    assert any("parameters" in c.metadata.get("tags", []) for c in book.cells)
    assert "/kaggle/input/siim-covid19-detection" in book.cells[1].source

    python = _kaggle_like_venv(tmp_path / "kaggle-venv")
    probe = "import torch, torchvision\ntry:\n    import pandas\nexcept ImportError:\n    print('bare')"
    assert subprocess.run([python, "-c", probe], capture_output=True, text=True).stdout.strip() == "bare"
    kernels = tmp_path / "jupyter" / "kernels" / "kaggle"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": "kaggle",
        "language": "python"}))
    params = {"competition_dir": str(tiny_input / COMPETITION), "models_dir": str(bundle.out_dir / "models"),
              "wheels_dir": str(bundle.out_dir / "wheels"), "out": str(tmp_path / "working" / "submission.csv"),
              "device": "cpu"}
    run = ("import sys, papermill\nfrom covidkit.pipeline import ipc_kernel_manager\n"
           f"papermill.execute_notebook({str(bundle.out_dir / NOTEBOOK)!r}, {str(tmp_path / 'run.ipynb')!r}, "
           f"parameters={params!r}, kernel_name='kaggle', progress_bar=False, "
           "kernel_manager_class=ipc_kernel_manager())")
    done = subprocess.run(["unshare", "-rn", sys.executable, "-c", run], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "JUPYTER_PATH": str(tmp_path / "jupyter"), "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]

    installed = subprocess.run([python, "-c", "import covidkit; print(covidkit.__file__)"], capture_output=True,
                               text=True, check=True).stdout
    assert str(tmp_path / "kaggle-venv") in installed  # from the bundle's wheel, not this checkout
    outputs = "\n".join(o.get("text", "") for c in nbformat.read(tmp_path / "run.ipynb", as_version=4).cells
                        for o in c.get("outputs", []))
    assert "rows (" in outputs and "s per image" in outputs and "unreadable" in outputs

    expected = predict_competition(tiny_input / COMPETITION, models_dir, tmp_path / "predict.csv", workers=0,
                                   progress=False)
    got, want = pd.read_csv(params["out"]), pd.read_csv(expected.submission)
    assert list(got["id"]) == list(want["id"])
    # the same predictions, up to float rounding in the 6th significant digit (another environment's BLAS)
    for a, b in zip(got["PredictionString"].str.split(), want["PredictionString"].str.split()):
        assert len(a) == len(b) and a[::6] == b[::6]  # labels
        numbers = [i for i in range(len(a)) if i % 6]
        np.testing.assert_allclose([float(a[i]) for i in numbers], [float(b[i]) for i in numbers], rtol=1e-4, atol=1e-3)
