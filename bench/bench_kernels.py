"""Triton kernels against their PyTorch twins on CUDA, side by side (ratios printed at the end).

Groups (sizes from the paper's settings; the baseline of each group has ``reference`` in its name):
* ``normal-16M``: 2**24 standard normals. reference: ``ntksap_fast.engine.rng`` Philox + Box-Muller in
  PyTorch ops on CUDA tensors.
* ``sample-resnet50``: clean + perturbed weights of one draw over a ResNet-50 arena (25.5M
  entries, 50% mask). reference_cpu: the engine's path today (CPU twin, then a copy to the GPU);
  reference: the same PyTorch ops on CUDA tensors.
* ``mask-grad-resnet50-8draws``: ``G += sum_d theta*(g_c+g_p) + eps*z*g_p`` over 8 draws.
  reference: stored theta/z with the engine's ``addcmul_`` pair; triton (theta and z regenerated
  in-kernel, no stored noise), with and without the split-half/sum-of-squares statistics.
* ``bn-stats``: the clean branch's BatchNorm statistics of a ResNet-50 layer-1 activation
  (64 x 64 x 56 x 56, channels-last, float32). reference: the torch path's float64 statistics.
* ``fd-loss``: loss and gradient of (1024, 1000) outputs.

The interpreter is no benchmark: without a CUDA device the module is skipped.
Run: ``pytest bench/bench_kernels.py --benchmark-columns=median,iqr,rounds``.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device (the Triton interpreter is not a benchmark)", allow_module_level=True)
pytest.importorskip("triton")

import torchvision
from ntksap_fast.kernels import batch_stats as bst
from ntksap_fast.kernels import fd_loss as fdl
from ntksap_fast.kernels import mask_grad as mg
from ntksap_fast.kernels import philox
from ntksap_fast.kernels import sample_draw as sd

from ntksap_fast.engine import rng
from ntksap_fast.engine.arena import Arena
from ntksap_fast.engine.batchnorm import batch_stats
from ntksap_fast.engine.draws import DrawKey, sample_weights

DEV = torch.device("cuda")
EPS = 0.01


def _run(benchmark, group: str, fn, rounds: int = 10) -> None:
    """Times ``fn`` with a device synchronisation inside each round."""

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    benchmark.group = group
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=2)


def _torch_normal(seed: int, draw: int, stream: rng.Stream, n: int, device=DEV) -> torch.Tensor:
    """``rng.normal`` with its PyTorch ops on ``device`` tensors (the twin, on the GPU)."""
    block = torch.arange((n + 3) // 4, dtype=torch.int64, device=device)
    words = rng.philox4x32(
        (block & 0xFFFFFFFF, block >> 32, 0, draw * 4 + int(stream)), (seed & 0xFFFFFFFF, seed >> 32)
    )
    return rng._box_muller(words).reshape(-1)[:n]


# --- normals ---------------------------------------------------------------------------------
def test_normal_reference_torch(benchmark):
    _run(benchmark, "normal-16M", lambda: _torch_normal(0, 0, rng.Stream.WEIGHTS, 1 << 24))


def test_normal_triton(benchmark):
    out = torch.empty(1 << 24, device=DEV)
    key, draw = philox.round_key(0, 0, DEV), philox.draw_ids([0], DEV)
    _run(benchmark, "normal-16M", lambda: philox.normal_into(out, key, draw, rng.Stream.WEIGHTS))


# --- draw sampling ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet50_arena():
    arena = Arena(torchvision.models.resnet50())
    mask = torch.rand(arena.numel, generator=torch.Generator().manual_seed(0)) > 0.5
    return arena, mask


def test_sample_reference_cpu(benchmark, resnet50_arena):
    arena, mask = resnet50_arena
    std, mask_f = arena.std_vector(), mask.to(DEV, torch.float32)

    def engine_path():
        key = DrawKey(0, 0, 0)
        theta = sample_weights(arena, key, rng.Stream.WEIGHTS, std, keep=mask).to(DEV)
        z = sample_weights(arena, key, rng.Stream.PERTURBATION, None, keep=mask).to(DEV)
        return mask_f * theta, mask_f * theta.add(z, alpha=EPS)

    _run(benchmark, "sample-resnet50", engine_path, rounds=3)


def test_sample_reference_torch(benchmark, resnet50_arena):
    arena, mask = resnet50_arena
    std, mask_f = arena.std_vector(DEV), mask.to(DEV, torch.float32)

    def torch_path():
        theta = _torch_normal(0, 0, rng.Stream.WEIGHTS, arena.numel) * std
        z = _torch_normal(0, 0, rng.Stream.PERTURBATION, arena.numel)
        return mask_f * theta, mask_f * theta.add(z, alpha=EPS)

    _run(benchmark, "sample-resnet50", torch_path)


def test_sample_triton(benchmark, resnet50_arena):
    arena, mask = resnet50_arena
    table, mask_d = sd.StdTable.from_arena(arena, DEV), mask.to(DEV)
    key, draws = philox.round_key(0, 0, DEV), philox.draw_ids([0], DEV)

    def triton_path():
        w_clean = torch.empty(1, table.numel, device=DEV)
        w_pert = torch.empty_like(w_clean)
        sd.sample_draws_into(w_clean, w_pert, table, key, draws, EPS, mask_d)
        return w_clean, w_pert

    _run(benchmark, "sample-resnet50", triton_path)


# --- mask-gradient reduction -----------------------------------------------------------------
@pytest.fixture(scope="module")
def grads(resnet50_arena):
    arena, mask = resnet50_arena
    table, mask_d = sd.StdTable.from_arena(arena, DEV), mask.to(DEV)
    draws = list(range(8))
    g = torch.Generator(device=DEV).manual_seed(0)
    g_c = torch.randn(len(draws), arena.numel, device=DEV, generator=g)
    g_p = -g_c + 0.01 * torch.randn(len(draws), arena.numel, device=DEV, generator=g)
    theta = torch.stack([_torch_normal(0, d, rng.Stream.WEIGHTS, arena.numel) for d in draws])
    z = torch.stack([_torch_normal(0, d, rng.Stream.PERTURBATION, arena.numel) for d in draws])
    return table, mask_d, draws, g_c, g_p, theta * table.vector().to(DEV) * mask_d, z * mask_d


def test_mask_grad_reference_torch(benchmark, grads):
    table, _, draws, g_c, g_p, theta, z = grads
    G = torch.zeros(table.numel, device=DEV)

    def engine_path():
        for d in range(len(draws)):
            G.addcmul_(theta[d], g_c[d] + g_p[d]).addcmul_(z[d], g_p[d], value=EPS)
        return G

    _run(benchmark, "mask-grad-resnet50-8draws", engine_path)


@pytest.mark.parametrize("stats", [False, True])
def test_mask_grad_triton(benchmark, grads, stats):
    table, mask_d, draws, g_c, g_p, _, _ = grads
    G = torch.zeros(table.numel, device=DEV)
    acc = (torch.zeros_like(G), torch.zeros_like(G)) if stats else None
    key, ids = philox.round_key(0, 0, DEV), philox.draw_ids(draws, DEV)
    _run(
        benchmark,
        "mask-grad-resnet50-8draws",
        lambda: mg.mask_grad_accumulate_into(G, g_c, g_p, table, key, ids, EPS, mask_d, acc),
    )


# --- BatchNorm statistics --------------------------------------------------------------------
@pytest.fixture(scope="module")
def activation():
    g = torch.Generator(device=DEV).manual_seed(0)
    return torch.randn(64, 64, 56, 56, device=DEV, generator=g).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("impl", ["reference_torch", "triton"])
def test_bn_stats(benchmark, activation, impl):
    fn = batch_stats if impl == "reference_torch" else bst.clean_stats
    _run(benchmark, "bn-stats", lambda: fn(activation))


# --- finite-difference loss ------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["reference_torch", "triton"])
def test_fd_loss(benchmark, impl):
    g = torch.Generator(device=DEV).manual_seed(0)
    f_c = torch.randn(4 * 256, 1000, device=DEV, generator=g).requires_grad_()
    f_p = (f_c.detach() + 0.01 * torch.randn(4 * 256, 1000, device=DEV, generator=g)).requires_grad_()
    fn = fdl.fd_loss_reference if impl == "reference_torch" else fdl.fd_loss

    def fwd_bwd():
        return torch.autograd.grad(fn(f_c, f_p), (f_c, f_p))

    _run(benchmark, "fd-loss", fwd_bwd)
