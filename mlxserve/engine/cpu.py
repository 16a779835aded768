"""Linux CPU fast path: float32 arithmetic, and quantized weights multiplied by the gemv shim.

On MLX's CPU device, float16 arithmetic is emulated and slow, and quantized matmuls run on one
core, about 2% of what the machine can do. So every floating-point array becomes float32, and a
4- or 8-bit layer's products go to the shim (mlxserve/gemv_shim.c, under MLX's own sgemm through
mlxserve/blas.py), which computes them from the quantized bytes on every core, for any number of
rows: decode steps, batches and prompts alike, each row's sums in the same order whatever the
rest of the batch, so a seeded request samples the same text alone or among others.

MLX only reaches sgemm with a float32 matrix, so each such layer holds a placeholder: a float32
array of the weight's shape whose pages are handed back to the kernel once allocated. Nothing
reads it: the shim recognises it by its address and reads the quantized bytes instead, from its
own copy, made at registration in the order its kernels read (rows in panels of eight, at most
the size of MLX's arrays: scales and biases in float16 where that holds them exactly). A linear layer's own arrays are then handed back to the kernel like the
placeholder (only an embedding's, which its lookups read, are kept), so the process holds the
quantized weights, float32 scales and biases once, and no dense copy: any model whose quantized
weights fit the budget runs on this path. The shim multiplies them by integers: the input rounded
to 16 bits per block of 32, within about 3e-5 of float32's products. Measured kernels and
end-to-end rates are in scripts/bench.py and the README.

Without the shim (no OpenBLAS, no C compiler, or a failed self-check) quantized layers stay
MLX's own. On Apple silicon and CUDA nothing here runs: quantized weights stay on the GPU.
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

def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


@dataclass(frozen=True)
class ComputePath:
    """How this process computes, for the startup log and /health."""

    device: str  # "cpu" or "gpu"
    blas: str | None  # the OpenBLAS library under MLX's CPU backend
    gemv_shim: bool  # products from quantized bytes (mlxserve/gemv_shim.c)
    verified: bool | None  # the self-check against numpy passed; None where there is nothing to check
    note: str  # the same in words, or why a part is missing


def _self_check() -> str | None:
    """None when MLX's float32 product through OpenBLAS, and the shim's attention and quantized ones,
    match numpy's."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((12, 288), dtype=np.float32)  # 1 and 12 rows: the shim's two ways
    b = rng.standard_normal((272, 288), dtype=np.float32)  # wider than attention's: OpenBLAS's
    product = np.array(mx.array(a) @ mx.array(b).T)
    if not np.allclose(product, a.astype(np.float64) @ b.T.astype(np.float64), rtol=1e-4, atol=1e-4):
        return "MLX's float32 product through OpenBLAS differs from numpy's"
    if blas.gemv_shim is None:
        return None
    keys, values = b[:40, :64], b[:40, 64:128]  # attention's two products, in the shim's own kernel
    before = blas.attention_products()
    scores = np.array(mx.array(a[:, :64]) @ mx.array(keys).T)
    mixed = np.array(mx.array(scores) @ mx.array(values))
    want = a[:, :64].astype(np.float64) @ keys.T.astype(np.float64)
    if (not np.allclose(scores, want, rtol=1e-4, atol=1e-4)
            or not np.allclose(mixed, want @ values.astype(np.float64), rtol=1e-4, atol=1e-3)):
        return "the gemv shim's attention products differ from numpy's"
    if blas.attention_products() - before != 2:
        return "MLX's attention products did not reach the gemv shim"
    layer = nn.QuantizedLinear.from_linear(nn.Linear(288, 80), group_size=32, bits=4)
    dense = np.array(mx.dequantize(layer.weight, layer.scales, layer.biases, 32, 4), dtype=np.float64)
    shimmed = _shimmed(layer)
    if shimmed is None:
        return "the gemv shim refused a 4-bit weight"
    before = blas.quantized_products()
    for rows in (a[:1], a):
        got = np.array(shimmed(mx.array(rows)))
        if not np.allclose(got, rows.astype(np.float64) @ dense.T + np.array(layer.bias), rtol=1e-4, atol=1e-4):
            return "the gemv shim's quantized product differs from numpy's"
    if blas.quantized_products() - before != 2:
        return "MLX's products did not reach the gemv shim"
    return None


@functools.cache
def compute_path() -> ComputePath:
    """Checked once per process: a path that fails its self-check leaves quantized layers to MLX."""
    if not on_cpu():
        name = mx.device_info().get("device_name", "")
        return ComputePath("gpu", None, False, None, f"MLX on the GPU ({name}): quantized weights stay quantized")
    if blas.loaded is None:
        return ComputePath("cpu", None, False, None,
                           f"MLX's own CPU kernels, weights kept quantized ({blas.why_not})")
    failure = _self_check()
    shim = blas.gemv_shim is not None
    if failure:
        log.error("CPU self-check failed: %s; quantized layers stay MLX's own", failure)
        return ComputePath("cpu", blas.loaded, shim, False, f"self-check failed: {failure}")
    parts = [f"OpenBLAS ({blas.loaded}) under MLX"]
    parts.append(f"gemv shim with {blas.helper_threads() + 1} threads for products from quantized bytes"
                 if shim else f"no gemv shim ({blas.why_not}): quantized layers use MLX's one-core kernels")
    return ComputePath("cpu", blas.loaded, shim, True, "; ".join(parts) + "; self-check passed")


def shim_ready() -> bool:
    """Quantized layers go to the shim only on the CPU, with the shim loaded and its self-check passed."""
    return on_cpu() and blas.gemv_shim is not None and compute_path().verified is True


