"""ntksap_fast.kernels.sample_draw (every tensor's clean/perturbed weights, one launch) against its twin.

Tolerance: the normals' ``NORMAL_TOL`` scaled by std (``_kernels.weights_close``); entries outside
the mask exactly 0.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from ntksap_fast.kernels import philox
from ntksap_fast.kernels import sample_draw as sd
from torch import nn

from _kernels import DEVICES, normal_close, weights_close
from ntksap_fast.engine import rng
from ntksap_fast.engine.arena import Arena
from ntksap_fast.engine.draws import DrawKey, sample_weights

SIZES = [7, 1, 300, 0, 33, 1029]  # odd sizes, one element, an empty tensor, not multiples of a block
STDS = [0.5, 1.0, 0.1, 3.0, 0.2, 0.05]


def sample(
    table: sd.StdTable, seed: int, rnd: int, draws: list[int], eps: float, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_draws_into`` of ``draws`` in one launch, as the Triton backend calls it."""
    device = table.offsets.device
    w_clean = torch.empty(len(draws), table.numel, device=device)
    w_pert = torch.empty_like(w_clean)
    sd.sample_draws_into(
        w_clean, w_pert, table, philox.round_key(seed, rnd, device), philox.draw_ids(draws, device), eps, mask
    )
    return w_clean, w_pert


@pytest.mark.parametrize("device", DEVICES)
def test_sample_draws_match_twin(device):
    table = sd.StdTable.from_sizes(SIZES, STDS, device)
    std = table.vector()
    mask = torch.rand(table.numel, generator=torch.Generator().manual_seed(1)) > 0.3
    draws = [0, 3, 2**30 - 1]
    for m in (None, mask.to(device)):
        got = sample(table, 2**63 + 5, 7, draws, 0.01, m)
        want = sd.sample_draws_reference(table, 2**63 + 5, 7, draws, 0.01, m)
        assert all(t.shape == (3, table.numel) and t.device.type == device for t in got)
        for a, b in zip(got, want):
            weights_close(a, b, std)
        if m is not None:
            assert bool((got[0][:, ~m] == 0).all()) and bool((got[1][:, ~m] == 0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_sample_draws_on_an_arena_equal_the_engine_draws(device):
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.Conv1d(5, 2, 1), nn.Linear(7, 3))
    arena = Arena(model)
    table = sd.StdTable.from_arena(arena, device)
    assert torch.equal(table.vector(), arena.std_vector())
    theta, theta_plus_z = sample(table, 11, 2, [4], 1.0)
    key = DrawKey(11, 2, 4)
    normal_close(theta[0] / table.vector().to(device), sample_weights(arena, key, rng.Stream.WEIGHTS, None))
    z = sample_weights(arena, key, rng.Stream.PERTURBATION, None)
    torch.testing.assert_close((theta_plus_z - theta)[0].cpu(), z, rtol=0, atol=4 * philox.NORMAL_TOL * 6)
    one = sd.StdTable.from_sizes([1], [0.25], device)  # one tensor of one element
    w_c, w_p = sample(one, 0, 0, [0], 0.01)
    theta1 = 0.25 * rng.normal(0, 0, 0, rng.Stream.WEIGHTS, 1)
    torch.testing.assert_close(w_c.cpu(), theta1.view(1, 1), rtol=philox.NORMAL_TOL, atol=philox.NORMAL_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.slow
def test_one_draw_per_launch_at_gpu_layer_sizes(device):
    """The backend's default launch: one draw per launch from a staged draw-id buffer, odd draw numbers,
    over a conv layer of 64 channels and a Linear head (24256 entries, not a multiple of a block), with a mask."""
    model = nn.Sequential(nn.Conv2d(41, 64, 3, bias=False), nn.Linear(64, 10))
    arena = Arena(model)
    table = sd.StdTable.from_arena(arena, device)
    mask = (torch.rand(arena.numel, generator=torch.Generator().manual_seed(4)) > 0.5).to(device)
    key, buffer = philox.round_key(77, 3, device), torch.zeros(2, dtype=torch.int64, device=device)
    w_clean = torch.empty(1, table.numel, device=device)
    w_pert = torch.empty_like(w_clean)
    for draw in (3, 6):
        buffer[:1].copy_(philox.draw_ids([draw], "cpu"))
        sd.sample_draws_into(w_clean, w_pert, table, key, buffer[:1], 0.01, mask)
        want = sd.sample_draws_reference(table, 77, 3, [draw], 0.01, mask)
        weights_close(w_clean, want[0], table.vector())
        weights_close(w_pert, want[1], table.vector())
