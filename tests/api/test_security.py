"""API key, CORS and the request log, through a real server."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from openai import OpenAI

from tests.conftest import TINY
from tests.fixtures.http import request
from tests.fixtures.server import ServerProcess

KEY = "sk-local-0123456789"
WEB = "https://chat.example"


@pytest.fixture(scope="module")
def locked(tiny_home: Path):
    server = ServerProcess(tiny_home, [TINY], ["--api-key", KEY, "--cors", f"{WEB},http://localhost:3000",
                                               "--allowed-hosts", "my.lan"])
    yield server
    server.stop()


def test_requests_without_the_key_get_401_and_with_it_200(locked: ServerProcess):
    with pytest.raises(openai.AuthenticationError) as error:
        OpenAI(base_url=locked.base_url, api_key="wrong-key", max_retries=0).models.list()
    assert error.value.status_code == 401 and error.value.body["code"] == "invalid_api_key"
    assert "wrong-key" not in str(error.value.body) and KEY not in str(error.value.body)
    for path in ("/v1/models", "/api/v0/ps"):
        reply = request(locked.base_url.removesuffix("/v1") + path)
        assert reply.status == 401 and reply.json()["error"]["type"] == "authentication_error"
    client = OpenAI(base_url=locked.base_url, api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == [TINY]
    reply = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply.usage.completion_tokens > 0
    assert request(locked.base_url.removesuffix("/v1") + "/health").status == 200  # open to service managers
    assert KEY not in locked.log()


def _preflight(server: ServerProcess, origin: str):
    return request(server.base_url + "/chat/completions", "OPTIONS", None, {
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})


def test_cors_preflight_is_answered_for_configured_origins_only(locked: ServerProcess):
    allowed = _preflight(locked, WEB)
    assert allowed.status == 204
    assert allowed.headers["access-control-allow-origin"] == WEB
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    refused = _preflight(locked, "https://evil.example")
    assert refused.status == 403 and "access-control-allow-origin" not in refused.headers
    reply = request(locked.base_url + "/models", headers={"Origin": WEB, "Authorization": f"Bearer {KEY}"})
    assert reply.status == 200 and reply.headers["access-control-allow-origin"] == WEB
    other = request(locked.base_url + "/models", headers={"Origin": "https://evil.example",
                                                          "Authorization": f"Bearer {KEY}"})
    assert "access-control-allow-origin" not in other.headers


def test_cors_is_off_by_default(tiny_server: ServerProcess):
    assert _preflight(tiny_server, WEB).status == 403
    assert "access-control-allow-origin" not in request(tiny_server.base_url + "/models",
                                                        headers={"Origin": WEB}).headers


def test_one_log_line_per_request_without_the_prompt(locked: ServerProcess):
    client = OpenAI(base_url=locked.base_url, api_key=KEY, max_retries=0)
    before = len(locked.log())
    secret_prompt = "my very private question"
    client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": secret_prompt}], max_tokens=3)
    list(client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": secret_prompt}],
                                        max_tokens=3, stream=True))
    log = locked.log()[before:]
    lines = [line for line in log.splitlines() if "mlxserve.access" in line and "/v1/chat/completions" in line]
    assert len(lines) == 2
    for line in lines:
        assert "POST /v1/chat/completions status=200" in line and f"model={TINY}" in line
        assert "completion_tokens=" in line and "ttft=" in line and "duration=" in line
    assert secret_prompt not in log


def test_listening_beyond_loopback_without_a_key_warns(tiny_home: Path):
    server = ServerProcess(tiny_home, [], ["--host", "0.0.0.0"])
    try:
        assert "reachable from other machines, without an API key" in server.log()
    finally:
        server.stop()
    keyed = ServerProcess(tiny_home, [], ["--host", "0.0.0.0", "--api-key", KEY])
    try:
        assert "without an API key" not in keyed.log()
    finally:
        keyed.stop()


@pytest.mark.parametrize("host,allowed", [
    ("evil.example", False), ("evil.example:1234", False), ("127.0.0.1.nip.io", False),
    ("localhost", True), ("LOCALHOST:1234", True), ("127.0.0.1:1234", True), ("[::1]:1234", True),
    ("app.localhost", True), ("my.lan", True), ("my.lan.", True),
])
def test_the_host_header_must_name_this_server(locked: ServerProcess, host: str, allowed: bool):
    """DNS rebinding: a page at evil.example whose name resolves to 127.0.0.1 must get nowhere."""
    for path in ("/v1/models", "/api/v0/logs/stream", "/health"):
        if path.endswith("stream") and allowed:
            continue  # would stay open
        reply = request(locked.base_url.removesuffix("/v1") + path, headers={"Host": host,
                                                                             "Authorization": f"Bearer {KEY}"})
        if allowed:
            assert reply.status == 200, (path, reply.body)
        else:
            assert reply.status == 403 and reply.json()["error"]["code"] == "invalid_host", (path, reply.body)


def test_each_api_key_has_a_prompt_cache_of_its_own(tiny_home: Path, tmp_path: Path):
    """Otherwise cached_tokens would tell one client how another one's prompts begin."""
    keys = tmp_path / "keys"
    keys.write_text("sk-alice\n\nsk-bob\n")
    server = ServerProcess(tiny_home, [TINY], ["--api-key-file", str(keys)])
    try:
        alice, bob = (OpenAI(base_url=server.base_url, api_key=k, max_retries=0) for k in ("sk-alice", "sk-bob"))
        secret = [{"role": "user", "content": "my secret project is called bluebird and it is due friday"}]

        def cached(client: OpenAI) -> int:
            reply = client.chat.completions.create(model=TINY, messages=secret, max_tokens=2, temperature=0)
            return reply.usage.prompt_tokens_details.cached_tokens

        assert cached(alice) == 0
        assert cached(bob) == 0  # same prompt, other key: nothing shared
        assert cached(alice) > 10 and cached(bob) > 10  # each key reuses its own
    finally:
        server.stop()


def test_anthropic_clients_send_the_key_as_x_api_key_and_get_anthropics_401(locked: ServerProcess):
    import anthropic

    ask = {"model": TINY, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    with pytest.raises(anthropic.AuthenticationError) as error:
        anthropic.Anthropic(base_url=locked.base_url.removesuffix("/v1"), api_key="wrong-key",
                            max_retries=0).messages.create(**ask)
    assert error.value.status_code == 401 and error.value.body["type"] == "error"
    assert error.value.body["error"]["type"] == "authentication_error"
    reply = anthropic.Anthropic(base_url=locked.base_url.removesuffix("/v1"), api_key=KEY,
                                max_retries=0).messages.create(**ask)
    assert reply.type == "message"
