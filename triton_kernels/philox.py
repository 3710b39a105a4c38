"""Philox-4x32-10 and Box-Muller normals in Triton, the twin of ``ntksap_fast.engine.rng``.

Counter layout (exactly as ``ntksap_fast.engine.rng``, whose constants these kernels use): key = (seed
lo32, seed hi32), counter = (block lo32, block hi32, round, draw * 4 + stream) with ``block =
element // 4``; the four words of a block give the normals of elements ``4*block + lane``, lane
0..3, through two Box-Muller transforms (lanes 0/1: cos/sin of words 0/1, lanes 2/3: of words 2/3).

Kernels read the counters from device memory, never from launch arguments: a ``round_key`` (int64
``(3,)`` tensor ``(seed lo32, seed hi32, round)``) and an int64 draw id. One compiled kernel then
serves every seed, round and draw, and a CUDA graph that launches it draws new numbers when the
tensors are rewritten between replays.

* ``philox4x32_10`` words are bit-identical to the PyTorch twin (uint32 arithmetic, ``tl.umulhi``).
* Normals agree with the twin to a few float32 ulps, not bit for bit: both sides compute
  ``u``, ``v``, ``-2 log u`` scaling, ``2 pi v`` and ``sqrt`` identically (exact or correctly
  rounded), but ``log``, ``cos`` and ``sin`` come from different libraries (CUDA libdevice
  ``__nv_logf/__nv_cosf/__nv_sinf`` on the GPU, numpy under ``TRITON_INTERPRET=1``, SLEEF on the
  PyTorch CPU side), each accurate to ~1-2 ulp. Bound used in the tests: ``|a - b| <=
  NORMAL_TOL * max(1, |b|)`` with ``NORMAL_TOL = 2e-6`` (about 16 ulps of 1, the largest normal
  is < 5.7); measured under the interpreter: 2.4e-7 (2 ulps).

Jitted helpers (usable from other kernels): ``philox4x32_10``, ``box_muller``, ``load_key``,
``block_normals`` (4 normals per block index) and ``interleave4`` (lanes -> element order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ntksap_fast.engine import rng
from ntksap_fast.engine.rng import Stream, check_counters

__all__ = [
    "philox4x32_10",
    "box_muller",
    "load_key",
    "block_normals",
    "interleave4",
    "round_key",
    "draw_ids",
    "normal_into",
    "use_libdevice",
    "NORMAL_TOL",
]

#: Normals agree with ``ntksap_fast.engine.rng`` to ``|a - b| <= NORMAL_TOL * max(1, |b|)``.
NORMAL_TOL = 2e-6
_ROUNDS = tl.constexpr(rng.PHILOX_ROUNDS)
_M0 = tl.constexpr(rng.PHILOX_M0)
_M1 = tl.constexpr(rng.PHILOX_M1)
_W0 = tl.constexpr(rng.PHILOX_W0)
_W1 = tl.constexpr(rng.PHILOX_W1)
_SHIFT = tl.constexpr(rng.BOX_MULLER_SHIFT)
_SCALE = tl.constexpr(rng.BOX_MULLER_SCALE)
_TWO_PI = tl.constexpr(rng.TWO_PI)


def use_libdevice() -> bool:
    """True when this module's kernels are compiled (libdevice log/cos/sin); False when they were
    created under ``TRITON_INTERPRET=1`` (numpy has no libdevice)."""
    return type(_normal_range_kernel).__name__ != "InterpretedFunction"


def round_key(seed: int, round: int, device: torch.device | str) -> torch.Tensor:
    """The counters shared by a round's draws: int64 ``(3,)`` ``(seed lo32, seed hi32, round)`` on ``device``."""
    check_counters(seed, round, 0)
    return torch.tensor([seed & rng.MASK32, seed >> 32, round], dtype=torch.int64, device=device)


