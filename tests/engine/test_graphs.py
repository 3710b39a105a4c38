"""ntksap_fast.engine.graphs: one CUDA graph per draw key, replayed with the buffers' new contents; after a
capture failure the reason is kept and draws run eagerly. Only the eager fallback runs without a GPU."""

from __future__ import annotations

import pytest
import torch

from ntksap_fast.engine.graphs import DrawGraphs

needs_cuda = pytest.mark.cuda


def test_after_a_capture_failure_every_draw_runs_eagerly():
    graphs = DrawGraphs(torch.device("cpu"))
    graphs.error = "RuntimeError: capture failed"
    calls = []
    for _ in range(3):
        graphs.run(4, lambda: calls.append(1))
    assert len(calls) == 3 and graphs.captured == 0


@needs_cuda
def test_one_capture_per_key_then_replays_read_the_buffers():
    device = torch.device("cuda")
    graphs = DrawGraphs(device)
    step, total = torch.ones(8, device=device), torch.zeros(8, device=device)
    calls = []

    def draw() -> None:
        calls.append(1)
        total.add_(step)

    graphs.run(4, draw)  # the real draw (eager), then the capture, which records without running
    torch.cuda.synchronize()
    assert graphs.error is None and graphs.captured == 1 and len(calls) == 2
    assert torch.equal(total.cpu(), torch.ones(8))
    step.fill_(3.0)  # same address, new contents: the replay reads them
    graphs.run(4, draw)
    torch.cuda.synchronize()
    assert len(calls) == 2 and torch.equal(total.cpu(), torch.full((8,), 4.0))
    graphs.run(5, draw)  # another key: another capture
    assert graphs.captured == 2
    flag = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = not flag  # the TF32 flags are part of the key
        graphs.run(4, draw)
        assert graphs.captured == 3
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flag


@needs_cuda
def test_a_draw_that_syncs_with_the_host_switches_capture_off():
    device = torch.device("cuda")
    graphs = DrawGraphs(device)
    total = torch.zeros(4, device=device)
    calls = []

    def draw() -> None:
        calls.append(1)
        total.add_(1.0)
        float(total.sum())  # a host sync: not capturable

    graphs.run(4, draw)
    assert graphs.error is not None and graphs.captured == 0
    before = len(calls)
    graphs.run(4, draw)
    assert len(calls) == before + 1  # eager
    assert torch.cuda.current_stream(device) == torch.cuda.default_stream(device)
