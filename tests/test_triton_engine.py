"""The engine's Triton path against its PyTorch path, and the backend dispatch.

Without a CUDA device the Triton path runs on CPU tensors under ``TRITON_INTERPRET=1`` (set here
before triton is imported) with ``NTKSAP_FAST_BACKEND=triton``; with one, the same tests run
compiled on CUDA tensors. Same seeds, so the same draws: the scores agree to float32 rounding
(normals within ``NORMAL_TOL``, one-pass float32 BatchNorm statistics within ~1 ulp of the
float64 ones), checked with the oracle tests' float32 criterion.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from torch import nn  # noqa: E402

from ntksap_fast import ntk_sap_scores  # noqa: E402
from ntksap_fast.backend import ENV_VAR, resolve_backend  # noqa: E402
from ntksap_fast.models import CifarResNet  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _assert_float32_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """tests/test_oracle.py's criterion: 99.9% within rtol/atol 1e-4 (of the max), relative L2 <= 1e-2."""
    scale = expected.abs().max().item()
    within = (actual - expected).abs() <= 1e-4 * scale + 1e-4 * expected.abs()
    assert within.float().mean().item() >= 0.999
    assert ((actual - expected).norm() / expected.norm()).item() <= 1e-2


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5))


def _convnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


# ResNet-8 (78k weights) once: under the interpreter the cost is the Philox work per weight.
CASES = {"resnet8": (lambda: CifarResNet(8), (3, 8, 8)), "mlp": (_mlp, (20,)), "convnet": (_convnet, (3, 7, 7))}


def _scores(monkeypatch, backend: str, build, shape, **kwargs) -> torch.Tensor:
    monkeypatch.setenv(ENV_VAR, backend)
    torch.manual_seed(0)
    scores = ntk_sap_scores(build().to(DEVICE), shape, seed=3, round=1, **kwargs)
    return torch.cat([v.flatten() for v in scores.values()]).cpu()


@pytest.mark.parametrize("name,kwargs", [
    ("resnet8", dict(draws=2, batch_size=4)),
    ("mlp", dict(draws=2, batch_size=[6, 5])),
    ("convnet", dict(draws=2, batch_size=5, micro_batch=2)),
    ("mlp", dict(draws=3, batch_size=6, draw_batch=2)),
])
def test_triton_scores_match_torch(monkeypatch, name, kwargs):
    build, shape = CASES[name]
    want = _scores(monkeypatch, "torch", build, shape, **kwargs)
    got = _scores(monkeypatch, "triton", build, shape, **kwargs)
    assert want.abs().max() > 0
    _assert_float32_close(got, want)


def test_triton_scores_with_mask(monkeypatch):
    """Pruned entries get score 0 and the rest match the torch path (sparse vs dense sampling)."""
    monkeypatch.setenv(ENV_VAR, "torch")
    model = _mlp().to(DEVICE)
    gen = torch.Generator().manual_seed(5)
    masks = {n: (torch.rand(p.shape, generator=gen) > 0.9).to(DEVICE) for n, p in model.named_parameters()
             if n.endswith("weight") and p.dim() == 2}
    want = ntk_sap_scores(model, draws=2, batch_size=4, masks=masks, input_shape=(20,))
    monkeypatch.setenv(ENV_VAR, "triton")
    got = ntk_sap_scores(model, draws=2, batch_size=4, masks=masks, input_shape=(20,))
    for n in masks:
        assert not got[n][~masks[n]].any()
        _assert_float32_close(got[n].cpu(), want[n].cpu())


def test_dispatch(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend(cpu, torch.float32) == "torch"
    assert resolve_backend(cuda, torch.float32) == "triton"
    assert resolve_backend(cuda, torch.float64) == "torch"
    monkeypatch.setenv(ENV_VAR, "torch")
    assert resolve_backend(cuda, torch.float32) == "torch"
    monkeypatch.setenv(ENV_VAR, "triton")
    assert resolve_backend(torch.device(DEVICE), torch.float32) == "triton"
    with pytest.raises(ValueError, match="float64"):
        resolve_backend(torch.device(DEVICE), torch.float64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend(cpu, torch.float32)
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=ENV_VAR):
        ntk_sap_scores(_mlp(), (20,), draws=1, batch_size=2)


def test_forced_triton_without_triton_is_an_error(monkeypatch):
    import ntksap_fast.backend as backend

    monkeypatch.setattr(backend, "_triton_installed", lambda: False)
    monkeypatch.setenv(ENV_VAR, "triton")
    with pytest.raises(ImportError, match="triton is not installed"):
        resolve_backend(torch.device("cuda"), torch.float32)
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setattr(backend, "_warned_no_triton", False)
    with pytest.warns(RuntimeWarning, match="triton is not installed"):
        assert resolve_backend(torch.device("cuda"), torch.float32) == "torch"
