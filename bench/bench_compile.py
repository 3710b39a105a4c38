"""Eager vs compiled draws (``compile=False`` / ``True``, ntksap_fast.engine.compiled), on this machine.

Groups:

* ``draw-<setting>``: one draw of each paper setting (its first draw size; ImageNet cut to 16 inputs
  on a CPU, ``NTKSAP_BENCH_DRAWS``' ``imagenet=1x16``), float32, on kept scorers built and compiled
  outside the timing. The benchmark times the compiled draw; before each of its rounds (pytest-benchmark's
  ``setup``, untimed) the eager scorer's draw is timed by hand, so the two alternate and see the
  same machine load. The summary gives both medians and their ratio.
* ``first-call-<model>``: a fresh process (``--child first``) scores one draw with ``compile=True``:
  the first call (tracing, code generation, C++ compilation) with an empty inductor cache
  (``TORCHINDUCTOR_CACHE_DIR`` a new folder: ``cold``) and again with the cache that run filled
  (``warm``), beside the second call (the draw alone). ResNet-20 (3x32x32, 100 inputs) and ResNet-50
  (3x224x224, 16 inputs).
* ``cifar10-prune``: the CIFAR-10 preset's prune end to end (ResNet-20, 20 rounds of 5 x 100, density
  0.05) in a fresh process with an empty inductor cache, first call included, ``compile=False``
  (baseline), ``None`` (the plan decides) and ``True``; the runs alternate.

On a CPU ``make bench`` runs a cut of this (``bench/_machine.py``, ``leave_out``: the CIFAR-10 draw,
the ResNet-20 first call and one prune of each ``compile`` value); ``NTKSAP_BENCH_FULL=1`` runs it all.

Environment: ``NTKSAP_BENCH_ROUNDS`` (timed rounds, default 5 for draws, 3 for the prune, 1 in the cut),
``NTKSAP_BENCH_SETTINGS`` (comma list of the paper settings for ``draw-*``), ``NTKSAP_BENCH_DRAWS``
(``setting=1xN``: the draw's inputs), ``NTKSAP_BENCH_SUMMARY`` (append the summary to this file).

Run: ``python -m pytest bench/bench_compile.py -p no:cacheprovider --benchmark-columns=median,iqr,min,rounds``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from _machine import bench_device, leave_out, write_after

from ntksap_fast import NtkSapScorer
from ntksap_fast.cli.sources import build_model
from ntksap_fast.presets import PRESETS

DEVICE = bench_device()
ROUNDS = int(os.environ.get("NTKSAP_BENCH_ROUNDS") or 5)
if os.environ.get("NTKSAP_BENCH_SETTINGS"):
    _SELECTED = [s.strip() for s in os.environ["NTKSAP_BENCH_SETTINGS"].split(",") if s.strip()]
elif leave_out(DEVICE, "bench_compile.py: draw-cifar100, draw-tiny-imagenet, draw-imagenet (about 5 min)"):
    _SELECTED = ["cifar10"]
else:
    _SELECTED = list(PRESETS)
_FIRST_CALL = ["resnet20"]
if not leave_out(DEVICE, "bench_compile.py: first-call-resnet50 (about 2.5 min)"):
    _FIRST_CALL.append("resnet50")
_PRUNE_ROUNDS = int(
    os.environ.get("NTKSAP_BENCH_ROUNDS")
    or (1 if leave_out(DEVICE, "bench_compile.py: cifar10-prune repeats (1 run of each compile value, not 3)") else 3)
)
_CPU_INPUTS = {"imagenet": 16}  # inputs of the timed draw on a CPU (the round's draws are 256)
_SUMMARY: list[str] = []


def _draw_inputs(name: str) -> int:
    """The timed draw's inputs: ``NTKSAP_BENCH_DRAWS``' ``name=1xN``, else the setting's first draw size
    (``_CPU_INPUTS`` on a CPU)."""
    for item in (os.environ.get("NTKSAP_BENCH_DRAWS") or "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == name and "x" in value:
            return int(value.split("x")[1])
    first = PRESETS[name].options.batch_sizes()[0]
    return first if torch.cuda.is_available() else _CPU_INPUTS.get(name, first)


def _scorer(name: str, inputs: int, compile: bool) -> NtkSapScorer:
    preset = PRESETS[name]
    torch.manual_seed(0)
    model = build_model(preset.model, preset.num_classes)
    return NtkSapScorer(model, preset.input_shape, draws=1, batch_size=inputs, compile=compile, device=DEVICE)


def _load() -> str:
    return "load average " + " ".join(f"{v:.1f}" for v in os.getloadavg())


@pytest.mark.parametrize("name", _SELECTED)
def test_draw(benchmark, name):
    inputs = _draw_inputs(name)
    eager, compiled = _scorer(name, inputs, False), _scorer(name, inputs, True)
    mask = torch.ones(eager.arena.numel, dtype=torch.bool)
    start = time.perf_counter()
    compiled.flat_scores(mask)  # compiles
    first = time.perf_counter() - start
    eager.flat_scores(mask)  # warm-up
    assert compiled.settled()["compile"] is True, compiled.settled()
    eager_times: list[float] = []

    def time_eager_draw():
        start = time.perf_counter()
        eager.flat_scores(mask)
        eager_times.append(time.perf_counter() - start)

    benchmark.group = f"draw-{name}"
    benchmark.pedantic(compiled.flat_scores, args=(mask,), setup=time_eager_draw, rounds=ROUNDS, warmup_rounds=1)
    eager_median, compiled_median = statistics.median(eager_times[1:]), benchmark.stats.stats.median
    benchmark.extra_info.update(
        inputs=inputs, eager_seconds=eager_times[1:], eager_median=eager_median, first_compiled_call=first, load=_load()
    )
    _SUMMARY.append(
        f"draw-{name:<14} {inputs:4d} inputs  eager {eager_median:8.3f} s  "
        f"compiled {compiled_median:8.3f} s  x{eager_median / compiled_median:5.2f}  "
        f"(first compiled call {first:6.1f} s; {_load()})"
    )


_CHILD = r"""
import json, sys, time, torch
from ntksap_fast import NtkSapScorer, ntk_sap_prune
from ntksap_fast.cli.sources import build_model
from ntksap_fast.presets import PRESETS
kind, arg = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
if kind == "first":
    model_name, shape, inputs = {"resnet20": ("resnet20", (3, 32, 32), 100),
                                 "resnet50": ("torchvision:resnet50", (3, 224, 224), 16)}[arg]
    scorer = NtkSapScorer(build_model(model_name, 10), shape, draws=1, batch_size=inputs, compile=True)
    mask = torch.ones(scorer.arena.numel, dtype=torch.bool)
    t0 = time.perf_counter(); scorer.flat_scores(mask); t1 = time.perf_counter(); scorer.flat_scores(mask)
    print(json.dumps({"first": t1 - t0, "second": time.perf_counter() - t1}))