# Bytes per element of safetensors dtypes.
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
               "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def resident_bytes(tensors: dict[str, tuple[str, list[int]]]) -> int:
    """What a model will hold once loaded and made fast here, from its tensors' dtypes and shapes
    (safetensors headers), before loading it: the budget must count this, not the size on disk.

    On a GPU that is the weights as stored. On the CPU (`optimize_for_cpu`) floating-point tensors
    become float32 (a quantized layer's scales and biases too) and quantized weights stay as they are.
    """
    def size(name: str) -> int:
        dtype, shape = tensors[name]
        return DTYPE_BYTES.get(dtype, 4) * int(np.prod(shape, dtype=np.int64))

    if not on_cpu():
        return sum(size(name) for name in tensors)
    return sum(size(name) * 4 // DTYPE_BYTES[dtype] if dtype in ("F16", "BF16", "F32", "F64") else size(name)
               for name, (dtype, _) in tensors.items())


# What the shim can take: plain quantized layers, and the sharded ones of a distributed server.
QUANTIZED_LAYERS = (nn.QuantizedLinear, nn.QuantizedEmbedding, nn.QuantizedAllToShardedLinear,
                    nn.QuantizedShardedToAllLinear)


class ShimLinear(nn.QuantizedLinear):
    """A quantized linear layer whose products the gemv shim computes from its bytes (module docstring)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = x @ self._transposed
        return y + self.bias if "bias" in self else y


class ShimShardedToAllLinear(ShimLinear):
    """A distributed server's row-sharded layer (mlx-lm's tensor parallel): this rank's part of the
    product by the shim, summed over the ranks, as MLX's QuantizedShardedToAllLinear does."""

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.distributed.all_sum(x @ self._transposed, group=self._group)
        return y + self.bias if "bias" in self else y


class ShimEmbedding(nn.QuantizedEmbedding):
    """A quantized embedding: lookups as MLX does them, its use as the tied output layer by the shim."""

    def as_linear(self, x: mx.array) -> mx.array:
        return x @ self._transposed


_placeholders = 0  # bytes MLX counts as allocated for placeholders that hold no memory


def placeholder_bytes() -> int:
    """Bytes of placeholders alive in this process: MLX's active memory counts them; no page holds them."""
    return _placeholders


def _release(bytes_: int, placeholder: mx.array) -> None:
    """When the layer goes: take its placeholder out of the registry (the shim frees its copy of the weights)."""
    global _placeholders
    blas.unregister_quantized(placeholder)
    _placeholders -= bytes_


def _shimmed(module: nn.Module) -> nn.Module | None:
    """`module` (one of QUANTIZED_LAYERS) as a Shim layer over the same arrays, or None
    when the shim cannot take it (a mode other than affine, other bits, a group size not a multiple of 32)."""
    global _placeholders
    if getattr(module, "mode", "affine") != "affine" or module.bits not in (4, 8) or module.group_size % 32:
        return None
    rows, cols = module.weight.shape[0], module.weight.shape[1] * 32 // module.bits
    if isinstance(module, nn.QuantizedEmbedding):
        shimmed = ShimEmbedding(rows, cols, module.group_size, module.bits)
    elif isinstance(module, nn.QuantizedShardedToAllLinear):
        shimmed = ShimShardedToAllLinear(cols, rows, "bias" in module, module.group_size, module.bits)
        shimmed._group = module.group
    else:  # a QuantizedLinear, or a column-sharded one (nothing to exchange)
        shimmed = ShimLinear(cols, rows, "bias" in module, module.group_size, module.bits)
    shimmed.update(module.parameters())  # the random weights __init__ made lazily are never computed
    shimmed.scales, shimmed.biases = module.scales.astype(mx.float32), module.biases.astype(mx.float32)
    placeholder = mx.zeros((rows, cols), dtype=mx.float32)
    mx.eval(shimmed.parameters(), placeholder)
    q, scales, biases = (np.asarray(a) for a in (shimmed.weight, shimmed.scales, shimmed.biases))
    if not blas.register_quantized(placeholder, q.view(np.uint8), scales, biases, module.group_size, module.bits):
        return None
    blas.release_pages(placeholder)
    if not isinstance(shimmed, ShimEmbedding):  # the shim reads its own copy; an embedding's lookups read these
        for array in (q, scales, biases):
            blas.release_pages(array)
    shimmed._placeholder = placeholder  # "_": not a parameter
    # Its transpose, made once: as `placeholder.T` in every call it was one more MLX operation per
    # product, about 7% of a SmolLM2 decode step's (a view either way: MLX passes sgemm a flag).
    shimmed._transposed = placeholder.T
    mx.eval(shimmed._transposed)
    _placeholders += placeholder.nbytes
    # The registry keys on the placeholder's address: it stays alive (held here) until the layer is
    # collected and the placeholder unregistered.
    weakref.finalize(shimmed, _release, placeholder.nbytes, placeholder)
    return shimmed


def optimize_for_cpu(model: nn.Module) -> None:
    """Make `model` fast on the CPU device, in place; does nothing on a GPU."""
    if not on_cpu():
        return
    model.update(tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a,
                          model.parameters()))
    mx.eval(model.parameters())
    if shim_ready():
        swaps = [(path, _shimmed(m)) for path, m in model.named_modules()
                 if isinstance(m, QUANTIZED_LAYERS)]
        model.update_modules(tree_unflatten([(path, m) for path, m in swaps if m is not None]))
        if swaps:
            log.info("CPU: the gemv shim computes %d of %d quantized layers from their bytes",
                     sum(m is not None for _, m in swaps), len(swaps))
    log.info("CPU: fused %d norm and rotary layers", cpu_fused.fuse(model))
    cpu_fused.install_attention()
    cpu_fused.install_categorical()
    cpu_fused.install_draw()
    cpu_fused.install_logsumexp()
    cpu_fused.install_swiglu()


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
