"""The compiled norm and rotary layers compute what MLX's own do, and replace only the plain ones."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlxserve.engine import cpu_fused
from mlxserve.engine.cpu_fused import FusedRMSNorm, FusedRoPE, fuse
from tests.test_blas import SHIM_READY


@pytest.fixture(autouse=True)
def on_the_cpu():
    """The fused layers serve the CPU path alone (engine/cpu.py), so they are compared there, on a Mac too."""
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(previous)


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


def _masks(heads: int, length: int, keys: int) -> list:
    keep = mx.random.uniform(shape=(length, keys)) > 0.3
    per_head = mx.random.uniform(shape=(2, heads, length, keys)) > 0.3
    first = mx.arange(keys) == 0  # no row without a key to attend to
    return [None, "causal", keep | first, per_head | first, mx.random.normal((2, 1, length, keys))]


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4)], ids=["grouped", "multi-head"])
@pytest.mark.parametrize("length,keys", [(1, 1), (1, 40), (7, 7), (7, 40)])
def test_attention_matches_mlx(heads: int, kv_heads: int, length: int, keys: int):
    q = mx.random.normal((2, heads, length, 64))
    k, v = mx.random.normal((2, kv_heads, keys, 64)), mx.random.normal((2, kv_heads, keys, 32))
    for mask in _masks(heads, length, keys):
        ours = cpu_fused.attention(q, k, v, scale=0.125, mask=mask)
        assert ours.shape == (2, heads, length, 32)
        assert mx.allclose(ours, cpu_fused._mlx_attention(q, k, v, scale=0.125, mask=mask), atol=1e-5), mask


def test_far_below_the_maximum_is_exactly_zero():
    """Weights below e^-86.6 of the largest are 0, never subnormal (that made the product with the
    values 9x slower)."""
    scores = mx.array([[0.0, -10.0, -90.0, -1e30, mx.finfo(mx.float32).min]])
    weights = cpu_fused._softmax(scores)
    assert weights[0, 2:].tolist() == [0.0, 0.0, 0.0]
    assert mx.allclose(weights, mx.softmax(scores, axis=-1, precise=True), atol=1e-7)


def test_installed_attention_hands_sinks_to_mlx():
    cpu_fused.install_attention()
    assert mx.fast.scaled_dot_product_attention is cpu_fused.attention
    q, k, v = mx.random.normal((1, 4, 3, 16)), mx.random.normal((1, 2, 5, 16)), mx.random.normal((1, 2, 5, 16))
    sinks = mx.random.normal((4,))
    got = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal", sinks=sinks)
    assert mx.array_equal(got, cpu_fused._mlx_attention(q, k, v, scale=0.25, mask="causal", sinks=sinks))


def test_swiglu_matches_mlx_and_picks_its_exp_by_row_width_alone():
    gate = mx.concatenate([mx.random.normal((500, 1530)) * 8,
                           mx.array([[0.0, 90.0, -90.0, 200.0, -200.0, 1e-30]] * 500)], axis=1)
    x = mx.random.normal(gate.shape)
    got, want = cpu_fused.swiglu(gate, x), cpu_fused._mlx_swiglu(gate, x)
    assert mx.allclose(got, want, rtol=1e-6, atol=1e-30)  # no inf, no NaN at the extremes either
    assert not mx.array_equal(got, want)  # the polynomial's
    assert mx.array_equal(cpu_fused.swiglu(gate[:1], x[:1]), got[:1])  # a decode step's row: the same bits
    narrow_gate, narrow_x = gate[:, :512], x[:, :512]  # rows too narrow to repay it: MLX's, however many
    assert mx.array_equal(cpu_fused.swiglu(narrow_gate, narrow_x), cpu_fused._mlx_swiglu(narrow_gate, narrow_x))


def test_logsumexp_matches_mlx_row_by_row_and_is_what_mlx_lm_calls():
    logits = mx.random.normal((5, 49152)) * 6
    logits = mx.concatenate([logits, mx.full((1, 49152), -math.inf)])  # an all -inf row: -inf, as MLX's
    logits[0, :100] = -math.inf  # masked tokens
    got, want = cpu_fused.logsumexp(logits, axis=-1, keepdims=True), cpu_fused._mlx_logsumexp(logits, axis=-1,
                                                                                               keepdims=True)
    assert mx.allclose(got, want, rtol=2e-7, atol=0) and got[-1].item() == -math.inf
    assert all(mx.array_equal(cpu_fused.logsumexp(logits[i], axis=-1), got[i, 0]) for i in range(5))  # alone or not
    assert cpu_fused.logsumexp(logits, axis=-1).shape == (6,)
    small = mx.random.normal((3, 10))  # short rows, other axes: MLX's own
    assert mx.array_equal(cpu_fused.logsumexp(small, axis=0), cpu_fused._mlx_logsumexp(small, axis=0))
    cpu_fused.install_logsumexp()
    try:
        assert importlib.import_module("mlx_lm.generate").mx.logsumexp is cpu_fused.logsumexp
    finally:
        mx.logsumexp = cpu_fused._mlx_logsumexp


def test_installed_swiglu_is_what_loaded_models_call():
    from mlx_lm.models import llama, qwen3

    cpu_fused.install_swiglu()
    assert llama.swiglu is cpu_fused.swiglu and qwen3.swiglu is cpu_fused.swiglu


def _shares(draws: mx.array, tokens: int) -> list[float]:
    return [(draws == t).astype(mx.float32).mean().item() for t in range(tokens)]


def test_categorical_draws_each_token_at_its_probability_and_never_a_masked_one():
    probabilities = [0.5, 0.3, 0.15, 0.05]
    row = mx.full((1, 1024), -math.inf)
    row[0, 500:504] = mx.log(mx.array(probabilities)) + 3.0  # unnormalised, in the middle of masked tokens
    draws = mx.concatenate([cpu_fused.categorical(mx.broadcast_to(row, (5000, 1024)), key=mx.random.key(k))
                            for k in range(4)])
    assert draws.dtype == mx.uint32
    assert mx.all((draws >= 500) & (draws < 504)).item()
    assert all(abs(got - want) < 0.015 for got, want in zip(_shares(draws - 500, 4), probabilities))
    sharp = cpu_fused.categorical(mx.broadcast_to(row / 1e-6, (200, 1024)), key=mx.random.key(9))
    assert mx.all(sharp == 500).item()  # a tiny temperature leaves the top token alone


def test_categorical_depends_on_its_key_alone_and_leaves_other_shapes_to_mlx():
    row = mx.random.normal((1, 2048), key=mx.random.key(1)) * 2
    draws = [cpu_fused.categorical(row, key=mx.random.key(k)).item() for k in range(20)]
    assert draws == [cpu_fused.categorical(row, key=mx.random.key(k)).item() for k in range(20)]
    assert len(set(draws)) > 10
    narrow = mx.random.normal((4, 100))
    key = mx.random.key(3)
    assert mx.array_equal(cpu_fused.categorical(narrow, key=key), cpu_fused._mlx_categorical(narrow, key=key))
    assert mx.array_equal(cpu_fused.categorical(row, num_samples=3, key=key),
                          cpu_fused._mlx_categorical(row, num_samples=3, key=key))


def test_installed_categorical_is_what_a_seeded_sampler_draws_with():
    from mlxserve.engine.sampling import make_sampler

    logits = mx.concatenate([mx.array([[0.0, 1.0]]), mx.full((1, 1022), -math.inf)], axis=1)
    rows = mx.broadcast_to(logits - mx.logsumexp(logits, axis=-1, keepdims=True), (20000, 1024))
    cpu_fused.install_categorical()
    try:
        draws = make_sampler(0.5, 3)(rows)
        scaled = (rows - mx.max(rows, axis=-1, keepdims=True)) / 0.5  # as the sampler scales them
        assert mx.array_equal(draws, cpu_fused.categorical(scaled, key=mx.random.split(mx.random.key(3))[1]))
    finally:
        mx.random.categorical = cpu_fused._mlx_categorical
    assert abs(_shares(draws, 2)[1] - 0.881) < 0.015  # sigmoid(1 / T)


DRAW_SCRIPT = """
import json, math
from mlxserve import blas
blas.preload_openblas()
import mlx.core as mx
from mlxserve.engine import cpu_fused, sampling
cpu_fused.install_draw()
probabilities = [0.5, 0.3, 0.15, 0.05]
row = mx.full((1, 1024), -math.inf)
row[0, 500:504] = mx.log(mx.array(probabilities))
draws = mx.concatenate([sampling.draw(mx.broadcast_to(row, (5000, 1024)), 1.0, mx.random.key(k)) for k in range(4)])
shares = [(draws == 500 + t).astype(mx.float32).mean().item() for t in range(4)]
hot = [(sampling.draw(mx.broadcast_to(row, (20000, 1024)), 2.0, mx.random.key(5)) == 500 + t)
       .astype(mx.float32).mean().item() for t in range(4)]
