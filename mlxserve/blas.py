"""Put an optimized BLAS under MLX's CPU backend on Linux.

MLX's Linux CPU wheel calls `cblas_sgemm` and friends from a slow reference
BLAS. Opening OpenBLAS with RTLD_GLOBAL *before* `mlx.core` is imported makes
the dynamic linker resolve those symbols to OpenBLAS instead, which makes
float32 matrix products about 10-20x faster on x86 (see scripts/bench.py).
This module must not import MLX; `cli.main` calls it first thing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

loaded: str | None = None


def preload_openblas() -> str | None:
    """Open OpenBLAS globally if this is Linux, MLX is not imported yet, and one is installed.

    Returns the library's path, or None. `MLXSERVE_BLAS=off` turns it off; `MLXSERVE_BLAS=/path`
    names the library.
    """
    global loaded
    choice = os.environ.get("MLXSERVE_BLAS", "auto")
    if loaded or choice == "off" or not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return loaded
    found = ctypes.util.find_library("openblas")
    candidates = [choice] if choice != "auto" else [*_CANDIDATES, *([found] if found else [])]
    for path in candidates:
        if path and (Path(path).exists() or "/" not in path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            loaded = path
            return loaded
    return None
