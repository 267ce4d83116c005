"""Deprecated: renamed ``covidkit.export`` (the exported models folder)."""
import sys

from covidkit.deprecated import shim_module

sys.modules[__name__] = shim_module(__name__, "covidkit.export")
