"""ResNet-50 channel NTK-SAP at density 0.25 under each channel normalisation: kept weights, exported
FLOPs and batch-8 inference time against dense (interleaved rounds, medians), on this CPU, in each
deployment mode.

The masks come from ``channel_prune`` of bench/channel_normalisation.py (the library's scorer and
``ChannelSelector``, round by round), one draw of ``--inputs`` per round, ``--rounds`` rounds. Each
exported model (``export_pruned``) and the dense one get the same treatment (``MODES``) and are timed
round after round (``_machine.interleaved_medians``: 10 rounds after two warm-up rounds), so the
ratios see the same machine load.
bench/bench_structured.py times the default normalisation, eager, with pytest-benchmark; this
compares normalisations and asks whether a deployment step a user might take (memory layout,
BatchNorm folding, ``torch.compile``) changes the ratio.

Run: ``.venv/bin/python bench/channel_normalisation_speed.py flop group [--modes eager channels_last]``.
Results: bench/results/cpu-channel-normalisation-2026-12-03.txt.
"""

from __future__ import annotations

import argparse
import copy
from functools import partial

import torch
import torchvision
from _machine import interleaved_medians
from channel_normalisation import channel_prune
from torch import nn
from torch.fx.experimental.optimization import fuse

from ntksap_fast import NtkSapScorer, export_pruned
from ntksap_fast.analysis.report import model_flops
from ntksap_fast.select.structured import NORMALISATIONS


def _channels_last(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


#: Deployment mode -> what is done to every model (dense and exported alike) before timing. ``fused``:
#: BatchNorm folded into the convolution before it (``torch.fx.experimental.optimization.fuse``).
MODES = {
    "eager": lambda model: model,
    "channels_last": _channels_last,
    "fused": fuse,
    "fused_channels_last": lambda model: fuse(_channels_last(model)),
    "compiled": torch.compile,
    "compiled_channels_last": lambda model: torch.compile(_channels_last(model)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("normalisations", nargs="+", choices=NORMALISATIONS)
    parser.add_argument("--inputs", type=int, default=2, help="inputs of the one draw per round")
    parser.add_argument("--rounds", type=int, default=5, help="pruning rounds")
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=list(MODES))
    args = parser.parse_args()
    shape = (3, 224, 224)
    torch.manual_seed(0)
    dense = torchvision.models.resnet50().eval()
    scorer = NtkSapScorer(dense, shape, draws=1, batch_size=args.inputs, seed=0)
    models = {"dense": dense}
    print(
        f"# ResNet-50, density 0.25, {args.rounds} rounds of one draw of {args.inputs}; "
        f"{torch.get_num_threads()} threads"
    )
    for name in args.normalisations:
        masks = channel_prune(scorer, dense, shape, 0.25, args.rounds, name)
        models[name] = export_pruned(dense, masks, shape).eval()
        kept = sum(int(m.sum()) for m in masks.values()) / scorer.arena.numel
        flops = model_flops(models[name], shape) / model_flops(dense, shape)
        widths = [m.out_channels for m in models[name].modules() if isinstance(m, nn.Conv2d)]
        print(f"{name:>6}: kept {kept:.4f}, FLOPs {flops:.3f}, {masks.metadata['collapsed']}; conv widths {widths}")
    x = torch.randn(8, *shape)
    for mode in args.modes:
        layout = x.contiguous(memory_format=torch.channels_last if "channels_last" in mode else torch.contiguous_format)
        calls = {k: partial(MODES[mode](m), layout) for k, m in models.items()}
        with torch.inference_mode():  # two warm-up rounds: torch.compile's first call compiles
            medians = interleaved_medians(calls, 10, warmup=2)
        for name, median in medians.items():
            print(f"{mode:>22} {name:>6}: batch 8 median {median * 1e3:7.1f} ms  x{medians['dense'] / median:5.2f}")


if __name__ == "__main__":
    main()
