"""Mask-gradient reduction over draws and branches, one launch for every tensor.

With ``g_c = dL/dw_clean`` and ``g_p = dL/dw_pert`` of draw ``d`` (flat, arena order)::

    G += sum_d  theta_d * (g_c[d] + g_p[d]) + eps * z_d * g_p[d]

(``dL/dm = theta * g_c + (theta + eps*z) * g_p``, ``ntksap_fast.engine``). ``mask_grad_accumulate``
regenerates ``theta_d``/``z_d`` from the counters in-kernel (no stored noise: 2 reads per draw per
element instead of 4); ``mask_grad_accumulate_stored`` reads stored ones. The draws are summed in
order in float32 registers, in the engine's order per draw (``+ theta*(g_c+g_p)`` then
``+ (eps*z)*g_p``), so the result equals the twin to float32 rounding (a few ulps of the largest
term, plus the normals' ``NORMAL_TOL`` when regenerating).

With ``mask`` given, entries whose mask is 0 get no contribution: this equals the engine's sparse
sampling (theta = z = 0 where pruned); without it, the engine's dense sampling. Scores are
``|G| * mask`` either way.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ntksap_fast.rng import Stream, _check_counters, normal

from .philox import _COUNTER_ARGS, block_normals, interleave4, use_libdevice
from .sample_draw import StdTable, _check_mask, draw_tensor, lookup_std

__all__ = ["mask_grad_accumulate", "mask_grad_accumulate_stored", "mask_grad_reference"]

_MASK32 = 0xFFFFFFFF


@triton.jit(do_not_specialize=_COUNTER_ARGS)
def _mask_grad_kernel(G_ptr, gc_ptr, gp_ptr, mask_ptr, offsets_ptr, std_ptr, draws_ptr, D, N, T,
                      seed_lo, seed_hi, round_, eps,
                      HAS_MASK: tl.constexpr, STEPS: tl.constexpr, BLOCK: tl.constexpr,
                      PRECISE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    block = pid * BLOCK + tl.arange(0, BLOCK)
    elem = pid * (4 * BLOCK) + tl.arange(0, 4 * BLOCK)
    ok = elem < N
    std = lookup_std(tl.minimum(elem, N - 1), offsets_ptr, std_ptr, T, STEPS)
    if HAS_MASK:
        std = std * tl.load(mask_ptr + elem, mask=ok, other=0).to(tl.float32)
    acc = tl.load(G_ptr + elem, mask=ok, other=0.0)
    gc_row = gc_ptr + elem  # pointers advance by one row (N elements) per draw
    gp_row = gp_ptr + elem
    for d in range(D):
        draw = tl.load(draws_ptr + d)
        w0, w1, w2, w3 = block_normals(block, seed_lo, seed_hi, round_, draw * 4 + 0, PRECISE)
        p0, p1, p2, p3 = block_normals(block, seed_lo, seed_hi, round_, draw * 4 + 1, PRECISE)
        theta = std * interleave4(w0, w1, w2, w3)
        z = interleave4(p0, p1, p2, p3)
        if HAS_MASK:
            z = tl.where(std != 0.0, z, 0.0)  # mask 0 -> theta = z = 0 (sparse sampling)
        g_c = tl.load(gc_row, mask=ok, other=0.0).to(tl.float32)
        g_p = tl.load(gp_row, mask=ok, other=0.0).to(tl.float32)
        gc_row += N
        gp_row += N
        acc = acc + theta * (g_c + g_p)
        acc = acc + (eps * z) * g_p
    tl.store(G_ptr + elem, acc, mask=ok)


@triton.jit
def _mask_grad_stored_kernel(G_ptr, gc_ptr, gp_ptr, theta_ptr, z_ptr, D, N, eps, BLOCK: tl.constexpr):
    elem = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = elem < N
    acc = tl.load(G_ptr + elem, mask=ok, other=0.0)
    gc_row = gc_ptr + elem  # pointers advance by one row (N elements) per draw
    gp_row = gp_ptr + elem
    theta_row = theta_ptr + elem
    z_row = z_ptr + elem
    for _ in range(D):
        g_c = tl.load(gc_row, mask=ok, other=0.0).to(tl.float32)
        g_p = tl.load(gp_row, mask=ok, other=0.0).to(tl.float32)
        theta = tl.load(theta_row, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(z_row, mask=ok, other=0.0).to(tl.float32)
        gc_row += N
        gp_row += N
        theta_row += N
        z_row += N
        acc = acc + theta * (g_c + g_p)
        acc = acc + (eps * z) * g_p
    tl.store(G_ptr + elem, acc, mask=ok)


def _check_grads(G: torch.Tensor, *rows: torch.Tensor) -> int:
    if G.dtype != torch.float32 or G.dim() != 1 or not G.is_contiguous():
        raise ValueError("G must be a contiguous flat float32 tensor")
    d = rows[0].shape[0] if rows[0].dim() == 2 else -1
    for name, t in zip(("g_clean", "g_pert", "theta", "z"), rows):
        if t.dim() != 2 or t.shape != (d, G.numel()) or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous (D, N) tensor with N = {G.numel()}, got {tuple(t.shape)}")
        if t.device != G.device:
            raise ValueError(f"{name} is on {t.device}, G on {G.device}")
    return d


def mask_grad_accumulate(G: torch.Tensor, g_clean: torch.Tensor, g_pert: torch.Tensor, table: StdTable,
                         seed: int, round: int, draws: Sequence[int] | torch.Tensor, eps: float,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """``G += sum_d theta_d*(g_c+g_p) + eps*z_d*g_p`` with theta/z regenerated; returns ``G``.

    Args:
        G: flat float32 ``(N,)`` accumulator, updated in place.
        g_clean, g_pert: ``(D, N)`` float32 or bf16 gradients w.r.t. the clean/perturbed weights.
        table, seed, round, draws, eps: as for ``sample_draw.sample_draws`` (same draws, same order).
        mask: optional flat ``(N,)`` bool/float mask; zero entries get no contribution.
    """
    d = _check_grads(G, g_clean, g_pert)
    draw_ids = draw_tensor(draws, G.device)
    if draw_ids.numel() != d:
        raise ValueError(f"draws has {draw_ids.numel()} ids, the gradients {d} rows")
    if table.numel != G.numel():
        raise ValueError(f"table covers {table.numel} elements, G has {G.numel()}")
    _check_counters(seed, round, 0)
    mask = _check_mask(mask, G.numel(), G.device)
    if G.numel() and d:
        block = 256
        _mask_grad_kernel[(triton.cdiv(G.numel(), 4 * block),)](
            G, g_clean, g_pert, mask if mask is not None else G, table.offsets, table.std, draw_ids, d,
            G.numel(), table.std.numel(), seed & _MASK32, seed >> 32, round, float(eps),
            HAS_MASK=mask is not None, STEPS=table.steps, BLOCK=block, PRECISE=use_libdevice())
    return G


def mask_grad_accumulate_stored(G: torch.Tensor, g_clean: torch.Tensor, g_pert: torch.Tensor,
                                theta: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
    """Same as ``mask_grad_accumulate`` from stored ``(D, N)`` float32/bf16 ``theta``, ``z``; returns ``G``."""
    d = _check_grads(G, g_clean, g_pert, theta, z)
    if G.numel() and d:
        block = 1024
        _mask_grad_stored_kernel[(triton.cdiv(G.numel(), block),)](
            G, g_clean, g_pert, theta, z, d, G.numel(), float(eps), BLOCK=block)
    return G


def mask_grad_reference(G: torch.Tensor, g_clean: torch.Tensor, g_pert: torch.Tensor, table: StdTable,
                        seed: int, round: int, draws: Sequence[int] | torch.Tensor, eps: float,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch twin of ``mask_grad_accumulate`` (the engine's per-draw ``addcmul_`` pair); in place."""
    std = table.vector().to(G.device)
    m = None if mask is None else mask.to(G.device, torch.float32)
    for i, draw in enumerate(draw_tensor(draws, "cpu").tolist()):
        theta = normal(seed, round, draw, Stream.WEIGHTS, table.numel).to(G.device) * std
        z = normal(seed, round, draw, Stream.PERTURBATION, table.numel).to(G.device)
        if m is not None:
            theta, z = theta * m, z * m
        g_c, g_p = g_clean[i].float(), g_pert[i].float()
        G.addcmul_(theta, g_c + g_p).addcmul_(z, g_p, value=eps)
    return G
