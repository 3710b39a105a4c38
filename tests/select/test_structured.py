"""ntksap_fast.select.channel_units and ntksap_fast.select.structured: channel units from Torch-Pruning's
DependencyGraph, unit scores, and the selection of whole channels to a weight budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _channel_models import IMAGE, concat_net, mixing_net, resnet8, tiny_vgg
from _tiny_models import assert_same_snapshot, expected_keep, snapshot
from ntksap_fast.engine.arena import Arena
from ntksap_fast.select.channel_units import channel_units, working_copy
from ntksap_fast.select.schedule import density_schedule
from ntksap_fast.select.structured import NORMALISATIONS, ChannelSelector


def _units(model: nn.Module):
    work = working_copy(model)
    return channel_units(work, Arena(work), IMAGE)


def _channels(units, name: str, side: int) -> list[int]:
    """The unit of each row (side 0) or column (side 1) of a tensor; -1 where none."""
    for slot, rows, cols, _ in units.sides:
        if slot.name == name:
            table = (rows, cols)[side]
            return [-1 if u == units.count else u for u in table.tolist()] if table is not None else []
    return []


def test_resnet_units_follow_the_residual_stream():
    """Written out from the architecture: stage s's residual channel j is row j of the stem (stage 1)
    or the shortcut, row j of every block's conv2, column j of the next block's conv1 and shortcut
    (or of the classifier); each block's inner channel is conv1's row and conv2's column."""
    units = _units(resnet8())
    stream = [
        _channels(units, "conv1.weight", 0),
        _channels(units, "layers.1.shortcut.0.weight", 0),
        _channels(units, "layers.2.shortcut.0.weight", 0),
    ]
    for s, block in enumerate(("layers.0", "layers.1", "layers.2")):
        assert _channels(units, f"{block}.conv2.weight", 0) == stream[s]
        assert _channels(units, f"{block}.conv1.weight", 0) == _channels(units, f"{block}.conv2.weight", 1)
        reader = ("layers.1.conv1.weight", "layers.2.conv1.weight", "fc.weight")[s]
        assert _channels(units, reader, 1) == stream[s]
    assert _channels(units, "layers.1.shortcut.0.weight", 1) == stream[0]
    assert _channels(units, "conv1.weight", 1) == []  # the input's channels
    assert _channels(units, "fc.weight", 0) == []  # the outputs
    assert "fc" in units.frozen
    assert units.count == 2 * (4 + 8 + 16)  # per stage, a residual group and a block's inner group
    assert sorted(units.units_of_group().tolist()) == [4, 4, 8, 8, 16, 16]


def test_flatten_and_concat_map_channels_to_their_slices():
    units = _units(tiny_vgg())  # the last conv's 16 channels x 2 x 2 flattened into 64 features
    last = _channels(units, "features.8.weight", 0)
    assert _channels(units, "hidden.weight", 1) == [u for u in last for _ in range(4)]
    units = _units(concat_net())  # cat([left (5), right (7)]) -> merge's 12 input channels
    assert _channels(units, "merge.weight", 1) == (
        _channels(units, "left.0.weight", 0) + _channels(units, "right.0.weight", 0)
    )


def test_groups_that_cannot_be_cut_exactly_stay_whole():
    units = _units(mixing_net())
    assert "conv1" in units.frozen  # the einsum mixes its channels
    assert "grouped convolution" in units.frozen["conv2"] and "grouped convolution" in units.frozen["grouped"]
    assert "LayerNorm" in units.frozen["head"]
    assert "output" in units.frozen["fc"]
    assert units.roots == ["conv3"]  # conv3 -> pool -> head is a plain channel path


def test_a_forward_that_fails_names_the_layer():
    class Picky(nn.Module):
        def forward(self, x):
            if x.shape[0] == 1:
                raise RuntimeError("needs two samples")
            return x

    model = nn.Sequential(nn.Conv2d(3, 4, 3), Picky(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, *IMAGE))
    with pytest.raises(ValueError, match=r"cannot trace.*layer '1' \(Picky\).*needs two samples"):
        ChannelSelector(model, Arena(model), IMAGE)


def test_no_unit_is_a_clear_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
    with pytest.raises(ValueError, match="no channel of Sequential can be pruned.*output"):
        ChannelSelector(model, Arena(model), IMAGE)


