"""Triton kernels (ntksap_fast.kernels) against their PyTorch twins.

Without a CUDA device the kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (set here before
triton is imported), and ``test_kernels_compile_for_sm90`` compiles the non-interpreted kernels for
sm_90 with triton's bundled ptxas (type checks and lowering, no GPU needed); with a CUDA device the
same cases run compiled on CUDA tensors and the CPU cases skip.

Tolerances (each justified in the kernel module's docstring):
* Philox words: bit-exact.
* normals: ``|a - b| <= NORMAL_TOL * max(1, |b|)`` (2e-6; log/cos/sin of different libraries).
* sampled weights: the normals' tolerance times the std (float32); one bf16 ulp (2**-7 relative)
  for bf16 outputs, since float32 values a few ulps apart may round to neighbouring bf16 values
  (and the interpreter truncates float32 -> bf16 where the GPU rounds to nearest).
* mask gradient: 1e-5 of the largest |G| (sum over draws of products of regenerated normals).
* BatchNorm statistics: var rtol 5e-7 (~4 ulps; ~1 ulp measured), mean 2.5e-7 of |mean| + std,
  against float64 statistics, also for |mean| >> std.
* finite-difference loss gradients: exact in float32.
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from torch import nn  # noqa: E402

from ntksap_fast import rng  # noqa: E402
from ntksap_fast.arena import Arena  # noqa: E402
from ntksap_fast.draws import DrawKey, sample_inputs, sample_weights  # noqa: E402
from ntksap_fast.engine import Engine, EngineConfig  # noqa: E402
from ntksap_fast.kernels import batch_stats as bst  # noqa: E402
from ntksap_fast.kernels import fd_loss as fdl  # noqa: E402
from ntksap_fast.kernels import mask_grad as mg  # noqa: E402
from ntksap_fast.kernels import philox  # noqa: E402
from ntksap_fast.kernels import sample_draw as sd  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1 (not set: a CUDA device is present)")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
BF16_RTOL = 2.0**-7
SIZES = [7, 1, 300, 0, 33, 1029]  # odd sizes, one element, an empty tensor, not multiples of a block
STDS = [0.5, 1.0, 0.1, 3.0, 0.2, 0.05]


def _normal_close(a: torch.Tensor, b: torch.Tensor) -> None:
    a, b = a.cpu(), b.cpu()
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    bound = philox.NORMAL_TOL * b.abs().clamp(min=1.0)
    assert bool(((a - b).abs() <= bound).all()), f"max error {(a - b).abs().max().item():.3g}"


# ---------------------------------------------------------------------------------------------
# Philox and normals
# ---------------------------------------------------------------------------------------------
KAT = [  # Random123 known answers, philox4x32-10
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("device", DEVICES)
def test_philox_words_bit_exact(device):
    for counter, key, expected in KAT:
        words = philox.philox4x32(tuple(torch.tensor([c], device=device) for c in counter), key)
        assert tuple(int(w) for w in words) == expected
    g = torch.Generator().manual_seed(0)
    n = 10_000
    counters = [torch.randint(0, 2**32, (n,), generator=g, dtype=torch.int64) for _ in range(4)]
    counters[0][:64] = torch.arange(2**32 - 64, 2**32)  # block lo word at the 2**32 wraparound
    counters[1][:32] = 2**32 - 1
    counters[2][64:96] = 0
    for key in ((2**32 - 1, 2**32 - 1), (0x12345678, 0), (0, 0xDEADBEEF)):
        got = philox.philox4x32(tuple(c.to(device) for c in counters), key)
        want = rng.philox4x32(tuple(counters), key)
        for w_got, w_want in zip(got, want):
            assert torch.equal(w_got.cpu(), w_want)


@pytest.mark.parametrize("device", DEVICES)
def test_normals_match_twin(device):
    cases = [(0, 0, 0, rng.Stream.WEIGHTS, 4099, 0), (2**64 - 1, 2**32 - 1, 2**30 - 1, rng.Stream.INPUTS, 1, 5),
             (2**40 + 7, 3, 5, rng.Stream.PERTURBATION, 1001, 3), (9, 1, 2, rng.Stream.WEIGHTS, 6, 2**34 + 1)]
    for seed, rnd, draw, stream, numel, offset in cases:
        got = philox.normal(seed, rnd, draw, stream, numel, offset=offset, device=device)
        _normal_close(got, rng.normal(seed, rnd, draw, stream, numel, offset=offset))


@pytest.mark.parametrize("device", DEVICES)
def test_counters_are_read_on_the_device(device):
    """One launch reads seed, round and draw from tensors: rewriting them gives the other draw's numbers."""
    key, draw = philox.round_key(5, 1, device), philox.draw_ids([2], device)
    out = torch.empty(37, device=device)
    philox.normal_into(out, key, draw, rng.Stream.INPUTS, offset=3)
    _normal_close(out, rng.normal(5, 1, 2, rng.Stream.INPUTS, 37, offset=3))
    key.copy_(philox.round_key(2**64 - 1, 9, "cpu"))
    draw.fill_(7)
    philox.normal_into(out, key, draw, rng.Stream.INPUTS, offset=3)
    _normal_close(out, rng.normal(2**64 - 1, 9, 7, rng.Stream.INPUTS, 37, offset=3))
    with pytest.raises(ValueError, match="draws"):
        philox.draw_ids([2**30], device)
    with pytest.raises(ValueError, match="round"):
        philox.round_key(0, 2**32, device)


