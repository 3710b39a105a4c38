"""Global top-k with a per-tensor floor: the collapse guard (``min_layer_density``).

A layer pruned to nothing disconnects the network. With ``min_layer_density = d_min`` every
prunable tensor ``t`` (``numel_t`` entries, ``unpruned_t`` of them still unpruned) first keeps its

    floor_t = min(keep_count(numel_t, d_min), unpruned_t)

highest-scoring unpruned entries, where ``keep_count(n, d) = n - floor((1 - d) * n)`` is the same
count the global schedule uses (``ceil(d * n)`` up to float rounding; 0 for ``d = 0``, ``n`` for
``d = 1``). The floor is a fraction of the tensor's size, not of what is left of it, so it does not
shrink from round to round; a tensor that was already pruned below it keeps everything it has.
The other ``n_keep - sum_t floor_t`` entries are the highest scores among the remaining unpruned
entries of all tensors together. So the total is exactly ``n_keep``, pruned entries never come
back, and ties go to the lower flat index in both steps (as in ``ntksap_fast.select.topk``). With
``d_min = 0`` this is exactly ``masked_topk_(scores, mask, n_keep)``.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Sequence
from typing import Protocol

import torch

from .schedule import keep_count
from .topk import masked_topk_

__all__ = ["select_"]


class _SlotLike(Protocol):
    offset: int
    numel: int


def _spans(slots_or_sizes: Sequence[_SlotLike] | Sequence[int], length: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each tensor; they must tile ``[0, length)`` in order."""
    if isinstance(slots_or_sizes, (str, bytes, torch.Tensor)) or not isinstance(slots_or_sizes, Sequence):
        raise TypeError(
            "slots_or_sizes must be a sequence of arena slots (.offset, .numel) or of ints, "
            f"got {type(slots_or_sizes).__name__}"
        )
    spans, start = [], 0
    for i, item in enumerate(slots_or_sizes):
        if isinstance(item, numbers.Integral) and not isinstance(item, bool):
            offset, numel = start, operator.index(item)
        elif hasattr(item, "offset") and hasattr(item, "numel"):
            offset, numel = int(item.offset), int(item.numel)
        else:
            raise TypeError(f"slots_or_sizes[{i}] must be an int or have .offset and .numel, got {type(item).__name__}")
        if numel < 0 or offset != start:
            raise ValueError(
                f"slots_or_sizes[{i}] covers [{offset}, {offset + numel}); the tensors must tile "
                f"[0, {length}) in order, so it should start at {start} with a size >= 0"
            )
        spans.append((offset, offset + numel))
        start = offset + numel
    if start != length:
        raise ValueError(f"slots_or_sizes cover {start} entries, scores has {length}")
    return spans


def _check_density(min_layer_density: float) -> float:
    if isinstance(min_layer_density, bool) or not isinstance(min_layer_density, numbers.Real):
        raise TypeError(f"min_layer_density must be a float in [0, 1], got {type(min_layer_density).__name__}")
    if not 0.0 <= float(min_layer_density) <= 1.0:  # also rejects NaN
        raise ValueError(f"min_layer_density must be in [0, 1], got {min_layer_density}")
    return float(min_layer_density)


def _floors(mask: torch.Tensor, spans: list[tuple[int, int]], density: float) -> list[int]:
    if density == 0.0:
        return [0] * len(spans)
    unpruned = _segment_sums(mask, spans)
    return [min(keep_count(b - a, density), u) for (a, b), u in zip(spans, unpruned)]


def _segment_sums(mask: torch.Tensor, spans: list[tuple[int, int]]) -> list[int]:
    """Unpruned count per span, with one device-to-host copy."""
    if not spans:
        return []
    sizes = torch.tensor([b - a for a, b in spans], device=mask.device)
    ids = torch.repeat_interleave(torch.arange(len(spans), device=mask.device), sizes)
    counts = torch.zeros(len(spans), dtype=torch.int64, device=mask.device)
    counts.index_add_(0, ids, mask.to(torch.int64))
    return counts.tolist()


def select_(
    scores: torch.Tensor,
    mask: torch.Tensor,
    n_keep: int,
    slots_or_sizes: Sequence[_SlotLike] | Sequence[int],
    min_layer_density: float = 0.0,
) -> torch.Tensor:
    """Keep exactly ``n_keep`` unpruned entries, each tensor at least its floor; ``mask`` in place.

    Args:
        scores: flat 1-D float16/bfloat16/float32/float64 scores, length ``N``.
        mask: flat 1-D bool tensor of length ``N`` on the same device, True = unpruned; overwritten
            with the new mask (a subset of the old one with exactly ``n_keep`` True entries).
        n_keep: entries to keep, in ``[0, mask.sum()]``.
        slots_or_sizes: the tensors in flat order, either arena slots (``.offset``, ``.numel``,
            e.g. ``Arena.slots``) or their sizes; they must tile ``[0, N)``.
        min_layer_density: each tensor's floor as a fraction of its size (module docstring), in
            ``[0, 1]``; 0 is the plain global top-k.

    Returns:
        ``mask``.

    Raises:
        ValueError: ``min_layer_density`` outside ``[0, 1]``; the floors together exceed
            ``n_keep``; slots that do not tile the vector; or any error of ``masked_topk_``
            (``n_keep`` out of range, NaN at an unpruned entry, shapes). ``mask`` is unchanged then.
    """
    density = _check_density(min_layer_density)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 1:
        raise TypeError("mask must be a 1-D bool tensor")
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.shape != mask.shape:
        raise ValueError(
            f"scores and mask must have the same 1-D shape, got {tuple(scores.shape)} and {tuple(mask.shape)}"
        )
    spans = _spans(slots_or_sizes, mask.shape[0])
    if density == 0.0:
        return masked_topk_(scores, mask, n_keep)
    if isinstance(n_keep, bool) or not isinstance(n_keep, numbers.Integral):
        raise TypeError(f"n_keep must be an int, got {type(n_keep).__name__}")
    floors = _floors(mask, spans, density)
    unpruned = int(mask.sum())
    if not 0 <= n_keep <= unpruned:
        raise ValueError(f"n_keep must be in [0, number of unpruned entries = {unpruned}], got {n_keep}")
    total_floor = sum(floors)
    if total_floor > n_keep:
        raise ValueError(
            f"min_layer_density={min_layer_density} asks the tensors to keep at least "
            f"{total_floor} entries in all (each at least its floor), more than n_keep={n_keep}; "
            "lower min_layer_density or raise the density"
        )
    floor_mask = mask.clone()
    for i, ((a, b), f) in enumerate(zip(spans, floors)):
        if f == 0:
            floor_mask[a:b] = False
            continue
        try:
            masked_topk_(scores[a:b], floor_mask[a:b], f)
        except ValueError as err:
            raise ValueError(f"tensor {i} (flat entries [{a}, {b})): {err}") from err
    rest = mask & ~floor_mask
    masked_topk_(scores, rest, n_keep - total_floor)
    torch.logical_or(rest, floor_mask, out=mask)
    return mask
