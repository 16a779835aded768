"""The gemv shim under MLX's CPU matmul gives the same products as numpy, for every layout it reroutes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlxserve import blas

SCRIPT = textwrap.dedent("""
    import json, sys
    from mlxserve import blas
    blas.preload_openblas()
    import mlx.core as mx, numpy as np
    results = {"shim": str(blas.gemv_shim), "errors": []}
    for rows in (1, 2, 3):
        for transpose_b in (False, True):
            for transpose_a in (False, True):
                a = mx.random.normal((576, rows)).T if transpose_a else mx.random.normal((rows, 576))
                b = mx.random.normal((300, 576)) if transpose_b else mx.random.normal((576, 300))
                got = np.array(a @ (b.T if transpose_b else b))
                want = np.array(a).astype(np.float64) @ np.array(b.T if transpose_b else b).astype(np.float64)
                results["errors"].append(float(np.abs(got - want).max()))
    print(json.dumps(results))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("cc") is None
                    or not any(Path(p).exists() for p in blas._CANDIDATES),
                    reason="the shim is for Linux with OpenBLAS and a C compiler")
def test_the_shim_is_in_front_of_openblas_and_exact(tmp_path: Path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True).stdout
    results = json.loads(out)
    assert results["shim"].startswith(str(tmp_path))  # built into the user's cache
    assert max(results["errors"]) < 1e-3
