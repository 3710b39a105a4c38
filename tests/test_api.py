"""Tests of the public API: ntk_sap_prune and ntk_sap_scores (counts, rounds, determinism, the model
left unchanged, NaN, params, conv kinds, bfloat16, micro_batch) and the public namespace.

Bad input, the schedule, presets, models and mask I/O have their own files (test_arguments.py,
test_schedule.py, test_presets.py, test_models.py, test_masks.py). Everything runs on CPU with tiny
models and few draws so the whole file stays fast.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import ntksap_fast
from _tiny_models import (
    CNN_SHAPE,
    FAST,
    MLP_SHAPE,
    SCORE_FAST,
    assert_same_snapshot,
    default_prunable_names,
    expected_keep,
    expected_schedule,
    flat,
    mlp,
    snapshot,
    tiny_cnn,
)
from ntksap_fast import density_schedule, keep_count, mask_density, ntk_sap_prune, ntk_sap_scores


# ----------------------------------------------------------------------------------------------
# ntk_sap_prune: keys, shapes, exact counts, rounds, monotone
# ----------------------------------------------------------------------------------------------
class Mixed(nn.Module):
    """Every default-prunable kind plus things that must not be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(4)
        self.dw = nn.Conv1d(4, 4, 3, padding=1, groups=4, bias=False)  # depthwise
        self.ln = nn.LayerNorm(4)
        self.c3 = nn.Conv3d(1, 2, 2)
        self.c2 = nn.Conv2d(2, 4, 2, groups=2)  # grouped
        self.bn2 = nn.BatchNorm2d(4)
        self.scale = nn.Parameter(torch.ones(3, 4))  # 2-D but not a Conv/Linear weight
        self.fc = nn.Linear(8, 3)

    def forward(self, x):  # x: (B, 2, 8)
        a = torch.relu(self.bn1(self.c1(x)))
        a = self.dw(a)  # (B, 4, 8)
        a = self.ln(a.transpose(1, 2)).mean(1)  # (B, 4)
        v = x.reshape(x.shape[0], 1, 2, 2, 4)  # (B, 1, 2, 2, 4)
        v = self.c3(v)  # (B, 2, 1, 1, 3)
        v = v.reshape(x.shape[0], 2, 1, 3)
        v = torch.nn.functional.pad(v, (0, 0, 0, 1))  # (B, 2, 2, 3)
        v = self.bn2(self.c2(v)).mean((2, 3))  # (B, 4)
        out = self.fc(torch.cat([a, v], 1))
        return out + (self.scale.sum(1).unsqueeze(0) * 0.0)


def test_default_prunable_tensors_and_shapes():
    torch.manual_seed(0)
    model = Mixed()
    masks = ntk_sap_prune(model, 0.5, (2, 8), iterations=2, **FAST)
    want = default_prunable_names(model)
    assert want == ["c1.weight", "dw.weight", "c3.weight", "c2.weight", "fc.weight"]
    assert list(masks) == want
    params = dict(model.named_parameters())
    for name, m in masks.items():
        assert isinstance(m, torch.Tensor)
        assert m.dtype == torch.bool
        assert m.shape == params[name].shape
    n = sum(params[k].numel() for k in want)
    assert int(flat(masks).sum()) == expected_keep(n, 0.5)

    scores = ntk_sap_scores(model, (2, 8), **SCORE_FAST)
    assert list(scores) == want
    for name, s in scores.items():
        assert s.dtype == torch.float32 and s.shape == params[name].shape


DENSITIES = [1.0, 0.5, 0.05, 0.8**10, "one"]


