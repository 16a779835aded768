"""POST /v1/embeddings: vectors for a string, strings, or token ids."""

from __future__ import annotations

import base64

import numpy as np
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from mlxserve.api.body import json_object
from mlxserve.api.schemas import parse_embedding

bp = Blueprint("embeddings", url_prefix="/v1")


def _encode(vector: np.ndarray, as_base64: bool) -> list[float] | str:
    if as_base64:  # OpenAI's format: little-endian float32 bytes
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


@bp.post("/embeddings")
async def embeddings(request: Request) -> HTTPResponse:
    parsed = parse_embedding(json_object(request))
    request.ctx.model = parsed.request.model
    result = await request.app.ctx.engine.embed(parsed.request)
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, parsed.base64)}
            for i, v in enumerate(result.vectors)]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return json({"object": "list", "data": data, "model": parsed.request.model, "usage": usage})
