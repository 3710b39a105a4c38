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

What differs between the PyTorch path and the Triton path (sampling the weights and the inputs,
the recorded BatchNorm statistics, the loss, the reduction into ``G``) sits behind a backend
(``ntksap_fast.backend``) chosen once per call from the device and ``NTKSAP_FAST_BACKEND``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .arena import Arena
from .backend import Backend, make_backend, resolve_backend
from .batchnorm import CleanStatsBatchNorm, StatsAccumulator, StopForward
from .draws import DrawKey

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
        draw_batch: whole draws run together through ``torch.func.vmap`` (convolutions become
            grouped ones); 1 runs them in sequence. Ignored (1) when micro-batching.
        backend: ``"torch"`` or ``"triton"`` (``ntksap_fast.backend``); None = chosen by
            ``resolve_backend`` from the device, dtype and ``NTKSAP_FAST_BACKEND`` at each call.
    """

    device: torch.device
    dtype: torch.dtype = torch.float32
    micro_batch: int | None = None
    channels_last: bool = True
    draw_batch: int = 1
    backend: str | None = None

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
    """Channels-last copy of a 4-D/5-D input when configured (done before vmap for batched draws)."""
    if torch._C._functorch.is_batchedtensor(x):
        return x
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

    def __call__(self, weights: dict[str, torch.Tensor], x: torch.Tensor, bn: CleanStatsBatchNorm) -> torch.Tensor:
        """Model output (``param_dtype``) for per-tensor ``weights`` and input batch ``x``."""
        tensors = dict(self.fixed)
        tensors.update(weights)
        with _autocast(self.config), bn:
            out = functional_call(self.model, tensors, (_layout(x, self.config),), strict=False)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the model must return a tensor, got {type(out).__name__}")
        return out.to(self.config.param_dtype)


def _leaves(arena: Arena, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-tensor views of ``flat`` as separate autograd leaves.

    One leaf per tensor, not views of one flat leaf: the backward of a view scatters into a zero
    tensor of the whole arena, which costs O(layers x N) (seconds on ResNet-50).
    """
    return {n: v.detach().requires_grad_(True) for n, v in arena.views(flat).items()}


