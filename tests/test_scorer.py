"""The session object: reuse, micro-batching, the memory plan, the precision policy, outputs."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from _tolerances import assert_float32_close
from ntksap_fast import NtkSapScorer, ntk_sap_prune, ntk_sap_scores
from ntksap_fast.models import CifarResNet
from ntksap_fast.options import ScorerOptions


def _flat(scores: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in scores.values()])


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
        nn.BatchNorm1d(10),
    )


@pytest.mark.slow
def test_reused_scorer_equals_fresh_ones_bit_for_bit():
    model = _convnet()
    scorer = NtkSapScorer(model, (3, 8, 8), draws=2, batch_size=6, seed=3)
    mask = {
        n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) > 0.3
        for n, p in model.named_parameters()
        if n in scorer.arena.names
    }
    first = [scorer.scores(), scorer.scores(mask, round=4), scorer.scores()]
    fresh = [
        NtkSapScorer(model, (3, 8, 8), draws=2, batch_size=6, seed=3).scores(m, round=r)
        for m, r in ((None, 0), (mask, 4), (None, 0))
    ]
    for a, b in zip(first, fresh):
        assert torch.equal(_flat(a), _flat(b))
    assert not torch.equal(_flat(first[0]), _flat(first[1]))
    # prune() twice on one scorer: identical masks, equal to the one-call function
    masks = scorer.prune(0.2, 3, progress=False)
    again = scorer.prune(0.2, 3, progress=False)
    once = ntk_sap_prune(model, 0.2, (3, 8, 8), iterations=3, draws=2, batch_size=6, seed=3, progress=False)
    for n in masks:
        assert torch.equal(masks[n], again[n]) and torch.equal(masks[n], once[n])


def test_scorer_reads_the_models_non_prunable_tensors_at_every_call():
    model = _convnet()
    scorer = NtkSapScorer(model, (3, 8, 8), draws=1, batch_size=4)
    before = _flat(scorer.scores())
    with torch.no_grad():
        model[11].bias.add_(1.0)  # a non-pruned tensor the output depends on
    after = _flat(scorer.scores())
    assert torch.equal(after, _flat(NtkSapScorer(model, (3, 8, 8), draws=1, batch_size=4).scores()))
    assert not torch.equal(before, after)


def _conv_samples(model: nn.Module) -> tuple[list[int], list]:
    """Per-conv count of input samples seen during a call, and the hook handles."""
    counts, handles = [], []
    for i, m in enumerate(m for m in model.modules() if isinstance(m, nn.Conv2d)):
        counts.append(0)

        def hook(module, inputs, output, i=i):
            counts[i] += inputs[0].shape[0]

        handles.append(m.register_forward_hook(hook))
    return counts, handles


@pytest.mark.parametrize("micro_batch", [4, 5, 16])
@pytest.mark.slow
def test_micro_batches_equal_the_whole_draw_with_one_extra_forward(micro_batch):
    model = CifarResNet(depth=8)
    model.eval()
    kwargs = dict(input_shape=(3, 8, 8), draws=2, batch_size=[16, 13], seed=1)
    counts, handles = _conv_samples(model)
    whole = _flat(ntk_sap_scores(model, **kwargs))
    whole_counts = list(counts)
    counts[:] = [0] * len(counts)
    micro = _flat(ntk_sap_scores(model, micro_batch=micro_batch, **kwargs))
    for h in handles:
        h.remove()
    assert_float32_close(micro, whole)
    inputs = 16 + 13
    # Whole draws: the input-shape check (2 samples), the CPU memory plan's probe (the forwards of draws
    # of 2 and 4, both branches; none with micro_batch given) + both branches. Micro-batched: the
    # statistics forward adds one no-grad forward of each draw that is split (not one per BatchNorm layer).
    probe = 2 * (2 + 4)
    assert all(c == 2 + probe + 2 * inputs for c in whole_counts)
    extra = [m - (w - probe) for m, w in zip(counts, whole_counts)]
    assert all(e <= inputs for e in extra), extra
    if micro_batch < 13:
        assert all(e == inputs for e in extra), extra


@pytest.mark.parametrize("micro_batch", [None, 2])
def test_a_model_whose_batchnorm_calls_vary_is_refused(micro_batch):
    class Flaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.bn = nn.BatchNorm1d(4)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            h = self.fc(x)
            return self.bn(h) if self.calls % 3 else h  # skips its BatchNorm every third forward

    # the shape check is forward 1; the draw's clean forward (or statistics forward) 2; the next 3
    with pytest.raises(RuntimeError, match="BatchNorm calls differ"):
        ntk_sap_scores(Flaky(), (4,), draws=1, batch_size=8, micro_batch=micro_batch)


def test_tf32_flags_are_set_for_the_call_and_restored_also_on_error():
    seen = []

    class Probe(nn.Module):
        def __init__(self, fail: bool):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.fail = fail

        def forward(self, x):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
            if self.fail and x.shape[0] > 2:  # the input-shape check (2 samples) passes
                raise RuntimeError("model failed")
            return self.fc(x)

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for start in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = start
            seen.clear()
            ntk_sap_scores(Probe(False), (3,), draws=1, batch_size=4, allow_tf32=not start)
            assert seen and all(s == (not start, not start) for s in seen)
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (start, start)
            with pytest.raises(RuntimeError, match="model failed"):
                ntk_sap_scores(Probe(True), (3,), draws=1, batch_size=4, allow_tf32=not start)
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (start, start)
            seen.clear()
            ntk_sap_scores(Probe(False), (3,), draws=1, batch_size=4)  # None: the global flags
            assert all(s == (start, start) for s in seen)
        with pytest.raises(TypeError, match="allow_tf32"):
            NtkSapScorer(Probe(False), (3,), allow_tf32="yes")
        with pytest.raises(TypeError, match="allow_tf32"):
            ScorerOptions(allow_tf32=1)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_repr_says_what_was_decided():
    scorer = NtkSapScorer(_convnet(), (3, 8, 8), draws=3, batch_size=[4, 4, 2], micro_batch=2, allow_tf32=False)
    text = repr(scorer)
    for part in (
        "tensors=4",
        "draws=3",
        "batch_size=4,4,2",
        "device=cpu",
        "dtype=float32",
        "backend=torch",
        "micro_batch=2",
        "draw_batch=1",
        "graphs=False",
        "allow_tf32=False",
    ):
        assert part in text, text
    settings = scorer.settings()
    assert settings["micro_batch"] == 2 and settings["batch_sizes"] == [4, 4, 2] and settings["graphs"] is False


def test_engine_built_once_and_settled_configuration_written_by_one_function(monkeypatch):
    import ntksap_fast.engine.engine as engine_mod
    import ntksap_fast.scorer as scorer_mod

    built = []
    real = engine_mod.Engine

    class Counting(real):
        def __init__(self, *a, **k):
            built.append(1)
            super().__init__(*a, **k)

    monkeypatch.setattr(scorer_mod, "Engine", Counting)
    scorer = NtkSapScorer(_convnet(), (3, 8, 8), draws=2, batch_size=4, micro_batch=2)
    masks = scorer.prune(0.5, 2, progress=False)
    scorer.scores()
    assert len(built) == 1
    settled = scorer.settled()
    assert {k: masks.metadata[k] for k in settled} == settled  # the mask metadata: the same values
    assert all(f"{k}={v}" in repr(scorer) for k, v in settled.items())
    assert settled["dtype"] == "float32"  # one spelling (the checkpoint used to write "torch.float32")


def test_output_selects_the_tensor_of_a_model_returning_a_dict():
    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _convnet()

        def forward(self, x):
            return {"logits": self.body(x), "aux": x.mean()}

    model = DictNet()
    got = ntk_sap_scores(model, (3, 8, 8), draws=1, batch_size=4, output=lambda out: out["logits"])
    want = ntk_sap_scores(model.body, (3, 8, 8), draws=1, batch_size=4)
    assert torch.equal(_flat(got), _flat(want))
    with pytest.raises(TypeError, match="output="):
        ntk_sap_scores(model, (3, 8, 8), draws=1, batch_size=4)
    with pytest.raises(TypeError, match="output"):
        NtkSapScorer(model, (3, 8, 8), output="logits")


def test_model_is_unchanged_after_a_micro_batched_call():
    model = _convnet()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    ntk_sap_prune(model, 0.3, (3, 8, 8), iterations=2, draws=2, batch_size=6, micro_batch=2, progress=False)
    assert model.training and all(m.training for m in model.modules())
    assert all(p is params[n] and isinstance(p, nn.Parameter) for n, p in model.named_parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.cuda  # CUDA graphs need a CUDA device
def test_cuda_graph_replays_equal_eager_draws():
    model = CifarResNet(depth=8).cuda()
    kwargs = dict(input_shape=(3, 16, 16), draws=4, batch_size=[8, 8, 8, 5], seed=2, allow_tf32=False)
    graphed = NtkSapScorer(model, **kwargs)
    assert graphed.config.graphs and "graphs=True" in repr(graphed)
    eager = NtkSapScorer(model, **kwargs)
    eager.engine.graphs = None
    for rnd in (0, 3):
        a, b = _flat(graphed.scores(round=rnd)), _flat(eager.scores(round=rnd))
        assert_float32_close(a, b)
        assert ((a - b).abs().max() <= 1e-5 * b.abs().max()).item()
    assert graphed.engine.graphs.captured == 2 and graphed.engine.graphs.error is None


_NARROW = r"""
import os, sys, torch
torch.set_num_threads(int(sys.argv[1]))
device = "cpu"
if sys.argv[2] == "triton" and torch.cuda.is_available():
    device = "cuda"  # the compiled Triton path
