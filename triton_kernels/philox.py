"""Philox-4x32-10 and Box-Muller normals in Triton, the twin of ``ntksap_fast.rng``.

Counter layout (exactly as ``ntksap_fast.rng``): key = (seed lo32, seed hi32), counter =
(block lo32, block hi32, round, draw * 4 + stream) with ``block = element // 4``; the four words of
a block give the normals of elements ``4*block + lane``, lane 0..3, through two Box-Muller
transforms (lanes 0/1: cos/sin of words 0/1, lanes 2/3: cos/sin of words 2/3).

* ``philox4x32`` words are bit-identical to the PyTorch twin (uint32 arithmetic, ``tl.umulhi``).
* Normals agree with the twin to a few float32 ulps, not bit for bit: both sides compute
  ``u``, ``v``, ``-2 log u`` scaling, ``2 pi v`` and ``sqrt`` identically (exact or correctly
  rounded), but ``log``, ``cos`` and ``sin`` come from different libraries (CUDA libdevice
  ``__nv_logf/__nv_cosf/__nv_sinf`` on the GPU, numpy under ``TRITON_INTERPRET=1``, SLEEF on the
  PyTorch CPU side), each accurate to ~1-2 ulp. Bound used in the tests: ``|a - b| <=
  NORMAL_TOL * max(1, |b|)`` with ``NORMAL_TOL = 2e-6`` (about 16 ulps of 1, the largest normal
  is < 5.7); measured under the interpreter: 2.4e-7 (2 ulps).

Jitted helpers (usable from other kernels): ``philox4x32_10``, ``box_muller``,
``block_normals`` (4 normals per block index), ``interleave4`` (lanes -> element order) and
``element_normals`` (one normal per arbitrary element index).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ntksap_fast.rng import Stream, _check_counters

__all__ = [
    "philox4x32_10", "box_muller", "block_normals", "interleave4", "element_normals",
    "philox4x32", "normal", "normal_at", "use_libdevice", "NORMAL_TOL",
]

#: Normals agree with ``ntksap_fast.rng`` to ``|a - b| <= NORMAL_TOL * max(1, |b|)``.
NORMAL_TOL = 2e-6
_MASK32 = 0xFFFFFFFF
#: Scalar counter arguments of a kernel: never specialised (a value of 1 would become a constexpr,
#: and each new round would otherwise compile a new kernel).
_COUNTER_ARGS = ["seed_lo", "seed_hi", "round_", "tag"]


def use_libdevice() -> bool:
    """True when this module's kernels are compiled (libdevice log/cos/sin); False when they were
    created under ``TRITON_INTERPRET=1`` (numpy has no libdevice)."""
    return type(_philox_words_kernel).__name__ != "InterpretedFunction"


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox-4x32 with 10 rounds on uint32 tensors (broadcastable); returns the 4 output words."""
    k0 = k0.to(tl.uint32)
    k1 = k1.to(tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _log(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.log(x)
    else:
        return tl.log(x)


@triton.jit
def _cos(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.cos(x)
    else:
        return tl.cos(x)


@triton.jit
def _sin(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.sin(x)
    else:
        return tl.sin(x)


@triton.jit
def box_muller(w0, w1, w2, w3, PRECISE: tl.constexpr):
    """Four uint32 words -> four float32 standard normals (same formula as ``rng._box_muller``)."""
    scale = 5.9604644775390625e-08  # 2**-24
    u0 = ((w0 >> 8) + 1).to(tl.float32) * scale
    v0 = (w1 >> 8).to(tl.float32) * scale
    u1 = ((w2 >> 8) + 1).to(tl.float32) * scale
    v1 = (w3 >> 8).to(tl.float32) * scale
    r0 = tl.sqrt_rn(-2.0 * _log(u0, PRECISE))
    r1 = tl.sqrt_rn(-2.0 * _log(u1, PRECISE))
    a0 = 6.283185307179586 * v0
    a1 = 6.283185307179586 * v1
    return r0 * _cos(a0, PRECISE), r0 * _sin(a0, PRECISE), r1 * _cos(a1, PRECISE), r1 * _sin(a1, PRECISE)


@triton.jit
def block_normals(block, seed_lo, seed_hi, round_, tag, PRECISE: tl.constexpr):
    """Normals of lanes 0..3 of Philox blocks ``block`` (int64 tensor): four float32 tensors.

    ``seed_lo/seed_hi/round_/tag`` are scalars < 2**32 (``tag = draw * 4 + stream``).
    """
    c0 = block.to(tl.uint32)
    c1 = (block >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + round_.to(tl.uint32)
    c3 = tl.zeros_like(c0) + tag.to(tl.uint32)
    w0, w1, w2, w3 = philox4x32_10(c0, c1, c2, c3, seed_lo, seed_hi)
    return box_muller(w0, w1, w2, w3, PRECISE)


@triton.jit
def interleave4(n0, n1, n2, n3):
    """Four (BLOCK,) lane tensors -> one (4*BLOCK,) tensor with ``out[4*i + lane] = n_lane[i]``."""
    n = tl.join(tl.join(n0, n2), tl.join(n1, n3))  # [BLOCK, 2, 2]: n[i, j, k] = n_{2j+k}[i]
    return tl.reshape(n, (4 * n0.shape[0],))


@triton.jit
def element_normals(elem, seed_lo, seed_hi, round_, tag, PRECISE: tl.constexpr):
    """Normal of each element index ``elem`` (int64 tensor, any order): float32, same shape.

    Costs a full Philox block per element; dense ranges should use ``block_normals``.
    """
    n0, n1, n2, n3 = block_normals(elem >> 2, seed_lo, seed_hi, round_, tag, PRECISE)
    lane = elem & 3
    return tl.where(lane == 0, n0, tl.where(lane == 1, n1, tl.where(lane == 2, n2, n3)))


@triton.jit(do_not_specialize=["k0", "k1"])
def _philox_words_kernel(c_ptr, out_ptr, n, k0, k1, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    c0 = tl.load(c_ptr + offs, mask=ok, other=0).to(tl.uint32)
    c1 = tl.load(c_ptr + n + offs, mask=ok, other=0).to(tl.uint32)
    c2 = tl.load(c_ptr + 2 * n + offs, mask=ok, other=0).to(tl.uint32)
    c3 = tl.load(c_ptr + 3 * n + offs, mask=ok, other=0).to(tl.uint32)
    w0, w1, w2, w3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + offs, w0.to(tl.int64), mask=ok)
    tl.store(out_ptr + n + offs, w1.to(tl.int64), mask=ok)
    tl.store(out_ptr + 2 * n + offs, w2.to(tl.int64), mask=ok)
    tl.store(out_ptr + 3 * n + offs, w3.to(tl.int64), mask=ok)


@triton.jit(do_not_specialize=_COUNTER_ARGS)
def _normal_range_kernel(out_ptr, first_block, offset, numel, seed_lo, seed_hi, round_, tag,
                         BLOCK: tl.constexpr, PRECISE: tl.constexpr):
    block = first_block + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    n0, n1, n2, n3 = block_normals(block, seed_lo, seed_hi, round_, tag, PRECISE)
    vals = interleave4(n0, n1, n2, n3)
    elem = first_block * 4 + tl.program_id(0).to(tl.int64) * (4 * BLOCK) + tl.arange(0, 4 * BLOCK)
    ok = (elem >= offset) & (elem < offset + numel)
    tl.store(out_ptr + (elem - offset), vals, mask=ok)


@triton.jit(do_not_specialize=_COUNTER_ARGS)
def _normal_at_kernel(idx_ptr, out_ptr, n, seed_lo, seed_hi, round_, tag,
                      BLOCK: tl.constexpr, PRECISE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    elem = tl.load(idx_ptr + offs, mask=ok, other=0)
    tl.store(out_ptr + offs, element_normals(elem, seed_lo, seed_hi, round_, tag, PRECISE), mask=ok)


def philox4x32(counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
               key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox-4x32-10 words; twin of ``ntksap_fast.rng.philox4x32``.

    Args:
        counter: four int64 tensors of one shape on one device, values in [0, 2**32).
        key: two Python ints in [0, 2**32).
    Returns:
        four int64 tensors (values in [0, 2**32)) of the counters' shape.
    """
    c = torch.stack([torch.as_tensor(w, dtype=torch.int64) for w in counter]).reshape(4, -1).contiguous()
    n = c.shape[1]
    out = torch.empty_like(c)
    if n:
        grid = (triton.cdiv(n, 1024),)
        _philox_words_kernel[grid](c, out, n, key[0] & _MASK32, key[1] & _MASK32, BLOCK=1024)
    shape = torch.as_tensor(counter[0]).shape
    return tuple(w.reshape(shape) for w in out.unbind(0))  # type: ignore[return-value]


def normal(seed: int, round: int, draw: int, stream: Stream, numel: int, *, offset: int = 0,
           device: torch.device | str = "cuda") -> torch.Tensor:
    """Standard normals of elements ``offset .. offset + numel - 1``: float32 ``(numel,)`` on ``device``.

    Twin of ``ntksap_fast.rng.normal``.
    """
    _check_counters(seed, round, draw)
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if numel == 0:
        return out
    first_block, last_block = offset // 4, (offset + numel - 1) // 4
    block = 256
    grid = (triton.cdiv(last_block - first_block + 1, block),)
    _normal_range_kernel[grid](out, first_block, offset, numel, seed & _MASK32, seed >> 32, round,
                               draw * 4 + int(stream), BLOCK=block, PRECISE=use_libdevice())
    return out


def normal_at(seed: int, round: int, draw: int, stream: Stream, index: torch.Tensor) -> torch.Tensor:
    """Normals at element indices ``index`` (int64, any shape, any device): float32, same shape/device.

    Twin of ``ntksap_fast.rng.normal_at``.
    """
    _check_counters(seed, round, draw)
    flat = index.to(torch.int64).reshape(-1).contiguous()
    out = torch.empty(flat.shape, dtype=torch.float32, device=index.device)
    if flat.numel():
        grid = (triton.cdiv(flat.numel(), 1024),)
        _normal_at_kernel[grid](flat, out, flat.numel(), seed & _MASK32, seed >> 32, round,
                                draw * 4 + int(stream), BLOCK=1024, PRECISE=use_libdevice())
    return out.reshape(index.shape)
