"""The engine: NTK-SAP mask gradients, one pass per branch, no statistics pass, no model copy.

For draw ``s`` with weights ``theta``, perturbation ``z`` and inputs ``x`` (``ntksap_fast.draws``),
the clean weights ``W_c = m * theta`` and perturbed weights ``W_p = m * (theta + eps * z)`` are two
flat leaf tensors; the model runs through ``torch.func.functional_call`` with their arena views,
BatchNorm uses the clean branch's statistics recorded during the clean forward
(``ntksap_fast.batchnorm``), ``L = sum((f_c - f_p)**2)``, and one backward gives ``g_c, g_p``. Then

    dL/dm = theta * g_c + (theta + eps * z) * g_p = theta * (g_c + g_p) + eps * z * g_p,

accumulated over draws into one flat float32 vector ``G``. When a draw is larger than
``micro_batch`` inputs, an exact pre-pass accumulates each BatchNorm's statistics over the whole
draw first (one sweep per BatchNorm layer), then micro-batches run both branches with them: ``G``
does not depend on the micro-batch size beyond float summation order.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .arena import Arena
from .batchnorm import CleanStatsBatchNorm, StatsAccumulator, StopForward
from .draws import DrawKey, sample_inputs, sample_weights
from .rng import Stream

__all__ = ["EngineConfig", "mask_gradient", "preserved_state", "check_input_shape"]


@dataclass(frozen=True)
class EngineConfig:
    """How the engine computes (none of it changes the result beyond float rounding).

    Attributes:
        device: where the passes run.
        dtype: compute precision of the passes: float32; bfloat16 (autocast; accumulation,
            loss and ``G`` stay float32); or float64 (everything in float64, for checking).
        micro_batch: most inputs per forward; None = whole draws.
        channels_last: run 4-D/5-D activations channels-last (faster convolutions on CPU oneDNN).
    """

    device: torch.device
    dtype: torch.dtype = torch.float32
    micro_batch: int | None = None
    channels_last: bool = True

    @property
    def param_dtype(self) -> torch.dtype:
        """dtype of weights, inputs, losses and ``G``."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Puts every module in eval mode (dropout off) for the block; restores each module's mode."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training


