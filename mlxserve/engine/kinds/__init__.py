"""Model kinds, picked by a model's files and config rather than by if-chains across the code.

Each kind says what a model of that kind can do (its capabilities, as /v1/models reports them) and
how to load it. The first kind whose `detect` accepts a model wins; text generation is the fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxserve.engine.kinds.embed import is_embedding_model, load_embedding_model
from mlxserve.engine.kinds.text import load_text_model
from mlxserve.engine.kinds.vision import is_vision_model, load_vision_model


@dataclass(frozen=True)
class Kind:
    name: str
    capabilities: tuple[str, ...]
    detect: Callable[[Path, dict[str, Any]], bool]
    load: Callable[[str, Path], Any]


KINDS: tuple[Kind, ...] = (
    Kind("embeddings", ("embeddings",), is_embedding_model, load_embedding_model),
    Kind("vision", ("chat", "completions", "vision"), is_vision_model, load_vision_model),
    Kind("text", ("chat", "completions"), lambda path, config: True, load_text_model),
)


def kind_of(path: Path, config: dict[str, Any]) -> Kind:
    return next(k for k in KINDS if k.detect(path, config))
