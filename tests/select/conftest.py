"""Fixtures of the select tests: the device a case runs on, and the compiled ops a case needs."""

from __future__ import annotations

import pytest

from _requires_ext import ext_missing
from ntksap_fast.select import topk


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> str:
    """Every device: cpu, and cuda where a CUDA device is present (the ``cuda`` mark)."""
    return request.param


@pytest.fixture
def ext() -> None:
    """Fails (skips only under NTKSAP_FAST_ALLOW_NO_EXT=1) when the compiled ops are missing."""
    if not topk.extension_available():
        ext_missing(f"compiled extension unavailable: {topk.extension_error()}")
