"""Tests of the public API: ntk_sap_prune, ntk_sap_scores, masks I/O, presets, models.

Everything runs on CPU with tiny models and few draws so the whole file stays fast.
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

import ntksap_fast
from ntksap_fast import (
    PRESETS,
    apply_masks,
    density_schedule,
    keep_count,
    load_masks,
    mask_density,
    ntk_sap_prune,
    ntk_sap_scores,
    save_masks,
)
from ntksap_fast import models as nf_models

FAST = dict(draws=1, batch_size=4, progress=False)
SCORE_FAST = dict(draws=1, batch_size=4)


# ----------------------------------------------------------------------------------------------
# Helpers and tiny models
# ----------------------------------------------------------------------------------------------
def expected_keep(n_total: int, density: float) -> int:
    """DESIGN.md: n_keep = N - floor((1 - d) * N), computed independently of the package."""
    return n_total - math.floor((1.0 - density) * n_total)


def expected_schedule(density: float, iterations: int, schedule: str) -> list[float]:
    if schedule == "exponential":
        return [density ** (t / iterations) for t in range(1, iterations + 1)]
    return [1.0 - (1.0 - density) * t / iterations for t in range(1, iterations + 1)]


def default_prunable_names(model: nn.Module) -> list[str]:
    """Names, in named_parameters() order, of the weight of every Conv1d/2d/3d and Linear."""
    owner = {}
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = mod
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    return [n for n, _ in model.named_parameters() if isinstance(owner[n], kinds) and n.endswith("weight")]


def flat(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([m.reshape(-1) for m in masks.values()])


def mlp(seed: int = 0, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4))


class TinyCNN(nn.Module):
    """Conv + BN + grouped conv + BN + Linear, input (3, 8, 8)."""

    input_hw = (3, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.drop(x))


def tiny_cnn(seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN()


CNN_SHAPE = (3, 8, 8)
MLP_SHAPE = (6,)


def snapshot(model: nn.Module) -> dict:
    """Everything about the model that pruning must leave alone."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "param_ids": [(n, id(p)) for n, p in model.named_parameters()],
        "buffer_ids": [(n, id(b)) for n, b in model.named_buffers()],
        "training": [(n, m.training) for n, m in model.named_modules()],
        "requires_grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "grads": [(n, p.grad is None) for n, p in model.named_parameters()],
        "hooks": [
            (
                n,
                dict(m._forward_hooks),
                dict(m._forward_pre_hooks),
                dict(m._backward_hooks),
                dict(getattr(m, "_forward_hooks_with_kwargs", {})),
            )
            for n, m in model.named_modules()
        ],
        "global_hooks": (
            len(torch.nn.modules.module._global_forward_hooks),
            len(torch.nn.modules.module._global_forward_pre_hooks),
        ),
    }


def assert_same_snapshot(before: dict, model: nn.Module) -> None:
    after = snapshot(model)
    assert list(before["state"]) == list(after["state"])
    for k, v in before["state"].items():
        w = after["state"][k]
        assert v.dtype == w.dtype and v.shape == w.shape, k
        assert torch.equal(v, w), f"state_dict[{k!r}] changed"
    assert before["param_ids"] == after["param_ids"], "parameters were replaced"
    assert before["buffer_ids"] == after["buffer_ids"], "buffers were replaced"
    assert before["training"] == after["training"], "train/eval modes changed"
    assert before["requires_grad"] == after["requires_grad"], "requires_grad flags changed"
    assert before["grads"] == after["grads"], ".grad of a parameter changed"
    for (n, fh, fph, bh, fhk), (n2, fh2, fph2, bh2, fhk2) in zip(before["hooks"], after["hooks"]):
        assert n == n2
        assert fh == fh2, f"forward hooks of {n!r} changed"
        assert fph == fph2, f"forward pre-hooks of {n!r} changed"
        assert bh == bh2, f"backward hooks of {n!r} changed"
        assert fhk == fhk2, f"forward hook kwargs flags of {n!r} changed"
    assert before["global_hooks"] == after["global_hooks"], "global module hooks changed"


