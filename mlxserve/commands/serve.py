"""`mlxserve serve`: fetch the models asked for, build the engine and the app, and run."""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import socket
import sys
from pathlib import Path

from mlxserve import __version__, blas
from mlxserve.engine.bundled import BUNDLED, install_bundled
from mlxserve.settings import Settings


def _ensure_models(settings: Settings) -> None:
    """Fetch built-in models that are asked for and not on disk yet; fail early on unknown ones."""
    for name in settings.models:
        if (settings.model_directory / name / "config.json").is_file():
            continue
        if name not in BUNDLED:
            sys.exit(f"mlxserve: model '{name}' is not in {settings.model_directory} and is not a built-in "
                     f"model ({', '.join(BUNDLED)})")
        install_bundled(name, settings.model_directory)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port_free(host: str, port: int) -> None:
    """Stop at once, with a message, when the address is taken (not after loading models, with a traceback)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            sys.exit(f"mlxserve: cannot listen on {host}:{port} ({exc.strerror}): another program (maybe another "
                     f"mlxserve) is using it. Stop it, or choose another port with --port.")


def _path_hint() -> None:
    """After `./scripts/serve.sh` the command sits in .venv/bin, which no shell looks in: say how to reach it."""
    command = Path(sys.executable).with_name("mlxserve")
    if command.is_file() and shutil.which("mlxserve") != str(command):
        print(f"mlxserve: the `mlxserve` command (ps, load, log stream, ...) is {command}; to type it as plain "
              f"`mlxserve`, add its folder to PATH: export PATH=\"{command.parent}:$PATH\"", file=sys.stderr, flush=True)


def serve(settings: Settings) -> None:
    from mlxserve.api.app import create_app
    from mlxserve.api.images import ImagePolicy
    from mlxserve.api.response_store import ResponseStore
    from mlxserve.api.security import host_names
    from mlxserve.engine.engine import Engine
    from mlxserve.engine.store import ModelStore

    _check_port_free(settings.host, settings.port)
    _ensure_models(settings)
    allowed = None if settings.allowed_models is None else frozenset(settings.allowed_models)
    engine = Engine(ModelStore(settings.model_directory), max_memory=settings.max_memory,
                    default_ttl=settings.ttl, allowed=allowed, prompt_cache_bytes=settings.prompt_cache,
                    max_concurrent=settings.max_concurrent, max_queue=settings.max_queue,
                    stall_seconds=settings.stall_seconds)
    images = ImagePolicy(max_bytes=settings.max_image_bytes, allow_remote=settings.remote_images,
                         remote_hosts=tuple(h.lower() for h in settings.remote_image_hosts),
                         file_folder=settings.image_folder)
    keys = settings.keys()
    stored = None
    if settings.responses_store > 0:
        stored = ResponseStore(settings.home / "responses.sqlite", settings.responses_store, settings.responses_max_age)
    app = create_app(engine, max_body_bytes=settings.max_body_bytes, image_policy=images,
                     preload=settings.models, api_keys=keys, cors=settings.cors,
                     host_names=host_names(settings.host, settings.allowed_hosts),
                     request_timeout=settings.request_timeout, response_store=stored)
    if not keys and not _is_loopback(settings.host):
        print(f"mlxserve: WARNING: listening on {settings.host}, reachable from other machines, without an "
              "API key: anyone who can reach this port can use and manage your models. Set --api-key (or "
              "api_key_file in config.toml), or bind to 127.0.0.1.", file=sys.stderr, flush=True)
    if blas.loaded:
        logging.getLogger("mlxserve").info("using %s for CPU matrix products", blas.loaded)
    loaded = ", ".join(settings.models) or "no model loaded yet (each loads when first requested)"
    print(f"mlxserve {__version__}: serving {loaded} on http://{settings.host}:{settings.port}/v1",
          file=sys.stderr, flush=True)
    _path_hint()
    # Sanic's "running in PRODUCTION mode, use --debug" hint is for Sanic developers, not mlxserve users.
    os.environ.setdefault("SANIC_IGNORE_PRODUCTION_WARNING", "1")
    app.run(host=settings.host, port=settings.port, single_process=True, access_log=False,
            motd=False, debug=False)


