"""How a text model's batch is made and fed, the same way on every rank of a distributed server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

from mlxserve.engine import wired
from mlxserve.engine.cpu_decode import decoding
from mlxserve.engine.kinds.text import TextModel

PREFILL_STEP = 512


def new_generator(model: TextModel, max_sequences: int, stream: mx.Stream | None = None) -> BatchGenerator:
    """A model's batch generator, on a stream of its own unless given one (every rank of a distributed
    server makes its own the same way, on the stream of its collectives)."""
    generator = BatchGenerator(
        decoding(model.model),
        stop_tokens=[[t] for t in sorted(model.stop_token_ids)],
        prefill_step_size=PREFILL_STEP,
        completion_batch_size=max_sequences,
        prefill_batch_size=min(8, max_sequences),
        stream=stream or mx.new_stream(mx.default_device()),
    )
    wired.adopt(generator)
    return generator


def cached_prefix(prompt_cache: LRUPromptCache | None, key: str, tokens: list[int]) -> tuple[list | None, list[int]]:
    """A copy of the KV cache of the longest cached prefix of `tokens` under `key`, and the tokens left
    to prefill."""
    if prompt_cache is None:
        return None, tokens
    cache, rest = prompt_cache.fetch_nearest_cache(key, tokens)
    if cache is not None and not rest:
        # The whole prompt is cached: recompute its last token, whose logits start the answer.
        if not can_trim_prompt_cache(cache):
            return None, tokens
        trim_prompt_cache(cache, 1)
        rest = tokens[-1:]
    return cache, rest


def prompt_logits(model: Any, tokens: list[int]) -> Iterator[mx.array]:
    """The logits after each prompt token but the last, a prefill-sized chunk at a time."""
    cache = make_prompt_cache(model)
    for start in range(0, len(tokens) - 1, PREFILL_STEP):
        chunk = tokens[start : min(start + PREFILL_STEP, len(tokens) - 1)]
        yield model(mx.array(chunk)[None], cache=cache)[0].astype(mx.float32)
