"""The Sanic application factory. It receives a ready engine object and never imports MLX."""

from __future__ import annotations

from typing import Any

from sanic import Sanic

from mlxserve.api import access_log, security
from mlxserve.api.body import TimedRequest
from mlxserve.api.errors import register_error_handler
from mlxserve.api.images import ImagePolicy
from mlxserve.api.routes import admin, chat, completions, embeddings, health, messages, models, responses


def create_app(engine: Any, *, max_body_bytes: int, image_policy: ImagePolicy,
               preload: tuple[str, ...] = (), api_keys: tuple[str, ...] = (), cors: tuple[str, ...] = (),
               host_names: frozenset[str] = frozenset({"localhost"}), request_timeout: float = 60,
               response_store: Any = None) -> Sanic:
    """`engine` offers list_models, get_model, generate, embed, start(preload) and stop().
    `host_names`: the names clients may use in the Host header besides IP addresses.
    `response_store`: where /v1/responses keeps responses (a ResponseStore), or None to keep none."""
    # mlxserve configures logging itself (cli.py); Sanic would add a second handler.
    request_class = type("Request", (TimedRequest,), {"body_timeout": request_timeout})
    app = Sanic("mlxserve", configure_logging=False, request_class=request_class)
    app.config.REQUEST_MAX_SIZE = max_body_bytes
    app.config.REQUEST_TIMEOUT = request_timeout  # the headers; TimedRequest bounds the body
    app.config.MOTD = False
    app.config.KEEP_ALIVE_TIMEOUT = 75
    # Sanic's default (60 s) cuts off any response still running, which kills long generations
    # on slow machines and every `log stream`; clients keep their own timeouts.
    app.config.RESPONSE_TIMEOUT = 7 * 24 * 3600
    app.ctx.engine = engine
    app.ctx.image_policy = image_policy
    app.ctx.response_store = response_store
    for bp in (models.bp, chat.bp, completions.bp, responses.bp, messages.bp, embeddings.bp, admin.bp, health.bp):
        app.blueprint(bp)
    register_error_handler(app)
    security.install(app, api_keys, cors, host_names)
    access_log.install(app)

    @app.before_server_start
    async def _start_engine(app: Sanic) -> None:
        engine.start(preload)

    @app.after_server_stop
    async def _stop_engine(app: Sanic) -> None:
        engine.stop()

    return app
