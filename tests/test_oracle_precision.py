"""Precision: bfloat16 scores against float32, by a bound tied to bf16 rounding (``_tolerances.py``)."""

import pytest
import torch

from _oracle_models import MODELS, flat
from _tolerances import bf16_rel_l2_bound, rel_l2
from ntksap_fast import ntk_sap_scores
from ntksap_fast.models import resnet20


def _resnet20():
    torch.manual_seed(0)
    return resnet20()


CASES = {**MODELS, "resnet20": (_resnet20, (3, 16, 16))}
EPS = 0.1


@pytest.mark.parametrize("name", list(CASES))
def test_bfloat16_scores_within_rounding_bound_of_float32(name):
    build, shape = CASES[name]
    model = build()
    kwargs = dict(draws=2, batch_size=16, epsilon=EPS, seed=0)
    f32 = flat(ntk_sap_scores(model, shape, **kwargs))
    bf16 = flat(ntk_sap_scores(model, shape, dtype=torch.bfloat16, **kwargs))
    bound = bf16_rel_l2_bound(EPS)
    assert rel_l2(bf16, f32) <= bound, (rel_l2(bf16, f32), bound)
    # The bound has power: scores of other draws (another seed) are far outside it.
    other = flat(ntk_sap_scores(model, shape, **{**kwargs, "seed": 1}))
    assert rel_l2(other, f32) >= 3 * bound, (rel_l2(other, f32), bound)


def test_compiled_bfloat16_scores_within_rounding_bound_of_compiled_float32():
    """The compiled step under bfloat16 autocast against its float32 twin, by the same bound."""
    build, shape = CASES["mlp"]
    model = build()
    kwargs = dict(draws=2, batch_size=16, epsilon=EPS, seed=0, compile=True)
    f32 = flat(ntk_sap_scores(model, shape, **kwargs))
    bf16 = flat(ntk_sap_scores(model, shape, dtype=torch.bfloat16, **kwargs))
    assert rel_l2(bf16, f32) <= bf16_rel_l2_bound(EPS), (rel_l2(bf16, f32), bf16_rel_l2_bound(EPS))
    assert rel_l2(bf16, f32) > 0  # bfloat16 did run: the scores moved
