"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API (Claude Code, Anthropic SDKs)."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from mlxserve.api.anthropic import MessagesWire, parse_messages
from mlxserve.api.body import json_object
from mlxserve.api.generation import respond, with_images

bp = Blueprint("messages", url_prefix="/v1")


@bp.post("/messages")
async def messages(request: Request) -> HTTPResponse | None:
    parsed = await with_images(request, parse_messages(json_object(request)))
    return await respond(request, request.app.ctx.engine, parsed, MessagesWire())


@bp.post("/messages/count_tokens")
async def count_tokens(request: Request) -> HTTPResponse:
    parsed = await with_images(request, parse_messages(json_object(request), count_only=True))
    request.ctx.model = parsed.request.model
    return json({"input_tokens": await request.app.ctx.engine.count_tokens(parsed.request)})
