"""The machine a benchmark runs on: its name (for the printed tables), the device the benchmarks time,
and what ``make bench`` shortens there (decided here and nowhere else).

On a GPU everything runs whole by default. On a CPU the whole paper rounds take hours (the ImageNet
round alone: 39 x 256 + 16 ResNet-50 inputs at about 0.5 s each on a 2-core machine, four times per
benchmark), so ``make bench`` (about 10 minutes on a 2-core CPU):

* times the first draw of each paper round cut to its first inputs (``CPU_DRAWS``), one round after
  the warm-up (``CPU_ROUNDS``), and extrapolates the round by inputs (bench/bench_paper_settings.py);
* leaves out what ``leave_out`` is asked about (bfloat16 on the CPU, the larger models of
  bench_compile.py and bench_topk.py, repeats of the compiled CIFAR-10 prune), each recorded in
  ``LEFT_OUT`` for the summary bench/conftest.py prints at the end.

``NTKSAP_BENCH_FULL=1`` runs everything whole; ``NTKSAP_BENCH_DRAWS`` and ``NTKSAP_BENCH_ROUNDS``
choose the paper settings' cut.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

from ntksap_fast.engine.plan import cpu_has_bfloat16

#: ``NTKSAP_BENCH_DRAWS`` on a CPU by default: ``setting=draws`` or ``setting=draws x inputs per draw``.
CPU_DRAWS = "cifar10=1,cifar100=1x64,tiny-imagenet=1x64,imagenet=1x8"
#: Timed rounds of each paper-settings benchmark (after one warm-up): the full settings', a CPU's by default.
FULL_ROUNDS, CPU_ROUNDS = 3, 1
#: How to run the full settings, for the summary.
FULL_COMMAND = "NTKSAP_BENCH_FULL=1 make bench"
#: What this run left out (``leave_out``), in the order asked, for the summary.
LEFT_OUT: list[str] = []


def cpu_name() -> str:
    """The CPU's model name from ``lscpu`` (``platform.processor()`` where that fails)."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def bench_device() -> torch.device:
    """``NTKSAP_BENCH_DEVICE``, else ``cuda`` when available, else ``cpu``."""
    return torch.device(os.environ.get("NTKSAP_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


def shortened(device: torch.device) -> bool:
    """Whether the paper settings are cut by default on ``device``: on a CPU, unless ``NTKSAP_BENCH_FULL=1``."""
    return device.type == "cpu" and os.environ.get("NTKSAP_BENCH_FULL", "0") in ("", "0")


def draws_spec(device: torch.device) -> str:
    """The draws to time (``NTKSAP_BENCH_DRAWS`` syntax; ``""`` = whole rounds): the variable when set, else
    ``CPU_DRAWS`` where ``shortened``."""
    if "NTKSAP_BENCH_DRAWS" in os.environ:
        return os.environ["NTKSAP_BENCH_DRAWS"].strip()
    return CPU_DRAWS if shortened(device) else ""


def timed_rounds(device: torch.device) -> int:
    """Timed rounds per benchmark: ``NTKSAP_BENCH_ROUNDS`` when set, else ``CPU_ROUNDS`` where ``shortened``,
    else ``FULL_ROUNDS``."""
    if os.environ.get("NTKSAP_BENCH_ROUNDS"):
        return int(os.environ["NTKSAP_BENCH_ROUNDS"])
    return CPU_ROUNDS if shortened(device) else FULL_ROUNDS


def leave_out(device: torch.device, what: str) -> bool:
    """Whether this run leaves ``what`` (a benchmark, in words) out on ``device``: where ``shortened``.
    Recorded in ``LEFT_OUT`` then, once."""
    if not shortened(device):
        return False
    if what not in LEFT_OUT:
        LEFT_OUT.append(what)
    return True


def write_after(request, lines: list[str]) -> None:
    """Writes ``lines`` to the terminal from a module fixture's teardown (output capture off there, or
    pytest would swallow them); to the file ``NTKSAP_BENCH_SUMMARY`` too when set."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            for line in lines:
                reporter.write_line(line)
    path = os.environ.get("NTKSAP_BENCH_SUMMARY")
    if path:
        with open(path, "a") as f:
            f.write("\n".join(lines) + "\n")


def dtypes(device: torch.device) -> list[str]:
    """The dtypes the engine benchmarks time on ``device``: float32, and bfloat16 except on a CPU without
    native bfloat16 (the scorer warns there: 10-14x slower than float32) or where left out (a CPU's
    shortened run; 2-3x slower than float32 on the AVX-512 machine measured)."""
    if device.type == "cpu" and not cpu_has_bfloat16():
        return ["float32"]
    if device.type == "cpu" and leave_out(device, "bfloat16 (bench_engine.py, bench_paper_settings.py; about 3 min)"):
        return ["float32"]
    return ["float32", "bfloat16"]


def interleaved_medians(calls: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each call, timed round after round (each call once per round, after ``warmup``
    untimed rounds), so that the ratios between them see the same load of a shared machine."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}
