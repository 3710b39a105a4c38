"""Fused draw sampling: every prunable tensor, every draw of a batch, one launch.

For arena element ``e`` (index into the flat prunable space of length ``N``) of draw ``d``::

    theta  = std[tensor(e)] * n(seed, round, d, WEIGHTS, e)
    z      = n(seed, round, d, PERTURBATION, e)
    w_clean = mask[e] * theta
    w_pert  = mask[e] * (theta + eps * z)

exactly the quantities of ``ntksap_fast.draws`` / ``ntksap_fast.engine`` (dense sampling). The std
comes from a per-tensor table (``StdTable``: T+1 offsets and T stds) found by an in-kernel binary
search, not from an N-long vector. Normals match the twin to ``philox.NORMAL_TOL``; everything
after them is the same float32 arithmetic up to one fused multiply-add (``theta + eps*z``), so
``w_clean``/``w_pert`` match the twin to ``NORMAL_TOL`` times std plus an ulp (bf16 outputs: plus
one bf16 ulp, as values a few float32 ulps apart may round to neighbouring bf16 numbers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import triton
import triton.language as tl

from ntksap_fast.rng import Stream, _check_counters, normal

from .philox import _COUNTER_ARGS, block_normals, interleave4, use_libdevice

if TYPE_CHECKING:
    from ntksap_fast.arena import Arena

__all__ = ["StdTable", "lookup_std", "sample_draws", "sample_draws_reference", "draw_tensor"]

_MASK32 = 0xFFFFFFFF
_OUT_DTYPES = (torch.float32, torch.bfloat16)


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
    def from_sizes(cls, sizes: Sequence[int], stds: Sequence[float],
                   device: torch.device | str = "cpu") -> "StdTable":
        """Table of consecutive tensors with ``sizes[t]`` elements and std ``stds[t]``."""
        if len(sizes) != len(stds) or not sizes:
            raise ValueError("sizes and stds must be non-empty and of equal length")
        if any(int(s) < 0 for s in sizes):
            raise ValueError("sizes must be >= 0")
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + int(s))
        return cls(torch.tensor(offsets, dtype=torch.int64, device=device),
                   torch.tensor([float(s) for s in stds], dtype=torch.float32, device=device),
                   offsets[-1], max(0, math.ceil(math.log2(len(sizes)))))

    @classmethod
    def from_arena(cls, arena: "Arena", device: torch.device | str = "cpu") -> "StdTable":
        """Table of an ``ntksap_fast.arena.Arena``."""
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


@triton.jit(do_not_specialize=_COUNTER_ARGS)
def _sample_draws_kernel(mask_ptr, offsets_ptr, std_ptr, draws_ptr, wc_ptr, wp_ptr, theta_ptr, z_ptr,
                         N, T, seed_lo, seed_hi, round_, eps,
                         HAS_MASK: tl.constexpr, WRITE_NOISE: tl.constexpr, STEPS: tl.constexpr,
                         BLOCK: tl.constexpr, PRECISE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1)
    draw = tl.load(draws_ptr + d)
    block = pid * BLOCK + tl.arange(0, BLOCK)
    w0, w1, w2, w3 = block_normals(block, seed_lo, seed_hi, round_, draw * 4 + 0, PRECISE)
    p0, p1, p2, p3 = block_normals(block, seed_lo, seed_hi, round_, draw * 4 + 1, PRECISE)
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
    tl.store(wc_ptr + row, w_c.to(wc_ptr.dtype.element_ty), mask=ok)
    tl.store(wp_ptr + row, w_p.to(wp_ptr.dtype.element_ty), mask=ok)
    if WRITE_NOISE:
        tl.store(theta_ptr + row, theta, mask=ok)
        tl.store(z_ptr + row, z, mask=ok)


def draw_tensor(draws: Sequence[int] | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Draw ids as a contiguous int64 ``(D,)`` tensor on ``device``; checks the range [0, 2**30)."""
    if isinstance(draws, torch.Tensor):
        t = draws.to(device=device, dtype=torch.int64).reshape(-1).contiguous()
        ids = t.cpu().tolist() if t.numel() <= 4096 else []
    else:
        ids = [int(d) for d in draws]
        t = torch.tensor(ids, dtype=torch.int64, device=device)
    for d in ids:
        if not 0 <= d < 2**30:
            raise ValueError(f"draws must be integers in [0, 2**30), got {d}")
    return t


