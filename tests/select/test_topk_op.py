"""Masked global top-k, its ops: dispatch between the compiled ops and the PyTorch fallback, the
extension's loading and registration (schemas, opcheck, fake tensors), more than 2^31 entries, and
one sampler for CPU and CUDA. The values are tested in test_topk.py.
"""

from __future__ import annotations

import mmap
import re
import warnings
from pathlib import Path

import pytest
import torch

from ntksap_fast._build import config as _build_config
from ntksap_fast._build import loader as _ext
from ntksap_fast.select import topk


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------
# Dispatch, loading, registration
# ------------------------------------------------------------------------------------------
def test_no_ext_env_forces_torch(monkeypatch):
    monkeypatch.setenv("NTKSAP_FAST_NO_EXT", "1")
    called = []
    real = topk.masked_topk_torch
    monkeypatch.setattr(topk, "masked_topk_torch", lambda *a: called.append(1) or real(*a))
    scores, mask = torch.randn(100, generator=gen(3)), torch.ones(100, dtype=torch.bool)
    want = torch.zeros(100, dtype=torch.bool)
    want[scores.topk(10).indices] = True  # distinct random scores: no ties
    assert torch.equal(topk.masked_topk(scores, mask, 10), want)
    assert called


def test_fallback_warns_once(monkeypatch):
    monkeypatch.delenv("NTKSAP_FAST_NO_EXT", raising=False)
    monkeypatch.delenv("NTKSAP_FAST_REQUIRE_EXT", raising=False)  # (which turns it into an error)
    monkeypatch.setattr(
        _ext, "_state", {"tried": True, "ok": False, "error": "no compiler", "warned": set(), "auto": None}
    )
    scores, mask = torch.randn(100), torch.ones(100, dtype=torch.bool)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        topk.masked_topk(scores, mask, 10)
        topk.masked_topk_(scores, mask.clone(), 10)
    msgs = [str(w.message) for w in rec if "ntksap_fast" in str(w.message)]
    assert len(msgs) == 1 and "no compiler" in msgs[0]
    assert not topk.extension_available() and topk.extension_error() == "no compiler"


def test_cuda_tensors_use_the_compiled_op_only_where_it_has_code(monkeypatch):
    """The dispatch asks _ext.cuda_code_for with the tensor's device (capability faked: no GPU
    needed): an sm_90-only build serves a 9.0 device, not an 8.6 one (one warning)."""
    monkeypatch.delenv("NTKSAP_FAST_NO_EXT", raising=False)
    monkeypatch.delenv("NTKSAP_FAST_REQUIRE_EXT", raising=False)
    monkeypatch.setattr(_ext, "use_compiled", lambda what: True)
    monkeypatch.setattr(topk, "extension_available", lambda: True)
    monkeypatch.setattr(_ext, "has_kernel", lambda op, key: True)
    monkeypatch.setattr(_ext, "cuda_targets", lambda: (_build_config.CudaTarget(9, 0, False),))
    monkeypatch.setitem(_ext._state, "warned", set())
    capability = {"now": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["now"])
    assert topk._use_extension(torch.device("cuda", 0))
    capability["now"] = (8, 6)
    with pytest.warns(RuntimeWarning, match="compute capability 8.6"):
        assert not topk._use_extension(torch.device("cuda", 0))
    assert topk._use_extension(torch.device("cpu"))