# ----------------------------------------------------------------------------------------------
# keep_count / density_schedule
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 160, 1000, 272474])
@pytest.mark.parametrize("d", [1.0, 0.5, 0.05, 0.8**10, 1e-9, 0.999999])
def test_keep_count_formula(n, d):
    assert keep_count(n, d) == expected_keep(n, d)
    assert 1 <= keep_count(n, d) <= n


@pytest.mark.parametrize("schedule", ["exponential", "linear"])
def test_density_schedule_formula(schedule):
    got = density_schedule(0.05, 7, schedule)
    want = expected_schedule(0.05, 7, schedule)
    assert len(got) == 7
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert got[-1] == pytest.approx(0.05, rel=1e-12)
    assert all(a > b for a, b in zip(got, got[1:]))


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

    masks = ntk_sap_prune(model, density, MLP_SHAPE, iterations=iterations, schedule=schedule,
                          on_round=on_round, **FAST)
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


@pytest.mark.parametrize("entry", ["prune", "scores"])
def test_params_errors(entry):
    model = tiny_cnn(0)

    def call(params):
        if entry == "prune":
            return ntk_sap_prune(model, 0.5, CNN_SHAPE, iterations=1, params=params, **FAST)
        return ntk_sap_scores(model, CNN_SHAPE, params=params, **SCORE_FAST)

    with pytest.raises(ValueError, match="params") as info:
        call(["conv1.weight", "nope.weight"])
    assert "nope.weight" in str(info.value)
    with pytest.raises(ValueError):
        call([])
    with pytest.raises(ValueError):
        call(lambda n, m, p: False)
    with pytest.raises(ValueError) as info:
        call(["conv1.weight", "fc.bias"])  # 1-D: fan_in needs >= 2 dims
    assert "fc.bias" in str(info.value) or "params" in str(info.value)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
PRUNE_BAD = [
    ("density", 0), ("density", 0.0), ("density", -0.1), ("density", 1.5), ("density", float("nan")),
    ("density", "0.5"), ("density", None),
    ("iterations", 0), ("iterations", -1), ("iterations", 2.5), ("iterations", True),
    ("draws", 0), ("draws", 2.5), ("draws", True),
    ("batch_size", 0), ("batch_size", 2.5), ("batch_size", True), ("batch_size", [4, 4, 4]),
    ("batch_size", [4, 0]),
    ("epsilon", 0), ("epsilon", 0.0), ("epsilon", -0.01), ("epsilon", float("inf")), ("epsilon", float("nan")),
    ("epsilon", "0.01"),
    ("seed", -1), ("seed", 1.5),
    ("schedule", "cosine"), ("schedule", None),
    ("dtype", torch.float16), ("dtype", torch.int32), ("dtype", "float32"),
    ("micro_batch", 0), ("micro_batch", 2.5),
    ("device", "not-a-device"),
]


@pytest.mark.parametrize("arg,value", PRUNE_BAD, ids=[f"{a}={v!r}" for a, v in PRUNE_BAD])
def test_prune_bad_arguments(arg, value):
    model = mlp(0)
    kw = dict(density=0.5, iterations=2, draws=2, batch_size=4, progress=False)
    kw[arg] = value
    density = kw.pop("density")
    with pytest.raises((ValueError, TypeError), match=arg):
        ntk_sap_prune(model, density, MLP_SHAPE, **kw)


SCORES_BAD = [
    ("draws", 0), ("draws", 2.5), ("draws", True),
    ("batch_size", 0), ("batch_size", 2.5), ("batch_size", [4]),
    ("epsilon", 0), ("epsilon", float("inf")), ("epsilon", float("nan")),
    ("seed", -1), ("round", -1), ("round", 0.5),
    ("dtype", torch.float16), ("micro_batch", 0),
]


