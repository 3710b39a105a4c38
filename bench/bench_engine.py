"""Reference (the research code's passes) vs the engine, one scoring round, side by side.

Groups:
* ``cifar10-round``: ResNet-20, 5 draws x 100 inputs of 3x32x32 (the paper's CIFAR-10 round).
* ``imagenet-draw``: torchvision ResNet-50, one draw of 16 inputs of 3x224x224.

The engine runs in float32 and bfloat16, with draws in sequence (``draw_batch=1``) and, where a
round has several, batched through vmap (``draw_batch=5``).

Run with ``make bench`` (or ``pytest bench/bench_engine.py``); ratios are printed at the end.
"""
import pytest
import torch
import torchvision

from ntksap_fast.api import _Setup
from ntksap_fast.arena import Arena
from ntksap_fast.models import resnet20
from ntksap_fast.reference import reference_scores

SETTINGS = {
    "cifar10-round": (lambda: resnet20(), (3, 32, 32), 5, 100),
    "imagenet-draw": (lambda: torchvision.models.resnet50(), (3, 224, 224), 1, 16),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_reference(benchmark, setting):
    build, shape, draws, batch = SETTINGS[setting]
    model = build()
    arena = Arena(model)
    mask = torch.ones(arena.numel, dtype=torch.bool)
    benchmark.group = setting
    benchmark.pedantic(reference_scores, args=(model, arena, mask, shape),
                       kwargs=dict(draws=draws, batch_size=batch, epsilon=0.01, seed=0), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("draw_batch", [1, 5])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_engine(benchmark, setting, dtype, draw_batch):
    build, shape, draws, batch = SETTINGS[setting]
    if draw_batch > draws:
        pytest.skip(f"{setting} has {draws} draw(s): nothing to batch")
    model = build()
    setup = _Setup(model, shape, draws, batch, 0.01, 0, None, "cpu", getattr(torch, dtype), None, draw_batch)
    mask = torch.ones(setup.arena.numel, dtype=torch.bool)
    benchmark.group = setting
    benchmark.pedantic(setup.scores, args=(mask, 0), rounds=3, warmup_rounds=1)
