"""Kept at this path so code written against earlier releases imports; the module is
``ntksap_fast.select.topk``."""

import sys as _sys

from .select import topk as _module

_sys.modules[__name__] = _module
