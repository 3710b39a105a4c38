"""One scoring round at the paper's four settings (docs/DESIGN.md): the reference (the research
code's passes, ``ntksap_fast.testing.reference``) against the engine in float32 and bfloat16, on one
device, one benchmark group per setting (ratios printed by bench/conftest.py). Two engine figures
each: ``engine-*`` times a round on a kept ``NtkSapScorer`` (set up once, outside the timing);
``call-*`` times what a user calls, ``ntk_sap_scores`` with its set-up.

Settings (``ntksap_fast.PRESETS``, full round, all prunable weights unpruned):

* ``cifar10``: ResNet-20, 3x32x32, 5 draws x 100 inputs.
* ``cifar100``: VGG-16-bn (100 classes), 3x32x32, draws of 256, 256, 256, 232.
* ``tiny-imagenet``: torchvision ResNet-18 (200 classes), 3x64x64, 7 x 256 + 208.
* ``imagenet``: torchvision ResNet-50 (1000 classes), 3x224x224, 39 x 256 + 16.

Environment:

* ``NTKSAP_BENCH_DEVICE``: ``cuda`` (default when available) or ``cpu``.
* ``NTKSAP_BENCH_DRAWS``: time only the first draws of a round: ``4`` (every setting) or
  ``imagenet=4,tiny-imagenet=8`` (those settings; others full); ``imagenet=1x16``: the first draw,
  cut to its first 16 inputs. The summary printed at the end (and written to
  ``NTKSAP_BENCH_SUMMARY`` when set) gives the time per draw and the round time extrapolated by
  inputs (``median * inputs per round / inputs timed``). Default: whole rounds on a GPU, a short cut
  on a CPU (``bench/_machine.py``, ``CPU_DRAWS``; ``NTKSAP_BENCH_FULL=1`` for whole rounds there too).
* ``NTKSAP_BENCH_SETTINGS``: comma list of settings to run (default all four).
* ``NTKSAP_BENCH_ROUNDS``: timed rounds per benchmark (default 3, on a CPU 1: ``bench/_machine.py``;
  1 warm-up round before them).
* ``NTKSAP_BENCH_DRAW_BATCH``: comma list of engine ``draw_batch`` values (default ``1``).
* ``NTKSAP_BENCH_COMPILE``: comma list of engine ``compile`` values, ``0`` and/or ``1`` (default ``0``);
  a compiled engine compiles in the warm-up round, outside the timing.
* ``NTKSAP_BENCH_MICRO_BATCH``: engine ``micro_batch`` (default none).
* ``NTKSAP_BENCH_SMOKE=1``: tiny settings to check the file runs (2 draws of 2 inputs, small
  images, 1 round, no warm-up); its numbers mean nothing.

bfloat16 is not timed on a CPU without native bfloat16 (``bench/_machine.py``, ``dtypes``).

The reference takes one batch size per call, so a round with several sizes is timed as one call
per run of equal sizes (the CIFAR-100 round: 3 x 256, then 1 x 232), each with its own deep copy
of the model. It draws its random numbers on the CPU (``ntksap_fast.engine.draws``) and moves them to the
device, as it does everywhere. A run that does not fit in device memory is skipped with the
reason (``CUDA out of memory``); the peak memory of each benchmark is in its ``extra_info``.

Run (GPU session: bench/gpu_session.sh):

    python -m pytest bench/bench_paper_settings.py -p no:cacheprovider \
        --benchmark-columns=median,iqr,min,rounds --benchmark-sort=name --benchmark-json=out.json
"""

from __future__ import annotations

import gc
import os
from itertools import groupby

import pytest
import torch
from _machine import FULL_ROUNDS, bench_device, draws_spec, dtypes, timed_rounds, write_after

from ntksap_fast import NtkSapScorer, ntk_sap_scores
from ntksap_fast.cli.sources import build_model
from ntksap_fast.engine.arena import Arena
from ntksap_fast.presets import PRESETS
from ntksap_fast.testing.reference import reference_scores

