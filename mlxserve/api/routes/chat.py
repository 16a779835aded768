"""POST /v1/chat/completions: the model's chat template is applied to `messages`."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import HTTPResponse

from mlxserve.api.body import json_object
from mlxserve.api.formats import CHAT
from mlxserve.api.generation import respond
from mlxserve.api.schemas import parse_chat

bp = Blueprint("chat", url_prefix="/v1")


@bp.post("/chat/completions")
async def chat_completions(request: Request) -> HTTPResponse | None:
    return await respond(request, request.app.ctx.engine, parse_chat(json_object(request)), CHAT)
