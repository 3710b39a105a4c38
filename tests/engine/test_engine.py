"""ntksap_fast.engine.engine: the model's modes kept, draws grouped for batching, a round's draws split over
calls add up to the whole round (with the split-half statistics), batched draws equal sequential ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ntksap_fast.engine.arena import Arena
from ntksap_fast.engine.engine import Engine, ModelRunner, _groups, preserved_state
from ntksap_fast.engine.plan import ScorerConfig

CPU = torch.device("cpu")
SHAPE = (3, 6, 6)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)
    )


def _engine(model: nn.Module, **config) -> Engine:
    arena = Arena(model)
    return Engine(ModelRunner(model, arena, CPU), SHAPE, ScorerConfig(device=CPU, **config), 7, 0.01)


def test_preserved_state_runs_in_eval_mode_and_restores_every_mode_also_on_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.3), nn.LSTM(4, 4, num_layers=2, dropout=0.2))
    model.train()
    model[1].eval()
    modes = [m.training for m in model.modules()]
    with pytest.raises(KeyError):
        with preserved_state(model):
            assert not model.training and not model[0].training and not model[1].training
            assert model[2].training and model[2].dropout == 0.0  # cuDNN's RNN backward needs train mode
            raise KeyError("inside")
    assert [m.training for m in model.modules()] == modes
    assert model[2].dropout == 0.2


def test_draws_are_grouped_consecutively_by_equal_batch_size():
    sizes = [4, 4, 4, 3, 3, 4]
    assert _groups(list(range(6)), sizes, 2) == [[0, 1], [2], [3, 4], [5]]
    assert _groups(list(range(6)), sizes, 1) == [[d] for d in range(6)]
    assert _groups([0, 2, 4], sizes, 8) == [[0, 2], [4]]


def test_a_rounds_draws_split_over_calls_add_up_to_the_whole_round():
    model = _net().eval()  # the scorer runs the engine under preserved_state: dropout off
    engine = _engine(model)
    mask = torch.rand(engine.arena.numel, generator=torch.Generator().manual_seed(1)) > 0.3
    sizes = [4, 3, 4]
    whole = engine.mask_gradient(mask, 2, sizes, stats=True).clone()
    odd_whole, sq_whole = (t.clone() for t in engine.stats)
    assert whole is not None and float(whole.abs().max()) > 0
    engine.mask_gradient(mask, 2, sizes, draw_ids=[0, 2], stats=True)
    assert not bool(engine.stats.odd.any())  # draws 0 and 2 are even
    parts = engine.mask_gradient(mask, 2, sizes, draw_ids=[1], stats=True, accumulate=True)
    scale = float(whole.abs().max())
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(engine.stats.odd, odd_whole, rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(engine.stats.sq, sq_whole, rtol=1e-5, atol=1e-6 * float(sq_whole.max()))


def test_batched_draws_equal_draws_in_sequence():
    model = _net().eval()
    mask = torch.ones(Arena(model).numel, dtype=torch.bool)
    sequential = _engine(model).mask_gradient(mask, 0, [5, 5, 5]).clone()
    batched = _engine(model, draw_batch=2).mask_gradient(mask, 0, [5, 5, 5])
    torch.testing.assert_close(batched, sequential, rtol=1e-4, atol=1e-5 * float(sequential.abs().max()))
