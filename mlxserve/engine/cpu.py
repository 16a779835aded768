"""Linux/x86 CPU fast path: float32 everywhere, and dense float32 weights for small models.

On MLX's CPU device, float16 arithmetic is emulated and slow, and quantized
matmuls run on one core; dense float32 matmuls go through BLAS and use every
core. Measured on SmolLM2-135M (2-core x86, OpenBLAS, raw decode loop): 4-bit
10 tok/s, dense float32 13.4 tok/s; with matrix-vector products for decode steps 23.4 tok/s
(through the gemv shim, mlxserve/blas.py) or 18.7 tok/s (through numpy, below).

A decode step then reads every float32 weight once: 540 MB for SmolLM2, which at the ~22 GB/s
two cores stream here caps decoding near 40 tok/s. So dense weights that came from 4- or
8-bit ones keep those bytes too (`QuantizedSource`), registered with the shim, which computes
one- and two-row products from them: the same sums from 3-5x fewer bytes (28 -> 34 tok/s with
the compiled layers of cpu_fused.py).

MLX computes a one-token decode step's `x @ W.T` with BLAS's sgemm, and OpenBLAS's sgemm
with one or two rows streams the weights at about a quarter of the speed of its sgemv
(SmolLM2's 49152x576 output layer: 12 ms against 2.9 ms). When the shim is not there (no C
compiler), dense layers hand one- and two-row inputs to numpy, whose `W @ x` is a gemv on
BLAS, reading MLX's weights in place; that forces an evaluation per layer, hence the gap.
On Apple silicon and CUDA nothing here runs: quantized weights stay on the GPU.
"""

from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map, tree_unflatten

from mlxserve import blas
from mlxserve.engine import cpu_fused

log = logging.getLogger("mlxserve.engine")

# Dequantize only when the dense float32 model stays this small: past it, memory
# bandwidth and size favour keeping the quantized weights.
MAX_DENSE_BYTES = 4 * 1024**3


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


@dataclass(frozen=True)
class ComputePath:
    """How this process computes, for the startup log and /health."""

    device: str  # "cpu" or "gpu"
    blas: str | None  # the OpenBLAS library under MLX's CPU backend
    gemv_shim: bool  # decode products from quantized bytes (mlxserve/gemv_shim.c)
    verified: bool | None  # the self-check against numpy passed; None where there is nothing to check
    note: str  # the same in words, or why a part is missing


