"""Peak memory and scores of a ResNet-50 draw, whole vs micro-batched (run by hand, not in CI).

One draw of 64 inputs of 3x224x224 on torchvision's ResNet-50, scored once as a whole and once
with ``micro_batch=8``, each in a fresh process whose resident set is sampled every millisecond.
Prints both peaks (growth over the process before scoring), both times, and how far the
micro-batched scores are from the whole-batch ones.

Usage: ``python bench/memory_resnet50.py`` (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import torch

WORKER = """
import os, sys, threading, time, torch, torchvision
from ntksap_fast import ntk_sap_scores
model = torchvision.models.resnet50()
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
base, peak, done = rss(), [0], threading.Event()
def watch():
    while not done.wait(0.001):
        peak[0] = max(peak[0], rss())
threading.Thread(target=watch, daemon=True).start()
micro = None if sys.argv[1] == "none" else int(sys.argv[1])
start = time.perf_counter()
scores = ntk_sap_scores(model, (3, 224, 224), draws=1, batch_size=64, seed=0, micro_batch=micro)
seconds = time.perf_counter() - start
done.set()
torch.save({"peak": peak[0] - base, "seconds": seconds, "scores": scores}, sys.argv[2])
"""


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for micro in ("none", "8"):
            out = os.path.join(tmp, f"{micro}.pt")
            subprocess.run([sys.executable, "-c", WORKER, micro, out], check=True)
            results[micro] = torch.load(out, weights_only=True)
    flat = {k: torch.cat([v.reshape(-1) for v in r["scores"].values()]) for k, r in results.items()}
    diff = flat["8"] - flat["none"]
    print(f"ResNet-50, one draw of 64 inputs at 3x224x224, float32, {torch.get_num_threads()} threads")
    for k, r in results.items():
        label = "whole draw" if k == "none" else f"micro_batch={k}"
        print(f"{label:>16}: peak growth {r['peak'] / 2**30:6.2f} GiB, {r['seconds']:6.1f} s")
    print(
        f"micro vs whole: max |diff| / max score {diff.abs().max() / flat['none'].abs().max():.2e}, "
        f"relative L2 {diff.norm() / flat['none'].norm():.2e}"
    )


if __name__ == "__main__":
    main()
