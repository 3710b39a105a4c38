"""Where one draw's GPU time goes: kernel families, launches, and the largest copies.

Profiles warm draws on a kept ``NtkSapScorer`` with ``torch.profiler`` and prints, per setting,
the wall time per draw, the GPU kernel time by family (convolution/GEMM, BatchNorm, our Triton
kernels, elementwise, copies, reductions, other), the kernel launches per draw, and the aten ops
that launch the copies with their input shapes, so the next person sees where the time goes.

Usage: ``python bench/profile_draw.py [--settings resnet20-100,resnet50-64] [--dtype float32]``
(CUDA only; on a CPU it prints the CPU-side op table instead).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from ntksap_fast import NtkSapScorer
from ntksap_fast.cli.sources import build_model

#: name -> (model, input shape, inputs per draw)
SETTINGS = {
    "resnet20-100": ("resnet20", (3, 32, 32), 100),
    "resnet50-64": ("torchvision:resnet50", (3, 224, 224), 64),
    "resnet50-256": ("torchvision:resnet50", (3, 224, 224), 256),
}
#: kernel-name fragments -> family, first match wins
FAMILIES = [
    ("triton", ("_sample_draws", "_normal_range", "_stats_", "_fd_loss", "_mask_grad")),
    ("conv/gemm", ("conv", "gemm", "xmma", "cutlass", "wgrad", "dgrad", "fprop", "implicit")),
    ("batchnorm", ("bn_", "batch_norm", "batchnorm")),
    ("copy", ("copy", "Copy")),
    ("reduce", ("reduce", "Reduce")),
    ("elementwise", ("elementwise", "vectorized")),
]


def _gpu_us(event) -> float:
    """GPU time of a profiler event in microseconds (``device_time_total``; ``cuda_time_total`` before torch 2.4)."""
    value = getattr(event, "device_time_total", None)
    return float(value if value is not None else event.cuda_time_total)


def _family(name: str) -> str:
    for family, keys in FAMILIES:
        if any(k in name for k in keys):
            return family
    return "other"


def profile_setting(name: str, dtype: torch.dtype, draws: int = 3) -> None:
    model_name, shape, batch = SETTINGS[name]
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(model_name).to(device)
    scorer = NtkSapScorer(model, shape, draws=draws, batch_size=batch, device=device, dtype=dtype)
    mask = torch.ones(scorer.arena.numel, dtype=torch.bool, device=device)
    scorer.flat_scores(mask, 0)  # warm: compiles, graph captures
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        scorer.flat_scores(mask, 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / draws
    print(f"\n=== {name} {str(dtype).split('.')[-1]}: {wall * 1e3:.1f} ms per draw (profiled), {scorer!r}")
    events = prof.key_averages()
    if device.type != "cuda":
        print(events.table(sort_by="self_cpu_time_total", row_limit=15))
        return
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_family: dict[str, float] = defaultdict(float)
    for e in kernels:
        by_family[_family(e.name)] += _gpu_us(e)
    total = sum(by_family.values())
    print(f"GPU kernel time per draw {total / draws / 1e3:.1f} ms, launches per draw {len(kernels) / draws:.0f}")
    for family, us in sorted(by_family.items(), key=lambda kv: -kv[1]):
        print(f"  {family:<12} {us / draws / 1e3:8.2f} ms  {100 * us / total:5.1f}%")
    copies = prof.key_averages(group_by_input_shape=True)
    rows = sorted(
        (e for e in copies if e.key in ("aten::copy_", "aten::to", "aten::contiguous", "aten::clone")),
        key=lambda e: -_gpu_us(e),
    )[:8]
    print("  largest copies (op, input shapes, calls, GPU ms per draw):")
    for e in rows:
        us = _gpu_us(e)
        print(f"    {e.key:<16} {str(e.input_shapes)[:90]:<90} x{e.count // draws:<4} {us / draws / 1e3:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default="resnet20-100,resnet50-64")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    opts = parser.parse_args()
    for name in opts.settings.split(","):
        profile_setting(name, getattr(torch, opts.dtype))


if __name__ == "__main__":
    main()