@pytest.mark.parametrize("arg,value", SCORES_BAD, ids=[f"{a}={v!r}" for a, v in SCORES_BAD])
def test_scores_bad_arguments(arg, value):
    model = mlp(0)
    kw = dict(draws=2, batch_size=4)
    kw[arg] = value
    with pytest.raises((ValueError, TypeError), match=arg):
        ntk_sap_scores(model, MLP_SHAPE, **kw)


@pytest.mark.parametrize("entry", ["prune", "scores"])
def test_input_shape_errors(entry):
    def call(model, shape):
        if entry == "prune":
            return ntk_sap_prune(model, 0.5, shape, iterations=1, **FAST)
        return ntk_sap_scores(model, shape, **SCORE_FAST)

    with pytest.raises(ValueError, match="input_shape"):
        call(mlp(0), (5,))  # Linear(6, ...) does not take 5 features
    with pytest.raises(ValueError, match="input_shape"):
        call(tiny_cnn(0), (6,))  # Conv2d on a 2-D batch
    with pytest.raises(ValueError, match="input_shape"):
        call(mlp(0), None)  # a plain model does not carry input_shape
    with pytest.raises((ValueError, TypeError), match="input_shape"):
        call(mlp(0), (0,))
    # The package's models carry input_shape: None is fine.
    torch.manual_seed(0)
    model = nf_models.resnet20()
    assert model.input_shape == (3, 32, 32)
    if entry == "prune":
        masks = ntk_sap_prune(model, 0.5, iterations=1, draws=1, batch_size=2, progress=False)
    else:
        masks = ntk_sap_scores(model, draws=1, batch_size=2)
    assert list(masks) == default_prunable_names(model)


@pytest.mark.parametrize("entry", ["prune", "scores"])
def test_model_errors(entry):
    def call(model):
        if entry == "prune":
            return ntk_sap_prune(model, 0.5, MLP_SHAPE, iterations=1, **FAST)
        return ntk_sap_scores(model, MLP_SHAPE, **SCORE_FAST)

    with pytest.raises(TypeError, match="model"):
        call(lambda x: x)
    with pytest.raises(TypeError, match="model"):
        call({"0.weight": torch.ones(2, 6)})
    with pytest.raises(ValueError):
        call(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError):
        call(nn.Sequential(nn.BatchNorm1d(6)))
    with pytest.raises(ValueError):
        call(nn.Sequential(nn.LayerNorm(6), nn.ReLU()))


def test_scores_bad_masks():
    model = tiny_cnn(0)
    params = dict(model.named_parameters())
    names = default_prunable_names(model)
    good = {k: torch.ones(params[k].shape, dtype=torch.bool) for k in names}

    missing = dict(good)
    missing.pop(names[0])
    extra = dict(good, **{"bn1.weight": torch.ones(4, dtype=torch.bool)})
    unknown = dict(good, **{"nope.weight": torch.ones(2, 2, dtype=torch.bool)})
    wrong_shape = dict(good, **{names[1]: torch.ones(3, 3, dtype=torch.bool)})
    transposed = dict(good, **{"fc.weight": torch.ones(params["fc.weight"].shape[::-1], dtype=torch.bool)})
    for bad in (missing, extra, unknown, wrong_shape, transposed):
        with pytest.raises(ValueError, match="masks"):
            ntk_sap_scores(model, CNN_SHAPE, bad, **SCORE_FAST)
    with pytest.raises(TypeError, match="masks"):
        ntk_sap_scores(model, CNN_SHAPE, [good[k] for k in names], **SCORE_FAST)
    with pytest.raises(TypeError, match="masks"):
        ntk_sap_scores(model, CNN_SHAPE, dict(good, **{names[0]: [[True]]}), **SCORE_FAST)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.uint8])
def test_scores_non_bool_masks_rejected(dtype):
    """Masks are bool tensors (True = kept); a float/int mask is rejected, not silently cast."""
    model = tiny_cnn(0)
    params = dict(model.named_parameters())
    names = default_prunable_names(model)
    bad = {k: torch.ones(params[k].shape, dtype=dtype) for k in names}
    with pytest.raises((TypeError, ValueError), match="masks"):
        ntk_sap_scores(model, CNN_SHAPE, bad, **SCORE_FAST)


