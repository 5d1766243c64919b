"""How many CPUs this process may use: its affinity mask, bounded by a cgroup CPU quota.

`os.cpu_count()` counts the machine's CPUs, not the ones a container or `taskset` grants;
llama.cpp with more threads than that spins threads that wait for a CPU at every barrier.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max ..."


def quota_cpus(cpu_max: str) -> int | None:
    """CPUs granted by a cgroup v2 `cpu.max` line, or None when there is no quota."""
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    quota, period = int(parts[0]), int(parts[1])
    return max(1, math.ceil(quota / period)) if period > 0 else None


def available_cpus() -> int:
    """The CPUs this process may run on (affinity), fewer if a cgroup quota says so."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota = quota_cpus(CGROUP_CPU_MAX.read_text())
    except (OSError, ValueError):
        quota = None
    return min(cpus, quota) if quota is not None else cpus
