"""Public entry points: ``ntk_sap_scores`` (one scoring round) and ``ntk_sap_prune`` (T rounds)."""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .arena import Arena, ParamSelector
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import DrawShare
from .backend import resolve_backend
from .engine import (EngineConfig, check_input_shape, cuda_bytes_per_input, default_micro_batch, mask_gradient,
                     preserved_state)
from .topk import masked_topk_

__all__ = ["ntk_sap_scores", "ntk_sap_prune", "density_schedule", "keep_count", "resolve_input_shape"]

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


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def resolve_input_shape(model: nn.Module, input_shape) -> tuple[int, ...]:
    """``input_shape`` as a tuple of ints, or the model's own ``input_shape`` attribute if None."""
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
        if input_shape is None:
            raise ValueError(
                f"input_shape is needed: {type(model).__name__} does not say what input it takes; pass one "
                "sample's shape without the batch dimension, e.g. input_shape=(3, 224, 224)"
            )
    if isinstance(input_shape, torch.Size):
        input_shape = tuple(input_shape)
    if not isinstance(input_shape, (tuple, list)) or not input_shape:
        raise TypeError(f"input_shape must be a non-empty tuple of ints, got {input_shape!r}")
    for s in input_shape:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1:
            raise ValueError(f"input_shape must hold positive ints, got {tuple(input_shape)!r}")
    return tuple(int(s) for s in input_shape)


def _batch_sizes(draws: int, batch_size: int | Sequence[int]) -> list[int]:
    if isinstance(batch_size, (list, tuple)):
        sizes = [_check_int("batch_size", b) for b in batch_size]
        if len(sizes) != draws:
            raise ValueError(f"batch_size has {len(sizes)} entries but draws is {draws}; give one size per draw")
        return sizes
    return [_check_int("batch_size", batch_size)] * draws


def _config(model: nn.Module, device, dtype, micro_batch, draw_batch) -> EngineConfig:
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must name a torch device, got {device!r}") from err
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float64):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float64, got {dtype}")
    if micro_batch is not None:
        micro_batch = _check_int("micro_batch", micro_batch)
    # Draws in sequence unless asked: on the 2-core CPU we measured no gain from batching them
    # (bench/bench_engine.py, README "Performance").
    draw_batch = 1 if draw_batch is None else _check_int("draw_batch", draw_batch)
    return EngineConfig(device=device, dtype=dtype, micro_batch=micro_batch, draw_batch=draw_batch,
                        backend=resolve_backend(device, dtype))


