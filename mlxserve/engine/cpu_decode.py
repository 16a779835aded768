"""Decode steps of llama-shaped models in one C call, on the CPU path with the gemv shim.

Through MLX, a decode step of SmolLM2-135M is about 2,700 operations (projections, reshapes, the
rotation, the cache's update, attention, the MLP: ~90 per layer), and each costs MLX a few
microseconds of scheduling however small it is: more than half of the step. `DecodingModel` runs
the layers of a step (inputs of one token per row, a batch cache) as one call into the shim
(`mlxserve_decode_step` in gemv_shim.c): the same products from the same copies of the weights, and
the norms, rotation, attention and SwiGLU as loops over each row. The embedding lookup, the last
norm and the output layer stay MLX's. Every row is computed alone, from its own keys, so a seeded
request samples the same tokens alone or in a batch. Prompts (several tokens a row), other
architectures and other caches go through the model as before.

The new keys and values are written into MLX's cache arrays in place: `_own` first gives each
layer's cache a buffer no other array shares (a copy after any change it did not make itself: growth,
a batch's filter or extension), so the write changes nothing another array can see.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import llama, qwen2
from mlx_lm.models.cache import BatchKVCache

from mlxserve import blas
from mlxserve.engine.cpu import ShimLinear, shim_ready
from mlxserve.engine.cpu_fused import FusedRMSNorm, FusedRoPE

# Architectures whose decoder layers are exactly: norm, q/k/v (biases optional), rotation, attention,
# o, residual, norm, SwiGLU MLP, residual.
_MODELS = (llama.Model, qwen2.Model)
_PRODUCTS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
             ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


@dataclass
class _Owned:
    """The arrays a layer's cache held after our last step, where their data lie, and its next slot: ours to
    write while unchanged."""

    keys: mx.array
    values: mx.array
    addresses: tuple[int, int]
    next_slot: int


@dataclass
class NativeDecoder:
    """A model's description for `mlxserve_decode_step`, and what keeps the memory it points into alive."""

    spec: blas.DecodeModel
    arrays: list[mx.array] = field(default_factory=list)  # what `spec` points into: kept alive here
    layers: Any = None  # the ctypes array of DecodeLayer `spec` points into


def _supported(model: nn.Module) -> bool:
    if type(model) not in _MODELS or not shim_ready():
        return False
    inner = model.model
    if getattr(inner, "pipeline_size", 1) != 1 or type(inner.norm) is not FusedRMSNorm:
        return False
    for layer in inner.layers:
        attention = layer.self_attn
        if getattr(layer, "use_sliding", False) or type(attention.rope) is not FusedRoPE:
            return False
        if any(type(getattr(getattr(layer, part), name)) is not ShimLinear for part, name in _PRODUCTS):
            return False
        if any(type(norm) is not FusedRMSNorm for norm in (layer.input_layernorm, layer.post_attention_layernorm)):
            return False
    return True