# ----------------------------------------------------------------------------------------------
# apply_masks
# ----------------------------------------------------------------------------------------------
def test_apply_masks_prune_convention_and_training_keeps_zeros():
    model = tiny_cnn(5)
    masks = ntk_sap_prune(model, 0.3, CNN_SHAPE, iterations=2, **FAST)
    originals = {k: p.detach().clone() for k, p in model.named_parameters()}
    out = apply_masks(model, masks)
    assert out is model
    modules = dict(model.named_modules())
    for name, m in masks.items():
        mod = modules[name.rpartition(".")[0]]
        assert isinstance(mod.weight_orig, nn.Parameter)
        assert "weight_orig" in dict(mod.named_parameters(recurse=False))
        assert "weight_mask" in dict(mod.named_buffers(recurse=False))
        assert "weight" not in dict(mod.named_parameters(recurse=False))
        assert torch.equal(mod.weight_orig.detach(), originals[name])
        assert torch.equal(mod.weight_mask, m.to(mod.weight_mask.dtype))
        assert torch.equal(mod.weight, mod.weight_orig * mod.weight_mask)
        assert bool((mod.weight[~m] == 0).all())

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, *CNN_SHAPE, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    for _ in range(2):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    model(x)  # recompute weight = weight_orig * mask after the step
    changed = False
    for name, m in masks.items():
        mod = modules[name.rpartition(".")[0]]
        assert bool((mod.weight[~m] == 0).all()), f"{name}: a pruned entry became non-zero"
        assert torch.equal(mod.weight, mod.weight_orig * mod.weight_mask)
        changed |= not torch.equal(mod.weight_orig.detach(), originals[name])
    assert changed, "the training step changed nothing: the check above is vacuous"


def _pruned_modules(model):
    return [n for n, m in model.named_modules() if hasattr(m, "weight_orig") or hasattr(m, "weight_mask")]


def test_apply_masks_bad_masks_leave_model_unchanged():
    model = tiny_cnn(0)
    params = dict(model.named_parameters())
    good = {k: torch.rand(params[k].shape) < 0.5 for k in default_prunable_names(model)}
    # A good mask first so an implementation that prunes as it goes would be caught.
    cases = [
        (ValueError, dict(good, **{"nope.weight": torch.ones(2, 2, dtype=torch.bool)})),
        (ValueError, dict(good, **{"conv9.weight": torch.ones(4, 3, 3, 3, dtype=torch.bool)})),
        (ValueError, dict(good, **{"fc.weight": torch.ones(5, 9, dtype=torch.bool)})),
        (ValueError, dict(good, **{"conv2.weight": torch.ones(8, 4, 3, 3, dtype=torch.bool)})),
        (TypeError, dict(good, **{"fc.weight": torch.ones(params["fc.weight"].shape)})),
        (TypeError, dict(good, **{"fc.weight": torch.ones(params["fc.weight"].shape, dtype=torch.uint8)})),
    ]
    for exc, bad in cases:
        before = snapshot(model)
        keys_before = list(model.state_dict())
        with pytest.raises(exc):
            apply_masks(model, bad)
        assert _pruned_modules(model) == []
        assert list(model.state_dict()) == keys_before
        assert_same_snapshot(before, model)
    with pytest.raises(TypeError):
        apply_masks(model, [good])
    assert _pruned_modules(model) == []


# ----------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_load_round_trip(tmp_path, suffix):
    model = tiny_cnn(0)
    masks = ntk_sap_prune(model, 0.25, CNN_SHAPE, iterations=2, **FAST)
    path = tmp_path / f"masks{suffix}"
    save_masks(masks, path)
    assert path.is_file()
    loaded = load_masks(path)
    assert set(loaded) == set(masks)
    for k, v in masks.items():
        assert loaded[k].dtype == torch.bool
        assert loaded[k].shape == v.shape
        assert torch.equal(loaded[k], v.cpu())
    loaded_str = load_masks(str(path))
    assert all(torch.equal(loaded_str[k], loaded[k]) for k in masks)
    # The loaded masks are usable.
    apply_masks(model, loaded)
    assert sorted(_pruned_modules(model)) == sorted(k.rpartition(".")[0] for k in masks)


