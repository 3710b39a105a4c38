"""Global masking step of NTK-SAP: the research code's ``cat + kthvalue + where`` against
``torch.topk`` on the flat vector and the ``ntksap_fast`` masked top-k on the flat arena vector,
each measured beside one read of the same scores (``scores.sum()``).

Groups (one per model size, mask density and device; ratios to ``research`` printed at the end
by bench/conftest.py, and a table of ratios to one read and to ``torch.topk`` printed by this
module at the end of the same run):

* ``topk-resnet50-25.5M-d0.5-<dev>``: the prunable weights of torchvision's ResNet-50 (54
  tensors, 25.5M entries), scores ``|N(0,1)| * 10**U(-3, 0)`` per layer (NTK-SAP scores are
  ``|G|`` with layer-dependent scales), half the entries already pruned (score 0, the research
  code's convention), keep 40% of all entries (80% of the unpruned: a mid-schedule round).
* ``topk-vgg16-138M-d0.5-<dev>``: the same for VGG-16 (16 tensors, 138.3M entries).
* ``...-d1.0-<dev>``: nothing pruned yet, keep 50% (a first round); ``...-d0.05-<dev>``: 5% left,
  keep 90% of those (a late round). Only ``one_read`` and the ``ntksap`` methods there.

Benchmarks:

* ``one_read``: ``scores.sum()``, the memory-bandwidth anchor (one read of the 4-byte scores).
* ``interleaved``: not a pytest-benchmark figure: one read and both ntksap ops timed round after
  round (torch.topk after them), for the ratio table (a shared machine's load then affects
  numerator and denominator alike).

* ``research``: the research code's global masking (Synaptic-Flow code base, ``_global_mask``):
  ``torch.cat`` of the flattened per-layer score tensors, ``torch.kthvalue`` for the threshold at
  the number of entries to prune, then per layer ``mask.copy_(torch.where(score <= threshold,
  0, 1))`` into float masks.
* ``torch_topk``: ``torch.topk`` on the flat score vector (already one tensor), then scatter
  into a fresh bool mask.
* ``ntksap_masked_topk``: ``torch.ops.ntksap_fast.masked_topk`` on the arena's flat score and
  mask vectors (new bool mask).
* ``ntksap_masked_topk_inplace``: ``torch.ops.ntksap_fast.masked_topk_`` (overwrites the mask;
  the mask is restored outside the timed region before each round).

All compute the same selection up to ties (checked once per group before timing). Run:

    .venv/bin/python -m pytest bench/bench_topk.py -p no:cacheprovider \
        --benchmark-columns=median,iqr,min,rounds --benchmark-sort=name

(``-k cpu`` / ``-k cuda`` for one device.)
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from _machine import bench_device, cpu_name, leave_out, write_after

from ntksap_fast.select import topk

if not topk.extension_available():
    pytest.skip(f"compiled extension unavailable: {topk.extension_error()}", allow_module_level=True)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Mask density before the round -> fraction of the unpruned entries kept.
DENSITIES = {0.5: 0.8, 1.0: 0.5, 0.05: 0.9}
MAIN_DENSITY = 0.5


def _layer_shapes(model: str) -> list[tuple[int, ...]]:
    """Weight shapes of every Conv/Linear layer (built on the meta device: no memory)."""
    import torchvision

    with torch.device("meta"):
        net = getattr(torchvision.models, model)()
    return [tuple(m.weight.shape) for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


class Case:
    """Per-layer scores/masks as the research code holds them, and the same data as one arena."""

    def __init__(self, model: str, device: str, density: float):
        shapes = _layer_shapes(model)
        sizes = [int(torch.Size(s).numel()) for s in shapes]
        self.n = sum(sizes)
        g = torch.Generator().manual_seed(0)
        scales = 10.0 ** (-3.0 * torch.rand(len(sizes), generator=g))
        flat = torch.empty(self.n)
        mask = torch.empty(self.n, dtype=torch.bool)
        off = 0
        for size, scale in zip(sizes, scales.tolist()):
            flat[off : off + size].normal_(generator=g).abs_().mul_(scale)
            mask[off : off + size] = torch.rand(size, generator=g) < density
            off += size
        flat.mul_(mask)  # pruned entries score 0, as in the research code
        self.scores = flat.to(device)  # the arena: one flat vector, per-layer views
        self.mask = mask.to(device)
        self.n_keep = int(DENSITIES[density] * int(mask.sum()))
        self.density_main = density == MAIN_DENSITY
        self.device = device
        # The research code's layout: separate score tensors and float masks per layer.
        self.layer_scores = [t.clone().view(s) for t, s in zip(self.scores.split(sizes), shapes)]
        self.layer_masks = [m.float().view(s) for m, s in zip(self.mask.split(sizes), shapes)]
        self.work_mask = self.mask.clone()

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def one_read(self):
        self.scores.sum()
        self.sync()

    def research(self):
        global_scores = torch.cat([torch.flatten(v) for v in self.layer_scores])
        k = global_scores.numel() - self.n_keep  # entries to prune
        threshold, _ = torch.kthvalue(global_scores, k)
        zero = torch.tensor([0.0], device=self.device)
        one = torch.tensor([1.0], device=self.device)
        for mask, score in zip(self.layer_masks, self.layer_scores):
            mask.copy_(torch.where(score <= threshold, zero, one))
        self.sync()

    def torch_topk(self):
        idx = torch.topk(self.scores, self.n_keep, sorted=False).indices
        out = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        out[idx] = True
        self.sync()
        return out

    def ntksap(self):
        out = topk.masked_topk(self.scores, self.mask, self.n_keep)
        self.sync()
        return out

    def restore(self):
        self.work_mask.copy_(self.mask)
        self.sync()

    def ntksap_inplace(self):
        topk.masked_topk_(self.scores, self.work_mask, self.n_keep)
        self.sync()


_CASES: dict = {}


def _check(case: Case, ours: torch.Tensor) -> None:
    """ours keeps n_keep unpruned entries, the largest scores, ties at the threshold to the
    lowest indices; torch.topk and the research code agree with it up to those ties (with
    ~10^8 float32 scores some values repeat)."""
    assert int(ours.sum()) == case.n_keep and not bool((ours & ~case.mask).any())
    t = case.scores[ours].min()
    assert not bool((case.scores[case.mask & ~ours] > t).any())
    at_t = (ours[(case.scores == t) & case.mask]).int()
    assert bool((at_t[1:] <= at_t[:-1]).all()), "ties at the threshold not kept by lowest index"
    if case.density_main:
        for other in (
            case.torch_topk(),
            (case.research(), torch.cat([m.flatten() for m in case.layer_masks]).bool())[1],
        ):
            assert bool((case.scores[ours != other] == t).all())


def _case(model: str, device: str, density: float) -> Case:
    key = (model, device, density)
    if key not in _CASES:
        _CASES.clear()  # one case in memory at a time
        case = Case(model, device, density)
        _check(case, case.ntksap())
        _CASES[key] = case
    return _CASES[key]


MODELS = [("resnet50", "25.5M")] + (
    [] if leave_out(bench_device(), "bench_topk.py: VGG-16 (138M scores; about 1.5 min)") else [("vgg16", "138M")]
)
METHODS = ["one_read", "research", "torch_topk", "ntksap_masked_topk", "ntksap_masked_topk_inplace", "interleaved"]
# Model-major order, so that each case's data is built once.
PARAMS = [
    pytest.param(m, d, dens, meth, id=f"{m}-{d}-d{dens}-{meth}")
    for m, _ in MODELS
    for d in DEVICES
    for dens in DENSITIES
    for meth in METHODS
    if dens == MAIN_DENSITY or meth in ("one_read", "ntksap_masked_topk", "ntksap_masked_topk_inplace", "interleaved")
]
ROUNDS = {"cpu": 5, "cuda": 20}
_MEDIANS: dict = {}  # (group, method) -> median seconds, from the interleaved rounds


def _interleaved(case: Case, group: str, rounds: int) -> None:
    """Round after round: one read, the out-of-place op, the in-place op (mask restored outside
    the timing), so that the ratios see the same machine load; torch.topk (slow on CPU) a few
    times after. Medians into _MEDIANS."""
    times: dict = {"one_read": [], "ntksap_masked_topk": [], "ntksap_masked_topk_inplace": []}

    def timed(f) -> float:
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0

    for _ in range(2):  # warm-up
        case.one_read(), case.ntksap(), case.restore(), case.ntksap_inplace()
    for _ in range(rounds):
        times["one_read"].append(timed(case.one_read))
        times["ntksap_masked_topk"].append(timed(case.ntksap))
        case.restore()
        times["ntksap_masked_topk_inplace"].append(timed(case.ntksap_inplace))
    if case.density_main:
        times["torch_topk"] = [timed(case.torch_topk) for _ in range(3 if case.device == "cpu" else rounds)]
    for meth, ts in times.items():
        _MEDIANS[(group, meth)] = statistics.median(ts)


@pytest.mark.parametrize("model,device,density,method", PARAMS)
def test_topk(benchmark, model, device, density, method):
    case = _case(model, device, density)
    benchmark.group = f"topk-{model}-{dict(MODELS)[model]}-d{density}-{device}"
    rounds = ROUNDS[device]
    if method == "research":
        benchmark.pedantic(case.research, rounds=rounds, warmup_rounds=1)
    elif method == "torch_topk":
        benchmark.pedantic(case.torch_topk, rounds=rounds, warmup_rounds=1)
    elif method == "interleaved":
        _interleaved(case, benchmark.group, 4 * rounds)
    elif method == "one_read":
        benchmark.pedantic(case.one_read, rounds=4 * rounds, warmup_rounds=2)
    elif method == "ntksap_masked_topk":
        benchmark.pedantic(case.ntksap, rounds=4 * rounds, warmup_rounds=2)
    else:
        benchmark.pedantic(case.ntksap_inplace, setup=case.restore, rounds=4 * rounds, warmup_rounds=2)


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


@pytest.fixture(scope="module", autouse=True)
def ratio_table(request):
    """After the module's benchmarks: each group's ntksap medians as multiples of one read of
    the scores, and torch.topk's median as a multiple of ntksap's (same run, same data,
    interleaved rounds: see _interleaved)."""
    yield
    groups = sorted({g for g, _ in _MEDIANS})
    if groups:
        write_after(request, _table(groups))


def _table(groups: list) -> list[str]:
    lines = ["masked top-k: median / one read of the scores (scores.sum()); torch.topk / ntksap"]
    for dev in DEVICES:
        rows = [g for g in groups if g.endswith(f"-{dev}")]
        if rows:
            lines.append(f"{dev}: {_device_name(dev)}, torch {torch.__version__}")
        for g in rows:
            one = _MEDIANS.get((g, "one_read"))
            if one is None:
                continue
            line = f"  {g:<32} one read {one * 1e3:9.3f} ms"
            for meth, label in (("ntksap_masked_topk", "out"), ("ntksap_masked_topk_inplace", "in place")):
                t = _MEDIANS.get((g, meth))
                if t is not None:
                    line += f" | {label} {t * 1e3:9.3f} ms = {t / one:5.2f} reads"
            tk = _MEDIANS.get((g, "torch_topk"))
            best = min(
                (_MEDIANS[(g, m)] for m in ("ntksap_masked_topk", "ntksap_masked_topk_inplace") if (g, m) in _MEDIANS),
                default=None,
            )
            if tk is not None and best is not None:
                line += f" | torch.topk {tk * 1e3:9.3f} ms = {tk / best:5.1f}x ntksap"
            lines.append(line)
    return lines
