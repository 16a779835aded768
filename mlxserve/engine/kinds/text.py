"""Text-generation models: mlx-lm model code and tokenizer, plus what serving needs from their config."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.nn as nn
from jinja2 import TemplateError
from mlx_lm import load as mlx_lm_load
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlxserve.protocol import ChatMessage, InvalidRequestError


@dataclass
class TextModel:
    name: str
    model: nn.Module
    tokenizer: TokenizerWrapper
    context_length: int
    stop_token_ids: frozenset[int]
    default_temperature: float

    def render_chat(self, messages: tuple[ChatMessage, ...]) -> str:
        """The exact prompt text the model sees: its chat template applied, generation prompt added."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(
                f"The model '{self.name}' has no chat template; use /v1/completions with a raw prompt",
                param="messages",
            )
        turns = [
            {"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})}
            for m in messages
        ]
        try:
            return self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        except TemplateError as exc:
            raise InvalidRequestError(
                f"The model's chat template rejected these messages: {exc}", param="messages"
            ) from exc

    def encode_chat(self, messages: tuple[ChatMessage, ...]) -> list[int]:
        # The rendered template already holds any BOS it wants; adding special
        # tokens again would double it.
        return self.tokenizer.encode(self.render_chat(messages), add_special_tokens=False)

    def encode_prompt(self, prompt: str | tuple[int, ...]) -> list[int]:
        if isinstance(prompt, tuple):
            vocab = len(self.tokenizer)
            if any(t < 0 or t >= vocab for t in prompt):
                raise InvalidRequestError(
                    f"prompt token ids must be in [0, {vocab})", param="prompt"
                )
            return list(prompt)
        return self.tokenizer.encode(prompt, add_special_tokens=True)


def _generation_config(path: Path) -> dict[str, Any]:
    file = path / "generation_config.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def load_text_model(name: str, path: Path) -> TextModel:
    """Load weights and tokenizer; runs on the engine thread (it evaluates MLX arrays)."""
    model, tokenizer, config = mlx_lm_load(str(path), return_config=True)
    generation = _generation_config(path)
    stop_ids = set(tokenizer.eos_token_ids)
    eos = generation.get("eos_token_id")
    stop_ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    context = config.get("max_position_embeddings") or getattr(tokenizer, "model_max_length", 4096)
    return TextModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        context_length=int(context),
        stop_token_ids=frozenset(stop_ids),
        default_temperature=float(generation.get("temperature", 1.0)),
    )
