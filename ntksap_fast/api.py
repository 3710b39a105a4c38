"""Public entry points: ``ntk_sap_scores`` (one scoring round) and ``ntk_sap_prune`` (T rounds).

Both build an ``NtkSapScorer`` (``ntksap_fast.scorer``) and call it once; to score the same model
repeatedly, keep a scorer instead (its set-up is paid once).
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from torch import nn

from .arena import ParamSelector
from .arguments import resolve_input_shape
from .engine import OutputFn
from .masks import Masks
from .schedule import density_schedule, keep_count
from .scorer import NtkSapScorer

__all__ = ["ntk_sap_scores", "ntk_sap_prune", "density_schedule", "keep_count", "resolve_input_shape"]


def ntk_sap_scores(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    *,
    draws: int = 5,
    batch_size: int | Sequence[int] = 100,
    epsilon: float = 0.01,
    seed: int = 0,
    round: int = 0,
    params: ParamSelector | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    micro_batch: int | None = None,
    draw_batch: int | None = None,
    process_group=None,
    allow_tf32: bool | None = None,
    output: OutputFn | None = None,
) -> dict[str, torch.Tensor]:
    """One NTK-SAP scoring round: ``NtkSapScorer(model, input_shape, ...).scores(masks, round)``.

    Args:
        model: any ``nn.Module``; it is not modified.
        input_shape: one input's shape without the batch dim; optional for models that carry
            ``input_shape`` (``ntksap_fast.models``).
        masks: current masks (bool, parameter shapes) keyed by parameter name; None = dense.
        round: counter of the random numbers (round ``t`` of ``ntk_sap_prune`` uses ``round=t``).
        draws, batch_size, epsilon, seed, params, device, dtype, micro_batch, draw_batch,
        process_group, allow_tf32, output: as for ``NtkSapScorer``.
    Returns:
        ``{name: float32 tensor of the parameter's shape}``: ``|sum_s dL_s/dm| * (mask != 0)``.
    """
    scorer = NtkSapScorer(model, input_shape, draws=draws, batch_size=batch_size, epsilon=epsilon, seed=seed,
                          params=params, device=device, dtype=dtype, micro_batch=micro_batch, draw_batch=draw_batch,
                          process_group=process_group, allow_tf32=allow_tf32, output=output)
    return scorer.scores(masks, round)


def ntk_sap_prune(
    model: nn.Module,
    density: float,
    input_shape: Sequence[int] | None = None,
    *,
    iterations: int = 20,
    schedule: str = "exponential",
    draws: int = 5,
    batch_size: int | Sequence[int] = 100,
    epsilon: float = 0.01,
    seed: int = 0,
    params: ParamSelector | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    micro_batch: int | None = None,
    draw_batch: int | None = None,
    process_group=None,
    allow_tf32: bool | None = None,
    output: OutputFn | None = None,
    checkpoint: str | os.PathLike | None = None,
    progress: bool | None = None,
    on_round: Callable[..., None] | None = None,
    min_layer_density: float = 0.0,
    stats: bool = False,
    target_overlap: float | None = None,
    max_draws: int | None = None,
) -> Masks:
    """Iterative NTK-SAP: ``NtkSapScorer(model, input_shape, ...).prune(density, iterations, ...)``.

    After round ``t`` the kept fraction is ``density ** (t / iterations)`` (or linear); exactly
    ``N - floor((1 - d_t) * N)`` entries stay, the highest-scoring among those still unpruned,
    ties to the lower flat index; pruned entries never come back. The scorer's arguments as for
    ``NtkSapScorer``; ``schedule``, ``checkpoint``, ``progress``, ``on_round``,
    ``min_layer_density``, ``stats``, ``target_overlap`` and ``max_draws`` as for
    ``NtkSapScorer.prune``.

    Returns:
        ``Masks``: ``{name: bool tensor of the parameter's shape}`` for every prunable tensor (True =
        kept), on the compute device, with ``metadata`` saying what made them.
    """
    scorer = NtkSapScorer(model, input_shape, draws=draws, batch_size=batch_size, epsilon=epsilon, seed=seed,
                          params=params, device=device, dtype=dtype, micro_batch=micro_batch, draw_batch=draw_batch,
                          process_group=process_group, allow_tf32=allow_tf32, output=output)
    return scorer.prune(density, iterations, schedule=schedule, checkpoint=checkpoint, progress=progress,
                        on_round=on_round, min_layer_density=min_layer_density, stats=stats,
                        target_overlap=target_overlap, max_draws=max_draws)
