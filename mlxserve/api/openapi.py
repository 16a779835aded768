"""The OpenAPI 3.1 document served at /openapi.json, built from the same field tables the parsers use.

A request field's schema is the one its parser declares (`api/schemas.py`), so the document cannot
promise what the server refuses, nor miss what it accepts. The test suite runs schemathesis against it.
"""

from __future__ import annotations

from typing import Any

from mlxserve import __version__
from mlxserve.api.schemas import (
    CHAT,
    COMPLETIONS,
    EMBEDDING_PARAMS,
    INPUTS,
    LOAD_PARAMS,
    UNLOAD_PARAMS,
    Param,
    params_for,
)

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
_OBJECT = {"type": "object"}


def _body(params: tuple[Param, ...], required: tuple[str, ...]) -> dict[str, Any]:
    properties = {}
    for p in params:
        doc = p.doc + (f" (extension: {p.extension})" if p.extension else "")
        properties[p.name] = {**p.parse.schema, "description": doc}
    return {"type": "object", "required": list(required), "properties": properties}


def _operation(summary: str, body: dict[str, Any] | None = None, ok: dict[str, Any] = _OBJECT,
               errors: tuple[int, ...] = (400, 404), stream: bool = False) -> dict[str, Any]:
    content = {"application/json": {"schema": ok}}
    if stream:
        content["text/event-stream"] = {"schema": {"type": "string"}}
    operation: dict[str, Any] = {"summary": summary, "responses": {"200": {"description": "OK", "content": content}}}
    for status in errors:
        operation["responses"][str(status)] = {"description": "Error",
                                               "content": {"application/json": {"schema": _ERROR}}}
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return operation


def _generation(endpoint: str, summary: str) -> dict[str, Any]:
    body = _body((INPUTS[endpoint], *params_for(endpoint)), ("model", INPUTS[endpoint].name))
    return {"post": _operation(summary, body, errors=(400, 403, 404, 413, 415, 503), stream=True)}


# The Responses and Messages request bodies: their required fields and the types of the fields read most;
# the README has the full account of each format.
_RESPONSES_BODY = {"type": "object", "required": ["model", "input"], "properties": {
    "model": {"type": "string"}, "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
    "instructions": {"type": "string"}, "max_output_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2}, "tools": {"type": "array"},
    "previous_response_id": {"type": "string"}, "store": {"type": "boolean"}, "stream": {"type": "boolean"}}}
_MESSAGES_BODY = {"type": "object", "required": ["model", "max_tokens", "messages"], "properties": {
    "model": {"type": "string"}, "max_tokens": {"type": "integer", "minimum": 1},
    "messages": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role", "content"]}},
    "system": {"oneOf": [{"type": "string"}, {"type": "array"}]}, "stop_sequences": {"type": "array"},
    "temperature": {"type": "number", "minimum": 0, "maximum": 1}, "tools": {"type": "array"},
    "stream": {"type": "boolean"}}}


def document() -> dict[str, Any]:
    model_path = {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}
    response_path = {"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "mlxserve", "version": __version__,
                 "description": "OpenAI-compatible local LLM server on MLX, and its native /api/v0."},
        "paths": {
            "/v1/chat/completions": _generation(CHAT, "Chat with the model's own chat template"),
            "/v1/completions": _generation(COMPLETIONS, "Continue a raw prompt"),
            "/v1/responses": {"post": _operation("OpenAI's Responses API", _RESPONSES_BODY,
                                                 errors=(400, 403, 404, 413, 415, 503), stream=True)},
            "/v1/responses/{response_id}": {
                "get": {**_operation("A stored response", errors=(404,)), "parameters": [response_path]},
                "delete": {**_operation("Delete a stored response", errors=(404,)), "parameters": [response_path]}},
            "/v1/messages": {"post": _operation("Anthropic's Messages API", _MESSAGES_BODY,
                                                errors=(400, 403, 404, 413, 415, 529), stream=True)},
            "/v1/messages/count_tokens": {"post": _operation(
                "Prompt tokens of a Messages request", {**_MESSAGES_BODY, "required": ["model", "messages"]},
                errors=(400, 403, 404, 413, 415, 529))},
            "/v1/embeddings": {"post": _operation(
                "Vectors for strings or token ids", _body(EMBEDDING_PARAMS, ("model", "input")),
                errors=(400, 403, 404, 413, 415, 503))},
            "/v1/models": {"get": _operation("Models on disk", errors=())},
            "/v1/models/{model_id}": {"get": {**_operation("One model", errors=(400, 403, 404)),
                                              "parameters": [model_path]}},
            "/health": {"get": _operation("Engine liveness and load", errors=(503,))},
            "/api/v0/models": {"get": _operation("Models on disk, with their state", errors=())},
            "/api/v0/models/{model_id}": {"get": {**_operation("One model, with its state", errors=(400, 403, 404)),
                                                  "parameters": [model_path]}},
            "/api/v0/models/load": {"post": _operation("Load a model now", _body(LOAD_PARAMS, ("model",)),
                                                       errors=(400, 403, 404, 415, 503))},
            "/api/v0/models/unload": {"post": _operation("Unload a model, or all", _body(UNLOAD_PARAMS, ()),
                                                         errors=(400, 404, 409, 415))},
            "/api/v0/ps": {"get": _operation("Loaded models and memory", errors=())},
        },
    }