DEVICE = bench_device()
SMOKE = os.environ.get("NTKSAP_BENCH_SMOKE", "0") not in ("", "0")
ROUNDS = 1 if SMOKE and not os.environ.get("NTKSAP_BENCH_ROUNDS") else timed_rounds(DEVICE)
WARMUP = 0 if SMOKE else 1
DRAW_BATCHES = [int(v) for v in (os.environ.get("NTKSAP_BENCH_DRAW_BATCH") or "1").split(",")]
COMPILES = [v.strip() == "1" for v in (os.environ.get("NTKSAP_BENCH_COMPILE") or "0").split(",")]
MICRO_BATCH = int(os.environ["NTKSAP_BENCH_MICRO_BATCH"]) if os.environ.get("NTKSAP_BENCH_MICRO_BATCH") else None
EPSILON, SEED = 0.01, 0

# Smoke-mode input shapes (the models accept them; CIFAR VGG needs 32x32 for its classifier).
_SMOKE_SHAPES = {"cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "tiny-imagenet": (3, 32, 32), "imagenet": (3, 64, 64)}


def _cut(value: str) -> tuple[int, int | None]:
    """``"4"`` -> (4 draws, whole draws); ``"1x16"`` -> (1 draw, at most 16 inputs each)."""
    draws, _, inputs = value.strip().partition("x")
    return int(draws), int(inputs) if inputs else None


def _draw_limits() -> dict[str, tuple[int, int | None]]:
    """``{setting: (draws, inputs per draw or None)}`` from ``draws_spec`` (empty: whole rounds)."""
    spec = draws_spec(DEVICE)
    if not spec:
        return {}
    if "=" not in spec:
        return {name: _cut(spec) for name in PRESETS}
    out = {}
    for item in spec.split(","):
        name, value = item.split("=")
        if name.strip() not in PRESETS:
            raise ValueError(f"NTKSAP_BENCH_DRAWS: unknown setting {name!r}; choose from {list(PRESETS)}")
        out[name.strip()] = _cut(value)
    return out


class Setting:
    """One paper setting, possibly cut to its first draws (or shrunk in smoke mode)."""

    def __init__(self, name: str):
        preset = PRESETS[name]
        self.name = name
        self.model_name = preset.model
        self.num_classes = preset.num_classes
        sizes = list(preset.options.batch_sizes())
        self.shape = tuple(preset.input_shape)
        if SMOKE:
            sizes = [2, 2]
            self.shape = _SMOKE_SHAPES[name]
        self.round_draws, self.round_inputs = len(sizes), sum(sizes)
        limit, most_inputs = _draw_limits().get(name, (None, None))
        first = sizes[: max(1, min(limit, len(sizes)))] if limit else sizes
        self.sizes = [min(size, most_inputs) for size in first] if most_inputs else first
        self.draws_cut = self.sizes != first  # fewer inputs per draw than the setting's
        self.draws, self.inputs = len(self.sizes), sum(self.sizes)
        self.cut = (
            ""
            if self.sizes == sizes
            else (f"{self.draws} of {self.round_draws} draws, {self.inputs} of {self.round_inputs} inputs")
        )

    def model(self) -> torch.nn.Module:
        if self.model_name.startswith("torchvision:"):
            pytest.importorskip("torchvision")
        torch.manual_seed(0)
        return build_model(self.model_name, self.num_classes)

    @property
    def label(self) -> str:
        cut = "" if self.draws == self.round_draws else f"-first{self.draws}of{self.round_draws}"
        cut += f"-x{max(self.sizes)}" if self.draws_cut else ""
        return f"{self.name}{cut}-{DEVICE.type}{'-smoke' if SMOKE else ''}"


_SELECTED = [s.strip() for s in (os.environ.get("NTKSAP_BENCH_SETTINGS") or ",".join(PRESETS)).split(",") if s.strip()]
SETTINGS = {name: Setting(name) for name in _SELECTED}
_RESULTS: list[dict] = []
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _fresh_memory() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(DEVICE)


def _time(benchmark, setting: Setting, kind: str, fn) -> None:
    def timed():
        fn()
        _sync()

    _fresh_memory()
    benchmark.group = setting.label
    benchmark.extra_info.update(
        setting=setting.name,
        device=str(DEVICE),
        smoke=SMOKE,
        input_shape=list(setting.shape),
        draws_timed=setting.draws,
        inputs_timed=setting.inputs,
        batch_sizes_timed=setting.sizes,
        draws_per_round=setting.round_draws,
        inputs_per_round=setting.round_inputs,
    )
    try:
        benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=WARMUP)
    except _OOM as err:
        _fresh_memory()
        pytest.skip(f"CUDA out of memory: {str(err).splitlines()[0]}")
    median = benchmark.stats.stats.median
    per_round = median * setting.round_inputs / setting.inputs
    benchmark.extra_info.update(
        seconds_per_draw=median / setting.draws,
        seconds_per_round_extrapolated=per_round,
        cut=setting.cut,
        rounds_timed=ROUNDS,
        full_seconds_extrapolated=per_round * (FULL_ROUNDS + 1),
    )
    if DEVICE.type == "cuda":
        benchmark.extra_info["peak_memory_gib"] = torch.cuda.max_memory_allocated(DEVICE) / 2**30
    _RESULTS.append(
        dict(
            group=setting.label,
            kind=kind,
            median=median,
            per_draw=median / setting.draws,
            per_round=per_round,
            peak=benchmark.extra_info.get("peak_memory_gib"),
        )
    )
    _fresh_memory()


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    if not _RESULTS:
        return
    lines = [
        f"per-draw and per-round times (round extrapolated by inputs), device {DEVICE}"
        + (f" ({torch.cuda.get_device_name(DEVICE)})" if DEVICE.type == "cuda" else "")
    ]
    for group, rows in groupby(sorted(_RESULTS, key=lambda r: r["group"]), key=lambda r: r["group"]):
        rows = list(rows)
        base = next((r for r in rows if r["kind"] == "reference"), None)
        for r in rows:
            ratio = f"x{base['median'] / r['median']:6.2f}" if base else ""
            peak = f"  peak {r['peak']:6.2f} GiB" if r["peak"] is not None else ""
            lines.append(
                f"{group:<40} {r['kind']:<26} median {r['median']:9.4f} s  per draw {r['per_draw']:9.4f} s  "
                f"round {r['per_round']:9.3f} s  {ratio}{peak}"
            )
    write_after(request, lines)


