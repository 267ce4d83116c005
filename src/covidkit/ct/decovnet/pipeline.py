"""Deprecated: renamed ``covidkit.ct.decovnet.method`` (the DeCoVNet method end to end)."""
import sys

from covidkit.deprecated import shim_module

sys.modules[__name__] = shim_module(__name__, "covidkit.ct.decovnet.method")
