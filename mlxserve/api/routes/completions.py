"""POST /v1/completions: the raw prompt is continued, with no chat template."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import HTTPResponse

from mlxserve.api.body import json_object
from mlxserve.api.formats import TEXT
from mlxserve.api.generation import OpenAIWire, respond
from mlxserve.api.schemas import parse_completion

bp = Blueprint("completions", url_prefix="/v1")


@bp.post("/completions")
async def completions(request: Request) -> HTTPResponse | None:
    return await respond(request, request.app.ctx.engine, parse_completion(json_object(request)), OpenAIWire(TEXT))