elif sys.argv[2] == "triton":
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["NTKSAP_FAST_BACKEND"] = "triton"
from ntksap_fast import ntk_sap_scores
from ntksap_fast.models import CifarResNet
torch.manual_seed(0)
model = CifarResNet(8, width=4)
scores = ntk_sap_scores(model, (3, 16, 16), draws=2, batch_size=8, device=device, allow_tf32=False)
torch.save({n: v.cpu() for n, v in scores.items()}, sys.argv[3])
"""


@pytest.mark.slow
def test_width4_resnet_runs_and_both_paths_agree(tmp_path):
    """oneDNN issue 6035 (strided 1x1 convolutions with < 16 input channels, channels-last) crashed,
    hung or gave wrong shortcut gradients on this ResNet; the engine guards those convolutions.
    The Triton case runs under the interpreter without a GPU and compiled on CUDA with one."""
    import subprocess
    import sys

    got = {}
    for threads, backend in ((1, "torch"), (2, "torch"), (2, "triton")):
        path = tmp_path / f"{backend}{threads}.pt"
        res = subprocess.run(
            [sys.executable, "-c", _NARROW, str(threads), backend, str(path)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        got[(threads, backend)] = torch.load(path)
    want = got[(1, "torch")]
    for key, scores in got.items():
        for name, value in scores.items():
            scale = want[name].abs().max().item()
            assert torch.isfinite(value).all(), (key, name)
            close = (value - want[name]).abs() <= 1e-4 * scale + 1e-4 * want[name].abs()
            assert close.float().mean().item() >= 0.999, (key, name)


@pytest.mark.cuda  # CUDA graphs need a CUDA device
def test_cuda_graph_capture_failure_falls_back_to_eager_draws():
    class HostSync(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _convnet()

        def forward(self, x):
            out = self.body(x)
            if out.abs().max().item() > 1e30:  # a host sync: not capturable
                out = out * 0
            return out

    model = HostSync().cuda()
    scorer = NtkSapScorer(model, (3, 8, 8), draws=3, batch_size=4, allow_tf32=False)
    assert scorer.config.graphs
    got = _flat(scorer.scores())
    assert scorer.engine.graphs.error is not None and "graphs_error=" in repr(scorer)
    eager = NtkSapScorer(model, (3, 8, 8), draws=3, batch_size=4, allow_tf32=False)
    eager.engine.graphs = None
    want = _flat(eager.scores())
    assert ((got - want).abs().max() <= 1e-5 * want.abs().max()).item()


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_on_a_cpu_without_native_bfloat16_warns(monkeypatch, native):
    from ntksap_fast.engine import plan

    monkeypatch.setattr(plan, "cpu_has_bfloat16", lambda: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        NtkSapScorer(_convnet(), (3, 8, 8), draws=1, batch_size=4, dtype=torch.bfloat16, device="cpu")
        NtkSapScorer(_convnet(), (3, 8, 8), draws=1, batch_size=4, dtype=torch.float32, device="cpu")
        ntk_sap_scores(_convnet(), (3, 8, 8), draws=1, batch_size=4, dtype=torch.bfloat16, device="cpu")
    slow = [w for w in caught if issubclass(w.category, RuntimeWarning) and "without native bfloat16" in str(w.message)]
    assert len(slow) == (0 if native else 2)
    assert all(w.filename == __file__ for w in slow)  # the user's line, from either entry point
