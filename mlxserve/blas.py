"""Put an optimized BLAS under MLX's CPU backend on Linux.

MLX's Linux CPU wheel calls `cblas_sgemm` and friends from a slow reference
BLAS. Opening OpenBLAS with RTLD_GLOBAL *before* `mlx.core` is imported makes
the dynamic linker resolve those symbols to OpenBLAS instead, which makes
float32 matrix products about 10-20x faster on x86 (see scripts/bench.py).

Ahead of OpenBLAS goes a small shim (gemv_shim.c, compiled once with the system C
compiler into the user's cache) whose cblas_sgemm takes over every product by a weight
registered with `register_quantized`, computing it from the quantized bytes, and the one- and
two-row products by other matrices (through sgemv, faster there than OpenBLAS's sgemm).
Without a C compiler there is no shim, and engine/cpu.py keeps quantized layers MLX's own.
This module must not import MLX; `cli.main` calls it first thing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlxserve.cpus import usable_cpus

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
why_not: str = "OpenBLAS is not loaded yet"  # why there is no OpenBLAS, or no shim in front of it
_shim: ctypes.CDLL | None = None
_FLAGS = ["-O3", "-shared", "-fPIC"]
_NATIVE = ["-march=native"]  # the shim is built on the machine it runs on (shim_key has its CPU flags)


@dataclass(frozen=True)
class Compiler:
    path: str
    version: str  # its `--version` banner: a compiler upgrade builds the shim again


def _compiler() -> Compiler | None:
    found = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if found is None:
        return None
    try:
        banner = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return Compiler(os.path.realpath(shutil.which(found) or found), banner.split("\n", 1)[0])


def _cpu_flags() -> str:
    """The CPU's feature flags (x86's /proc/cpuinfo): a cache in a home shared by other machines differs."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def shim_key(source: bytes, compiler: Compiler, cpu_flags: str) -> str:
    """What the compiled shim depends on: its source, the compiler, the flags and the CPU it ran on."""
    flags = " ".join(_FLAGS + _NATIVE).encode()
    parts = [source, compiler.path.encode(), compiler.version.encode(), flags, cpu_flags.encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _build_shim() -> Path | str:
    """The shim, compiled once per source, compiler and CPU into ~/.cache/mlxserve; else why not."""
    source = Path(__file__).with_name("gemv_shim.c")
    compiler = _compiler()
    if compiler is None:
        return "no C compiler for the gemv shim (install gcc)"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlxserve"
    target = cache / f"gemv-shim-{shim_key(source.read_bytes(), compiler, _cpu_flags())}.so"
    if target.exists():
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            built = Path(tmp) / target.name
            command = [compiler.path, *_FLAGS, str(source), "-o", str(built), "-ldl", "-lpthread", "-lm"]
            try:
                subprocess.run(command[:1] + _NATIVE + command[1:], check=True, capture_output=True, timeout=120)
            except subprocess.CalledProcessError:  # a compiler without -march=native: portable code
                subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
            built.rename(target)
    except subprocess.CalledProcessError as e:
        errors = [line for line in e.stderr.splitlines() if "error" in line]
        return f"the gemv shim did not compile with {compiler.path}: {(errors or ['no message'])[0]}"
    except (OSError, subprocess.SubprocessError) as e:
        return f"the gemv shim could not be built: {e}"
    return target


def preload_openblas() -> str | None:
    """Open OpenBLAS globally (with the gemv shim in front) if this is Linux, MLX is not imported
    yet, and one is installed.

    Returns the library's path, or None. `MLXSERVE_BLAS=off` turns it off; `MLXSERVE_BLAS=/path`
    names the library; `MLXSERVE_BLAS_SHIM=off` leaves the shim out.
    """
    global loaded, gemv_shim, _shim, why_not
    choice = os.environ.get("MLXSERVE_BLAS", "auto")
    if loaded:
        return loaded
    if choice == "off":
        why_not = "MLXSERVE_BLAS=off"
        return None
    if not sys.platform.startswith("linux"):
        why_not = "not Linux: MLX brings its own BLAS (Accelerate) on macOS"
        return None
    if "mlx.core" in sys.modules:
        why_not = "MLX was imported before OpenBLAS could go under it"
        return None
    found = ctypes.util.find_library("openblas")
    candidates = [choice] if choice != "auto" else [*_CANDIDATES, *([found] if found else [])]
    cpus = usable_cpus()
    # OpenBLAS reads these once, when it first loads (the trial load below included).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(cpus))
    # OpenBLAS's idle threads spin calling sched_yield for 2^28 cycles after each product by
    # default: between the attention products of a step one kept half of a two-core machine busy
    # and took it from MLX's and the shim's threads. 2^4: they sleep at once.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    for path in candidates:
        if not path or not (Path(path).exists() or "/" not in path):
            continue
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)  # loads at all? (then it is made global below)
        except OSError:
            continue
        # The shim goes first, so that MLX binds to its cblas_sgemm rather than OpenBLAS's.
        wanted = os.environ.get("MLXSERVE_BLAS_SHIM", "on") != "off"
        built = _build_shim() if wanted else "MLXSERVE_BLAS_SHIM=off"
        shim_path = built if isinstance(built, Path) else None
        shim = ctypes.CDLL(str(shim_path), mode=ctypes.RTLD_GLOBAL) if shim_path else None
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        if shim is not None:
            if shim.mlxserve_gemv_shim_init(path.encode(), cpus) != 0:
                raise OSError(f"the gemv shim cannot find sgemm/sgemv in {path}; set MLXSERVE_BLAS_SHIM=off")
            shim.mlxserve_quantized_products.restype = ctypes.c_long
            shim.mlxserve_attention_products.restype = ctypes.c_long
            shim.mlxserve_quantized_bytes.restype = ctypes.c_long
            shim.mlxserve_decode_steps.restype = ctypes.c_long
            gemv_shim, _shim = shim_path, shim
        why_not = "" if isinstance(built, Path) else built
        loaded = path
        return loaded
    why_not = "no OpenBLAS found (install libopenblas0-pthread, or name it in MLXSERVE_BLAS)"
    return None