@pytest.mark.parametrize("schedule", ["exponential", "linear"])
@pytest.mark.parametrize("density", DENSITIES)
def test_prune_exact_counts_every_round(density, schedule):
    model = mlp(1)
    names = default_prunable_names(model)
    params = dict(model.named_parameters())
    n = sum(params[k].numel() for k in names)
    if density == "one":
        density = 0.5 / n
        assert expected_keep(n, density) == 1
    iterations = 3
    rounds = []

    def on_round(t, masks):
        rounds.append((t, {k: v.clone() for k, v in masks.items()}))

    masks = ntk_sap_prune(
        model, density, MLP_SHAPE, iterations=iterations, schedule=schedule, on_round=on_round, **FAST
    )
    assert [t for t, _ in rounds] == list(range(1, iterations + 1))
    sched = expected_schedule(density, iterations, schedule)
    prev = torch.ones(n, dtype=torch.bool)
    for t, m in rounds:
        assert list(m) == names
        for k, v in m.items():
            assert v.dtype == torch.bool and v.shape == params[k].shape
        f = flat(m)
        assert int(f.sum()) == expected_keep(n, sched[t - 1])
        assert int(f.sum()) == keep_count(n, density_schedule(density, iterations, schedule)[t - 1])
        assert not bool((f & ~prev).any()), f"round {t} revived pruned entries"
        prev = f
    assert list(masks) == names
    assert torch.equal(flat(masks), prev)
    assert int(flat(masks).sum()) == expected_keep(n, density)
    assert mask_density(masks) == pytest.approx(expected_keep(n, density) / n)


def test_on_round_masks_are_copies():
    """Mutating the masks given to on_round must not change the pruning."""
    model = mlp(2)
    ref = ntk_sap_prune(model, 0.3, MLP_SHAPE, iterations=3, seed=5, **FAST)

    def vandal(t, masks):
        for v in masks.values():
            v.fill_(True)

    got = ntk_sap_prune(model, 0.3, MLP_SHAPE, iterations=3, seed=5, on_round=vandal, **FAST)
    assert torch.equal(flat(got), flat(ref))


# ----------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------
def test_same_seed_same_masks_different_seed_different_masks():
    model = mlp(3, width=24)
    kw = dict(iterations=2, draws=2, batch_size=4, progress=False)
    a = ntk_sap_prune(model, 0.3, MLP_SHAPE, seed=11, **kw)
    b = ntk_sap_prune(model, 0.3, MLP_SHAPE, seed=11, **kw)
    c = ntk_sap_prune(model, 0.3, MLP_SHAPE, seed=12, **kw)
    assert torch.equal(flat(a), flat(b))
    assert int(flat(a).sum()) == int(flat(c).sum())
    assert not torch.equal(flat(a), flat(c))

    sa = ntk_sap_scores(model, MLP_SHAPE, seed=11, draws=2, batch_size=4)
    sb = ntk_sap_scores(model, MLP_SHAPE, seed=11, draws=2, batch_size=4)
    sc = ntk_sap_scores(model, MLP_SHAPE, seed=12, draws=2, batch_size=4)
    sr = ntk_sap_scores(model, MLP_SHAPE, seed=11, round=1, draws=2, batch_size=4)
    assert torch.equal(flat(sa), flat(sb))
    assert not torch.equal(flat(sa), flat(sc))
    assert not torch.equal(flat(sa), flat(sr))


def test_cnn_determinism_and_progress_flag_irrelevant():
    model = tiny_cnn(0)
    a = ntk_sap_prune(model, 0.2, CNN_SHAPE, iterations=2, draws=1, batch_size=4, seed=3, progress=False)
    b = ntk_sap_prune(model, 0.2, CNN_SHAPE, iterations=2, draws=1, batch_size=4, seed=3, progress=True)
    assert torch.equal(flat(a), flat(b))


# ----------------------------------------------------------------------------------------------
# ntk_sap_scores
# ----------------------------------------------------------------------------------------------
def test_scores_nonnegative_and_zero_where_masked():
    model = tiny_cnn(1)
    names = default_prunable_names(model)
    params = dict(model.named_parameters())
    dense = ntk_sap_scores(model, CNN_SHAPE, draws=2, batch_size=4, seed=2)
    assert list(dense) == names
    for k, s in dense.items():
        assert s.dtype == torch.float32 and s.shape == params[k].shape
        assert bool((s >= 0).all())
        assert bool(torch.isfinite(s).all())
    assert float(flat(dense).max()) > 0

    g = torch.Generator().manual_seed(0)
    masks = {k: torch.rand(params[k].shape, generator=g) < 0.4 for k in names}
    sparse = ntk_sap_scores(model, CNN_SHAPE, masks, draws=2, batch_size=4, seed=2, round=1)
    assert list(sparse) == names
    for k in names:
        s, m = sparse[k], masks[k]
        assert s.dtype == torch.float32 and s.shape == params[k].shape
        assert bool((s >= 0).all())
        assert bool((s[~m] == 0).all()), f"{k}: non-zero score at a pruned entry"
        assert bool((s[m] > 0).any()), f"{k}: every kept score is zero"

    all_true = {k: torch.ones(params[k].shape, dtype=torch.bool) for k in names}
    same = ntk_sap_scores(model, CNN_SHAPE, all_true, draws=2, batch_size=4, seed=2)
    assert torch.equal(flat(same), flat(dense))


