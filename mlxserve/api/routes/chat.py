"""POST /v1/chat/completions: the model's chat template is applied to `messages` (text and images)."""

from __future__ import annotations

from dataclasses import replace

from sanic import Blueprint, Request
from sanic.response import HTTPResponse

from mlxserve.api.body import json_object
from mlxserve.api.formats import CHAT
from mlxserve.api.generation import respond
from mlxserve.api.images import resolve_images
from mlxserve.api.schemas import parse_chat

bp = Blueprint("chat", url_prefix="/v1")


@bp.post("/chat/completions")
async def chat_completions(request: Request) -> HTTPResponse | None:
    parsed = parse_chat(json_object(request))
    request.app.ctx.engine.check(parsed.request)  # the model takes images, before any image is fetched
    messages = await resolve_images(parsed.request.messages, request.app.ctx.image_policy)
    parsed = replace(parsed, request=replace(parsed.request, messages=messages))
    return await respond(request, request.app.ctx.engine, parsed, CHAT)
