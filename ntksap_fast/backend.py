"""Backends of the engine: what differs between the PyTorch path and the Triton path.

The engine (``ntksap_fast.engine``) is one; per round it asks a backend for five things:

* ``sample(draws)``: the draws' clean and perturbed flat weights ``(D, N)``;
* ``inputs(key, input_shape, rows)``: rows of one draw's input batch;
* ``batch_stats(x)``: the clean branch's BatchNorm statistics in ``record`` mode;
* ``loss(out_clean, out_pert)``: ``sum((f_c - f_p)**2)``;
* ``accumulate(G, sampled, g_clean, g_pert)``: ``G += sum_d theta_d*(g_c+g_p) + eps*z_d*g_p``.

``TorchBackend`` uses ``ntksap_fast.draws``/``rng``/``batchnorm`` (CPU random numbers, moved to the
device); ``TritonBackend`` uses ``ntksap_fast.kernels`` (all draws' weights in one launch, inputs
generated on the device, one-pass float32 BatchNorm statistics, fused loss, and a mask-gradient
reduction that regenerates ``theta``/``z`` instead of storing them).

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
from dataclasses import dataclass
from typing import Sequence

import torch

from .arena import Arena
from .batchnorm import batch_stats
from .draws import DrawKey, sample_inputs, sample_weights
from .rng import Stream

__all__ = ["ENV_VAR", "BACKENDS", "resolve_backend", "make_backend", "Sampled", "Backend", "TorchBackend",
           "TritonBackend"]

ENV_VAR = "NTKSAP_FAST_BACKEND"
BACKENDS = ("torch", "triton")
_warned_no_triton = False


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


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
        return "triton"
    if device.type != "cuda" or dtype == torch.float64:
        return "torch"
    if not _triton_installed():
        if not _warned_no_triton:
            warnings.warn("triton is not installed: CUDA tensors use the PyTorch path (slower)", RuntimeWarning,
                          stacklevel=2)
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


class Backend:
    """What the engine asks of a path, for one round.

    Args:
        arena: the model's arena; mask: flat bool ``(N,)`` (True = unpruned) on ``device``;
        seed, round, epsilon: the round's counters and perturbation; device, dtype: where and in
        which dtype (the engine's ``param_dtype``) weights, inputs and ``G`` live.
    """

    name = ""

    def __init__(self, arena: Arena, mask: torch.Tensor, seed: int, round: int, epsilon: float,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.arena, self.seed, self.round, self.epsilon = arena, seed, round, epsilon
        self.device, self.dtype = device, dtype
        self.mask = mask

    def sample(self, draws: Sequence[int]) -> Sampled:
        """Weights of ``draws`` (ids of the round): ``(D, N)`` ``w_clean``/``w_pert`` on the device."""
        raise NotImplementedError

    def inputs(self, key: DrawKey, input_shape: tuple[int, ...], rows: range) -> torch.Tensor:
        """Rows ``rows`` of draw ``key``'s inputs: ``(len(rows), *input_shape)`` on the device in ``dtype``."""
        raise NotImplementedError

    def batch_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(mean, unbiased var)`` ``(C,)`` of ``x`` ``(B, C, *spatial)``, no gradient."""
        raise NotImplementedError

    def loss(self, out_clean: torch.Tensor, out_pert: torch.Tensor) -> torch.Tensor:
        """Differentiable scalar ``sum((out_clean - out_pert)**2)``; never called inside vmap."""
        raise NotImplementedError

    def accumulate(self, grad: torch.Tensor, sampled: Sampled, g_clean: torch.Tensor, g_pert: torch.Tensor) -> None:
        """``grad += sum_d theta_d*(g_c+g_p) + eps*z_d*g_p`` for ``(D, N)`` gradients ``g_clean``, ``g_pert``.

        ``grad``: flat ``(N,)`` in ``dtype``, updated in place; ``g_clean`` may be overwritten.
        """
        raise NotImplementedError


class TorchBackend(Backend):
    """The PyTorch path: random numbers from ``ntksap_fast.rng`` on the CPU, float64 statistics."""

    name = "torch"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.std = self.arena.std_vector()
        self.mask_cpu = self.mask.cpu()
        self.mask_f = self.mask.to(self.dtype)

    def sample(self, draws: Sequence[int]) -> Sampled:
        keys = [DrawKey(self.seed, self.round, d) for d in draws]
        theta = torch.stack([sample_weights(self.arena, k, Stream.WEIGHTS, self.std, keep=self.mask_cpu) for k in keys])
        z = torch.stack([sample_weights(self.arena, k, Stream.PERTURBATION, None, keep=self.mask_cpu) for k in keys])
        theta, z = theta.to(self.device, self.dtype), z.to(self.device, self.dtype)
        w_clean = self.mask_f * theta
        w_pert = self.mask_f * theta.add(z, alpha=self.epsilon)
        return Sampled(list(draws), w_clean, w_pert, (theta, z))

    def inputs(self, key: DrawKey, input_shape: tuple[int, ...], rows: range) -> torch.Tensor:
        return sample_inputs(key, input_shape, rows).to(self.device, self.dtype)

    def batch_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_stats(x)  # float64, rounded once

    def loss(self, out_clean: torch.Tensor, out_pert: torch.Tensor) -> torch.Tensor:
        return (out_clean - out_pert).square().sum()

    def accumulate(self, grad: torch.Tensor, sampled: Sampled, g_clean: torch.Tensor, g_pert: torch.Tensor) -> None:
        theta, z = sampled.noise  # type: ignore[misc]
        sum_grad = g_clean.add_(g_pert)
        grad += (theta * sum_grad).sum(0)
        grad += (z * g_pert).sum(0).mul_(self.epsilon)


class TritonBackend(Backend):
    """The Triton path (``ntksap_fast.kernels``); float32 weights, inputs and ``G``."""

    name = "triton"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.dtype != torch.float32:
            raise ValueError(f"the Triton path computes in float32, got {self.dtype}")
        from .kernels import dual_batchnorm, fd_loss, mask_grad, philox, sample_draw

        if self.device.type == "cpu" and philox.use_libdevice():
            raise ValueError("triton was imported before TRITON_INTERPRET=1 was set: its kernels cannot run on "
                             "CPU tensors; set TRITON_INTERPRET=1 before importing triton")
        self._dbn, self._fdl, self._mg, self._philox, self._sd = dual_batchnorm, fd_loss, mask_grad, philox, sample_draw
        self.table = sample_draw.StdTable.from_arena(self.arena, self.device)
        self.mask = self.mask.to(self.device).contiguous()

    def sample(self, draws: Sequence[int]) -> Sampled:
        w_clean, w_pert = self._sd.sample_draws(self.table, self.seed, self.round, list(draws), self.epsilon,
                                                self.mask)
        return Sampled(list(draws), w_clean, w_pert, None)

    def inputs(self, key: DrawKey, input_shape: tuple[int, ...], rows: range) -> torch.Tensor:
        per_row = math.prod(input_shape)
        x = self._philox.normal(key.seed, key.round, key.draw, Stream.INPUTS, len(rows) * per_row,
                                offset=rows.start * per_row, device=self.device)
        return x.view(len(rows), *input_shape)

    def batch_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Inside vmap over draws x is a BatchedTensor, which a Triton launch cannot take: the
        # PyTorch statistics (float64, rounded once: the same numbers to ~1 ulp) run there instead.
        if torch._C._functorch.is_batchedtensor(x):
            return batch_stats(x)
        mean, var = self._dbn.clean_stats(x)
        return mean[0], var[0]

    def loss(self, out_clean: torch.Tensor, out_pert: torch.Tensor) -> torch.Tensor:
        # The custom autograd.Function has no vmap rule: the engine calls this outside vmap.
        return self._fdl.fd_loss(out_clean.reshape(-1), out_pert.reshape(-1)).sum()

    def accumulate(self, grad: torch.Tensor, sampled: Sampled, g_clean: torch.Tensor, g_pert: torch.Tensor) -> None:
        self._mg.mask_grad_accumulate(grad, g_clean.contiguous(), g_pert.contiguous(), self.table, self.seed,
                                      self.round, sampled.draws, self.epsilon, self.mask)


def make_backend(name: str, arena: Arena, mask: torch.Tensor, seed: int, round: int, epsilon: float,
                 device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend called ``name`` (``resolve_backend``'s answer) for one round."""
    cls = {"torch": TorchBackend, "triton": TritonBackend}[name]
    return cls(arena, mask, seed, round, epsilon, device, dtype)