class _Setup:
    """Validated arguments shared by both entry points."""

    def __init__(self, model, input_shape, draws, batch_size, epsilon, seed, params, device, dtype, micro_batch,
                 draw_batch=None, process_group=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.draws = _check_int("draws", draws)
        self.batch_sizes = _batch_sizes(self.draws, batch_size)
        self.epsilon = _check_float("epsilon", epsilon)
        if not math.isfinite(self.epsilon) or self.epsilon <= 0:
            raise ValueError(f"epsilon must be a finite number > 0, got {epsilon}")
        self.seed = _check_int("seed", seed, minimum=0)
        if self.seed >= 2**64:
            raise ValueError(f"seed must be < 2**64, got {seed}")
        self.input_shape = resolve_input_shape(model, input_shape)
        self.arena = Arena(model, params)
        self.config = _config(model, device, dtype, micro_batch, draw_batch)
        self.model = model
        self.share = DrawShare.current(process_group)
        self.local_draws = self.share.draws(self.draws)
        with preserved_state(model):
            check_input_shape(model, self.arena, self.input_shape, self.config)
            if self.config.device.type == "cuda" and micro_batch is None:
                # Bound memory by default on a GPU: as many inputs per forward as fit in 70% of
                # the free memory (measured per input); None when whole draws fit.
                per_input = cuda_bytes_per_input(model, self.arena, self.input_shape, self.config)
                free = torch.cuda.mem_get_info(self.config.device)[0]
                micro = default_micro_batch(free, per_input, max(self.batch_sizes))
                self.config = dataclasses.replace(self.config, micro_batch=micro)

    def scores(self, mask: torch.Tensor, round: int, on_draw=None) -> torch.Tensor:
        """Flat float32 scores ``|G| * mask``; raises ``ValueError`` naming a tensor with NaN scores."""
        with preserved_state(self.model):
            grad = mask_gradient(
                self.model, self.arena, mask, self.input_shape, batch_sizes=self.batch_sizes,
                epsilon=self.epsilon, seed=self.seed, round=round, config=self.config,
                draw_ids=self.local_draws, on_draw=on_draw,
            )
        scores = self.share.all_reduce(grad).abs_().mul_(mask).to(torch.float32)
        if torch.isnan(scores).any():
            bad = [n for n, v in self.arena.views(scores).items() if torch.isnan(v).any()]
            raise ValueError(f"NaN in the NTK-SAP scores of {bad}: the model's output or gradient is not finite")
        return scores


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
) -> dict[str, torch.Tensor]:
    """One NTK-SAP scoring round.

    Args:
        model: any ``nn.Module``; it is not modified.
        input_shape: one input's shape without the batch dim; optional for models that carry
            ``input_shape`` (``ntksap_fast.models``).
        masks: current masks (bool, parameter shapes) keyed by parameter name; None = dense.
        draws: weight/input draws; batch_size: inputs per draw (int, or one per draw).
        epsilon: perturbation size; seed, round: counters of the random numbers.
        params: prunable tensors (names or a predicate); default every Conv/Linear weight.
        device: where to compute (default the model's); dtype: compute precision, float32
            (default), bfloat16 (faster, see README) or float64 (for checking).
        micro_batch: most inputs per forward (exact: results do not depend on it); on a GPU the
            default is what fits in 70% of the free memory (whole draws when they fit).
        draw_batch: draws run together through ``torch.func.vmap`` (same results up to float
            rounding); default 1 (in sequence), the faster choice measured on CPU.
        process_group: share the draws over the ranks of this ``torch.distributed`` group (default:
            the default group when ``torch.distributed`` is initialised); every rank gets the result.
    Returns:
        ``{name: float32 tensor of the parameter's shape}``: ``|sum_s dL_s/dm| * (mask != 0)``.
    """
    setup = _Setup(model, input_shape, draws, batch_size, epsilon, seed, params, device, dtype, micro_batch,
                   draw_batch, process_group)
    round = _check_int("round", round, minimum=0)
    if masks is None:
        mask = torch.ones(setup.arena.numel, dtype=torch.bool, device=setup.config.device)
    else:
        mask = setup.arena.flatten(masks, argname="masks", dtype=torch.bool, device=setup.config.device)
    scores = setup.scores(mask, round)
    return {n: v.clone() for n, v in setup.arena.views(scores).items()}


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
    checkpoint: str | os.PathLike | None = None,
    progress: bool | None = None,
    on_round: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
) -> dict[str, torch.BoolTensor]:
    """Iterative NTK-SAP: ``iterations`` scoring rounds, global top-k after each.

    After round ``t`` the kept fraction is ``density ** (t / iterations)`` (or linear); exactly
    ``N - floor((1 - d_t) * N)`` entries stay, the highest-scoring among those still unpruned,
    ties to the lower flat index; pruned entries never come back. Arguments as ``ntk_sap_scores``;
    ``progress`` shows a bar per round (None: only on a terminal; rank 0 only); ``on_round(t, masks)``
    is called after each round with the masks so far.

    ``checkpoint``: a file path; after each round the mask and the round counter are written to it
    atomically (by rank 0), and a call with the same arguments resumes after the last finished
    round, giving the identical final masks. A checkpoint written with other arguments, or a
    corrupted one, raises ``ValueError`` (``ntksap_fast.checkpoint.CheckpointError``).

    Returns:
        ``{name: bool tensor of the parameter's shape}`` for every prunable tensor (True = kept),
        on the compute device.
    """
    density = _check_float("density", density)
    if not (0.0 < density <= 1.0):  # also rejects NaN
        raise ValueError(f"density must be in (0, 1], got {density}")
    iterations = _check_int("iterations", iterations)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    setup = _Setup(model, input_shape, draws, batch_size, epsilon, seed, params, device, dtype, micro_batch,
                   draw_batch, process_group)
    n_total = setup.arena.numel
    mask = torch.ones(n_total, dtype=torch.bool, device=setup.config.device)
    done = 0
    if checkpoint is not None:
        if not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"checkpoint must be a file path, got {type(checkpoint).__name__}")
        settings = {
            "tensors": [(s.name, tuple(s.shape)) for s in setup.arena.slots], "density": density,
            "iterations": iterations, "schedule": schedule, "batch_sizes": tuple(setup.batch_sizes),
            "epsilon": setup.epsilon, "seed": setup.seed, "input_shape": setup.input_shape,
            "dtype": str(setup.config.dtype),
        }
        if Path(checkpoint).exists():
            done, saved = load_checkpoint(checkpoint, settings)
            mask.copy_(saved)
    schedule_densities = density_schedule(density, iterations, schedule)
    show = setup.share.is_main and (progress is None or progress)
    with tqdm(total=(iterations - done) * len(setup.local_draws), desc="NTK-SAP", unit="draw",
              disable=None if progress is None and show else not show) as bar:
        for t in range(done, iterations):
            bar.set_postfix(round=f"{t + 1}/{iterations}", density=f"{schedule_densities[t]:.4f}")
            scores = setup.scores(mask, round=t, on_draw=lambda: bar.update(1))
            masked_topk_(scores, mask, keep_count(n_total, schedule_densities[t]))
            if checkpoint is not None and setup.share.is_main:
                save_checkpoint(checkpoint, settings, t + 1, mask)
            if on_round is not None:
                on_round(t + 1, {n: v.clone() for n, v in setup.arena.views(mask).items()})
    return {n: v.clone() for n, v in setup.arena.views(mask).items()}
