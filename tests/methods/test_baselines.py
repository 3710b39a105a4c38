"""Baselines: each method's mask against an independent, straightforward computation of its score.

Models are tiny and float64 so independent computations agree to rounding and no borderline tie
flips. The reference top-k and keep counts are written here, not imported from the package.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from ntksap_fast import ntk_sap_prune, ntk_sap_scores
from ntksap_fast.methods.baselines import prune


# ----------------------------------------------------------------------------------------------
# Tiny models, data and independent helpers
# ----------------------------------------------------------------------------------------------
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 4)).double()


def cnn() -> nn.Module:
    """Conv + BN (non-trivial running stats, negative gammas) + Linear; input (2, 5, 5)."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(75, 4)
    ).double()
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(3))
        bn.running_var.copy_(torch.rand(3) + 0.5)
        bn.weight.copy_(torch.randn(3))
        bn.bias.copy_(torch.randn(3))
    return model


def batches(shape, n_batches=2, batch=5, classes=4, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, *shape, generator=gen, dtype=torch.float64),
            torch.randint(0, classes, (batch,), generator=gen),
        )
        for _ in range(n_batches)
    ]


def weight_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def keep_n(n: int, d: float) -> int:
    return n - math.floor((1.0 - d) * n)


def schedule(d: float, rounds: int, kind: str = "exponential") -> list[float]:
    if kind == "exponential":
        return [d ** (t / rounds) for t in range(1, rounds + 1)]
    return [1 - (1 - d) * t / rounds for t in range(1, rounds + 1)]


def ref_select(scores: list[torch.Tensor], masks: list[torch.Tensor], d: float, scope: str) -> list[torch.Tensor]:
    """Keep the highest scores among unpruned entries, ties to the lower index, globally or per tensor."""

    def top(s: torch.Tensor, m: torch.Tensor, k: int) -> torch.Tensor:
        s = s.detach().double().clone()
        s[~m] = -math.inf
        order = torch.sort(s, descending=True, stable=True).indices[:k]
        out = torch.zeros_like(m)
        out[order] = True
        return out

    if scope == "layer":
        return [top(s.reshape(-1), m.reshape(-1), keep_n(m.numel(), d)).view(m.shape) for s, m in zip(scores, masks)]
    flat = top(
        torch.cat([s.reshape(-1) for s in scores]),
        torch.cat([m.reshape(-1) for m in masks]),
        keep_n(sum(m.numel() for m in masks), d),
    )
    return [f.view(m.shape) for f, m in zip(flat.split([m.numel() for m in masks]), masks)]


def as_dict(model, masks):
    return {
        f"{n}.weight": m.view(dict(model.named_parameters())[f"{n}.weight"].shape)
        for n, m in zip(weight_names(model), masks)
    }


def assert_masks(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for n in want:
        assert got[n].dtype == torch.bool and torch.equal(got[n], want[n]), n


def state(model: nn.Module) -> tuple:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
    )


def assert_unchanged(before: tuple, model: nn.Module) -> None:
    after = state(model)
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]), "state_dict changed"
    assert before[1] == after[1], "train/eval modes changed"
    assert before[2] == after[2], "requires_grad changed"


def masked_copy(model: nn.Module, masks: list[torch.Tensor]) -> nn.Module:
    """Eval-mode deep copy with the masks multiplied into the prunable weights."""
    work = copy.deepcopy(model).eval()
    mods = dict(work.named_modules())
    with torch.no_grad():
        for n, m in zip(weight_names(model), masks):
            mods[n].weight.mul_(m)
    return work


def full_masks(model):
    mods = dict(model.named_modules())
    return [torch.ones_like(mods[n].weight, dtype=torch.bool) for n in weight_names(model)]


# ----------------------------------------------------------------------------------------------
# Independent scores
# ----------------------------------------------------------------------------------------------
def snip_scores(model, masks, data):
    work = masked_copy(model, masks)
    for x, y in data:
        nn.functional.cross_entropy(work(x), y).backward()
    mods = dict(work.named_modules())
    return [(mods[n].weight.grad * mods[n].weight).abs() for n in weight_names(model)]


def grasp_scores_negated(model, data):
    """-S with S = -w * Hg (Hg = Hessian of the summed loss times its gradient, via autograd.functional)."""
    names = [f"{n}.weight" for n in weight_names(model)]
    work = copy.deepcopy(model).eval()
    ws = tuple(dict(work.named_parameters())[n].detach() for n in names)

    def loss(*weights):
        return sum(
            nn.functional.cross_entropy(functional_call(work, dict(zip(names, weights)), (x,)), y) for x, y in data
        )

    leaves = [w.clone().requires_grad_() for w in ws]
    grads = torch.autograd.grad(loss(*leaves), leaves)
    _, hg = torch.autograd.functional.hvp(loss, ws, tuple(g.detach() for g in grads))
    return [w * h for w, h in zip(ws, hg)]  # -S


def synflow_scores(model, masks, input_shape):
    work = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for t in work.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    work = masked_copy(work, masks).requires_grad_(True)
    work(torch.ones(1, *input_shape, dtype=torch.float64)).sum().backward()
    mods = dict(work.named_modules())
    return [(mods[n].weight.grad * mods[n].weight).abs() for n in weight_names(model)]


