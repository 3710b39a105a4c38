"""N:M selection (``ntksap_fast.select.nm``): parsing, the per-round keep count, the group selection
against a plain-Python definition, and which tensors stay dense."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ntksap_fast import apply_masks, load_masks, ntk_sap_prune, ntk_sap_scores, prune, save_masks
from ntksap_fast.engine.arena import Arena, register_layer
from ntksap_fast.methods.baselines import DEFAULT_ITERATIONS, METHODS
from ntksap_fast.select.nm import NMSelector, is_nm, nm_groups, nm_keep, parse_nm, select_nm_
from ntksap_fast.select.schedule import density_schedule


def reference_nm(scores: torch.Tensor, mask: torch.Tensor, shape: tuple[int, ...], m: int, keep: int) -> torch.Tensor:
    """Plain-Python definition on one tensor ``(out, in, *k)``: each group ``[o, g*M:(g+1)*M, *k]`` keeps
    its ``min(keep, unpruned)`` best unpruned entries, ties to the lower input channel."""
    s, u = scores.reshape(shape[0], shape[1], -1).tolist(), mask.reshape(shape[0], shape[1], -1).tolist()
    out = torch.zeros(shape[0], shape[1], math.prod(shape[2:]), dtype=torch.bool)
    for o in range(shape[0]):
        for k in range(len(s[0][0])):
            for g in range(shape[1] // m):
                channels = [i for i in range(g * m, (g + 1) * m) if u[o][i][k]]
                for i in sorted(channels, key=lambda i: (-s[o][i][k], i))[:keep]:
                    out[o, i, k] = True
    return out.reshape(-1)


@pytest.mark.parametrize("text, expected", [("2:4", (2, 4)), ("4:8", (4, 8)), ("1:2", (1, 2)), (" 3 : 16 ", (3, 16))])
def test_parse_nm(text: str, expected: tuple[int, int]) -> None:
    assert parse_nm(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("4:4", "N must be in"),
        ("5:4", "N must be in"),
        ("0:4", "N must be in"),
        ("1:1", "M must be >= 2"),
        ("0:0", "M must be >= 2"),
        ("2/4", "not of the form"),
        ("2:4:8", "not of the form"),
        ("a:b", "not of the form"),
        ("-1:4", "not of the form"),
        ("", "not of the form"),
        ("channels", "not of the form"),
    ],
)
def test_parse_nm_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        parse_nm(text)
    assert "granularity" in str(err.value)


def test_parse_nm_type() -> None:
    with pytest.raises(TypeError, match="granularity"):
        parse_nm((2, 4))


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (1, 3), (3, 8), (1, 2)])
@pytest.mark.parametrize("schedule", ["exponential", "linear"])
@pytest.mark.parametrize("iterations", [1, 3, 20])
def test_nm_keep_follows_the_schedule(n: int, m: int, schedule: str, iterations: int) -> None:
    densities = density_schedule(n / m, iterations, schedule)
    keeps = [nm_keep(n, m, d) for d in densities]
    progress = [(1 - d) / (1 - n / m) for d in densities]
    assert keeps == [m - math.floor((m - n) * p + 0.5) for p in progress]  # the documented formula
    assert keeps[-1] == n and all(n <= k <= m for k in keeps)
    assert all(a >= b for a, b in zip(keeps, keeps[1:]))
    assert nm_keep(n, m, 1.0) == m


def test_nm_keep_2_of_4_over_20_rounds() -> None:
    """The default schedule: 4 kept while d_t > 0.875, 2 from d_t <= 0.625 (2 * progress >= 1.5)."""
    keeps = [nm_keep(2, 4, d) for d in density_schedule(0.5, 20, "exponential")]
    assert keeps == [4] * 3 + [3] * 10 + [2] * 7


@pytest.mark.parametrize("shape", [(3, 8), (5, 12), (4, 8, 3, 3), (2, 16, 5), (3, 4, 2, 1, 2)])
@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("trial", range(3))
def test_select_matches_reference(shape: tuple[int, ...], m: int, trial: int) -> None:
    """Two tensors, the second the one tested; many ties, pruned entries, every keep count."""
    gen = torch.Generator().manual_seed(trial * 31 + len(shape) * 7 + m)
    numel = math.prod(shape)
    arena_sizes = (6, numel)
    scores = torch.randint(0, 3, (sum(arena_sizes),), generator=gen).float()
    scores[torch.rand(scores.shape, generator=gen) < 0.1] = -0.0
    mask = torch.rand(scores.shape, generator=gen) >= 0.25
    slot = _slot("t", shape, offset=6)
    for keep in range(m + 1):
        got = select_nm_(scores, mask.clone(), [slot], m, keep)
        assert torch.equal(got[:6], mask[:6])  # other tensors untouched
        want = reference_nm(scores[6:], mask[6:], shape, m, keep)
        assert torch.equal(got[6:], want), keep
        assert not (got & ~mask).any()  # pruned entries never come back


def test_select_ties_go_to_the_lower_input_channel() -> None:
    """Linear (2, 8): all-equal scores keep channels 0, 1 of each group; Conv (1, 4, 1, 2) groups
    run along dim 1 at each kernel position (flat stride 2)."""
    scores, mask = torch.zeros(16), torch.ones(16, dtype=torch.bool)
    select_nm_(scores, mask, [_slot("lin", (2, 8))], 4, 2)
    assert mask.view(2, 8).tolist() == [[True, True, False, False] * 2] * 2
    scores = torch.tensor([0.0, 5.0, 1.0, 5.0, 1.0, 0.0, 1.0, 0.0])  # (1, 4, 1, 2) flat
    mask = torch.ones(8, dtype=torch.bool)
    select_nm_(scores, mask, [_slot("conv", (1, 4, 1, 2))], 4, 2)
    # kernel position 0 sees channels' scores [0, 1, 1, 1] -> channels 1, 2; position 1 [5, 5, 0, 0] -> 0, 1
    assert mask.view(4, 2).tolist() == [[False, True], [True, True], [True, False], [False, False]]


def test_select_nan() -> None:
    scores, mask = torch.rand(8), torch.ones(8, dtype=torch.bool)
    scores[3] = float("nan")
    with pytest.raises(ValueError, match="NaN score at an unpruned entry of 'lin'"):
        select_nm_(scores, mask, [_slot("lin", (2, 4))], 4, 2)
    assert mask.all()  # unchanged
    mask[3] = False  # a NaN at a pruned entry is ignored
    select_nm_(scores, mask, [_slot("lin", (2, 4))], 4, 2)
    assert mask.sum() == 4 and not mask[3]


def test_is_nm_and_groups() -> None:
    mask = torch.tensor([[1, 1, 0, 0, 0, 1, 0, 1]], dtype=torch.bool)
    assert is_nm(mask, 2, 4) and not is_nm(mask, 1, 4)
    mask[0, 6] = True
    assert not is_nm(mask, 2, 4)
    weight = torch.arange(16).view(1, 4, 2, 2)
    assert nm_groups(weight, weight.shape, 4).tolist() == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    with pytest.raises(ValueError, match="multiple of M=4"):
        is_nm(torch.ones(2, 6, dtype=torch.bool), 2, 4)


class TransposedDense(nn.Module):
    """A layer storing its weight ``(in, out)``, registered with its own fan-in (as GPT-2's Conv1D)."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(inputs, outputs))

    def forward(self, x):
        return x @ self.weight


register_layer(TransposedDense, fan_in=lambda name, shape: int(shape[0]))


def test_selector_lists_dense_tensors() -> None:
    """A square (in, out) weight is dense too: its dim 1 is a multiple of M but not its input."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.Conv2d(8, 8, 3, groups=8),
        nn.Conv2d(8, 8, 1),
        nn.Flatten(),
        nn.Linear(8, 6),
        nn.Linear(6, 8),
        TransposedDense(8, 8),
        nn.Linear(8, 4),
    )
    selector = NMSelector(model, Arena(model), "2:4", 0.5)
    assert [s.name for s in selector.eligible] == ["2.weight", "4.weight", "7.weight"]
    assert selector.metadata() == {
        "granularity": "2:4",
        "nm_dense": {
            "0.weight": "input dimension 3 is not a multiple of M=4",
            "1.weight": "input dimension 1 is not a multiple of M=4",
            "5.weight": "input dimension 6 is not a multiple of M=4",
            "6.weight": "not stored (out, in, *kernel): its layer registers its own fan-in",
        },
    }


def test_selector_round() -> None:
    model = nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 8))
    arena = Arena(model)
    selector = NMSelector(model, arena, "4:8", 0.5)
    scores, mask = torch.rand(arena.numel), torch.ones(arena.numel, dtype=torch.bool)
    densities = density_schedule(0.5, 4, "linear")
    for t, d in enumerate(densities):
        before = mask.clone()
        selector.select_(scores, mask, t, d)
        assert mask[:24].all() and not (mask & ~before).any()
        assert torch.equal(nm_groups(mask[24:], (8, 8), 8).sum(dim=1), torch.full((8,), nm_keep(4, 8, d)))
    assert is_nm(arena.views(mask)["1.weight"], 4, 8)


def test_selector_invert_keeps_the_lowest() -> None:
    model = nn.Linear(8, 2)
    arena = Arena(model)
    scores = torch.tensor([3.0, 1.0, 2.0, 1.0, 0.0, 5.0, 5.0, 4.0] * 2)
    mask = torch.ones(16, dtype=torch.bool)
    NMSelector(model, arena, "2:4", 0.5, invert=True).select_(scores, mask, 0, 0.5)
    # lowest two of [3, 1, 2, 1]: the 1s (channels 1, 3); of [0, 5, 5, 4]: 0 and 4 (channels 4, 7)
    assert mask.view(2, 8).tolist() == [[False, True, False, True, True, False, False, True]] * 2


@pytest.mark.parametrize("density", [0.25, 0.4999, 1.0])
def test_selector_density_must_be_n_over_m(density: float) -> None:
    model = nn.Linear(8, 8)
    with pytest.raises(ValueError, match=r"density must be N/M = 0.5 with granularity='2:4'"):
        NMSelector(model, Arena(model), "2:4", density)
    NMSelector(model, Arena(model), "1:3", 1 / 3)  # a written-out fraction passes


def _slot(name: str, shape: tuple[int, ...], offset: int = 0):
    from ntksap_fast.engine.arena import Slot

    return Slot(name, torch.Size(shape), offset, math.prod(shape), 1, 1.0, name, None)


# ---- granularity="2:4" through the prune loop, every method (the acceptance tests) ---------------


class NMNet(nn.Module):
    """Input (3, 6, 6). Stays dense under 2:4: conv1 (3 input channels), the depthwise conv (1), fc1
    (6 inputs). Pruned 2:4: conv2 (8 inputs at each of 9 kernel positions), fc0 (8), fc2 (12)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc0 = nn.Linear(8, 6)
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 4)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        x = torch.relu(self.depthwise(x)).mean(dim=(2, 3))
        return self.fc2(torch.relu(self.fc1(torch.relu(self.fc0(x)))))


