"""ScorerOptions: one list of options, their defaults and checks (the decisions: tests/engine/test_plan.py)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from ntksap_fast import NtkSapScorer, ntk_sap_prune, ntk_sap_scores
from ntksap_fast.cli.app import build_parser
from ntksap_fast.methods.baselines import _NTKSAP_OPTIONS, _SHARED
from ntksap_fast.options import ScorerOptions


@pytest.mark.parametrize("entry", [NtkSapScorer, ntk_sap_scores, ntk_sap_prune])
def test_public_signatures_spell_out_every_option_with_its_default(entry):
    params = inspect.signature(entry).parameters
    for f in dataclasses.fields(ScorerOptions):
        assert f.name in params, f"{entry.__name__} lacks the option {f.name}"
        assert params[f.name].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[f.name].default == f.default, f.name


def test_other_entry_points_derive_their_option_lists():
    assert set(_NTKSAP_OPTIONS) | set(_SHARED) == set(ScorerOptions.names())
    prune_parser = build_parser()._subparsers._group_actions[0].choices["prune"]
    flags = {a.dest for a in prune_parser._actions}
    assert {f.name for f in ScorerOptions.cli_fields()} <= flags
    assert {f.name for f in ScorerOptions.cli_fields()} >= {"draws", "batch_size", "epsilon", "dtype", "micro_batch"}


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"draws": 0}, ValueError, "draws"),
        ({"draws": 2.0}, TypeError, "draws"),
        ({"batch_size": [4, 4, 4]}, ValueError, "batch_size"),
        ({"epsilon": -1.0}, ValueError, "epsilon"),
        ({"seed": 2**64}, ValueError, "seed"),
        ({"dtype": torch.float16}, ValueError, "dtype"),
        ({"micro_batch": 0}, ValueError, "micro_batch"),
        ({"draw_batch": "2"}, TypeError, "draw_batch"),
        ({"allow_tf32": 1}, TypeError, "allow_tf32"),
        ({"output": 3}, TypeError, "output"),
    ],
)
def test_options_are_checked_when_made(kwargs, error, match):
    with pytest.raises(error, match=match):
        ScorerOptions(**kwargs)


def test_options_normalise_and_are_frozen():
    opts = ScorerOptions(draws=3, batch_size=[4, 4, 2], dtype=None, draw_batch=None)
    assert opts.batch_size == (4, 4, 2) and opts.batch_sizes() == [4, 4, 2]
    assert opts.dtype == torch.float32 and opts.draw_batch == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.draws = 4
