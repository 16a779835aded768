"""Compiled stand-ins for `nn.RMSNorm` and `nn.RoPE` on MLX's CPU device.

On the CPU, MLX's fast rms_norm and rope are not kernels: they fall back to about ten small
operations each, and every MLX operation costs a few microseconds of scheduling however small
it is. In a SmolLM2 decode step (30 layers: two norms and two rotations each) that was about
1,100 of the step's 4,000 operations. Compiled, each is one or two fused kernels; SmolLM2
then decodes 15-20% faster (raw loop, 2-core x86). Rotations are bit-identical to MLX's;
norms agree to within float32 rounding.
"""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten


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
