"""The CPU memory plan on the ImageNet preset: one ResNet-50 draw of 256 inputs, no ``micro_batch`` given.

Builds torchvision's ResNet-50 (``PRESETS["imagenet"]``), makes an ``NtkSapScorer`` for one draw of
256 inputs of 3x224x224 on the CPU (the memory plan probes, then chooses the micro-batch, logged at
INFO), scores one round and prints: the memory available at the start (``memory.host_usable_bytes``),
the plan's numbers, the times of the set-up and of the draw, and the process's peak resident set
(``ru_maxrss``) against its resident set before the scorer (growth: what the plan has to fit).

Run by hand, not in CI (about 5 minutes and 15 GB on a 2-core, 24 GB machine; check ``free -g``):
``/usr/bin/time -v python bench/memory_plan_resnet50.py``.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time

import torch
from _machine import cpu_name

from ntksap_fast import NtkSapScorer
from ntksap_fast.cli.sources import build_model
from ntksap_fast.engine import memory
from ntksap_fast.presets import PRESETS


def _rss() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="log: %(message)s")
    preset = PRESETS["imagenet"]
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    torch.manual_seed(0)
    model = build_model(preset.model, preset.num_classes)
    usable, before = memory.host_usable_bytes(), _rss()
    print(f"available to the process at the start: {_gib(usable)}; resident before the scorer: {_gib(before)}")
    start = time.perf_counter()
    scorer = NtkSapScorer(
        model,
        preset.input_shape,
        draws=1,
        batch_size=preset.options.batch_sizes()[0],
        epsilon=preset.options.epsilon,
        seed=0,
        device="cpu",
    )
    setup = time.perf_counter() - start
    plan = scorer.config.memory
    print(
        f"set-up (probe included): {setup:.1f} s; micro_batch={scorer.config.micro_batch}; plan: usable "
        f"{_gib(plan.usable)}, {plan.per_input / 2**20:.1f} MiB per input, {_gib(plan.fixed)} weight buffers"
    )
    start = time.perf_counter()
    scores = scorer.flat_scores(torch.ones(scorer.arena.numel, dtype=torch.bool), 0)
    draw = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    micro = scorer.config.micro_batch or 256
    print(f"draw of 256: {draw:.1f} s; scores finite: {bool(torch.isfinite(scores).all())}")
    print(
        f"peak resident {_gib(peak)}, growth over the process before the scorer {_gib(peak - before)}; the plan "
        f"budgeted {_gib(plan.fixed + plan.per_input * micro)} for a pass of {micro} "
        f"(at most {memory.HEADROOM:.0%} of usable: {_gib(memory.HEADROOM * plan.usable)})"
    )


if __name__ == "__main__":
    main()