@pytest.mark.parametrize("density", [0.5, 0.1])
def test_one_round_prune_keeps_top_scores(density):
    model = tiny_cnn(2)
    kw = dict(draws=2, batch_size=[4, 3], seed=7)
    scores = flat(ntk_sap_scores(model, CNN_SHAPE, **kw))
    masks = flat(ntk_sap_prune(model, density, CNN_SHAPE, iterations=1, progress=False, **kw))
    n = scores.numel()
    k = expected_keep(n, density)
    assert int(masks.sum()) == k
    # Largest scores win, ties to the lower flat index (stable descending sort).
    order = torch.sort(scores, descending=True, stable=True).indices
    want = torch.zeros(n, dtype=torch.bool)
    want[order[:k]] = True
    kept_min = scores[masks].min()
    pruned_max = scores[~masks].max()
    assert kept_min >= pruned_max
    assert torch.equal(masks, want)


# ----------------------------------------------------------------------------------------------
# The model is never modified
# ----------------------------------------------------------------------------------------------
class Watched(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = self.drop(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
        return self.head(x)


def watched_model(train: bool) -> tuple[Watched, dict]:
    torch.manual_seed(4)
    model = Watched()
    model.train()
    with torch.no_grad():  # non-trivial running statistics and num_batches_tracked
        for _ in range(2):
            model(torch.randn(6, *CNN_SHAPE) * 3 + 1)
    if train:
        model.train()
        model.bn.eval()  # a submodule in a different mode from its parent
    else:
        model.eval()
        model.head.train()
        model.head[1].eval()
    model.conv.bias.requires_grad_(False)
    model.head[0].weight.requires_grad_(False)  # a prunable tensor with requires_grad False
    calls = {"fwd": 0, "pre": 0}

    def fwd_hook(mod, inp, out):
        calls["fwd"] += 1

    def pre_hook(mod, inp):
        calls["pre"] += 1

    model.register_forward_hook(fwd_hook)
    model.conv.register_forward_pre_hook(pre_hook)
    model.head[0].register_forward_hook(fwd_hook)
    return model, calls


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("entry", ["prune", "scores"])
def test_model_left_unchanged(train, entry):
    model, calls = watched_model(train)
    assert model.bn.num_batches_tracked.item() == 2
    before = snapshot(model)
    if entry == "prune":
        masks = ntk_sap_prune(model, 0.3, CNN_SHAPE, iterations=2, draws=2, batch_size=4, progress=False)
        assert int(flat(masks).sum()) == expected_keep(flat(masks).numel(), 0.3)
    else:
        scores = ntk_sap_scores(model, CNN_SHAPE, draws=2, batch_size=4)
        assert float(flat(scores).max()) > 0
    assert_same_snapshot(before, model)
    assert model.bn.num_batches_tracked.item() == 2
    assert model.head[1].num_batches_tracked.item() == 2
    # The user's hooks are still live.
    counted = dict(calls)
    with torch.no_grad():
        model(torch.randn(3, *CNN_SHAPE))
    assert calls["fwd"] == counted["fwd"] + 2 and calls["pre"] == counted["pre"] + 1


class Boom(Exception):
    pass


class ExplodesOnThirdCall(Watched):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:
            raise Boom("third forward")
        return super().forward(x)


@pytest.mark.parametrize("entry", ["prune", "scores"])
def test_model_restored_when_forward_raises(entry):
    torch.manual_seed(0)
    model = ExplodesOnThirdCall()
    model.train()
    model.head.eval()
    model.conv.weight.requires_grad_(False)
    counter = []
    model.bn.register_forward_hook(lambda m, i, o: counter.append(1))
    before = snapshot(model)
    with pytest.raises(Boom):
        if entry == "prune":
            ntk_sap_prune(model, 0.5, CNN_SHAPE, iterations=2, draws=2, batch_size=4, progress=False)
        else:
            ntk_sap_scores(model, CNN_SHAPE, draws=2, batch_size=4)
    assert model.calls == 3
    assert_same_snapshot(before, model)
    assert model.training and not model.head.training and model.bn.training


# ----------------------------------------------------------------------------------------------
# NaN
# ----------------------------------------------------------------------------------------------
class NanMul(nn.Module):
    def forward(self, x):
        return x * float("nan")


class HalfPoisoned(nn.Module):
    """Output = cat(clean(x), poisoned(x * nan)): only ``poisoned.weight`` gets NaN gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.clean = nn.Linear(6, 3)
        self.nan = NanMul()
        self.poisoned = nn.Linear(6, 3)

    def forward(self, x):
        return torch.cat([self.clean(x), self.poisoned(self.nan(x))], 1)


@pytest.mark.parametrize("entry", ["prune", "scores"])
def test_nan_scores_raise_naming_tensor(entry):
    torch.manual_seed(0)
    model = HalfPoisoned()
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        if entry == "prune":
            ntk_sap_prune(model, 0.5, MLP_SHAPE, iterations=2, **FAST)
        else:
            ntk_sap_scores(model, MLP_SHAPE, **SCORE_FAST)
    msg = str(info.value)
    assert "poisoned.weight" in msg
    assert "clean.weight" not in msg
    assert_same_snapshot(before, model)


def test_nan_everywhere_names_all_tensors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), NanMul(), nn.Linear(5, 2))
    with pytest.raises(ValueError) as info:
        ntk_sap_prune(model, 0.5, MLP_SHAPE, iterations=1, **FAST)
    # The first Linear's weight gradient is NaN too (NaN flows back through the NaN product).
    assert "0.weight" in str(info.value)
    assert "2.weight" in str(info.value)


# ----------------------------------------------------------------------------------------------
# params
# ----------------------------------------------------------------------------------------------
def test_params_list_selects_exactly_those():
    model = tiny_cnn(0)
    chosen = ["fc.weight", "conv1.weight"]  # order given differs from the model's
    masks = ntk_sap_prune(model, 0.5, CNN_SHAPE, iterations=2, params=chosen, **FAST)
    assert set(masks) == set(chosen)
    params = dict(model.named_parameters())
    n = sum(params[k].numel() for k in chosen)
    assert int(flat(masks).sum()) == expected_keep(n, 0.5)
    for k, m in masks.items():
        assert m.shape == params[k].shape
    scores = ntk_sap_scores(model, CNN_SHAPE, params=chosen, **SCORE_FAST)
    assert set(scores) == set(chosen)


def test_params_predicate():
    model = tiny_cnn(0)
    seen = []

    def only_convs(name, module, param):
        seen.append(name)
        assert isinstance(name, str)
        assert isinstance(module, nn.Module)
        assert any(p is param for p in module.parameters(recurse=False))
        return isinstance(module, nn.Conv2d) and name.endswith("weight")

    masks = ntk_sap_prune(model, 0.4, CNN_SHAPE, iterations=2, params=only_convs, **FAST)
    assert list(masks) == ["conv1.weight", "conv2.weight"]
    assert set(seen) == {n for n, _ in model.named_parameters()}
    params = dict(model.named_parameters())
    n = params["conv1.weight"].numel() + params["conv2.weight"].numel()
    assert int(flat(masks).sum()) == expected_keep(n, 0.4)


# ----------------------------------------------------------------------------------------------
# Conv1d, grouped/depthwise conv, bfloat16, micro_batch
# ----------------------------------------------------------------------------------------------
def conv1d_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv1d(2, 6, 3, padding=1),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Conv1d(6, 6, 3, padding=1, groups=6, bias=False),  # depthwise
        nn.Conv1d(6, 4, 1, groups=2),
        nn.ReLU(),  # grouped pointwise
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def grouped_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),  # depthwise
        nn.Conv2d(6, 4, 3, padding=1, groups=2),
        nn.ReLU(),  # grouped
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


@pytest.mark.parametrize(
    "factory,shape,want_shapes",
    [
        (
            conv1d_net,
            (2, 16),
            {"0.weight": (6, 2, 3), "3.weight": (6, 1, 3), "4.weight": (4, 3, 1), "8.weight": (3, 4)},
        ),
        (
            grouped_cnn,
            CNN_SHAPE,
            {"0.weight": (6, 3, 3, 3), "3.weight": (6, 1, 3, 3), "6.weight": (4, 3, 3, 3), "10.weight": (3, 4)},
        ),
    ],
)
def test_conv1d_grouped_depthwise(factory, shape, want_shapes):
    model = factory()
    masks = ntk_sap_prune(model, 0.3, shape, iterations=2, draws=2, batch_size=4, progress=False)
    assert {k: tuple(v.shape) for k, v in masks.items()} == want_shapes
    assert list(masks) == default_prunable_names(model)
    n = sum(math.prod(s) for s in want_shapes.values())
    assert int(flat(masks).sum()) == expected_keep(n, 0.3)
    assert all(v.dtype == torch.bool for v in masks.values())
    scores = ntk_sap_scores(model, shape, **SCORE_FAST)
    for k, s in scores.items():
        assert tuple(s.shape) == want_shapes[k]
        assert bool(torch.isfinite(s).all()) and bool((s >= 0).all())
    assert float(flat(scores).max()) > 0


@pytest.mark.parametrize("density", [0.5, 0.8**10])
def test_bfloat16_exact_counts(density):
    model = tiny_cnn(3)
    before = snapshot(model)
    rounds = []

    def on_round(t, masks):
        rounds.append(int(flat(masks).sum()))

    masks = ntk_sap_prune(
        model,
        density,
        CNN_SHAPE,
        iterations=3,
        dtype=torch.bfloat16,
        draws=2,
        batch_size=4,
        progress=False,
        on_round=on_round,
    )
    n = flat(masks).numel()
    assert list(masks) == default_prunable_names(model)
    assert all(v.dtype == torch.bool for v in masks.values())
    assert rounds == [expected_keep(n, d) for d in expected_schedule(density, 3, "exponential")]
    assert int(flat(masks).sum()) == expected_keep(n, density)
    scores = ntk_sap_scores(model, CNN_SHAPE, dtype=torch.bfloat16, **SCORE_FAST)
    assert all(s.dtype == torch.float32 for s in scores.values())
    assert_same_snapshot(before, model)


@pytest.mark.parametrize("factory,shape", [(tiny_cnn, CNN_SHAPE), (conv1d_net, (2, 16))])
def test_micro_batch_matches_whole_batch(factory, shape):
    model = factory()
    kw = dict(draws=2, batch_size=12, seed=9)
    whole = flat(ntk_sap_scores(model, shape, **kw))
    for micro in (5, 12, 100):
        part = flat(ntk_sap_scores(model, shape, micro_batch=micro, **kw))
        assert part.shape == whole.shape
        torch.testing.assert_close(part, whole, rtol=1e-4, atol=1e-4 * float(whole.max()))
    assert float(whole.max()) > 0


def test_micro_batch_with_per_draw_batch_sizes():
    model = tiny_cnn(7)
    kw = dict(draws=2, batch_size=[7, 12], seed=1)
    whole = flat(ntk_sap_scores(model, CNN_SHAPE, **kw))
    part = flat(ntk_sap_scores(model, CNN_SHAPE, micro_batch=5, **kw))
    torch.testing.assert_close(part, whole, rtol=1e-4, atol=1e-4 * float(whole.max()))


def test_public_namespace():
    for name in (
        "ntk_sap_prune",
        "ntk_sap_scores",
        "apply_masks",
        "save_masks",
        "load_masks",
        "mask_density",
        "density_schedule",
        "keep_count",
        "PRESETS",
        "Preset",
    ):
        assert name in ntksap_fast.__all__
        assert hasattr(ntksap_fast, name)
