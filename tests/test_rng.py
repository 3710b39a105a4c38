"""The Philox-4x32-10 twin: known-answer vectors and the counter contract."""
import torch

from _requires_ext import ext_missing
from ntksap_fast.rng import Stream, normal, normal_at, philox4x32

# Known-answer vectors of Random123 (Salmon et al.) for philox4x32, 10 rounds.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
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
    for other in (normal(2, 2, 3, Stream.WEIGHTS, 4096), normal(1, 3, 3, Stream.WEIGHTS, 4096),
                  normal(1, 2, 4, Stream.WEIGHTS, 4096), normal(1, 2, 3, Stream.PERTURBATION, 4096)):
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


def test_compiled_normals_match_the_pytorch_twin(monkeypatch):
    from ntksap_fast import _ext

    if not (_ext.load() and _ext.has_op("philox_normal")):
        ext_missing(f"compiled philox_normal unavailable: {_ext.error()}")
    seed = (5 << 32) + 123
    idx = torch.tensor([0, 3, 4, 2**33 + 5, 10**12])
    compiled = normal(seed, 3, 7, Stream.PERTURBATION, 10007, offset=5), normal_at(seed, 3, 7, Stream.WEIGHTS, idx)
    monkeypatch.setenv("NTKSAP_FAST_NO_EXT", "1")
    twin = normal(seed, 3, 7, Stream.PERTURBATION, 10007, offset=5), normal_at(seed, 3, 7, Stream.WEIGHTS, idx)
    # Same 32-bit words; log, sqrt, cos and sin from libm vs SLEEF differ by a few float32 ulps of
    # values of magnitude up to ~6: 2e-6 absolute.
    for c, t in zip(compiled, twin):
        torch.testing.assert_close(c, t, rtol=0, atol=2e-6)
