"""Kept at this path so code written against earlier releases imports; the module is
``ntksap_fast.testing.reference``."""

import sys as _sys

from .testing import reference as _module

_sys.modules[__name__] = _module
