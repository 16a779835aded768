"""BERT (and MiniLM, which is a BERT) in MLX, with Hugging Face parameter names so safetensors load as they are."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxserve.engine.cpu import exact_gelu


class _Embeddings(nn.Module):
    def __init__(self, c: dict[str, Any]):
        super().__init__()
        self.word_embeddings = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.position_embeddings = nn.Embedding(c["max_position_embeddings"], c["hidden_size"])
        self.token_type_embeddings = nn.Embedding(c.get("type_vocab_size", 2), c["hidden_size"])
        self.LayerNorm = nn.LayerNorm(c["hidden_size"], eps=c.get("layer_norm_eps", 1e-12))

    def __call__(self, input_ids: mx.array) -> mx.array:
        positions = mx.arange(input_ids.shape[1])[None, :]
        h = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        h = h + self.token_type_embeddings(mx.zeros_like(input_ids))
        return self.LayerNorm(h)


class _SelfAttention(nn.Module):
    def __init__(self, c: dict[str, Any]):
        super().__init__()
        d = c["hidden_size"]
        self.heads = c["num_attention_heads"]
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        b, n, d = x.shape
        split = lambda t: t.reshape(b, n, self.heads, -1).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=(d // self.heads) ** -0.5, mask=mask)
        return out.transpose(0, 2, 1, 3).reshape(b, n, d)


class _DenseNorm(nn.Module):
    """BERT's "output" blocks: dense, then LayerNorm over the residual sum."""

    def __init__(self, c: dict[str, Any], d_in: int):
        super().__init__()
        self.dense = nn.Linear(d_in, c["hidden_size"])
        self.LayerNorm = nn.LayerNorm(c["hidden_size"], eps=c.get("layer_norm_eps", 1e-12))

    def __call__(self, x: mx.array, residual: mx.array) -> mx.array:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, c: dict[str, Any]):
        super().__init__()
        setattr(self, "self", _SelfAttention(c))  # HF's parameter path is attention.self.*
        self.output = _DenseNorm(c, c["hidden_size"])

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        return self.output(self["self"](x, mask), x)


class _Intermediate(nn.Module):
    def __init__(self, c: dict[str, Any]):
        super().__init__()
        self.dense = nn.Linear(c["hidden_size"], c["intermediate_size"])
        act = c.get("hidden_act", "gelu")
        if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
            raise ValueError(f"BERT activation {act!r} is not supported")
        self._act = {"gelu": exact_gelu, "relu": nn.relu}.get(act, nn.gelu_approx)

    def __call__(self, x: mx.array) -> mx.array:
        return self._act(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, c: dict[str, Any]):
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _DenseNorm(c, c["intermediate_size"])

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        h = self.attention(x, mask)
        return self.output(self.intermediate(h), h)


class _Encoder(nn.Module):
    def __init__(self, c: dict[str, Any]):
        super().__init__()
        self.layer = [_Layer(c) for _ in range(c["num_hidden_layers"])]


class Model(nn.Module):
    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop what inference does not use (pooler head, position-id buffer) and a `bert.` prefix."""
        out = {}
        for name, value in weights.items():
            name = name.removeprefix("bert.")
            if name.startswith(("pooler.", "cls.")) or name.endswith("position_ids"):
                continue
            out[name] = value
        return out

    def __call__(self, input_ids: mx.array, attention_mask: mx.array) -> mx.array:
        """Last hidden states (batch, tokens, hidden); padding positions are masked out of attention."""
        h = self.embeddings(input_ids)
        dtype = h.dtype
        mask = mx.where(attention_mask[:, None, None, :].astype(mx.bool_), 0.0, -1e9).astype(dtype)
        for layer in self.encoder.layer:
            h = layer(h, mask)
        return h
