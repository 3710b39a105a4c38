"""Backends of the engine: what differs between the PyTorch path and the Triton path.

The engine (``ntksap_fast.engine.engine``) is one; a backend lives as long as its scorer. Per round
(``begin_round(mask, round)``) and per group of draws (``set_draws(draws)``, which may write to the
device) the engine asks it for:

* ``sample()``: the staged draws' clean and perturbed flat weights ``(D, N)``;
* ``inputs(k, input_shape, rows)``: rows of the k-th staged draw's input batch;
* ``batch_stats(x)``: the clean branch's BatchNorm statistics in ``record`` mode;
* ``loss(out_clean, out_pert)``: ``sum((f_c - f_p)**2)``;
* ``accumulate(G, sampled, g_clean, g_pert, stats)``: ``G += sum_d c_d`` with
  ``c_d = theta_d*(g_c+g_p) + eps*z_d*g_p`` (and the split-half / sum-of-squares statistics).

``TorchBackend`` uses ``ntksap_fast.engine.draws``/``rng``/``batchnorm`` (CPU random numbers, moved to the
device); ``TritonBackend`` uses ``ntksap_fast.kernels`` (all draws' weights in one launch, inputs
generated on the device, one-pass float32 BatchNorm statistics, fused loss, and a mask-gradient
reduction that regenerates ``theta``/``z`` instead of storing them). Everything the Triton backend
does between ``set_draws`` calls reads its counters on the device and syncs nothing with the host
(``capturable``), so the engine can capture a whole draw in a CUDA graph.

Dispatch (``resolve_backend``): CUDA tensors use Triton, everything else PyTorch;
``NTKSAP_FAST_BACKEND=torch|triton`` forces a path. With ``TRITON_INTERPRET=1`` (set before triton
is imported) the Triton path runs on CPU tensors. float64 runs are for checking: the Triton
kernels are float32/bfloat16, so the default picks PyTorch for them.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..options import user_stacklevel
from .arena import Arena
from .batchnorm import batch_stats
from .draws import DrawKey, sample_inputs, sample_weights
from .rng import Stream

__all__ = [
    "ENV_VAR",
    "BACKENDS",
    "check_interpreter",
    "resolve_backend",
    "make_backend",
    "Sampled",
    "DrawStats",
    "Backend",
    "TorchBackend",
    "TritonBackend",
]

ENV_VAR = "NTKSAP_FAST_BACKEND"
BACKENDS = ("torch", "triton")
_warned_no_triton = False


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def check_interpreter() -> None:
    """``RuntimeError`` when Triton's interpreter cannot run the kernels here.

    The interpreter of triton 3.6 and older converts loop bounds with ``int(array)``, which NumPy 2.4
    refuses for one-element arrays ("only 0-dimensional arrays can be converted to Python
    scalars", triton-lang/triton#9171, fixed after 3.6); every kernel with a runtime loop fails.
    """
    import numpy
    import triton

    old_triton = tuple(int(p) for p in triton.__version__.split(".")[:2]) <= (3, 6)
    new_numpy = tuple(int(p) for p in numpy.__version__.split(".")[:2]) >= (2, 4)
    if old_triton and new_numpy:
        raise RuntimeError(
            f"Triton's interpreter in triton {triton.__version__} cannot run with NumPy {numpy.__version__} "
            "(triton-lang/triton#9171): install triton >= 3.7 or numpy < 2.4 to run the Triton "
            "kernels on CPU tensors"
        )


def resolve_backend(device: torch.device, dtype: torch.dtype) -> str:
    """``"torch"`` or ``"triton"`` for a run on ``device`` in ``dtype``, honouring ``NTKSAP_FAST_BACKEND``.

    Raises:
        ValueError: the variable holds something else, or forces triton for float64 or for CPU
            tensors without ``TRITON_INTERPRET=1``.
        ImportError: the variable forces triton and triton is not installed.
    """
    global _warned_no_triton
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced not in ("", *BACKENDS):
        raise ValueError(f"{ENV_VAR} must be 'torch' or 'triton' (or unset), got {os.environ[ENV_VAR]!r}")
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not _triton_installed():
            raise ImportError(f"{ENV_VAR}=triton but triton is not installed (pip install triton)")
        if dtype == torch.float64:
            raise ValueError(f"{ENV_VAR}=triton runs float32 or bfloat16, not float64; unset it for float64")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ValueError(f"{ENV_VAR}=triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
        if device.type == "cpu":
            check_interpreter()
        return "triton"
    if device.type != "cuda" or dtype == torch.float64:
        return "torch"
    if not _triton_installed():
        if not _warned_no_triton:
            warnings.warn(
                "triton is not installed: CUDA tensors use the PyTorch path (slower)",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
            _warned_no_triton = True
        return "torch"
    return "triton"


@dataclass
class Sampled:
    """One group of draws' weights.

    Attributes:
        draws: draw ids of the round, ``D`` of them.
        w_clean, w_pert: ``(D, N)`` flat weights (``m * theta`` and ``m * (theta + eps * z)``).
        noise: ``(theta, z)`` ``(D, N)`` kept for the reduction (torch backend), or None (triton
            regenerates them).
    """

    draws: list[int]
    w_clean: torch.Tensor
    w_pert: torch.Tensor
    noise: tuple[torch.Tensor, torch.Tensor] | None


class DrawStats(NamedTuple):
    """Per-entry accumulators beside ``G`` (flat ``(N,)``, ``G``'s dtype): the odd-numbered draws'
    share of ``G`` (split-half stability) and the sum of squared per-draw contributions."""

    odd: torch.Tensor
    sq: torch.Tensor


class Backend:
    """What the engine asks of a path; one per scorer.

    Args:
        arena: the model's arena; seed, epsilon: the prune's seed and perturbation; device, dtype:
        where and in which dtype (the engine's ``param_dtype``) weights, inputs and ``G`` live.
    """

    #: Whether everything between ``set_draws`` calls can be captured in a CUDA graph.
    capturable = False

    def __init__(self, arena: Arena, seed: int, epsilon: float, device: torch.device, dtype: torch.dtype) -> None:
        self.arena, self.seed, self.epsilon = arena, seed, epsilon
        self.device, self.dtype = device, dtype
        self.round = 0
        self.mask = torch.ones(arena.numel, dtype=torch.bool, device=device)
        self.draws: list[int] = []

    def begin_round(self, mask: torch.Tensor, round: int) -> None:
        """Sets the round counter and the flat bool ``(N,)`` mask (True = unpruned) on the device."""
        self.round = round
        self.mask = mask

    def set_draws(self, draws: Sequence[int]) -> None:
        """Stages the group of draws (ids of the round) the next calls work on."""
        self.draws = list(draws)

    def sample(self) -> Sampled:
        """Weights of the staged draws: ``(D, N)`` ``w_clean``/``w_pert`` on the device."""
        raise NotImplementedError

    def inputs(self, k: int, input_shape: tuple[int, ...], rows: range) -> torch.Tensor:
        """Rows ``rows`` of the k-th staged draw's inputs: ``(len(rows), *input_shape)`` on the device in ``dtype``."""
        raise NotImplementedError

    def batch_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(mean, unbiased var)`` ``(C,)`` of ``x`` ``(B, C, *spatial)``, no gradient."""
        raise NotImplementedError

    def loss(self, out_clean: torch.Tensor, out_pert: torch.Tensor) -> torch.Tensor:
        """Differentiable scalar ``sum((out_clean - out_pert)**2)``; never called inside vmap."""
        raise NotImplementedError

    def accumulate(
        self,
        grad: torch.Tensor,
        sampled: Sampled,
        g_clean: torch.Tensor,
        g_pert: torch.Tensor,
        stats: DrawStats | None = None,
    ) -> None:
        """``grad += sum_d theta_d*(g_c+g_p) + eps*z_d*g_p`` for ``(D, N)`` gradients ``g_clean``, ``g_pert``.

        ``grad``: flat ``(N,)`` in ``dtype``, updated in place (as are ``stats``); ``g_clean`` may be
        overwritten.
        """
        raise NotImplementedError


class TorchBackend(Backend):
    """The PyTorch path: random numbers from ``ntksap_fast.engine.rng`` on the CPU, float64 statistics."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.std = self.arena.std_vector()
        self.begin_round(self.mask, 0)

    def begin_round(self, mask: torch.Tensor, round: int) -> None:
        super().begin_round(mask, round)
        self.mask_cpu = mask.cpu()
        self.mask_f = mask.to(self.dtype)

    def set_draws(self, draws: Sequence[int]) -> None:
        super().set_draws(draws)
        self.odd_draws = torch.tensor([d % 2 for d in self.draws], dtype=self.dtype, device=self.device)

    def sample(self) -> Sampled:
        keys = [DrawKey(self.seed, self.round, d) for d in self.draws]
        theta = torch.stack([sample_weights(self.arena, k, Stream.WEIGHTS, self.std, keep=self.mask_cpu) for k in keys])
        z = torch.stack([sample_weights(self.arena, k, Stream.PERTURBATION, None, keep=self.mask_cpu) for k in keys])
        theta, z = theta.to(self.device, self.dtype), z.to(self.device, self.dtype)
        w_clean = self.mask_f * theta
        w_pert = self.mask_f * theta.add(z, alpha=self.epsilon)
        return Sampled(list(self.draws), w_clean, w_pert, (theta, z))

    def inputs(self, k: int, input_shape: tuple[int, ...], rows: range) -> torch.Tensor:
        key = DrawKey(self.seed, self.round, self.draws[k])
        return sample_inputs(key, input_shape, rows).to(self.device, self.dtype)

    def batch_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_stats(x)  # float64, rounded once

    def loss(self, out_clean: torch.Tensor, out_pert: torch.Tensor) -> torch.Tensor:
        return (out_clean - out_pert).square().sum()

    def accumulate(
        self,
        grad: torch.Tensor,
        sampled: Sampled,
        g_clean: torch.Tensor,
        g_pert: torch.Tensor,
        stats: DrawStats | None = None,
    ) -> None:
        theta, z = sampled.noise  # type: ignore[misc]
        sum_grad = g_clean.add_(g_pert)
        if stats is None:
            grad += (theta * sum_grad).sum(0)
            grad += (z * g_pert).sum(0).mul_(self.epsilon)
            return
        # The draws' parities as a tensor, not Python ints: a compiled step (engine.compiled) reads
        # tensors only, so it serves every draw without recompiling.
        c = theta * sum_grad + (z * g_pert).mul_(self.epsilon)
        grad += c.sum(0)
        stats.sq.add_(c.square().sum(0))
        stats.odd.add_((c * self.odd_draws[:, None]).sum(0))


class TritonBackend(Backend):
    """The Triton path (``ntksap_fast.kernels``); float32 weights, inputs and ``G``; capturable."""

    capturable = True

    def __init__(self, *args, max_group: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)  # dtype: float32 (resolve_backend keeps float64 on PyTorch)
        from ..kernels import fd_loss, ops, philox, sample_draw

        if self.device.type == "cpu" and philox.use_libdevice():
            raise ValueError(
                "triton was imported before TRITON_INTERPRET=1 was set: its kernels cannot run on "
                "CPU tensors; set TRITON_INTERPRET=1 before importing triton"
            )
        self._ops, self._fd_loss = ops, fd_loss
        self._philox, self._sample_draw = philox, sample_draw
        self.table = sample_draw.StdTable.from_arena(self.arena, self.device)
        # Counters on the device: (seed lo, seed hi, round) and the staged draw ids.
        self.key = philox.round_key(self.seed, 0, self.device)
        self.draw_buffer = torch.zeros(max(1, max_group), dtype=torch.int64, device=self.device)

    def begin_round(self, mask: torch.Tensor, round: int) -> None:
        super().begin_round(mask.contiguous(), round)
        self.key.copy_(self._philox.round_key(self.seed, round, "cpu"))

    def set_draws(self, draws: Sequence[int]) -> None:
        super().set_draws(draws)
        if len(self.draws) > self.draw_buffer.numel():
            self.draw_buffer = torch.zeros(len(self.draws), dtype=torch.int64, device=self.device)
        self.draw_buffer[: len(self.draws)].copy_(self._philox.draw_ids(self.draws, "cpu"))

    def sample(self) -> Sampled:
        d, n = len(self.draws), self.arena.numel
        w_clean = torch.empty(d, n, dtype=self.dtype, device=self.device)
        w_pert = torch.empty_like(w_clean)
        self._sample_draw.sample_draws_into(
            w_clean, w_pert, self.table, self.key, self.draw_buffer[:d], self.epsilon, self.mask
        )
        return Sampled(list(self.draws), w_clean, w_pert, None)

    def inputs(self, k: int, input_shape: tuple[int, ...], rows: range) -> torch.Tensor:
        per_row = math.prod(input_shape)
        x = torch.empty(len(rows) * per_row, dtype=torch.float32, device=self.device)
        self._philox.normal_into(x, self.key, self.draw_buffer[k : k + 1], Stream.INPUTS, rows.start * per_row)
        return x.view(len(rows), *input_shape)

    def batch_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Inside vmap over draws x is a BatchedTensor, which a Triton launch cannot take: the
        # PyTorch statistics (float64, rounded once: the same numbers to ~1 ulp) run there instead.
        if torch._C._functorch.is_batchedtensor(x):
            return batch_stats(x)
        return self._ops.clean_stats(x)

    def loss(self, out_clean: torch.Tensor, out_pert: torch.Tensor) -> torch.Tensor:
        # The custom autograd.Function has no vmap rule: the engine calls this outside vmap.
        return self._fd_loss.fd_loss(out_clean, out_pert)

    def accumulate(
        self,
        grad: torch.Tensor,
        sampled: Sampled,
        g_clean: torch.Tensor,
        g_pert: torch.Tensor,
        stats: DrawStats | None = None,
    ) -> None:
        d, table = g_clean.shape[0], self.table
        args = (
            grad,
            g_clean.contiguous(),
            g_pert.contiguous(),
            table.offsets,
            table.std,
            self.key,
            self.draw_buffer[:d],
            self.epsilon,
            table.steps,
            self.mask,
        )
        if stats is None:
            self._ops.mask_grad(*args)
        else:
            self._ops.mask_grad_stats(*args, stats.odd, stats.sq)


def make_backend(
    name: str, arena: Arena, seed: int, epsilon: float, device: torch.device, dtype: torch.dtype, max_group: int = 1
) -> Backend:
    """The backend called ``name`` (``resolve_backend``'s answer) for a scorer."""
    if name == "triton":
        return TritonBackend(arena, seed, epsilon, device, dtype, max_group=max_group)
    return TorchBackend(arena, seed, epsilon, device, dtype)
