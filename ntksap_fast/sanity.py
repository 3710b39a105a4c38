"""Kept at this path so code written against earlier releases imports; the module is
``ntksap_fast.methods.sanity``."""

import sys as _sys

from .methods import sanity as _module

_sys.modules[__name__] = _module
