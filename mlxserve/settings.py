"""Server settings: one dataclass that command-line flags and environment variables fill in."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"


def default_home() -> Path:
    """`$MLXSERVE_HOME`, else `~/.mlxserve`."""
    return Path(os.environ.get("MLXSERVE_HOME") or Path.home() / ".mlxserve").expanduser()


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 1234
    home: Path = field(default_factory=default_home)
    # Models loaded when the server starts; requests may name any model on disk.
    models: tuple[str, ...] = (DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL)
    max_body_bytes: int = 64 * 1024 * 1024
    max_image_bytes: int = 20 * 1024 * 1024
    remote_images: bool = True  # fetch http(s) image URLs
    image_folder: Path | None = None  # file:// image URLs must lie inside it; None refuses them
    log_level: str = "info"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"