def native_decoder(model: nn.Module) -> NativeDecoder | None:
    """`model`'s decode step in C, or None when it is not a llama-shaped model fully on the shim."""
    if not _supported(model):
        return None
    inner = model.model
    first = inner.layers[0]
    attention, rope = first.self_attn, first.self_attn.rope
    decoder = NativeDecoder(blas.DecodeModel())
    layers = (blas.DecodeLayer * len(inner.layers))()
    for i, layer in enumerate(inner.layers):
        for j, (part, name) in enumerate(_PRODUCTS):
            linear = getattr(getattr(layer, part), name)
            layers[i].product[j] = blas.address(linear._placeholder)
            if "bias" in linear:
                decoder.arrays.append(linear.bias)
                layers[i].bias[j] = blas.address(linear.bias)
        for j, norm in enumerate((layer.input_layernorm, layer.post_attention_layernorm)):
            decoder.arrays.append(norm.weight)
            layers[i].norm[j] = blas.address(norm.weight)
    decoder.arrays.append(rope._inv_freq)
    spec = decoder.spec
    spec.layers, spec.dim = len(inner.layers), first.input_layernorm.weight.shape[0]
    spec.heads, spec.kv_heads = attention.n_heads, attention.n_kv_heads
    spec.head_dim = getattr(attention, "head_dim", spec.dim // attention.n_heads)
    spec.hidden = first.mlp.gate_proj._placeholder.shape[0]
    spec.rope_dims, spec.rope_traditional = rope.dims, int(rope.traditional)
    spec.eps, spec.rope_scale, spec.attention_scale = first.input_layernorm.eps, rope.scale, attention.scale
    spec.inv_freq = blas.address(rope._inv_freq)
    spec.layer = layers
    decoder.layers = layers
    return decoder


def _own(cache: BatchKVCache) -> tuple[int, int]:
    """Make `cache` ready for an in-place write at its next slot: room for it, and buffers only it holds;
    where its keys' and values' data lie.

    A new buffer is made one layer at a time (evaluated here), so that a batch's copy holds one layer's
    old and new arrays at once, not the whole cache's twice."""
    owned: _Owned | None = getattr(cache, "_native", None)
    if cache._idx + 1 > cache.keys.shape[2]:  # grow as mlx-lm does, by whole steps: new buffers, only ours
        room = [(*a.shape[:2], cache.step, a.shape[3]) for a in (cache.keys, cache.values)]
        cache.keys = mx.concatenate([cache.keys[..., : cache._idx, :], mx.zeros(room[0], cache.keys.dtype)], axis=2)
        cache.values = mx.concatenate([cache.values[..., : cache._idx, :], mx.zeros(room[1], cache.values.dtype)],
                                      axis=2)
    elif owned is None or owned.keys is not cache.keys or owned.values is not cache.values \
            or owned.next_slot != cache._idx:  # changed by something else: it may share its buffers
        cache.keys, cache.values = cache.keys + 0.0, cache.values + 0.0  # fresh buffers (or donated ones)
    else:
        return owned.addresses
    cache._native = None
    mx.eval(cache.keys, cache.values)
    return blas.address(cache.keys), blas.address(cache.values)


class DecodingModel:
    """A text model as the batch generator calls it: decode steps in C where `native_decoder` allows."""

    def __init__(self, model: nn.Module, decoder: NativeDecoder) -> None:
        self._model, self._decoder = model, decoder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __call__(self, inputs: mx.array, cache: list | None = None, **kwargs: Any) -> mx.array:
        if (kwargs or cache is None or inputs.ndim != 2 or inputs.shape[1] != 1
                or any(type(c) is not BatchKVCache or c.keys is None or c.keys.dtype != mx.float32 for c in cache)):
            return self._model(inputs, cache=cache, **kwargs)
        return self._step(inputs, cache)

    def _step(self, inputs: mx.array, cache: list[BatchKVCache]) -> mx.array:
        model = self._model
        hidden = model.model.embed_tokens(inputs)[:, 0, :].astype(mx.float32)
        keys, values = (list(a) for a in zip(*(_own(c) for c in cache)))
        head = cache[0]
        mx.eval(hidden, head.offset, head.left_padding)
        rows, slot, capacity = hidden.shape[0], head._idx, head.keys.shape[2]
        if any(c._idx != slot or c.keys.shape[2] != capacity for c in cache):
            raise RuntimeError("a batch's layer caches disagree on their slot; cannot decode natively")
        state = np.array(hidden, dtype=np.float32)
        positions = np.array(head.offset, dtype=np.int32)
        first = np.array(head.left_padding, dtype=np.int32)
        status = blas.decode_step(self._decoder.spec, state, positions, first, slot, capacity, keys, values)
        if status:
            raise RuntimeError(f"the native decode step failed (status {status})")
        for c, k, v in zip(cache, keys, values):
            c.offset = mx.array(positions + 1)
            c._idx = slot + 1
            c._native = _Owned(c.keys, c.values, (k, v), slot + 1)
        out = model.model.norm(mx.array(state)[:, None, :])
        if model.args.tie_word_embeddings:
            return model.model.embed_tokens.as_linear(out)
        return model.lm_head(out)


def decoding(model: nn.Module) -> nn.Module | DecodingModel:
    """`model`, with its decode steps in C where it is a llama-shaped model on the shim."""
    decoder = native_decoder(model)
    return model if decoder is None else DecodingModel(model, decoder)