def test_load_masks_rejects_non_bool_and_missing(tmp_path):
    pt = tmp_path / "bad.pt"
    torch.save({"fc.weight": torch.ones(2, 3), "conv.weight": torch.ones(2, dtype=torch.bool)}, pt)
    with pytest.raises(TypeError):
        load_masks(pt)
    from safetensors.torch import save_file

    st = tmp_path / "bad.safetensors"
    save_file({"fc.weight": torch.ones(2, 3, dtype=torch.uint8)}, str(st))
    with pytest.raises(TypeError):
        load_masks(st)
    with pytest.raises(ValueError):
        load_masks(tmp_path / "missing.pt")
    with pytest.raises(ValueError):
        load_masks(tmp_path / "missing.safetensors")
    with pytest.raises(TypeError):
        save_masks({"fc.weight": torch.ones(2, 3)}, tmp_path / "x.pt")


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------
# DESIGN.md section 2's table.
PAPER = {
    "cifar10": ("resnet20", (3, 32, 32), 10, 5, 500, 20),
    "cifar100": ("vgg16_bn", (3, 32, 32), 100, 4, 1000, 100),
    "tiny-imagenet": ("resnet18", (3, 64, 64), 200, 8, 2000, 100),
    "imagenet": ("resnet50", (3, 224, 224), 1000, 40, 10000, 100),
}


def _per_draw(preset) -> list[int]:
    bs = preset.batch_size
    return list(bs) if isinstance(bs, (list, tuple)) else [bs] * preset.draws


def test_presets_match_design_table():
    assert set(PRESETS) == set(PAPER)
    for key, (model, shape, classes, draws, total, iterations) in PAPER.items():
        p = PRESETS[key]
        assert p.model.split(":")[-1] == model, key
        assert tuple(p.input_shape) == shape, key
        assert p.num_classes == classes, key
        assert p.draws == draws, key
        sizes = _per_draw(p)
        assert len(sizes) == draws, key
        assert sum(sizes) == total, key
        assert all(isinstance(s, int) and 1 <= s <= 256 for s in sizes), key
        assert p.iterations == iterations, key
        assert p.epsilon == 0.01
        assert list(p.densities) == pytest.approx([0.8**k for k in range(2, 19)])
    assert _per_draw(PRESETS["cifar10"]) == [100] * 5
    assert _per_draw(PRESETS["cifar100"]) == [256, 256, 256, 232]
    assert _per_draw(PRESETS["tiny-imagenet"]) == [256] * 7 + [208]
    assert _per_draw(PRESETS["imagenet"]) == [256] * 39 + [16]


@pytest.mark.parametrize("key", sorted(PAPER))
def test_preset_kwargs_fit_prune_signature(key):
    kw = PRESETS[key].prune_kwargs()
    assert "density" not in kw
    inspect.signature(ntk_sap_prune).bind(nn.Linear(2, 2), 0.5, **kw)  # raises TypeError if not
    assert tuple(kw["input_shape"]) == PAPER[key][1]
    assert kw["draws"] == PAPER[key][3] and kw["iterations"] == PAPER[key][5]


def test_cifar10_preset_runs():
    kw = PRESETS["cifar10"].prune_kwargs()
    kw.update(draws=1, batch_size=2, iterations=2)
    torch.manual_seed(0)
    model = nf_models.resnet20()
    rounds = []
    masks = ntk_sap_prune(model, 0.8**5, progress=False, on_round=lambda t, m: rounds.append(t), **kw)
    names = default_prunable_names(model)
    assert list(masks) == names
    n = sum(dict(model.named_parameters())[k].numel() for k in names)
    assert int(flat(masks).sum()) == expected_keep(n, 0.8**5)
    assert rounds == [1, 2]


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
def cifar_resnet_param_count(depth: int, num_classes: int = 10) -> int:
    """Parameters of He et al.'s CIFAR ResNet with option-B (1x1 conv + BN) shortcuts."""
    n = (depth - 2) // 6

    def conv(cin, cout, k):
        return cin * cout * k * k

    def bn(c):
        return 2 * c

    total = conv(3, 16, 3) + bn(16)
    cin = 16
    for planes in (16, 32, 64):
        for i in range(n):
            total += conv(cin, planes, 3) + bn(planes) + conv(planes, planes, 3) + bn(planes)
            if cin != planes:
                total += conv(cin, planes, 1) + bn(planes)
            cin = planes
    return total + 64 * num_classes + num_classes


