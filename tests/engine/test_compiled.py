"""engine.compiled: the per-draw step under torch.compile (one graph, no recompilation, same scores).

Most tests compile with ``aot_eager``: dynamo and AOTAutograd trace the same graph as inductor
does (so graph breaks, recompilations and the traced arithmetic show) but generate no code, which
costs seconds of C++ compilation per graph on a CPU. Inductor's own numerics (fused kernels,
reordered float32 sums) are held to the float64 oracle in tests/test_oracle.py and
tests/test_oracle_precision.py, and to reproducibility here.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torchvision
from torch import nn
from torch._dynamo.utils import counters

from _oracle_models import MODELS, flat
from _tolerances import assert_float32_close, assert_scores_close
from ntksap_fast import NtkSapScorer, ntk_sap_prune, ntk_sap_scores
from ntksap_fast.engine import compiled
from ntksap_fast.engine.backend import ENV_VAR
from ntksap_fast.models import resnet20, vgg16_bn

F64 = torch.float64

# torch.compile on a CPU costs seconds a graph: out of the edit loop (make test-fast), in make test.
pytestmark = pytest.mark.slow


@pytest.fixture
def traced(monkeypatch):
    """The compiled step traced by dynamo and AOTAutograd, run without generated code."""
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_a_five_round_prune_compiles_one_graph_for_every_round_draw_and_size(traced):
    model, shape = MODELS["tiny_resnet"][0](), MODELS["tiny_resnet"][1]
    kwargs = dict(density=0.2, iterations=5, draws=3, batch_size=[6, 6, 4], seed=4, epsilon=0.02, dtype=F64, stats=True)
    counters.clear()
    got = ntk_sap_prune(model, input_shape=shape, compile=True, **kwargs)
    # 15 draws of two sizes, 5 masks, 5 round counters: one graph (mark the batch dim static and the
    # draws of 4 compile a second one; read the round from Python and every round does)
    assert _graphs() == 1 and not counters["recompiles"]
    assert got.metadata["compile"] is True and "compile_error" not in got.metadata
    want = ntk_sap_prune(model, input_shape=shape, compile=False, **kwargs)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    for a, b in zip(got.metadata["rounds"], want.metadata["rounds"]):  # the stability sums, odd draws' share included
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12)


def test_micro_batched_draws_compile_two_graphs_and_equal_eager_ones(traced):
    """The whole draw's statistics (one graph) and the micro-batches (one graph for every size: 4, 2 and 3)."""
    model, shape = MODELS["tiny_resnet"][0](), MODELS["tiny_resnet"][1]
    kwargs = dict(draws=2, batch_size=[10, 7], micro_batch=4, seed=1, epsilon=0.02, dtype=F64)
    counters.clear()
    scorer = NtkSapScorer(model, shape, compile=True, **kwargs)
    got = [flat(scorer.scores(round=r)) for r in range(2)]
    assert scorer.config.micro_batch == 4 and scorer.engine.compiled.error is None
    assert _graphs() == 2 and not counters["recompiles"]
    eager = NtkSapScorer(model, shape, compile=False, **kwargs)
    for r in range(2):
        assert_scores_close(got[r], flat(eager.scores(round=r)))


def _vit() -> nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=3
    )


ARCHITECTURES = {  # one graph each (fullgraph=True), scores as the eager engine's
    "resnet20": (resnet20, (3, 8, 8)),
    "vgg16_bn": (lambda: vgg16_bn(num_classes=10), (3, 32, 32)),
    "mobilenet_v2": (
        lambda: torchvision.models.mobilenet_v2(  # three inverted residual blocks, one with its skip
            num_classes=10, width_mult=0.25, inverted_residual_setting=[[1, 16, 1, 1], [6, 24, 2, 2]]
        ),
        (3, 16, 16),
    ),
    "vit": (_vit, (3, 8, 8)),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architectures_compile_as_one_graph(traced, name):
    build, shape = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = build()
    kwargs = dict(draws=1, batch_size=4, seed=1, dtype=F64)
    counters.clear()
    scorer = NtkSapScorer(model, shape, compile=True, **kwargs)
    got = flat(scorer.scores())
    assert scorer.engine.compiled.error is None and _graphs() == 1
    assert_scores_close(got, flat(ntk_sap_scores(model, shape, compile=False, **kwargs)))


class _DataDependent(nn.Module):
    """Branches on a value of its input: dynamo cannot keep that in one graph."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum().item() > -1e9 else -self.fc(x)


def test_a_step_that_does_not_compile_runs_eagerly_and_says_why(traced, caplog):
    model = _DataDependent()
    with caplog.at_level(logging.WARNING, logger="ntksap_fast"):
        scorer = NtkSapScorer(model, (4,), draws=2, batch_size=5, compile=True, dtype=F64)
        got = flat(scorer.scores())
    assert "could not be compiled" in caplog.text
    settled = scorer.settled()
    assert settled["compile"] is False and settled["compile_error"]
    assert "compile_error" in repr(scorer)
    assert_scores_close(got, flat(ntk_sap_scores(model, (4,), draws=2, batch_size=5, compile=False, dtype=F64)))


def test_the_same_compiled_call_twice_gives_the_same_masks():
    """Inductor's code, twice from a new scorer (its own copy of the step; the cache's kernels)."""
    model, shape = MODELS["mlp"][0](), MODELS["mlp"][1]
    kwargs = dict(density=0.1, iterations=3, draws=2, batch_size=16, seed=2, compile=True)
    first, second = (ntk_sap_prune(model, input_shape=shape, **kwargs) for _ in range(2))
    assert first.metadata["compile"] is True
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_the_triton_kernels_enter_the_graph_as_operators(monkeypatch):
    """Under Triton's interpreter (CPU tensors) with aot_eager: the statistics and the mask-gradient
    reduction are operators of the traced graph, and the scores are the eager Triton path's."""
    graphs: list[str] = []

    def recording(gm: torch.fx.GraphModule, example_inputs):
        graphs.extend(m.code for m in gm.modules() if isinstance(m, torch.fx.GraphModule))
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    monkeypatch.setenv(ENV_VAR, "triton")
    monkeypatch.setattr(compiled, "BACKEND", recording)
    model, shape = MODELS["bn_convnet"][0](), MODELS["bn_convnet"][1]
    kwargs = dict(draws=2, batch_size=6, seed=3, epsilon=0.05)
    scorer = NtkSapScorer(model, shape, compile=True, **kwargs)
    got = flat(scorer.scores())
    assert scorer.config.backend == "triton" and scorer.engine.compiled.error is None
    code = "\n".join(graphs)
    assert "ntksap_fast_kernels.clean_stats" in code and "ntksap_fast_kernels.mask_grad" in code
    assert_float32_close(got, flat(ntk_sap_scores(model, shape, compile=False, **kwargs)))
