"""Text-generation models: mlx-lm model code and tokenizer, plus what serving needs from their config."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from jinja2 import TemplateError
from mlx_lm import load as mlx_lm_load
from mlx_lm import __version__ as mlx_lm_version
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlxserve import __version__
from mlxserve.engine.cpu import optimize_for_cpu
from mlxserve.protocol import ChatMessage, InvalidRequestError


@dataclass
class EncodedPrompt:
    """What the model receives: `text` as the log shows it (images as placeholders), and its tokens."""

    text: str
    tokens: list[int]
    embeddings: mx.array | None = None  # set for prompts with images


@dataclass
class TextModel:
    name: str
    model: nn.Module
    tokenizer: TokenizerWrapper
    context_length: int
    stop_token_ids: frozenset[int]
    default_temperature: float
    vocab_size: int
    system_fingerprint: str
    vision: Any = None  # a VisionTower (kinds/vision.py) for models that accept images

    @property
    def start_token_id(self) -> int:
        """What an empty prompt starts from: BOS, else the end-of-sequence token."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else min(self.stop_token_ids)

    def render_chat(self, messages: tuple[ChatMessage, ...]) -> str:
        """The exact prompt text the model sees: its chat template applied, generation prompt added."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(
                f"The model '{self.name}' has no chat template; use /v1/completions with a raw prompt",
                param="messages",
            )
        turns = [
            {"role": m.role, "content": m.text, **({"name": m.name} if m.name else {})}
            for m in messages
        ]
        try:
            return self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        except TemplateError as exc:
            raise InvalidRequestError(
                f"The model's chat template rejected these messages: {exc}", param="messages"
            ) from exc

    def encode_chat(self, messages: tuple[ChatMessage, ...]) -> EncodedPrompt:
        """The templated prompt, its token ids, and input embeddings when the messages hold images."""
        if self.vision is not None:  # its template expects content parts, images or not
            return self.vision.encode(messages, self.name)
        text = self.render_chat(messages)
        # The rendered template already holds any BOS it wants; adding special
        # tokens again would double it.
        return EncodedPrompt(text, self.tokenizer.encode(text, add_special_tokens=False))

    def encode_prompt(self, prompt: str | tuple[int, ...]) -> EncodedPrompt:
        if isinstance(prompt, tuple):
            vocab = len(self.tokenizer)
            if any(t < 0 or t >= vocab for t in prompt):
                raise InvalidRequestError(
                    f"prompt token ids must be in [0, {vocab})", param="prompt"
                )
            return EncodedPrompt(self.tokenizer.decode(list(prompt)), list(prompt))
        return EncodedPrompt(prompt, self.tokenizer.encode(prompt, add_special_tokens=True))


def _generation_config(path: Path) -> dict[str, Any]:
    file = path / "generation_config.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def load_text_model(name: str, path: Path) -> TextModel:
    """Load weights and tokenizer; runs on the engine thread (it evaluates MLX arrays)."""
    model, tokenizer, config = mlx_lm_load(str(path), return_config=True)
    optimize_for_cpu(model)
    return text_model_from(name, path, model, tokenizer, config)


def text_model_from(name: str, path: Path, model: nn.Module, tokenizer: TokenizerWrapper,
                    config: dict[str, Any], vision: Any = None) -> TextModel:
    """The serving record for a loaded language model and its tokenizer."""
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
        vocab_size=int(config.get("vocab_size") or len(tokenizer)),
        system_fingerprint=_fingerprint(name),
        vision=vision,
    )


def _fingerprint(name: str) -> str:
    """Changes when anything that can change outputs for a seed changes: versions, device, model."""
    identity = f"mlxserve {__version__} mlx {mx.__version__} mlx-lm {mlx_lm_version} {mx.default_device()} {name}"
    return "fp_" + hashlib.sha256(identity.encode()).hexdigest()[:12]
