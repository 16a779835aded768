"""Settings: one table of options, filled from flags, then `MLXSERVE_*` variables, then config.toml.

Every option has one name: the Settings field, the key in `$MLXSERVE_HOME/config.toml`, the
environment variable (`MLXSERVE_` + the name in capitals) and the flag's destination. Each value,
wherever it comes from, goes through the option's one parser, so a bad value is refused with the
same message, naming where it came from, before the server starts.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

GB = 1024**3
DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"


def physical_memory() -> int:
    """Bytes of RAM (unified memory on Apple silicon)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_max_memory() -> int:
    """On Apple silicon, the working set Metal recommends for the GPU (about three quarters of unified
    memory, sized by macOS for the machine); elsewhere three quarters of physical memory. Either leaves
    room for the OS, apps and the KV caches of requests."""
    from mlxserve.engine.wired import recommended_working_set

    return recommended_working_set() or int(physical_memory() * 0.75)


def default_prompt_cache_bytes() -> int:
    """Room for the KV caches of recent prompts, per loaded model: 1/16 of memory, at most 4 GB."""
    return min(physical_memory() // 16, 4 * GB)


def parse_bytes(text: str) -> int:
    """'8GB', '512MB', '1.5G', '1073741824' -> bytes (binary units)."""
    units = {"": 1, "K": 1024, "M": 1024**2, "G": GB, "T": 1024**4}
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1] if value and value[-1] in units else ""
    number = float(value[: len(value) - len(unit)])
    if number < 0:
        raise ValueError(f"must not be negative: {text}")
    return int(number * units[unit])


def human_bytes(n: int) -> str:
    """Bytes for people, in the binary units they are counted in: '1.25 GiB', '350 MiB', '12 KiB'."""
    if n >= GB:
        return f"{n / GB:.2f} GiB"
    return f"{n / 1024**2:.0f} MiB" if n >= 1024**2 else f"{n / 1024:.0f} KiB"


def default_home() -> Path:
    """`$MLXSERVE_HOME`, else `~/.mlxserve`."""
    return Path(os.environ.get("MLXSERVE_HOME") or Path.home() / ".mlxserve").expanduser()


class ConfigError(Exception):
    """A setting with a bad value or an unknown name; the message says which and where."""


# --- parsers: each takes a string (flag, environment) or a TOML value, and raises ValueError ---

def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def _path(value: Any) -> Path:
    return Path(_text(value)).expanduser()


