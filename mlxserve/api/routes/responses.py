"""/v1/responses: OpenAI's Responses API (Codex, the Agents SDK), with stored responses to continue from."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from mlxserve.api.body import json_object
from mlxserve.api.errors import APIError
from mlxserve.api.generation import respond, with_images
from mlxserve.api.response_store import ResponseStore
from mlxserve.api.responses import ResponsesWire, parse_responses, with_history

bp = Blueprint("responses", url_prefix="/v1")


def _store(request: Request) -> ResponseStore | None:
    return request.app.ctx.response_store


async def _stored(request: Request, response_id: str, param: str | None = None):
    store = _store(request)
    found = None if store is None else await asyncio.to_thread(store.get, response_id)
    if found is None:
        raise APIError(404, f"No response with id '{response_id}' is stored here (responses are kept only with "
                            "`store` true, within the server's --responses-store size and age)", param=param)
    return found


@bp.post("/responses")
async def create(request: Request) -> HTTPResponse | None:
    req = parse_responses(json_object(request))
    history = ()
    if req.previous_response_id is not None:
        _, history = await _stored(request, req.previous_response_id, "previous_response_id")
    req = with_history(req, history)
    req = replace(req, parsed=await with_images(request, req.parsed))
    store = _store(request)
    wire = ResponsesWire(req, keep=store.put if store is not None else None)
    return await respond(request, request.app.ctx.engine, req.parsed, wire)


@bp.get("/responses/<response_id:str>")
async def retrieve(request: Request, response_id: str) -> HTTPResponse:
    response, _ = await _stored(request, response_id)
    return json(response)


@bp.delete("/responses/<response_id:str>")
async def delete(request: Request, response_id: str) -> HTTPResponse:
    await _stored(request, response_id)
    await asyncio.to_thread(_store(request).delete, response_id)
    return json({"id": response_id, "object": "response.deleted", "deleted": True})
