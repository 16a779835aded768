"""The compiled norm and rotary layers compute what MLX's own do, and replace only the plain ones."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlxserve.engine.cpu_fused import FusedRMSNorm, FusedRoPE, fuse


def test_rms_norm_matches_mlx():
    norm = nn.RMSNorm(64, eps=1e-5)
    norm.weight = mx.random.normal((64,))
    x = mx.random.normal((3, 5, 64))
    assert mx.allclose(FusedRMSNorm.like(norm)(x), norm(x), atol=1e-5)


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("dims", [64, 32])
@pytest.mark.parametrize("offset", [0, 37, mx.array([3, 700])], ids=["start", "int", "per-row"])
def test_rope_matches_mlx_for_decode_steps_and_prefill(traditional: bool, dims: int, offset):
    rope = nn.RoPE(dims, traditional=traditional, base=10000.0, scale=0.5)
    fused = FusedRoPE.like(rope)
    step = mx.random.normal((2, 9, 1, 64))  # one token per row: the compiled path
    assert mx.array_equal(fused(step, offset=offset), rope(step, offset=offset))
    if not isinstance(offset, mx.array):
        prompt = mx.random.normal((2, 9, 7, 64))
        assert mx.array_equal(fused(prompt, offset=offset), rope(prompt, offset=offset))


class _Scaled(nn.RoPE):
    """Stands in for a model's own rotary variant."""


def test_fuse_swaps_only_plain_layers_and_keeps_weights():
    model = nn.Module()
    model.norm = nn.RMSNorm(8)
    model.norm.weight = mx.arange(8, dtype=mx.float32)
    model.rope = nn.RoPE(8)
    model.custom = _Scaled(8)
    assert fuse(model) == 2
    assert type(model.norm) is FusedRMSNorm and type(model.rope) is FusedRoPE and type(model.custom) is _Scaled
    assert mx.array_equal(model.norm.weight, mx.arange(8, dtype=mx.float32))
    assert [k for k, _ in tree_flatten(model.parameters())] == ["norm.weight"]  # constants are not parameters
