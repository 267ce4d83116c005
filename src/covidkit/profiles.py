"""Parameter profiles: ``notebooks/profiles/<name>.yaml``, one section per stage.

A profile holds a ``common`` section (``input_dir``, ``run_dir``, ``seed``, ``hflip_tta`` ...: every stage
takes those it has) and one section per notebook, named after it (``06_study_level``), whose keys are the
fields of that stage's ``Config`` (``covidkit.stages``). The same section feeds the notebook under papermill,
``covidkit run STAGE`` and ``torchrun -m covidkit.stages.<stage>``: one name per setting everywhere.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]


class ProfileError(ValueError):
    """A profile is unknown, or does not fit the stages."""


def notebooks_dir() -> Path:
    """The ``notebooks/`` folder of the repository (``COVIDKIT_NOTEBOOKS`` overrides it)."""
    path = Path(os.environ.get("COVIDKIT_NOTEBOOKS", REPO_ROOT / "notebooks"))
    if not path.is_dir():
        raise ProfileError(f"no notebooks folder at {path}; set COVIDKIT_NOTEBOOKS to the repository's notebooks/")
    return path


def load_profile(name: str) -> dict:
    """The parsed profile ``notebooks/profiles/<name>.yaml``."""
    path = notebooks_dir() / "profiles" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ProfileError(f"unknown profile {name!r}; known: {', '.join(known)}")
    return yaml.safe_load(path.read_text()) or {}


def merge_section(profile: dict, name: str, overrides: dict) -> dict:
    """The ``common`` values, then section ``name``, then ``overrides``."""
    return {**(profile.get("common") or {}), **(profile.get(name) or {}), **overrides}


def parse_overrides(items: list[str]) -> dict:
    """``["epochs=3", "grid={weights: [[1, 1]]}"]`` -> ``{"epochs": 3, "grid": {...}}`` (values parsed as YAML)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ProfileError(f"--set takes key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out
