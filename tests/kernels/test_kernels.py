"""The Triton kernels package (``ntksap_fast.kernels``) as a whole: the kernels composed equal the
engine's round, the package imports without triton, and the compiled path lowers for sm_90.

Each kernel against its twin: ``tests/test_kernel_<module>.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from ntksap_fast.kernels import batch_stats as bst
from ntksap_fast.kernels import fd_loss as fdl
from ntksap_fast.kernels import mask_grad as mg
from ntksap_fast.kernels import philox
from ntksap_fast.kernels import sample_draw as sd
from torch import nn

from _kernels import DEVICES
from ntksap_fast.engine.arena import Arena
from ntksap_fast.engine.draws import DrawKey, sample_inputs
from ntksap_fast.engine.engine import Engine, ModelRunner
from ntksap_fast.engine.plan import ScorerConfig


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
    key, ids = philox.round_key(seed, rnd, device), philox.draw_ids(draws, device)
    w_c = torch.empty(len(draws), arena.numel, device=device)
    w_p = torch.empty_like(w_c)
    sd.sample_draws_into(w_c, w_p, table, key, ids, eps, mask)
    w_c.requires_grad_(True)
    w_p.requires_grad_(True)
    x = torch.stack([sample_inputs(DrawKey(seed, rnd, d), (5,), range(batch)) for d in draws]).to(device)
    s1, s2 = arena.slots[0], arena.slots[1]
    bn = model[1]

    def linear(w: torch.Tensor, slot, bias: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(bias.to(device), h, w[:, slot.offset : slot.stop].view(-1, *slot.shape).transpose(1, 2))

    def bn_relu(h: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        return torch.relu(
            torch.nn.functional.batch_norm(
                h, mean, var, bn.weight.detach().to(device), bn.bias.detach().to(device), False, 0.0, bn.eps
            )
        )

    loss = 0.0
    for d in range(len(draws)):
        h_c = linear(w_c[d : d + 1], s1, model[0].bias.detach(), x[d : d + 1])[0]
        h_p = linear(w_p[d : d + 1], s1, model[0].bias.detach(), x[d : d + 1])[0]
        mean, var = bst.clean_stats(h_c)
        f_c = linear(w_c[d : d + 1], s2, model[3].bias.detach(), bn_relu(h_c, mean, var)[None])
        f_p = linear(w_p[d : d + 1], s2, model[3].bias.detach(), bn_relu(h_p, mean, var)[None])
        loss = loss + fdl.fd_loss(f_c, f_p)
    g_c, g_p = torch.autograd.grad(loss, (w_c, w_p))
    G = torch.zeros(arena.numel, device=device)
    mg.mask_grad_accumulate_into(G, g_c, g_p, table, key, ids, eps, mask)
    cpu = torch.device("cpu")
    engine = Engine(ModelRunner(model, arena, cpu), (5,), ScorerConfig(device=cpu), seed, eps)
    want = engine.mask_gradient(mask.cpu(), rnd, [batch] * len(draws)).clone()
    scale = want.abs().max().item()
    torch.testing.assert_close((G * mask).cpu(), want * mask.cpu(), rtol=1e-4, atol=1e-4 * scale)


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import ntksap_fast, ntksap_fast.kernels as k\n"
        "try:\n    import ntksap_fast.kernels.philox\nexcept ImportError:\n    pass\n"
        "else:\n    raise SystemExit('kernels imported without triton')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


_COMPILE_SM90 = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ntksap_fast.kernels import batch_stats as BS, fd_loss as FL, mask_grad as MG, philox as P, sample_draw as SD
cases = [
    (P._normal_range_kernel, {"out_ptr": "*fp32", "first_block": "i64", "offset": "i64", "numel": "i32",
     "key_ptr": "*i64", "draw_ptr": "*i64"}, {"STREAM": 2, "BLOCK": 256, "PRECISE": True}),
    (SD._sample_draws_kernel, {"mask_ptr": "*i1", "offsets_ptr": "*i64", "std_ptr": "*fp32", "key_ptr": "*i64",
     "draws_ptr": "*i64", "wc_ptr": "*fp32", "wp_ptr": "*fp32", "N": "i32", "T": "i32", "eps": "fp32"},
     {"HAS_MASK": True, "STEPS": 6, "BLOCK": 256, "PRECISE": True}),
    (MG._mask_grad_kernel, {"G_ptr": "*fp32", "odd_ptr": "*fp32", "sq_ptr": "*fp32", "gc_ptr": "*fp32",
     "gp_ptr": "*bf16", "mask_ptr": "*i1", "offsets_ptr": "*i64", "std_ptr": "*fp32", "key_ptr": "*i64",
     "draws_ptr": "*i64", "D": "i32", "N": "i32", "T": "i32", "eps": "fp32"},
     {"HAS_MASK": True, "STATS": True, "STEPS": 6, "BLOCK": 256, "PRECISE": True}),
    (BS._stats_partial_kernel, {"x_ptr": "*bf16", "pmean_ptr": "*fp32", "pm2_ptr": "*fp32", "C": "i32", "S": "i32",
     "B": "i32", "BPC": "i32", "K": "i32", "sB": "i32", "sS": "i32"}, {"sC": 1, "BLOCK_S": 32, "BLOCK_C": 64}),
    (BS._stats_combine_kernel, {"x_ptr": "*fp32", "pmean_ptr": "*fp32", "pm2_ptr": "*fp32", "mean_ptr": "*fp32",
     "var_ptr": "*fp32", "C": "i32", "S": "i32", "B": "i32", "BPC": "i32", "K": "i32", "sC": "i32"},
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
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the CUDA cases compile and run")
@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The compiled (non-interpreter) path type-checks, lowers and assembles for sm_90, no GPU needed."""
    ptxas = os.path.join(os.path.dirname(sys.modules["triton"].__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.access(ptxas, os.X_OK):
        pytest.skip("triton's bundled ptxas is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE_SM90], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0 and "compiled 7" in res.stdout, res.stderr[-3000:]
