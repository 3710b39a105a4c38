"""engine.plan: resolve (each decision made once, from the options, the model and the device's memory)
and describe (the one writer of the settled configuration)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from ntksap_fast.engine import plan
from ntksap_fast.engine.arena import Arena
from ntksap_fast.engine.plan import SETTLED_KEYS, ScorerConfig, describe, resolve
from ntksap_fast.options import ScorerOptions

GIB = 2**30


class _Runner:
    """Stands in for engine.ModelRunner: records what resolve asks of it."""

    def __init__(self):
        self.calls = []

    def check_input_shape(self, shape):
        self.calls.append(("check", shape))

    def probe_draw(self, shape, n, backward=True):
        self.calls.append(("probe", n) if backward else ("forwards", n))


def _resolve(model, monkeypatch=None, usable=None, per_input=None, **kwargs):
    runners = []

    def make(device, dtype, param_dtype):
        runners.append((device, dtype, param_dtype, _Runner()))
        return runners[-1][3]

    if usable is not None:  # a CUDA device, or the host, with these memory figures (no GPU needed)
        monkeypatch.setattr(plan.memory, "device_usable_bytes", lambda device: usable)
        monkeypatch.setattr(plan.memory, "host_usable_bytes", lambda: usable)
        monkeypatch.setattr(plan.memory, "measure_bytes_per_input", lambda run, device: (run(2), per_input)[1])
    config, runner = resolve(ScorerOptions(**kwargs), model, Arena(model), (3,), make)
    assert len(runners) == 1 and runner is runners[0][3]  # one runner, handed on to the engine
    return config, runner


def _mlp():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_resolve_on_cpu():
    config, runner = _resolve(_mlp(), batch_size=8, micro_batch=8, draw_batch=2)
    assert runner.calls == [("check", (3,))]  # no memory probe off CUDA
    assert config == ScorerConfig(
        torch.device("cpu"), torch.float32, torch.float32, "torch", None, 2, False, None, None
    )
    config, _ = _resolve(_mlp(), batch_size=8, micro_batch=3, draw_batch=2, dtype=torch.float64)
    assert (config.micro_batch, config.draw_batch, config.param_dtype) == (3, 1, torch.float64)  # micro: in sequence
    rnn = nn.Sequential(nn.LSTM(3, 4, batch_first=True))
    assert _resolve(rnn, draw_batch=4)[0].draw_batch == 1  # vmap has no rule for the fused recurrent ops
    with warnings.catch_warnings():  # CPUs without native bfloat16 warn (tested in test_scorer.py)
        warnings.simplefilter("ignore", RuntimeWarning)
        assert _resolve(_mlp(), dtype=torch.bfloat16)[0].param_dtype == torch.float32


def test_resolve_on_cuda_from_the_memory_plan(monkeypatch):
    kwargs = dict(device="cuda", draws=2, batch_size=[256, 100])
    # fits easily: whole draws and CUDA graphs
    config, runner = _resolve(_mlp(), monkeypatch, usable=80 * GIB, per_input=0.01 * GIB, **kwargs)
    assert ("probe", 2) in runner.calls
    assert (config.backend, config.micro_batch, config.graphs) == ("triton", None, True)
    # fits, but not in a graph's share
    config, _ = _resolve(_mlp(), monkeypatch, usable=80 * GIB, per_input=0.16 * GIB, **kwargs)
    assert (config.micro_batch, config.graphs) == (None, False)
    # does not fit: micro-batches of what fits, no graphs, draws in sequence
    config, _ = _resolve(_mlp(), monkeypatch, usable=30 * GIB, per_input=0.15 * GIB, draw_batch=2, **kwargs)
    assert (config.micro_batch, config.graphs, config.draw_batch) == (139, False, 1)  # floor(0.7 * 30 / 0.15) - fixed
    # an explicit micro_batch wins; one >= the largest draw is whole draws
    config, _ = _resolve(_mlp(), monkeypatch, usable=30 * GIB, per_input=0.15 * GIB, micro_batch=64, **kwargs)
    assert config.micro_batch == 64
    config, _ = _resolve(_mlp(), monkeypatch, usable=30 * GIB, per_input=0.15 * GIB, micro_batch=256, **kwargs)
    assert config.micro_batch is None
    assert describe(config)["memory"] == "usable 30.0 GiB, 153.6 MiB per input"


def test_resolve_on_cpu_from_the_memory_plan(monkeypatch, caplog):
    """On the CPU (where running out of memory is the kernel's kill, no Python error) the draws are cut to
    what fits in HEADROOM of the available memory, in equal micro-batches, and the choice is logged."""
    kwargs = dict(draws=2, batch_size=[256, 100])
    config, runner = _resolve(_mlp(), monkeypatch, usable=40 * GIB, per_input=0.08 * GIB, **kwargs)
    assert ("forwards", 2) in runner.calls and (config.micro_batch, config.draw_batch) == (None, 1)  # 20.5 GiB fits
    with caplog.at_level("INFO", logger="ntksap_fast"):
        config, _ = _resolve(_mlp(), monkeypatch, usable=20 * GIB, per_input=0.08 * GIB, **kwargs)
    # 175 inputs fit in 0.7 * 20 GiB: two passes of 128 (not 175 + 81)
    assert (config.micro_batch, config.draw_batch, config.graphs) == (128, 1, False)
    assert "micro_batch=128: a draw of 256 inputs would need about 20.5 GiB" in caplog.text
    assert describe(config)["memory"] == "usable 20.0 GiB, 81.9 MiB per input"
    # vmap-batched draws are cut before draws are split: 4 x 100 inputs need 32 GiB, 2 x 100 fit
    config, _ = _resolve(
        _mlp(), monkeypatch, usable=30 * GIB, per_input=0.08 * GIB, draws=4, batch_size=100, draw_batch=4
    )
    assert (config.micro_batch, config.draw_batch) == (None, 2)
    # a given micro_batch, or draws no larger than the probe's, are not planned: no probe
    for options in (dict(micro_batch=64), dict(batch_size=4)):
        config, runner = _resolve(_mlp(), monkeypatch, usable=GIB, per_input=0.08 * GIB, draws=2, **options)
        assert runner.calls == [("check", (3,))] and config.memory is None


def test_resolve_on_cpu_refuses_what_cannot_fit_before_any_work(monkeypatch):
    probes = []
    monkeypatch.setattr(plan.memory, "measure_bytes_per_input", lambda run, device: probes.append(2) or 0.8 * GIB)
    monkeypatch.setattr(plan.memory, "host_usable_bytes", lambda: GIB)
    model = _mlp()
    with pytest.raises(
        MemoryError,
        match=r"Sequential with input_shape \(3,\): one input needs about 819.2 MiB of "
        r"host memory, more than 70% of the 1.0 GiB available .* nothing was run",
    ):
        resolve(ScorerOptions(batch_size=256), model, Arena(model), (3,), lambda *args: _Runner())
    assert probes == [2]
    # weight buffers that do not fit are refused before the probe
    monkeypatch.setattr(plan.memory, "host_usable_bytes", lambda: 100)
    with pytest.raises(MemoryError, match="the weight buffers alone need about"):
        resolve(ScorerOptions(batch_size=256), model, Arena(model), (3,), lambda *args: _Runner())
    assert probes == [2]
    # memory unknown (no /proc/meminfo): whole draws, no probe
    monkeypatch.setattr(plan.memory, "host_usable_bytes", lambda: None)
    config, runner = resolve(ScorerOptions(batch_size=256), model, Arena(model), (3,), lambda *args: _Runner())
    assert config.micro_batch is None and config.memory is None and probes == [2]


def test_the_cpu_probe_is_the_forwards_of_two_small_draws():
    """Whatever the draws' size, the CPU plan runs the forwards (no backward) of draws of 2 and 4 inputs."""
    config, runner = _resolve(_mlp(), batch_size=256)
    assert runner.calls == [("check", (3,)), ("forwards", 2), ("forwards", 4)]
    assert config.memory is not None and config.memory.per_input == 0  # the stand-in saves nothing


def test_describe_writes_the_settled_keys():
    config = ScorerConfig(torch.device("cpu"), torch.bfloat16, torch.float32, "torch", 4, 1, True, False, None)
    out = describe(config)
    assert tuple(out) == SETTLED_KEYS
    assert out == {
        "device": "cpu",
        "dtype": "bfloat16",
        "backend": "torch",
        "micro_batch": 4,
        "draw_batch": 1,
        "graphs": True,
        "allow_tf32": False,
        "compile": False,
    }
    failed = describe(config, graphs_error="capture failed")
    assert failed["graphs"] is False and failed["graphs_error"] == "capture failed"
    compiled = ScorerConfig(torch.device("cpu"), compile=True)
    assert describe(compiled)["compile"] is True
    failed = describe(compiled, compile_error="Unsupported: x")
    assert failed["compile"] is False and failed["compile_error"] == "Unsupported: x"


class _Flops(_Runner):
    """A runner whose input check runs ``flops`` FLOPs (two inputs' forward), as the plan counts them."""

    def __init__(self, flops: float):
        super().__init__()
        self.flops = flops

    def check_input_shape(self, shape):
        super().check_input_shape(shape)
        n = int(round((self.flops / 2) ** 0.5))  # a (n, n) @ (n, 1) product: 2 n^2 FLOPs, counted, not run
        torch.ones(n, n, device="meta") @ torch.ones(n, 1, device="meta")


def test_compile_none_compiles_on_a_cpu_when_a_round_is_far_larger_than_compiling(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    model = _mlp()  # 4 modules: 4 s of compiling by the plan's rule, so a round must be estimated over 40 s
    per_second = 2 * plan.CPU_FLOPS_PER_THREAD
    seconds = lambda flops: 6 * flops / 2 * 1000 / per_second  # noqa: E731 (two inputs checked, 1000 per round)

    def decide(flops: float, **options) -> bool:
        config, _ = resolve(
            ScorerOptions(draws=10, batch_size=100, **options), model, Arena(model), (3,), lambda *args: _Flops(flops)
        )
        return config.compile

    small, large = 2 * 30 * per_second / 6 / 1000, 2 * 50 * per_second / 6 / 1000
    assert seconds(small) == 30 and seconds(large) == 50
    assert decide(small) is False and decide(large) is True
    assert decide(large, compile=False) is False and decide(small, compile=True) is True
    assert decide(large, draw_batch=2) is False  # vmap-batched draws run eagerly
