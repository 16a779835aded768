"""Compiled stand-ins for MLX's fast RMSNorm, RoPE and attention on its CPU device.

On the CPU, MLX's fast rms_norm, rope and scaled_dot_product_attention are not kernels: they
fall back to compositions of small operations. Every MLX operation costs a few microseconds of
scheduling however small it is: in a SmolLM2 decode step (30 layers: two norms and two rotations
each) the norms and rotations were about 1,100 of the step's 4,000 operations. Compiled, each is
one or two fused kernels; SmolLM2 then decodes 15-20% faster (raw loop, 2-core x86). Rotations
are bit-identical to MLX's; norms agree to within float32 rounding.

Attention's cost on the CPU is its softmax: MLX's exp takes about 13 ns per element, and a
prompt's scores grow with the context, so the time to first token of a long chat's later turns
grew with its history (60 new tokens after 386 cached: +110 ms of softmax). `attention` is the
same computation with an exp from a polynomial (within 1.2e-7 of MLX's, 3.7x faster; the softmax
2.3x): that prefill went from 361 to 310 ms.
"""

from __future__ import annotations

import math
import sys
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten
from mlx_lm.models.activations import swiglu as _mlx_swiglu

from mlxserve import blas
from mlxserve.engine import sampling


@partial(mx.compile, shapeless=True)
def _rms_norm(x: mx.array, weight: mx.array, eps: mx.array) -> mx.array:
    return weight * (x * mx.rsqrt(mx.mean(mx.square(x), axis=-1, keepdims=True) + eps))


class FusedRMSNorm(nn.RMSNorm):
    def __call__(self, x: mx.array) -> mx.array:
        if x.dtype != mx.float32:  # the CPU path keeps float32; anything else goes MLX's own way
            return super().__call__(x)
        return _rms_norm(x, self.weight, self._eps)

    @classmethod
    def like(cls, norm: nn.RMSNorm) -> FusedRMSNorm:
        fused = cls(norm.weight.shape[0], norm.eps)
        fused.weight = norm.weight
        fused._eps = mx.array(norm.eps, dtype=mx.float32)  # "_": not a parameter
        return fused


