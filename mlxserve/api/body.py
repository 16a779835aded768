"""Reading a JSON request body, with OpenAI-style errors for everything that can be wrong with it."""

from __future__ import annotations

import json
from typing import Any

from sanic import Request

from mlxserve.api.errors import APIError


def json_object(request: Request) -> dict[str, Any]:
    content_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise APIError(415, f"Content-Type must be application/json; got '{content_type or 'none'}'")
    try:
        body = json.loads(request.body or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"The request body must be a JSON object; got {type(body).__name__}")
    return body