NM_SHAPE = (3, 6, 6)
NM_DENSE = {
    "conv1.weight": "input dimension 3 is not a multiple of M=4",
    "depthwise.weight": "input dimension 1 is not a multiple of M=4",
    "fc1.weight": "input dimension 6 is not a multiple of M=4",
}
NM_FAST = dict(draws=1, batch_size=4, progress=False)


def _nm_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return NMNet()


def _group_counts(masks: dict[str, torch.Tensor], m: int = 4) -> dict[str, torch.Tensor]:
    return {n: nm_groups(v, v.shape, m).sum(dim=1) for n, v in masks.items() if n not in NM_DENSE}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_exact_2_of_4(method: str) -> None:
    model = _nm_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, *NM_SHAPE, generator=gen), torch.randint(0, 4, (8,), generator=gen))]
    extra = dict(draws=1, batch_size=4) if method == "ntksap" else {}
    iterations = 3 if method in DEFAULT_ITERATIONS else 1
    masks = prune(
        model,
        method,
        density=0.5,
        granularity="2:4",
        iterations=iterations,
        input_shape=NM_SHAPE,
        data=data,
        progress=False,
        **extra,
    )
    assert all(torch.equal(c, torch.full_like(c, 2)) for c in _group_counts(masks).values())
    assert all(masks[n].all() for n in NM_DENSE)
    assert masks.metadata["granularity"] == "2:4" and masks.metadata["nm_dense"] == NM_DENSE
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_one_round_keeps_each_groups_two_highest_ntksap_scores() -> None:
    model = _nm_net(1)
    masks = ntk_sap_prune(model, 0.5, NM_SHAPE, granularity="2:4", iterations=1, seed=7, **NM_FAST)
    scores = ntk_sap_scores(model, NM_SHAPE, round=0, seed=7, draws=1, batch_size=4)
    for name, mask in masks.items():
        full = torch.ones(mask.numel(), dtype=torch.bool)
        want = full if name in NM_DENSE else reference_nm(scores[name].reshape(-1), full, tuple(mask.shape), 4, 2)
        assert torch.equal(mask.reshape(-1), want), name


