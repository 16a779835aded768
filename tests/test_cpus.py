"""Helper threads are sized by the CPUs this process may use, not by the host's core count."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlxserve.cpus import usable_cpus

HAS_AFFINITY = hasattr(os, "sched_getaffinity")


@pytest.fixture
def four_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)


def test_a_cgroup_v2_quota_caps_the_count_rounded_up(tmp_path: Path, four_cpus):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert usable_cpus(tmp_path) == 2


def test_an_unlimited_cgroup_leaves_the_affinity(tmp_path: Path, four_cpus):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) == 4


def test_a_cgroup_v1_quota_caps_the_count(tmp_path: Path, four_cpus):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(tmp_path) == 1


def test_without_a_cgroup_the_affinity_counts(tmp_path: Path, four_cpus):
    assert usable_cpus(tmp_path / "absent") == 4


@pytest.mark.skipif(not HAS_AFFINITY or len(os.sched_getaffinity(0)) < 2, reason="needs affinity and 2 CPUs")
def test_a_process_pinned_to_one_cpu_sizes_openblas_and_the_shim_to_one():
    code = textwrap.dedent("""
        import os, json
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        from mlxserve import blas
        blas.preload_openblas()
        print(json.dumps({"openblas": os.environ.get("OPENBLAS_NUM_THREADS"), "helpers": blas.helper_threads()}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    import json

    result = json.loads(out.stdout)
    assert result["openblas"] in (None, "1")  # None: no OpenBLAS on this machine
    assert result["helpers"] == 0


@pytest.mark.skipif(not HAS_AFFINITY or len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_openblas_itself_runs_the_threads_it_was_told_to():
    """OpenBLAS reads its settings once, when it loads: they must be set before the first load, or
    it sizes its pool by the host's cores (and its idle threads spin for 2^28 cycles)."""
    code = textwrap.dedent("""
        import ctypes, json
        from mlxserve import blas
        blas.usable_cpus = lambda: 1  # as a cgroup quota of one CPU would, which OpenBLAS cannot see
        path = blas.preload_openblas()
        threads = ctypes.CDLL(path).openblas_get_num_threads() if path else None
        print(json.dumps({"threads": threads}))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    import json

    assert json.loads(out.stdout)["threads"] in (None, 1)  # None: no OpenBLAS on this machine
