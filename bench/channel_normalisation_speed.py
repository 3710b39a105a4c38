"""ResNet-50 channel NTK-SAP at density 0.25 under each channel normalisation: kept weights, exported
FLOPs and batch-8 inference time against dense (interleaved rounds, medians), on this CPU.

The masks come from ``channel_prune`` of bench/channel_normalisation.py (the library's scorer and
``ChannelSelector``, round by round), one draw of ``inputs`` per round, ``rounds`` rounds; each
exported model (``export_pruned``) and the dense one are timed round after round (10 rounds after one
warm-up), so the ratios see the same machine load. bench/bench_structured.py times the default
normalisation with pytest-benchmark; this compares normalisations.

Run: ``.venv/bin/python bench/channel_normalisation_speed.py flop,group [inputs=2] [rounds=5]``.
Results: bench/results/cpu-channel-normalisation-2026-12-03.txt.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torchvision
from channel_normalisation import channel_prune

from ntksap_fast import NtkSapScorer, export_pruned
from ntksap_fast.analysis.report import model_flops


def main() -> None:
    normalisations = sys.argv[1].split(",")
    inputs = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    shape = (3, 224, 224)
    torch.manual_seed(0)
    dense = torchvision.models.resnet50().eval()
    scorer = NtkSapScorer(dense, shape, draws=1, batch_size=inputs, seed=0)
    models = {"dense": dense}
    print(f"# ResNet-50, density 0.25, {rounds} rounds of one draw of {inputs}; {torch.get_num_threads()} threads")
    for name in normalisations:
        masks = channel_prune(scorer, dense, shape, 0.25, rounds, name)
        models[name] = export_pruned(dense, masks, shape).eval()
        kept = sum(int(m.sum()) for m in masks.values()) / scorer.arena.numel
        flops = model_flops(models[name], shape) / model_flops(dense, shape)
        widths = [m.out_channels for m in models[name].modules() if isinstance(m, torch.nn.Conv2d)]
        print(f"{name:>6}: kept {kept:.4f}, FLOPs {flops:.3f}, {masks.metadata['collapsed']}; conv widths {widths}")
    x = torch.randn(8, *shape)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for model in models.values():
            model(x)
        for _ in range(10):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    dense_median = statistics.median(times["dense"])
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f"{name:>6}: batch 8 median {median * 1e3:7.1f} ms  x{dense_median / median:5.2f}")


if __name__ == "__main__":
    main()
