"""GGUF models already on disk in another app's store: LM Studio's folders, Ollama's blobs, any folder.

LM Studio keeps each download as a plain file, `~/.lmstudio/models/<publisher>/<repository>/<file>.gguf`
(earlier versions under `~/.cache/lm-studio/models`); the file name is the readable name. Ollama keeps
content-addressed blobs, `~/.ollama/models/blobs/sha256-<digest>`, and names them in manifests,
`manifests/<registry>/<namespace>/<model>/<tag>` (JSON; the layer of media type
`application/vnd.ollama.image.model` is the GGUF). Vision projectors (LM Studio's `mmproj-*` files,
Ollama's projector layers) and split files (`-00001-of-00003.gguf`) are not models on their own and
are listed as such, not offered.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

OLLAMA_MODEL = "application/vnd.ollama.image.model"
_SPLIT = re.compile(r"-\d{5}-of-\d{5}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


@dataclass(frozen=True)
class Found:
    """A GGUF model in a store: the name it would be imported under, and where its file is."""

    name: str
    path: Path
    size_bytes: int
    source: str  # "ollama" or "folder" (LM Studio's store is a folder of files)
    skipped: str | None = None  # why it cannot be imported on its own, if so


def readable_name(text: str) -> str:
    """A model id from a store's name: lower-case, anything but letters, digits and . _ + - made '-'."""
    name = _UNSAFE.sub("-", text.lower()).strip("-._")
    return (name or "model").replace("..", ".")[:128]


def _ollama_root(directory: Path) -> Path | None:
    for root in (directory, directory / "models"):
        if (root / "manifests").is_dir() and (root / "blobs").is_dir():
            return root
    return None


def _ollama(root: Path) -> list[Found]:
    found = []
    for manifest in sorted(p for p in (root / "manifests").rglob("*") if p.is_file()):
        parts = manifest.relative_to(root / "manifests").parts  # registry, namespace..., model, tag
        if len(parts) < 3:
            continue
        try:
            layers = json.loads(manifest.read_text()).get("layers", [])
        except (OSError, ValueError):
            continue
        model = next((layer for layer in layers if layer.get("mediaType") == OLLAMA_MODEL), None)
        if model is None or not str(model.get("digest", "")).startswith("sha256:"):
            continue
        blob = root / "blobs" / model["digest"].replace(":", "-")
        namespace = [] if parts[1] == "library" else list(parts[1:-2])  # library/<model>: the short name
        name = readable_name("-".join([*namespace, parts[-2], parts[-1]]))
        skipped = None if blob.is_file() else "its blob is missing"
        found.append(Found(name, blob, blob.stat().st_size if blob.is_file() else 0, "ollama", skipped))
    return found


def _folder(directory: Path) -> list[Found]:
    found = []
    for path in sorted(directory.rglob("*.gguf")):
        stem = path.name[: -len(".gguf")]
        skipped = ("a vision projector, not a model" if "mmproj" in stem.lower()
                   else "one part of a split file (join the parts with llama.cpp's gguf-split first)"
                   if _SPLIT.search(stem) else None)
        found.append(Found(readable_name(stem), path, path.stat().st_size, "folder", skipped))
    return found


def discover(directory: Path) -> list[Found]:
    """The GGUF models under `directory` (an Ollama store, or any folder such as LM Studio's), by name;
    where two would get the same name, the later ones get their folder's name in front."""
    root = _ollama_root(directory)
    found = _ollama(root) if root else _folder(directory)
    seen: dict[str, int] = {}
    named = []
    for item in found:
        name = item.name
        if name in seen and item.source == "folder":
            name = readable_name(f"{item.path.parent.name}-{name}")
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}-{seen[name]}"
        named.append(Found(name, item.path, item.size_bytes, item.source, item.skipped))
    return named
