"""GET /v1/models and /v1/models/<id>: the models on disk."""

from __future__ import annotations

from dataclasses import asdict

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

bp = Blueprint("models", url_prefix="/v1")


def _model_object(info) -> dict:
    return {**asdict(info), "object": "model"}


@bp.get("/models")
async def list_models(request: Request) -> HTTPResponse:
    models = request.app.ctx.engine.list_models()
    return json({"object": "list", "data": [_model_object(m) for m in models]})


@bp.get("/models/<model_id:path>")
async def get_model(request: Request, model_id: str) -> HTTPResponse:
    return json(_model_object(request.app.ctx.engine.get_model(model_id)))
