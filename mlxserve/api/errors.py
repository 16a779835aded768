"""Every error response, in one place: OpenAI's `{"error": {message, type, param, code}}`, or, on
Anthropic's paths (`/v1/messages`), Anthropic's `{"type": "error", "error": {type, message}}` with its
status codes. The shape follows the request's path, whoever raised the error (a route, the body
reader, the API-key check, Sanic's router)."""

from __future__ import annotations

import logging

from sanic import Request, Sanic
from sanic.exceptions import SanicException
from sanic.response import HTTPResponse, json

from mlxserve.protocol import (
    ConversionError,
    EngineUnavailableError,
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
    (EngineUnavailableError, 503),
    (ConversionError, 400),
    (InvalidRequestError, 400),
]

_TYPE_BY_STATUS = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
                   429: "rate_limit_error", 503: "service_unavailable"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    if status >= 500 and status != 503:
        kind = "server_error"
    else:
        kind = _TYPE_BY_STATUS.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


ANTHROPIC_PATHS = "/v1/messages"

_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error"}


def anthropic_error_body(status: int, message: str) -> tuple[int, dict]:
    """Anthropic's status and error object: "the server cannot take more now" is its 529 (overloaded)."""
    if status == 503:
        status = 529
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return status, {"type": "error", "error": {"type": kind, "message": message}}


def shaped(path: str, status: int, message: str, param: str | None = None, code: str | None = None
           ) -> tuple[int, dict]:
    """The status and body of an error on `path`, in the shape of that path's API."""
    if path.startswith(ANTHROPIC_PATHS):
        return anthropic_error_body(status, message)
    return status, error_body(status, message, param, code)


def error_response(request: Request, status: int, message: str, param: str | None = None,
                   code: str | None = None) -> HTTPResponse:
    status, body = shaped(request.path, status, message, param, code)
    return json(body, status=status)


def _status_of(exc: MlxserveError) -> int:
    if isinstance(exc, APIError):
        return exc.status
    return next((status for cls, status in _STATUS if isinstance(exc, cls)), 400)


def describe(exc: BaseException, path: str = "/v1") -> tuple[int, dict]:
    """The status and error object (in `path`'s API's shape) for any exception: a client's error keeps its
    4xx (or 503); anything else is a 500 whose message names the failure, for the log and the client alike."""
    if isinstance(exc, MlxserveError):
        return shaped(path, _status_of(exc), exc.message, exc.param, exc.code)
    return shaped(path, 500, f"Internal server error: {type(exc).__name__}: {exc}"[:2000])


def message_of(body: dict) -> str:
    return body["error"]["message"]


async def _handle(request: Request, exc: Exception) -> HTTPResponse:
    if isinstance(exc, SanicException) and not isinstance(exc, MlxserveError):
        status = exc.status_code
        message = str(exc) or "Request failed"
        if status == 413 and request.method == "NONE":  # the head, not the body, was too large
            head = bytes(getattr(request.stream, "recv_buffer", b""))
            line = head.find(b"\r\n")
            if line == -1 or line >= getattr(request.stream, "HEADER_MAX_SIZE", 8192):  # the request line alone
                status, message = 414, "The request URL is too long"
            else:
                status, message = 431, "The request's headers are too large"
        elif status == 408:
            message = "The request did not arrive in time"
        elif status == 405:
            message = f"Method {request.method} is not allowed on {request.path}"
        elif status == 404:
            message = f"Unknown route {request.method} {request.path}"
        elif status == 413:
            message = "Request body is too large"
        return error_response(request, status, message)
    if not isinstance(exc, MlxserveError):
        log.exception("unexpected error on %s %s", request.method, request.path)
    status, body = describe(exc, request.path)
    request.ctx.error = message_of(body)  # the access log says why
    response = json(body, status=status)
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def register_error_handler(app: Sanic) -> None:
    app.error_handler.add(Exception, _handle)
