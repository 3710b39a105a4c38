"""Sanity checks of pruning at initialization (Su et al. 2020; Frankle et al. 2021): do the chosen
entries matter, or only how many each layer keeps?

* :func:`shuffle_masks`: each tensor's mask with its entries moved to random places, its count
  kept (layer-wise random masks with the method's per-layer densities).
* :func:`keep_lowest`: keep the lowest scores instead of the highest (inverted scores), exact
  counts and ties as the library's top-k. Iterative NTK-SAP does the same after every round with
  ``ntk_sap_prune(..., invert=True)``.

Re-initialising the weights before training is the third check; it belongs to the training code.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..io.masks import Masks, _check_masks
from ..options import check_density, check_seed
from ..select.schedule import keep_count
from ..select.topk import masked_topk_

__all__ = ["shuffle_masks", "keep_lowest"]


def shuffle_masks(masks: Mapping[str, torch.Tensor], seed: int) -> Masks:
    """Each mask with its entries moved to random places, keeping its count: the layer-wise random
    masks of the sanity checks of Su et al. 2020 and Frankle et al. 2021 (if they train as well,
    only the per-layer densities mattered).

    Tensor by tensor in the dict's order, the flattened mask is permuted by ``torch.randperm``
    drawn from one CPU ``torch.Generator`` seeded with ``seed``: the same masks and seed give the
    same result on every device and run. Returns a new :class:`Masks` (each tensor on its mask's
    device; ``masks`` is not changed) whose ``metadata`` is ``masks``' plus ``shuffle_seed``.
    """
    _check_masks(masks)
    seed = check_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    shuffled = {}
    for name, m in masks.items():
        order = torch.randperm(m.numel(), generator=gen)
        shuffled[name] = m.detach().cpu().reshape(-1)[order].reshape(m.shape).to(m.device)
    return Masks(shuffled, metadata={**getattr(masks, "metadata", {}), "shuffle_seed": seed})


def keep_lowest(
    scores: Mapping[str, torch.Tensor], density: float, masks: Mapping[str, torch.Tensor] | None = None
) -> Masks:
    """Masks that keep the LOWEST scores: the inverted-scores sanity check (Frankle et al. 2021).

    Args:
        scores: ``{name: float tensor}`` (float16/bfloat16/float32/float64, all on one device),
            e.g. ``NtkSapScorer.scores(masks, round=t)`` or ``ntk_sap_scores(...)``.
        density: kept fraction in (0, 1] of all entries of ``scores``.
        masks: the current masks (same names and shapes, True = kept); their pruned entries stay
            pruned. None: every entry is a candidate.
    Returns:
        :class:`Masks` with exactly ``keep_count(N, density) = N - floor((1 - density) N)`` True
        entries over all tensors (``N`` their total size), the lowest scores among the unpruned
        entries, globally; ties to the lower flat index (tensors in the dict's order, each
        row-major), ``-0.0 == 0.0``, as the library's top-k. ``metadata``: ``{"invert": True}`` (the
        key the prune loop writes).
    Raises:
        ValueError: ``density`` outside (0, 1]; names or shapes of ``masks`` other than ``scores``';
            fewer unpruned entries than the count; a NaN score at an unpruned entry.
        TypeError: ``scores`` or ``masks`` not dicts of float / bool tensors.
    """
    if not isinstance(scores, Mapping) or not scores:
        raise TypeError(f"scores must be a non-empty dict of float tensors keyed by parameter name, got {scores!r}")
    for name, s in scores.items():
        if not isinstance(s, torch.Tensor) or not s.is_floating_point():
            got = s.dtype if isinstance(s, torch.Tensor) else type(s).__name__
            raise TypeError(f"scores[{name!r}] must be a float tensor, got {got}")
    density = check_density(density)
    if masks is not None:
        _check_masks(masks)
        if list(masks) != list(scores):
            raise ValueError(
                f"masks must have the names of scores in the same order, got {list(masks)} for scores {list(scores)}"
            )
        for name, m in masks.items():
            if m.shape != scores[name].shape:
                raise ValueError(
                    f"masks[{name!r}] has shape {tuple(m.shape)}, scores[{name!r}] has {tuple(scores[name].shape)}"
                )
    flat = torch.cat([s.detach().reshape(-1) for s in scores.values()])
    keep = (
        torch.ones(flat.shape, dtype=torch.bool, device=flat.device)
        if masks is None
        else torch.cat([m.reshape(-1) for m in masks.values()]).to(flat.device)
    )
    masked_topk_(-flat, keep, keep_count(flat.numel(), density))  # the largest -score: the lowest score
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = keep[start : start + s.numel()].reshape(s.shape)
        start += s.numel()
    return Masks(out, metadata={"invert": True})
