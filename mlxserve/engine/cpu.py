"""Linux/x86 CPU fast path: float32 everywhere, and dense float32 weights for small models.

On MLX's CPU device, float16 arithmetic is emulated and slow, and quantized
matmuls run on one core; dense float32 matmuls go through BLAS and use every
core. Measured on SmolLM2-135M (2-core x86, OpenBLAS, raw decode loop): 4-bit
10 tok/s, dense float32 13.4 tok/s; with matrix-vector products for decode steps 23.4 tok/s
(through the gemv shim, mlxserve/blas.py) or 18.7 tok/s (through numpy, below).

MLX computes a one-token decode step's `x @ W.T` with BLAS's sgemm, and OpenBLAS's sgemm
with one or two rows streams the weights at about a quarter of the speed of its sgemv
(SmolLM2's 49152x576 output layer: 12 ms against 2.9 ms). When the shim is not there (no C
compiler), dense layers hand one- and two-row inputs to numpy, whose `W @ x` is a gemv on
BLAS, reading MLX's weights in place; that forces an evaluation per layer, hence the gap.
On Apple silicon and CUDA nothing here runs: quantized weights stay on the GPU.
"""

from __future__ import annotations

import logging

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map, tree_unflatten

from mlxserve import blas

log = logging.getLogger("mlxserve.engine")

# Dequantize only when the dense float32 model stays this small: past it, memory
# bandwidth and size favour keeping the quantized weights.
MAX_DENSE_BYTES = 4 * 1024**3


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


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
    return dense


def _gemv(module: nn.Module) -> nn.Module:
    """The same layer, same arrays, with gemv decode steps."""
    gemv = GemvEmbedding(*module.weight.shape) if isinstance(module, nn.Embedding) else \
        GemvLinear(module.weight.shape[1], module.weight.shape[0], bias="bias" in module)
    gemv.update(module.parameters())
    return gemv


def optimize_for_cpu(model: nn.Module) -> None:
    """Make `model` fast on the CPU device, in place; does nothing on a GPU."""
    if not on_cpu():
        return
    if 0 < _dense_bytes(model) <= MAX_DENSE_BYTES:
        replacements = [(path, _dense(m)) for path, m in model.named_modules()
                        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
        model.update_modules(tree_unflatten(replacements))
        log.info("CPU: dequantized %d layers to float32", len(replacements))
    model.update(tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a,
                          model.parameters()))
    model.update_modules(tree_unflatten([(path, _gemv(m)) for path, m in model.named_modules()
                                         if type(m) in (nn.Linear, nn.Embedding)]))
    mx.eval(model.parameters())


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
