"""Inference speed of pruned models on the CPU: dense vs unstructured-masked vs channel-exported.

Cases (one group each, ratios to the dense ``baseline`` printed at the end by bench/conftest.py and
a ratio table from interleaved rounds printed by this module):

* ``resnet20-32-b1`` / ``-b8``: the paper's CIFAR ResNet-20 (``ntksap_fast.models``), 32x32 inputs,
  batch 1 and 8.
* ``resnet50-224-b1`` / ``-b8``: torchvision's ResNet-50, 224x224 inputs, batch 1 and 8.

Variants, all at density 0.25 (the kept fraction of the prunable Conv/Linear weights), eval mode,
``torch.inference_mode``:

* ``dense_baseline``: the model as built.
* ``masked_unstructured``: NTK-SAP weight masks applied with ``apply_masks`` (``torch.nn.utils.prune``:
  ``weight = weight_orig * weight_mask`` recomputed before every forward; dense tensors).
* ``channel_exported``: ``export_pruned`` of channel NTK-SAP masks (``granularity="channel"``).

The masks are made once per model with a short NTK-SAP prune (``PRUNE``: few rounds, one draw of a
few inputs): enough for a speed measurement (the speed depends on the kept widths, not on how well
they were chosen), not the paper's settings. Both mask kinds come from the same settings.

``interleaved``: not a pytest-benchmark figure: the three variants timed round after round, so the
ratios see the same load of a shared machine; medians and ratios to dense in a table at the end.

Run (the machine is shared: note ``uptime``'s load average beside the figures; ``NTKSAP_BENCH_THREADS``
below):

    .venv/bin/python -m pytest bench/bench_structured.py -p no:cacheprovider \\
        --benchmark-columns=median,iqr,rounds --benchmark-sort=name
"""

from __future__ import annotations

import copy
import os
from functools import partial

import pytest
import torch
import torchvision
from _machine import cpu_name, interleaved_medians, write_after
from torch import nn

from ntksap_fast import apply_masks, export_pruned, ntk_sap_prune
from ntksap_fast.analysis.report import model_flops
from ntksap_fast.models import resnet20

DENSITY = 0.25
#: model -> (builder, input shape, short NTK-SAP settings for the masks)
MODELS = {
    "resnet20": (resnet20, (3, 32, 32), dict(iterations=10, draws=1, batch_size=16)),
    "resnet50": (torchvision.models.resnet50, (3, 224, 224), dict(iterations=5, draws=1, batch_size=2)),
}
BATCHES = (1, 8)
VARIANTS = ("dense_baseline", "masked_unstructured", "channel_exported")
#: Timed rounds of each variant (the interleaved rounds too).
ROUNDS = {"resnet20": 30, "resnet50": 12}
#: ``NTKSAP_BENCH_THREADS=1`` on a machine whose other work keeps more threads runnable than it has
#: cores: a 2-thread op then waits at OpenMP's barrier for a descheduled sibling (measured here at a
#: load average of 6 on 2 cores: a 1x1 convolution 1261 -> 146 at 7x7, batch 8, takes 48 ms on two
#: threads, 1.2 ms on one), so the time counts operations, not their FLOPs.
if os.environ.get("NTKSAP_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["NTKSAP_BENCH_THREADS"]))

_MODELS: dict[str, dict[str, nn.Module]] = {}
_FACTS: dict[str, str] = {}  # model -> kept fractions and FLOPs, for the table
_MEDIANS: dict[tuple[str, str], float] = {}  # (group, variant) -> median seconds, interleaved rounds


def _variants(name: str) -> dict[str, nn.Module]:
    """The three variants of one model, built once (one model's variants in memory at a time)."""
    if name not in _MODELS:
        _MODELS.clear()
        build, shape, settings = MODELS[name]
        torch.manual_seed(0)
        dense = build().eval()
        weight = ntk_sap_prune(dense, DENSITY, shape, progress=False, **settings)
        channel = ntk_sap_prune(dense, DENSITY, shape, granularity="channel", progress=False, **settings)
        masked = apply_masks(copy.deepcopy(dense), weight).eval()
        exported = export_pruned(dense, channel).eval()
        _MODELS[name] = {"dense_baseline": dense, "masked_unstructured": masked, "channel_exported": exported}
        kept = sum(int(m.sum()) for m in channel.values()) / sum(m.numel() for m in channel.values())
        flops = model_flops(exported, shape) / model_flops(dense, shape)
        _FACTS[name] = (
            f"channel masks keep {kept:.3f} of the prunable weights, exported FLOPs {flops:.3f} of dense; "
            f"prune: {settings}"
        )
    return _MODELS[name]


def _inputs(name: str, batch: int) -> torch.Tensor:
    return torch.randn(batch, *MODELS[name][1], generator=torch.Generator().manual_seed(0))


def _interleaved(name: str, batch: int, group: str) -> None:
    """Round after round, each variant once; medians into _MEDIANS."""
    x = _inputs(name, batch)
    with torch.inference_mode():
        medians = interleaved_medians({v: partial(m, x) for v, m in _variants(name).items()}, ROUNDS[name])
    _MEDIANS.update({(group, variant): median for variant, median in medians.items()})


PARAMS = [
    pytest.param(m, b, v, id=f"{m}-b{b}-{v}") for m in MODELS for b in BATCHES for v in (*VARIANTS, "interleaved")
]


@pytest.mark.parametrize("name,batch,variant", PARAMS)
def test_forward(benchmark, name, batch, variant):
    benchmark.group = f"{name}-{MODELS[name][1][-1]}-b{batch}"
    if variant == "interleaved":
        _interleaved(name, batch, benchmark.group)
        return
    model, x = _variants(name)[variant], _inputs(name, batch)

    def forward():
        with torch.inference_mode():
            model(x)

    benchmark.pedantic(forward, rounds=ROUNDS[name], warmup_rounds=1)


@pytest.fixture(scope="module", autouse=True)
def ratio_table(request):
    """After the module's benchmarks: the interleaved medians and their ratios to dense."""
    yield
    if not _MEDIANS:
        return
    lines = [
        f"interleaved medians, speed-up over dense; {cpu_name()}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}"
    ]
    for group in sorted({g for g, _ in _MEDIANS}):
        dense = _MEDIANS[(group, "dense_baseline")]
        cells = [f"{v} {_MEDIANS[(group, v)] * 1e3:8.2f} ms x{dense / _MEDIANS[(group, v)]:5.2f}" for v in VARIANTS]
        lines.append(f"  {group:<16} " + " | ".join(cells))
    lines += [f"  {name}: {facts}" for name, facts in _FACTS.items()]
    write_after(request, lines)
