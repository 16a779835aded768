"""Every kind of bad request gets an OpenAI-style 4xx, and the server keeps serving without logging a crash."""

import http.client
import json
from urllib.parse import urlsplit

import pytest

from tests.conftest import TINY
from tests.fixtures.http import request

GOOD = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def with_(**changes):
    body = {**GOOD, **changes}
    return {k: v for k, v in body.items() if v is not ...}


CASES = [
    # (name, raw body, headers, expected status, expected param)
    ("invalid json", b'{"model": ', None, 400, None),
    ("body is a list", b"[1, 2]", None, 400, None),
    ("wrong content type", json.dumps(GOOD).encode(), {"Content-Type": "text/plain"}, 415, None),
    ("missing messages", with_(messages=...), None, 400, "messages"),
    ("messages not a list", with_(messages="hi"), None, 400, "messages"),
    ("empty messages", with_(messages=[]), None, 400, "messages"),
    ("unknown role", with_(messages=[{"role": "wizard", "content": "hi"}]), None, 400, "messages[0].role"),
    ("content wrong type", with_(messages=[{"role": "user", "content": 42}]), None, 400, "messages[0].content"),
    ("content part wrong type", with_(messages=[{"role": "user", "content": [{"type": "text", "text": 1}]}]),
     None, 400, "messages[0].content[0].text"),
    ("temperature not a number", with_(temperature="hot"), None, 400, "temperature"),
    ("temperature too high", with_(temperature=2.5), None, 400, "temperature"),
    ("temperature negative", with_(temperature=-0.1), None, 400, "temperature"),
    ("top_p zero", with_(top_p=0), None, 400, "top_p"),
    ("top_p above one", with_(top_p=1.5), None, 400, "top_p"),
    ("max_tokens zero", with_(max_tokens=0), None, 400, "max_tokens"),
    ("max_tokens not int", with_(max_tokens="ten"), None, 400, "max_tokens"),
    ("missing model", with_(model=...), None, 400, "model"),
    ("unknown model", with_(model="nope"), None, 404, "model"),
    ("model path escape", with_(model="../models"), None, 404, "model"),
    ("stop wrong type", with_(stop=5), None, 400, "stop"),
]


@pytest.mark.parametrize("name,body,headers,status,param", CASES, ids=[c[0] for c in CASES])
def test_bad_chat_request_is_a_clear_4xx(tiny_server, name, body, headers, status, param):
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    reply = request(tiny_server.base_url + "/chat/completions", "POST", body,
                    headers or {"Content-Type": "application/json"})
    assert reply.status == status, reply.body
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    if status == 404:
        assert error["code"] == "model_not_found"


def test_get_on_post_route_is_405(tiny_server):
    reply = request(tiny_server.base_url + "/chat/completions")
    assert reply.status == 405
    assert "GET" in reply.json()["error"]["message"]


def test_unknown_route_is_404_json(tiny_server):
    reply = request(tiny_server.base_url + "/nothing-here")
    assert reply.status == 404 and reply.json()["error"]["type"] == "invalid_request_error"


def test_body_over_the_limit_is_413(tiny_server):
    """Sent as curl sends big bodies (`Expect: 100-continue`), so the 413 arrives before any body byte:
    a client that pushes the whole body first may see the connection reset instead of the answer."""
    parts = urlsplit(tiny_server.base_url + "/chat/completions")
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.putrequest("POST", parts.path)
        for name, value in (("Content-Type", "application/json"), ("Content-Length", str(2 * 1024 * 1024)),
                            ("Expect", "100-continue")):
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413
        assert json.loads(resp.read())["error"]["message"]
    finally:
        conn.close()


@pytest.mark.parametrize("path,field", [("/chat/completions", "messages"), ("/completions", "prompt")])
def test_prompt_longer_than_context_is_rejected_before_prefill(tiny_server, path, field):
    long_text = "hello " * 300  # tiny model's context is 256 tokens
    body = with_(messages=[{"role": "user", "content": long_text}]) if field == "messages" else \
        {"model": TINY, "prompt": long_text}
    reply = request(tiny_server.base_url + path, "POST", body)
    assert reply.status == 400
    error = reply.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == field
    assert "256" in error["message"]
    prompt_tokens = [int(w) for w in error["message"].replace(",", " ").split() if w.isdigit()]
    assert any(n > 256 for n in prompt_tokens)


def test_unknown_fields_are_ignored(tiny_server):
    reply = request(tiny_server.base_url + "/chat/completions", "POST",
                    with_(user="me", metadata={"a": "b"}, parallel_tool_calls=False, store=False))
    assert reply.status == 200


def test_server_survives_bad_input_and_logs_no_crash(tiny_server):
    for _, body, headers, _, _ in CASES:
        request(tiny_server.base_url + "/chat/completions", "POST",
                json.dumps(body).encode() if isinstance(body, dict) else body,
                headers or {"Content-Type": "application/json"})
    assert tiny_server.alive()
    assert request(tiny_server.base_url + "/chat/completions", "POST", GOOD).status == 200
    assert "Traceback" not in tiny_server.log()
