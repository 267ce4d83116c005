"""Derived configs: a method's settings dataclass filled from a stage ``Config``, field by name.

A stage's ``Config`` (``covidkit.stages``) holds every setting a profile can reach. A method below it (the
Faster R-CNN's ``DetectorSpec``, ``YoloTrainConfig``, ``DeCoVNetConfig``, ``AblationConfig``) takes its own
dataclass; ``derived`` fills it from the stage ``Config``'s fields (and properties) of the same name, so a new
setting is one field in both dataclasses and one profile line, with no copy in between. Only the fields that
differ in name or kind are given explicitly.
"""
from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any, TypeVar

T = TypeVar("T")


def derived(cls: type[T], source: Any, **given: Any) -> T:
    """``cls(...)``: ``given`` values, then every other field of ``cls`` that ``source`` has under the same name;
    the rest keep ``cls``'s defaults. A list goes in as a tuple where ``cls``'s default is a tuple."""
    values = {}
    for f in fields(cls):
        if f.name in given:
            values[f.name] = given[f.name]
        elif hasattr(source, f.name):
            values[f.name] = _as_default_kind(f, getattr(source, f.name))
    return cls(**values)


def _as_default_kind(f, value: Any) -> Any:
    default = f.default if f.default is not MISSING else (
        f.default_factory() if f.default_factory is not MISSING else None)
    return tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
