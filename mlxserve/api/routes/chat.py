"""POST /v1/chat/completions: the model's chat template is applied to `messages` (text and images)."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import HTTPResponse

from mlxserve.api.body import json_object
from mlxserve.api.formats import CHAT
from mlxserve.api.generation import OpenAIWire, respond, with_images
from mlxserve.api.schemas import parse_chat

bp = Blueprint("chat", url_prefix="/v1")


@bp.post("/chat/completions")
async def chat_completions(request: Request) -> HTTPResponse | None:
    parsed = await with_images(request, parse_chat(json_object(request)))
    return await respond(request, request.app.ctx.engine, parsed, OpenAIWire(CHAT))
