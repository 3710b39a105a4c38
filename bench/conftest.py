"""Prints, after a benchmark run, each group's medians as ratios to the group's baseline, then what the run
shortened (bench/_machine.py) and how to run the full settings.

A benchmark whose name contains ``reference``, ``research`` or ``baseline`` is its group's baseline.
"""

import torch
from _machine import FULL_COMMAND, FULL_ROUNDS, LEFT_OUT, bench_device, cpu_name, draws_spec, timed_rounds


def _machine() -> str:
    return f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups: dict[str, list] = {}
    for bench in session.benchmarks:
        if bench.stats:  # None, or empty for a benchmark that failed or was skipped
            groups.setdefault(bench.group or bench.name, []).append(bench)
    terminalreporter.write_sep("=", f"ratios (median of the baseline / median), {_machine()}")
    for group, benches in sorted(groups.items()):
        base = next((b for b in benches if any(w in b.name for w in ("reference", "research", "baseline"))), None)
        if base is None:
            continue
        for b in benches:
            ratio = base.stats.median / b.stats.median
            terminalreporter.write_line(f"{group:<28} {b.name:<48} median {b.stats.median:9.4f} s  x{ratio:6.2f}")
    cuts = {b.extra_info["setting"]: b.extra_info["cut"] for b in session.benchmarks if b.extra_info.get("cut")}
    if not cuts and not LEFT_OUT:
        return
    device = bench_device()
    terminalreporter.write_sep("=", f"shortened on {device.type} (bench/_machine.py); full settings: {FULL_COMMAND}")
    if cuts:
        full = sum(b.extra_info.get("full_seconds_extrapolated", 0.0) for b in session.benchmarks)
        terminalreporter.write_line(
            f"bench_paper_settings.py timed {timed_rounds(device)} round(s) after a warm-up ({FULL_ROUNDS} in the "
            f"full settings) of the first draws of each round (NTKSAP_BENCH_DRAWS={draws_spec(device)!r}), "
            "round times extrapolated by inputs:"
        )
        for setting, cut in cuts.items():
            terminalreporter.write_line(f"  {setting:<14} {cut}")
        terminalreporter.write_line(
            f"  whole, those benchmarks would take about {full / 3600:.1f} h here (extrapolated from this run)"
        )
    if LEFT_OUT:
        terminalreporter.write_line("left out:")
        for what in LEFT_OUT:
            terminalreporter.write_line(f"  {what}")
