"""Counter-based randomness: Philox-4x32-10 in plain PyTorch ops (the CPU twin).

Every random number of a prune is a pure function of ``(seed, round, draw, stream, element)``
(docs/DESIGN.md section 3). One Philox call maps a 128-bit counter and a 64-bit key to four 32-bit
words; we use

* key     = (seed mod 2**32, seed // 2**32)
* counter = (block mod 2**32, block // 2**32, round, draw * 4 + stream)

where ``block = element // 4``: the four words of a block give the normals of elements
``4*block .. 4*block + 3`` through two Box-Muller transforms. The Triton kernels implement the same
generator and must give bit-identical words (``philox4x32``) and normals within float32 rounding.

Integers are held in int64 tensors with values in [0, 2**32) so that products and xors are exact
on every backend; the 32x32 -> 64 bit product is split in 16-bit halves so it never overflows.

``normal`` and ``normal_at`` run the compiled op ``torch.ops.ntksap_fast.philox_normal(_at)``
(csrc/philox.cpp: the same words, normals within a few float32 ulps, many times faster) when the
extension is loaded, and these PyTorch ops otherwise (or with ``NTKSAP_FAST_NO_EXT=1``). The fake
(meta) implementations of those ops live here (the C++ library names this module as their home),
so they trace under torch.compile / FakeTensor.
"""

from __future__ import annotations

import math
from enum import IntEnum

import torch

from .._build import loader as _ext

__all__ = [
    "Stream",
    "philox4x32",
    "normal",
    "normal_at",
    "PHILOX_ROUNDS",
    "PHILOX_M0",
    "PHILOX_M1",
    "PHILOX_W0",
    "PHILOX_W1",
    "BOX_MULLER_SHIFT",
    "BOX_MULLER_SCALE",
    "TWO_PI",
    "MASK32",
    "check_counters",
    "MAX_DRAW",
]

# The generator's constants, one home for the PyTorch twin and the Triton kernels; csrc/philox.cpp
# spells them out in C++ and tests/test_rng.py checks that they agree.
PHILOX_ROUNDS = 10
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # key increments (Weyl sequence)
# Box-Muller: a word's top 24 bits, w >> SHIFT, scaled by 2**-24 give u = (that + 1) * SCALE in
# (0, 1] and v = that * SCALE in [0, 1) (exact in float32); the angle is TWO_PI * v.
BOX_MULLER_SHIFT = 8
BOX_MULLER_SCALE = 2.0**-24
TWO_PI = 2.0 * math.pi
MASK32 = 0xFFFFFFFF
#: Draw ids live in [0, MAX_DRAW): ``draw * 4 + stream`` must fit the 32-bit counter word.
MAX_DRAW = 2**30
# Elements generated per chunk: keeps the ~20 int64 temporaries in cache.
_CHUNK = 1 << 16


