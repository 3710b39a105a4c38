"""The engine against the independent oracle (``ntksap_fast.testing.reference``) and closed forms.

The oracle shares nothing with the engine but the counter generator: its own prunable layout,
weight spread from fan-in, inputs and perturbations, a deep copy with a separate BatchNorm
statistics pass, one draw at a time. Settings are varied on purpose (epsilon 0.003 and 0.05,
per-draw batch sizes, seeds and rounds other than 0, a pruned mask) so that an engine that
ignores any of them disagrees. Tolerances: ``_tolerances.py``.
"""

import math

import pytest
import torch
import torchvision
from torch import nn

from _oracle_models import MODELS, flat, tiny_resnet
from _tolerances import F32_U, assert_float32_close, assert_scores_close, rel_l2
from ntksap_fast import NtkSapScorer, ntk_sap_scores
from ntksap_fast.engine.rng import Stream, normal
from ntksap_fast.models import resnet20, vgg16_bn
from ntksap_fast.testing.reference import reference_prunable, reference_scores

F64 = torch.float64

# (epsilon, batch sizes, seed, round): each setting differs from the defaults in every field.
SETTINGS = {
    "eps0.003-batches[6,3,5]": (0.003, [6, 3, 5], 7, 2),
    "eps0.05-seed2^40": (0.05, [4, 4], 2**40 + 3, 5),
}


def _pruned_mask(model: nn.Module, fraction: float = 0.25, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(s, generator=gen) >= fraction for n, s in reference_prunable(model)}


def _engine(model, shape, masks, eps, batches, seed, rnd, **kw) -> torch.Tensor:
    return flat(
        ntk_sap_scores(
            model,
            shape,
            masks,
            draws=len(batches),
            batch_size=batches,
            epsilon=eps,
            seed=seed,
            round=rnd,
            dtype=F64,
            **kw,
        )
    )


def _oracle(model, shape, masks, eps, batches, seed, rnd, params=None) -> torch.Tensor:
    return reference_scores(
        model,
        params,
        masks,
        shape,
        draws=len(batches),
        batch_size=batches,
        epsilon=eps,
        seed=seed,
        round=rnd,
        dtype=F64,
    )


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("name", list(MODELS))
def test_engine_matches_oracle(name, setting):
    build, shape = MODELS[name]
    model = build()
    masks = _pruned_mask(model)
    eps, batches, seed, rnd = SETTINGS[setting]
    got = _engine(model, shape, masks, eps, batches, seed, rnd)
    want = _oracle(model, shape, masks, eps, batches, seed, rnd)
    assert torch.all(got[~flat(masks)] == 0)
    assert (want > 0).float().mean() > 0.3  # enough nonzero scores for the comparison to mean something
    assert_scores_close(got, want)


def test_engine_matches_oracle_with_params_selection():
    model = tiny_resnet()
    convs = [n for n, p in model.named_parameters() if p.dim() == 4]
    pick = convs[1:4]  # the block's convolutions and the shortcut, not the stem or the head
    got = flat(
        ntk_sap_scores(
            model, (3, 8, 8), draws=2, batch_size=[5, 7], epsilon=0.02, seed=9, round=1, params=pick, dtype=F64
        )
    )
    want = _oracle(model, (3, 8, 8), None, 0.02, [5, 7], 9, 1, params=pick)
    assert_scores_close(got, want)
    predicate = lambda name, module, p: name in ("fc.weight", "shortcut.0.weight")  # noqa: E731
    got = flat(
        ntk_sap_scores(model, (3, 8, 8), draws=1, batch_size=6, epsilon=0.02, seed=9, params=predicate, dtype=F64)
    )
    assert_scores_close(got, _oracle(model, (3, 8, 8), None, 0.02, [6], 9, 0, params=predicate))


def test_one_scorer_matches_oracle_call_after_call():
    """A kept ``NtkSapScorer`` reuses its buffers: each call must still see its own mask and round."""
    model = tiny_resnet()
    scorer = NtkSapScorer(model, (3, 8, 8), draws=3, batch_size=[6, 3, 5], epsilon=0.05, seed=11, dtype=F64)
    masks = _pruned_mask(model, 0.6, seed=2)
    for call_masks, rnd in ((None, 0), (masks, 4), (None, 2), (masks, 0)):
        want = _oracle(model, (3, 8, 8), call_masks, 0.05, [6, 3, 5], 11, rnd)
        assert_scores_close(flat(scorer.scores(call_masks, round=rnd)), want)


