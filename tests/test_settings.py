"""Settings: flag over environment over config.toml over default, and bad values refused by name and place."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlxserve.settings import ConfigError, resolve
from tests.fixtures.cli import mlxserve


def _home(tmp_path: Path, toml: str) -> Path:
    (tmp_path / "config.toml").write_text(toml)
    return tmp_path


def test_precedence_flag_then_environment_then_file_then_default(tmp_path: Path):
    home = _home(tmp_path, 'port = 4000\nttl = 120\nmax_queue = 5\ncors = ["https://a.example"]\n')
    env = {"MLXSERVE_TTL": "90", "MLXSERVE_MAX_QUEUE": "7"}
    settings, sources = resolve({"home": home, "max_queue": 9}, environ=env)
    assert (settings.port, settings.ttl, settings.max_queue) == (4000, 90.0, 9)
    assert settings.cors == ("https://a.example",) and settings.max_concurrent == 32
    assert sources["port"] == str(home / "config.toml")
    assert sources["ttl"] == "environment MLXSERVE_TTL"
    assert sources["max_queue"] == "command line" and sources["max_concurrent"] == "default"


@pytest.mark.parametrize("toml,key", [
    ("port = 99999\n", "port"),
    ('max_memory = "lots"\n', "max_memory"),
    ("remote_images = 3\n", "remote_images"),
    ('log_level = "loud"\n', "log_level"),
    ("colour = 1\n", "colour"),
])
def test_a_bad_value_in_the_file_names_the_key_and_the_file(tmp_path: Path, toml: str, key: str):
    home = _home(tmp_path, toml)
    with pytest.raises(ConfigError) as error:
        resolve({"home": home}, environ={})
    assert f"'{key}'" in str(error.value) and str(home / "config.toml") in str(error.value)


def test_a_bad_environment_value_names_the_variable(tmp_path: Path):
    with pytest.raises(ConfigError, match="MLXSERVE_MAX_CONCURRENT"):
        resolve({"home": tmp_path}, environ={"MLXSERVE_MAX_CONCURRENT": "zero"})


def test_the_server_does_not_start_with_a_bad_config(tmp_path: Path):
    home = _home(tmp_path, "max_queue = -1\n")
    result = mlxserve(home, "serve", "--no-preload", check=False, timeout=60)
    assert result.returncode != 0
    assert "'max_queue'" in result.stderr and str(home / "config.toml") in result.stderr
    assert "Traceback" not in result.stderr


def test_config_show_prints_values_and_sources_but_never_the_key(tmp_path: Path):
    home = _home(tmp_path, 'api_key = "s3cret-key"\nport = 4321\n')
    out = mlxserve(home, "config", "show", env={"MLXSERVE_MAX_QUEUE": "3"}).stdout
    lines = {line.split()[0]: line for line in out.splitlines() if not line.startswith("#")}
    assert "4321" in lines["port"] and str(home / "config.toml") in lines["port"]
    assert "3" in lines["max_queue"] and "environment MLXSERVE_MAX_QUEUE" in lines["max_queue"]
    assert "(default)" in lines["max_concurrent"]
    assert "s3cret-key" not in out and "hidden" in lines["api_key"]


def test_every_setting_is_a_serve_flag_of_the_same_name():
    """The README promises one name per setting: key, MLXSERVE_<NAME> and --<name>."""
    from mlxserve.cli import build_parser
    from mlxserve.settings import OPTIONS

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    flags = {flag for action in serve._actions for flag in action.option_strings}
    missing = [o.name for o in OPTIONS if "--" + o.name.replace("_", "-") not in flags]
    assert missing == []


def test_an_unknown_mlxserve_variable_stops_with_a_suggestion(tmp_path: Path):
    with pytest.raises(ConfigError, match="unknown environment variable MLXSERVE_MAX_CONCURENT; did you mean "
                                          "MLXSERVE_MAX_CONCURRENT"):
        resolve({"home": tmp_path}, environ={"MLXSERVE_MAX_CONCURENT": "4"})
    result = mlxserve(tmp_path, "config", "show", env={"MLXSERVE_PROMPTCACHE": "1GB"}, check=False)
    assert result.returncode != 0 and "MLXSERVE_PROMPT_CACHE" in result.stderr and "Traceback" not in result.stderr


def test_config_show_prints_the_paths_really_used(tmp_path: Path):
    out = mlxserve(tmp_path, "config", "show").stdout
    lines = {line.split()[0]: line for line in out.splitlines() if not line.startswith("#")}
    assert str(tmp_path / "models") in lines["models_dir"] and "(default)" in lines["models_dir"]
    assert str(tmp_path / "logs" / "mlxserve.log") in lines["log_file"]


def test_abbreviated_flags_are_refused(tmp_path: Path):
    """`--models-d x` must not quietly become --models-dir x (nor --model become --models-dir)."""
    result = mlxserve(tmp_path, "serve", "--models-d", str(tmp_path), "--no-preload", check=False, timeout=60)
    assert result.returncode != 0 and "unrecognized arguments: --models-d" in result.stderr


def test_sizes_are_labelled_in_binary_units():
    from mlxserve.settings import human_bytes, parse_bytes

    assert human_bytes(parse_bytes("48GB")) == "48.00 GiB" and human_bytes(3 * 1024**2) == "3 MiB"
    assert human_bytes(1536) == "2 KiB"
