"""``examples/prune_and_train.py`` runs end to end as a user would run it (issue 13.5)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_prune_and_train_example_runs(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "prune_and_train.py"),
            "--iterations",
            "2",
            "--draws",
            "1",
            "--batch-size",
            "8",
            "--steps",
            "3",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "pruned: 4 tensors, density 0.1000"
    assert "check: pruned weights are still zero after training" in lines
    assert lines[-1] == "ok"
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "masks.safetensors").is_file()
