"""Put an optimized BLAS under MLX's CPU backend on Linux.

MLX's Linux CPU wheel calls `cblas_sgemm` and friends from a slow reference
BLAS. Opening OpenBLAS with RTLD_GLOBAL *before* `mlx.core` is imported makes
the dynamic linker resolve those symbols to OpenBLAS instead, which makes
float32 matrix products about 10-20x faster on x86 (see scripts/bench.py).

Ahead of OpenBLAS goes a small shim (gemv_shim.c, compiled once with the system C
compiler into the user's cache) whose cblas_sgemm takes over one- and two-row products, the
decode steps: from the quantized bytes of weights registered with `register_quantized`,
else through sgemv. Without a C compiler, engine/cpu.py sends them to numpy's gemv.
This module must not import MLX; `cli.main` calls it first thing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

loaded: str | None = None
gemv_shim: Path | None = None  # the compiled shim, when it sits in front of OpenBLAS
_shim: ctypes.CDLL | None = None


def _build_shim() -> Path | None:
    """The shim, compiled once per source version into ~/.cache/mlxserve; None without a compiler."""
    source = Path(__file__).with_name("gemv_shim.c")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not source.exists() or compiler is None:
        return None
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlxserve"
    target = cache / f"gemv-shim-{digest}.so"
    if target.exists():
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            built = Path(tmp) / target.name
            subprocess.run([compiler, "-O2", "-shared", "-fPIC", str(source), "-o", str(built), "-ldl",
                            "-lpthread"],
                           check=True, capture_output=True, timeout=120)
            built.rename(target)
    except (OSError, subprocess.SubprocessError):
        return None
    return target


def preload_openblas() -> str | None:
    """Open OpenBLAS globally (with the gemv shim in front) if this is Linux, MLX is not imported
    yet, and one is installed.

    Returns the library's path, or None. `MLXSERVE_BLAS=off` turns it off; `MLXSERVE_BLAS=/path`
    names the library; `MLXSERVE_BLAS_SHIM=off` leaves the shim out.
    """
    global loaded, gemv_shim, _shim
    choice = os.environ.get("MLXSERVE_BLAS", "auto")
    if loaded or choice == "off" or not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return loaded
    found = ctypes.util.find_library("openblas")
    candidates = [choice] if choice != "auto" else [*_CANDIDATES, *([found] if found else [])]
    for path in candidates:
        if not path or not (Path(path).exists() or "/" not in path):
            continue
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)  # loads at all? (then it is made global below)
        except OSError:
            continue
        # The shim goes first, so that MLX binds to its cblas_sgemm rather than OpenBLAS's.
        shim_path = _build_shim() if os.environ.get("MLXSERVE_BLAS_SHIM", "on") != "off" else None
        shim = ctypes.CDLL(str(shim_path), mode=ctypes.RTLD_GLOBAL) if shim_path else None
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        if shim is not None:
            if shim.mlxserve_gemv_shim_init(path.encode()) != 0:
                raise OSError(f"the gemv shim cannot find sgemm/sgemv in {path}; set MLXSERVE_BLAS_SHIM=off")
            shim.mlxserve_quantized_products.restype = ctypes.c_long
            gemv_shim, _shim = shim_path, shim
        loaded = path
        return loaded
    return None


def _address(array: Any) -> int:
    """Where a C-contiguous buffer's data starts (numpy reads MLX arrays in place)."""
    view = np.asarray(array)
    if not view.flags.c_contiguous:
        raise ValueError("not a contiguous buffer")
    return view.ctypes.data


def register_quantized(dense: Any, q: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int,
                       bits: int) -> bool:
    """Have the shim compute decode products by the float32 matrix `dense` from its quantized bytes.

    `q` (uint8, `bits` per element, 4-bit pairs low nibble first), `scales` and `biases` (float32, one
    per group of `group_size` along a row) must be what `dense` was dequantized from. The caller keeps
    `dense` and the three arrays alive until `unregister_quantized(dense)`. False when there is no
    shim or it cannot take this shape.
    """
    if _shim is None:
        return False
    n, k = np.asarray(dense).shape
    status = _shim.mlxserve_register_quantized(
        ctypes.c_void_p(_address(dense)), n, k, group_size, bits, ctypes.c_void_p(_address(q)),
        ctypes.c_void_p(_address(scales)), ctypes.c_void_p(_address(biases)))
    return status == 0


def unregister_quantized(dense: Any) -> None:
    if _shim is not None:
        _shim.mlxserve_unregister_quantized(ctypes.c_void_p(_address(dense)))


def quantized_products() -> int:
    """How many products the shim has computed from quantized bytes in this process."""
    return 0 if _shim is None else _shim.mlxserve_quantized_products()


def registered() -> int:
    """How many weights are registered with the shim now."""
    return 0 if _shim is None else _shim.mlxserve_registered()
