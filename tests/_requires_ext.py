"""The compiled ops are required by the tests that use them: a missing or refused build fails.

Only ``NTKSAP_FAST_ALLOW_NO_EXT=1`` (a build without the ops, ``NTKSAP_FAST_NO_EXT_BUILD=1``,
asked for on purpose) turns those failures into skips that say so.
"""

from __future__ import annotations

import pytest

from ntksap_fast._build.config import env_flag

EXT_OPTIONAL = env_flag("NTKSAP_FAST_ALLOW_NO_EXT")


def ext_missing(why: str) -> None:
    """Fails the test (or skips it under ``NTKSAP_FAST_ALLOW_NO_EXT=1``) because of ``why``."""
    if EXT_OPTIONAL:
        pytest.skip(f"{why}; NTKSAP_FAST_ALLOW_NO_EXT=1 says a build without the compiled ops is intended")
    pytest.fail(f"{why} (set NTKSAP_FAST_ALLOW_NO_EXT=1 only where a build without the compiled ops is intended)")
