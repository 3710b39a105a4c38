"""``python -m ntksap_fast.demo``: a real prune at the paper's CIFAR-10 setting, with a report.

ResNet-20, 5 draws x 100 inputs per round, 20 rounds, final density 0.05 by default, on the CPU.
Prints a per-layer table (kept / total / density) and the timing.
"""
from __future__ import annotations

import argparse
import time

import torch

from .api import ntk_sap_prune
from .models import MODELS
from .presets import PRESETS


def layer_table(masks: dict[str, torch.Tensor]) -> str:
    """Per-layer kept counts and densities, plus the total, as an aligned text table."""
    width = max(len(n) for n in masks)
    lines = [f"{'layer':<{width}}  {'shape':>18}  {'kept':>9}  {'total':>9}  {'density':>8}"]
    kept_all = total_all = 0
    for name, m in masks.items():
        kept, total = int(m.sum()), m.numel()
        kept_all, total_all = kept_all + kept, total_all + total
        flag = "  <- collapsed" if kept == 0 else ""
        lines.append(f"{name:<{width}}  {str(tuple(m.shape)):>18}  {kept:>9}  {total:>9}  {kept / total:>8.4f}{flag}")
    lines.append(f"{'total':<{width}}  {'':>18}  {kept_all:>9}  {total_all:>9}  {kept_all / total_all:>8.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--density", type=float, default=0.05, help="final kept fraction (default 0.05)")
    parser.add_argument("--iterations", type=int, default=PRESETS["cifar10"].iterations)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    preset = PRESETS["cifar10"]
    model = MODELS[preset.model](num_classes=preset.num_classes)
    kwargs = preset.prune_kwargs() | {"iterations": args.iterations}
    print(f"NTK-SAP on {preset.model} (CIFAR-10 setting: {preset.draws} draws x {preset.batch_size} inputs, "
          f"{args.iterations} rounds, eps {preset.epsilon}), density {args.density}, {args.dtype}, "
          f"CPU with {torch.get_num_threads()} threads")
    start = time.perf_counter()
    masks = ntk_sap_prune(model, args.density, seed=args.seed, device="cpu",
                          dtype=getattr(torch, args.dtype), progress=True, **kwargs)
    elapsed = time.perf_counter() - start
    print(layer_table(masks))
    print(f"time: {elapsed:.1f} s ({elapsed / args.iterations:.2f} s per round)")


if __name__ == "__main__":
    main()
