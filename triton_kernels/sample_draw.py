"""Fused draw sampling: every prunable tensor, every draw of a batch, one launch.

For arena element ``e`` (index into the flat prunable space of length ``N``) of draw ``d``::

    theta  = std[tensor(e)] * n(seed, round, d, WEIGHTS, e)
    z      = n(seed, round, d, PERTURBATION, e)
    w_clean = mask[e] * theta
    w_pert  = mask[e] * (theta + eps * z)

exactly the quantities of ``ntksap_fast.engine.draws`` / ``ntksap_fast.engine.engine`` (dense sampling). The std
comes from a per-tensor table (``StdTable``: T+1 offsets and T stds) found by an in-kernel binary
search, not from an N-long vector. Seed, round and draw ids are read on the device
(``philox.round_key``, a draw-id tensor), so one compiled kernel serves every round and a CUDA graph
replay samples new draws. Normals match the twin to ``philox.NORMAL_TOL``; everything
after them is the same float32 arithmetic up to one fused multiply-add (``theta + eps*z``), so
``w_clean``/``w_pert`` match the twin to ``NORMAL_TOL`` times std plus an ulp.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from ntksap_fast.engine.rng import Stream, normal

from .philox import block_normals, draw_ids, interleave4, load_key, use_libdevice

if TYPE_CHECKING:
    from ntksap_fast.engine.arena import Arena

__all__ = ["StdTable", "lookup_std", "sample_draws_into", "sample_draws_reference"]


@dataclass(frozen=True)
class StdTable:
    """Per-tensor sampling std of an arena.

    Attributes:
        offsets: int64 ``(T + 1,)``, tensor ``t`` owns elements ``offsets[t] .. offsets[t+1] - 1``.
        std: float32 ``(T,)``, ``sqrt(2 / fan_in)`` per tensor.
        numel: ``N = offsets[T]``.
        steps: binary-search steps, ``ceil(log2(T))``.
    """

    offsets: torch.Tensor
    std: torch.Tensor
    numel: int
    steps: int

    @classmethod
    def from_sizes(cls, sizes: Sequence[int], stds: Sequence[float], device: torch.device | str = "cpu") -> StdTable:
        """Table of consecutive tensors with ``sizes[t]`` elements and std ``stds[t]``."""
        if len(sizes) != len(stds) or not sizes:
            raise ValueError("sizes and stds must be non-empty and of equal length")
        if any(int(s) < 0 for s in sizes):
            raise ValueError("sizes must be >= 0")
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + int(s))
        return cls(
            torch.tensor(offsets, dtype=torch.int64, device=device),
            torch.tensor([float(s) for s in stds], dtype=torch.float32, device=device),
            offsets[-1],
            max(0, math.ceil(math.log2(len(sizes)))),
        )

    @classmethod
    def from_arena(cls, arena: Arena, device: torch.device | str = "cpu") -> StdTable:
        """Table of an ``ntksap_fast.engine.arena.Arena``."""
        return cls.from_sizes([s.numel for s in arena.slots], [s.std for s in arena.slots], device)

    def vector(self) -> torch.Tensor:
        """Flat float32 ``(N,)`` std per element (what ``Arena.std_vector`` gives)."""
        sizes = (self.offsets[1:] - self.offsets[:-1]).cpu()
        return torch.repeat_interleave(self.std.cpu(), sizes)


@triton.jit
def lookup_std(elem, offsets_ptr, std_ptr, T, STEPS: tl.constexpr):
    """std of the tensor owning each element (int64 tensor): last ``t`` with ``offsets[t] <= elem``."""
    lo = tl.zeros(elem.shape, dtype=tl.int32)
    hi = tl.zeros(elem.shape, dtype=tl.int32) + (T - 1)
    for _ in tl.static_range(STEPS):
        mid = (lo + hi + 1) // 2
        ok = tl.load(offsets_ptr + mid) <= elem
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return tl.load(std_ptr + lo)


@triton.jit
def _sample_draws_kernel(
    mask_ptr,
    offsets_ptr,
    std_ptr,
    key_ptr,
    draws_ptr,
    wc_ptr,
    wp_ptr,
    N,
    T,
    eps,
    HAS_MASK: tl.constexpr,
    STEPS: tl.constexpr,
    BLOCK: tl.constexpr,
    PRECISE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1)
    seed_lo, seed_hi, round_ = load_key(key_ptr)
    tag = tl.load(draws_ptr + d).to(tl.uint32) * 4
    block = pid * BLOCK + tl.arange(0, BLOCK)
    w0, w1, w2, w3 = block_normals(block, seed_lo, seed_hi, round_, tag + 0, PRECISE)
    p0, p1, p2, p3 = block_normals(block, seed_lo, seed_hi, round_, tag + 1, PRECISE)
    n_w = interleave4(w0, w1, w2, w3)
    z = interleave4(p0, p1, p2, p3)
    elem = pid * (4 * BLOCK) + tl.arange(0, 4 * BLOCK)
    ok = elem < N
    std = lookup_std(tl.minimum(elem, N - 1), offsets_ptr, std_ptr, T, STEPS)
    theta = std * n_w
    pert = tl.fma(z, eps, theta)
    if HAS_MASK:
        m = tl.load(mask_ptr + elem, mask=ok, other=0).to(tl.float32)
        w_c = m * theta
        w_p = m * pert
    else:
        w_c = theta
        w_p = pert
    row = d.to(tl.int64) * N + elem
    tl.store(wc_ptr + row, w_c, mask=ok)
    tl.store(wp_ptr + row, w_p, mask=ok)


def sample_draws_into(
    w_clean: torch.Tensor,
    w_pert: torch.Tensor,
    table: StdTable,
    key: torch.Tensor,
    draws: torch.Tensor,
    eps: float,
    mask: torch.Tensor | None = None,
) -> None:
    """Fills ``w_clean``/``w_pert`` (contiguous float32 ``(D, N)``) with ``D`` draws, one launch.

    ``key``: a ``philox.round_key`` tensor; ``draws``: int64 ``(D,)`` draw ids; ``mask``: contiguous
    flat ``(N,)`` bool/float or None. All on the table's device; nothing is read on the host, so the
    call can be captured in a CUDA graph.
    """
    d, n = w_clean.shape
    if d and n:
        block = 256
        _sample_draws_kernel[(triton.cdiv(n, 4 * block), d)](
            mask if mask is not None else w_clean,
            table.offsets,
            table.std,
            key,
            draws,
            w_clean,
            w_pert,
            n,
            table.std.numel(),
            float(eps),
            HAS_MASK=mask is not None,
            STEPS=table.steps,
            BLOCK=block,
            PRECISE=use_libdevice(),
        )


def sample_draws_reference(
    table: StdTable, seed: int, round: int, draws: Sequence[int], eps: float, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch twin of ``sample_draws_into``: float32 ``(w_clean, w_pert)``, each ``(D, N)`` on the table's
    device (``ntksap_fast.engine.rng`` on the CPU, then moved there). ``draws``: ``D`` ids; ``mask``: flat ``(N,)``."""
    device = table.offsets.device
    std = table.vector()
    m = None if mask is None else mask.detach().cpu().to(torch.float32)
    clean, pert = [], []
    for draw in draw_ids(draws, "cpu").tolist():
        theta = normal(seed, round, draw, Stream.WEIGHTS, table.numel).mul_(std)
        w_p = theta.add(normal(seed, round, draw, Stream.PERTURBATION, table.numel), alpha=eps)
        clean.append(theta if m is None else m * theta)
        pert.append(w_p if m is None else m * w_p)
    if not clean:
        return (torch.empty(0, table.numel, dtype=torch.float32, device=device),) * 2
    return torch.stack(clean).to(device), torch.stack(pert).to(device)