else:
    preset = PRESETS["cifar10"]
    model = build_model(preset.model, preset.num_classes)
    compile = {"False": False, "None": None, "True": True}[arg]
    t0 = time.perf_counter()
    masks = ntk_sap_prune(model, 0.05, progress=False, compile=compile, **preset.prune_kwargs())
    print(json.dumps({"prune": time.perf_counter() - t0, "compiled": masks.metadata["compile"]}))
"""


def _child(kind: str, arg: str, cache: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    out = subprocess.run([sys.executable, "-c", _CHILD, kind, arg], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cache", ["cold", "warm"])
@pytest.mark.parametrize("model", _FIRST_CALL)
def test_first_call(benchmark, model, cache, tmp_path_factory):
    folder = str(tmp_path_factory.getbasetemp() / f"inductor-{model}")  # warm: the folder the cold run filled
    if cache == "cold" and os.path.exists(folder):
        pytest.fail("the cold run must come first, with a new folder")
    results: list[dict] = []
    benchmark.group = f"first-call-{model}"
    benchmark.pedantic(lambda: results.append(_child("first", model, folder)), rounds=1, warmup_rounds=0)
    benchmark.extra_info.update(results[0], load=_load())
    _SUMMARY.append(
        f"first-call-{model:<9} {cache:<4} cache  first call {results[0]['first']:7.1f} s  "
        f"second {results[0]['second']:6.2f} s  ({_load()})"
    )


def test_cifar10_prune(benchmark):
    runs: dict[str, list[float]] = {"False": [], "None": [], "True": []}
    decided: dict[str, bool] = {}

    def one_round_of_each():
        for arg in runs:  # alternating, each in a fresh process with an empty inductor cache
            with tempfile.TemporaryDirectory() as cache:
                result = _child("prune", arg, cache)
            runs[arg].append(result["prune"])
            decided[arg] = result["compiled"]

    benchmark.group = "cifar10-prune"
    benchmark.pedantic(one_round_of_each, rounds=_PRUNE_ROUNDS, warmup_rounds=0)
    medians = {arg: statistics.median(times) for arg, times in runs.items()}
    benchmark.extra_info.update(seconds=runs, decided=decided, load=_load())
    for arg, median in medians.items():
        _SUMMARY.append(
            f"cifar10-prune compile={arg:<5} (compiled: {decided[arg]!s:<5}) median {median:7.1f} s  "
            f"x{medians['False'] / median:5.2f} of compile=False  runs {[round(t, 1) for t in runs[arg]]}"
        )
    _SUMMARY.append(f"cifar10-prune: {_load()}")


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    if _SUMMARY:
        title = f"eager vs compiled, {torch.get_num_threads()} threads, torch {torch.__version__}"
        write_after(request, [title, *_SUMMARY])
