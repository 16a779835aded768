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


def import_gguf(settings: Settings, source: Path, name: str | None, force: bool, bits: int | None = None,
                group_size: int | None = None, picks: list[str] | None = None, everything: bool = False) -> None:
    """A GGUF file, or the chosen models of a folder of them (LM Studio's, Ollama's store, any)."""
    if source.is_dir():
        if name:
            raise ConversionError("--name names one file's model; from a folder, models keep their store's names")
        _import_from_store(settings, source, force, bits, group_size, picks or [], everything)
        return
    if picks or everything:
        raise ConversionError("--pick and --all choose among the models of a folder; this is one file")
    if not source.is_file():
        raise ConversionError(f"no such file or folder: {source}")
    print(_import_one(settings, source, name or source.name.removesuffix(".gguf").lower(), force, bits, group_size))


def _import_one(settings: Settings, file: Path, name: str, force: bool, bits: int | None,
                group_size: int | None) -> Path:
    from mlxserve.engine.bundled import conversion_progress
    from mlxserve.engine.gguf import convert_gguf
    from mlxserve.engine.install import exists_error

    target = settings.model_directory / check_model_name(name)
    if target.exists() and not force:  # before converting: the install checks again under its lock
        raise exists_error(target.name)
    print(f"Converting {file.name} to MLX in {target}…", file=sys.stderr)
    if sys.stderr.isatty():
        from tqdm import tqdm

        with tqdm(unit="B", unit_scale=True, desc="converting") as bar:
            def advance(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            convert_gguf(file, target, progress=advance, replace=force, bits=bits, group_size=group_size)
    else:  # a log or a pipe: a line each tenth
        convert_gguf(file, target, progress=conversion_progress(lambda line: print(line, file=sys.stderr)),
                     replace=force, bits=bits, group_size=group_size)
    return target


def _architecture(path: Path) -> str:
    from gguf import GGUFReader

    try:
        return str(GGUFReader(path).fields["general.architecture"].contents())
    except (OSError, ValueError, KeyError):
        return "unreadable"


def _import_from_store(settings: Settings, directory: Path, force: bool, bits: int | None, group_size: int | None,
                       picks: list[str], everything: bool) -> None:
    from mlxserve.engine.gguf import ARCHITECTURES
    from mlxserve.engine.gguf_stores import discover

    found = discover(directory)
    if not found:
        raise ConversionError(f"no GGUF models in {directory} (LM Studio keeps them under ~/.lmstudio/models, "
                              "Ollama under ~/.ollama/models)")
    importable = {f.name: f for f in found if f.skipped is None}
    architectures = {f.name: _architecture(f.path) for f in importable.values()}
    if not picks and not everything:
        rows = [[f.name, human_bytes(f.size_bytes),
                 f.skipped or (architectures[f.name] if architectures[f.name] in ARCHITECTURES
                               else f"{architectures[f.name]} (not supported)"), str(f.path)] for f in found]
        print(table(rows, ["NAME", "SIZE", "ARCHITECTURE", "FILE"]))
        print(f"\nImport with `mlxserve import {directory} --pick NAME` (repeat --pick for more), or --all.",
              file=sys.stderr)
        return
    unknown = [p for p in picks if p not in importable]
    if unknown:
        raise ConversionError(f"not found in {directory}: {', '.join(unknown)}; run `mlxserve import {directory}` "
                              "to list what is there")
    chosen = picks or [n for n in importable if architectures[n] in ARCHITECTURES]
    failed = []
    for name in chosen:
        try:
            print(_import_one(settings, importable[name].path, name, force, bits, group_size))
        except ConversionError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            failed.append(name)
    if failed:
        raise ConversionError(f"{len(failed)} of {len(chosen)} not imported: {', '.join(failed)}")


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


