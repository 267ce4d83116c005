"""Deprecated names: a public name that moved or was renamed keeps working where it was, with a warning.

``__getattr__ = moved(__name__, {"old_name": "covidkit.new.module.new_name"})`` at the end of a module makes
``from that.module import old_name`` return the new object and warn (``DeprecationWarning``); a module that was
renamed leaves a shim module behind (``shim_module``). A renamed stage setting (a profile key, ``--set``) is
mapped to its new name with ``warn_renamed``'s warning (``covidkit.stages.renamed_settings``).
"""
from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def _resolve(target: str) -> Any:
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def moved(module_name: str, aliases: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that serves each old name of ``aliases`` from its new place, with a warning."""
    def __getattr__(name: str) -> Any:
        if name in aliases:
            warnings.warn(f"{module_name}.{name} is deprecated: use {aliases[name]}", DeprecationWarning, stacklevel=2)
            return _resolve(aliases[name])
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
    return __getattr__


def warn_renamed(old: str, new: str) -> None:
    """The warning of a deprecated method, attribute or setting (its body then calls the new one)."""
    warnings.warn(f"{old} is deprecated: use {new}", DeprecationWarning, stacklevel=3)


def show_deprecations() -> None:
    """Print covidkit's own deprecation warnings (Python hides a ``DeprecationWarning`` outside ``__main__``):
    a command line with a renamed setting says so."""
    warnings.filterwarnings("default", message=r"\S+ is deprecated: use ", category=DeprecationWarning,
                            module="covidkit")


def shim_module(old: str, new: str) -> Any:
    """Warn that module ``old`` was renamed ``new`` and return ``new`` (a shim's body: ``globals().update(...)``)."""
    warnings.warn(f"module {old} is deprecated: use {new}", DeprecationWarning, stacklevel=3)
    return importlib.import_module(new)
