"""API key and CORS: who may call the server, and from which web pages.

Both are off by default (the server binds to loopback). With an API key, every /v1 and /api/v0
request must carry `Authorization: Bearer <key>`, compared in constant time; /health stays open
for service managers. With CORS origins, browsers on those origins get the CORS headers and
correct answers to their preflight requests; any other origin gets none, so the browser refuses.
"""

from __future__ import annotations

import hmac

from sanic import Request, Sanic
from sanic.response import HTTPResponse, empty

from mlxserve.api.errors import error_response

PROTECTED = ("/v1", "/api/")
ALLOWED_METHODS = "GET, POST, OPTIONS"
ALLOWED_HEADERS = "Authorization, Content-Type, OpenAI-Organization, OpenAI-Project, X-Stainless-Lang, " \
                  "X-Stainless-Package-Version, X-Stainless-OS, X-Stainless-Arch, X-Stainless-Runtime, " \
                  "X-Stainless-Runtime-Version, X-Stainless-Retry-Count, X-Stainless-Timeout"


def _allowed_origin(origin: str | None, origins: tuple[str, ...]) -> str | None:
    if not origin or not origins:
        return None
    if "*" in origins:
        return "*"
    return origin if origin in origins else None


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def install(app: Sanic, api_key: str | None, cors: tuple[str, ...]) -> None:
    expected = api_key.encode() if api_key else None

    @app.on_request(priority=100)
    async def _preflight_and_key(request: Request) -> HTTPResponse | None:
        if request.method == "OPTIONS" and request.headers.get("access-control-request-method"):
            allowed = _allowed_origin(request.headers.get("origin"), cors)
            if allowed is None:
                return error_response(403, "This origin may not call mlxserve from a browser (see --cors)")
            return empty(204, headers={
                "Access-Control-Allow-Origin": allowed, "Access-Control-Allow-Methods": ALLOWED_METHODS,
                "Access-Control-Allow-Headers": request.headers.get("access-control-request-headers")
                or ALLOWED_HEADERS, "Access-Control-Max-Age": "600", "Vary": "Origin"})
        if expected is None or not request.path.startswith(PROTECTED):
            return None
        given = _bearer(request)
        if given is None or not hmac.compare_digest(given.encode(), expected):
            return error_response(401, "Missing or invalid API key: send it as `Authorization: Bearer <key>`",
                                  code="invalid_api_key")
        return None

    @app.on_response(priority=100)
    async def _cors_headers(request: Request, response: HTTPResponse) -> None:
        allowed = _allowed_origin(request.headers.get("origin"), cors)
        if allowed is not None:
            response.headers["Access-Control-Allow-Origin"] = allowed
            response.headers["Vary"] = "Origin"