def test_rounds_follow_the_keep_count_and_never_revive() -> None:
    seen = []
    ntk_sap_prune(
        _nm_net(2),
        0.5,
        NM_SHAPE,
        granularity="2:4",
        iterations=5,
        schedule="linear",
        on_round=lambda t, masks: seen.append(masks),
        **NM_FAST,
    )
    keeps = [nm_keep(2, 4, d) for d in density_schedule(0.5, 5, "linear")]
    assert keeps == [4, 3, 3, 2, 2]  # (M - N) * progress = 0.4, 0.8, 1.2, 1.6, 2 rounds to 0, 1, 1, 2, 2
    previous = None
    for masks, keep in zip(seen, keeps):
        assert all(torch.equal(c, torch.full_like(c, keep)) for c in _group_counts(masks).values())
        if previous is not None:
            assert all(not (masks[n] & ~previous[n]).any() for n in masks)
        previous = masks


def test_a_masked_model_keeps_its_pruned_entries() -> None:
    model = _nm_net(3)
    gen = torch.Generator().manual_seed(3)
    start = {n: torch.rand(p.shape, generator=gen) > 0.4 for n, p in model.named_parameters() if n.endswith("weight")}
    apply_masks(model, start)
    masks = prune(model, "magnitude", density=0.5, granularity="2:4", progress=False)
    for name, mask in masks.items():
        assert not (mask & ~start[name]).any()
        if name in NM_DENSE:
            assert torch.equal(mask, start[name])
        else:
            unpruned = nm_groups(start[name], mask.shape, 4).sum(dim=1)
            assert torch.equal(_group_counts({name: mask})[name], unpruned.clamp(max=2))


