"""One line per request in the server's log: method, path, model, status, tokens, TTFT, duration.

Prompts and generated text never appear here (the engine logs prompts at debug level only).
Handlers note what they know on `request.ctx` (`model`, `usage`, `first_token`); the line is
written when the response is complete: by the response middleware for ordinary responses, and by
the streaming code when its stream ends.
"""

from __future__ import annotations

import json
import logging
import time

from sanic import Request, Sanic
from sanic.response import HTTPResponse

log = logging.getLogger("mlxserve.access")


def begin(request: Request) -> None:
    request.ctx.started = time.perf_counter()


def note_first_token(request: Request) -> None:
    if getattr(request.ctx, "first_token", None) is None:
        request.ctx.first_token = time.perf_counter()


def field(value: str) -> str:
    """A client-given value as one log field: control characters and quotes escaped, so that no
    value can end the line or forge another."""
    if value.isprintable() and " " not in value and '"' not in value:
        return value
    return json.dumps(value)


def finish(request: Request, status: int) -> None:
    """Write the request's line, once."""
    ctx = request.ctx
    if getattr(ctx, "logged", False) or not hasattr(ctx, "started"):
        return
    ctx.logged = True
    parts = [request.method, field(request.path), f"status={status}"]
    model = getattr(ctx, "model", None)
    if model:
        parts.append(f"model={field(model)}")
    usage = getattr(ctx, "usage", None)
    if usage is not None:
        parts.append(f"prompt_tokens={usage.prompt_tokens} cached_tokens={usage.cached_tokens} "
                     f"completion_tokens={usage.completion_tokens}")
    first = getattr(ctx, "first_token", None)
    if first is not None:
        parts.append(f"ttft={first - ctx.started:.3f}s")
    parts.append(f"duration={time.perf_counter() - ctx.started:.3f}s")
    error = getattr(ctx, "error", None)
    if error:
        parts.append(f"error={field(error)}")
    log.info(" ".join(parts))


def install(app: Sanic) -> None:
    @app.on_request(priority=200)
    async def _begin(request: Request) -> None:
        begin(request)

    @app.on_response(priority=0)
    async def _finish(request: Request, response: HTTPResponse) -> None:
        if not getattr(request.ctx, "streaming", False):
            finish(request, response.status)