def _self_check() -> str | None:
    """None when MLX's float32 product through OpenBLAS, and the shim's quantized one, match numpy's."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 96), dtype=np.float32)
    b = rng.standard_normal((80, 96), dtype=np.float32)
    product = np.array(mx.array(a) @ mx.array(b).T)
    if not np.allclose(product, a.astype(np.float64) @ b.T.astype(np.float64), rtol=1e-4, atol=1e-4):
        return "MLX's float32 product through OpenBLAS differs from numpy's"
    if blas.gemv_shim is None:
        return None
    q, scales, biases = mx.quantize(mx.array(b), group_size=32, bits=4)
    dense = mx.dequantize(q, scales, biases, group_size=32, bits=4)
    mx.eval(dense)
    source = QuantizedSource.of(q, scales, biases, 32, 4)  # held until unregistered: the shim reads it
    before = blas.quantized_products()
    if not source.register(dense):
        return "the gemv shim refused a 4-bit weight"
    try:
        row = np.array(mx.array(a[:1]) @ dense.T)
    finally:
        blas.unregister_quantized(dense)
    if blas.quantized_products() == before:
        return "MLX's decode product did not reach the gemv shim"
    if not np.allclose(row, a[:1].astype(np.float64) @ np.array(dense).T, rtol=1e-4, atol=1e-4):
        return "the gemv shim's quantized product differs from numpy's"
    return None


@functools.cache
def compute_path() -> ComputePath:
    """Checked once per process: a path that fails its self-check builds no dense copies."""
    if not on_cpu():
        name = mx.device_info().get("device_name", "")
        return ComputePath("gpu", None, False, None, f"MLX on the GPU ({name}): quantized weights stay quantized")
    if blas.loaded is None:
        return ComputePath("cpu", None, False, None,
                           f"MLX's own CPU kernels, weights kept quantized ({blas.why_not})")
    failure = _self_check()
    shim = blas.gemv_shim is not None
    if failure:
        log.error("CPU self-check failed: %s; the float32 fast path is off", failure)
        return ComputePath("cpu", blas.loaded, shim, False, f"self-check failed: {failure}")
    parts = [f"OpenBLAS ({blas.loaded}) under MLX"]
    parts.append(f"gemv shim with {blas.helper_threads() + 1} threads for decode products from quantized bytes"
                 if shim else f"no gemv shim ({blas.why_not})")
    return ComputePath("cpu", blas.loaded, shim, True, "; ".join(parts) + "; self-check passed")


def dense_allowed() -> bool:
    """Dense float32 copies pay only on the CPU with a working OpenBLAS under MLX."""
    return on_cpu() and blas.loaded is not None and compute_path().verified is True


# Bytes per element of safetensors dtypes.
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
               "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def resident_bytes(tensors: dict[str, tuple[str, list[int]]], quantization: dict | None) -> int:
    """What a model will hold once loaded and made fast here, from its tensors' dtypes and shapes
    (safetensors headers), before loading it: the budget must count this, not the size on disk.

    On a GPU that is the weights as stored. On the CPU (`optimize_for_cpu`), floating-point tensors
    become float32 and, for a model small enough, quantized layers become dense float32 while
    keeping their quantized bytes (float32 scales and biases) for the shim's decode steps.
    """
    def size(name: str) -> int:
        dtype, shape = tensors[name]
        return DTYPE_BYTES.get(dtype, 4) * int(np.prod(shape, dtype=np.int64))

    if not on_cpu():
        return sum(size(name) for name in tensors)
    quantized = {name.removesuffix(".scales") for name in tensors if name.endswith(".scales")}
    dense_ok = dense_allowed()
    default_group = int((quantization or {}).get("group_size", 64))
    floats = dense = kept = 0
    for name, (dtype, shape) in tensors.items():
        layer, _, leaf = name.rpartition(".")
        if layer not in quantized:
            floats += size(name) * 4 // DTYPE_BYTES.get(dtype, 4) if dtype in ("F16", "BF16", "F32", "F64") \
                else size(name)
        elif leaf == "weight":
            override = (quantization or {}).get(layer) or (quantization or {}).get(layer.removeprefix("model."))
            group = int(override.get("group_size", default_group)) if isinstance(override, dict) else default_group
            scales_shape = tensors[layer + ".scales"][1]
            rows, cols = int(np.prod(scales_shape[:-1])), scales_shape[-1] * group
            dense += rows * cols * 4
            kept += size(name)
        else:  # scales and biases, kept as float32
            kept += int(np.prod(shape, dtype=np.int64)) * 4
    return floats + (dense + kept if dense_ok and dense <= MAX_DENSE_BYTES else kept)


def _dense_bytes(model: nn.Module) -> int:
    total = 0
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            rows = module.weight.shape[0]
            cols = module.weight.shape[1] * 32 // module.bits
            total += rows * cols * 4
    return total


# Inputs of up to this many rows go through numpy's gemv, one row at a time; from 4 rows on,
# sgemm is as fast as repeated gemv (measured on the 49152x576 layer: 2 rows 7.4 ms against
# 15.4 ms, 4 rows 14.7 against 15.4).
GEMV_MAX_ROWS = 2


def _times_transpose(x: mx.array, weight: mx.array) -> mx.array:
    """`x @ weight.T`, with few-row inputs (decode steps) as BLAS matrix-vector products."""
    rows = x.size // x.shape[-1]
    if rows > GEMV_MAX_ROWS or blas.gemv_shim is not None:  # the shim does it inside MLX's own matmul
        return x @ weight.T
    flat = np.asarray(x).reshape(rows, -1)
    matrix = np.asarray(weight)  # a view of MLX's buffer, not a copy
    return mx.array(np.stack([matrix @ row for row in flat])).reshape(*x.shape[:-1], weight.shape[0])


class GemvLinear(nn.Linear):
    """A float32 Linear layer whose decode steps run as gemv (see the module docstring)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = _times_transpose(x, self.weight)
        return y + self.bias if "bias" in self else y


class GemvEmbedding(nn.Embedding):
    """A float32 embedding whose use as the (tied) output layer runs decode steps as gemv."""

    def as_linear(self, x: mx.array) -> mx.array:
        return _times_transpose(x, self.weight)


