"""The Philox-4x32-10 twin: known-answer vectors, the counter contract, and one set of constants for
the PyTorch twin (ntksap_fast/rng.py), the Triton kernels (triton_kernels/philox.py) and the
compiled op (csrc/philox.cpp)."""

import math
import re
from pathlib import Path

import pytest
import torch

from _requires_ext import ext_missing
from ntksap_fast.engine import rng
from ntksap_fast.engine.rng import Stream, normal, normal_at, philox4x32

ROOT = Path(__file__).resolve().parents[2]

# Known-answer vectors of Random123 (Salmon et al.) for philox4x32, 10 rounds.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def test_known_answers():
    for counter, key, expected in KAT:
        assert tuple(int(w) for w in philox4x32(counter, key)) == expected


def test_vectorised_counters_match_scalar_calls():
    block = torch.arange(0, 50, 7, dtype=torch.int64)
    words = philox4x32((block, 3, 5, 9), (11, 13))
    for i, b in enumerate(block.tolist()):
        assert tuple(int(w[i]) for w in words) == tuple(int(w) for w in philox4x32((b, 3, 5, 9), (11, 13)))


def test_any_split_of_a_range_gives_the_same_numbers():
    whole = normal(7, 1, 2, Stream.INPUTS, 1001, offset=3)
    parts = torch.cat([normal(7, 1, 2, Stream.INPUTS, n, offset=o) for o, n in ((3, 1), (4, 6), (10, 994))])
    assert torch.equal(whole, parts)


def test_normal_at_equals_dense():
    dense = normal(5, 0, 1, Stream.WEIGHTS, 4099)
    idx = torch.tensor([0, 1, 2, 3, 4, 4097, 4098, 17, 17])
    assert torch.equal(normal_at(5, 0, 1, Stream.WEIGHTS, idx), dense[idx])


def test_counters_select_independent_streams():
    base = normal(1, 2, 3, Stream.WEIGHTS, 4096)
    for other in (
        normal(2, 2, 3, Stream.WEIGHTS, 4096),
        normal(1, 3, 3, Stream.WEIGHTS, 4096),
        normal(1, 2, 4, Stream.WEIGHTS, 4096),
        normal(1, 2, 3, Stream.PERTURBATION, 4096),
    ):
        # Independent N(0,1) samples: correlation ~ N(0, 1/4096), 6 sigma below 0.1.
        assert abs(torch.corrcoef(torch.stack([base, other]))[0, 1]) < 0.1


def test_normals_have_unit_moments():
    x = normal(0, 0, 0, Stream.WEIGHTS, 1 << 20).double()
    n = x.numel()
    # Standard errors: mean 1/sqrt(n) ~ 1e-3, var sqrt(2/n) ~ 1.4e-3, kurtosis sqrt(24/n) ~ 5e-3; 6 sigma.
    assert abs(x.mean()) < 6 / n**0.5
    assert abs(x.var() - 1) < 6 * (2 / n) ** 0.5
    assert abs((x**4).mean() - 3) < 6 * (96 / n) ** 0.5
    assert torch.isfinite(x).all()


def _require_philox_ops() -> None:
    from ntksap_fast._build import loader as _ext

    if not (_ext.load() and _ext.has_op("philox_normal")):
        ext_missing(f"compiled philox_normal unavailable: {_ext.error()}")


@pytest.mark.ext
def test_compiled_normals_match_the_pytorch_twin(monkeypatch):
    _require_philox_ops()
    seed = (5 << 32) + 123
    idx = torch.tensor([0, 3, 4, 2**33 + 5, 10**12])
    compiled = normal(seed, 3, 7, Stream.PERTURBATION, 10007, offset=5), normal_at(seed, 3, 7, Stream.WEIGHTS, idx)
    monkeypatch.setenv("NTKSAP_FAST_NO_EXT", "1")
    twin = normal(seed, 3, 7, Stream.PERTURBATION, 10007, offset=5), normal_at(seed, 3, 7, Stream.WEIGHTS, idx)
    # Same 32-bit words; log, sqrt, cos and sin from libm vs SLEEF differ by a few float32 ulps of
    # values of magnitude up to ~6: 2e-6 absolute.
    for c, t in zip(compiled, twin):
        torch.testing.assert_close(c, t, rtol=0, atol=2e-6)


