"""The memory plan of a scorer on a GPU: how many inputs fit in one pass, and whether a draw fits a CUDA graph.

Made once per scorer from two numbers:

* ``usable``: the device memory this process can use, ``free + (reserved - allocated)``: the
  driver's free bytes (``torch.cuda.mem_get_info``) plus what PyTorch's caching allocator holds
  but does not use (it hands those blocks out again before asking the driver). Counting only the
  free bytes would make every call after earlier GPU work in the process (a previous prune, a
  training step) micro-batch for no reason.
* ``per_input``: the bytes one more input adds to a draw (both branches, forward and backward),
  measured once as the slope of the peak allocation between draws of 2 and 4 inputs, so the
  weights and their gradients, which do not grow with the inputs, drop out.

Rules (``plan``): the whole draw fits one pass when ``per_input * batch_size`` fits in
``HEADROOM`` of ``usable`` minus the weight buffers (``fixed``), else ``max_inputs`` is the most
inputs that do (at least 1). CUDA graphs (``ntksap_fast.engine.graphs``), which keep one draw's
activations allocated for the scorer's life, fit only when whole draws fit in ``GRAPH_SHARE`` of
the usable memory. The scorer's settings are decided from this plan in
``ntksap_fast.engine.plan.resolve``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["MemoryPlan", "plan", "usable_bytes", "device_usable_bytes", "measure_bytes_per_input", "HEADROOM",
           "GRAPH_SHARE"]

#: Share of the usable memory one draw may take.
HEADROOM = 0.7
#: Share of the usable memory below which a draw is captured in a CUDA graph.
GRAPH_SHARE = 0.25


@dataclass(frozen=True)
class MemoryPlan:
    """What fits, and from which numbers (bytes). ``max_inputs``: most inputs one pass can hold, None
    when the whole draw fits; ``graphs``: a whole draw fits a CUDA graph."""

    max_inputs: int | None
    graphs: bool
    usable: int
    per_input: float
    fixed: int


def usable_bytes(free: int, reserved: int, allocated: int) -> int:
    """Bytes the process can use: the driver's ``free`` plus the allocator's ``reserved - allocated``."""
    return int(free) + max(int(reserved) - int(allocated), 0)


def plan(usable: int, per_input: float, fixed: int, batch_size: int) -> MemoryPlan:
    """The plan for draws of at most ``batch_size`` inputs (see the module docstring)."""
    budget = HEADROOM * usable - fixed
    if per_input <= 0 or per_input * batch_size <= budget:
        max_inputs = None
    else:
        max_inputs = max(1, int(budget // per_input))
    graphs = max_inputs is None and per_input * batch_size + fixed <= GRAPH_SHARE * usable
    return MemoryPlan(max_inputs, graphs, int(usable), float(per_input), int(fixed))


def device_usable_bytes(device: torch.device) -> int:
    """``usable_bytes`` of a CUDA ``device`` now."""
    free, _ = torch.cuda.mem_get_info(device)
    return usable_bytes(free, torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device))


def measure_bytes_per_input(run_draw: Callable[[int], None], device: torch.device) -> float:
    """Slope of the peak allocation of ``run_draw(n)`` (a draw of ``n`` inputs) between n = 2 and 4."""
    peaks = []
    for n in (2, 4):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run_draw(n)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - before)
    return max(peaks[1] - peaks[0], 0) / 2