def _check_mask(mask: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 1 or mask.numel() != n:
        raise ValueError(f"mask must be a flat tensor of {n} elements")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device}, the table on {device}")
    return mask.contiguous()


def sample_draws(table: StdTable, seed: int, round: int, draws: Sequence[int] | torch.Tensor,
                 eps: float, mask: torch.Tensor | None = None, *, dtype: torch.dtype = torch.float32,
                 return_noise: bool = False) -> tuple[torch.Tensor, ...]:
    """Clean and perturbed weights of ``D`` draws in one launch.

    Args:
        table: the arena's ``StdTable`` (its device is the output device).
        seed, round: counters, ``0 <= seed < 2**64``, ``0 <= round < 2**32``.
        draws: ``D`` draw ids in [0, 2**30).
        eps: perturbation scale (float32 in-kernel).
        mask: optional flat ``(N,)`` bool or float mask (1 = kept); None = all kept.
        dtype: float32 or bfloat16, the dtype of ``w_clean``/``w_pert``.
        return_noise: also return float32 ``theta`` and ``z`` (unmasked).
    Returns:
        ``(w_clean, w_pert)`` each ``(D, N)`` ``dtype``; plus ``(theta, z)`` float32 ``(D, N)``.
    """
    if dtype not in _OUT_DTYPES:
        raise TypeError(f"dtype must be float32 or bfloat16, got {dtype}")
    device = table.offsets.device
    draw_ids = draw_tensor(draws, device)
    _check_counters(seed, round, 0)
    mask = _check_mask(mask, table.numel, device)
    d, n = draw_ids.numel(), table.numel
    w_clean = torch.empty(d, n, dtype=dtype, device=device)
    w_pert = torch.empty(d, n, dtype=dtype, device=device)
    theta = torch.empty(d, n, device=device) if return_noise else w_clean
    z = torch.empty(d, n, device=device) if return_noise else w_clean
    if d and n:
        block = 256
        grid = (triton.cdiv(n, 4 * block), d)
        _sample_draws_kernel[grid](
            mask if mask is not None else w_clean, table.offsets, table.std, draw_ids, w_clean, w_pert,
            theta, z, n, table.std.numel(), seed & _MASK32, seed >> 32, round, float(eps),
            HAS_MASK=mask is not None, WRITE_NOISE=return_noise, STEPS=table.steps, BLOCK=block,
            PRECISE=use_libdevice())
    return (w_clean, w_pert, theta, z) if return_noise else (w_clean, w_pert)


def sample_draws_reference(table: StdTable, seed: int, round: int, draws: Sequence[int] | torch.Tensor,
                           eps: float, mask: torch.Tensor | None = None, *, dtype: torch.dtype = torch.float32,
                           return_noise: bool = False) -> tuple[torch.Tensor, ...]:
    """PyTorch twin of ``sample_draws`` (``ntksap_fast.rng`` on the CPU, then moved to the table's device)."""
    device = table.offsets.device
    ids = draw_tensor(draws, "cpu").tolist()
    std = table.vector()
    m = None if mask is None else mask.detach().cpu().to(torch.float32)
    outs: list[list[torch.Tensor]] = [[], [], [], []]
    for draw in ids:
        theta = normal(seed, round, draw, Stream.WEIGHTS, table.numel).mul_(std)
        z = normal(seed, round, draw, Stream.PERTURBATION, table.numel)
        pert = theta.add(z, alpha=eps)
        w_c, w_p = (theta, pert) if m is None else (m * theta, m * pert)
        for lst, t in zip(outs, (w_c, w_p, theta, z)):
            lst.append(t)
    stacked = [torch.stack(o) if o else torch.empty(0, table.numel) for o in outs]
    res = [stacked[0].to(device, dtype), stacked[1].to(device, dtype)]
    if return_noise:
        res += [stacked[2].to(device), stacked[3].to(device)]
    return tuple(res)
