"""The parameters of a notebook's profile section, for the ``python -m`` entry points.

A runner launched from a shell (``torchrun ... -m covidkit.train.fasterrcnn --profile full``)
reads the same ``notebooks/profiles/<profile>.yaml`` section the notebook gets from papermill.
"""
from __future__ import annotations

import argparse

from dataclasses import fields

from covidkit.pipeline import load_profile, merge_section


def section_parameters(profile: str, notebook: str, **overrides) -> dict:
    """``common`` values, then the ``notebook`` section, then the non-``None`` ``overrides``."""
    params = load_profile(profile)
    if notebook not in params:
        raise KeyError(f"profile {profile!r} has no section {notebook!r}")
    return merge_section(params, notebook, {k: v for k, v in overrides.items() if v is not None})


def config_from_params(cls, params: dict, section: str):
    """The dataclass ``cls`` built from a profile section's ``params`` (unknown keys are an error)."""
    unknown = sorted(set(params) - {f.name for f in fields(cls)})
    if unknown:
        raise TypeError(f"unknown parameters for {section}: {unknown}")
    return cls(**params)


def profile_argument_parser(description: str) -> argparse.ArgumentParser:
    """``--profile``, ``--input`` and ``--run-dir``, as ``covidkit pipeline`` takes them."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--profile", default="smoke", help="notebooks/profiles/<profile>.yaml (smoke, full)")
    parser.add_argument("--input", default=None, help="folder holding the dataset folders (default: the profile's)")
    parser.add_argument("--run-dir", default=None, help="run folder (default: the profile's)")
    return parser
