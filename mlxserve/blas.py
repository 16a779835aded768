"""Put an optimized BLAS under MLX's CPU backend on Linux.

MLX's Linux CPU wheel calls `cblas_sgemm` and friends from a slow reference
BLAS. Opening OpenBLAS with RTLD_GLOBAL *before* `mlx.core` is imported makes
the dynamic linker resolve those symbols to OpenBLAS instead, which makes
float32 matrix products about 10-20x faster on x86 (see scripts/bench.py).

Ahead of OpenBLAS goes a small shim (gemv_shim.c, compiled once with the system C
compiler into the user's cache) whose cblas_sgemm sends one- and two-row products, the
decode steps, to sgemv: SmolLM2-135M decodes at 23.4 tokens/s with it, 13.4 without (2-core
x86). Without a C compiler, engine/cpu.py does the same through numpy (18.7 tokens/s).
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
            subprocess.run([compiler, "-O2", "-shared", "-fPIC", str(source), "-o", str(built), "-ldl"],
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
    global loaded, gemv_shim
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
            gemv_shim = shim_path
        loaded = path
        return loaded
    return None
