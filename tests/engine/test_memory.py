"""ntksap_fast.engine.memory: the memory plan from fake allocator states, fake /proc and cgroup files and a
draw whose saved tensors are known (no GPU needed)."""

from __future__ import annotations

import torch

from ntksap_fast.engine import memory

GIB = 2**30


def test_memory_plan_counts_what_the_caching_allocator_holds():
    assert memory.usable_bytes(free=10 * GIB, reserved=30 * GIB, allocated=5 * GIB) == 35 * GIB
    assert memory.usable_bytes(free=10 * GIB, reserved=5 * GIB, allocated=5 * GIB) == 10 * GIB
    # After earlier GPU work the allocator holds 40 GiB unused and the driver reports 30 GiB free:
    # a 256-input draw of 0.16 GiB per input (41 GiB) fits whole; from free bytes alone it would not.
    usable = memory.usable_bytes(free=30 * GIB, reserved=42 * GIB, allocated=2 * GIB)
    assert memory.plan(usable, 0.16 * GIB, GIB, 256).max_inputs is None
    assert memory.plan(30 * GIB, 0.15 * GIB, GIB, 256).max_inputs == 133  # floor((0.7 * 30 - 1) / 0.15)
    assert memory.plan(GIB, 2 * GIB, 0, 64).max_inputs == 1  # never below one input
    assert memory.plan(GIB, 0, 0, 64).max_inputs is None  # nothing measured: whole draws
    # graphs only for draws well inside the usable memory
    assert memory.plan(80 * GIB, 0.01 * GIB, 0, 100).graphs
    assert not memory.plan(80 * GIB, 0.16 * GIB, GIB, 256).graphs
    assert not memory.plan(GIB, 2 * GIB, 0, 64).graphs


def _fake_host(tmp_path, meminfo_kib: int, cgroup_line: str, files: dict[str, str]):
    """A fake /proc (meminfo, self/cgroup) and cgroup mount holding ``files`` (path -> content)."""
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: 24683664 kB\nMemFree: 100 kB\nMemAvailable: {meminfo_kib} kB\n")
    (proc / "self" / "cgroup").write_text(cgroup_line + "\n")
    for path, content in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(content)
    return proc, root


def test_host_usable_bytes_is_mem_available_or_the_cgroup_room(tmp_path):
    mib = 2**20
    # no limit (v1 writes "none" as 2**63 rounded to pages): MemAvailable
    proc, root = _fake_host(
        tmp_path / "a",
        20 * 2**20,
        "4:memory:/job",
        {"memory/job/memory.limit_in_bytes": "9223372036854771712", "memory/job/memory.usage_in_bytes": "5000"},
    )
    assert memory.host_usable_bytes(proc, root) == 20 * GIB
    # v2: limit 4 GiB, 3 GiB used of which 1 GiB inactive page cache (dropped before a kill): 2 GiB room;
    # a parent's tighter limit (1.5 GiB, 1 GiB used) wins
    proc, root = _fake_host(
        tmp_path / "b",
        20 * 2**20,
        "0::/user/job",
        {
            "user/job/memory.max": str(4 * GIB),
            "user/job/memory.current": str(3 * GIB),
            "user/job/memory.stat": f"anon 100\ninactive_file {GIB}\nactive_file 7\n",
            "user/memory.max": "max",
            "user/memory.current": str(3 * GIB),
        },
    )
    assert memory.host_usable_bytes(proc, root) == 2 * GIB
    (root / "memory.max").write_text(str(1536 * mib))
    (root / "memory.current").write_text(str(GIB))
    assert memory.host_usable_bytes(proc, root) == 512 * mib
    # v1 below MemAvailable; a cgroup path not under the mount (a cgroup namespace): the mount's own files
    proc, root = _fake_host(
        tmp_path / "c",
        20 * 2**20,
        "9:cpu,memory:/elsewhere",
        {
            "memory/memory.limit_in_bytes": str(8 * GIB),
            "memory/memory.usage_in_bytes": str(7 * GIB),
            "memory/memory.stat": f"cache 5\ntotal_inactive_file {GIB}\n",
        },
    )
    assert memory.host_usable_bytes(proc, root) == 2 * GIB
    # MemAvailable below the room; nothing readable: None
    proc, root = _fake_host(tmp_path / "d", 2**20, "0::/", {"memory.max": str(8 * GIB), "memory.current": "0"})
    assert memory.host_usable_bytes(proc, root) == GIB
    assert memory.host_usable_bytes(tmp_path / "none", tmp_path / "none") is None


def test_cpu_bytes_per_input_count_the_storages_saved_for_the_backward():
    weight = torch.ones(10, requires_grad=True)

    def draw(n: int) -> None:
        x = torch.ones(n, 10)
        half = x[:, :5]  # a view: its storage (all of x) counts once, however often it is saved
        loss = (weight * x).sum() + (weight[:5] * half).sum() + (weight[:5] * half).sum()
        torch.autograd.grad(loss, weight)

    # mul saves both operands: the weight (does not grow) and x's storage, 10 float32 per input
    assert memory.measure_bytes_per_input(draw, torch.device("cpu")) == memory.HOST_OVERHEAD * 40