def _fixed_tensors(model: nn.Module, arena: Arena, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Non-prunable parameters and floating buffers as detached ``dtype`` tensors on ``device``."""
    prunable = set(arena.names)
    fixed = {}
    for name, p in model.named_parameters():
        if name not in prunable:
            fixed[name] = p.detach().to(device=device, dtype=dtype)
    for name, b in model.named_buffers():
        fixed[name] = b.to(device=device, dtype=dtype) if b.is_floating_point() else b.to(device)
    return fixed


def _layout(x: torch.Tensor, config: EngineConfig) -> torch.Tensor:
    if config.channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if config.channels_last and x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def _autocast(config: EngineConfig):
    if config.dtype != torch.bfloat16:
        return contextlib.nullcontext()
    return torch.autocast(config.device.type, dtype=config.dtype)


class _Forward:
    """Runs the model with a flat weight vector and a BatchNorm mode."""

    def __init__(self, model: nn.Module, arena: Arena, config: EngineConfig) -> None:
        self.model = model
        self.arena = arena
        self.config = config
        self.fixed = _fixed_tensors(model, arena, config.device, config.param_dtype)

    def __call__(self, flat_weights: torch.Tensor, x: torch.Tensor, bn: CleanStatsBatchNorm) -> torch.Tensor:
        tensors = dict(self.fixed)
        tensors.update(self.arena.views(flat_weights))
        with _autocast(self.config), bn:
            out = functional_call(self.model, tensors, (_layout(x, self.config),), strict=False)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the model must return a tensor, got {type(out).__name__}")
        return out.to(self.config.param_dtype)


def _pre_pass_stats(forward: _Forward, clean: torch.Tensor, key: DrawKey, input_shape: tuple[int, ...],
                    batch_size: int, micro_batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Exact clean-branch BatchNorm statistics of a whole draw, by micro-batches."""
    stats: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        while True:
            acc = StatsAccumulator()
            for start in range(0, batch_size, micro_batch):
                rows = range(start, min(start + micro_batch, batch_size))
                x = sample_inputs(key, input_shape, rows).to(forward.config.device, forward.config.param_dtype)
                try:
                    forward(clean, x, CleanStatsBatchNorm(stats, "accumulate", acc))
                except StopForward:
                    continue
                return stats  # the forward went through: no BatchNorm left to compute
            stats.append(acc.finish(forward.config.param_dtype))


def mask_gradient(
    model: nn.Module,
    arena: Arena,
    mask: torch.Tensor,
    input_shape: tuple[int, ...],
    *,
    batch_sizes: Sequence[int],
    epsilon: float,
    seed: int,
    round: int,
    config: EngineConfig,
    draw_ids: Sequence[int] | None = None,
    on_draw=None,
) -> torch.Tensor:
    """``G = sum over draws of dL_s/dm``: flat tensor (``config.param_dtype``) of length ``arena.numel`` on ``config.device``.

    Args:
        mask: flat bool tensor (True = unpruned) on ``config.device``.
        batch_sizes: inputs per draw, one entry per draw of the round.
        draw_ids: which draws of the round to compute (default all); the rest contribute nothing.
        on_draw: optional callable run after each draw (progress).
    """
    device = config.device
    forward = _Forward(model, arena, config)
    std = arena.std_vector()
    mask_cpu = mask.cpu()
    dtype = config.param_dtype
    mask_f = mask.to(dtype)
    grad = torch.zeros(arena.numel, dtype=dtype, device=device)
    ids = range(len(batch_sizes)) if draw_ids is None else draw_ids
    for draw in ids:
        key = DrawKey(seed, round, draw)
        batch_size = batch_sizes[draw]
        theta = sample_weights(arena, key, Stream.WEIGHTS, std, keep=mask_cpu).to(device, dtype)
        z = sample_weights(arena, key, Stream.PERTURBATION, None, keep=mask_cpu).to(device, dtype)
        w_clean = (mask_f * theta).requires_grad_(True)
        w_pert = (mask_f * theta.add(z, alpha=epsilon)).requires_grad_(True)
        micro = config.micro_batch or batch_size
        stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        if micro < batch_size:
            stats = _pre_pass_stats(forward, w_clean.detach(), key, input_shape, batch_size, micro)
        sum_grad = torch.zeros_like(grad)
        pert_grad = torch.zeros_like(grad)
        for start in range(0, batch_size, micro):
            x = sample_inputs(key, input_shape, range(start, min(start + micro, batch_size))).to(device, dtype)
            first = CleanStatsBatchNorm(stats, "record" if micro >= batch_size else "replay")
            out_clean = forward(w_clean, x, first)
            out_pert = forward(w_pert, x, CleanStatsBatchNorm(stats, "replay"))
            loss = (out_clean - out_pert).square().sum()
            g_clean, g_pert = torch.autograd.grad(loss, (w_clean, w_pert))
            sum_grad += g_clean
            sum_grad += g_pert
            pert_grad += g_pert
        grad.addcmul_(theta, sum_grad).addcmul_(z, pert_grad, value=epsilon)
        if on_draw is not None:
            on_draw()
    return grad


def check_input_shape(model: nn.Module, arena: Arena, input_shape: tuple[int, ...], config: EngineConfig) -> None:
    """Runs a two-input forward; raises ``ValueError`` naming ``input_shape`` if the model rejects it."""
    forward = _Forward(model, arena, config)
    weights = torch.zeros(arena.numel, device=config.device, dtype=config.param_dtype)
    x = torch.zeros(2, *input_shape, device=config.device, dtype=config.param_dtype)
    try:
        with torch.no_grad():
            forward(weights, x, CleanStatsBatchNorm([], "record"))
    except (RuntimeError, IndexError) as err:
        raise ValueError(
            f"input_shape {tuple(input_shape)} does not fit the model (a forward on a batch of shape "
            f"{tuple(x.shape)} failed: {str(err).splitlines()[0]})"
        ) from err
