"""The machine a benchmark ran on, in words (for the printed tables)."""

from __future__ import annotations

import platform
import subprocess


def cpu_name() -> str:
    """The CPU's model name from ``lscpu`` (``platform.processor()`` where that fails)."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"
