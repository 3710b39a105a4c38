"""``python -m ntksap_fast.cli.demo``: a real prune at the paper's CIFAR-10 setting, with a report.

ResNet-20, 5 draws x 100 inputs per round, 20 rounds, final density 0.05, on the CPU: the same as
``ntksap prune --preset cifar10 --density 0.05``. Prints the per-layer table (kept / total /
density) and the timing. Extra arguments go to the CLI and override these, e.g.
``python -m ntksap_fast.cli.demo --iterations 5 --report report.md``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .app import main as cli_main


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``ntksap prune --preset cifar10 --density 0.05 [argv...]``; returns the exit code."""
    extra = sys.argv[1:] if argv is None else list(argv)
    return cli_main(["prune", "--preset", "cifar10", "--density", "0.05", *extra])


if __name__ == "__main__":
    raise SystemExit(main())
