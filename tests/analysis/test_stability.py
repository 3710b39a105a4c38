"""Stability figures (split-half overlap, relative standard error), target_overlap, the collapse
guard and the metadata of the masks, through the public API."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ntksap_fast import NtkSapScorer, keep_count, load_masks, ntk_sap_prune, ntk_sap_scores, prune, save_masks
from ntksap_fast.analysis.stability import round_stats
from ntksap_fast.select.topk import masked_topk

SHAPE = (3, 8, 8)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def _per_draw(model: nn.Module, draws: int, batch: int, mask: torch.Tensor) -> torch.Tensor:
    """``(draws, N)`` float64 mask gradients, each draw computed on its own."""
    scorer = NtkSapScorer(model, SHAPE, draws=draws, batch_size=batch, dtype=torch.float64)
    engine = scorer.engine
    return torch.stack([engine.mask_gradient(mask, 0, [batch] * draws, [d]).clone() for d in range(draws)])


def test_round_stats_equal_a_direct_computation():
    model = _net()
    draws, batch, density = 4, 6, 0.3
    scorer = NtkSapScorer(model, SHAPE, draws=draws, batch_size=batch, dtype=torch.float64)
    mask = torch.rand(scorer.arena.numel, generator=torch.Generator().manual_seed(3)) > 0.2
    masks = dict(scorer.arena.views(mask))
    scores, info = scorer.scores(masks, stats=True, density=density)
    per_draw = _per_draw(model, draws, batch, mask)
    G = per_draw.sum(0)
    flat = torch.cat([scores[n].reshape(-1) for n in scorer.arena.names])
    torch.testing.assert_close(flat.double(), (G.abs() * mask).float().double(), rtol=1e-6, atol=1e-9)
    n_keep = keep_count(scorer.arena.numel, density)
    odd = masked_topk(per_draw[1::2].sum(0).abs() * mask, mask, n_keep)
    even = masked_topk(per_draw[0::2].sum(0).abs() * mask, mask, n_keep)
    jaccard = (odd & even).sum().item() / (odd | even).sum().item()
    assert info.draws == draws and info.round == 0 and info.density == density
    assert abs(info.split_half_overlap - jaccard) <= 2 / n_keep  # near-ties may swap an entry
    var = per_draw.var(0, correction=1)
    rse = math.sqrt((draws * var * mask).sum().item() / (G.square() * mask).sum().item())
    assert info.relative_se == pytest.approx(rse, rel=1e-6)
    assert 0.0 < info.split_half_overlap < 1.0 and info.relative_se > 0


def test_round_stats_limits():
    c = torch.tensor([[1.0, 2.0, -3.0, 0.5], [1.0, 2.0, -3.0, 0.5]])  # two identical draws
    mask = torch.ones(4, dtype=torch.bool)
    info = round_stats(c.sum(0), c[1], c.square().sum(0), mask, 2, 2, 0, 0.5)
    assert info.split_half_overlap == 1.0 and info.relative_se == 0.0
    one = round_stats(c[0], torch.zeros(4), c[0].square(), mask, 1, 2, 0, 0.5)
    assert math.isnan(one.split_half_overlap) and math.isnan(one.relative_se)
    with pytest.raises(ValueError, match="density"):
        NtkSapScorer(_net(), SHAPE, draws=2, batch_size=2).scores(stats=True)


def test_target_overlap_adds_draws_in_counter_order():
    model = _net()
    rounds = []
    got = ntk_sap_prune(
        model,
        0.3,
        SHAPE,
        iterations=1,
        draws=2,
        batch_size=4,
        target_overlap=1.0,
        max_draws=5,
        progress=False,
        on_round=lambda t, masks, info: rounds.append(info),
    )
    assert [r.draws for r in rounds] == [5]  # overlap 1.0 is not reached: the round takes max_draws
    want = ntk_sap_prune(model, 0.3, SHAPE, iterations=1, draws=5, batch_size=4, progress=False)
    for n in want:
        assert torch.equal(got[n], want[n])
    assert got.metadata["rounds"][0]["draws"] == 5
    easy = []
    ntk_sap_prune(
        model,
        0.3,
        SHAPE,
        iterations=2,
        draws=2,
        batch_size=4,
        target_overlap=1e-9,
        progress=False,
        on_round=lambda t, masks, info: easy.append(info.draws),
    )
    assert easy == [2, 2]  # reached at once: no draw added
    with pytest.raises(ValueError, match="max_draws"):
        ntk_sap_prune(model, 0.3, SHAPE, iterations=1, draws=2, batch_size=4, max_draws=5)
    with pytest.raises(ValueError, match="target_overlap"):
        ntk_sap_prune(model, 0.3, SHAPE, iterations=1, draws=2, batch_size=4, target_overlap=1.5)


def test_stats_reach_on_round_and_metadata():
    model = _net()
    seen = []
    masks = ntk_sap_prune(
        model,
        0.2,
        SHAPE,
        iterations=3,
        draws=3,
        batch_size=4,
        stats=True,
        progress=False,
        on_round=lambda t, m, info: seen.append((t, info.round, info.draws)),
    )
    assert seen == [(1, 0, 3), (2, 1, 3), (3, 2, 3)]
    assert [r["round"] for r in masks.metadata["rounds"]] == [0, 1, 2]
    plain = []
    ntk_sap_prune(
        model, 0.2, SHAPE, iterations=2, draws=3, batch_size=4, progress=False, on_round=lambda t, m: plain.append(t)
    )
    assert plain == [1, 2]


def test_collapse_guard_keeps_a_floor_in_every_tensor():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    kwargs = dict(input_shape=(16,), iterations=3, draws=2, batch_size=8, progress=False)
    plain = ntk_sap_prune(model, 0.05, **kwargs)
    guarded = ntk_sap_prune(model, 0.05, min_layer_density=0.04, **kwargs)
    total = sum(p.numel() for p in plain.values())
    assert sum(int(m.sum()) for m in guarded.values()) == keep_count(total, 0.05)
    floors = {n: keep_count(m.numel(), 0.04) for n, m in guarded.items()}
    assert all(int(guarded[n].sum()) >= floors[n] for n in guarded)
    assert any(int(plain[n].sum()) < floors[n] for n in plain)  # without the guard a tensor falls below
    layer = prune(model, "magnitude", density=0.05, min_layer_density=0.04)
    assert all(int(layer[n].sum()) >= floors[n] for n in layer)
    with pytest.raises(ValueError, match="min_layer_density"):
        prune(model, "magnitude", density=0.05, scope="layer", min_layer_density=0.04)
    with pytest.raises(ValueError, match="min_layer_density"):
        ntk_sap_prune(model, 0.05, min_layer_density=1.5, **kwargs)
    with pytest.raises(ValueError, match="min_layer_density"):  # floors above what the round keeps
        ntk_sap_prune(model, 0.02, min_layer_density=0.1, **kwargs)


def test_masks_carry_what_made_them(tmp_path):
    model = _net()
    masks = ntk_sap_prune(
        model, 0.25, SHAPE, iterations=2, draws=2, batch_size=[4, 3], epsilon=0.02, seed=7, progress=False
    )
    meta = masks.metadata
    assert (meta["method"], meta["density"], meta["iterations"], meta["seed"], meta["epsilon"]) == (
        "ntksap",
        0.25,
        2,
        7,
        0.02,
    )
    assert meta["batch_sizes"] == [4, 3] and meta["dtype"] == "float32"
    path = tmp_path / "m.safetensors"
    save_masks(masks, path)
    loaded = load_masks(path, model, with_metadata=True)
    loaded = loaded[0] if isinstance(loaded, tuple) else loaded
    assert loaded.metadata["seed"] == 7 and loaded.metadata["batch_sizes"] == [4, 3]
    baseline = prune(model, "random", density=0.25, seed=3)
    assert baseline.metadata["method"] == "random" and baseline.metadata["seed"] == 3
    assert ntk_sap_scores(model, SHAPE, draws=1, batch_size=2)  # plain dict of scores still
