"""Reference (the research code's passes) vs the engine on the CPU, side by side.

Groups:
* ``cifar10-round``: ResNet-20, 5 draws x 100 inputs of 3x32x32 (the paper's CIFAR-10 round).
* ``imagenet-draw``: torchvision ResNet-50, one draw of 16 inputs of 3x224x224.
* ``micro-resnet20-64``: ResNet-20, one draw of 64 inputs: whole (the baseline) vs micro-batches of 16.
* ``micro-resnet50-16``: ResNet-50 at 224x224, one draw of 16 inputs: whole vs micro-batches of 4.

The engine runs through a kept ``NtkSapScorer`` (set up outside the timing) in float32 and
bfloat16, with draws in sequence (``draw_batch=1``) and, where a round has several, batched through
vmap (``draw_batch=5``). Micro-batched draws get their BatchNorm statistics from one no-grad
forward of the whole draw, so they should cost about 7/6 of the whole draw plus what smaller
convolutions lose in efficiency.

Run with ``make bench`` (or ``pytest bench/bench_engine.py``); ratios are printed at the end.
"""

import pytest
import torch
import torchvision
from _machine import dtypes

from ntksap_fast import NtkSapScorer
from ntksap_fast.engine.arena import Arena
from ntksap_fast.models import resnet20
from ntksap_fast.testing.reference import reference_scores

SETTINGS = {
    "cifar10-round": (lambda: resnet20(), (3, 32, 32), 5, 100),
    "imagenet-draw": (lambda: torchvision.models.resnet50(), (3, 224, 224), 1, 16),
}
MICRO = {
    "micro-resnet20-64": (lambda: resnet20(), (3, 32, 32), 64, 16),
    "micro-resnet50-16": (lambda: torchvision.models.resnet50(), (3, 224, 224), 16, 4),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_reference(benchmark, setting):
    build, shape, draws, batch = SETTINGS[setting]
    torch.manual_seed(0)
    model = build()
    arena = Arena(model)
    mask = torch.ones(arena.numel, dtype=torch.bool)
    benchmark.group = setting
    benchmark.pedantic(
        reference_scores,
        args=(model, arena, mask, shape),
        kwargs=dict(draws=draws, batch_size=batch, epsilon=0.01, seed=0),
        rounds=3,
        warmup_rounds=1,
    )


@pytest.mark.parametrize("draw_batch", [1, 5])
@pytest.mark.parametrize("dtype", dtypes(torch.device("cpu")))
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_engine(benchmark, setting, dtype, draw_batch):
    build, shape, draws, batch = SETTINGS[setting]
    if draw_batch > draws:
        pytest.skip(f"{setting} has {draws} draw(s): nothing to batch")
    torch.manual_seed(0)
    scorer = NtkSapScorer(
        build(), shape, draws=draws, batch_size=batch, device="cpu", dtype=getattr(torch, dtype), draw_batch=draw_batch
    )
    mask = torch.ones(scorer.arena.numel, dtype=torch.bool)
    benchmark.group = setting
    benchmark.pedantic(scorer.flat_scores, args=(mask, 0), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("micro", ["baseline_whole", "micro"])
@pytest.mark.parametrize("setting", list(MICRO))
def test_micro_batch(benchmark, setting, micro):
    build, shape, batch, micro_batch = MICRO[setting]
    torch.manual_seed(0)
    scorer = NtkSapScorer(
        build(),
        shape,
        draws=1,
        batch_size=batch,
        device="cpu",
        micro_batch=None if micro == "baseline_whole" else micro_batch,
    )
    mask = torch.ones(scorer.arena.numel, dtype=torch.bool)
    benchmark.group = setting
    benchmark.pedantic(scorer.flat_scores, args=(mask, 0), rounds=3, warmup_rounds=1)
