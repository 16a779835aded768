"""How many CPUs this process may really use: its affinity mask and its cgroup's CPU quota.

A container (docker --cpus, a systemd CPUQuota) or `taskset` gives a process fewer CPUs than the
host has; threads sized by the host's core count then fight over the few they get. This module
must not import MLX (blas.py sizes OpenBLAS with it before MLX loads).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def _quota(cgroup: Path) -> float | None:
    """CPUs' worth of time the cgroup allows (v2 cpu.max, or v1 cfs quota/period); None without a limit."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus(cgroup: Path = CGROUP) -> int:
    """CPUs this process may run on (affinity), no more than its cgroup's quota (rounded up); at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS has no affinity masks
        count = os.cpu_count() or 1
    quota = _quota(cgroup)
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)