def draw_ids(draws, device: torch.device | str) -> torch.Tensor:
    """Draw ids as a contiguous int64 ``(D,)`` tensor on ``device``; checks the range [0, 2**30)."""
    ids = [int(d) for d in draws]
    for d in ids:
        if not 0 <= d < rng.MAX_DRAW:
            raise ValueError(f"draws must be integers in [0, 2**30), got {d}")
    return torch.tensor(ids, dtype=torch.int64, device=device)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox-4x32 with 10 rounds on uint32 tensors (broadcastable); returns the 4 output words."""
    k0 = k0.to(tl.uint32)
    k1 = k1.to(tl.uint32)
    for _ in tl.static_range(_ROUNDS):
        hi0 = tl.umulhi(c0, _M0)
        lo0 = c0 * _M0
        hi1 = tl.umulhi(c2, _M1)
        lo1 = c2 * _M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + _W0
        k1 = k1 + _W1
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
    u0 = ((w0 >> _SHIFT) + 1).to(tl.float32) * _SCALE
    v0 = (w1 >> _SHIFT).to(tl.float32) * _SCALE
    u1 = ((w2 >> _SHIFT) + 1).to(tl.float32) * _SCALE
    v1 = (w3 >> _SHIFT).to(tl.float32) * _SCALE
    r0 = tl.sqrt_rn(-2.0 * _log(u0, PRECISE))
    r1 = tl.sqrt_rn(-2.0 * _log(u1, PRECISE))
    a0 = _TWO_PI * v0
    a1 = _TWO_PI * v1
    return r0 * _cos(a0, PRECISE), r0 * _sin(a0, PRECISE), r1 * _cos(a1, PRECISE), r1 * _sin(a1, PRECISE)


@triton.jit
def load_key(key_ptr):
    """``(seed lo32, seed hi32, round)`` from a ``round_key`` tensor, as uint32 scalars."""
    return (tl.load(key_ptr).to(tl.uint32), tl.load(key_ptr + 1).to(tl.uint32), tl.load(key_ptr + 2).to(tl.uint32))


@triton.jit
def block_normals(block, seed_lo, seed_hi, round_, tag, PRECISE: tl.constexpr):
    """Normals of lanes 0..3 of Philox blocks ``block`` (int64 tensor): four float32 tensors.

    ``seed_lo/seed_hi/round_/tag`` are uint32 scalars (``tag = draw * 4 + stream``).
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


@triton.jit(do_not_specialize=["first_block", "offset", "numel"])
def _normal_range_kernel(
    out_ptr,
    first_block,
    offset,
    numel,
    key_ptr,
    draw_ptr,
    STREAM: tl.constexpr,
    BLOCK: tl.constexpr,
    PRECISE: tl.constexpr,
):
    seed_lo, seed_hi, round_ = load_key(key_ptr)
    tag = tl.load(draw_ptr).to(tl.uint32) * 4 + STREAM
    block = first_block + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    n0, n1, n2, n3 = block_normals(block, seed_lo, seed_hi, round_, tag, PRECISE)
    vals = interleave4(n0, n1, n2, n3)
    elem = first_block * 4 + tl.program_id(0).to(tl.int64) * (4 * BLOCK) + tl.arange(0, 4 * BLOCK)
    ok = (elem >= offset) & (elem < offset + numel)
    tl.store(out_ptr + (elem - offset), vals, mask=ok)


def normal_into(
    out: torch.Tensor, key: torch.Tensor, draw: torch.Tensor, stream: Stream, offset: int = 0
) -> torch.Tensor:
    """Writes the normals of elements ``offset .. offset + out.numel() - 1`` into ``out``; returns it.

    Args:
        out: contiguous float32 tensor on the device of ``key``.
        key: a ``round_key`` tensor; draw: int64 tensor whose first element is the draw id (e.g.
            a one-element view of a draw-id buffer). Both are read on the device (no host sync),
            so the call can be captured in a CUDA graph.
    """
    numel = out.numel()
    if numel:
        first_block, last_block = offset // 4, (offset + numel - 1) // 4
        block = 256
        grid = (triton.cdiv(last_block - first_block + 1, block),)
        _normal_range_kernel[grid](
            out, first_block, offset, numel, key, draw, STREAM=int(stream), BLOCK=block, PRECISE=use_libdevice()
        )
    return out
