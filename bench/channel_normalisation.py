"""Which normalisation makes channel scores of different sizes comparable (docs/DESIGN.md, "Granularity").

A channel unit's raw NTK-SAP score is ``|sum over draws and its entries of dL/dm|``; units hold from
tens to thousands of entries, so the raw scores of different layers are not on one scale. For each
normalisation of ``ntksap_fast.select.structured.NORMALISATIONS`` (per multiply-add, per unpruned
weight, none, over the group's mean) this prunes with channel NTK-SAP (the library's ``NtkSapScorer`` and
``ChannelSelector``, round by round as ``select.loop.run`` does) and reports:

* ``collapsed``: channel groups left at their floor of one channel (a layer cut to one channel
  carries almost no signal: layer collapse), and the smallest kept fraction of any group;
* ``FLOPs``: the exported model's FLOPs per input over the dense model's (``model_flops``);
* ``NTK trace``: ``trace(J J^T)`` of the masked model over the dense one's, ``J`` the Jacobian of
  the outputs of N(0, 1) inputs (16; ResNet-50: 4) w.r.t. the kept weights at the model's initial
  values (BatchNorm with batch statistics), estimated as ``E ||J (m * v)||^2`` over Gaussian probes
  ``v`` (4; ResNet-50: 2; the same for every row): the quantity NTK-SAP keeps large, measured on
  inputs and weights it never saw.

Run (CPU, a few minutes per model): ``.venv/bin/python bench/channel_normalisation.py [--models resnet20 vgg16_bn]``.
Results: bench/results/cpu-channel-normalisation-2026-12-03.txt.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
import torchvision
from torch.func import functional_call, jvp

from ntksap_fast import NtkSapScorer, export_pruned
from ntksap_fast.analysis.report import model_flops
from ntksap_fast.io.masks import Masks
from ntksap_fast.models import resnet20, vgg16_bn
from ntksap_fast.select.loop import PruneOptions
from ntksap_fast.select.structured import NORMALISATIONS, ChannelSelector

MODELS = {  # builder, input shape, NTK-SAP settings (rounds, draws x inputs), NTK trace (inputs, probes)
    "resnet20": (resnet20, (3, 32, 32), dict(iterations=20, draws=1, batch_size=32), (16, 4)),
    "vgg16_bn": (vgg16_bn, (3, 32, 32), dict(iterations=20, draws=1, batch_size=32), (16, 4)),
    "resnet50": (torchvision.models.resnet50, (3, 224, 224), dict(iterations=5, draws=1, batch_size=2), (4, 2)),
}


def channel_prune(scorer: NtkSapScorer, model, shape, density: float, iterations: int, normalisation: str) -> Masks:
    """Channel NTK-SAP with one normalisation: the signed G of each round to the channel selector."""
    options = PruneOptions(density=density, iterations=iterations, granularity="channel")
    selector = ChannelSelector(model, scorer.arena, shape, normalisation=normalisation)
    mask = scorer.start_mask()
    for t, d in enumerate(options.densities()):
        contributions, _ = scorer.round_scores(mask, t, d, options, lambda: None)
        selector.select_(contributions, mask, t, d)
    alive = selector.units.group_of.bincount(weights=selector.alive(mask).double())
    collapsed = (alive == 1).sum()
    fractions = alive / selector.units.units_of_group()
    masks = Masks({n: v.clone() for n, v in scorer.arena.views(mask).items()}, metadata={"granularity": "channel"})
    masks.metadata["collapsed"] = f"{int(collapsed)}/{len(fractions)} groups, smallest {float(fractions.min()):.3f}"
    return masks


def ntk_trace(model, masks, shape, probes: int = 4, batch: int = 16) -> float:
    """``E ||J (m * v)||^2`` (module docstring), the same inputs and probes for every call."""
    work = copy.deepcopy(model).train()
    for m in work.modules():  # batch statistics, nothing recorded
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked = False, None, None, None
    params = {n: p.detach() for n, p in work.named_parameters()}
    if masks is not None:
        params |= {n: params[n] * masks[n].to(params[n].dtype) for n in masks}
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=generator)
    names = list(masks) if masks is not None else [n for n in params if n.endswith("weight") and params[n].dim() > 1]
    total = 0.0
    for _ in range(probes):
        tangent = {n: torch.randn(params[n].shape, generator=generator) for n in names}
        if masks is not None:
            tangent = {n: t * masks[n] for n, t in tangent.items()}

        def f(weights):
            return functional_call(work, {**params, **weights}, (x,))

        _, jv = jvp(f, ({n: params[n] for n in names},), (tangent,))
        total += float(jv.double().pow(2).sum())
    return total / probes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "vgg16_bn"], choices=list(MODELS))
    parser.add_argument("--densities", nargs="+", type=float, default=[0.25, 0.1])
    parser.add_argument("--normalisations", nargs="+", default=list(NORMALISATIONS), choices=NORMALISATIONS)
    args = parser.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    for name in args.models:
        build, shape, settings, (inputs, probes) = MODELS[name]
        torch.manual_seed(0)
        model = build().eval()
        scorer = NtkSapScorer(model, shape, draws=settings["draws"], batch_size=settings["batch_size"], seed=0)
        dense_flops = model_flops(model, shape)
        masked_names = scorer.arena.names
        dense_trace = ntk_trace(
            model,
            {
                n: torch.ones_like(p, dtype=torch.bool)
                for n, p in zip(masked_names, scorer.arena.values(model).values())
            },
            shape,
            probes,
            inputs,
        )
        print(f"\n## {name} {shape}, NTK-SAP {settings}")
        print(f"{'density':>8} {'normalisation':>13} {'kept':>7} {'FLOPs':>7} {'NTK trace':>10}  collapsed    seconds")
        for density in args.densities:
            for normalisation in args.normalisations:
                start = time.perf_counter()
                try:
                    masks = channel_prune(scorer, model, shape, density, settings["iterations"], normalisation)
                except ValueError as err:
                    print(f"{density:>8} {normalisation:>13}  {err}")
                    continue
                kept = sum(int(m.sum()) for m in masks.values()) / scorer.arena.numel
                flops = model_flops(export_pruned(model, masks, shape), shape) / dense_flops
                trace = ntk_trace(model, masks, shape, probes, inputs) / dense_trace
                print(
                    f"{density:>8} {normalisation:>13} {kept:>7.4f} {flops:>7.3f} {trace:>10.4f}  "
                    f"{masks.metadata['collapsed']}  {time.perf_counter() - start:7.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
