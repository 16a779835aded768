"""Turning image content parts (data:, http(s):, file: URLs) into checked image bytes.

Runs in the HTTP layer, before a request reaches the engine, so that every
problem with an image is a 400 naming its content part. Remote fetching has a
size limit and a timeout and can be turned off; `file://` URLs are refused
unless the server names a folder they must lie in.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mlxserve.protocol import ChatMessage, ImageError, ImagePart

FORMATS = {"PNG", "JPEG", "WEBP", "GIF"}


@dataclass(frozen=True)
class ImagePolicy:
    max_bytes: int = 20 * 1024 * 1024
    fetch_timeout: float = 10.0
    allow_remote: bool = True
    file_folder: Path | None = None  # file:// URLs must resolve inside it; None refuses them


def _decode_data_url(url: str, where: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ImageError(f"'{where}' is not a base64 data URL (data:image/png;base64,...)", param=where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"'{where}' has corrupt base64 data", param=where) from None


def _fetch(url: str, where: str, policy: ImagePolicy) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "mlxserve"})
    try:
        with urllib.request.urlopen(request, timeout=policy.fetch_timeout) as response:
            data = response.read(policy.max_bytes + 1)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ImageError(f"'{where}': could not fetch {url}: {reason}", param=where) from None
    return data


def _read_file(url: str, where: str, policy: ImagePolicy) -> bytes:
    if policy.file_folder is None:
        raise ImageError(f"'{where}': file:// image URLs are turned off on this server", param=where)
    path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).resolve()
    if not path.is_relative_to(policy.file_folder.resolve()) or not path.is_file():
        raise ImageError(f"'{where}': {path} is not a file inside the allowed image folder", param=where)
    with open(path, "rb") as f:
        return f.read(policy.max_bytes + 1)


def _check(data: bytes, where: str, policy: ImagePolicy) -> None:
    if len(data) > policy.max_bytes:
        raise ImageError(
            f"'{where}' is larger than the {policy.max_bytes // (1024 * 1024)} MB image limit", param=where)
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ImageError(f"'{where}' is not a readable image (PNG, JPEG, WebP or GIF)", param=where) from None
    if fmt not in FORMATS:
        raise ImageError(f"'{where}' is a {fmt} image; send PNG, JPEG, WebP or GIF", param=where)


def _load(part: ImagePart, policy: ImagePolicy) -> bytes:
    scheme = urllib.parse.urlsplit(part.url).scheme.lower()
    if scheme == "data":
        data = _decode_data_url(part.url, part.where)
    elif scheme in ("http", "https"):
        if not policy.allow_remote:
            raise ImageError(f"'{part.where}': fetching remote images is turned off on this server",
                             param=part.where)
        data = _fetch(part.url, part.where, policy)
    elif scheme == "file":
        data = _read_file(part.url, part.where, policy)
    else:
        raise ImageError(f"'{part.where}' must be a data:, http(s): or file: URL", param=part.where)
    _check(data, part.where, policy)
    return data


async def resolve_images(messages: tuple[ChatMessage, ...], policy: ImagePolicy) -> tuple[ChatMessage, ...]:
    """The same messages with every image part's `data` filled in; raises ImageError naming a bad part."""
    if not any(m.images for m in messages):
        return messages
    resolved = []
    for message in messages:
        parts = []
        for part in message.parts:
            if isinstance(part, ImagePart):
                part = replace(part, data=await asyncio.to_thread(_load, part, policy))
            parts.append(part)
        resolved.append(replace(message, parts=tuple(parts)))
    return tuple(resolved)
