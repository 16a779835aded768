"""Embedding models: an MLX encoder, the pooling and normalization its sentence-transformers config declares."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tokenizers import Tokenizer

from mlxserve.engine.kinds.encoders import ENCODERS
from mlxserve.engine.kinds.text import check_token_ids, longest_token_bytes
from mlxserve.protocol import ContextLengthExceededError

Pooling = Callable[[mx.array, mx.array], mx.array]


def _mean(hidden: mx.array, mask: mx.array) -> mx.array:
    m = mask[..., None].astype(hidden.dtype)
    return (hidden * m).sum(axis=1) / mx.maximum(m.sum(axis=1), 1e-9)


def _cls(hidden: mx.array, mask: mx.array) -> mx.array:
    return hidden[:, 0]


def _last(hidden: mx.array, mask: mx.array) -> mx.array:
    last = mask.astype(mx.int32).sum(axis=1) - 1
    return mx.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


def _max(hidden: mx.array, mask: mx.array) -> mx.array:
    return mx.where(mask[..., None].astype(mx.bool_), hidden, -1e9).max(axis=1)


# sentence-transformers' 1_Pooling/config.json flags, to pooling functions.
POOLINGS: dict[str, Pooling] = {
    "pooling_mode_mean_tokens": _mean,
    "pooling_mode_cls_token": _cls,
    "pooling_mode_lasttoken": _last,
    "pooling_mode_max_tokens": _max,
}


def is_embedding_model(path: Path, config: dict[str, Any]) -> bool:
    return config.get("model_type") in ENCODERS and (path / "modules.json").is_file()


def _json(path: Path) -> dict[str, Any] | list[Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass
class EmbeddingModel:
    name: str
    encoder: nn.Module
    tokenizer: Tokenizer
    pooling: Pooling
    normalize: bool
    max_tokens: int
    dimensions: int
    pad_id: int
    special_prefix: list[int]
    special_suffix: list[int]
    vocab_size: int
    longest_token_bytes: int

    def tokenize(self, inputs: list[str | tuple[int, ...]], param: str = "input") -> list[list[int]]:
        """Token ids with the model's special tokens; raises if one is longer than the model takes.

        Thread-safe: runs off the engine thread. Texts too long to fit are refused before tokenizing.
        """
        for i, item in enumerate(inputs):
            if isinstance(item, tuple):
                check_token_ids(item, self.vocab_size, param)
            elif len(item.encode("utf-8", "surrogatepass")) > self.max_tokens * self.longest_token_bytes:
                raise ContextLengthExceededError(
                    f"This model's maximum context length is {self.max_tokens} tokens, and input {i} is "
                    "longer than any text of that many tokens can be. Shorten it.", param=param)
        texts = [i for i in inputs if isinstance(i, str)]
        encoded = iter(self.tokenizer.encode_batch(texts)) if texts else iter(())
        out = []
        for i, item in enumerate(inputs):
            ids = next(encoded).ids if isinstance(item, str) else self.special_prefix + list(item) + self.special_suffix
            if len(ids) > self.max_tokens:
                raise ContextLengthExceededError(
                    f"This model's maximum context length is {self.max_tokens} tokens, but input "
                    f"{i} has {len(ids)} tokens. Shorten it.", param=param)
            out.append(ids)
        return out

    def embed(self, batch: list[list[int]]) -> np.ndarray:
        """One padded forward pass; returns (len(batch), dimensions) float32 vectors."""
        width = max(len(ids) for ids in batch)
        ids = mx.array([seq + [self.pad_id] * (width - len(seq)) for seq in batch])
        mask = mx.array([[1] * len(seq) + [0] * (width - len(seq)) for seq in batch])
        pooled = self.pooling(self.encoder(ids, mask), mask).astype(mx.float32)
        if self.normalize:
            pooled = pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return np.array(pooled)


def load_embedding_model(name: str, path: Path) -> EmbeddingModel:
    config = json.loads((path / "config.json").read_text())
    encoder = ENCODERS[config["model_type"]](config)
    weights = mx.load(str(path / "model.safetensors"))
    encoder.load_weights(list(encoder.sanitize(weights).items()), strict=True)
    encoder.set_dtype(mx.float32)
    mx.eval(encoder.parameters())

    pooling_config = _json(path / "1_Pooling" / "config.json") or {"pooling_mode_mean_tokens": True}
    modes = [k for k, v in pooling_config.items() if k in POOLINGS and v]
    if len(modes) != 1:
        raise ValueError(f"{name}: expected exactly one pooling mode, found {modes or 'none'}")
    modules = _json(path / "modules.json") or []
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    st_config = _json(path / "sentence_bert_config.json")
    max_tokens = int(st_config.get("max_seq_length") or config.get("max_position_embeddings", 512))

    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    # What the tokenizer wraps around text (e.g. [CLS] ... [SEP]) also wraps token-id inputs.
    empty = tokenizer.encode("").ids
    return EmbeddingModel(
        name=name,
        encoder=encoder,
        tokenizer=tokenizer,
        pooling=POOLINGS[modes[0]],
        normalize=normalize,
        max_tokens=max_tokens,
        dimensions=int(pooling_config.get("word_embedding_dimension") or config["hidden_size"]),
        pad_id=int(config.get("pad_token_id") or 0),
        special_prefix=empty[:1],
        special_suffix=empty[1:],
        vocab_size=min(int(config.get("vocab_size") or tokenizer.get_vocab_size()), tokenizer.get_vocab_size()),
        longest_token_bytes=longest_token_bytes(tokenizer),
    )
