"""Prints, after a benchmark run, each group's medians as ratios to the group's baseline.

A benchmark whose name contains ``reference``, ``research`` or ``baseline`` is its group's baseline.
"""

import torch
from _machine import cpu_name


def _machine() -> str:
    return f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups: dict[str, list] = {}
    for bench in session.benchmarks:
        if bench.stats is not None:
            groups.setdefault(bench.group or bench.name, []).append(bench)
    terminalreporter.write_sep("=", f"ratios (median of the baseline / median), {_machine()}")
    for group, benches in sorted(groups.items()):
        base = next((b for b in benches if any(w in b.name for w in ("reference", "research", "baseline"))), None)
        if base is None:
            continue
        for b in benches:
            ratio = base.stats.median / b.stats.median
            terminalreporter.write_line(f"{group:<28} {b.name:<48} median {b.stats.median:9.4f} s  x{ratio:6.2f}")