@pytest.mark.ext
def test_extension_registered(ext):
    assert topk.extension_error() is None
    for op in ("ntksap_fast::masked_topk", "ntksap_fast::masked_topk_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
    for name, want in _ext.SCHEMAS.items():
        assert str(getattr(torch.ops.ntksap_fast, name).default._schema) == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.ext
def test_opcheck(ext, device, dtype):
    g = gen(11)
    for n in [0, 5, 3000, 70_000]:
        scores = torch.randn(n, generator=g).to(dtype).to(device)
        mask = (torch.rand(n, generator=g) < 0.5).to(device)
        k = int(mask.sum()) // 2
        torch.library.opcheck(torch.ops.ntksap_fast.masked_topk.default, (scores, mask, k))
        torch.library.opcheck(torch.ops.ntksap_fast.masked_topk_.default, (scores, mask.clone(), k))


@pytest.mark.ext
def test_fake_tensor_shapes(ext):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        s = torch.empty(17)
        m = torch.empty(17, dtype=torch.bool)
        out, status = torch.ops.ntksap_fast.masked_topk(s, m, 3)
        assert out.shape == (17,) and out.dtype == torch.bool
        assert status.shape == (2,) and status.dtype == torch.int64 and status.device.type == "cpu"
        status = torch.ops.ntksap_fast.masked_topk_(s, m, 3)
        assert status.shape == (2,) and status.dtype == torch.int64


# ------------------------------------------------------------------------------------------
# More than 2^31 entries, memory-lean: the scores and the mask start as anonymous private
# mappings (zero pages: reading them costs no memory), so only the mask that the op writes
# (2 GiB) and the few pages set here become resident.
# ------------------------------------------------------------------------------------------
def _zeros(n: int, dtype: torch.dtype) -> torch.Tensor:
    """n zeros of dtype backed by an anonymous private mapping (resident only where written)."""
    buf = mmap.mmap(-1, n * torch.empty(0, dtype=dtype).element_size(), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buf, dtype=dtype)


def _available_gib() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] / 2**20


@pytest.mark.slow
@pytest.mark.ext
def test_beyond_int32_indexing(ext, device):
    n = 2**31 + 2**16
    if _available_gib() < 4:
        pytest.fail(f"needs ~3 GiB of free memory, {_available_gib():.1f} GiB available")
    g = gen(14)
    # 1. Random scores on three unpruned ranges, one straddling 2^31 (bracketed path).
    ranges = [(0, 2**20), (2**31 - 2**20, 2**31 + 2**15), (n - 2**14, n)]
    scores, mask = _zeros(n, torch.float16), _zeros(n, torch.bool)
    parts = []
    for b, e in ranges:
        scores[b:e] = torch.randn(e - b, generator=g).to(torch.float16)
        mask[b:e] = True
        parts.append(torch.arange(b, e))
    idx = torch.cat(parts)
    k = idx.numel() // 3
    vals = torch.cat([scores[b:e] for b, e in ranges]).float() + 0.0  # -0.0 == 0.0
    want = idx[torch.sort(vals, descending=True, stable=True).indices[:k]].sort().values
    s_dev, m_dev = (scores, mask) if device == "cpu" else (scores.to(device), mask.to(device))
    topk.masked_topk_(s_dev, m_dev, k)
    assert torch.equal(m_dev.nonzero().squeeze(1).cpu(), want)
    del scores, mask, s_dev, m_dev
    # 2. Ties at 1.0 straddling 2^31, winners on both sides, out of place (exact path).
    scores, mask = _zeros(n, torch.float16), _zeros(n, torch.bool)
    lo = 2**31 - 512
    mask[lo : lo + 1024] = True
    mask[n - 16 :] = True
    scores[2**31 - 300 : 2**31 + 300] = 1.0
    scores[2**31 - 400] = 2.0
    scores[n - 1] = 3.0
    s_dev, m_dev = (scores, mask) if device == "cpu" else (scores.to(device), mask.to(device))
    got = topk.masked_topk(s_dev, m_dev, 402)
    kept = got.nonzero().squeeze(1).cpu().tolist()
    assert kept == sorted([2**31 - 400, n - 1] + list(range(2**31 - 300, 2**31 + 100)))


def test_one_splitmix64_for_the_cpu_and_cuda_samplers():
    """The CPU and CUDA ops sample the same hashed positions: both include csrc/splitmix64.h and no
    source under csrc/ defines a splitmix64 of its own."""
    csrc = Path(__file__).resolve().parents[2] / "csrc"
    for name in ("masked_topk_bracket.cpp", "cuda/masked_topk_fast.cu"):
        text = (csrc / name).read_text()
        assert re.search(r'#include "(\.\./)?splitmix64\.h"', text), f"{name} does not include splitmix64.h"
        assert "splitmix64(" in text, f"{name} no longer samples with splitmix64"
    defining = sorted(
        str(p.relative_to(csrc))
        for p in csrc.rglob("*")
        if p.suffix in (".h", ".cuh", ".cpp", ".cu") and re.search(r"uint64_t\s+splitmix64\s*\(", p.read_text())
    )
    assert defining == ["splitmix64.h"]
