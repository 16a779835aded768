"""Host header, API key and CORS: who may call the server, and from which web pages.

The Host header is always checked (DNS rebinding: a web page whose name an attacker points at
127.0.0.1 would otherwise drive a keyless local server from the browser); IP addresses, localhost,
this machine's name and the configured names pass, as in Ollama and Jupyter.
The key and CORS are off by default (the server binds to loopback). With an API key, every /v1
and /api/v0 request must carry `Authorization: Bearer <key>`, compared in constant time; /health
stays open for service managers. With CORS origins, browsers on those origins get the CORS headers
and correct answers to their preflight requests; any other origin gets none, so the browser refuses.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket

from sanic import Request, Sanic
from sanic.response import HTTPResponse, empty

from mlxserve.api.errors import error_response

PROTECTED = ("/v1", "/api/")
ALLOWED_METHODS = "GET, POST, OPTIONS"
ALLOWED_HEADERS = "Authorization, Content-Type, OpenAI-Organization, OpenAI-Project, X-Stainless-Lang, " \
                  "X-Stainless-Package-Version, X-Stainless-OS, X-Stainless-Arch, X-Stainless-Runtime, " \
                  "X-Stainless-Runtime-Version, X-Stainless-Retry-Count, X-Stainless-Timeout, X-Api-Key, " \
                  "Anthropic-Version, Anthropic-Beta, Anthropic-Dangerous-Direct-Browser-Access"


def _allowed_origin(origin: str | None, origins: tuple[str, ...]) -> str | None:
    if not origin or not origins:
        return None
    if "*" in origins:
        return "*"
    return origin if origin in origins else None


def host_names(bound: str, configured: tuple[str, ...]) -> frozenset[str]:
    """The names (beside IP addresses) a client may put in the Host header."""
    machine = socket.gethostname().lower()
    names = {"localhost", machine, machine.split(".")[0] + ".local", bound.lower(), *(c.lower() for c in configured)}
    return frozenset(n.rstrip(".") for n in names if n)


def host_allowed(header: str | None, names: frozenset[str]) -> bool:
    if not header or "*" in names:
        return True
    host = header.strip().lower()
    if host.startswith("["):  # [::1]:1234
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":")[0]
    try:
        ipaddress.ip_address(host)
        return True  # an address is no rebinding: a page served from it is the server's own origin
    except ValueError:
        host = host.rstrip(".")
    return host in names or host.endswith(".localhost")


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def key_scope(key: str) -> str:
    """A stable, non-secret name for an API key: the prompt cache keeps each key's prompts apart."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def install(app: Sanic, api_keys: tuple[str, ...], cors: tuple[str, ...], hosts: frozenset[str]) -> None:
    expected = [k.encode() for k in api_keys]

    @app.on_request(priority=100)
    async def _preflight_and_key(request: Request) -> HTTPResponse | None:
        host = request.headers.get("host")
        if not host_allowed(host, hosts):
            shown = host if len(host) < 100 else host[:100] + "…"
            return error_response(request, 403, f"This server does not answer to the name {shown!r} (a guard against DNS "
                                       "rebinding); add it to allowed_hosts to allow it", code="invalid_host")
        if request.method == "OPTIONS" and request.headers.get("access-control-request-method"):
            allowed = _allowed_origin(request.headers.get("origin"), cors)
            if allowed is None:
                return error_response(request, 403, "This origin may not call mlxserve from a browser (see --cors)")
            return empty(204, headers={
                "Access-Control-Allow-Origin": allowed, "Access-Control-Allow-Methods": ALLOWED_METHODS,
                "Access-Control-Allow-Headers": request.headers.get("access-control-request-headers")
                or ALLOWED_HEADERS, "Access-Control-Max-Age": "600", "Vary": "Origin"})
        if not expected or not request.path.startswith(PROTECTED):
            return None
        # Anthropic's clients send the key as x-api-key (Claude Code sends both).
        given = (_bearer(request) or request.headers.get("x-api-key", "")).encode()
        # Every key is compared, so the time taken says nothing about which one nearly matched.
        matches = [hmac.compare_digest(given, key) for key in expected]
        if not given or not any(matches):
            return error_response(request, 401, "Missing or invalid API key: send it as `Authorization: Bearer "
                                  "<key>` (or `x-api-key: <key>`)", code="invalid_api_key")
        request.ctx.key_scope = key_scope(api_keys[matches.index(True)])
        return None

    @app.on_response(priority=100)
    async def _cors_headers(request: Request, response: HTTPResponse) -> None:
        allowed = _allowed_origin(request.headers.get("origin"), cors)
        if allowed is not None:
            response.headers["Access-Control-Allow-Origin"] = allowed
            response.headers["Vary"] = "Origin"