@dataclass
class QuantizedSource:
    """The quantized weights a dense layer was made from, in numpy memory the shim reads.

    q holds `bits` per element, a row after another (4-bit: two per byte, low nibble first);
    scales and biases are float32, one per group of `group_size` along a row.
    """

    q: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    group_size: int
    bits: int

    @classmethod
    def of(cls, weight: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> QuantizedSource:
        """Copies of MLX's quantized arrays, in the layout and dtypes the shim reads."""
        return cls(q=np.array(np.asarray(weight).view(np.uint8)), scales=np.array(scales.astype(mx.float32)),
                   biases=np.array(biases.astype(mx.float32)), group_size=group_size, bits=bits)

    def register(self, dense: mx.array) -> bool:
        """Have the shim compute products by `dense` from these bytes; False when it cannot take them."""
        return blas.register_quantized(dense, self.q, self.scales, self.biases, self.group_size, self.bits)


def _quantized_source(module: nn.Module) -> QuantizedSource | None:
    """What the shim needs to compute `module`'s products from its quantized bytes, if it can."""
    if (blas.gemv_shim is None or getattr(module, "mode", "affine") != "affine" or module.bits not in (4, 8)
            or module.group_size % 32):
        return None
    return QuantizedSource.of(module.weight, module.scales, module.biases, module.group_size, module.bits)


def _dense(module: nn.Module) -> nn.Module:
    weight = mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits,
                           mode=getattr(module, "mode", "affine"))
    if isinstance(module, nn.QuantizedEmbedding):
        dense = nn.Embedding(*weight.shape)
    else:
        dense = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
        if "bias" in module:
            dense.bias = module.bias
    dense.weight = weight
    dense.quantized_source = _quantized_source(module)
    return dense


def _gemv(module: nn.Module) -> nn.Module:
    """The same layer, same arrays, with gemv decode steps."""
    gemv = GemvEmbedding(*module.weight.shape) if isinstance(module, nn.Embedding) else \
        GemvLinear(module.weight.shape[1], module.weight.shape[0], bias="bias" in module)
    gemv.update(module.parameters())
    gemv.quantized_source = getattr(module, "quantized_source", None)
    return gemv


def _unregister(weights: list[mx.array], sources: list[QuantizedSource]) -> None:
    """Holding `sources` until the weights are unregistered keeps the bytes the shim reads alive."""
    for weight in weights:
        blas.unregister_quantized(weight)


def _register_quantized(model: nn.Module) -> None:
    """Register the final float32 weights that have quantized sources with the shim.

    The registry keys on addresses: the finalizer holds every registered weight and source, so
    none can be freed (and its address reused) before the model is collected and they are
    unregistered.
    """
    weights, sources = [], []
    for _, module in model.named_modules():
        source = getattr(module, "quantized_source", None)
        if source is None:
            continue
        if source.register(module.weight):
            weights.append(module.weight)
            sources.append(source)
        else:
            module.quantized_source = None  # a shape the shim does not take: free the bytes
    if weights:
        weakref.finalize(model, _unregister, weights, sources)
        log.info("CPU: decode steps read %d layers' quantized bytes", len(weights))


def optimize_for_cpu(model: nn.Module) -> None:
    """Make `model` fast on the CPU device, in place; does nothing on a GPU."""
    if not on_cpu():
        return
    if dense_allowed() and 0 < _dense_bytes(model) <= MAX_DENSE_BYTES:
        replacements = [(path, _dense(m)) for path, m in model.named_modules()
                        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
        model.update_modules(tree_unflatten(replacements))
        log.info("CPU: dequantized %d layers to float32", len(replacements))
    model.update(tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a,
                          model.parameters()))
    model.update_modules(tree_unflatten([(path, _gemv(m)) for path, m in model.named_modules()
                                         if type(m) in (nn.Linear, nn.Embedding)]))
    mx.eval(model.parameters())
    _register_quantized(model)
    log.info("CPU: fused %d norm and rotary layers", cpu_fused.fuse(model))
    cpu_fused.install_attention()


# erf(x) = x * P(x^2) / Q(x^2) on [-4, 4] (beyond, erf is ±1 in float32): the rational
# approximation Eigen and XLA use for float32, within 6e-7 of MLX's erf. MLX's CPU
# transcendentals run about 20 ns per element, multiply-adds about 0.2 ns, so on the CPU this
# makes BERT's GELU about 9x faster (measured on a (5120, 1536) activation: 169 ms -> 19 ms).
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def _rational_erf(x: mx.array) -> mx.array:
    x = mx.clip(x, -4.0, 4.0)
    x2 = x * x
    p = mx.full(x.shape, _ERF_P[0], dtype=x.dtype)
    for c in _ERF_P[1:]:
        p = p * x2 + c
    q = mx.full(x.shape, _ERF_Q[0], dtype=x.dtype)
    for c in _ERF_Q[1:]:
        q = q * x2 + c
    return x * p / q


@mx.compile
def _gelu_rational(x: mx.array) -> mx.array:
    return 0.5 * x * (1.0 + _rational_erf(x * 0.7071067811865476))


def exact_gelu(x: mx.array) -> mx.array:
    """GELU with erf (BERT's "gelu"): a fused rational erf on the CPU, MLX's own elsewhere."""
    return _gelu_rational(x) if on_cpu() else nn.gelu(x)