def address(array: Any) -> int:
    """Where a C-contiguous buffer's data starts (numpy reads MLX arrays in place)."""
    view = np.asarray(array)
    if not view.flags.c_contiguous:
        raise ValueError("not a contiguous buffer")
    return view.ctypes.data


_MADV_DONTNEED = 4  # Linux's value on every architecture MLX runs on


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def release_pages(array: Any) -> None:
    """Hand the kernel back the whole pages of a buffer nothing will read (a placeholder): it stays
    allocated, reads as zeros if ever read, and holds no memory."""
    view = np.asarray(array)
    start, end = view.ctypes.data, view.ctypes.data + view.nbytes
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first and _libc().madvise(first, last - first, _MADV_DONTNEED) != 0:
        raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED) failed on a placeholder's pages")


def register_quantized(dense: Any, q: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int,
                       bits: int) -> bool:
    """Have the shim compute every product by the float32 matrix `dense` from quantized bytes.

    `q` (uint8, `bits` per element, 4-bit pairs low nibble first), `scales` and `biases` (float32, one
    per group of `group_size` along a row) are the weights; `dense` only stands for them (its contents
    are never read). The caller keeps `dense` and the three arrays alive until
    `unregister_quantized(dense)`. False when there is no shim or it cannot take this shape.
    """
    if _shim is None:
        return False
    n, k = np.asarray(dense).shape
    status = _shim.mlxserve_register_quantized(
        ctypes.c_void_p(address(dense)), n, k, group_size, bits, ctypes.c_void_p(address(q)),
        ctypes.c_void_p(address(scales)), ctypes.c_void_p(address(biases)))
    return status == 0


def unregister_quantized(dense: Any) -> None:
    if _shim is not None:
        _shim.mlxserve_unregister_quantized(ctypes.c_void_p(address(dense)))


