"""ntksap_fast.kernels.mask_grad (the mask-gradient reduction over draws) against its twin.

Tolerance: 1e-5 of the largest |G| (sums over draws of products of regenerated normals, float32).
The statistics ``(odd, sq)`` are held to the same bound: ``odd`` is the odd-numbered draws' share,
decided by the draw's number, never by its position in a launch (the backend launches one draw at a
time by default, so every draw sits at position 0).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from ntksap_fast.kernels import mask_grad as mg
from ntksap_fast.kernels import philox
from ntksap_fast.kernels import sample_draw as sd
from torch import nn

from _kernels import DEVICES
from ntksap_fast.engine.arena import Arena

SIZES = [7, 1, 300, 0, 33, 1029]  # odd sizes, one element, an empty tensor, not multiples of a block
STDS = [0.5, 1.0, 0.1, 3.0, 0.2, 0.05]


def accumulate(
    G: torch.Tensor,
    g_c: torch.Tensor,
    g_p: torch.Tensor,
    table: sd.StdTable,
    seed: int,
    rnd: int,
    draws: list[int],
    eps: float,
    mask: torch.Tensor | None = None,
    stats=None,
) -> torch.Tensor:
    """``mask_grad_accumulate_into`` of ``draws`` in one launch; returns ``G``."""
    mg.mask_grad_accumulate_into(
        G, g_c, g_p, table, philox.round_key(seed, rnd, G.device), philox.draw_ids(draws, G.device), eps, mask, stats
    )
    return G


def _close(got: torch.Tensor, want: torch.Tensor, scale: float) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)


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
        got = accumulate(G0.clone(), g_c, g_p, table, 99, 1, draws, 0.01, m)
        want = mg.mask_grad_reference(G0.clone(), g_c, g_p, table, 99, 1, draws, 0.01, m)
        scale = want.abs().max().item()
        _close(got, want, scale)
        start = [torch.randn(n, generator=g).to(device) for _ in range(2)]
        stats = [tuple(t.clone() for t in start) for _ in range(2)]
        got_s = accumulate(G0.clone(), g_c, g_p, table, 99, 1, draws, 0.01, m, stats=stats[0])
        want_s = mg.mask_grad_reference(G0.clone(), g_c, g_p, table, 99, 1, draws, 0.01, m, stats=stats[1])
        _close(got_s, want_s, scale)
        for a, b in zip(stats[0], stats[1]):  # odd draws' share, sum of squares
            _close(a, b, b.abs().max().item())
    gc16, gp16 = g_c[1:2].bfloat16(), g_p[1:2].bfloat16()  # bf16 gradients, one draw
    bf = accumulate(torch.zeros(n, device=device), gc16, gp16, table, 5, 0, [2], 0.01)
    want = mg.mask_grad_reference(torch.zeros(n, device=device), gc16.float(), gp16.float(), table, 5, 0, [2], 0.01)
    _close(bf, want, want.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.slow
def test_one_draw_per_launch_with_statistics_at_gpu_layer_sizes(device):
    """The backend's default launch: one draw per launch (each at position 0 of the staged draw-id
    buffer), odd and even draw numbers, statistics on, a mask, a conv layer of 64 channels and a Linear head."""
    model = nn.Sequential(nn.Conv2d(41, 64, 3, bias=False), nn.Linear(64, 10))
    table = sd.StdTable.from_arena(Arena(model), device)
    n = table.numel
    g = torch.Generator().manual_seed(8)
    mask = (torch.rand(n, generator=g) > 0.5).to(device)
    draws = [1, 2]
    g_c = torch.randn(len(draws), n, generator=g)
    g_p = (-g_c + 0.01 * torch.randn(len(draws), n, generator=g)).to(device)
    g_c = g_c.to(device)
    key, buffer = philox.round_key(12, 2, device), torch.zeros(4, dtype=torch.int64, device=device)
    G, odd, sq = (torch.zeros(n, device=device) for _ in range(3))
    for i, draw in enumerate(draws):
        buffer[:1].copy_(philox.draw_ids([draw], "cpu"))
        mg.mask_grad_accumulate_into(G, g_c[i : i + 1], g_p[i : i + 1], table, key, buffer[:1], 0.01, mask, (odd, sq))
    stats = (torch.zeros(n, device=device), torch.zeros(n, device=device))
    want = mg.mask_grad_reference(torch.zeros(n, device=device), g_c, g_p, table, 12, 2, draws, 0.01, mask, stats)
    scale = want.abs().max().item()
    _close(G, want, scale)
    assert stats[0].abs().max().item() > 0.1 * scale  # draw 1 is odd: the odd share is not empty
    _close(odd, stats[0], scale)
    _close(sq, stats[1], stats[1].abs().max().item())
