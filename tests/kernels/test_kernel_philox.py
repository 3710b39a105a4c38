"""ntksap_fast.kernels.philox (Philox-4x32-10 and Box-Muller in Triton) against its twin ``ntksap_fast.engine.rng``.

Tolerances: Philox words bit-exact; normals ``|a - b| <= NORMAL_TOL * max(1, |b|)`` (2e-6; log/cos/sin
from different libraries, see the kernel module's docstring).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import triton
import triton.language as tl
from ntksap_fast.kernels import philox

from _kernels import DEVICES, normal_close
from ntksap_fast.engine import rng

KAT = [  # Random123 known answers, philox4x32-10
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@triton.jit(do_not_specialize=["k0", "k1"])
def _words_kernel(c_ptr, out_ptr, n, k0, k1, BLOCK: tl.constexpr):
    """The four output words of ``philox.philox4x32_10`` for ``n`` counters (rows of a (4, n) tensor)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    c0 = tl.load(c_ptr + offs, mask=ok, other=0).to(tl.uint32)
    c1 = tl.load(c_ptr + n + offs, mask=ok, other=0).to(tl.uint32)
    c2 = tl.load(c_ptr + 2 * n + offs, mask=ok, other=0).to(tl.uint32)
    c3 = tl.load(c_ptr + 3 * n + offs, mask=ok, other=0).to(tl.uint32)
    w0, w1, w2, w3 = philox.philox4x32_10(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + offs, w0.to(tl.int64), mask=ok)
    tl.store(out_ptr + n + offs, w1.to(tl.int64), mask=ok)
    tl.store(out_ptr + 2 * n + offs, w2.to(tl.int64), mask=ok)
    tl.store(out_ptr + 3 * n + offs, w3.to(tl.int64), mask=ok)


def _words(counters: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """``philox4x32_10`` of int64 ``(4, n)`` counters (values < 2**32): int64 ``(4, n)`` words."""
    out = torch.empty_like(counters)
    n = counters.shape[1]
    _words_kernel[(triton.cdiv(n, 1024),)](counters, out, n, key[0], key[1], BLOCK=1024)
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_philox_words_bit_exact(device):
    for counter, key, expected in KAT:
        words = _words(torch.tensor(counter, dtype=torch.int64, device=device).view(4, 1), key)
        assert tuple(int(w) for w in words[:, 0]) == expected
        assert tuple(int(w) for w in rng.philox4x32(counter, key)) == expected
    g = torch.Generator().manual_seed(0)
    n = 10_000
    counters = torch.randint(0, 2**32, (4, n), generator=g, dtype=torch.int64)
    counters[0, :64] = torch.arange(2**32 - 64, 2**32)  # block lo word at the 2**32 wraparound
    counters[1, :32] = 2**32 - 1
    counters[2, 64:96] = 0
    for key in ((2**32 - 1, 2**32 - 1), (0x12345678, 0), (0, 0xDEADBEEF)):
        got = _words(counters.to(device), key)
        want = torch.stack(rng.philox4x32(tuple(counters), key))
        assert torch.equal(got.cpu(), want)


def _normal(seed: int, rnd: int, draw: int, stream: rng.Stream, numel: int, offset: int, device: str) -> torch.Tensor:
    out = torch.empty(numel, dtype=torch.float32, device=device)
    return philox.normal_into(out, philox.round_key(seed, rnd, device), philox.draw_ids([draw], device), stream, offset)


@pytest.mark.parametrize("device", DEVICES)
def test_normals_match_twin(device):
    cases = [
        (0, 0, 0, rng.Stream.WEIGHTS, 4099, 0),
        (2**64 - 1, 2**32 - 1, 2**30 - 1, rng.Stream.INPUTS, 1, 5),
        (2**40 + 7, 3, 5, rng.Stream.PERTURBATION, 1001, 3),
        (9, 1, 2, rng.Stream.WEIGHTS, 6, 2**34 + 1),
    ]
    for seed, rnd, draw, stream, numel, offset in cases:
        got = _normal(seed, rnd, draw, stream, numel, offset, device)
        normal_close(got, rng.normal(seed, rnd, draw, stream, numel, offset=offset))


@pytest.mark.parametrize("device", DEVICES)
def test_counters_are_read_on_the_device(device):
    """One launch reads seed, round and draw from tensors: rewriting them gives the other draw's numbers."""
    key, draw = philox.round_key(5, 1, device), philox.draw_ids([2], device)
    out = torch.empty(37, device=device)
    philox.normal_into(out, key, draw, rng.Stream.INPUTS, offset=3)
    normal_close(out, rng.normal(5, 1, 2, rng.Stream.INPUTS, 37, offset=3))
    key.copy_(philox.round_key(2**64 - 1, 9, "cpu"))
    draw.fill_(7)
    philox.normal_into(out, key, draw, rng.Stream.INPUTS, offset=3)
    normal_close(out, rng.normal(2**64 - 1, 9, 7, rng.Stream.INPUTS, 37, offset=3))
    with pytest.raises(ValueError, match="draws"):
        philox.draw_ids([2**30], device)
    with pytest.raises(ValueError, match="round"):
        philox.round_key(0, 2**32, device)


@pytest.mark.parametrize("device", DEVICES)
def test_inputs_of_a_256_batch_in_one_launch_per_draw(device):
    """The engine's input generation at a GPU run's batch: one launch for an odd draw, a 256-input batch
    of (3, 4, 4) inputs taken from row 37 on (a micro-batch's offset), 12288 normals in the launch."""
    per_row, rows = 3 * 4 * 4, range(37, 37 + 256)
    key, draw = philox.round_key(2**33 + 1, 4, device), torch.zeros(1, dtype=torch.int64, device=device)
    for d in (3,):
        draw.fill_(d)
        out = torch.empty(len(rows) * per_row, device=device)
        philox.normal_into(out, key, draw, rng.Stream.INPUTS, rows.start * per_row)
        normal_close(out, rng.normal(2**33 + 1, 4, d, rng.Stream.INPUTS, out.numel(), offset=rows.start * per_row))
