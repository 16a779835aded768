"""`mlxserve serve`: fetch the models asked for, build the engine and the app, and run."""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import socket
import sys
import time
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
    from mlxserve.engine.distributed import Leader, Ring, follow, watch_followers
    from mlxserve.engine.engine import Engine
    from mlxserve.engine.store import ModelStore

    ring = Ring.join() if settings.distributed else None
    store = ModelStore(settings.model_directory)
    if ring is not None and ring.rank > 0:
        # A follower: no HTTP; it loads and steps what rank 0 tells it to.
        _ensure_models(settings)
        sys.exit(follow(ring, store))
    _check_port_free(settings.host, settings.port)
    _ensure_models(settings)
    leader = None
    if ring is not None:
        leader = Leader(ring, store, settings.pipeline, settings.max_concurrent, settings.prompt_cache > 0)
        watch_followers(ring, leader.rank_lost)
        print(f"mlxserve: rank 0 of {ring.size}: models are served "
              f"{'pipeline' if settings.pipeline else 'tensor'}-parallel across the group", file=sys.stderr, flush=True)
    allowed = None if settings.allowed_models is None else frozenset(settings.allowed_models)
    engine = Engine(store, max_memory=settings.max_memory,
                    default_ttl=settings.ttl, allowed=allowed, prompt_cache_bytes=settings.prompt_cache,
                    max_concurrent=settings.max_concurrent, max_queue=settings.max_queue,
                    stall_seconds=settings.stall_seconds, leader=leader)
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




def launch(hostfile: Path, backend: str | None, python: str | None, starting_port: int | None,
           serve_args: list[str]) -> int:
    """Run `mlxserve serve --distributed SERVE_ARGS` on every host of `hostfile` through `mlx.launch`,
    until it ends; Ctrl-C or SIGTERM stops every local rank (rank 0 then tells remote ones to stop)."""
    import signal
    import subprocess

    launcher = Path(sys.executable).with_name("mlx.launch")
    if not launcher.is_file():
        sys.exit("mlxserve: mlx.launch is not installed next to this Python; reinstall mlx")
    if not hostfile.is_file():
        sys.exit(f"mlxserve: no hostfile at {hostfile}; see the README's 'Several Macs' section for its shape")
    command = [str(launcher), "--hostfile", str(hostfile)]
    command += ["--backend", backend] if backend else []
    command += ["--starting-port", str(starting_port)] if starting_port else []
    command += ["--python", python] if python else []
    serve_args = serve_args[1:] if serve_args[:1] == ["--"] else serve_args
    command += ["--", *([] if python else [sys.executable]), "-m", "mlxserve", "serve", "--distributed", *serve_args]
    # Its own process group: mlx.launch does not pass a SIGTERM on to the ranks, so this does.
    job = subprocess.Popen(command, start_new_session=True)

    def stop(signum: int, frame: object) -> None:
        try:
            os.killpg(job.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = job.wait()
    # mlx.launch may end before its ranks do (a SIGTERM ends it at once): wait for the whole group.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(job.pid, 0)
        except ProcessLookupError:
            return code
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)
    return code