# ---------------------------------------------------------------------------------------------
# Draw sampling and mask-gradient reduction
# ---------------------------------------------------------------------------------------------
def _weights_close(a: torch.Tensor, b: torch.Tensor, std: torch.Tensor) -> None:
    """Sampled values ``std * n (+ eps * z)``: the normals' error scaled by std; bf16: one ulp more."""
    bf16 = a.dtype == torch.bfloat16
    a, b, std = a.cpu().float(), b.cpu().float(), std.cpu()
    bound = 4 * philox.NORMAL_TOL * (std + b.abs()) + (BF16_RTOL * b.abs() if bf16 else 0)
    assert bool(((a - b).abs() <= bound).all()), f"max error {(a - b).abs().max().item():.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_draws_match_twin(device, dtype):
    table = sd.StdTable.from_sizes(SIZES, STDS, device)
    std = table.vector()
    mask = torch.rand(table.numel, generator=torch.Generator().manual_seed(1)) > 0.3
    draws = [0, 3, 2**30 - 1]
    for m in (None, mask.to(device)):
        got = sd.sample_draws(table, 2**63 + 5, 7, draws, 0.01, m, dtype=dtype)
        want = sd.sample_draws_reference(table, 2**63 + 5, 7, draws, 0.01, m, dtype=dtype)
        assert [t.dtype for t in got] == [dtype, dtype]
        assert all(t.shape == (3, table.numel) and t.device.type == device for t in got)
        for a, b in zip(got, want):
            _weights_close(a, b, std)
        if m is not None:
            assert bool((got[0][:, ~m] == 0).all()) and bool((got[1][:, ~m] == 0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_sample_draws_on_an_arena_equal_the_engine_draws(device):
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.Conv1d(5, 2, 1), nn.Linear(7, 3))
    arena = Arena(model)
    table = sd.StdTable.from_arena(arena, device)
    assert torch.equal(table.vector(), arena.std_vector())
    theta, theta_plus_z = sd.sample_draws(table, 11, 2, [4], 1.0)
    key = DrawKey(11, 2, 4)
    _normal_close(theta[0] / table.vector().to(device), sample_weights(arena, key, rng.Stream.WEIGHTS, None))
    z = sample_weights(arena, key, rng.Stream.PERTURBATION, None)
    torch.testing.assert_close((theta_plus_z - theta)[0].cpu(), z, rtol=0, atol=4 * philox.NORMAL_TOL * 6)
    one = sd.StdTable.from_sizes([1], [0.25], device)  # one tensor of one element
    w_c, w_p = sd.sample_draws(one, 0, 0, [0], 0.01)
    theta1 = 0.25 * rng.normal(0, 0, 0, rng.Stream.WEIGHTS, 1)
    torch.testing.assert_close(w_c.cpu(), theta1.view(1, 1), rtol=philox.NORMAL_TOL, atol=philox.NORMAL_TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_mask_grad_matches_twin(device):
    table = sd.StdTable.from_sizes(SIZES, STDS, device)
    n = table.numel
    g = torch.Generator().manual_seed(2)
    g_c = torch.randn(3, n, generator=g)
    g_p = (-g_c + 0.01 * torch.randn(3, n, generator=g)).to(device)  # near-opposite branches
    g_c = g_c.to(device)
    mask = (torch.rand(n, generator=g) > 0.4).to(device)
    draws = [4, 1, 0]
    for m in (None, mask):
        G0 = torch.randn(n, generator=g).to(device)
        got = mg.mask_grad_accumulate(G0.clone(), g_c, g_p, table, 99, 1, draws, 0.01, m)
        want = mg.mask_grad_reference(G0.clone(), g_c, g_p, table, 99, 1, draws, 0.01, m)
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)
        start = [torch.randn(n, generator=g).to(device) for _ in range(2)]
        stats = [tuple(t.clone() for t in start) for _ in range(2)]
        got_s = mg.mask_grad_accumulate(G0.clone(), g_c, g_p, table, 99, 1, draws, 0.01, m, stats=stats[0])
        want_s = mg.mask_grad_reference(G0.clone(), g_c, g_p, table, 99, 1, draws, 0.01, m, stats=stats[1])
        torch.testing.assert_close(got_s, want_s, rtol=1e-5, atol=1e-5 * scale)
        for a, b in zip(stats[0], stats[1]):  # odd draws' share, sum of squares
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    gc16, gp16 = g_c[1:2].bfloat16(), g_p[1:2].bfloat16()  # bf16 gradients, one draw
    bf = mg.mask_grad_accumulate(torch.zeros(n, device=device), gc16, gp16, table, 5, 0, [2], 0.01)
    want = mg.mask_grad_reference(torch.zeros(n, device=device), gc16.float(), gp16.float(), table, 5, 0, [2], 0.01)
    torch.testing.assert_close(bf, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


# ---------------------------------------------------------------------------------------------
# BatchNorm statistics and the finite-difference loss
# ---------------------------------------------------------------------------------------------
BN_CASES = [  # (shape, channels_last, groups)
    ((6, 5, 7, 3), False, 1),
    ((6, 5, 7, 3), True, 2),
    ((5, 70), False, 1),
    ((3, 2, 9), False, 3),
    ((2, 1, 1, 1), False, 1),
    ((4, 130, 3, 3), True, 1),  # more channels than one tile
]


@pytest.mark.parametrize("device", DEVICES)
def test_clean_stats_match_float64(device):
    g = torch.Generator().manual_seed(3)
    spreads = [(5, 2), (1000, 1), (0, 1), (-3, 0.01), (0, 1), (2, 3)]
    for (shape, cl, groups), (loc, spread) in zip(BN_CASES, spreads):
        x = (torch.randn(shape, generator=g) * spread + loc).to(device)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        mean, var = bst.clean_stats(x, groups)
        assert mean.shape == var.shape == (groups, shape[1]) and mean.dtype == torch.float32
        ref_mean, ref_var = bst.clean_stats_reference(x.cpu(), groups)
        xg = x.double().cpu().reshape(groups, -1, *shape[1:]).transpose(0, 1)
        dims = [0] + list(range(3, xg.dim()))
        var64, mean64 = torch.var_mean(xg, dims, correction=1)
        torch.testing.assert_close(ref_var.double(), var64, rtol=1e-7, atol=0)  # the twin: rounded once
        torch.testing.assert_close(var.cpu().double(), var64, rtol=5e-7, atol=0)  # ~4 float32 ulps
        assert bool(((mean.cpu().double() - mean64).abs() <= 2.5e-7 * (mean64.abs() + var64.sqrt())).all())
    with pytest.raises(ValueError, match="groups"):
        bst.clean_stats(torch.zeros(4, 3, device=device), groups=3)
    with pytest.raises(TypeError, match="x"):
        bst.clean_stats(torch.zeros(4, 3, device=device, dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_fd_loss_and_gradient(device):
    g = torch.Generator().manual_seed(6)
    for shape, dtype in [((1,), torch.float32), ((3,), torch.float32), ((6, 1031), torch.float32),
                         ((4, 7), torch.bfloat16)]:
        a = torch.randn(shape, generator=g).to(device, dtype)
        b = (a.float() + 0.01 * torch.randn(shape, generator=g).to(device)).to(dtype)
        go = torch.randn((), generator=g).to(device)
        out = []
        for fn in (fdl.fd_loss, fdl.fd_loss_reference):
            fa, fb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
            loss = fn(fa, fb)
            out.append((loss,) + torch.autograd.grad(loss * go, (fa, fb)))
        (loss, ga, gb), (rloss, ra, rb) = out
        assert loss.shape == () and loss.dtype == torch.float32
        torch.testing.assert_close(loss, rloss, rtol=1e-5, atol=0)
        tol = BF16_RTOL if dtype == torch.bfloat16 else 0.0
        torch.testing.assert_close(ga, ra, rtol=tol, atol=tol * ra.abs().max().item())
        torch.testing.assert_close(gb, rb, rtol=tol, atol=tol * rb.abs().max().item())
    with pytest.raises(ValueError, match="f_pert"):
        fdl.fd_loss(torch.zeros(3, device=device), torch.zeros(4, device=device))


# ---------------------------------------------------------------------------------------------
# The kernels composed: one round of mask gradients equals the engine's
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_kernels_compose_to_the_engine_mask_gradient(device):
    """Sampling, statistics, loss and reduction kernels composed by hand equal the torch engine's round."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))
    arena = Arena(model)
    table = sd.StdTable.from_arena(arena, device)
    mask = (torch.rand(arena.numel, generator=torch.Generator().manual_seed(7)) > 0.2).to(device)
    seed, rnd, draws, batch, eps = 3, 1, [0, 1], 6, 0.01
    w_c, w_p = sd.sample_draws(table, seed, rnd, draws, eps, mask)
    w_c.requires_grad_(True)
    w_p.requires_grad_(True)
    x = torch.stack([sample_inputs(DrawKey(seed, rnd, d), (5,), range(batch)) for d in draws]).to(device)
    s1, s2 = arena.slots[0], arena.slots[1]
    bn = model[1]

    def linear(w: torch.Tensor, slot, bias: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(bias.to(device), h, w[:, slot.offset:slot.stop].view(-1, *slot.shape).transpose(1, 2))

    def bn_relu(h: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.nn.functional.batch_norm(h, mean, var, bn.weight.detach().to(device),
                                                         bn.bias.detach().to(device), False, 0.0, bn.eps))

    loss = 0.0
    for d in range(len(draws)):
        h_c = linear(w_c[d : d + 1], s1, model[0].bias.detach(), x[d : d + 1])[0]
        h_p = linear(w_p[d : d + 1], s1, model[0].bias.detach(), x[d : d + 1])[0]
        mean, var = (t[0] for t in bst.clean_stats(h_c))
        f_c = linear(w_c[d : d + 1], s2, model[3].bias.detach(), bn_relu(h_c, mean, var)[None])
        f_p = linear(w_p[d : d + 1], s2, model[3].bias.detach(), bn_relu(h_p, mean, var)[None])
        loss = loss + fdl.fd_loss(f_c, f_p)
    g_c, g_p = torch.autograd.grad(loss, (w_c, w_p))
    G = mg.mask_grad_accumulate(torch.zeros(arena.numel, device=device), g_c, g_p, table, seed, rnd, draws, eps, mask)
    engine = Engine(model, arena, (5,), EngineConfig(device=torch.device("cpu")), seed, eps)
    want = engine.mask_gradient(mask.cpu(), rnd, [batch] * len(draws)).clone()
    scale = want.abs().max().item()
    torch.testing.assert_close((G * mask).cpu(), want * mask.cpu(), rtol=1e-4, atol=1e-4 * scale)


def test_package_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import ntksap_fast, ntksap_fast.kernels as k\n"
            "assert not k.available()\n"
            "try:\n    import ntksap_fast.kernels.philox\nexcept ImportError:\n    pass\n"
            "else:\n    raise SystemExit('kernels imported without triton')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


_COMPILE_SM90 = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ntksap_fast.kernels import batch_stats as BS, fd_loss as FL, mask_grad as MG, philox as P, sample_draw as SD
cases = [
    (P._philox_words_kernel, {"c_ptr": "*i64", "out_ptr": "*i64", "n": "i32", "k0": "u32", "k1": "i32"}, {"BLOCK": 1024}),
    (P._normal_range_kernel, {"out_ptr": "*fp32", "first_block": "i64", "offset": "i64", "numel": "i32",
     "key_ptr": "*i64", "draw_ptr": "*i64"}, {"STREAM": 2, "BLOCK": 256, "PRECISE": True}),
    (SD._sample_draws_kernel, {"mask_ptr": "*i1", "offsets_ptr": "*i64", "std_ptr": "*fp32", "key_ptr": "*i64",
     "draws_ptr": "*i64", "wc_ptr": "*bf16", "wp_ptr": "*bf16", "N": "i32", "T": "i32", "eps": "fp32"},
     {"HAS_MASK": True, "STEPS": 6, "BLOCK": 256, "PRECISE": True}),
    (MG._mask_grad_kernel, {"G_ptr": "*fp32", "odd_ptr": "*fp32", "sq_ptr": "*fp32", "gc_ptr": "*fp32",
     "gp_ptr": "*bf16", "mask_ptr": "*i1", "offsets_ptr": "*i64", "std_ptr": "*fp32", "key_ptr": "*i64",
     "draws_ptr": "*i64", "D": "i32", "N": "i32", "T": "i32", "eps": "fp32"},
     {"HAS_MASK": True, "STATS": True, "STEPS": 6, "BLOCK": 256, "PRECISE": True}),
    (BS._stats_partial_kernel, {"x_ptr": "*bf16", "pmean_ptr": "*fp32", "pm2_ptr": "*fp32", "C": "i32", "S": "i32",
     "Bg": "i32", "BPC": "i32", "K": "i32", "sB": "i32", "sS": "i32"}, {"sC": 1, "BLOCK_S": 32, "BLOCK_C": 64}),
    (BS._stats_combine_kernel, {"x_ptr": "*fp32", "pmean_ptr": "*fp32", "pm2_ptr": "*fp32", "mean_ptr": "*fp32",
     "var_ptr": "*fp32", "C": "i32", "S": "i32", "Bg": "i32", "BPC": "i32", "K": "i32", "sB": "i32", "sC": "i32"},
     {"BLOCK_C": 64, "BLOCK_K": 64}),
    (FL._fd_loss_fwd_kernel, {"fc_ptr": "*fp32", "fp_ptr": "*fp32", "grad2_ptr": "*fp32", "part_ptr": "*fp32",
     "M": "i32"}, {"BLOCK": 1024}),
    (FL._fd_loss_bwd_kernel, {"grad2_ptr": "*fp32", "go_ptr": "*fp32", "gc_ptr": "*bf16", "gp_ptr": "*bf16",
     "M": "i32"}, {"BLOCK": 1024}),
]
for fn, sig, const in cases:
    sig = dict(sig, **{k: "constexpr" for k in const})
    triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32))
print("compiled", len(cases))
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the CUDA cases compile and run")
def test_kernels_compile_for_sm90():
    """The compiled (non-interpreter) path type-checks, lowers and assembles for sm_90, no GPU needed."""
    ptxas = os.path.join(os.path.dirname(sys.modules["triton"].__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.access(ptxas, os.X_OK):
        pytest.skip("triton's bundled ptxas is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE_SM90], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0 and "compiled 8" in res.stdout, res.stderr[-3000:]