def _scorer_kwargs(s: Setting, dtype: str) -> dict:
    """The scorer options every engine and call benchmark of ``s`` shares."""
    return dict(
        draws=s.draws,
        batch_size=s.sizes,
        epsilon=EPSILON,
        seed=SEED,
        device=DEVICE,
        dtype=getattr(torch, dtype),
        micro_batch=MICRO_BATCH,
    )


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_reference(benchmark, setting):
    s = SETTINGS[setting]
    model = s.model()
    arena = Arena(model)
    mask = torch.ones(arena.numel, dtype=torch.bool, device=DEVICE)
    runs = [(size, len(list(group))) for size, group in groupby(s.sizes)]

    def fn():
        for size, count in runs:
            reference_scores(
                model, arena, mask, s.shape, draws=count, batch_size=size, epsilon=EPSILON, seed=SEED, device=DEVICE
            )

    _time(benchmark, s, "reference", fn)


@pytest.mark.parametrize("compile", COMPILES)
@pytest.mark.parametrize("draw_batch", DRAW_BATCHES)
@pytest.mark.parametrize("dtype", dtypes(DEVICE))
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_engine(benchmark, setting, dtype, draw_batch, compile):
    s = SETTINGS[setting]
    if draw_batch > s.draws:
        pytest.skip(f"{s.label} times {s.draws} draw(s): nothing to batch {draw_batch} at a time")
    if compile and draw_batch > 1:
        pytest.skip("compiled draws run one at a time (draw_batch 1)")
    model = s.model().to(DEVICE)
    scorer = NtkSapScorer(model, s.shape, **_scorer_kwargs(s, dtype), draw_batch=draw_batch, compile=compile)
    mask = torch.ones(scorer.arena.numel, dtype=torch.bool, device=DEVICE)
    benchmark.extra_info["scorer"] = repr(scorer)
    kind = f"engine-{dtype}-db{draw_batch}" + ("-compiled" if compile else "")
    _time(benchmark, s, kind, lambda: scorer.flat_scores(mask, 0))


@pytest.mark.parametrize("dtype", dtypes(DEVICE))
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_call(benchmark, setting, dtype):
    s = SETTINGS[setting]
    model = s.model().to(DEVICE)
    kwargs = _scorer_kwargs(s, dtype)
    _time(benchmark, s, f"call-{dtype}", lambda: ntk_sap_scores(model, s.shape, **kwargs))
