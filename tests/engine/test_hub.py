"""`mlxserve pull OWNER/NAME[@REVISION]` against a fake Hugging Face Hub on loopback."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.fixtures.cli import mlxserve
from tests.fixtures.fake_hub import COMMIT, FakeHub

JUNK = {"pytorch_model.bin": b"torch weights", "model-q4.gguf": b"GGUF duplicate", "original/consolidated.pth": b"x"}


@pytest.fixture
def hub(tiny_home: Path):
    hub = FakeHub.from_folder("tester/Tiny-Llama-MLX", tiny_home / "models" / TINY, JUNK)
    hub.repos["tester/no-weights"] = {"config.json": b"{}", "pytorch_model.bin": b"x"}
    yield hub
    hub.close()


def test_pull_downloads_only_model_files_and_the_model_is_listed(hub: FakeHub, tmp_path: Path):
    result = mlxserve(tmp_path, "pull", "tester/Tiny-Llama-MLX", env={"HF_ENDPOINT": hub.url})
    target = tmp_path / "models" / "tiny-llama-mlx"
    assert result.stdout.strip() == str(target)
    fetched = {key.split("/", 2)[2] for key in hub.downloads}
    assert "model.safetensors" in fetched and "config.json" in fetched and "tokenizer.json" in fetched
    assert not fetched & set(JUNK)
    listed = json.loads(mlxserve(tmp_path, "ls", "--json").stdout)
    assert [m["id"] for m in listed] == ["tiny-llama-mlx"]
    assert listed[0]["capabilities"] == ["chat", "completions"]
    assert not (target / ".cache").exists()
    # A second pull finds it and downloads nothing.
    hub.downloads.clear()
    again = mlxserve(tmp_path, "pull", "tester/Tiny-Llama-MLX", env={"HF_ENDPOINT": hub.url})
    assert "already" in again.stderr and hub.downloads == []


def test_pull_at_a_revision_and_under_a_name(hub: FakeHub, tmp_path: Path):
    mlxserve(tmp_path, "pull", f"tester/Tiny-Llama-MLX@{COMMIT}", "--name", "mine", env={"HF_ENDPOINT": hub.url})
    assert (tmp_path / "models" / "mine" / "model.safetensors").is_file()


def test_a_dropped_connection_resumes_where_it_stopped(hub: FakeHub, tmp_path: Path):
    """huggingface_hub writes 10 MiB chunks, and a retry asks for the rest with a Range request."""
    weights = random.Random(0).randbytes(24 * 1024 * 1024)
    hub.repos["tester/big"] = {"config.json": b'{"model_type": "llama"}', "model.safetensors": weights}
    cut = 15 * 1024 * 1024
    hub.fail_after["tester/big/model.safetensors"] = cut
    mlxserve(tmp_path, "pull", "tester/big", env={"HF_ENDPOINT": hub.url})
    assert (tmp_path / "models" / "big" / "model.safetensors").read_bytes() == weights
    assert len(hub.resumed_from) == 1 and 0 < hub.resumed_from[0] <= cut


@pytest.mark.parametrize("reference,message", [
    ("tester/Tiny-Llama-MLX@v9", "v9"),
    ("tester/unknown", "tester/unknown"),
    ("tester/no-weights", "safetensors"),
    ("not-a-repo", "built-in"),
])
def test_bad_pulls_fail_with_a_clear_message(hub: FakeHub, tmp_path: Path, reference: str, message: str):
    result = mlxserve(tmp_path, "pull", reference, env={"HF_ENDPOINT": hub.url}, check=False)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not any((tmp_path / "models").glob("*/config.json"))
