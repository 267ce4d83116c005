"""Shared fixtures: a tiny synthetic competition, made once per test session (per xdist worker)."""
from __future__ import annotations

from pathlib import Path

import pytest

TINY = dict(seed=7, train_studies=12, test_studies=5, nih_images=6, rsna_images=6, max_size=640,
            nih_size=256, rsna_size=256, workers=1, ct=False)


@pytest.fixture(scope="session")
def tiny_input(tmp_path_factory) -> Path:
    """An ``input/`` folder with every synthetic dataset, small."""
    from covidkit.synth import SynthConfig, write_all

    out = tmp_path_factory.mktemp("input")
    write_all(out, SynthConfig(**TINY))
    return out


@pytest.fixture(scope="session")
def real_radiograph() -> Path:
    """The one real chest radiograph we have: a PA chest CR, MONOCHROME1, uncompressed."""
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("RG1_UNCR.dcm", download=False))
