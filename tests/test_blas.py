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


QUANTIZED_SCRIPT = textwrap.dedent("""
    import gc, json
    from mlxserve import blas
    blas.preload_openblas()
    import mlx.core as mx, mlx.nn as nn, numpy as np
    from mlxserve.engine.cpu import optimize_for_cpu
    results = {"cases": []}
    for bits, group in ((4, 32), (8, 32), (4, 64)):
        model = nn.Module()
        model.proj = nn.QuantizedLinear.from_linear(nn.Linear(576, 300), group_size=group, bits=bits)
        dense = np.array(mx.dequantize(model.proj.weight, model.proj.scales, model.proj.biases, group, bits),
                         dtype=np.float64)
        optimize_for_cpu(model)
        case = {"bits": bits, "group": group, "registered": blas.registered(), "errors": [], "products": []}
        for rows, transposed in ((1, False), (2, False), (2, True), (3, False)):
            x = mx.random.normal((576, rows)).T if transposed else mx.random.normal((rows, 576))
            before = blas.quantized_products()
            got = np.array(model.proj(x))
            case["products"].append(blas.quantized_products() - before)
            want = np.array(x).astype(np.float64) @ dense.T + np.array(model.proj.bias)
            case["errors"].append(float(np.abs(got - want).max() / np.abs(want).max()))
        del model
        gc.collect()
        case["registered_after"] = blas.registered()
        results["cases"].append(case)
    many = nn.Module()  # more layers than the registry's first allocation holds
    many.layers = [nn.QuantizedLinear.from_linear(nn.Linear(64, 32), group_size=32, bits=4) for _ in range(300)]
    optimize_for_cpu(many)
    x = mx.random.normal((1, 64))
    results["many"] = {"registered": blas.registered(),
                       "error": max(float(np.abs(np.array(layer(x)) - (np.array(x) @ np.array(layer.weight).T
                                                                        + np.array(layer.bias))).max())
                                    for layer in many.layers)}
    print(json.dumps(results))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("cc") is None
                    or not any(Path(p).exists() for p in blas._CANDIDATES),
                    reason="the shim is for Linux with OpenBLAS and a C compiler")
def test_decode_products_from_quantized_bytes_are_exact_until_the_model_goes(tmp_path: Path):
    """Layers dequantized from 4- and 8-bit weights multiply one or two rows from their quantized
    bytes (one product per call), the same as the float32 matrix; three rows go to BLAS; and when
    the model is collected its weights leave the registry."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", QUANTIZED_SCRIPT], capture_output=True, text=True, env=env,
                         check=True).stdout
    results = json.loads(out)
    assert results["many"]["registered"] == 300 and results["many"]["error"] < 1e-5
    for case in results["cases"]:
        assert case["registered"] == 1, case
        assert case["products"] == [1, 1, 1, 0], case
        assert max(case["errors"]) < 1e-5, case
        assert case["registered_after"] == 0, case
