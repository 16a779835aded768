"""Reading a JSON request body, with OpenAI-style errors for everything that can be wrong with it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from sanic import Request

from mlxserve.api.errors import APIError


class TimedRequest(Request):
    """Sanic reads a body with no time limit of its own (only the response timeout, days long, applies),
    so a client that stops sending half-way would hold its connection forever: this bounds the read."""

    body_timeout: float = 60.0

    async def receive_body(self) -> None:
        try:
            await asyncio.wait_for(super().receive_body(), self.body_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"The request body did not arrive within {self.body_timeout:g} s") from None


def _lone_surrogate(value: Any) -> str | None:
    """The path of the first string (or key) holding a lone UTF-16 surrogate ('\\ud800'), if any.

    JSON may spell one; no text model can take it (it is not a character, and UTF-8 cannot encode it).
    """
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(item, dict):
            for key, child in item.items():
                stack.append((f"{path}.{key}" if path else str(key), key))
                stack.append((f"{path}.{key}" if path else str(key), child))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", child) for i, child in enumerate(item))
    return None


def json_object(request: Request) -> dict[str, Any]:
    content_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise APIError(415, f"Content-Type must be application/json; got '{content_type or 'none'}'")
    try:
        body = json.loads(request.body or b"")
    except RecursionError:
        raise APIError(400, "The JSON body of your request is nested too deeply") from None
    except ValueError as exc:  # malformed JSON, bad UTF-8, an integer literal of over 4300 digits
        raise APIError(400, f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"The request body must be a JSON object; got {type(body).__name__}")
    where = _lone_surrogate(body)
    if where is not None:
        raise APIError(400, f"'{where}' holds a lone UTF-16 surrogate, which is not text; send valid Unicode",
                       param=where)
    return body
