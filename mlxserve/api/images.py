"""Turning image content parts (data:, http(s):, file: URLs) into checked image bytes.

Runs in the HTTP layer, before a request reaches the engine, so that every
problem with an image is a 400 naming its content part. Remote fetching is off
unless the server turns it on; then it reaches public addresses only (or the
hosts the server lists), in one time limit for the whole fetch, and says no more
than "could not fetch" to the client, so that it cannot be used to scan the
network. `file://` URLs are refused unless the server names a folder they must
lie in. Every image is decoded once here, with a cap on its pixels.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import http.client
import io
import ipaddress
import logging
import socket
import ssl
import time
import urllib.parse
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from mlxserve.protocol import ChatMessage, ImageError, ImagePart

log = logging.getLogger("mlxserve.api")

FORMATS = {"PNG", "JPEG", "WEBP", "GIF"}
MAX_REDIRECTS = 3

# Fetches and decodes wait here, not in the default pool that /api/v0 load and unload use, so a slow
# image server cannot hold up model management.
_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="mlxserve-images")


@dataclass(frozen=True)
class ImagePolicy:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000  # a 12000x12000 image would take 430 MB decoded
    fetch_timeout: float = 10.0  # for the whole fetch, redirects included
    allow_remote: bool = False
    # Hosts remote URLs may name: "example.com" or ".example.com" (and its subdomains). Empty: any public
    # host. A listed host may resolve to a private address; an unlisted one never may.
    remote_hosts: tuple[str, ...] = ()
    file_folder: Path | None = None  # file:// URLs must resolve inside it; None refuses them


def _decode_data_url(url: str, where: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ImageError(f"'{where}' is not a base64 data URL (data:image/png;base64,...)", param=where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"'{where}' has corrupt base64 data", param=where) from None


class _Refused(Exception):
    """A fetch that may not or did not happen; the reason goes to the log, never to the client."""


def _listed(host: str, hosts: tuple[str, ...]) -> bool:
    return any(host == h or (h.startswith(".") and (host.endswith(h) or host == h[1:])) for h in hosts)


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _address(host: str, port: int, policy: ImagePolicy) -> str:
    """The one address to connect to, checked: resolving once and connecting to that address means a
    DNS answer cannot change between the check and the connection."""
    if policy.remote_hosts and not _listed(host, policy.remote_hosts):
        raise _Refused(f"host {host} is not in remote_image_hosts")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise _Refused(f"cannot resolve {host}: {exc}") from None
    addresses = [info[4][0] for info in infos]
    if not policy.remote_hosts and not all(_public(a) for a in addresses):
        raise _Refused(f"{host} resolves to a non-public address ({', '.join(addresses)})")
    return addresses[0]


def _connection(scheme: str, host: str, port: int, address: str, timeout: float) -> http.client.HTTPConnection:
    """An HTTP(S) connection to `address` that still speaks to `host` (Host header, TLS name)."""

    class Pinned(http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.create_connection((address, port), self.timeout)
            if scheme == "https":
                self.sock = ssl.create_default_context().wrap_socket(self.sock, server_hostname=host)

    return Pinned(host, port, timeout=timeout)


def _fetch(url: str, where: str, policy: ImagePolicy) -> bytes:
    deadline = time.monotonic() + policy.fetch_timeout
    try:
        for _ in range(MAX_REDIRECTS + 1):
            parts = urllib.parse.urlsplit(url)
            scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
            if scheme not in ("http", "https") or not host:
                raise _Refused(f"not an http(s) URL: {url!r}")
            port = parts.port or (443 if scheme == "https" else 80)
            address = _address(host, port, policy)
            conn = _connection(scheme, host, port, address, max(0.1, deadline - time.monotonic()))
            try:
                conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                             headers={"User-Agent": "mlxserve", "Accept": "image/*"})
                sock = conn.sock  # the response takes it over from the connection
                response = conn.getresponse()
                if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                    url = urllib.parse.urljoin(url, response.getheader("Location"))
                    continue
                if response.status != 200:
                    raise _Refused(f"HTTP {response.status}")
                return _read(sock, response, policy, deadline)
            finally:
                conn.close()
        raise _Refused(f"more than {MAX_REDIRECTS} redirects")
    except (_Refused, OSError, http.client.HTTPException, ValueError) as exc:
        log.info("image %s (%s) not fetched: %s", where, url[:200], exc)
        raise ImageError(f"'{where}': could not fetch the image URL", param=where) from None


def _read(sock: socket.socket, response: http.client.HTTPResponse, policy: ImagePolicy, deadline: float) -> bytes:
    """The body, up to one byte past the limit, within the deadline however slowly it trickles in."""
    chunks, size = [], 0
    while size <= policy.max_bytes:
        if time.monotonic() > deadline:
            raise _Refused(f"took longer than {policy.fetch_timeout} s")
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        chunk = response.read1(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _read_file(url: str, where: str, policy: ImagePolicy) -> bytes:
    if policy.file_folder is None:
        raise ImageError(f"'{where}': file:// image URLs are turned off on this server", param=where)
    path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).resolve()
    if not path.is_relative_to(policy.file_folder.resolve()) or not path.is_file():
        raise ImageError(f"'{where}': {path} is not a file inside the allowed image folder", param=where)
    with open(path, "rb") as f:
        return f.read(policy.max_bytes + 1)


def _check(data: bytes, where: str, policy: ImagePolicy) -> None:
    """A supported format, within the byte and pixel limits, and decodable to its last pixel."""
    if len(data) > policy.max_bytes:
        raise ImageError(
            f"'{where}' is larger than the {policy.max_bytes // (1024 * 1024)} MB image limit", param=where)
    too_many = ImageError(f"'{where}' has more pixels than the {policy.max_pixels:,} accepted", param=where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                fmt, (width, height) = image.format, image.size
                if width * height > policy.max_pixels:
                    raise too_many
                if fmt in FORMATS:
                    image.load()  # the whole image, so a truncated or corrupt one fails here, not in the model
    except ImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):  # Pillow's own limit, at open
        raise too_many from None
    except Exception:  # Pillow raises many kinds (OSError, SyntaxError, DecompressionBomb..., struct.error)
        raise ImageError(f"'{where}' is not a readable image (PNG, JPEG, WebP or GIF)", param=where) from None
    if fmt not in FORMATS:
        raise ImageError(f"'{where}' is a {fmt} image; send PNG, JPEG, WebP or GIF", param=where)


def _load(part: ImagePart, policy: ImagePolicy) -> bytes:
    if any(c.isspace() or not c.isprintable() for c in part.url[:4096]):
        raise ImageError(f"'{part.where}' is not a valid URL: it holds whitespace or control characters",
                         param=part.where)
    scheme = urllib.parse.urlsplit(part.url[:64]).scheme.lower()
    if scheme == "data":
        data = _decode_data_url(part.url, part.where)
    elif scheme in ("http", "https"):
        if not policy.allow_remote:
            raise ImageError(f"'{part.where}': fetching remote images is turned off on this server (see "
                             "remote_images); send the image as a data: URL", param=part.where)
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
    loop = asyncio.get_running_loop()
    resolved = []
    for message in messages:
        parts = []
        for part in message.parts:
            if isinstance(part, ImagePart):
                # Sockets time out with the fetch's deadline; name resolution has no timeout of its own,
                # so the wait for the answer is bounded here too.
                try:
                    data = await asyncio.wait_for(loop.run_in_executor(_POOL, _load, part, policy),
                                                  policy.fetch_timeout + 5)
                except asyncio.TimeoutError:
                    raise ImageError(f"'{part.where}': could not fetch the image URL", param=part.where) from None
                part = replace(part, data=data)
            parts.append(part)
        resolved.append(replace(message, parts=tuple(parts)))
    return tuple(resolved)
