"""The pruning schedule: kept fraction after each round, and how many entries that keeps."""

from __future__ import annotations

import math

__all__ = ["SCHEDULES", "density_schedule", "keep_count"]

SCHEDULES = ("exponential", "linear")


def density_schedule(density: float, iterations: int, schedule: str = "exponential") -> list[float]:
    """Kept fraction after each round ``t = 1..T``: ``d ** (t/T)`` or ``1 - (1 - d) * t/T``."""
    if schedule == "exponential":
        return [density ** (t / iterations) for t in range(1, iterations + 1)]
    if schedule == "linear":
        return [1.0 - (1.0 - density) * t / iterations for t in range(1, iterations + 1)]
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def keep_count(n_total: int, density: float) -> int:
    """``n_keep = N - floor((1 - density) * N)``: entries kept at ``density`` out of ``N``."""
    return n_total - math.floor((1.0 - density) * n_total)
