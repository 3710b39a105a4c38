"""Iterative pruning against the oracle's own loop (``ntksap_fast.testing.reference.reference_prune``).

The loop is written independently of ``ntk_sap_prune``: oracle scores of round ``t`` with round
counter ``t - 1`` and the mask after round ``t - 1``, a stable descending sort among the unpruned
entries (ties to the lower flat index), the schedule ``d ** (t/T)`` or ``1 - (1 - d) * t/T`` and
``n_keep = N - floor((1 - d_t) * N)`` (per tensor for ``scope="layer"``). float64 on both sides, so
the scores are bit-identical in float32 (``_tolerances.py``) and the masks must be equal entry for
entry after every round. An engine that scores every round as round 0, or always with the dense
mask, keeps other entries from round 2 on.
"""

import pytest
import torch
from torch import nn

from _oracle_models import MODELS, flat
from _requires_ext import ext_missing
from ntksap_fast import NtkSapScorer, ntk_sap_prune, ntk_sap_scores, prune
from ntksap_fast.select import topk
from ntksap_fast.testing.reference import reference_prune

F64 = torch.float64
# Non-default estimator settings, so that a loop that drops one of them is caught too.
ESTIMATOR = dict(draws=2, batch_size=[5, 3], epsilon=0.02, seed=4)


def _record(rounds: list):
    return lambda t, masks: rounds.append((t, {n: m.cpu().clone() for n, m in masks.items()}))


def _assert_same_rounds(got: list, want: list) -> None:
    assert [t for t, _ in got] == [t for t, _ in want]
    for (t, g), (_, w) in zip(got, want):
        assert list(g) == list(w), f"round {t}: tensor names differ"
        for name in w:
            assert g[name].dtype == torch.bool and g[name].shape == w[name].shape
            assert torch.equal(g[name], w[name]), f"round {t}: mask of {name!r} differs"


def _convolutions(name: str, module: nn.Module, p: nn.Parameter) -> bool:
    return isinstance(module, nn.Conv2d)


# params: None (default selection), a list of names, a predicate.
PARAMS = {
    "default": None,
    "names": ["conv1.weight", "conv2.weight", "shortcut.0.weight"],
    "predicate": _convolutions,
}


@pytest.mark.parametrize("schedule", ["exponential", "linear"])
@pytest.mark.parametrize("name", ["bn_convnet", "tiny_resnet"])
@pytest.mark.slow
def test_ntk_sap_prune_equals_reference_loop(name, schedule):
    build, shape = MODELS[name]
    model = build()
    got, want = [], []
    masks = ntk_sap_prune(
        model,
        0.1,
        shape,
        iterations=4,
        schedule=schedule,
        dtype=F64,
        progress=False,
        on_round=_record(got),
        **ESTIMATOR,
    )
    ref = reference_prune(model, 0.1, shape, iterations=4, schedule=schedule, on_round=_record(want), **ESTIMATOR)
    _assert_same_rounds(got, want)
    _assert_same_rounds([(4, masks)], [(4, ref)])


@pytest.mark.parametrize("params", ["names", "predicate"])
def test_ntk_sap_prune_with_params_equals_reference_loop(params):
    model = MODELS["tiny_resnet"][0]()
    got, want = [], []
    ntk_sap_prune(
        model,
        0.05,
        (3, 8, 8),
        iterations=3,
        schedule="linear",
        params=PARAMS[params],
        dtype=F64,
        progress=False,
        on_round=_record(got),
        **ESTIMATOR,
    )
    reference_prune(
        model,
        0.05,
        (3, 8, 8),
        iterations=3,
        schedule="linear",
        params=PARAMS[params],
        on_round=_record(want),
        **ESTIMATOR,
    )
    _assert_same_rounds(got, want)


@pytest.mark.parametrize("params", ["default", "names"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_prune_ntksap_equals_reference_loop(scope, params):
    model = MODELS["tiny_resnet"][0]()
    got = prune(
        model,
        "ntksap",
        density=0.08,
        iterations=3,
        schedule="exponential",
        scope=scope,
        input_shape=(3, 8, 8),
        params=PARAMS[params],
        dtype=F64,
        progress=False,
        **ESTIMATOR,
    )
    want = reference_prune(
        model, 0.08, (3, 8, 8), iterations=3, schedule="exponential", scope=scope, params=PARAMS[params], **ESTIMATOR
    )
    _assert_same_rounds([(3, got)], [(3, want)])
    if scope == "layer":  # every tensor keeps its own count, which the global scope would not give
        for name, m in want.items():
            n = m.numel()
            assert int(m.sum()) == n - int((1 - 0.08) * n), name


def test_one_scorer_prunes_twice_like_the_reference_loop():
    """``NtkSapScorer.prune`` twice on one scorer (buffers reused, the mask reset): both equal the loop."""
    build, shape = MODELS["bn_convnet"]
    model = build()
    scorer = NtkSapScorer(model, shape, dtype=F64, **ESTIMATOR)
    for density, schedule in ((0.2, "linear"), (0.05, "exponential")):
        got, want = [], []
        scorer.prune(density, 3, schedule=schedule, progress=False, on_round=_record(got))
        reference_prune(model, density, shape, iterations=3, schedule=schedule, on_round=_record(want), **ESTIMATOR)
        _assert_same_rounds(got, want)


def _bias_free_relu_net() -> nn.Module:
    """A unit of this net whose inputs are all pruned outputs exactly 0, so its outgoing weights score
    exactly 0 (as do those of a unit that is negative on every input of a draw)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 10, bias=False), nn.ReLU(), nn.Linear(10, 10, bias=False), nn.ReLU(), nn.Linear(10, 3, bias=False)
    )


@pytest.mark.parametrize("topk_path", [pytest.param("compiled", marks=pytest.mark.ext), "pytorch"])
def test_zero_score_ties_at_the_cut_never_revive_pruned_entries(monkeypatch, topk_path):
    """Twelve rounds on a bias-free ReLU net: from round 10 on fewer unpruned entries score above 0
    than the round keeps, so the cut falls among exact zeros, where pruned entries (score 0, many at
    lower indices) tie with unpruned ones. Every round equals the reference loop and keeps only
    unpruned entries, through the compiled top-k and through the PyTorch fallback."""
    if topk_path == "pytorch":
        monkeypatch.setenv("NTKSAP_FAST_NO_EXT", "1")
    else:
        monkeypatch.delenv("NTKSAP_FAST_NO_EXT", raising=False)
        if not topk.extension_available():
            ext_missing(f"compiled extension unavailable: {topk.extension_error()}")
    assert topk._use_extension(torch.device("cpu")) == (topk_path == "compiled")
    model, shape = _bias_free_relu_net(), (6,)
    estimator = dict(draws=2, batch_size=4, epsilon=0.01, seed=1)
    got, want = [], []
    ntk_sap_prune(model, 0.03, shape, iterations=12, dtype=F64, progress=False, on_round=_record(got), **estimator)
    reference_prune(model, 0.03, shape, iterations=12, on_round=_record(want), **estimator)
    _assert_same_rounds(got, want)
    before, cuts_at_zero = None, 0
    for t, masks in got:
        kept = flat(masks)
        unpruned = torch.ones_like(kept) if before is None else flat(before)
        assert not bool((kept & ~unpruned).any()), f"round {t} revived a pruned entry"
        scores = flat(ntk_sap_scores(model, shape, before, round=t - 1, dtype=F64, **estimator))
        cuts_at_zero += int(((scores > 0) & unpruned).sum()) < int(kept.sum())
        before = masks
    assert cuts_at_zero >= 2, "the cut never fell among exact zeros: a revival there would go unseen"
