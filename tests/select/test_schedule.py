"""ntksap_fast.select.schedule: the keep count and the density schedule against formulas written out here."""

from __future__ import annotations

import pytest

from _tiny_models import expected_keep, expected_schedule
from ntksap_fast import density_schedule, keep_count


@pytest.mark.parametrize("n", [1, 7, 160, 1000, 272474])
@pytest.mark.parametrize("d", [1.0, 0.5, 0.05, 0.8**10, 1e-9, 0.999999])
def test_keep_count_formula(n, d):
    assert keep_count(n, d) == expected_keep(n, d)
    assert 1 <= keep_count(n, d) <= n


@pytest.mark.parametrize("schedule", ["exponential", "linear"])
def test_density_schedule_formula(schedule):
    got = density_schedule(0.05, 7, schedule)
    want = expected_schedule(0.05, 7, schedule)
    assert len(got) == 7
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert got[-1] == pytest.approx(0.05, rel=1e-12)
    assert all(a > b for a, b in zip(got, got[1:]))
