"""Masked global top-k, its values and errors: the compiled ops and the PyTorch fallback against a
torch.sort reference (dispatch, loading and registration: test_topk_op.py).

Every case runs on every implementation ("op": torch.ops.ntksap_fast.masked_topk, "op_": the
in-place op, both through their status, "api"/"api_": ntksap_fast.select.topk.masked_topk(_), "torch":
the pure-PyTorch fallback) and on every device (cpu; cuda when a CUDA device is present).

A missing or broken compiled extension fails these tests (it does not skip them) unless
NTKSAP_FAST_ALLOW_NO_EXT=1 says that is expected.
"""

from __future__ import annotations

import pytest
import torch

from ntksap_fast.select import topk

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


# ------------------------------------------------------------------------------------------
# Reference and implementations
# ------------------------------------------------------------------------------------------
def reference(scores: torch.Tensor, mask: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Stable descending sort of the unpruned scores (float64, -0.0 -> +0.0), first n_keep."""
    scores, mask = scores.detach().cpu(), mask.cpu()
    idx = mask.nonzero().squeeze(1)
    vals = scores[idx].double() + 0.0
    order = torch.sort(vals, descending=True, stable=True).indices[:n_keep]
    out = torch.zeros(mask.shape, dtype=torch.bool)
    out[idx[order]] = True
    return out


def _op(s, m, k):
    """The out-of-place op; a non-ok status must come with an all-False result."""
    out, status = torch.ops.ntksap_fast.masked_topk(s, m, k)
    assert status.dtype == torch.int64 and status.device.type == "cpu" and status.shape == (2,)
    count, nan = status.tolist()
    if nan or k > count:
        assert not bool(out.any()), "a failed call returned selections"
    topk._raise_for_status(status, k)
    return out


def _op_(s, m, k):
    """The in-place op; a non-ok status must leave the mask unchanged."""
    m0 = m.clone()
    m = m.clone()
    status = torch.ops.ntksap_fast.masked_topk_(s, m, k)
    count, nan = status.tolist()
    if nan or k > count:
        assert torch.equal(m, m0), "a failed call changed the mask"
    topk._raise_for_status(status, k)
    return m


def _api_(s, m, k):
    m = m.clone()
    r = topk.masked_topk_(s, m, k)
    assert r is m
    return m


IMPLS = {
    "op": _op,
    "op_": _op_,
    "api": topk.masked_topk,
    "api_": _api_,
    "torch": topk.masked_topk_torch,
}


@pytest.fixture(params=[pytest.param(name, marks=pytest.mark.ext) if name in ("op", "op_") else name for name in IMPLS])
def impl(request):
    if request.param in ("op", "op_"):
        request.getfixturevalue("ext")
    return IMPLS[request.param]


_REF_CACHE: dict = {}


def check(impl, scores, mask, n_keep, key=None):
    """Compare impl with the reference; `key` (the case's parameters) caches the reference so
    the same case on several implementations sorts only once."""
    got = impl(scores, mask, n_keep)
    if key is None:
        want = reference(scores, mask, n_keep)
    else:
        if (key, n_keep) not in _REF_CACHE:
            _REF_CACHE[(key, n_keep)] = reference(scores, mask, n_keep)
        want = _REF_CACHE[(key, n_keep)]
    assert got.dtype == torch.bool and got.shape == mask.shape
    assert got.device == mask.device
    got = got.cpu()
    assert int(got.sum()) == n_keep
    assert not bool((got & ~mask.cpu()).any()), "kept a pruned entry"
    if not torch.equal(got, want):
        bad = (got != want).nonzero().squeeze(1)[:10].tolist()
        raise AssertionError(f"mismatch at {bad}: scores {scores.cpu()[bad].tolist()}")
    return got


def keeps(count: int) -> list[int]:
    return sorted({0, 1, count // 3, count // 2, count - 1, count} & set(range(count + 1)))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 1000, 70_001, 1_000_003])
def test_random(impl, device, dtype, n):
    g = gen(n)
    scores = torch.randn(n, generator=g).to(dtype)
    mask = torch.rand(n, generator=g) < 0.7
    count = int(mask.sum())
    for k in keeps(count) if n < 50_000 else [count // 3, count - 5]:
        check(impl, scores.to(device), mask.to(device), k, key=("random", n, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_arena_like_scales(impl, device, dtype):
    """Per-layer blocks of very different scales (like NTK-SAP scores), most mass near 0."""
    g = gen(1)
    sizes = [3, 1728, 36_864, 147_456, 10, 64_000, 250_003]
    parts = [torch.randn(sz, generator=g).abs() * 10.0 ** (i % 5 - 3) for i, sz in enumerate(sizes)]
    scores = torch.cat(parts).to(dtype)
    mask = torch.rand(scores.numel(), generator=g) < 0.4
    count = int(mask.sum())
    for k in [count // 20, count // 2, count - count // 20]:
        check(impl, scores.to(device), mask.to(device), k, key=("arena", dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1000, 150_001])
def test_heavy_ties(impl, device, dtype, n):
    g = gen(2)
    scores = torch.randint(0, 3, (n,), generator=g).to(dtype)
    mask = torch.rand(n, generator=g) < 0.8
    count = int(mask.sum())
    for k in keeps(count) if n < 50_000 else [1, count // 2, count - 1]:
        check(impl, scores.to(device), mask.to(device), k, key=("ties", n, dtype))


@pytest.mark.parametrize("n", [7, 150_000])
def test_all_equal(impl, device, n):
    scores = torch.full((n,), 0.25)
    mask = torch.ones(n, dtype=torch.bool)
    mask[::3] = False
    count = int(mask.sum())
    for k in keeps(count) if n < 50_000 else [1, count // 2, count - 1]:
        got = check(impl, scores.to(device), mask.to(device), k, key=("equal", n))
        # ties keep the lowest indices: the first k unpruned entries
        assert torch.equal(got.nonzero().squeeze(1), mask.nonzero().squeeze(1)[:k])


@pytest.mark.parametrize("dtype", DTYPES)
def test_infinities(impl, device, dtype):
    g = gen(3)
    n = 5000
    scores = torch.randn(n, generator=g)
    r = torch.rand(n, generator=g)
    scores[r < 0.1] = float("inf")
    scores[r > 0.9] = float("-inf")
    scores = scores.to(dtype)
    mask = torch.rand(n, generator=g) < 0.9
    count = int(mask.sum())
    n_pos, n_neg = int((mask & (r < 0.1)).sum()), int((mask & (r > 0.9)).sum())
    for k in keeps(count) + [n_pos, n_pos + 1, count - n_neg, count - n_neg - 1]:
        check(impl, scores.to(device), mask.to(device), k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_signed_zeros_are_equal(impl, device, dtype):
    scores = torch.tensor([-0.0, 0.0, -0.0, 1.0, 0.0, -1.0, -0.0], dtype=dtype)
    mask = torch.tensor([True, True, True, True, True, True, True])
    got = impl(scores.to(device), mask.to(device), 3).cpu()
    assert got.tolist() == [True, True, False, True, False, False, False]
    got = impl(scores.to(device), mask.to(device), 5).cpu()
    assert got.tolist() == [True, True, True, True, True, False, False]
    g = gen(4)
    big = torch.where(torch.rand(70_000, generator=g) < 0.5, -0.0, 0.0).to(dtype)
    big[::7] = 1.0
    m = torch.rand(70_000, generator=g) < 0.9
    for k in [int(m[::7].sum()) + 3, int(m.sum()) // 2]:
        check(impl, big.to(device), m.to(device), k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_finite_values(impl, device, dtype):
    info = torch.finfo(dtype)
    vals = [info.max, -info.max, info.tiny, -info.tiny, info.eps, 0.0, -0.0, 1.0, -1.0]
    if dtype != torch.bfloat16:
        vals += [info.tiny / 4, -info.tiny / 4]  # subnormals
    scores = torch.tensor(vals * 3, dtype=dtype)
    mask = torch.ones(scores.numel(), dtype=torch.bool)
    for k in keeps(scores.numel()):
        check(impl, scores.to(device), mask.to(device), k)


# ------------------------------------------------------------------------------------------
# Masks and shapes
# ------------------------------------------------------------------------------------------
def test_everything_pruned(impl, device):
    scores = torch.randn(1000).to(device)
    mask = torch.zeros(1000, dtype=torch.bool, device=device)
    got = impl(scores, mask, 0)
    assert not bool(got.any())
    with pytest.raises(ValueError, match="n_keep"):
        impl(scores, mask, 1)


@pytest.mark.parametrize("density", [0.0005, 0.01, 0.999])
def test_sparse_and_dense_masks(impl, device, density):
    g = gen(5)
    n = 300_000
    scores = torch.rand(n, generator=g)
    mask = torch.rand(n, generator=g) < density
    count = int(mask.sum())
    for k in [1, count // 2, count - 1]:
        check(impl, scores.to(device), mask.to(device), k, key=("density", density))


def test_pruned_entries_never_return(impl, device):
    """The largest scores are pruned: they must stay pruned."""
    scores = torch.arange(100, dtype=torch.float32)
    mask = torch.ones(100, dtype=torch.bool)
    mask[90:] = False
    got = impl(scores.to(device), mask.to(device), 5).cpu()
    assert got.nonzero().squeeze(1).tolist() == [85, 86, 87, 88, 89]


@pytest.mark.parametrize("n", [1000, 300_000])
def test_pruned_zeros_never_win_a_zero_tie_at_the_cut(impl, device, n):
    """Scores are ``|G| * mask``: pruned entries score exactly 0, and so do unpruned entries whose
    unit lost every input. With fewer positive scores than ``n_keep`` the cut falls among exact
    zeros: unpruned zeros fill it, lowest index first; pruned zeros (many at lower indices) stay out."""
    g = gen(21)
    mask = torch.rand(n, generator=g) < 0.6
    mask[: n // 10] = False  # pruned zeros below every unpruned zero
    scores = torch.rand(n, generator=g) * mask
    scores[(torch.rand(n, generator=g) < 0.5) & mask] = 0.0
    scores[(scores == 0) & (torch.arange(n) % 7 == 0)] = -0.0  # -0.0 among the zeros
    positives, count = int((scores > 0).sum()), int(mask.sum())
    for n_keep in (positives + 1, (positives + count) // 2, count - 1):
        got = check(impl, scores.to(device), mask.to(device), n_keep, key=("zero-ties", n))
        assert int((got & (scores == 0)).sum()) == n_keep - positives  # the cut is among the zeros


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty(impl, device, dtype):
    scores = torch.empty(0, dtype=dtype, device=device)
    mask = torch.empty(0, dtype=torch.bool, device=device)
    got = impl(scores, mask, 0)
    assert got.shape == (0,) and got.dtype == torch.bool
    with pytest.raises(ValueError, match="n_keep"):
        impl(scores, mask, 1)


@pytest.mark.parametrize("n", [999, 200_001])
def test_non_contiguous(impl, device, n):
    g = gen(6)
    base_s = torch.randn(n, 3, generator=g).to(device)
    base_m = (torch.rand(3, n, generator=g) < 0.6).to(device)
    scores, mask = base_s[:, 1], base_m[2]  # strided scores, contiguous row of mask
    count = int(mask.sum())
    check(impl, scores, mask, count // 2, key=("strided", n))
    scores2 = torch.randn(2 * n, generator=g).to(device)[::2]
    mask2 = (torch.rand(n, 2, generator=g) < 0.6).to(device)[:, 0]  # strided mask
    check(impl, scores2, mask2, int(mask2.sum()) // 3, key=("strided2", n))


def test_inplace_writes_through_strided_mask(device, request):
    g = gen(7)
    scores = torch.randn(500, generator=g).to(device)
    base = torch.ones(500, 2, dtype=torch.bool, device=device)
    mask = base[:, 1]
    want = reference(scores, mask, 100)
    out = topk.masked_topk_(scores, mask, 100)
    assert out is mask
    assert torch.equal(base[:, 1].cpu(), want)
    assert bool(base[:, 0].all()), "in-place op touched memory outside the mask view"
    request.getfixturevalue("ext")  # the op itself from here
    base = torch.ones(500, 2, dtype=torch.bool, device=device)
    status = torch.ops.ntksap_fast.masked_topk_(scores, base[:, 1], 100)
    assert status.tolist() == [500, 0]
    assert torch.equal(base[:, 1].cpu(), want) and bool(base[:, 0].all())
    # A failing call leaves a strided mask (and what lies between its entries) unchanged.
    scores[3] = float("nan")
    base = torch.ones(500, 2, dtype=torch.bool, device=device)
    status = torch.ops.ntksap_fast.masked_topk_(scores, base[:, 1], 100)
    assert status.tolist() == [500, 1] and bool(base.all())


def test_out_of_place_leaves_inputs_alone(impl, device):
    g = gen(8)
    scores = torch.randn(10_000, generator=g).to(device)
    mask = (torch.rand(10_000, generator=g) < 0.5).to(device)
    s0, m0 = scores.clone(), mask.clone()
    if impl in (IMPLS["op"], IMPLS["api"], IMPLS["torch"]):
        impl(scores, mask, 100)
        assert torch.equal(mask, m0)
    impl(scores, mask, 100)
    assert torch.equal(scores, s0)


def test_large(impl, device):
    g = gen(9)
    n = 5_000_000
    scores = torch.rand(n, generator=g)
    mask = torch.rand(n, generator=g) < 0.5
    count = int(mask.sum())
    check(impl, scores.to(device), mask.to(device), count // 10, key=("large",))


def test_large_two_values(device):
    """Many candidates at one threshold region: exercises the fallback paths of the CPU op."""
    g = gen(10)
    n = 3_000_000
    scores = torch.randint(0, 2, (n,), generator=g).float()
    scores[::1000] = 0.5
    mask = torch.rand(n, generator=g) < 0.9
    count = int(mask.sum())
    for k in [count // 2, int((mask & (scores == 1)).sum()) + 7]:
        check(topk.masked_topk, scores.to(device), mask.to(device), k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_close_values(device, dtype):
    """Three values sharing their top 16 bits: the CPU op needs more than one radix digit."""
    n = 3_000_000
    i = torch.arange(n)
    scores = (1.0 + (i * 7 % 3).double() * 2.0**-20).to(dtype)
    mask = torch.ones(n, dtype=torch.bool)
    mask[::11] = False
    count = int(mask.sum())
    for k in [count // 2, count // 3 + 5]:
        check(topk.masked_topk, scores.to(device), mask.to(device), k)


def _sample_positions(n: int, log_s: int) -> list[int]:
    """Positions the ops sample to bracket the threshold (mirrors csrc/): one per stratum of
    n / 2^log_s, at floor((j + splitmix64(j) / 2^64) * n / 2^log_s)."""
    m64 = (1 << 64) - 1
    out = []
    for j in range(1 << log_s):
        x = (j + 0x9E3779B97F4A7C15) & m64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m64
        x ^= x >> 31
        out.append((j * n + ((x * n) >> 64)) >> log_s)
    return out


def _cpu_log_samples(n: int) -> int:
    return min(max((n // 256).bit_length() - 1, 12), 16)


@pytest.mark.parametrize("n", [200_000, 1_100_000])
def test_adversarial_sample(impl, device, n):
    """Scores at the positions the ops sample (CPU: 2^12..2^16 of them; CUDA from 2^20 entries:
    2^16) are unrepresentative, so the bracket misses and the exact path must run. Correct on
    every implementation."""
    g = gen(12)
    scores = torch.rand(n, generator=g)
    pos = set(_sample_positions(n, _cpu_log_samples(n)))
    if n >= 2**20:
        pos |= set(_sample_positions(n, 16))
    pos = torch.tensor(sorted(pos))
    scores[pos] += 10.0
    mask = torch.rand(n, generator=g) < 0.9
    mask[pos] = True
    count = int(mask.sum())
    for k in [count // 2, count // 100]:
        check(impl, scores.to(device), mask.to(device), k, key=("adversarial", n, 1))
    scores[pos] -= 20.0
    check(impl, scores.to(device), mask.to(device), count // 2, key=("adversarial", n, 2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_half_ties(device, dtype):
    """3M 16-bit scores: thousands of entries share each key near the threshold (the CUDA op's
    tie path; the CPU op's cut by index among one key)."""
    g = gen(13)
    n = 3_000_000
    scores = torch.randn(n, generator=g).abs().to(dtype)
    mask = torch.rand(n, generator=g) < 0.8
    count = int(mask.sum())
    for k in [count // 2, count // 5]:
        check(topk.masked_topk, scores.to(device), mask.to(device), k, key=("half-ties", dtype))
        check(topk.masked_topk_, scores.to(device), mask.to(device).clone(), k, key=("half-ties", dtype))


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------
def test_nan_raises(impl, device):
    for n in [10, 200_000]:
        scores = torch.randn(n)
        scores[n // 2] = float("nan")
        mask = torch.ones(n, dtype=torch.bool)
        with pytest.raises(ValueError, match="NaN"):
            impl(scores.to(device), mask.to(device), 3)
        mask[n // 2] = False  # NaN at a pruned entry is ignored
        check(impl, scores.to(device), mask.to(device), 3)


def test_nan_leaves_mask_unchanged(device):
    scores = torch.randn(100_000)
    scores[7] = float("nan")
    mask = torch.ones(100_000, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="NaN"):
        topk.masked_topk_(scores.to(device), mask, 10)
    assert bool(mask.all())


@pytest.mark.parametrize("bad", [-1, 7, 100])
def test_n_keep_out_of_range(impl, device, bad):
    scores = torch.randn(10, device=device)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="n_keep"):
        impl(scores, mask, bad)


def test_wrong_dtypes(impl, device):
    mask = torch.ones(4, dtype=torch.bool, device=device)
    for dt in [torch.int32, torch.int64, torch.bool, torch.complex64]:
        with pytest.raises(TypeError, match="scores"):
            impl(torch.ones(4, device=device).to(dt), mask, 1)
    for dt in [torch.uint8, torch.float32, torch.int64]:
        with pytest.raises(TypeError, match="mask"):
            impl(torch.ones(4, device=device), mask.to(dt), 1)


def test_wrong_shapes(impl, device):
    with pytest.raises(ValueError, match="scores"):
        impl(torch.ones(2, 2, device=device), torch.ones(4, dtype=torch.bool, device=device), 1)
    with pytest.raises(ValueError, match="mask"):
        impl(torch.ones(4, device=device), torch.ones(2, 2, dtype=torch.bool, device=device), 1)
    with pytest.raises(ValueError, match="same length"):
        impl(torch.ones(4, device=device), torch.ones(5, dtype=torch.bool, device=device), 1)
    with pytest.raises(ValueError, match="scores"):
        impl(torch.tensor(1.0, device=device), torch.tensor(True, device=device), 1)


@pytest.mark.parametrize("fn", [topk.masked_topk, topk.masked_topk_, topk.masked_topk_torch])
def test_wrong_argument_types(fn):
    s, m = torch.ones(4), torch.ones(4, dtype=torch.bool)
    with pytest.raises(TypeError, match="n_keep"):
        fn(s, m, 1.5)
    with pytest.raises(TypeError, match="n_keep"):
        fn(s, m, True)
    with pytest.raises(TypeError, match="scores"):
        fn([1.0, 2.0], m, 1)
    with pytest.raises(TypeError, match="mask"):
        fn(s, [True] * 4, 1)
    assert int(fn(s, m, torch.tensor(2)).sum()) == 2  # 0-d integer tensors are accepted
