"""The engine against the reference oracle, and the engine's invariances (tolerances: _tolerances.py)."""
import pytest
import torch
import torchvision
from torch import nn

from ntksap_fast import ntk_sap_scores
from ntksap_fast.arena import Arena
from ntksap_fast.models import resnet20, vgg16_bn
from ntksap_fast.reference import reference_scores

from _tolerances import assert_float32_close as _assert_float32_close
from _tolerances import assert_scores_close as _assert_scores_close


def _flat(scores: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in scores.values()])


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32),
                         nn.Tanh(), nn.Linear(32, 5))


def _conv1d():
    return nn.Sequential(nn.Conv1d(4, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(), nn.Conv1d(8, 8, 3, groups=2),
                         nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 3))


CASES = {
    # name: (model, input shape, draws, batch size); the big ones small so CI stays quick.
    "resnet20": (lambda: resnet20(), (3, 32, 32), 2, 8),
    "vgg16_bn": (lambda: vgg16_bn(num_classes=100), (3, 32, 32), 1, 4),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32), 1, 4),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (3, 32, 32), 1, 4),
    "mlp": (_mlp, (20,), 3, 16),
    "conv1d": (_conv1d, (4, 30), 3, 16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_engine_matches_reference(name):
    torch.manual_seed(0)
    build, shape, draws, batch = CASES[name]
    model = build()
    arena = Arena(model)
    # A mask with a quarter of the entries pruned, so masking is exercised too.
    mask = torch.rand(arena.numel, generator=torch.Generator().manual_seed(1)) > 0.25
    masks = arena.views(mask)
    got = _flat(ntk_sap_scores(model, shape, masks, draws=draws, batch_size=batch, seed=3, round=2,
                               dtype=torch.float64))
    want = reference_scores(model, arena, mask, shape, draws=draws, batch_size=batch, epsilon=0.01, seed=3,
                            round=2, dtype=torch.float64)
    assert torch.all(got[~mask] == 0)
    _assert_scores_close(got, want)


@pytest.mark.parametrize("name", ["resnet20", "mlp", "conv1d"])
def test_float32_engine_matches_float64_reference(name):
    build, shape, draws, batch = CASES[name]
    model = build()
    arena = Arena(model)
    mask = torch.ones(arena.numel, dtype=torch.bool)
    got = _flat(ntk_sap_scores(model, shape, draws=draws, batch_size=batch, seed=5))
    want = reference_scores(model, arena, mask, shape, draws=draws, batch_size=batch, epsilon=0.01, seed=5,
                            dtype=torch.float64)
    _assert_float32_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_micro_batched_equals_whole(dtype):
    model = resnet20()
    whole = _flat(ntk_sap_scores(model, draws=2, batch_size=10, seed=1, dtype=dtype))
    for micro in (1, 3, 7):
        part = _flat(ntk_sap_scores(model, draws=2, batch_size=10, seed=1, micro_batch=micro, dtype=dtype))
        if dtype == torch.float64:
            _assert_scores_close(part, whole)
        else:
            _assert_float32_close(part, whole)


@pytest.mark.parametrize("name", ["resnet20", "conv1d", "mlp"])
def test_batched_draws_equal_sequential(name):
    build, shape, _, batch = CASES[name]
    model = build()
    kwargs = dict(draws=3, batch_size=[batch, batch, batch // 2], seed=2, dtype=torch.float64)
    sequential = _flat(ntk_sap_scores(model, shape, **kwargs))
    for draw_batch in (2, 3):
        _assert_scores_close(_flat(ntk_sap_scores(model, shape, draw_batch=draw_batch, **kwargs)), sequential)


def test_per_draw_batch_sizes_match_reference():
    # Draws of 5 and 9 inputs: the engine's round equals the reference run on the same sizes.
    model = _mlp()
    arena = Arena(model)
    mask = torch.ones(arena.numel, dtype=torch.bool)
    got = _flat(ntk_sap_scores(model, (20,), draws=2, batch_size=[5, 9], seed=4, dtype=torch.float64))
    first = _flat(ntk_sap_scores(model, (20,), draws=1, batch_size=5, seed=4, dtype=torch.float64))
    want_first = reference_scores(model, arena, mask, (20,), draws=1, batch_size=5, epsilon=0.01, seed=4,
                                  dtype=torch.float64)
    _assert_scores_close(first, want_first)
    assert not torch.allclose(got, first)  # the second draw (9 inputs) contributes
def test_bfloat16_close_to_float32():
    model = resnet20()
    f32 = _flat(ntk_sap_scores(model, draws=1, batch_size=8, seed=0))
    bf16 = _flat(ntk_sap_scores(model, draws=1, batch_size=8, seed=0, dtype=torch.bfloat16))
    # bf16 keeps 8 mantissa bits: scores agree in the large, not entry by entry.
    corr = torch.corrcoef(torch.stack([f32, bf16]))[0, 1]
    assert corr > 0.5