# ---------------------------------------------------------------------------------------------
# Closed forms: a check of the oracle itself (and of the engine) that needs no autograd
# ---------------------------------------------------------------------------------------------
def _draw(seed, rnd, draw, shapes, batch, in_dim):
    """theta, z per tensor (float32 numbers, as sampled) and x (batch, in_dim), written out from the counters."""
    thetas, zs, offset = [], [], 0
    for shape in shapes:
        n = math.prod(shape)
        std = torch.tensor(math.sqrt(2.0 / shape[1]), dtype=torch.float32)  # Linear: fan_in = in_features
        thetas.append((normal(seed, rnd, draw, Stream.WEIGHTS, n, offset=offset) * std).view(shape).double())
        zs.append(normal(seed, rnd, draw, Stream.PERTURBATION, n, offset=offset).view(shape).double())
        offset += n
    x = normal(seed, rnd, draw, Stream.INPUTS, batch * in_dim).view(batch, in_dim).double()
    return thetas, zs, x


def test_two_linear_layers_closed_form():
    """f(x) = B A x (no bias, no nonlinearity): with D = f_clean - f_pert (batch as columns),
    dL/dA_c = 2 B_c^T D x^T, dL/dA_p = -2 B_p^T D x^T, dL/dB_c = 2 D (A_c x)^T, dL/dB_p = -2 D (A_p x)^T,
    and dL/dm = theta * dL/dW_c + (theta + eps z) * dL/dW_p. A is 16x6 and B 3x16, so a spread from
    fan-out instead of fan-in, a wrong epsilon or a wrong stream shows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16, bias=False), nn.Linear(16, 3, bias=False))
    eps, seed, rnd, batches = 0.04, 21, 3, [5, 2]
    mask = [torch.rand(16, 6) > 0.3, torch.rand(3, 16) > 0.3]
    grad = [torch.zeros(16, 6, dtype=F64), torch.zeros(3, 16, dtype=F64)]
    for draw, batch in enumerate(batches):
        (ta, tb), (za, zb), x = _draw(seed, rnd, draw, [(16, 6), (3, 16)], batch, 6)
        x = x.T  # (6, batch)
        a_c, a_p = mask[0] * ta, mask[0] * (ta + eps * za)
        b_c, b_p = mask[1] * tb, mask[1] * (tb + eps * zb)
        d = b_c @ a_c @ x - b_p @ a_p @ x
        grad[0] += ta * (2 * b_c.T @ d @ x.T) + (ta + eps * za) * (-2 * b_p.T @ d @ x.T)
        grad[1] += tb * (2 * d @ (a_c @ x).T) + (tb + eps * zb) * (-2 * d @ (a_p @ x).T)
    want = torch.cat([(g.abs() * m).reshape(-1) for g, m in zip(grad, mask)]).float()
    masks = {"0.weight": mask[0], "1.weight": mask[1]}
    assert_scores_close(_oracle(model, (6,), masks, eps, batches, seed, rnd), want)
    assert_scores_close(_engine(model, (6,), masks, eps, batches, seed, rnd), want)


# ---------------------------------------------------------------------------------------------
# Real architectures (DESIGN.md section 6), small inputs so CI stays quick
# ---------------------------------------------------------------------------------------------
def _seeded(build):
    def make():
        torch.manual_seed(0)
        return build()

    return make


LARGE = {
    # name: (model, input shape, batch sizes)
    "resnet20": (_seeded(resnet20), (3, 16, 16), [6, 4]),
    "vgg16_bn": (_seeded(lambda: vgg16_bn(num_classes=100)), (3, 32, 32), [4]),
    "resnet18": (_seeded(lambda: torchvision.models.resnet18(num_classes=10)), (3, 32, 32), [4]),
    "mobilenet_v2": (_seeded(lambda: torchvision.models.mobilenet_v2(num_classes=10)), (3, 32, 32), [4]),
}


@pytest.mark.parametrize("name", list(LARGE))
@pytest.mark.slow
def test_engine_matches_oracle_on_real_architectures(name):
    build, shape, batches = LARGE[name]
    model = build()
    masks = _pruned_mask(model)
    got = _engine(model, shape, masks, 0.02, batches, 3, 2)
    assert_scores_close(got, _oracle(model, shape, masks, 0.02, batches, 3, 2))


FLOAT32_CASES = {  # ResNet-20 at 32x32 with draws of 8: fewer inputs per BatchNorm channel put more
    # units near a kink (16x16 with 6 and 4 inputs fails the float32 criterion, as it should)
    "resnet20": (_seeded(resnet20), (3, 32, 32), [8, 8]),
    "mlp": (MODELS["mlp"][0], MODELS["mlp"][1], [16, 16, 16]),
    "conv1d": (MODELS["conv1d"][0], MODELS["conv1d"][1], [16, 16, 16]),
}


@pytest.mark.parametrize("name", list(FLOAT32_CASES))
@pytest.mark.slow
def test_float32_engine_matches_float64_oracle(name):
    build, shape, batches = FLOAT32_CASES[name]
    model = build()
    got = flat(ntk_sap_scores(model, shape, draws=len(batches), batch_size=batches, seed=5))
    assert_float32_close(
        got,
        reference_scores(
            model, None, None, shape, draws=len(batches), batch_size=batches, epsilon=0.01, seed=5, dtype=F64
        ),
    )


COMPILED_CASES = {  # small, so that inductor's C++ compilation stays a few seconds per graph on CI
    "mlp": (MODELS["mlp"][0], MODELS["mlp"][1], [16, 16]),
    "tiny_resnet": (MODELS["tiny_resnet"][0], MODELS["tiny_resnet"][1], [8, 8]),
}


@pytest.mark.parametrize("name", list(COMPILED_CASES))
def test_compiled_float32_is_no_further_from_float64_than_eager(name):
    """The compiled step (inductor's fused kernels, float32 sums in its own order) against the float64
    oracle: the float32 criterion, and a relative L2 error at most twice the eager engine's or, where
    that is tiny, ten float32 roundings amplified by 1/eps (``_tolerances.py``)."""
    build, shape, batches = COMPILED_CASES[name]
    model = build()
    kwargs = dict(draws=len(batches), batch_size=batches, seed=5)
    want = reference_scores(
        model, None, None, shape, draws=len(batches), batch_size=batches, epsilon=0.01, seed=5, dtype=F64
    )
    eager = flat(ntk_sap_scores(model, shape, compile=False, **kwargs))
    compiled = flat(ntk_sap_scores(model, shape, compile=True, **kwargs))
    assert_float32_close(compiled, want)
    assert rel_l2(compiled, want) <= max(2 * rel_l2(eager, want), 10 * F32_U / 0.01), (
        rel_l2(compiled, want),
        rel_l2(eager, want),
    )


# ---------------------------------------------------------------------------------------------
# Invariances of the engine: micro-batches and batched draws change nothing but rounding
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_micro_batched_equals_whole(dtype):
    model, shape = MODELS["tiny_resnet"][0](), (3, 8, 8)
    kwargs = dict(draws=2, batch_size=[10, 7], seed=1, epsilon=0.02, dtype=dtype)
    whole = flat(ntk_sap_scores(model, shape, **kwargs))
    for micro in (1, 3):
        part = flat(ntk_sap_scores(model, shape, micro_batch=micro, **kwargs))
        if dtype == torch.float64:
            assert_scores_close(part, whole)
        else:
            assert_float32_close(part, whole)


@pytest.mark.parametrize("name", ["bn_convnet", "conv1d", "mlp"])
def test_batched_draws_equal_sequential(name):
    build, shape = MODELS[name]
    model = build()
    kwargs = dict(draws=3, batch_size=[8, 8, 5], seed=2, epsilon=0.005, dtype=F64)
    sequential = flat(ntk_sap_scores(model, shape, **kwargs))
    for draw_batch in (2, 3):
        assert_scores_close(flat(ntk_sap_scores(model, shape, draw_batch=draw_batch, **kwargs)), sequential)