@pytest.mark.ext
def test_opcheck_philox_ops():
    """Schema, fake implementation and the compiled kernels agree (torch.library.opcheck)."""
    _require_philox_ops()
    ops = torch.ops.ntksap_fast
    for offset, numel in ((0, 0), (5, 1), (3, 1001)):
        torch.library.opcheck(ops.philox_normal.default, (123, 5, 3, 29, offset, numel))
    for index in (torch.tensor([0, 3, 2**33 + 5, 10**12]), torch.arange(12).view(3, 4), torch.zeros(0).long()):
        torch.library.opcheck(ops.philox_normal_at.default, (123, 5, 3, 28, index))


@pytest.mark.ext
def test_philox_fakes_give_the_outputs_shape_dtype_and_device():
    from torch._subclasses.fake_tensor import FakeTensorMode

    _require_philox_ops()
    with FakeTensorMode():
        out = torch.ops.ntksap_fast.philox_normal(1, 2, 3, 4, 5, 17)
        assert out.shape == (17,) and out.dtype == torch.float32 and out.device.type == "cpu"
        out = torch.ops.ntksap_fast.philox_normal_at(1, 2, 3, 4, torch.empty(3, 5, dtype=torch.int64))
        assert out.shape == (3, 5) and out.dtype == torch.float32 and out.device.type == "cpu"


def _cpp_constant(text: str, name: str) -> str:
    found = re.findall(rf"\b{name} = ([^,;]+)[,;]", text)
    assert len(found) == 1, f"csrc/philox.cpp: one definition of {name} expected, found {found}"
    return found[0].strip()


def test_cpp_philox_and_box_muller_constants_equal_the_twins():
    """csrc/philox.cpp spells the constants out in C++: each must equal rng.py's."""
    text = (ROOT / "csrc" / "philox.cpp").read_text()
    assert int(_cpp_constant(text, "kRounds")) == rng.PHILOX_ROUNDS
    for name, value in (("kM0", rng.PHILOX_M0), ("kM1", rng.PHILOX_M1), ("kW0", rng.PHILOX_W0), ("kW1", rng.PHILOX_W1)):
        assert int(_cpp_constant(text, name).rstrip("uU"), 16) == value, name
    assert "r < kRounds" in text, "the round loop must run kRounds rounds"
    assert float(_cpp_constant(text, "kScale").rstrip("f")) == rng.BOX_MULLER_SCALE
    assert _cpp_constant(text, "kTwoPi") == "static_cast<float>(2.0 * M_PI)" and rng.TWO_PI == 2.0 * math.pi
    box_muller = text[text.index("inline void box_muller") : text.index("void check_word")]
    shifts = re.findall(r">>\s*(\w+)\)", box_muller)
    assert len(shifts) == 2 and all(int(k) == rng.BOX_MULLER_SHIFT for k in shifts), shifts


def test_triton_kernels_take_their_constants_from_the_twin():
    """triton_kernels/philox.py writes no constant of its own: its constexprs are rng.py's."""
    text = (ROOT / "triton_kernels" / "philox.py").read_text()
    for value in (rng.PHILOX_M0, rng.PHILOX_M1, rng.PHILOX_W0, rng.PHILOX_W1):
        assert f"{value:x}" not in text.lower(), f"{value:#x} written out in triton_kernels/philox.py"
    assert not re.search(r"5\.96|6\.28|>>\s*8\b", text), "a Box-Muller constant written out"
    pytest.importorskip("triton")
    from ntksap_fast.kernels import philox

    assert (philox._ROUNDS.value, philox._M0.value, philox._M1.value, philox._W0.value, philox._W1.value) == (
        rng.PHILOX_ROUNDS,
        rng.PHILOX_M0,
        rng.PHILOX_M1,
        rng.PHILOX_W0,
        rng.PHILOX_W1,
    )
    assert (philox._SHIFT.value, philox._SCALE.value, philox._TWO_PI.value) == (
        rng.BOX_MULLER_SHIFT,
        rng.BOX_MULLER_SCALE,
        rng.TWO_PI,
    )
