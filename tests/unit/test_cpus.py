"""The CPUs a process may use: its affinity, bounded by a cgroup v2 CPU quota."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from genstruct_service.engine import cpus


@pytest.mark.parametrize(
    "line, expected",
    [("max 100000", None), ("200000 100000", 2), ("150000 100000", 2), ("50000 100000", 1),
     ("", None), ("100000 0", None)],
)
def test_a_quota_grants_whole_cpus_rounded_up(line: str, expected: int | None) -> None:
    assert cpus.quota_cpus(line) == expected


def test_the_affinity_mask_bounds_the_count() -> None:
    assert cpus.available_cpus() <= len(os.sched_getaffinity(0))


def test_a_quota_below_the_affinity_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("100000 100000\n")
    monkeypatch.setattr(cpus, "CGROUP_CPU_MAX", cpu_max)
    assert cpus.available_cpus() == 1
    cpu_max.write_text("max 100000\n")
    assert cpus.available_cpus() == len(os.sched_getaffinity(0))