rows = mx.random.normal((8, 2048), key=mx.random.key(1)) * 3
import numpy as np
points = np.linspace(0.05, 0.95, 8)
batch = blas.draw(np.array(rows), points, 1.25)
alone = [blas.draw(np.array(rows[i:i + 1]), points[i:i + 1], 1.25)[0] for i in range(8)]
seeded = sampling.make_sampler(0.7, 3)(rows[:1])
print(json.dumps({
    "installed": sampling.draw is cpu_fused.draw,
    "dtype": str(draws.dtype), "in_range": mx.all((draws >= 500) & (draws < 504)).item(), "shares": shares,
    "hot": hot,
    "sharp": mx.all(sampling.draw(mx.broadcast_to(row, (200, 1024)), 1e-30, mx.random.key(9)) == 500).item(),
    "keyed": [sampling.draw(rows[:1], 0.8, mx.random.key(k)).item() for k in range(20)],
    "keyed_again": [sampling.draw(rows[:1], 0.8, mx.random.key(k)).item() for k in range(20)],
    "seeded_is_draw": seeded.item() == cpu_fused.draw(rows[:1], 0.7, mx.random.split(mx.random.key(3))[1]).item(),
    "rows_alone": [int(t) for t in batch] == [int(t) for t in alone],
    "narrow": sampling.draw(mx.array([[0.0, -50.0, -50.0]]), 1.0, mx.random.key(2)).item(),
}))
"""


@SHIM_READY
def test_the_c_draw_takes_each_token_at_its_probability_at_the_rows_temperature(tmp_path):
    """On the CPU path a sampler's draw runs in C (`mlxserve_draw`): each token at its probability at the
    temperature (never a masked one), the top token alone at a tiny temperature, the same token for the same
    key, a row's token whatever rows are drawn with it, and what a seeded sampler returns; rows too narrow
    for it go MLX's way."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    results = json.loads(subprocess.run([sys.executable, "-c", DRAW_SCRIPT], capture_output=True, text=True,
                                        env=env, check=True).stdout)
    assert results["installed"] and results["dtype"] == "mlx.core.uint32" and results["in_range"]
    assert all(abs(got - want) < 0.015 for got, want in zip(results["shares"], [0.5, 0.3, 0.15, 0.05])), results
    # at temperature 2, shares go as the square roots of the probabilities
    roots = [math.sqrt(p) for p in (0.5, 0.3, 0.15, 0.05)]
    assert all(abs(got - r / sum(roots)) < 0.015 for got, r in zip(results["hot"], roots)), results
    assert results["sharp"] and results["seeded_is_draw"] and results["rows_alone"]
    assert results["keyed"] == results["keyed_again"] and len(set(results["keyed"])) > 10
    assert results["narrow"] == 0
