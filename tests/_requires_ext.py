"""The compiled ops are required by the tests that use them: a missing or refused build fails.

Only ``NTKSAP_FAST_ALLOW_NO_EXT=1`` (a build without the ops, ``NTKSAP_FAST_NO_EXT_BUILD=1``,
asked for on purpose) turns those failures into skips that say so.
"""
from __future__ import annotations

import os

import pytest

EXT_OPTIONAL = os.environ.get("NTKSAP_FAST_ALLOW_NO_EXT", "0") not in ("", "0")


def ext_missing(why: str) -> None:
    """Fails the test (or skips it under ``NTKSAP_FAST_ALLOW_NO_EXT=1``) because of ``why``."""
    if EXT_OPTIONAL:
        pytest.skip(f"{why}; NTKSAP_FAST_ALLOW_NO_EXT=1 says a build without the compiled ops is intended")
    pytest.fail(f"{why} (set NTKSAP_FAST_ALLOW_NO_EXT=1 only where a build without the compiled ops is intended)")