def _pre_pass_stats(forward: _Forward, backend: Backend, clean: dict[str, torch.Tensor], key: DrawKey,
                    input_shape: tuple[int, ...], batch_size: int,
                    micro_batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Exact clean-branch BatchNorm statistics of a whole draw, by micro-batches."""
    stats: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        while True:
            acc = StatsAccumulator()
            for start in range(0, batch_size, micro_batch):
                rows = range(start, min(start + micro_batch, batch_size))
                x = backend.inputs(key, input_shape, rows)
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
    device, dtype = config.device, config.param_dtype
    name = config.backend or resolve_backend(device, config.dtype)
    backend = make_backend(name, arena, mask, seed, round, epsilon, device, dtype)
    forward = _Forward(model, arena, config)
    grad = torch.zeros(arena.numel, dtype=dtype, device=device)
    ids = list(range(len(batch_sizes)) if draw_ids is None else draw_ids)
    group_size = 1 if config.micro_batch else config.draw_batch
    for group in _groups(ids, batch_sizes, group_size):
        keys = [DrawKey(seed, round, draw) for draw in group]
        sampled = backend.sample(group)
        batch_size = batch_sizes[group[0]]
        if len(group) == 1:
            g_clean, g_pert = _one_draw(forward, backend, sampled.w_clean[0], sampled.w_pert[0], keys[0],
                                        input_shape, batch_size)
            g_clean, g_pert = g_clean.unsqueeze(0), g_pert.unsqueeze(0)
        else:
            x = torch.stack([backend.inputs(k, input_shape, range(batch_size)) for k in keys])
            g_clean, g_pert = _batched_draws(forward, backend, sampled.w_clean, sampled.w_pert, x)
        backend.accumulate(grad, sampled, g_clean, g_pert)
        if on_draw is not None:
            for _ in group:
                on_draw()
    return grad


def _groups(ids: list[int], batch_sizes: Sequence[int], size: int) -> list[list[int]]:
    """Consecutive draws with equal batch sizes, at most ``size`` per group."""
    groups: list[list[int]] = []
    for draw in ids:
        last = groups[-1] if groups else None
        if last and len(last) < size and batch_sizes[last[0]] == batch_sizes[draw]:
            last.append(draw)
        else:
            groups.append([draw])
    return groups


def _one_draw(forward: _Forward, backend: Backend, w_clean: torch.Tensor, w_pert: torch.Tensor, key: DrawKey,
              input_shape: tuple[int, ...], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g_c, g_p)`` of one draw, flat ``(N,)``, micro-batched when ``micro_batch < batch_size``."""
    arena, config = forward.arena, forward.config
    clean, pert = _leaves(arena, w_clean), _leaves(arena, w_pert)
    micro = config.micro_batch or batch_size
    stats: list[tuple[torch.Tensor, torch.Tensor]] = []
    if micro < batch_size:
        stats = _pre_pass_stats(forward, backend, clean, key, input_shape, batch_size, micro)
    g_clean = torch.zeros_like(w_clean)
    g_pert = torch.zeros_like(w_clean)
    clean_views = list(arena.views(g_clean).values())
    pert_views = list(arena.views(g_pert).values())
    for start in range(0, batch_size, micro):
        rows = range(start, min(start + micro, batch_size))
        x = backend.inputs(key, input_shape, rows)
        mode = "record" if micro >= batch_size else "replay"
        out_clean = forward(clean, x, CleanStatsBatchNorm(stats, mode, stats_fn=backend.batch_stats))
        out_pert = forward(pert, x, CleanStatsBatchNorm(stats, "replay"))
        loss = backend.loss(out_clean, out_pert)
        grads = torch.autograd.grad(loss, [*clean.values(), *pert.values()])
        torch._foreach_add_(clean_views, grads[: len(arena)])
        torch._foreach_add_(pert_views, grads[len(arena) :])
    return g_clean, g_pert


def _batched_draws(forward: _Forward, backend: Backend, w_clean: torch.Tensor, w_pert: torch.Tensor,
                   x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g_c, g_p)`` of ``k`` whole draws at once (``torch.func.vmap`` over draws).

    Inside vmap the backend's statistics see batched tensors (the Triton backend falls back to
    PyTorch ops there); the loss of all ``k`` draws is taken outside vmap.

    Args:
        w_clean, w_pert: ``(k, N)`` weights; x: ``(k, batch, *input_shape)`` inputs.
    Returns:
        two ``(k, N)`` tensors.
    """
    arena = forward.arena
    clean, pert = _leaves(arena, w_clean), _leaves(arena, w_pert)
    if forward.config.channels_last and x.dim() in (5, 6):  # each draw's batch channels-last
        order = (0, 1, *range(3, x.dim()), 2)
        x = x.permute(order).contiguous().permute(0, 1, x.dim() - 1, *range(2, x.dim() - 1))

    def draw_outputs(clean_w: dict[str, torch.Tensor], pert_w: dict[str, torch.Tensor],
                     xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        out_clean = forward(clean_w, xs, CleanStatsBatchNorm(stats, "record", stats_fn=backend.batch_stats))
        out_pert = forward(pert_w, xs, CleanStatsBatchNorm(stats, "replay"))
        return out_clean, out_pert

    loss = backend.loss(*torch.func.vmap(draw_outputs)(clean, pert, x))
    grads = torch.autograd.grad(loss, [*clean.values(), *pert.values()])
    g_clean = torch.empty_like(w_clean)
    g_pert = torch.empty_like(w_clean)
    for view, g in zip([*arena.views(g_clean).values(), *arena.views(g_pert).values()], grads):
        view.copy_(g)
    return g_clean, g_pert


def check_input_shape(model: nn.Module, arena: Arena, input_shape: tuple[int, ...], config: EngineConfig) -> None:
    """Runs a two-input forward; raises ``ValueError`` naming ``input_shape`` if the model rejects it."""
    forward = _Forward(model, arena, config)
    weights = arena.views(torch.zeros(arena.numel, device=config.device, dtype=config.param_dtype))
    x = torch.zeros(2, *input_shape, device=config.device, dtype=config.param_dtype)
    try:
        with torch.no_grad():
            forward(weights, x, CleanStatsBatchNorm([], "record"))
    except (RuntimeError, IndexError) as err:
        raise ValueError(
            f"input_shape {tuple(input_shape)} does not fit the model (a forward on a batch of shape "
            f"{tuple(x.shape)} failed: {str(err).splitlines()[0]})"
        ) from err


def default_micro_batch(free_bytes: int, bytes_per_input: float, batch_size: int,
                        headroom: float = 0.7) -> int | None:
    """Most inputs per forward that fit in ``headroom * free_bytes``; None when a whole draw fits."""
    if bytes_per_input <= 0:
        return None
    fit = int(headroom * free_bytes // bytes_per_input)
    return None if fit >= batch_size else max(1, fit)


def cuda_bytes_per_input(model: nn.Module, arena: Arena, input_shape: tuple[int, ...],
                         config: EngineConfig) -> float:
    """Device memory one more input adds to a draw (both branches, forward and backward), in bytes.

    Measured on the CUDA device as the slope of the peak allocation between draws of 2 and 4
    inputs, so the weights and their gradients, which do not grow with the inputs, drop out.
    """
    forward = _Forward(model, arena, config)
    peaks = []
    for n in (2, 4):
        torch.cuda.synchronize(config.device)
        torch.cuda.reset_peak_memory_stats(config.device)
        before = torch.cuda.memory_allocated(config.device)
        weights = _leaves(arena, torch.zeros(arena.numel, device=config.device, dtype=config.param_dtype))
        x = torch.zeros(n, *input_shape, device=config.device, dtype=config.param_dtype)
        stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        out_clean = forward(weights, x, CleanStatsBatchNorm(stats, "record"))
        out_pert = forward(weights, x, CleanStatsBatchNorm(stats, "replay"))
        torch.autograd.grad((out_clean - out_pert).square().sum(), list(weights.values()))
        torch.cuda.synchronize(config.device)
        peaks.append(torch.cuda.max_memory_allocated(config.device) - before)
    return max(peaks[1] - peaks[0], 0) / 2
