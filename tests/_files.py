"""File helpers shared by the tests of files the library writes (masks, checkpoints)."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    """The process umask set to ``value`` for the block, restored afterwards (tests run in one thread)."""
    saved = os.umask(value)
    try:
        yield
    finally:
        os.umask(saved)


def mode(path: Path) -> int:
    """Permission bits of ``path`` (``0o644``, ...)."""
    return stat.S_IMODE(path.stat().st_mode)


def plain_open_mode(folder: Path) -> int:
    """Permission bits ``open(..., "wb")`` gives a new file in ``folder`` under the current umask."""
    probe = folder / "plain-open-probe"
    probe.open("wb").close()
    try:
        return mode(probe)
    finally:
        probe.unlink()
