"""Commands on the model directory: ls, pull, import, rm. They need no running server."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mlxserve.client import AdminClient, ServerUnreachableError
from mlxserve.engine.bundled import BUNDLED, install_bundled
from mlxserve.engine.names import check_model_name
from mlxserve.protocol import ConversionError
from mlxserve.settings import DEFAULT_CHAT_MODEL, Settings, human_bytes


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def _store(settings: Settings):
    from mlxserve.engine.store import ModelStore

    return ModelStore(settings.model_directory)


def ls(settings: Settings, as_json: bool) -> None:
    models = _store(settings).list()
    if as_json:
        print(json.dumps([{"id": m.id, "size_bytes": m.size_bytes, "architecture": m.architecture,
                           "quantization": m.quantization, "capabilities": list(m.capabilities),
                           "context_length": m.context_length} for m in models], indent=2))
        return
    if not models:
        print(f"No models in {settings.model_directory}. Try `mlxserve pull {DEFAULT_CHAT_MODEL}`.")
        return
    print(table([[m.id, human_bytes(m.size_bytes), m.architecture, m.quantization, ",".join(m.capabilities),
                   str(m.context_length or "?")] for m in models],
                 ["NAME", "SIZE", "ARCH", "QUANTIZATION", "CAPABILITIES", "CONTEXT"]))


def pull(settings: Settings, reference: str, name: str | None) -> None:
    from mlxserve.engine import hub

    if reference in BUNDLED:
        print(install_bundled(reference, settings.model_directory))
        return
    try:
        repo, revision = hub.parse_reference(reference)
    except ValueError as exc:
        raise ConversionError(f"{exc}; built-in models: {', '.join(BUNDLED)}") from None
    target = settings.model_directory / check_model_name(name or hub.default_name(repo))
    if (target / "config.json").is_file():
        print(f"{target.name} is already in {settings.model_directory} (remove it with `mlxserve rm {target.name}` "
              "to download it again)", file=sys.stderr)
    else:
        print(f"Downloading {repo}{'@' + revision if revision else ''} into {target}…", file=sys.stderr)
        hub.pull(repo, revision, target)
    print(target)


def import_gguf(settings: Settings, file: Path, name: str | None, force: bool, bits: int | None = None,
                group_size: int | None = None) -> None:
    from mlxserve.engine.bundled import conversion_progress
    from mlxserve.engine.gguf import convert_gguf
    from mlxserve.engine.install import exists_error

    if not file.is_file():
        raise ConversionError(f"no such file: {file}")
    target = settings.model_directory / check_model_name(name or file.name.removesuffix(".gguf").lower())
    if target.exists() and not force:  # before converting: the install checks again under its lock
        raise exists_error(target.name)
    print(f"Converting {file.name} to MLX in {target}…", file=sys.stderr)
    convert_gguf(file, target, progress=conversion_progress(lambda line: print(line, file=sys.stderr)),
                 replace=force, bits=bits, group_size=group_size)
    print(target)


def rm(settings: Settings, name: str, server: AdminClient) -> None:
    """Delete the model; a running server unloads it first (one serving requests stops the removal)."""
    store = _store(settings)
    info = store.get(name)
    try:
        if server.post("/api/v0/models/unload", {"model": name})["unloaded"]:
            print(f"Unloaded {name} from the server at {server.base_url}", file=sys.stderr)
    except ServerUnreachableError:
        pass
    store.remove(name)
    print(f"Removed {name} ({human_bytes(info.size_bytes)}) from {settings.model_directory}")


