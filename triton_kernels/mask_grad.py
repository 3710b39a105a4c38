"""Mask-gradient reduction over draws and branches, one launch for every tensor.

With ``g_c = dL/dw_clean`` and ``g_p = dL/dw_pert`` of draw ``d`` (flat, arena order), the draw's
contribution to the mask gradient is ``c_d = theta_d * (g_c[d] + g_p[d]) + eps * z_d * g_p[d]``
(``dL/dm = theta * g_c + (theta + eps*z) * g_p``, ``ntksap_fast.engine.engine``), and

    G += sum_d c_d;   with statistics also  odd += sum_{d odd} c_d,  sq += sum_d c_d**2

(``odd``: the odd-numbered draws' share, for the split-half stability figure; ``sq``: for the
standard error of ``G``). ``theta_d``/``z_d`` are regenerated from the counters in-kernel (no stored
noise: 2 reads per draw per element instead of 4); seed, round and draw ids are read on the device.
The draws are summed in order in float32 registers, in the engine's order per draw
(``+ theta*(g_c+g_p)`` then ``+ (eps*z)*g_p``), so ``G`` equals the twin to float32 rounding (a few
ulps of the largest term, plus the normals' ``NORMAL_TOL``).

With ``mask`` given, entries whose mask is 0 get no contribution: this equals the engine's sparse
sampling (theta = z = 0 where pruned); without it, the engine's dense sampling. Scores are
``|G| * mask`` either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ntksap_fast.engine.rng import Stream, normal

from .philox import block_normals, draw_ids, interleave4, load_key, use_libdevice
from .sample_draw import StdTable, lookup_std

__all__ = ["mask_grad_accumulate_into", "mask_grad_reference"]

#: ``(odd, sq)``: float32 ``(N,)`` accumulators of the odd-numbered draws' sum and of the squares.
Stats = tuple[torch.Tensor, torch.Tensor]


@triton.jit(do_not_specialize=["D"])
def _mask_grad_kernel(
    G_ptr,
    odd_ptr,
    sq_ptr,
    gc_ptr,
    gp_ptr,
    mask_ptr,
    offsets_ptr,
    std_ptr,
    key_ptr,
    draws_ptr,
    D,
    N,
    T,
    eps,
    HAS_MASK: tl.constexpr,
    STATS: tl.constexpr,
    STEPS: tl.constexpr,
    BLOCK: tl.constexpr,
    PRECISE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    seed_lo, seed_hi, round_ = load_key(key_ptr)
    block = pid * BLOCK + tl.arange(0, BLOCK)
    elem = pid * (4 * BLOCK) + tl.arange(0, 4 * BLOCK)
    ok = elem < N
    std = lookup_std(tl.minimum(elem, N - 1), offsets_ptr, std_ptr, T, STEPS)
    if HAS_MASK:
        std = std * tl.load(mask_ptr + elem, mask=ok, other=0).to(tl.float32)
    acc = tl.load(G_ptr + elem, mask=ok, other=0.0)
    if STATS:
        odd = tl.load(odd_ptr + elem, mask=ok, other=0.0)
        sq = tl.load(sq_ptr + elem, mask=ok, other=0.0)
    gc_row = gc_ptr + elem  # pointers advance by one row (N elements) per draw
    gp_row = gp_ptr + elem
    for d in range(D):
        draw = tl.load(draws_ptr + d)
        tag = draw.to(tl.uint32) * 4
        w0, w1, w2, w3 = block_normals(block, seed_lo, seed_hi, round_, tag + 0, PRECISE)
        p0, p1, p2, p3 = block_normals(block, seed_lo, seed_hi, round_, tag + 1, PRECISE)
        theta = std * interleave4(w0, w1, w2, w3)
        z = interleave4(p0, p1, p2, p3)
        if HAS_MASK:
            z = tl.where(std != 0.0, z, 0.0)  # mask 0 -> theta = z = 0 (sparse sampling)
        g_c = tl.load(gc_row, mask=ok, other=0.0).to(tl.float32)
        g_p = tl.load(gp_row, mask=ok, other=0.0).to(tl.float32)
        gc_row += N
        gp_row += N
        if STATS:
            c = theta * (g_c + g_p)
            c = c + (eps * z) * g_p
            acc = acc + c
            sq = sq + c * c
            odd = odd + tl.where((draw % 2) == 1, c, 0.0)
        else:
            acc = acc + theta * (g_c + g_p)
            acc = acc + (eps * z) * g_p
    tl.store(G_ptr + elem, acc, mask=ok)
    if STATS:
        tl.store(odd_ptr + elem, odd, mask=ok)
        tl.store(sq_ptr + elem, sq, mask=ok)


def mask_grad_accumulate_into(
    G: torch.Tensor,
    g_clean: torch.Tensor,
    g_pert: torch.Tensor,
    table: StdTable,
    key: torch.Tensor,
    draws: torch.Tensor,
    eps: float,
    mask: torch.Tensor | None = None,
    stats: Stats | None = None,
) -> None:
    """``G += sum_d c_d`` (and the ``stats`` sums) with device-side counters; no host sync.

    ``G``: contiguous float32 ``(N,)``; ``g_clean``/``g_pert``: contiguous ``(D, N)`` float32/bf16;
    ``key``: a ``philox.round_key`` tensor; ``draws``: int64 ``(D,)`` draw ids (the draws the
    gradients belong to, same order); ``mask``: contiguous flat ``(N,)`` or None; ``stats``: float32
    ``(odd, sq)`` ``(N,)`` accumulators or None. All on one device.
    """
    d, n = g_clean.shape
    if n and d:
        block = 256
        wrap_triton(_mask_grad_kernel)[(triton.cdiv(n, 4 * block),)](
            G,
            stats[0] if stats else G,
            stats[1] if stats else G,
            g_clean,
            g_pert,
            mask if mask is not None else G,
            table.offsets,
            table.std,
            key,
            draws,
            d,
            n,
            table.std.numel(),
            float(eps),
            HAS_MASK=mask is not None,
            STATS=stats is not None,
            STEPS=table.steps,
            BLOCK=block,
            PRECISE=use_libdevice(),
        )


def mask_grad_reference(
    G: torch.Tensor,
    g_clean: torch.Tensor,
    g_pert: torch.Tensor,
    table: StdTable,
    seed: int,
    round: int,
    draws: Sequence[int],
    eps: float,
    mask: torch.Tensor | None = None,
    stats: Stats | None = None,
) -> torch.Tensor:
    """PyTorch twin of ``mask_grad_accumulate_into`` (the engine's per-draw formula); in place, returns ``G``.

    ``seed``/``round``: the counters of the ``round_key``; ``draws``: the ``D`` draw ids, in the
    gradients' row order; other arguments as for ``mask_grad_accumulate_into``.
    """
    std = table.vector().to(G.device)
    m = None if mask is None else mask.to(G.device, torch.float32)
    for i, draw in enumerate(draw_ids(draws, "cpu").tolist()):
        theta = normal(seed, round, draw, Stream.WEIGHTS, table.numel).to(G.device) * std
        z = normal(seed, round, draw, Stream.PERTURBATION, table.numel).to(G.device)
        if m is not None:
            theta, z = theta * m, z * m
        g_c, g_p = g_clean[i].float(), g_pert[i].float()
        c = theta * (g_c + g_p) + (eps * z) * g_p
        G += c
        if stats is not None:
            stats[1].addcmul_(c, c)
            if draw % 2:
                stats[0].add_(c)
    return G
