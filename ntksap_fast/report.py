"""Kept at this path so code written against earlier releases imports; the module is
``ntksap_fast.analysis.report``."""

import sys as _sys

from .analysis import report as _module

_sys.modules[__name__] = _module
