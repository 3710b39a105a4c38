"""Collapse guard: ``select_`` against an independent sort-based selection, and its floor."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ntksap_fast.engine.arena import Arena
from ntksap_fast.select.schedule import keep_count
from ntksap_fast.select.selection import select_
from ntksap_fast.select.topk import masked_topk


def reference_select(
    scores: list[float], mask: list[bool], n_keep: int, sizes: list[int], min_density: float
) -> list[bool]:
    """Plain-Python definition: per-tensor floors first, the rest globally; ties to the lower index."""
    order = lambda idx: sorted(idx, key=lambda i: (-scores[i], i))  # noqa: E731
    keep = [False] * len(scores)
    start, taken = 0, 0
    for n in sizes:
        unpruned = [i for i in range(start, start + n) if mask[i]]
        floor = min(n - math.floor((1.0 - min_density) * n), len(unpruned))
        for i in order(unpruned)[:floor]:
            keep[i] = True
        taken += floor
        start += n
    rest = [i for i in range(len(scores)) if mask[i] and not keep[i]]
    for i in order(rest)[: n_keep - taken]:
        keep[i] = True
    return keep


def _case(gen: torch.Generator, sizes: list[int], levels: int, p_pruned: float):
    n = sum(sizes)
    scores = torch.randint(0, levels, (n,), generator=gen).float() / levels  # many ties
    mask = torch.rand(n, generator=gen) >= p_pruned
    return scores, mask


def _floors(mask: torch.Tensor, sizes: list[int], min_density: float) -> list[int]:
    """Each tensor's floor (the selection module's docstring): min(keep_count(size, d), unpruned)."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [min(keep_count(n, min_density), int(mask[a : a + n].sum())) for a, n in zip(starts, sizes)]


