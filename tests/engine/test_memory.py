"""ntksap_fast.engine.memory: the memory plan from fake allocator states (no GPU needed)."""
from __future__ import annotations

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