def quantized_products() -> int:
    """How many products the shim has computed from quantized bytes in this process."""
    return 0 if _shim is None else _shim.mlxserve_quantized_products()


def quantized_bytes() -> int:
    """Bytes of the shim's own copies of registered weights (memory MLX does not count)."""
    return 0 if _shim is None else _shim.mlxserve_quantized_bytes()


def attention_products() -> int:
    """How many attention-shaped products (a side of at most 256) the shim has computed in this process."""
    return 0 if _shim is None else _shim.mlxserve_attention_products()


def helper_threads() -> int:
    """The shim's helper threads for quantized products (besides MLX's own CPU thread); 0 without a shim."""
    return 0 if _shim is None else _shim.mlxserve_helper_threads()


class DecodeLayer(ctypes.Structure):
    """One layer of a decode step in C (gemv_shim.c): its products' placeholders (registry keys) in the
    order q, k, v, o, gate, up, down, their biases (or None), its two norms' weights."""

    _fields_ = [("product", ctypes.c_void_p * 7), ("bias", ctypes.c_void_p * 7), ("norm", ctypes.c_void_p * 2)]


class DecodeModel(ctypes.Structure):
    """A llama-shaped model's decode step in C (gemv_shim.c): its sizes, rotation and layers."""

    _fields_ = [("layers", ctypes.c_int), ("dim", ctypes.c_int), ("heads", ctypes.c_int), ("kv_heads", ctypes.c_int),
                ("head_dim", ctypes.c_int), ("hidden", ctypes.c_int), ("rope_dims", ctypes.c_int),
                ("rope_traditional", ctypes.c_int), ("eps", ctypes.c_float), ("rope_scale", ctypes.c_float),
                ("attention_scale", ctypes.c_float), ("inv_freq", ctypes.c_void_p),
                ("layer", ctypes.POINTER(DecodeLayer))]


def decode_step(model: DecodeModel, hidden: np.ndarray, positions: np.ndarray, first: np.ndarray, slot: int,
                capacity: int, keys: list[int], values: list[int]) -> int:
    """Run a decode step's layers in C over `hidden` (rows x dim float32, in place): 0 when done, 1 when a
    weight is not registered as `model` says, 2 when out of memory. `keys`/`values` are the addresses of
    each layer's cache arrays, (rows, kv_heads, capacity, head_dim) float32, written at `slot`."""
    if _shim is None:
        raise RuntimeError("no gemv shim: a native decode step cannot run")
    pointers = ctypes.c_void_p * len(keys)
    return _shim.mlxserve_decode_step(
        ctypes.byref(model), hidden.shape[0], ctypes.c_void_p(hidden.ctypes.data),
        ctypes.c_void_p(positions.ctypes.data), ctypes.c_void_p(first.ctypes.data), slot, capacity,
        pointers(*keys), pointers(*values))


def draw(logits: np.ndarray, uniform: np.ndarray, scale: float) -> np.ndarray:
    """One categorical draw per row of `logits` (rows x vocab float32, C-contiguous) at its `uniform`
    point (float64 in [0, 1)): the first token whose running sum of e^((logit - max) * scale) passes
    that share of the row's total."""
    if _shim is None:
        raise RuntimeError("no gemv shim: cannot draw in C")
    rows, vocab = logits.shape
    out = np.empty(rows, dtype=np.uint32)
    uniform = np.ascontiguousarray(uniform, dtype=np.float64)
    if _shim.mlxserve_draw(ctypes.c_void_p(logits.ctypes.data), rows, vocab, ctypes.c_float(scale),
                           ctypes.c_void_p(uniform.ctypes.data), ctypes.c_void_p(out.ctypes.data)) != 0:
        raise MemoryError("out of memory for a draw's weights")
    return out


def decode_steps() -> int:
    """How many decode steps the shim has run whole (engine/cpu_decode.py) in this process."""
    return 0 if _shim is None else _shim.mlxserve_decode_steps()


def registered() -> int:
    """How many weights are registered with the shim now."""
    return 0 if _shim is None else _shim.mlxserve_registered()
