"""How much bfloat16 compute changes NTK-SAP masks, next to what a different seed changes.

Prunes ResNet-20 at the CIFAR-10 setting (5 draws x 100, T rounds) to each density in float32
with seeds 0 and 1, and in bfloat16 with seed 0, then prints per density:

* overlap: |A and B| / n_keep, the fraction of kept entries two masks share;
* layer gap: the largest difference of per-layer density between the two masks.

Usage: ``python bench/bf16_agreement.py [--iterations 20] [--densities 0.2 0.05]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from ntksap_fast import PRESETS, ntk_sap_prune
from ntksap_fast.models import resnet20


def overlap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    both = sum(int((a[n] & b[n]).sum()) for n in a)
    return both / sum(int(a[n].sum()) for n in a)


def layer_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(abs(a[n].float().mean().item() - b[n].float().mean().item()) for n in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.2, 0.05])
    args = parser.parse_args()
    kwargs = PRESETS["cifar10"].prune_kwargs() | {"iterations": args.iterations, "progress": False}
    model = resnet20()
    print(f"ResNet-20, CIFAR-10 setting, T={args.iterations}, {torch.get_num_threads()} threads")
    print(f"{'density':>8} {'pair':<28} {'overlap':>8} {'layer gap':>10}")
    for density in args.densities:
        start = time.perf_counter()
        f32_a = ntk_sap_prune(model, density, seed=0, **kwargs)
        f32_b = ntk_sap_prune(model, density, seed=1, **kwargs)
        bf16 = ntk_sap_prune(model, density, seed=0, dtype=torch.bfloat16, **kwargs)
        for label, a, b in (("float32 seed 0 vs bf16 seed 0", f32_a, bf16), ("float32 seed 0 vs seed 1", f32_a, f32_b)):
            print(f"{density:>8.4f} {label:<28} {overlap(a, b):>8.4f} {layer_gap(a, b):>10.4f}")
        print(f"{'':>8} ({time.perf_counter() - start:.0f} s for the three prunes)")


if __name__ == "__main__":
    main()
