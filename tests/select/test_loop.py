"""select.loop: the one prune loop every method runs through (rounds, selection, checkpoints, callbacks,
metadata) and PruneOptions, the loop's arguments with the rules of which combine."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from torch import nn

from ntksap_fast import NtkSapScorer, ntk_sap_prune, prune
from ntksap_fast.io.checkpoint import CheckpointError
from ntksap_fast.methods.sanity import keep_lowest
from ntksap_fast.select.loop import PruneOptions
from ntksap_fast.select.schedule import density_schedule, keep_count

SHAPE = (3, 8, 8)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)
    )


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("entry", [NtkSapScorer.prune, ntk_sap_prune, prune])
def test_every_entry_point_spells_out_the_loop_arguments_with_their_defaults(entry):
    params = inspect.signature(entry).parameters
    for f in dataclasses.fields(PruneOptions):
        assert f.name in params, f"{entry.__qualname__} lacks {f.name}"
        if f.name == "iterations" and entry is prune:
            assert params[f.name].default is None  # each method's own default (DEFAULT_ITERATIONS)
        elif f.name != "density":
            assert params[f.name].default == f.default, f.name


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        (dict(density=0.0), ValueError, "density"),
        (dict(density=0.5, iterations=0), ValueError, "iterations"),
        (dict(density=0.5, schedule="cosine"), ValueError, "schedule"),
        (dict(density=0.5, scope="tensor"), ValueError, "scope"),
        (dict(density=0.5, min_layer_density=1.5), ValueError, "min_layer_density"),
        (dict(density=0.5, invert=1), TypeError, "invert"),
        (dict(density=0.5, target_overlap=0.0), ValueError, "target_overlap"),
        (dict(density=0.5, max_draws=8), ValueError, "max_draws applies with target_overlap only"),
        (dict(density=0.5, scope="layer", min_layer_density=0.1), ValueError, "min_layer_density applies to scope"),
        (dict(density=0.5, scope="layer", stats=True), ValueError, "apply to scope='global'"),
        (dict(density=0.5, invert=True, stats=True), ValueError, "invert does not combine"),
        (dict(density=0.5, invert=True, target_overlap=0.9), ValueError, "invert does not combine"),
    ],
)
def test_prune_options_refuse_what_does_not_combine(kwargs, error, words):
    with pytest.raises(error, match=words):
        PruneOptions(**kwargs)


def test_target_overlap_implies_stats_and_only_ntksap_has_them():
    assert PruneOptions(density=0.5, target_overlap=0.9).stats is True
    with pytest.raises(ValueError, match="apply to method 'ntksap'"):
        prune(_net(), "magnitude", density=0.5, stats=True)


def test_synflow_interrupted_and_resumed_equals_the_uninterrupted_run(tmp_path):
    """SynFlow (iterative, data-free) through the loop's checkpoints: resuming after round 2 of 5
    gives the masks of the run that was never interrupted, and another input shape is refused."""
    kwargs = dict(method="synflow", density=0.1, iterations=5, input_shape=SHAPE, progress=False)
    want = prune(_net(), **kwargs)
    path = tmp_path / "synflow.ckpt"

    def stop_after_2(t, masks):
        if t == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        prune(_net(), **kwargs, checkpoint=path, on_round=stop_after_2)
    rounds = []
    got = prune(_net(), **kwargs, checkpoint=path, on_round=lambda t, masks: rounds.append(t))
    assert rounds == [3, 4, 5]
    assert list(got) == list(want) and all(torch.equal(got[n], want[n]) for n in want)
    assert got.metadata == want.metadata and got.metadata["method"] == "synflow"
    with pytest.raises(CheckpointError, match="input_shape"):
        prune(_net(), **{**kwargs, "input_shape": (3, 9, 9)}, checkpoint=path)
    other = _net()
    with torch.no_grad():
        other[0].weight.mul_(2)  # SynFlow reads the prunable weights too: another model is refused
    with pytest.raises(CheckpointError, match="model_digest"):
        prune(other, **kwargs, checkpoint=path)


def test_random_checkpoint_refuses_another_seed(tmp_path):
    path = tmp_path / "random.ckpt"
    prune(_net(), "random", density=0.2, seed=1, checkpoint=path)
    with pytest.raises(CheckpointError, match="seed"):
        prune(_net(), "random", density=0.2, seed=2, checkpoint=path)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_with_invert_keeps_the_lowest_magnitudes(scope):
    """invert applies to every method: one-shot magnitude at density d keeps the d lowest |w|."""
    model = _net()
    got = prune(model, "magnitude", density=0.3, scope=scope, invert=True)
    magnitudes = {n: p.detach().abs() for n, p in model.named_parameters() if n.endswith("weight")}
    if scope == "global":
        want = keep_lowest(magnitudes, 0.3)
    else:
        want = {n: keep_lowest({n: m}, 0.3)[n] for n, m in magnitudes.items()}
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert got.metadata["invert"] is True and got.metadata["scope"] == scope


@pytest.mark.parametrize("method", ["ntksap", "random", "magnitude", "synflow"])
def test_every_method_reports_each_round_with_exact_counts(method):
    model, seen = _net(), []
    iterations = 3 if method in ("ntksap", "synflow") else 1
    kwargs = dict(draws=1, batch_size=2) if method == "ntksap" else {}
    masks = prune(
        model,
        method,
        density=0.2,
        iterations=iterations,
        input_shape=SHAPE,
        on_round=lambda t, m: seen.append((t, sum(int(v.sum()) for v in m.values()))),
        **kwargs,
    )
    total = sum(m.numel() for m in masks.values())
    assert seen == [(t + 1, keep_count(total, d)) for t, d in enumerate(density_schedule(0.2, iterations))]
    assert masks.metadata["method"] == method and masks.metadata["iterations"] == iterations


def test_ntksap_layer_scope_runs_through_the_scorer_rounds():
    model = _net()
    scorer = NtkSapScorer(model, SHAPE, draws=1, batch_size=2)
    got = scorer.prune(0.25, 2, scope="layer", progress=False)
    want = None
    for t, d in enumerate(density_schedule(0.25, 2)):
        scores = scorer.scores(want, round=t)
        want = {n: keep_lowest({n: -s}, d, None if want is None else {n: want[n]})[n] for n, s in scores.items()}
    assert all(torch.equal(got[n], want[n]) for n in want)
