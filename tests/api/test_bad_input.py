"""Every kind of bad request gets an OpenAI-style 4xx, and the server keeps serving without logging a crash."""

import http.client
import socket
import time
import json
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest

from tests.conftest import TINY
from tests.fixtures.http import Reply, request, sse_events

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
    ("model path escape", with_(model="../models"), None, 400, "model"),
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


# --- the corpus: what crashed the server or answered 500 -----------------------------------------

def raw(text: str) -> bytes:
    return text.encode()


HUGE = "1" + "0" * 400  # 10**400: an integer no field can hold, and too big for a float
COMPLETION = {"model": TINY, "prompt": "hi", "max_tokens": 2}

CORPUS = [
    # (name, path, body, expected status, expected param)
    ("json nested 100,000 deep", "/chat/completions",
     raw('{"model": "tiny-llama", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}"), 400, None),
    ("integer literal of 5000 digits", "/chat/completions",
     raw('{"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + "7" * 5000 + "}"),
     400, None),
    ("10**400 temperature", "/chat/completions", raw(json.dumps(GOOD)[:-1] + f', "temperature": {HUGE}}}'),
     400, "temperature"),
    ("10**400 max_tokens", "/chat/completions", raw(json.dumps(GOOD)[:-1].replace('"max_tokens": 2', f'"max_tokens": {HUGE}') + "}"),
     400, "max_tokens"),
    ("10**400 seed", "/completions", raw(json.dumps(COMPLETION)[:-1] + f', "seed": {HUGE}}}'), 400, "seed"),
    ("10**400 top_k", "/completions", raw(json.dumps(COMPLETION)[:-1] + f', "top_k": {HUGE}}}'), 400, "top_k"),
    ("10**400 ttl", "/completions", raw(json.dumps(COMPLETION)[:-1] + f', "ttl": {HUGE}}}'), 400, "ttl"),
    ("10**400 logit_bias value", "/completions", raw(json.dumps(COMPLETION)[:-1] + f', "logit_bias": {{"5": {HUGE}}}}}'),
     400, "logit_bias"),
    ("logit_bias key of 400 digits", "/completions", {**COMPLETION, "logit_bias": {HUGE: 1}}, 400, "logit_bias"),
    ("repeat_last_n 1e30", "/chat/completions", with_(repeat_penalty=1.2, repeat_last_n=1e30), 400, "repeat_last_n"),
    ("seed 2**64", "/chat/completions", with_(seed=2**64), 400, "seed"),
    ("model id of 300 characters", "/chat/completions", with_(model="m" * 300), 400, "model"),
    ("model id with a newline", "/chat/completions", with_(model="tiny\nllama"), 400, "model"),
    ("lone surrogate in content", "/chat/completions",
     raw('{"model": "tiny-llama", "messages": [{"role": "user", "content": "hi \\ud800 there"}]}'),
     400, "messages[0].content"),
    ("lone surrogate in prompt", "/completions", raw('{"model": "tiny-llama", "prompt": "\\udfff"}'), 400, "prompt"),
    ("prompt token id past the vocabulary", "/completions", {**COMPLETION, "prompt": [5, 267]}, 400, "prompt"),
    ("prompt token id of 400 digits", "/completions", {**COMPLETION, "prompt": [int(HUGE)]}, 400, "prompt"),
    ("negative prompt token id", "/completions", {**COMPLETION, "prompt": [-1]}, 400, "prompt"),
    ("prompt of 1 MB", "/completions", {**COMPLETION, "prompt": "word " * 200_000}, 400, "prompt"),
    ("body over the limit", "/completions", {**COMPLETION, "prompt": "word " * 300_000}, 413, None),
    ("prompt far past the context", "/completions", {**COMPLETION, "prompt": "x" * 200_000}, 400, "prompt"),
    ("embeddings from a chat model", "/embeddings", {"model": TINY, "input": "hi"}, 400, "model"),
]

FINE = [
    # Values at the edges that are valid: each must answer 200.
    ("seed -1", "/chat/completions", with_(seed=-1, temperature=1.0)),
    ("seed 2**63-1 with n=2", "/chat/completions", with_(seed=2**63 - 1, n=2, temperature=1.0)),
    ("repeat_last_n past the context", "/completions", {**COMPLETION, "repeat_penalty": 1.3, "repeat_last_n": 2**62}),
    ("surrogate pair (an emoji)", "/chat/completions",
     raw('{"model": "tiny-llama", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}], "max_tokens": 2}')),
]


def _send(server, path: str, body) -> Reply:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    return request(server.base_url + path, "POST", body, {"Content-Type": "application/json"})


@pytest.mark.parametrize("name,path,body,status,param", CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus_case_is_a_clear_4xx(tiny_server, name, path, body, status, param):
    reply = _send(tiny_server, path, body)
    assert reply.status == status, reply.body[:500]
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert len(reply.body) < 2000  # no echo of a huge value


@pytest.mark.parametrize("name,path,body", FINE, ids=[c[0] for c in FINE])
def test_edge_values_are_served(tiny_server, name, path, body):
    reply = _send(tiny_server, path, body)
    assert reply.status == 200, reply.body[:500]


def test_the_corpus_disturbs_no_stream_in_flight(tiny_server):
    """A stream runs while every bad request of the corpus arrives; it ends as it would have alone."""
    body = {"model": TINY, "prompt": "once upon a time", "max_tokens": 120, "temperature": 0, "stream": True,
            "logit_bias": {"0": -100, "1": -100, "2": -100}}
    alone = _send(tiny_server, "/completions", body).body
    with ThreadPoolExecutor(2) as pool:
        streaming = pool.submit(_send, tiny_server, "/completions", body)
        for _, path, bad, status, _ in CORPUS + [(c[0], "/chat/completions", c[1], c[3], c[4]) for c in CASES
                                               if c[2] is None]:
            assert _send(tiny_server, path, bad).status == status
        together = streaming.result().body
    texts = [[json.loads(e)["choices"][0]["text"] for e in sse_events(b) if e != "[DONE]"] for b in (alone, together)]
    assert "".join(texts[0]) == "".join(texts[1]) and len(texts[0]) > 50
    assert together.endswith(b"data: [DONE]\n\n")
    assert tiny_server.alive() and "Traceback" not in tiny_server.log()


def _raw_exchange(server, data: bytes, wait: float = 10) -> bytes:
    parts = urlsplit(server.base_url)
    with socket.create_connection((parts.hostname, parts.port), timeout=wait) as conn:
        conn.sendall(data)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
            if b"\r\n\r\n" in received and b'"error"' in received and received.rstrip().endswith(b"}"):
                break
        return received


def test_oversized_headers_are_431_and_an_oversized_url_is_414(tiny_server):
    headers = _raw_exchange(tiny_server, b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 20000
                            + b"\r\n\r\n")
    assert headers.startswith(b"HTTP/1.1 431 ") and b'"error"' in headers
    url = _raw_exchange(tiny_server, b"GET /v1/" + b"a" * 20000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert url.startswith(b"HTTP/1.1 414 ") and b'"error"' in url


def test_a_body_that_stops_half_way_gets_a_408_instead_of_holding_the_connection(tiny_server):
    started = time.monotonic()
    reply = _raw_exchange(tiny_server, b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
                          b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":", wait=20)
    assert reply.startswith(b"HTTP/1.1 408 ") and b"did not arrive" in reply
    assert time.monotonic() - started < 10  # the test server's --request-timeout is 2 s


def test_a_client_value_cannot_forge_a_log_line(tiny_server):
    reply = _send(tiny_server, "/chat/completions", with_(model="tiny\n2026-01-01 INFO mlxserve.access: forged"))
    assert reply.status == 400
    assert not any(line.startswith("2026-01-01 INFO mlxserve.access: forged") for line in tiny_server.log().splitlines())
