"""The memory plan of a scorer: how many inputs fit in one pass, and whether a draw fits a CUDA graph.

Made once per scorer from two numbers:

* ``usable``: the memory this process can still use. On a GPU ``free + (reserved - allocated)``: the
  driver's free bytes (``torch.cuda.mem_get_info``) plus what PyTorch's caching allocator holds
  but does not use (it hands those blocks out again before asking the driver). Counting only the
  free bytes would make every call after earlier GPU work in the process (a previous prune, a
  training step) micro-batch for no reason. On the CPU (``host_usable_bytes``) the kernel's
  ``MemAvailable`` (free memory plus the page cache it can drop: what other processes leave), or
  less where a cgroup memory limit leaves less room (v2 ``memory.max``, v1
  ``memory.limit_in_bytes``, in the process's cgroup and its ancestors).
* ``per_input``: the bytes one more input adds to a draw (both branches, forward and backward),
  measured once as a slope between draws of 2 and 4 inputs, so the weights and their gradients,
  which do not grow with the inputs, drop out. On a GPU the slope of the peak allocation. On the
  CPU, whose allocator keeps no statistics (and whose peak RSS, ``ru_maxrss``, only grows), the
  slope of the bytes the draw's autograd graph holds for the backward (distinct storages saved,
  counted by ``torch.autograd.graph.saved_tensors_hooks``), which is exactly linear in the inputs,
  times ``HOST_OVERHEAD`` for the backward's gradients and the allocator's slack. Checked against
  the peak RSS of whole ResNet-50 draws at 224x224 (2-core CPU): saved bytes 79 MiB an input,
  peak RSS 80-85 MiB an input between 16, 32 and 48 inputs.

Rules (``plan``): the whole draw fits one pass when ``per_input * batch_size`` fits in
``HEADROOM`` of ``usable`` minus the weight buffers (``fixed``), else ``max_inputs`` is the most
inputs that do (at least 1). CUDA graphs (``ntksap_fast.engine.graphs``), which keep one draw's
activations allocated for the scorer's life, fit only when whole draws fit in ``GRAPH_SHARE`` of
the usable memory. The scorer's settings are decided from this plan in
``ntksap_fast.engine.plan.resolve``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "MemoryPlan",
    "plan",
    "usable_bytes",
    "device_usable_bytes",
    "host_usable_bytes",
    "measure_bytes_per_input",
    "HEADROOM",
    "GRAPH_SHARE",
    "HOST_OVERHEAD",
]

#: Share of the usable memory one draw may take.
HEADROOM = 0.7
#: Share of the usable memory below which a draw is captured in a CUDA graph.
GRAPH_SHARE = 0.25
#: Peak host bytes per input over the autograd-saved bytes per input (measured 1.01-1.07 on ResNet-50).
HOST_OVERHEAD = 1.15


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


def device_usable_bytes(device: torch.device) -> int | None:
    """``usable_bytes`` of a CUDA ``device`` now; ``host_usable_bytes()`` for the CPU."""
    if device.type == "cpu":
        return host_usable_bytes()
    free, _ = torch.cuda.mem_get_info(device)
    return usable_bytes(free, torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device))


def _read_int(path: Path) -> int | None:
    """The integer in ``path`` (a /proc or cgroup file), None when absent, unreadable or ``max``."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stat_field(path: Path, key: str) -> int:
    """``key``'s value in a cgroup ``memory.stat`` file (0 when absent)."""
    try:
        return next((int(v) for k, v in (line.split() for line in path.read_text().splitlines()) if k == key), 0)
    except (OSError, ValueError):
        return 0


def _cgroup_room(proc: Path, cgroup_root: Path) -> int | None:
    """Bytes left under the tightest cgroup memory limit on this process (None: no limit found).

    Room = limit - (usage - inactive file cache): the kernel drops inactive page cache before it
    kills. Checks the process's cgroup (``/proc/self/cgroup``) and its ancestors, v2 and v1.
    """
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: "0::/path"
            mount, files = cgroup_root, ("memory.max", "memory.current", "memory.stat", "inactive_file")
        elif "memory" in controllers.split(","):  # v1: "4:memory:/path"
            mount, files = (
                cgroup_root / "memory",
                ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat", "total_inactive_file"),
            )
        else:
            continue
        folder = mount / path.strip("/")
        for current in (folder, *folder.parents):
            limit, usage = _read_int(current / files[0]), _read_int(current / files[1])
            if limit is not None and usage is not None and limit < 2**60:  # v1 writes "no limit" as ~2**63
                rooms.append(limit - usage + _stat_field(current / files[2], files[3]))
            if current == mount:
                break
    return max(min(rooms), 0) if rooms else None


def host_usable_bytes(
    proc: str | os.PathLike = "/proc", cgroup_root: str | os.PathLike = "/sys/fs/cgroup"
) -> int | None:
    """Host memory this process can still allocate: ``MemAvailable`` of ``/proc/meminfo``, or the room
    under a cgroup memory limit where that is less; None where neither can be read (not Linux)."""
    available = None
    try:
        for line in (Path(proc) / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    room = _cgroup_room(Path(proc), Path(cgroup_root))
    found = [b for b in (available, room) if b is not None]
    return min(found) if found else None


def _saved_bytes(run_draw: Callable[[int], None], n: int) -> int:
    """Bytes of the distinct storages autograd saves for the backward during ``run_draw(n)`` (its forwards:
    the backward need not run)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_draw(n)
    return sum(storages.values())


def measure_bytes_per_input(run_draw: Callable[[int], None], device: torch.device) -> float:
    """Bytes one more input adds to ``run_draw(n)`` (a draw of ``n`` inputs), from draws of 2 and 4 inputs:
    on a GPU the slope of the peak allocation, on the CPU ``HOST_OVERHEAD`` times the slope of the
    autograd-saved bytes."""
    if device.type == "cpu":
        two, four = (_saved_bytes(run_draw, n) for n in (2, 4))
        return HOST_OVERHEAD * max(four - two, 0) / 2
    peaks = []
    for n in (2, 4):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run_draw(n)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - before)
    return max(peaks[1] - peaks[0], 0) / 2