def _rotate(x: mx.array, positions: mx.array, inv_freq: mx.array, scale: mx.array, traditional: bool) -> mx.array:
    """x (batch, heads, 1, head_dim) rotated by `positions` (one per batch row, or one for all)."""
    dims = inv_freq.shape[0] * 2
    theta = (positions.astype(mx.float32).reshape(-1, 1, 1, 1) * scale) * inv_freq
    cos, sin = mx.cos(theta), mx.sin(theta)
    head = x[..., :dims]
    if traditional:  # pairs (x0, x1), (x2, x3), ...
        pairs = head.reshape(*x.shape[:-1], dims // 2, 2)
        first, second = pairs[..., 0], pairs[..., 1]
        rotated = mx.stack([first * cos - second * sin, first * sin + second * cos], axis=-1)
        rotated = rotated.reshape(*x.shape[:-1], dims)
    else:  # halves (x0 .. x_{d/2-1}), (x_{d/2} ..)
        first, second = head[..., : dims // 2], head[..., dims // 2:]
        rotated = mx.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)
    return rotated if dims == x.shape[-1] else mx.concatenate([rotated, x[..., dims:]], axis=-1)


_ROTATE = {traditional: mx.compile(partial(_rotate, traditional=traditional)) for traditional in (False, True)}


class FusedRoPE(nn.RoPE):
    """Single-token steps (decoding) compiled; longer inputs (prefill) as MLX does them."""

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        if x.shape[-2] != 1 or x.dtype != mx.float32:
            return super().__call__(x, offset)
        positions = offset if isinstance(offset, mx.array) else mx.array(offset, dtype=mx.float32)
        return _ROTATE[self.traditional](x, positions, self._inv_freq, self._scale)

    @classmethod
    def like(cls, rope: nn.RoPE) -> FusedRoPE:
        fused = cls(rope.dims, rope.traditional, rope.base, rope.scale)
        # base^(-2i/dims), computed as MLX's rope computes it, so that the angles are the same floats
        half = rope.dims // 2
        fused._inv_freq = mx.exp(-mx.arange(half, dtype=mx.float32) * (math.log(rope.base) / half))
        fused._scale = mx.array(rope.scale, dtype=mx.float32)
        return fused


def fuse(model: nn.Module) -> int:
    """Swap `model`'s plain RMSNorm and RoPE layers for the fused ones, in place; how many it swapped.

    Subclasses (models' own norms and scaled rotations) compute something else and stay as they are.
    """
    swaps = [(path, FusedRMSNorm.like(m) if type(m) is nn.RMSNorm else FusedRoPE.like(m))
             for path, m in model.named_modules() if type(m) in (nn.RMSNorm, nn.RoPE)]
    model.update_modules(tree_unflatten(swaps))
    return len(swaps)


# 2^f on [-0.5, 0.5], least squares in relative error: within 8e-8.
_EXP2 = (1.0000000710651666, 0.6931469490692175, 0.24022121576227307, 0.055507426754066516,
         0.009675469395438596, 0.0013266979925282809)
_LOG2E = 1.4426950408889634
# 1.5 * 2^23: adding it leaves no fraction bits in a float32 of magnitude below 2^22, so the sum is rounded
# to an integer and subtracting it back is exact. mx.round is an operation MLX's CPU compiler does not fuse:
# it split the polynomial into five kernels and took half the exp's time.
_ROUNDING = 12582912.0


def _pow2_parts(t: mx.array) -> tuple[mx.array, mx.array]:
    """2^t as 2^n * 2^f for t in [-126, 126]: 2^f by polynomial, and the bits of the float 2^n (below
    2^-125 the result is 0: subnormal factors make products about 9x slower on x86).

    (A bit cast cannot be compiled shapeless, so the caller makes the floats.)"""
    n = (t + _ROUNDING) - _ROUNDING  # round to nearest even, as mx.round, but fusable with the rest
    f = t - n
    p = _EXP2[-1] * f + _EXP2[-2]
    for c in reversed(_EXP2[:-2]):
        p = p * f + c
    return p, mx.where(n > -126, mx.left_shift(n.astype(mx.int32) + 127, 23), 0)


@partial(mx.compile, shapeless=True)
def _exp_parts(scores: mx.array) -> tuple[mx.array, mx.array]:
    """e^(scores - row max), in the parts of _pow2_parts (masked scores are all far below 2^-125)."""
    return _pow2_parts(mx.maximum((scores - mx.max(scores, axis=-1, keepdims=True)) * _LOG2E, -126.0))


# The polynomial takes three operations to MLX's exp's one: it pays from about 1,024 elements (in a
# chain of 30 calls: 1,024 elements 45 vs 47 us, 1,536 46 vs 54, 12,288 105 vs 326; 512 72 vs 30).
FAST_EXP_ELEMENTS = 1024


@partial(mx.compile, shapeless=True)
def _nonpositive_exp_parts(x: mx.array) -> tuple[mx.array, mx.array]:
    return _pow2_parts(mx.maximum(x * _LOG2E, -126.0))


def _exp_nonpositive(x: mx.array) -> mx.array:
    """e^x for x <= 0 (below e^-87, 0), from the polynomial: MLX's exp takes about 25 ns per element on
    the CPU, 1.3 ms for a row of SmolLM2's 49,152 logits."""
    p, bits = _nonpositive_exp_parts(x)
    return p * mx.view(bits, mx.float32)


_mlx_logsumexp = mx.logsumexp


def logsumexp(a: mx.array, axis: int | list[int] | None = None, keepdims: bool = False, *,
              stream: mx.Stream | mx.Device | None = None) -> mx.array:
    """`mx.logsumexp`, with the polynomial exp along the last axis of float32 rows of FAST_EXP_ELEMENTS
    or more (vocabularies: mlx-lm normalises every decode step's logits with it, 3x faster so).

    Within 2e-7 of MLX's; a row of -inf alone gives -inf, as MLX's. Every step is per row (MLX's row
    sums included), so a row's result does not depend on the rows beside it. Anything else goes to
    MLX's.
    """
    if (stream is not None or a.dtype != mx.float32 or a.ndim == 0 or axis not in (-1, a.ndim - 1)
            or a.shape[-1] < FAST_EXP_ELEMENTS):
        return _mlx_logsumexp(a, axis=axis, keepdims=keepdims, stream=stream)
    top = mx.max(a, axis=-1, keepdims=True)
    shift = mx.where(top == -math.inf, 0.0, top)
    out = shift + mx.log(mx.sum(_exp_nonpositive(a - shift), axis=-1, keepdims=True))
    return out if keepdims else mx.squeeze(out, -1)


def install_logsumexp() -> None:
    """Make `logsumexp` the process's `mx.logsumexp` (mlx-lm's batch generator calls it there); only for a
    process that computes on the CPU."""
    mx.logsumexp = logsumexp


_mlx_categorical = mx.random.categorical
_mlx_draw = sampling.draw
_UNIFORM_BITS = 26  # per half of a 52-bit uniform: MLX's randint draws int32s, and float64 holds 52 bits


def _uniform(rows: int, key: mx.array | None) -> mx.array:
    """A float64 point on [0, 1) per row, 52 random bits each, from `key`: (rows, 1)."""
    halves = mx.random.randint(0, 1 << _UNIFORM_BITS, (rows, 2), key=key).astype(mx.float64)
    return (halves[:, :1] * 2.0**_UNIFORM_BITS + halves[:, 1:]) * 2.0 ** (-2 * _UNIFORM_BITS)


def categorical(logits: mx.array, axis: int = -1, shape: list[int] | None = None, num_samples: int | None = None,
                key: mx.array | None = None, stream: mx.Stream | mx.Device | None = None) -> mx.array:
    """`mx.random.categorical` by inverse transform for float32 rows of FAST_EXP_ELEMENTS or more (vocabularies):
    the first token whose running sum of e^logit passes a uniform point below the row's total.

    MLX's draws a Gumbel variate per token, a random number and two logarithms each: 1.2-1.7 ms for one
    row of SmolLM2's 49,152 tokens on a CPU, and a seeded request samples its row alone. This takes one
    polynomial exp per token, a running sum in float64 (its rounding moves no token's share by more than
    about 1e-11 of a row of 49,152) and two random integers per row: about half the time (8 rows of
    49,152 drawn one at a time, as seeded requests draw: 9.4 -> 4.2-6.1 ms). A row's draw depends on its
    logits and its key alone, never on the rows beside it. Anything else goes to MLX's.
    """
    if (axis not in (-1, logits.ndim - 1) or shape is not None or num_samples is not None or stream is not None
            or logits.dtype != mx.float32 or logits.ndim != 2 or logits.shape[-1] < FAST_EXP_ELEMENTS):
        return _mlx_categorical(logits, axis=axis, shape=shape, num_samples=num_samples, key=key, stream=stream)
    p, bits = _exp_parts(logits)
    cumulative = mx.cumsum((p * mx.view(bits, mx.float32)).astype(mx.float64), axis=-1)
    total = cumulative[:, -1:]
    point = mx.minimum(_uniform(logits.shape[0], key) * total, total * (1 - 2.0**-52))  # strictly below the total, however it rounds
    return mx.argmax(cumulative > point, axis=-1).astype(mx.uint32)  # the first past it has a weight above 0


def draw(logprobs: mx.array, temperature: float, key: mx.array) -> mx.array:
    """`sampling.draw` in C (`mlxserve_draw` in the gemv shim), for float32 rows of FAST_EXP_ELEMENTS or more:
    the same inverse transform as `categorical`, at the row's temperature, from a uniform point drawn
    with `key` as `categorical` draws it.

    A seeded request draws its row alone, and through MLX a draw is about a dozen operations over the
    whole row (the temperature, the exp, the float64 running sum, the search) at several nanoseconds per
    element each: with eight seeded requests, 20% of a SmolLM2 decode step. In C it is one pass for the
    exp and two for the sums. It waits for the row's logits (the step that makes them runs first), where
    MLX's operations would queue behind them. Anything else goes to `sampling.draw`'s MLX way.
    """
    if logprobs.dtype != mx.float32 or logprobs.ndim != 2 or logprobs.shape[-1] < FAST_EXP_ELEMENTS:
        return _mlx_draw(logprobs, temperature, key)
    uniform = _uniform(logprobs.shape[0], key)
    mx.eval(logprobs, uniform)
    return mx.array(blas.draw(np.ascontiguousarray(np.asarray(logprobs)), np.array(uniform)[:, 0], 1.0 / temperature))


def install_draw() -> None:
    """Make `draw` the one seeded and unseeded samplers call (`sampling.draw`); only where the gemv shim is
    loaded (a process on the CPU path)."""
    if blas.gemv_shim is not None:
        sampling.draw = draw


def install_categorical() -> None:
    """Make `categorical` the process's `mx.random.categorical` (our samplers call it there); only for a
    process that computes on the CPU: the float64 sum has no GPU kernel."""
    mx.random.categorical = categorical


@partial(mx.compile, shapeless=True)
def _normalize(p: mx.array, powers: mx.array) -> mx.array:
    e = p * powers
    return e / mx.sum(e, axis=-1, keepdims=True)


def _softmax(scores: mx.array) -> mx.array:
    if scores.shape[-1] == 1:  # MLX's shapeless compile corrupts memory reducing a length-1 axis
        return mx.softmax(scores, axis=-1, precise=True)
    p, bits = _exp_parts(scores)
    return _normalize(p, mx.view(bits, mx.float32))


def _grouped(mask: mx.array, kv_heads: int, repeats: int) -> mx.array:
    """A mask that broadcasts to (B, heads, L, S) made to broadcast to (B, kv_heads, repeats, L, S)."""
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if mask.shape[1] == 1:
        return mx.expand_dims(mask, 2)
    return mask.reshape(mask.shape[0], kv_heads, repeats, *mask.shape[2:])


_mlx_attention = mx.fast.scaled_dot_product_attention


def attention(queries: mx.array, keys: mx.array, values: mx.array, *, scale: float,
              mask: None | str | mx.array = None, sinks: mx.array | None = None, force_fused: bool = False,
              stream: mx.Stream | mx.Device | None = None) -> mx.array:
    """`mx.fast.scaled_dot_product_attention`, with the fast softmax for float32 on the default stream.

    Anything else (attention sinks, other dtypes, a stream, a forced fused kernel) goes to MLX's.
    """
    if (sinks is not None or force_fused or stream is not None or (isinstance(mask, str) and mask != "causal")
            or any(a.dtype != mx.float32 for a in (queries, keys, values))):
        return _mlx_attention(queries, keys, values, scale=scale, mask=mask, sinks=sinks, force_fused=force_fused,
                              stream=stream)
    batch, heads, length, dims = queries.shape
    kv_heads, keys_length = keys.shape[1], keys.shape[2]
    repeats = heads // kv_heads
    q = (queries * scale).reshape(batch, kv_heads, repeats, length, dims)
    scores = q @ mx.expand_dims(keys, 2).swapaxes(-1, -2)  # (B, kv_heads, repeats, L, S)
    if isinstance(mask, str):  # causal, lower-right aligned: the last query sees every key
        mask = mx.arange(keys_length - length, keys_length)[:, None] >= mx.arange(keys_length)[None]
    if mask is not None:
        mask = _grouped(mask, kv_heads, repeats)
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(mx.float32).min)
        else:
            scores = scores + mask
    out = _softmax(scores) @ mx.expand_dims(values, 2)
    return out.reshape(batch, heads, length, -1)