@pytest.mark.parametrize("name,depth,approx", [("resnet20", 20, 0.27e6), ("resnet32", 32, 0.46e6),
                                               ("resnet56", 56, 0.85e6)])
def test_cifar_resnets(name, depth, approx):
    model = getattr(nf_models, name)()
    count = sum(p.numel() for p in model.parameters())
    assert count == cifar_resnet_param_count(depth)
    assert abs(count - approx) / approx < 0.02
    assert tuple(model.input_shape) == (3, 32, 32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == depth - 1 + 2  # 6n + 1 convs on the main path + 2 projection shortcuts
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    m100 = getattr(nf_models, name)(num_classes=100)
    assert sum(p.numel() for p in m100.parameters()) == cifar_resnet_param_count(depth, 100)
    with torch.no_grad():
        assert m100.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 100)
    assert nf_models.MODELS[name] is getattr(nf_models, name)


@pytest.mark.parametrize("depth", [0, 2, 7, 19, 21, -4])
def test_cifar_resnet_depth_validation(depth):
    with pytest.raises(ValueError, match="depth"):
        nf_models.CifarResNet(depth)


def test_vgg16():
    bn = nf_models.vgg16_bn(num_classes=100)
    plain = nf_models.vgg16()
    for model, n_bn in ((bn, 13), (plain, 0)):
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert len(convs) == 13
        assert len(bns) == n_bn
        assert len(linears) == 1
        assert tuple(model.input_shape) == (3, 32, 32)
        assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
        assert all(c.kernel_size == (3, 3) for c in convs)
        assert all((c.bias is None) == (n_bn > 0) for c in convs)
    assert bn.classifier.out_features == 100
    with torch.no_grad():
        assert bn.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 100)
        assert plain.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


# ----------------------------------------------------------------------------------------------
# Conv1d, grouped/depthwise conv, bfloat16, micro_batch
# ----------------------------------------------------------------------------------------------
def conv1d_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv1d(2, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU(),
        nn.Conv1d(6, 6, 3, padding=1, groups=6, bias=False),  # depthwise
        nn.Conv1d(6, 4, 1, groups=2), nn.ReLU(),  # grouped pointwise
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 3),
    )


def grouped_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), nn.BatchNorm2d(6), nn.ReLU(),  # depthwise
        nn.Conv2d(6, 4, 3, padding=1, groups=2), nn.ReLU(),  # grouped
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )


@pytest.mark.parametrize("factory,shape,want_shapes", [
    (conv1d_net, (2, 16), {"0.weight": (6, 2, 3), "3.weight": (6, 1, 3), "4.weight": (4, 3, 1), "8.weight": (3, 4)}),
    (grouped_cnn, CNN_SHAPE, {"0.weight": (6, 3, 3, 3), "3.weight": (6, 1, 3, 3), "6.weight": (4, 3, 3, 3),
                              "10.weight": (3, 4)}),
])
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

    masks = ntk_sap_prune(model, density, CNN_SHAPE, iterations=3, dtype=torch.bfloat16, draws=2,
                          batch_size=4, progress=False, on_round=on_round)
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
    for name in ("ntk_sap_prune", "ntk_sap_scores", "apply_masks", "save_masks", "load_masks",
                 "mask_density", "density_schedule", "keep_count", "PRESETS", "Preset"):
        assert name in ntksap_fast.__all__
        assert hasattr(ntksap_fast, name)