def _whole(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum or \
                (maximum is not None and value > maximum):
            upper = f" to {maximum}" if maximum is not None else " or more"
            raise ValueError(f"must be a whole number from {minimum}{upper}")
        return value
    return parse


def _positive(unit: str) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        try:
            number = float(value) if not isinstance(value, bool) else -1.0
        except (TypeError, ValueError):
            number = -1.0
        if number <= 0:
            raise ValueError(f"must be a positive number of {unit}")
        return number
    return parse


_seconds = _positive("seconds")
_megabytes = _positive("MiB")


def _size(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    try:
        return parse_bytes(str(value))
    except ValueError:
        raise ValueError("must be a size such as 8GB, 512MB or a number of bytes") from None


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _names(value: Any) -> tuple[str, ...]:
    """A TOML list of strings, or a comma-separated string."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise ValueError("must be a list of names")
    return tuple(i.strip() for i in items if i.strip())


def _log_level(value: Any) -> str:
    level = str(value).lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ValueError("must be one of debug, info, warning, error")
    return level


@dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[Any], Any]
    help: str
    secret: bool = False  # never printed

    @property
    def env(self) -> str:
        return "MLXSERVE_" + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("host", _text, "address to bind; anything but loopback should have an api_key"),
    Option("port", _whole(1, 65535), "port to listen on"),
    Option("models_dir", _path, "the model directory (default: HOME/models)"),
    Option("models", _names, "models loaded at start; requests may name any model on disk"),
    Option("allowed_models", _names, "only these models may be listed and loaded (default: any)"),
    Option("ttl", _seconds, "seconds an idle model stays loaded"),
    Option("max_memory", _size, "memory budget for loaded models"),
    Option("prompt_cache", _size, "bytes of prompt KV cache per loaded model; 0 turns it off"),
    Option("responses_store", _size, "bytes of stored /v1/responses responses (SQLite in HOME); 0 keeps none"),
    Option("responses_max_age", _seconds, "seconds a stored response is kept"),
    Option("max_concurrent", _whole(1), "sequences each model generates at once"),
    Option("max_queue", _whole(0), "requests that may wait for a slot before 503s"),
    Option("stall_seconds", _seconds, "/health is unhealthy when the engine loop is stuck this long"),
    Option("request_timeout", _seconds, "seconds a client has to send a request's headers, and again its body"),
    Option("max_body_mb", _megabytes, "largest request body, MiB"),
    Option("max_image_mb", _megabytes, "largest image in a chat message, MiB"),
    Option("remote_images", _flag, "fetch http(s) image URLs (public addresses only, unless listed in "
           "remote_image_hosts)"),
    Option("remote_image_hosts", _names, "the only hosts remote image URLs may name (.example.com: and its "
           "subdomains); they may be private addresses"),
    Option("image_folder", _path, "folder that file:// image URLs may read from"),
    Option("api_key", _text, "clients must send `Authorization: Bearer <key>`", secret=True),
    Option("api_key_file", _path, "file holding the API key (first line)"),
    Option("cors", _names, "origins allowed to call from a browser, or *"),
    Option("allowed_hosts", _names, "names the server answers to in the Host header, besides IP addresses, "
           "localhost and this machine's name; * for any"),
    Option("distributed", _flag, "serve as one rank of an mlx.launch group (see `mlxserve launch`)"),
    Option("pipeline", _flag, "distributed: split models by layers (pipeline) instead of tensor-parallel"),
    Option("log_level", _log_level, "debug, info, warning or error; debug also logs prompts"),
    Option("log_file", _path, "rotating log of the server and one line per request (default: HOME/logs/mlxserve.log)"),
)
OPTIONS_BY_NAME = {o.name: o for o in OPTIONS}


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 1234
    home: Path = field(default_factory=default_home)
    models_dir: Path | None = None  # None: home/models
    models: tuple[str, ...] = (DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL)
    allowed_models: tuple[str, ...] | None = None  # None: any model in the model directory
    ttl: float = 3600.0
    max_memory: int = field(default_factory=default_max_memory)
    prompt_cache: int = field(default_factory=default_prompt_cache_bytes)
    responses_store: int = 256 * 2**20
    responses_max_age: float = 30 * 24 * 3600.0
    max_concurrent: int = 32
    max_queue: int = 64
    stall_seconds: float = 60.0
    request_timeout: float = 60.0
    max_body_mb: float = 64.0
    max_image_mb: float = 20.0
    remote_images: bool = False
    remote_image_hosts: tuple[str, ...] = ()
    image_folder: Path | None = None
    api_key: str | None = None
    api_key_file: Path | None = None
    cors: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    distributed: bool = False
    pipeline: bool = False
    log_level: str = "info"
    log_file: Path | None = None  # None: home/logs/mlxserve.log

    @property
    def model_directory(self) -> Path:
        return self.models_dir or self.home / "models"

    @property
    def log_path(self) -> Path:
        return self.log_file or self.home / "logs" / "mlxserve.log"

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * 1024 * 1024)

    def keys(self) -> tuple[str, ...]:
        """The API keys: `api_key`, and every non-empty line of `api_key_file` (one per client)."""
        keys = [self.api_key] if self.api_key else []
        if self.api_key_file is not None:
            try:
                lines = [line.strip() for line in self.api_key_file.read_text().splitlines()]
            except (OSError, UnicodeDecodeError):
                raise ConfigError(f"api_key_file: cannot read {self.api_key_file}") from None
            if not any(lines):
                raise ConfigError(f"api_key_file: {self.api_key_file} holds no key")
            keys += [line for line in lines if line]
        return tuple(keys)

    def key(self) -> str | None:
        """The key the CLI sends to the server: the first one."""
        keys = self.keys()
        return keys[0] if keys else None


def config_path(home: Path, explicit: Path | None = None) -> Path:
    """`--config`, else `$MLXSERVE_CONFIG`, else HOME/config.toml."""
    if explicit is not None:
        return explicit
    from_env = os.environ.get("MLXSERVE_CONFIG")
    return Path(from_env).expanduser() if from_env else home / "config.toml"


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        values = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(values) - set(OPTIONS_BY_NAME))
    if unknown:
        raise ConfigError(f"{path}: unknown setting '{unknown[0]}' (known: {', '.join(OPTIONS_BY_NAME)})")
    return values


def resolve(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None,
            config: Path | None = None) -> tuple[Settings, dict[str, str]]:
    """The effective settings and, for each option, where its value came from.

    `flags` holds values already parsed from the command line (None: not given). Precedence:
    flag, then environment variable, then config file, then default. The home directory
    comes from `--home` or `$MLXSERVE_HOME` (it locates the config file).
    """
    environ = os.environ if environ is None else environ
    settings = Settings()
    sources = {o.name: "default" for o in OPTIONS}
    home = flags.get("home")
    settings.home = home if home is not None else default_home()
    sources["home"] = "command line" if home is not None else ("environment MLXSERVE_HOME"
                                                                 if environ.get("MLXSERVE_HOME") else "default")
    path = config_path(settings.home, config)
    for name, value in _read_file(path).items():
        _apply(settings, sources, name, value, f"{path}")
    _check_environment(environ)
    for option in OPTIONS:
        if option.env in environ:
            _apply(settings, sources, option.name, environ[option.env], f"environment {option.env}")
    for option in OPTIONS:
        if flags.get(option.name) is not None:
            setattr(settings, option.name, flags[option.name])
            sources[option.name] = "command line"
    if settings.allowed_models is not None:  # only what may be loaded is loaded at start
        settings.models = tuple(m for m in settings.models if m in settings.allowed_models)
    settings.keys()  # an unreadable key file stops the server here
    return settings, sources


# Variables that are not settings: where the home and config file are, and the CPU BLAS switches (blas.py).
OTHER_VARIABLES = ("MLXSERVE_HOME", "MLXSERVE_CONFIG", "MLXSERVE_BLAS", "MLXSERVE_BLAS_SHIM")


def _check_environment(environ: Mapping[str, str]) -> None:
    """A misspelled MLXSERVE_* variable would otherwise be ignored without a word."""
    known = {o.env for o in OPTIONS} | set(OTHER_VARIABLES)
    for name in sorted(environ):
        if name.startswith("MLXSERVE_") and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else f" (known: {', '.join(sorted(known))})"
            raise ConfigError(f"unknown environment variable {name}{hint}")


def _apply(settings: Settings, sources: dict[str, str], name: str, value: Any, where: str) -> None:
    try:
        setattr(settings, name, OPTIONS_BY_NAME[name].parse(value))
    except ValueError as exc:
        raise ConfigError(f"{where}: '{name}' {exc} (got {value!r})") from None
    sources[name] = where


def describe(settings: Settings, sources: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(name, value, source) for `mlxserve config show`; secrets are masked."""
    rows = [("home", str(settings.home), sources["home"])]
    for option in OPTIONS:
        value = getattr(settings, option.name)
        if option.name == "models_dir":
            value = settings.model_directory  # what is used, when it is the default too
        elif option.name == "log_file":
            value = settings.log_path
        if option.secret and value:
            shown = "(set, hidden)"
        elif isinstance(value, tuple):
            shown = ", ".join(value) or "(none)"
        elif value is None:
            shown = "(none)"
        elif option.name in ("max_memory", "prompt_cache"):
            shown = human_bytes(value)
        else:
            shown = str(value)
        rows.append((option.name, shown, sources[option.name]))
    return rows

