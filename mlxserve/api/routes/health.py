"""GET /health (for load balancers, service managers and `mlxserve server status`) and GET /openapi.json.

Healthy means the engine loop still turns, not merely that HTTP answers: a loop stuck for longer
than the server's stall limit makes this a 503, while requests may still be accepted.
"""

from __future__ import annotations

import os
from dataclasses import asdict

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from mlxserve.api.openapi import document

bp = Blueprint("health")


@bp.get("/health")
async def health(request: Request) -> HTTPResponse:
    report = request.app.ctx.engine.health()
    # pid: `server start` and `server stop` make sure the server answering is the one they started.
    body = {"status": "ok" if report.healthy else "unhealthy", **asdict(report), "pid": os.getpid()}
    return json(body, status=200 if report.healthy else 503)


@bp.get("/openapi.json")
async def openapi(request: Request) -> HTTPResponse:
    return json(document())