# SwiGLU's sigmoid is an exp per element of the MLP's widest activation: in a prompt, MLX's exp
# (13 ns per element) was 7% of the CPU time, all of it on the one thread that runs MLX's
# elementwise operations. The same polynomial as the softmax's makes it about 3.7x faster, and a
# SmolLM2 decode step about 5%. Which exp a row gets depends on its width alone (FAST_EXP_ELEMENTS),
# never on how many rows are batched with it: the two differ in the last bits, and a row alone and in a
# batch must come out the same.


@partial(mx.compile, shapeless=True)
def _exp_neg_parts(gate: mx.array) -> tuple[mx.array, mx.array]:
    return _pow2_parts(mx.clip(gate * -_LOG2E, -126.0, 126.0))


@partial(mx.compile, shapeless=True)
def _swiglu_from(gate: mx.array, x: mx.array, p: mx.array, powers: mx.array) -> mx.array:
    return gate / (1.0 + p * powers) * x


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """mlx-lm's `swiglu` (silu(gate) * x), with e^-gate from the polynomial for large float32 inputs."""
    if gate.shape[-1] < FAST_EXP_ELEMENTS or gate.dtype != mx.float32 or x.dtype != mx.float32:
        return _mlx_swiglu(gate, x)
    p, bits = _exp_neg_parts(gate)
    return _swiglu_from(gate, x, p, mx.view(bits, mx.float32))


def install_swiglu() -> None:
    """Make `swiglu` the one every loaded mlx-lm model module calls (each imported it by name)."""
    for name, module in list(sys.modules.items()):
        if name.startswith("mlx_lm.models.") and getattr(module, "swiglu", None) is _mlx_swiglu:
            module.swiglu = swiglu


def install_attention() -> None:
    """Make `attention` the process's `mx.fast.scaled_dot_product_attention` (mlx-lm, mlx-vlm and
    our encoders call it there); only for a process that computes on the CPU."""
    mx.fast.scaled_dot_product_attention = attention
