"""The native API under /api/v0 (modelled on LM Studio's REST API), for the CLI and for scripts.

Answers loopback clients only: it loads and unloads models and shows every prompt.
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict
from typing import Any

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from mlxserve.api import sse
from mlxserve.api.body import json_object
from mlxserve.api.errors import APIError
from mlxserve.api.schemas import LOAD_PARAMS, UNLOAD_PARAMS, read_fields
from mlxserve.protocol import InvalidRequestError, LoadedModel, ModelInfo

bp = Blueprint("admin", url_prefix="/api/v0")

TYPES = {"text": "llm", "vision": "vlm", "embeddings": "embeddings"}


@bp.on_request
async def _loopback_only(request: Request) -> None:
    try:
        local = ipaddress.ip_address(request.ip).is_loopback
    except ValueError:
        local = False
    if not local:
        raise APIError(403, "The /api/v0 admin API answers only clients on this machine (loopback)")


def model_object(info: ModelInfo, loaded: bool) -> dict[str, Any]:
    return {
        "id": info.id, "object": "model", "type": TYPES.get(info.kind, info.kind),
        "state": "loaded" if loaded else "not-loaded", "arch": info.architecture,
        "quantization": info.quantization, "max_context_length": info.context_length,
        "capabilities": list(info.capabilities), "size_bytes": info.size_bytes,
    }


def loaded_object(m: LoadedModel) -> dict[str, Any]:
    return {**asdict(m), "expires_in_seconds": m.expires_in_seconds}


@bp.get("/models")
async def models(request: Request) -> HTTPResponse:
    engine = request.app.ctx.engine
    return json({"object": "list", "data": [model_object(m, engine.is_loaded(m.id)) for m in engine.list_models()]})


@bp.get("/models/<model_id:path>")
async def model(request: Request, model_id: str) -> HTTPResponse:
    engine = request.app.ctx.engine
    return json(model_object(engine.get_model(model_id), engine.is_loaded(model_id)))


@bp.post("/models/load")
async def load(request: Request) -> HTTPResponse:
    values = read_fields(json_object(request), LOAD_PARAMS)
    loaded = await request.app.ctx.engine.load(values["model"], values.get("ttl"))
    return json({**loaded_object(loaded), "state": "loaded"})


@bp.post("/models/unload")
async def unload(request: Request) -> HTTPResponse:
    values = read_fields(json_object(request), UNLOAD_PARAMS, required=())
    engine = request.app.ctx.engine
    if values.get("all"):
        targets = [m.id for m in await engine.loaded()]
    elif "model" in values:
        targets = [values["model"]]
    else:
        raise InvalidRequestError("'model' is required (or 'all': true)", param="model")
    unloaded = [m for m in targets if await engine.unload(m)]
    return json({"unloaded": unloaded})


@bp.get("/ps")
async def ps(request: Request) -> HTTPResponse:
    engine = request.app.ctx.engine
    loaded = [loaded_object(m) for m in await engine.loaded()]
    ranks = engine.ranks()
    return json({"object": "list", "data": loaded, "memory": asdict(engine.memory()),
                 "ranks": None if ranks is None else [asdict(r) for r in ranks]})


@bp.get("/logs/stream")
async def log_stream(request: Request) -> None:
    """Server-Sent Events, one per log event; `?model=ID` filters, `?output=true` adds generated text."""
    model_filter = request.args.get("model")
    with_output = request.args.get("output", "").lower() in ("1", "true", "yes")
    response = await sse.open_stream(request)
    async for event in request.app.ctx.engine.logs.follow():
        if model_filter and event["type"] != "hello" and event.get("model") != model_filter:
            continue
        if event["type"] == "output" and not with_output:
            continue
        await response.send(sse.event(event))
