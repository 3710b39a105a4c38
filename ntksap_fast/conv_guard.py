"""Kept at this path so code written against earlier releases imports; the module is
``ntksap_fast.engine.conv_guard``."""

import sys as _sys

from .engine import conv_guard as _module

_sys.modules[__name__] = _module
