"""`mlxserve import FOLDER`: the models in LM Studio's and Ollama's stores, listed and imported by name."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from mlxserve.engine.gguf_stores import readable_name
from tests.fixtures.cli import mlxserve

DATA = Path(__file__).parent.parent / "data" / "gguf"


@pytest.fixture
def lmstudio(tmp_path: Path) -> Path:
    store = tmp_path / "lmstudio" / "models"
    repo = store / "someone" / "Tiny-Qwen-GGUF"
    repo.mkdir(parents=True)
    shutil.copy(DATA / "qwen2-q4_k_m.gguf", repo / "Tiny-Qwen-Q4_K_M.gguf")
    shutil.copy(DATA / "qwen2-q4_k_m.gguf", repo / "mmproj-Tiny-Qwen-F16.gguf")
    shutil.copy(DATA / "gemma2-q4_k_m.gguf", store / "someone" / "Big-Gemma-00001-of-00002.gguf")
    (store / "other" / "Tiny-Llama").mkdir(parents=True)
    shutil.copy(DATA / "llama-q6_k.gguf", store / "other" / "Tiny-Llama" / "tiny-llama.Q6_K.gguf")
    return store


def _ollama_model(store: Path, manifest: str, gguf: Path) -> None:
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    shutil.copy(gguf, store / "blobs" / f"sha256-{digest}")
    path = store / "manifests" / "registry.ollama.ai" / manifest
    path.parent.mkdir(parents=True, exist_ok=True)
    template = {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64, "size": 10}
    model = {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}",
             "size": gguf.stat().st_size}
    path.write_text(json.dumps({"schemaVersion": 2, "layers": [model, template]}))


@pytest.fixture
def ollama(tmp_path: Path) -> Path:
    home = tmp_path / "dot-ollama"
    _ollama_model(home / "models", "library/tinyllama/3b", DATA / "llama3-q4_k_m.gguf")
    _ollama_model(home / "models", "someone/tiny-phi/latest", DATA / "phi3-q4_k_m.gguf")
    return home


def test_a_folder_is_listed_with_what_can_be_imported(tmp_path: Path, lmstudio: Path):
    listing = mlxserve(tmp_path, "import", str(lmstudio))
    lines = {line.split()[0]: line for line in listing.stdout.splitlines()[1:]}
    assert "qwen2" in lines["tiny-qwen-q4_k_m"] and "llama" in lines["tiny-llama.q6_k"]
    assert "vision projector" in lines["mmproj-tiny-qwen-f16"]
    assert "split file" in lines["big-gemma-00001-of-00002"]
    assert "--pick" in listing.stderr
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())  # only listed


def test_picked_models_of_lm_studios_store_are_imported_under_their_names(tmp_path: Path, lmstudio: Path):
    result = mlxserve(tmp_path, "import", str(lmstudio), "--pick", "tiny-qwen-q4_k_m", "--pick", "tiny-llama.q6_k")
    assert result.stdout.split() == [str(tmp_path / "models" / n) for n in ("tiny-qwen-q4_k_m", "tiny-llama.q6_k")]
    listed = {m["id"]: m for m in json.loads(mlxserve(tmp_path, "ls", "--json").stdout)}
    assert listed["tiny-qwen-q4_k_m"]["architecture"] == "Qwen2ForCausalLM"
    assert listed["tiny-llama.q6_k"]["architecture"] == "LlamaForCausalLM"


def test_all_of_ollamas_store_is_imported_under_its_model_and_tag_names(tmp_path: Path, ollama: Path):
    listing = mlxserve(tmp_path, "import", str(ollama))  # ~/.ollama itself: its models folder is found
    assert {line.split()[0] for line in listing.stdout.splitlines()[1:]} == {"tinyllama-3b", "someone-tiny-phi-latest"}
    mlxserve(tmp_path, "import", str(ollama), "--all")
    listed = {m["id"]: m["architecture"] for m in json.loads(mlxserve(tmp_path, "ls", "--json").stdout)}
    assert listed == {"tinyllama-3b": "LlamaForCausalLM", "someone-tiny-phi-latest": "Phi3ForCausalLM"}


def test_a_name_not_in_the_store_is_an_error_that_says_how_to_list(tmp_path: Path, ollama: Path):
    result = mlxserve(tmp_path, "import", str(ollama), "--pick", "llama3.2-3b", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "llama3.2-3b" in result.stderr and f"mlxserve import {ollama}" in result.stderr


def test_store_names_become_model_ids():
    assert readable_name("Qwen2.5-7B-Instruct-Q4_K_M") == "qwen2.5-7b-instruct-q4_k_m"
    assert readable_name("hf.co/bartowski/Llama 3.2:3b") == "hf.co-bartowski-llama-3.2-3b"
    assert readable_name("..hidden") == "hidden"