class Stream(IntEnum):
    """Which quantity a random number feeds."""

    WEIGHTS = 0
    PERTURBATION = 1
    INPUTS = 2


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * b`` for a 32-bit constant ``a`` and int64 ``b < 2**32``."""
    p_lo = b & 0xFFFF
    p_hi = b >> 16
    lo_part = p_lo * a  # < 2**48
    hi_part = p_hi * a  # < 2**48
    low_sum = lo_part + ((hi_part & 0xFFFF) << 16)  # < 2**49
    return (hi_part >> 16) + (low_sum >> 32), low_sum & MASK32


def philox4x32(
    counter: tuple[torch.Tensor | int, torch.Tensor | int, torch.Tensor | int, torch.Tensor | int],
    key: tuple[int, int],
    rounds: int = PHILOX_ROUNDS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox-4x32 (Salmon et al., SC'11) on int64 tensors holding uint32 values.

    Args:
        counter: four words, tensors (broadcastable, int64, values < 2**32) or Python ints.
        key: two 32-bit Python ints.
    Returns:
        four int64 tensors of uint32 values, the output words.
    """
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    k0, k1 = key[0] & MASK32, key[1] & MASK32
    for r in range(rounds):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if r + 1 < rounds:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def check_counters(seed: int, round: int, draw: int) -> None:
    """Raises ``ValueError`` unless ``0 <= seed < 2**64``, ``0 <= round < 2**32``, ``0 <= draw < MAX_DRAW``."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed}")
    if not 0 <= round < 2**32:
        raise ValueError(f"round must be an integer in [0, 2**32), got {round}")
    if not 0 <= draw < MAX_DRAW:
        raise ValueError(f"draw must be an integer in [0, 2**30), got {draw}")


def _compiled() -> bool:
    return _ext.use_compiled("random number generator") and _ext.has_op("philox_normal")


def _register_fakes() -> None:
    """Fake implementations of the compiled ops: the shapes, dtype and device of their outputs."""

    def philox_normal_fake(key0: int, key1: int, round: int, tag: int, offset: int, numel: int) -> torch.Tensor:
        torch._check(numel >= 0, lambda: f"numel must be >= 0, got {numel}")
        return torch.empty(numel, dtype=torch.float32, device="cpu")

    def philox_normal_at_fake(key0: int, key1: int, round: int, tag: int, index: torch.Tensor) -> torch.Tensor:
        torch._check(index.dtype == torch.int64, lambda: f"index must be int64, got {index.dtype}")
        return torch.empty(index.shape, dtype=torch.float32, device=index.device)

    torch.library.register_fake("ntksap_fast::philox_normal", philox_normal_fake)
    torch.library.register_fake("ntksap_fast::philox_normal_at", philox_normal_at_fake)


def _box_muller(w: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """(blocks,) x 4 words -> (blocks, 4) float32 standard normals."""
    shift, scale = BOX_MULLER_SHIFT, BOX_MULLER_SCALE
    # u in (0, 1] (never 0, so the log is finite); v in [0, 1).
    u0 = ((w[0] >> shift) + 1).to(torch.float32) * scale
    v0 = (w[1] >> shift).to(torch.float32) * scale
    u1 = ((w[2] >> shift) + 1).to(torch.float32) * scale
    v1 = (w[3] >> shift).to(torch.float32) * scale
    r0 = torch.sqrt(-2.0 * torch.log(u0))
    r1 = torch.sqrt(-2.0 * torch.log(u1))
    a0 = TWO_PI * v0
    a1 = TWO_PI * v1
    return torch.stack((r0 * torch.cos(a0), r0 * torch.sin(a0), r1 * torch.cos(a1), r1 * torch.sin(a1)), dim=1)


def normal(
    seed: int,
    round: int,
    draw: int,
    stream: Stream,
    numel: int,
    *,
    offset: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Standard normals of elements ``offset .. offset + numel - 1`` of one stream.

    Returns a float32 tensor of shape ``(numel,)`` (written into ``out`` when given: a contiguous
    float32 CPU tensor of that many elements). Any split of the element range gives the same
    numbers as one call over the whole range.
    """
    check_counters(seed, round, draw)
    if out is None:
        out = torch.empty(numel, dtype=torch.float32)
    elif out.numel() != numel or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError("out must be a contiguous float32 tensor with numel elements")
    if numel == 0:
        return out
    key = (seed & MASK32, seed >> 32)
    tag = draw * 4 + int(stream)
    if _compiled():
        return out.copy_(torch.ops.ntksap_fast.philox_normal(key[0], key[1], round, tag, offset, numel))
    first_block = offset // 4
    last_block = (offset + numel - 1) // 4
    for start in range(first_block, last_block + 1, _CHUNK):
        stop = min(start + _CHUNK, last_block + 1)
        block = torch.arange(start, stop, dtype=torch.int64)
        words = philox4x32((block & MASK32, block >> 32, round, tag), key)
        values = _box_muller(words).reshape(-1)
        lo = max(offset - 4 * start, 0)
        hi = min(offset + numel - 4 * start, values.numel())
        dst = 4 * start + lo - offset
        out[dst : dst + hi - lo] = values[lo:hi]
    return out


def normal_at(seed: int, round: int, draw: int, stream: Stream, index: torch.Tensor) -> torch.Tensor:
    """Standard normals at arbitrary element indices (int64 tensor, any shape): float32, same shape.

    Gives exactly the values ``normal`` gives at those positions; cheaper than ``normal`` when few
    elements of a long range are needed.
    """
    check_counters(seed, round, draw)
    index = index.to(torch.int64)
    key = (seed & MASK32, seed >> 32)
    tag = draw * 4 + int(stream)
    if _compiled():
        return torch.ops.ntksap_fast.philox_normal_at(key[0], key[1], round, tag, index)
    flat = index.reshape(-1)
    out = torch.empty(flat.shape, dtype=torch.float32)
    for start in range(0, flat.numel(), _CHUNK):
        idx = flat[start : start + _CHUNK]
        block = idx >> 2
        values = _box_muller(philox4x32((block & MASK32, block >> 32, round, tag), key))
        out[start : start + idx.numel()] = values.gather(1, (idx & 3).unsqueeze(1)).squeeze(1)
    return out.reshape(index.shape)


_ext.on_load(_register_fakes)