class _Stop(Exception):
    pass


def test_checkpoint_resumes_and_records_the_granularity(tmp_path) -> None:
    path = tmp_path / "nm.ckpt"
    options = dict(granularity="2:4", iterations=3, seed=5, checkpoint=path, **NM_FAST)
    whole = ntk_sap_prune(_nm_net(4), 0.5, NM_SHAPE, **{**options, "checkpoint": None})

    def stop_after_one(t, masks):
        if t == 1:
            raise _Stop

    with pytest.raises(_Stop):
        ntk_sap_prune(_nm_net(4), 0.5, NM_SHAPE, on_round=stop_after_one, **options)
    with pytest.raises(ValueError, match="granularity"):  # another granularity never resumes this run
        ntk_sap_prune(_nm_net(4), 0.5, NM_SHAPE, **{**options, "granularity": "weight"})
    resumed = ntk_sap_prune(_nm_net(4), 0.5, NM_SHAPE, **options)
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)
    save_masks(resumed, tmp_path / "nm.safetensors")
    metadata = load_masks(tmp_path / "nm.safetensors").metadata
    assert metadata["granularity"] == "2:4" and metadata["nm_dense"] == NM_DENSE


def test_2_of_4_needs_density_one_half() -> None:
    """The other combinations (scope, min_layer_density) are PruneOptions' rules, tested in
    tests/select/test_loop_granularity.py."""
    with pytest.raises(ValueError, match=r"density must be N/M = 0.5 with granularity='2:4'"):
        prune(_nm_net(), "magnitude", density=0.3, granularity="2:4", progress=False)
