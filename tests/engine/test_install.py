"""Model names and installs: nothing outside the model directory, one install of a name at a time."""

from __future__ import annotations

import fcntl
import subprocess
import sys
from pathlib import Path

import pytest

from mlxserve.engine.gguf import convert_gguf
from mlxserve.engine.names import InvalidModelNameError, check_model_name
from mlxserve.engine.store import ModelStore
from mlxserve.protocol import ConversionError
from tests.fixtures.cli import mlxserve
from tests.fixtures.tiny_gguf import write_tiny_gguf


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.mark.parametrize("name", ["..", ".", "../../x", "a/b", "a\\b", ".hidden", "x" * 129, "tiny\nllama", "",
                                  "naïve", "a..b", "-dash-first"])
def test_names_that_are_not_one_folder_are_refused(name):
    with pytest.raises(InvalidModelNameError):
        check_model_name(name)


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "Qwen2.5-7B-Instruct-4bit", "llama3@q4", "x" * 128])
def test_ordinary_names_are_accepted(name):
    assert check_model_name(name) == name


@pytest.mark.parametrize("name", ["..", "../../outside", "."])
def test_import_with_a_name_that_walks_out_touches_nothing(tmp_path: Path, gguf: Path, name: str):
    home = tmp_path / "home"
    (home / "models" / "keep").mkdir(parents=True)
    (home / "models" / "keep" / "config.json").write_text("{}")
    result = mlxserve(home, "import", str(gguf), "--name", name, check=False)
    assert result.returncode != 0 and "not a valid model name" in result.stderr
    assert "Traceback" not in result.stderr
    assert (home / "models" / "keep" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_dir()) == ["home", "keep", "models"]


def test_an_install_of_a_name_being_installed_is_refused(tmp_path: Path, gguf: Path):
    models = tmp_path / "models"
    models.mkdir()
    with open(models / ".tiny.lock", "a") as lock:  # another process is installing "tiny"
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(ConversionError, match="another install of 'tiny' is running"):
            convert_gguf(gguf, models / "tiny", replace=False)
    assert ModelStore(models).list() == []


def test_concurrent_imports_of_one_name_leave_one_whole_model(tmp_path: Path, gguf: Path):
    home = tmp_path / "home"
    runs = [subprocess.Popen([sys.executable, "-m", "mlxserve", "import", str(gguf), "--name", "twin", "--home",
                              str(home)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(3)]
    outcomes = [(r.wait(timeout=300), r.stderr.read()) for r in runs]
    assert sum(code == 0 for code, _ in outcomes) >= 1
    for code, err in outcomes:
        assert "Traceback" not in err
        if code != 0:
            assert "another install of 'twin' is running" in err or "a model named 'twin' exists" in err
    folder = home / "models" / "twin"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert [m.id for m in ModelStore(home / "models").list()] == ["twin"]
    assert not list((home / "models").glob("*.partial"))


def test_a_stale_partial_folder_is_cleared_by_the_next_install(tmp_path: Path, gguf: Path):
    models = tmp_path / "models"
    (models / "tiny.partial").mkdir(parents=True)
    (models / "tiny.partial" / "leftover.bin").write_bytes(b"x" * 100)
    convert_gguf(gguf, models / "tiny", replace=False)
    assert not (models / "tiny" / "leftover.bin").exists() and not (models / "tiny.partial").exists()