@pytest.mark.parametrize("normalisation", NORMALISATIONS)
def test_unit_score_is_the_absolute_sum_over_the_channel_per_multiply_add_weight_none_or_group_mean(normalisation):
    """Channel j of features.0 is row j of features.0 (16 x 16 output positions) and column j of
    features.4 (8 x 8 positions, after a max-pool) in tiny_vgg; only unpruned entries count; ``group``
    divides by the mean raw score of the group's 8 units (all alive here)."""
    model = tiny_vgg()
    arena = Arena(model)
    contributions = torch.randn(arena.numel, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mask = torch.rand(arena.numel, generator=torch.Generator().manual_seed(4)) < 0.8
    views, masks = arena.views(contributions), arena.views(mask)
    expected = []
    for j in range(8):
        rows, cols = masks["features.0.weight"][j], masks["features.4.weight"][:, j]
        total = (views["features.0.weight"][j] * rows).sum() + (views["features.4.weight"][:, j] * cols).sum()
        size = {"flop": 256 * rows.sum() + 64 * cols.sum(), "weight": rows.sum() + cols.sum(), "none": 1}
        expected.append(float(total.abs() / size.get(normalisation, 1)))
    if normalisation == "group":
        expected = [e / (sum(expected) / len(expected)) for e in expected]
    selector = ChannelSelector(model, arena, IMAGE, normalisation=normalisation)
    got = selector.unit_scores(contributions, mask)[_channels(selector.units, "features.0.weight", 0)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)


def _is_channel_mask(arena: Arena, mask: torch.Tensor) -> bool:
    """Every tensor's mask is the outer product of its kept rows and kept columns."""
    for v in arena.views(mask).values():
        rows = v.reshape(v.shape[0], -1).any(1)
        cols = v.transpose(0, 1).reshape(v.shape[1], -1).any(1)
        if not torch.equal(
            v, (rows.view(-1, *[1] * (v.dim() - 1)) & cols.view(1, -1, *[1] * (v.dim() - 2))).expand_as(v)
        ):
            return False
    return True


@pytest.mark.parametrize("build", [resnet8, tiny_vgg, concat_net])
def test_rounds_meet_the_budget_with_whole_channels_that_never_return(build):
    model = build()
    arena = Arena(model)
    selector = ChannelSelector(model, arena, IMAGE)
    contributions = torch.randn(arena.numel, generator=torch.Generator().manual_seed(0))
    largest = float(selector.units.sums(torch.ones(arena.numel)).max())  # one unit's entries, at most
    mask = torch.ones(arena.numel, dtype=torch.bool)
    for t, d in enumerate(density_schedule(0.3, 4)):
        before = mask.clone()
        selector.select_(contributions, mask, t, d)
        kept, n_keep = int(mask.sum()), expected_keep(arena.numel, d)
        assert n_keep - largest < kept <= n_keep
        assert not (mask & ~before).any()
        assert _is_channel_mask(arena, mask)
    assert (selector.units.sums(mask) > 0).long().bincount(selector.units.group_of).min() >= 1


def _unprotected(selector, alive: torch.Tensor) -> torch.Tensor:
    """Alive units that are not their group's last one (the floor keeps that one whatever its score)."""
    per_group = alive.long().bincount(selector.units.group_of, minlength=len(selector.units.roots))
    return alive & (per_group[selector.units.group_of] > 1)


def test_lowest_scores_go_first_ties_to_the_higher_unit():
    model = resnet8()
    arena = Arena(model)
    selector = ChannelSelector(model, arena, IMAGE, normalisation="none")
    mask = torch.ones(arena.numel, dtype=torch.bool)
    selector.select_(torch.ones(arena.numel), mask, 0, 0.9)  # raw score = the unit's size: small units go first
    kept = selector.alive(mask)
    size = selector.units.sums(torch.ones(arena.numel))
    assert (~kept).any() and size[~kept].max() <= size[_unprotected(selector, kept)].min()
    mask = torch.ones(arena.numel, dtype=torch.bool)
    selector.select_(torch.zeros(arena.numel), mask, 0, 0.95)  # all scores tie
    gone = torch.nonzero(~selector.alive(mask)).flatten().tolist()
    group_of = selector.units.group_of.tolist()
    removable = [u for u in range(len(group_of)) if u > 0 and group_of[u - 1] == group_of[u]]  # not a group's first
    assert gone and gone == removable[-len(gone) :]


@pytest.mark.parametrize("invert", [False, True])
def test_the_removed_units_are_the_lowest_or_with_invert_the_highest(invert):
    model = resnet8()
    arena = Arena(model)
    contributions = torch.randn(arena.numel, generator=torch.Generator().manual_seed(1))
    selector = ChannelSelector(model, arena, IMAGE, invert=invert)
    scores = selector.unit_scores(contributions, torch.ones(arena.numel, dtype=torch.bool))
    mask = torch.ones(arena.numel, dtype=torch.bool)
    selector.select_(contributions, mask, 0, 0.7)
    kept = selector.alive(mask)
    rivals = scores[_unprotected(selector, kept)]
    if invert:
        assert scores[~kept].min() >= rivals.max()
    else:
        assert scores[~kept].max() <= rivals.min()


def test_random_gives_each_unit_one_seeded_score_and_ignores_the_contributions():
    model = resnet8()
    arena = Arena(model)
    contributions = torch.randn(arena.numel, generator=torch.Generator().manual_seed(1))
    masks = [torch.ones(arena.numel, dtype=torch.bool) for _ in range(3)]
    for mask, seed, sign in zip(masks, (5, 5, 6), (1, -1, 1)):
        ChannelSelector(model, arena, IMAGE, random_seed=seed).select_(sign * contributions, mask, 0, 0.6)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


def test_a_budget_below_one_channel_per_group_is_refused():
    model = resnet8()
    arena = Arena(model)
    mask = torch.ones(arena.numel, dtype=torch.bool)
    with pytest.raises(ValueError, match="density 0.001 cannot be reached with granularity='channel'"):
        ChannelSelector(model, arena, IMAGE).select_(torch.ones(arena.numel), mask, 0, 0.001)
    assert mask.all()


def test_the_model_is_not_modified():
    model = resnet8().train()
    before = snapshot(model)
    ChannelSelector(model, Arena(model), IMAGE).select_(
        torch.randn(Arena(model).numel), Arena(model).start_mask(model), 0, 0.5
    )
    assert_same_snapshot(before, model)
