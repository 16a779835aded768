"""Server settings: one dataclass that command-line flags and environment variables fill in."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

GB = 1024**3
DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"


def physical_memory() -> int:
    """Bytes of RAM (unified memory on Apple silicon)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_max_memory() -> int:
    """Three quarters of physical memory: room for the OS, apps and the KV caches of requests."""
    return int(physical_memory() * 0.75)


def default_prompt_cache_bytes() -> int:
    """Room for the KV caches of recent prompts, per loaded model: 1/16 of memory, at most 4 GB."""
    return min(physical_memory() // 16, 4 * GB)


def parse_bytes(text: str) -> int:
    """'8GB', '512MB', '1.5G', '1073741824' -> bytes (binary units)."""
    units = {"": 1, "K": 1024, "M": 1024**2, "G": GB, "T": 1024**4}
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1] if value and value[-1] in units else ""
    number = float(value[: len(value) - len(unit)])
    if number < 0:
        raise ValueError(f"must not be negative: {text}")
    return int(number * units[unit])


def human_bytes(n: int) -> str:
    """Bytes for people: '1.25 GB', '350 MB', '12 KB'."""
    if n >= GB:
        return f"{n / GB:.2f} GB"
    return f"{n / 1024**2:.0f} MB" if n >= 1024**2 else f"{n / 1024:.0f} KB"


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
    max_memory: int = field(default_factory=default_max_memory)  # budget for loaded models
    default_ttl: float = 3600.0  # seconds a model may stay loaded while idle
    prompt_cache_bytes: int = field(default_factory=default_prompt_cache_bytes)  # per model; 0 turns it off
    max_concurrent: int = 32  # sequences generated at once per model (the batch)
    max_queue: int = 64  # requests that may wait beyond that; more get a 503 with Retry-After
    stall_seconds: float = 60.0  # /health turns unhealthy when the engine loop is stuck this long
    allowed_models: frozenset[str] | None = None  # None: any model in the model directory
    max_body_bytes: int = 64 * 1024 * 1024
    max_image_bytes: int = 20 * 1024 * 1024
    remote_images: bool = True  # fetch http(s) image URLs
    image_folder: Path | None = None  # file:// image URLs must lie inside it; None refuses them
    log_level: str = "info"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"
