"""Decode steps in one C call (engine/cpu_decode.py) compute what the model computes through MLX."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.test_blas import SHIM_READY

# Tiny random llama- and qwen2-shaped models, quantized, on the CPU path: every decode step through the
# native path and through the model itself from the same caches, tokens forced to the same ones.
SCRIPT = textwrap.dedent("""
    import json, sys
    from mlxserve import blas
    blas.preload_openblas()
    import mlx.core as mx, mlx.nn as nn, numpy as np
    from mlx.utils import tree_map
    from mlx_lm.models import llama, qwen2
    from mlx_lm.models.cache import BatchKVCache
    from mlxserve.engine.cpu import optimize_for_cpu
    from mlxserve.engine.cpu_decode import DecodingModel, decoding

    def build(kind, bits, group, **extra):
        mx.random.seed(3)
        common = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=96, tie_word_embeddings=kind == "qwen2")
        if kind == "llama":
            model = llama.Model(llama.ModelArgs(model_type="llama", **common, **extra))
        else:
            model = qwen2.Model(qwen2.ModelArgs(model_type="qwen2", **common, **extra))
        model.update(tree_map(lambda a: a * 4 if a.ndim == 2 else a, model.parameters()))
        if bits:
            nn.quantize(model, group_size=group, bits=bits)
        optimize_for_cpu(model)
        return model

    def prefill(model, prompts):
        width = max(len(p) for p in prompts)
        cache = [BatchKVCache([width - len(p) for p in prompts]) for _ in model.layers]
        padded = mx.array([[0] * (width - len(p)) + p for p in prompts])
        mx.eval(model(padded, cache=cache))
        return cache

    def copy(cache):
        out = []
        for c in cache:
            d = BatchKVCache([0])
            d.keys, d.values = mx.array(np.array(c.keys)), mx.array(np.array(c.values))
            d.offset, d.left_padding, d._idx = c.offset, c.left_padding, c._idx
            out.append(d)
        return out

    def steps(model, cache, tokens):
        out = []
        for column in tokens.T:
            out.append(np.array(model(mx.array(column)[:, None], cache=cache)[:, -1, :]))
        return np.stack(out)

    results = {}
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14, 15]]
    tokens = np.random.default_rng(0).integers(0, 96, (3, 270))  # past one growth of the cache (256 slots)
    for name, kind, bits, group in (("llama-4", "llama", 4, 32), ("llama-8", "llama", 8, 64), ("qwen2-4", "qwen2", 4, 64)):
        model = build(kind, bits, group)
        native = decoding(model)
        base = prefill(model, prompts)
        mlx_cache, native_cache = copy(base), copy(base)
        want, got = steps(model, mlx_cache, tokens), steps(native, native_cache, tokens)
        # a finished row leaves the batch: the cache is filtered (and shifted), then decoding goes on
        for c in mlx_cache + native_cache:
            c.filter([0, 2])
        more = np.random.default_rng(1).integers(0, 96, (2, 5))
        want_after, got_after = steps(model, mlx_cache, more), steps(native, native_cache, more)
        alone = steps(native, prefill(model, prompts[1:2]), tokens[1:2, :40])
        results[name] = {
            "native": isinstance(native, DecodingModel),
            "scale": float(np.abs(want).max()),
            "error": float(np.abs(got - want).max()),
            "error_after_filter": float(np.abs(got_after - want_after).max()),
            "same_alone": bool(np.array_equal(alone[:, 0], got[:40, 1])),
            "keys_match": bool(np.allclose(np.array(mlx_cache[0].keys[..., :mlx_cache[0]._idx, :]),
                                           np.array(native_cache[0].keys[..., :native_cache[0]._idx, :]), atol=1e-4)),
        }
    before = blas.decode_steps()
    steps(decoding(build("llama", 4, 32)), prefill(build("llama", 4, 32), prompts), tokens[:, :3])
    results["counted"] = blas.decode_steps() - before
    results["unsupported"] = {
        "float": decoding(build("llama", 0, 0)).__class__.__name__,
        "scaled_rope": decoding(build("llama", 4, 32, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 64})).__class__.__name__,
    }
    print(json.dumps(results))
""")


@SHIM_READY
def test_native_decode_steps_match_the_model_through_mlx(tmp_path: Path):
    """llama (4- and 8-bit, groups of 32 and 64, GQA) and qwen2 (biased q/k/v, tied output layer):
    270 steps of three rows of different left padding, across the cache's growth, then after a row left the
    batch, give MLX's logits (within 1e-3 of the largest: products bit-identical, exp and sin/cos not),
    write the same keys, and a row's logits alone are bit-for-bit its logits in the batch. Float models and scaled
    rotations stay MLX's."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True).stdout
    results = json.loads(out)
    for name in ("llama-4", "llama-8", "qwen2-4"):
        case = results[name]
        assert case["native"], case
        # 2.5e-4 of the largest logit seen (each product's input is rounded to 16 bits, so exp's and sin's
        # last bits move it a little); a rotation one position off gave 0.8-1.5
        assert case["error"] < 1e-3 * case["scale"] and case["error_after_filter"] < 1e-3 * case["scale"], case
        assert case["same_alone"] and case["keys_match"], case
    assert results["counted"] == 3
    assert results["unsupported"] == {"float": "Model", "scaled_rope": "Model"}
