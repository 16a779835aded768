"""Model management in the running server: just-in-time loading, TTL, the memory budget, /api/v0."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from mlxserve.engine.gguf import convert_gguf
from tests.fixtures.http import request
from tests.fixtures.server import ServerProcess
from tests.fixtures.tiny_gguf import write_tiny_gguf

MODELS = ("tiny-a", "tiny-b", "tiny-c")
NO_END = {"0": -100, "1": -100, "2": -100}  # the tiny model's special tokens: generate to max_tokens


@pytest.fixture(scope="module")
def three_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("three")
    gguf = write_tiny_gguf(home / "tiny.gguf")
    for name in MODELS:
        convert_gguf(gguf, home / "models" / name)
    return home


@pytest.fixture
def server_with(three_models: Path):
    started: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        # Without a prompt cache, the budgets below count the weights alone (the last test counts both).
        cache = [] if "--prompt-cache" in args else ["--prompt-cache", "0"]
        started.append(ServerProcess(three_models, [], cache + list(args)))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def admin(server: ServerProcess, path: str, body: dict | None = None):
    return request(server.base_url.removesuffix("/v1") + "/api/v0" + path, "POST" if body is not None else "GET", body)


def chat(server: ServerProcess, model: str, **extra):
    return request(server.base_url + "/chat/completions", "POST",
                   {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **extra})


def loaded(server: ServerProcess) -> dict[str, dict]:
    return {m["id"]: m for m in admin(server, "/ps").json()["data"]}


def test_concurrent_requests_for_an_unloaded_model_share_one_load(server_with):
    server = server_with()
    assert loaded(server) == {}
    states = {m["id"]: m["state"] for m in admin(server, "/models").json()["data"]}
    assert states == dict.fromkeys(MODELS, "not-loaded")
    replies: list = []
    threads = [threading.Thread(target=lambda: replies.append(chat(server, "tiny-a"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status for r in replies] == [200] * 8
    assert server.log().count("loaded tiny-a") == 1
    assert list(loaded(server)) == ["tiny-a"]
    assert admin(server, "/models/tiny-a").json()["state"] == "loaded"
    assert admin(server, "/models/tiny-b").json()["state"] == "not-loaded"


def test_an_idle_model_unloads_after_its_ttl(server_with):
    server = server_with()
    assert chat(server, "tiny-b", ttl=1).status == 200
    assert loaded(server)["tiny-b"]["ttl_seconds"] == 1
    deadline = time.monotonic() + 10
    while "tiny-b" in loaded(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "tiny-b" not in loaded(server)
    assert "unloading tiny-b: idle" in server.log()
    # It comes back just in time, with the server's default TTL.
    assert chat(server, "tiny-b").status == 200
    assert loaded(server)["tiny-b"]["ttl_seconds"] == 3600


def test_the_least_recently_used_idle_model_makes_room(server_with):
    server = server_with("--max-memory", "800K")  # room for two tiny models
    for model in ("tiny-a", "tiny-b", "tiny-a", "tiny-c"):
        assert chat(server, model).status == 200
    assert sorted(loaded(server)) == ["tiny-a", "tiny-c"]
    assert "unloading tiny-b (least recently used) to make room for tiny-c" in server.log()


def test_a_model_larger_than_the_budget_gets_a_503_naming_sizes(server_with):
    server = server_with("--max-memory", "100K")
    reply = chat(server, "tiny-a")
    assert reply.status == 503
    error = reply.json()["error"]
    assert "tiny-a" in error["message"] and "356 KiB" in error["message"] and "100 KiB" in error["message"]
    assert chat(server, "tiny-a").status == 503 and server.alive()


def test_the_budget_counts_a_models_prompt_cache(server_with):
    server = server_with("--max-memory", "500K", "--prompt-cache", "300K")  # 356K of weights fit, 656K do not
    reply = chat(server, "tiny-a")
    assert reply.status == 503
    message = reply.json()["error"]["message"]
    assert "needs 656 KiB (356 KiB of weights as loaded here, 300 KiB of prompt cache" in message


def test_a_busy_model_is_never_unloaded_to_make_room(server_with):
    server = server_with("--max-memory", "500K")  # room for one
    body = {"model": "tiny-a", "prompt": "hello", "max_tokens": 250, "n": 4, "stream": True, "logit_bias": NO_END}
    result: dict = {}

    def long_stream() -> None:
        result["reply"] = request(server.base_url + "/completions", "POST", body)

    streaming = threading.Thread(target=long_stream)
    streaming.start()
    deadline = time.monotonic() + 30
    while loaded(server).get("tiny-a", {}).get("requests_in_flight", 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    reply = chat(server, "tiny-b")
    streaming.join()
    assert reply.status == 503
    assert "tiny-a" in reply.json()["error"]["message"] and "serving requests" in reply.json()["error"]["message"]
    assert result["reply"].status == 200 and result["reply"].body.count(b'"finish_reason":"length"') == 4
    assert chat(server, "tiny-b").status == 200  # once idle, tiny-a makes room
    assert list(loaded(server)) == ["tiny-b"]


def test_load_and_unload_through_the_admin_api(server_with):
    server = server_with()
    reply = admin(server, "/models/load", {"model": "tiny-c", "ttl": 120})
    assert reply.status == 200 and reply.json()["state"] == "loaded"
    assert loaded(server)["tiny-c"]["ttl_seconds"] == 120
    assert admin(server, "/models/unload", {"model": "tiny-c"}).json() == {"unloaded": ["tiny-c"]}
    assert loaded(server) == {}
    assert admin(server, "/models/load", {"model": "nope"}).status == 404
    assert admin(server, "/models/load", {"model": "tiny-a", "ttl": -1}).json()["error"]["param"] == "ttl"
    admin(server, "/models/load", {"model": "tiny-a"})
    admin(server, "/models/load", {"model": "tiny-b"})
    assert sorted(admin(server, "/models/unload", {"all": True}).json()["unloaded"]) == ["tiny-a", "tiny-b"]


def test_allow_model_restricts_what_may_be_loaded(server_with):
    server = server_with("--allow-model", "tiny-a")
    assert chat(server, "tiny-a").status == 200
    refused = chat(server, "tiny-b")
    assert refused.status == 403 and "tiny-b" in refused.json()["error"]["message"]
    assert [m["id"] for m in request(server.base_url + "/models").json()["data"]] == ["tiny-a"]
