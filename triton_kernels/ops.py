"""The Triton kernels the engine's draw step calls, as PyTorch operators (``torch.library.triton_op``).

``torch.compile`` traces into a ``triton_op`` (its kernels are launched through ``wrap_triton``), so
the compiled draw step (``ntksap_fast.engine.compiled``) holds them as kernels of its graph, not
as graph breaks; eagerly they run as before. Under ``TRITON_INTERPRET=1`` (CPU tensors) the
kernels cannot run on the tracer's tensors, so the same operators are opaque
(``torch.library.custom_op``): the graph holds the operator and runs it as it is. Flat arguments
(tensors, floats, ints) because an operator's schema takes no dataclasses:

* ``ntksap_fast_kernels::clean_stats(x) -> (mean, var)``: ``batch_stats.clean_stats``.
* ``ntksap_fast_kernels::mask_grad(G, g_clean, g_pert, offsets, std, key, draws, eps, steps, mask)``
  and ``mask_grad_stats(..., odd, sq)``: ``mask_grad.mask_grad_accumulate_into`` without and with
  the stability sums (mutating ``G``, and ``odd``/``sq``).
"""

from __future__ import annotations

import torch
from torch.library import custom_op, triton_op

from .batch_stats import clean_stats as _clean_stats
from .mask_grad import mask_grad_accumulate_into
from .philox import use_libdevice
from .sample_draw import StdTable

__all__ = ["clean_stats", "mask_grad", "mask_grad_stats"]

_operator = triton_op if use_libdevice() else custom_op


@_operator("ntksap_fast_kernels::clean_stats", mutates_args=())
def clean_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased variance of ``x`` ``(B, C, *spatial)``: two float32 ``(C,)``."""
    return _clean_stats(x)


@_operator("ntksap_fast_kernels::mask_grad", mutates_args={"G"})
def mask_grad(
    G: torch.Tensor,
    g_clean: torch.Tensor,
    g_pert: torch.Tensor,
    offsets: torch.Tensor,
    std: torch.Tensor,
    key: torch.Tensor,
    draws: torch.Tensor,
    eps: float,
    steps: int,
    mask: torch.Tensor,
) -> None:
    """``G += sum_d c_d`` (``mask_grad.mask_grad_accumulate_into``; ``mask`` the flat ``(N,)`` mask)."""
    mask_grad_accumulate_into(G, g_clean, g_pert, StdTable(offsets, std, G.numel(), steps), key, draws, eps, mask)


@_operator("ntksap_fast_kernels::mask_grad_stats", mutates_args={"G", "odd", "sq"})
def mask_grad_stats(
    G: torch.Tensor,
    g_clean: torch.Tensor,
    g_pert: torch.Tensor,
    offsets: torch.Tensor,
    std: torch.Tensor,
    key: torch.Tensor,
    draws: torch.Tensor,
    eps: float,
    steps: int,
    mask: torch.Tensor,
    odd: torch.Tensor,
    sq: torch.Tensor,
) -> None:
    """``mask_grad`` that also adds the odd-numbered draws' share to ``odd`` and the squares to ``sq``."""
    mask_grad_accumulate_into(
        G, g_clean, g_pert, StdTable(offsets, std, G.numel(), steps), key, draws, eps, mask, (odd, sq)
    )


# Shapes of the outputs, for tracing. A triton_op derives them by running its function with the
# kernel launches left out; under TRITON_INTERPRET=1 the launches run on the fake tensors instead.
@clean_stats.register_fake
def _clean_stats_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape[1], dtype=torch.float32), x.new_empty(x.shape[1], dtype=torch.float32)


@mask_grad.register_fake
def _mask_grad_fake(G, g_clean, g_pert, offsets, std, key, draws, eps, steps, mask) -> None:
    return None


@mask_grad_stats.register_fake
def _mask_grad_stats_fake(G, g_clean, g_pert, offsets, std, key, draws, eps, steps, mask, odd, sq) -> None:
    return None
