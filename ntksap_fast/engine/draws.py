"""One draw's random quantities, straight from the counters (docs/DESIGN.md section 2).

Draw ``s`` of round ``t`` under ``seed`` has

* ``theta``: every prunable entry ``~ N(0, 2 / fan_in)`` (stream WEIGHTS, element = arena index),
* ``z``: ``~ N(0, 1)`` (stream PERTURBATION, element = arena index),
* ``x``: inputs ``~ N(0, 1)`` of shape ``(batch_size, *input_shape)`` (stream INPUTS, element =
  row-major index into that tensor, so any slice of rows has the numbers the whole draw has).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .arena import Arena
from .rng import Stream, normal, normal_at

__all__ = ["DrawKey", "sample_weights", "sample_inputs", "SPARSE_SAMPLING_DENSITY"]

#: Below this fraction of unpruned entries, weights are generated only where the mask is set.
SPARSE_SAMPLING_DENSITY = 0.25


@dataclass(frozen=True)
class DrawKey:
    """Counters that name one draw."""

    seed: int
    round: int
    draw: int


def sample_weights(
    arena: Arena, key: DrawKey, stream: Stream, std: torch.Tensor | None, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Flat float32 CPU vector of one draw's weights (``std`` given) or perturbation (``std=None``).

    Args:
        std: flat per-entry standard deviations (``arena.std_vector()``) or None for unit normals.
        keep: optional flat bool mask. When given and sparse, only the entries where it is set are
            generated and the rest are 0; the generated entries equal the dense result exactly.
    """
    n = arena.numel
    if keep is not None and keep.numel() and keep.sum().item() < SPARSE_SAMPLING_DENSITY * n:
        idx = keep.nonzero().squeeze(1)
        out = torch.zeros(n, dtype=torch.float32)
        values = normal_at(key.seed, key.round, key.draw, stream, idx)
        out[idx] = values * std[idx] if std is not None else values
        return out
    out = normal(key.seed, key.round, key.draw, stream, n)
    return out.mul_(std) if std is not None else out


def sample_inputs(key: DrawKey, input_shape: tuple[int, ...], rows: range) -> torch.Tensor:
    """Rows ``rows`` of the draw's input batch: float32 tensor ``(len(rows), *input_shape)``."""
    per_row = math.prod(input_shape)
    x = normal(key.seed, key.round, key.draw, Stream.INPUTS, len(rows) * per_row, offset=rows.start * per_row)
    return x.view(len(rows), *input_shape)
