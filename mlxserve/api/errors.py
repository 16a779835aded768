"""Every error response, in one place: OpenAI's `{"error": {message, type, param, code}}`."""

from __future__ import annotations

import logging

from sanic import Request, Sanic
from sanic.exceptions import SanicException
from sanic.response import HTTPResponse, json

from mlxserve.protocol import (
    ConversionError,
    InsufficientMemoryError,
    InvalidRequestError,
    MlxserveError,
    ModelBusyError,
    ModelNotAllowedError,
    ModelNotFoundError,
    ServerBusyError,
)

log = logging.getLogger("mlxserve.api")


class APIError(MlxserveError):
    """An error the HTTP layer itself detects (body, content type), with its status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message, param, code)
        self.status = status


# Engine errors to HTTP statuses; the most specific class wins.
_STATUS: list[tuple[type[MlxserveError], int]] = [
    (ModelNotFoundError, 404),
    (ModelNotAllowedError, 403),
    (ModelBusyError, 409),
    (InsufficientMemoryError, 503),
    (ServerBusyError, 503),
    (ConversionError, 400),
    (InvalidRequestError, 400),
]

_TYPE_BY_STATUS = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
                   429: "rate_limit_error", 503: "service_unavailable"}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> HTTPResponse:
    if status >= 500 and status != 503:
        kind = "server_error"
    else:
        kind = _TYPE_BY_STATUS.get(status, "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return json(body, status=status)


def _status_of(exc: MlxserveError) -> int:
    if isinstance(exc, APIError):
        return exc.status
    return next((status for cls, status in _STATUS if isinstance(exc, cls)), 400)


async def _handle(request: Request, exc: Exception) -> HTTPResponse:
    if isinstance(exc, MlxserveError):
        response = error_response(_status_of(exc), exc.message, exc.param, exc.code)
        if isinstance(exc, ServerBusyError):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response
    if isinstance(exc, SanicException):
        status = exc.status_code
        message = str(exc) or "Request failed"
        if status == 405:
            message = f"Method {request.method} is not allowed on {request.path}"
        elif status == 404:
            message = f"Unknown route {request.method} {request.path}"
        elif status == 413:
            message = "Request body is too large"
        return error_response(status, message)
    log.exception("unexpected error on %s %s", request.method, request.path)
    return error_response(500, f"Internal server error: {type(exc).__name__}")


def register_error_handler(app: Sanic) -> None:
    app.error_handler.add(Exception, _handle)
