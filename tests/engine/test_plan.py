"""engine.plan: resolve (each decision made once, from the options, the model and the device's memory)
and describe (the one writer of the settled configuration)."""
from __future__ import annotations

import warnings

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

    def probe_draw(self, shape, n):
        self.calls.append(("probe", n))


def _resolve(model, monkeypatch=None, usable=None, per_input=None, **kwargs):
    runners = []

    def make(device, dtype, param_dtype):
        runners.append((device, dtype, param_dtype, _Runner()))
        return runners[-1][3]

    if usable is not None:  # a CUDA device with these memory figures (no GPU needed)
        monkeypatch.setattr(plan.memory, "device_usable_bytes", lambda device: usable)
        monkeypatch.setattr(plan.memory, "measure_bytes_per_input", lambda run, device: (run(2), per_input)[1])
    config, runner = resolve(ScorerOptions(**kwargs), model, Arena(model), (3,), make)
    assert len(runners) == 1 and runner is runners[0][3]  # one runner, handed on to the engine
    return config, runner


def _mlp():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_resolve_on_cpu():
    config, runner = _resolve(_mlp(), batch_size=8, micro_batch=8, draw_batch=2)
    assert runner.calls == [("check", (3,))]  # no memory probe off CUDA
    assert config == ScorerConfig(torch.device("cpu"), torch.float32, torch.float32, "torch", None, 2, False, None, None)
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


def test_describe_writes_the_settled_keys():
    config = ScorerConfig(torch.device("cpu"), torch.bfloat16, torch.float32, "torch", 4, 1, True, False, None)
    out = describe(config)
    assert tuple(out) == SETTLED_KEYS
    assert out == {"device": "cpu", "dtype": "bfloat16", "backend": "torch", "micro_batch": 4, "draw_batch": 1,
                   "graphs": True, "allow_tf32": False, "compile": False}
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
        config, _ = resolve(ScorerOptions(draws=10, batch_size=100, **options), model, Arena(model), (3,),
                            lambda *args: _Flops(flops))
        return config.compile

    small, large = 2 * 30 * per_second / 6 / 1000, 2 * 50 * per_second / 6 / 1000
    assert seconds(small) == 30 and seconds(large) == 50
    assert decide(small) is False and decide(large) is True
    assert decide(large, compile=False) is False and decide(small, compile=True) is True
    assert decide(large, draw_batch=2) is False  # vmap-batched draws run eagerly