@pytest.mark.parametrize("min_density", [0.0, 0.01, 0.1, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("trial", range(6))
def test_matches_sort_reference(min_density: float, trial: int) -> None:
    gen = torch.Generator().manual_seed(100 * trial + int(min_density * 100))
    count = int(torch.randint(1, 7, (1,), generator=gen))
    sizes = [int(s) for s in torch.randint(0, 60, (count,), generator=gen)]
    sizes[0] = max(sizes[0], 1)
    scores, mask = _case(gen, sizes, levels=int(torch.randint(2, 20, (1,), generator=gen)), p_pruned=0.3)
    floors = _floors(mask, sizes, min_density)
    unpruned = int(mask.sum())
    for n_keep in sorted({sum(floors), (sum(floors) + unpruned) // 2, unpruned}):
        want = reference_select(scores.tolist(), mask.tolist(), n_keep, sizes, min_density)
        got = select_(scores, mask.clone(), n_keep, sizes, min_density)
        assert got.tolist() == want
        assert int(got.sum()) == n_keep
        assert not bool((got & ~mask).any())  # pruned entries never come back


def test_zero_floor_is_plain_global_topk() -> None:
    gen = torch.Generator().manual_seed(3)
    scores, mask = _case(gen, [40, 7, 90], levels=5, p_pruned=0.2)
    for n_keep in (0, 17, int(mask.sum())):
        got = select_(scores, mask.clone(), n_keep, [40, 7, 90], 0.0)
        assert torch.equal(got, masked_topk(scores, mask, n_keep))


def test_floor_saves_a_layer_from_collapse() -> None:
    # Tensor 1 has the lowest scores everywhere: a global top-k removes it entirely.
    sizes = [200, 50, 100]
    scores = torch.cat([torch.rand(200) + 1.0, torch.rand(50) * 1e-3, torch.rand(100) + 1.0])
    mask = torch.ones(350, dtype=torch.bool)
    plain = select_(scores, mask.clone(), 35, sizes, 0.0)
    assert int(plain[200:250].sum()) == 0
    guarded = select_(scores, mask.clone(), 35, sizes, 0.05)
    assert [int(guarded[a:b].sum()) for a, b in ((0, 200), (200, 250), (250, 350))][1] == 3  # ceil(0.05 * 50)
    assert int(guarded.sum()) == 35
    # Within the floor it is the tensor's own best entries.
    assert set(guarded[200:250].nonzero().squeeze(1).tolist()) == set(scores[200:250].topk(3).indices.tolist())


def test_floor_counts_the_tensor_size_and_caps_at_what_is_left() -> None:
    mask = torch.ones(30, dtype=torch.bool)
    mask[10:19] = False  # tensor 1 (10 entries) has one entry left
    scores = torch.arange(30, dtype=torch.float32).flip(0)  # tensor 0 best, tensor 2 worst
    for min_density, n_keep, want in ((0.25, 7, [3, 1, 3]), (0.0, 7, [7, 0, 0]), (1.0, 21, [10, 1, 10])):
        got = select_(scores, mask.clone(), n_keep, [10, 10, 10], min_density)
        assert [int(got[a : a + 10].sum()) for a in (0, 10, 20)] == want


def test_arena_slots_work_as_spans() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.Linear(5, 2))
    arena = Arena(model)
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(arena.numel, generator=gen)
    scores[arena.slots[2].offset : arena.slots[2].stop] = 0.0  # the last layer would collapse
    mask = torch.ones(arena.numel, dtype=torch.bool)
    sizes = [s.numel for s in arena.slots]
    got = select_(scores, mask.clone(), arena.numel // 4, arena.slots, 0.2)
    assert torch.equal(got, select_(scores, mask.clone(), arena.numel // 4, sizes, 0.2))
    assert int(got[arena.slots[2].offset : arena.slots[2].stop].sum()) == 2  # ceil(0.2 * 10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_score_dtypes(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    scores, mask = _case(gen, [30, 30, 40], levels=7, p_pruned=0.1)
    want = reference_select(scores.tolist(), mask.tolist(), 40, [30, 30, 40], 0.2)
    assert select_(scores.to(dtype), mask.clone(), 40, [30, 30, 40], 0.2).tolist() == want


def test_floors_above_n_keep_are_refused_and_mask_is_unchanged() -> None:
    scores, mask = torch.rand(100), torch.ones(100, dtype=torch.bool)
    before = mask.clone()
    with pytest.raises(ValueError, match=r"min_layer_density=0.5 .* at least 50 entries .* n_keep=20"):
        select_(scores, mask, 20, [50, 50], 0.5)
    assert torch.equal(mask, before)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf")])
def test_min_layer_density_out_of_range(bad: float) -> None:
    with pytest.raises(ValueError, match="min_layer_density must be in"):
        select_(torch.rand(10), torch.ones(10, dtype=torch.bool), 5, [10], bad)


def test_bad_arguments() -> None:
    scores, mask = torch.rand(10), torch.ones(10, dtype=torch.bool)
    with pytest.raises(TypeError, match="min_layer_density"):
        select_(scores, mask, 5, [10], True)
    with pytest.raises(ValueError, match="cover 9 entries, scores has 10"):
        select_(scores, mask, 5, [4, 5], 0.1)
    with pytest.raises(ValueError, match="slots_or_sizes"):
        select_(scores, mask, 5, [4, -1, 7], 0.1)
    with pytest.raises(TypeError, match="slots_or_sizes"):
        select_(scores, mask, 5, torch.tensor([10]), 0.1)
    with pytest.raises(ValueError, match="n_keep must be in"):
        select_(scores, mask, 11, [10], 0.1)
    with pytest.raises(ValueError, match="same 1-D shape"):
        select_(torch.rand(9), mask, 5, [10], 0.1)
    nan_scores = scores.clone()
    nan_scores[7] = float("nan")
    with pytest.raises(ValueError, match=r"tensor 1 .*NaN"):
        select_(nan_scores, mask, 5, [5, 5], 0.2)
    assert bool(mask.all())