# ----------------------------------------------------------------------------------------------
# Each method against its independent computation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude(scope):
    model = mlp()
    mods = dict(model.named_modules())
    want = ref_select([mods[n].weight.abs() for n in weight_names(model)], full_masks(model), 0.2, scope)
    assert_masks(prune(model, "magnitude", density=0.2, scope=scope), as_dict(model, want))


@pytest.mark.parametrize("make, shape", [(mlp, (6,)), (cnn, (2, 5, 5))])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_snip(make, shape, scope):
    model, data = make(), batches(shape)
    model.train()
    before = state(model)
    want = ref_select(snip_scores(model, full_masks(model), data), full_masks(model), 0.15, scope)
    got = prune(model, "snip", density=0.15, scope=scope, data=data)
    assert_masks(got, as_dict(model, want))
    assert_unchanged(before, model)


def test_iter_snip_rounds():
    model, data = cnn(), batches((2, 5, 5))
    before = state(model)
    masks = full_masks(model)
    for d in schedule(0.1, 3, "linear"):
        masks = ref_select(snip_scores(model, masks, data), masks, d, "global")
    got = prune(model, "iter_snip", density=0.1, iterations=3, schedule="linear", data=data, progress=False)
    assert_masks(got, as_dict(model, masks))
    assert_unchanged(before, model)


@pytest.mark.parametrize("make, shape", [(mlp, (6,)), (cnn, (2, 5, 5))])
def test_grasp_keeps_lowest_score(make, shape):
    model, data = make(), batches(shape)
    before = state(model)
    want = ref_select(grasp_scores_negated(model, data), full_masks(model), 0.3, "global")
    assert_masks(prune(model, "grasp", density=0.3, data=data), as_dict(model, want))
    assert_unchanged(before, model)


@pytest.mark.parametrize("make, shape", [(mlp, (6,)), (cnn, (2, 5, 5))])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_synflow_iterative(make, shape, scope):
    model = make().float()  # SynFlow computes in float64 whatever the model's dtype
    model.train()
    model[0].weight.requires_grad_(False)
    before = state(model)
    masks = full_masks(model)
    for d in schedule(0.05, 4):
        masks = ref_select(synflow_scores(model, masks, shape), masks, d, scope)
    got = prune(model, "synflow", density=0.05, iterations=4, scope=scope, input_shape=shape, progress=False)
    assert_masks(got, as_dict(model, masks))
    assert_unchanged(before, model)


def test_random_seeded_exact_counts():
    model = mlp()
    a = prune(model, "random", density=0.3, seed=5)
    assert_masks(prune(model, "random", density=0.3, seed=5), a)
    assert any(not torch.equal(a[n], b) for n, b in prune(model, "random", density=0.3, seed=6).items())
    assert sum(int(m.sum()) for m in a.values()) == keep_n(sum(m.numel() for m in a.values()), 0.3)
    layer = prune(model, "random", density=0.3, scope="layer")
    assert all(int(m.sum()) == keep_n(m.numel(), 0.3) for m in layer.values())


def test_ntksap_global_delegates_and_layer_rescored():
    model = cnn().float()
    kw = dict(draws=1, batch_size=3, seed=2)
    got = prune(model, "ntksap", density=0.2, iterations=2, input_shape=(2, 5, 5), progress=False, **kw)
    assert_masks(got, ntk_sap_prune(model, 0.2, (2, 5, 5), iterations=2, progress=False, **kw))
    masks = full_masks(model)
    for t, d in enumerate(schedule(0.2, 2)):
        s = ntk_sap_scores(model, (2, 5, 5), as_dict(model, masks), round=t, **kw)
        masks = ref_select(list(s.values()), masks, d, "layer")
    got = prune(model, "ntksap", density=0.2, iterations=2, scope="layer", input_shape=(2, 5, 5), progress=False, **kw)
    assert_masks(got, as_dict(model, masks))


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, err, words",
    [
        (dict(method="snip", density=0.1), ValueError, "needs data"),
        (dict(method="bogus", density=0.1), ValueError, "method"),
        (dict(method="magnitude", density=1.5), ValueError, "density"),
        (dict(method="magnitude", density=0.1, scope="tensor"), ValueError, "scope"),
        (dict(method="magnitude", density=0.1, schedule="cosine"), ValueError, "schedule"),
        (dict(method="magnitude", density=0.1, iterations=3), ValueError, "one shot"),
        (dict(method="synflow", density=0.1, iterations=0), ValueError, "iterations"),
        (dict(method="synflow", density=0.1, draws=2), TypeError, "ntksap"),
        (dict(method="ntksap", density=0.1, draw=2), TypeError, "unexpected"),
        (dict(method="snip", density=0.1, data=[], loss_fn=None), TypeError, "loss_fn"),
        (dict(method="magnitude", density=0.1, device="gpu7"), ValueError, "device"),
        (dict(method="snip", density=0.1, data=[(torch.zeros(2, 6),)]), TypeError, "(inputs, targets)"),
    ],
)
def test_bad_arguments(kwargs, err, words):
    with pytest.raises(err) as info:
        prune(mlp(), **kwargs)
    assert words in str(info.value)


def test_used_up_generator_is_reported():
    data = (b for b in batches((6,)))
    with pytest.raises(ValueError, match="no batches"):
        prune(mlp(), "iter_snip", density=0.5, iterations=2, data=data, progress=False)
