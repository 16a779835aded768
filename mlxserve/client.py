"""The CLI's side of the native API (/api/v0): a small blocking HTTP client.

Standard library only, so `mlxserve ps` starts fast and needs nothing the
server does not.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any


class ClientError(Exception):
    """A message for the user: the server is not there, or it answered with an error."""


class ServerUnreachableError(ClientError):
    """No server answers at the address."""


class AdminClient:
    def __init__(self, base_url: str, timeout: float = 600, api_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.api_key = api_key

    def _open(self, path: str, body: dict[str, Any] | None = None, *, wait_forever: bool = False):
        """`wait_forever`: no read timeout, for a log stream that may be quiet for hours."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data else {}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=None if wait_forever else self.timeout)
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {exc.code}"
            raise ClientError(message) from None
        except (urllib.error.URLError, ConnectionError) as exc:
            raise ServerUnreachableError(f"no mlxserve server answers at {self.base_url} ({getattr(exc, 'reason', exc)}); "
                              "start one with `mlxserve server start` or `mlxserve serve`") from None

    def get(self, path: str) -> Any:
        with self._open(path) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict[str, Any]) -> Any:
        with self._open(path, body) as response:
            return json.loads(response.read())

    def events(self, path: str) -> Iterator[dict[str, Any]]:
        """Server-Sent Events from `path`, until the server closes the stream."""
        with self._open(path, wait_forever=True) as response:
            for raw in response:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith("data: "):
                    yield json.loads(line[len("data: "):])
