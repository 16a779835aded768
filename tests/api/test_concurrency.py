"""Many clients at once: per-request results inside a batch, the prompt cache, cancellation, backpressure."""

from __future__ import annotations

import http.client
import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from openai import OpenAI

from tests.conftest import TINY
from tests.fixtures.http import request
from tests.fixtures.server import ServerProcess

NO_END = {"0": -100, "1": -100, "2": -100}  # the tiny model's special tokens: generate to max_tokens

VARIANTS = [
    {"temperature": 0},
    {"temperature": 0, "messages": [{"role": "user", "content": "the weather"}]},
    {"temperature": 0.9, "seed": 1},
    {"temperature": 0.9, "seed": 2, "top_p": 0.8},
    {"temperature": 1.2, "seed": 3, "top_k": 5, "presence_penalty": 1.0},
    {"temperature": 0.7, "seed": 4, "repeat_penalty": 1.3, "frequency_penalty": 0.5},
    {"temperature": 0, "logit_bias": {"100": 10}},
    {"temperature": 0.8, "seed": 5, "min_p": 0.1, "stop": ["e"]},
]


EXTENSIONS = ("top_k", "min_p", "repeat_penalty")


def _chat(client: OpenAI, variant: dict) -> str:
    body = {"messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 24, **variant}
    extra = {k: body.pop(k) for k in EXTENSIONS if k in body}
    return client.chat.completions.create(model=TINY, extra_body=extra, **body).choices[0].message.content


def test_eight_concurrent_requests_get_what_they_get_alone(tiny_client: OpenAI):
    alone = [_chat(tiny_client, v) for v in VARIANTS]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(2):
            together = list(pool.map(lambda v: _chat(tiny_client, v), VARIANTS))
            assert together == alone
    assert len(set(alone)) > 4  # the variants really differ


def _completion(server: ServerProcess, prompt: str) -> dict:
    return request(server.base_url + "/completions", "POST",
                   {"model": TINY, "prompt": prompt, "max_tokens": 8, "temperature": 0}).json()


def test_a_multi_turn_chat_reuses_its_prefix_and_gets_the_same_answers(tiny_home: Path):
    cached_server = ServerProcess(tiny_home, [TINY])
    plain_server = ServerProcess(tiny_home, [TINY], ["--prompt-cache", "0"])
    try:
        clients = [OpenAI(base_url=s.base_url, api_key="x", max_retries=0) for s in (cached_server, plain_server)]
        messages = [{"role": "user", "content": "hello there"}]
        cached_counts = []
        for turn in range(4):
            replies = [c.chat.completions.create(model=TINY, messages=messages, max_tokens=10, temperature=0)
                       for c in clients]
            assert replies[0].choices[0].message.content == replies[1].choices[0].message.content
            assert replies[1].usage.prompt_tokens_details.cached_tokens == 0
            cached_counts.append(replies[0].usage.prompt_tokens_details.cached_tokens)
            messages += [{"role": "assistant", "content": replies[0].choices[0].message.content},
                         {"role": "user", "content": f"and then {turn}"}]
        assert cached_counts[0] == 0 and all(c > 0 for c in cached_counts[1:])
        assert cached_counts == sorted(cached_counts)
        # A different prompt shares no tokens with the cached ones: nothing is reused.
        other = _completion(cached_server, "zebra zebra zebra")
        assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert other["choices"][0]["text"] == _completion(plain_server, "zebra zebra zebra")["choices"][0]["text"]
        # A prompt that shares only a prefix reuses that prefix and no more.
        first = _completion(cached_server, "the cat sat on the mat")
        second = _completion(cached_server, "the cat ran off")
        shared = _prompt_tokens(cached_server, "the cat ")
        assert 0 < second["usage"]["prompt_tokens_details"]["cached_tokens"] <= shared
        assert second["choices"][0]["text"] == _completion(plain_server, "the cat ran off")["choices"][0]["text"]
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    finally:
        cached_server.stop()
        plain_server.stop()


def _prompt_tokens(server: ServerProcess, text: str) -> int:
    """How many tokens `text` is, as the server counts them."""
    reply = request(server.base_url + "/completions", "POST",
                    {"model": TINY, "prompt": text, "max_tokens": 1, "temperature": 0}).json()
    return reply["usage"]["prompt_tokens"]


def _start_stream(server: ServerProcess) -> http.client.HTTPConnection:
    """A long streamed completion whose first chunk has arrived."""
    port = int(server.base_url.split(":")[2].split("/")[0])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({
        "model": TINY, "prompt": "once upon a time", "max_tokens": 250, "stream": True, "logit_bias": NO_END}),
        {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    response.fp.readline()
    return conn


def _health(server: ServerProcess) -> dict:
    return request(server.base_url.removesuffix("/v1") + "/health").json()


def _rss(pid: int) -> int:
    return int(subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True).stdout) * 1024


def test_cancelled_requests_free_their_slot_and_their_memory(tiny_home: Path):
    server = ServerProcess(tiny_home, [TINY], ["--max-concurrent", "1", "--max-queue", "0", "--log-level", "debug"])
    try:
        def cancel_one() -> None:
            _start_stream(server).close()
            deadline = time.monotonic() + 10
            while _health(server)["active_requests"] and time.monotonic() < deadline:
                time.sleep(0.005)
            assert _health(server)["active_requests"] == 0

        for _ in range(20):  # warm up: allocator pools, caches of the first requests
            cancel_one()
        before = _rss(server.process.pid)
        for _ in range(200):
            cancel_one()
        after = _rss(server.process.pid)
        print(f"RSS after 20 cancelled requests {before / 2**20:.1f} MiB, after 200 more {after / 2**20:.1f} MiB")
        assert after <= before * 1.05
        assert server.log().count("cancelled request") >= 200
        # The one slot is free again: a request is served, not refused.
        assert request(server.base_url + "/completions", "POST",
                       {"model": TINY, "prompt": "hi", "max_tokens": 2}).status == 200
    finally:
        server.stop()


def test_a_full_queue_gets_503_with_retry_after(tiny_home: Path):
    server = ServerProcess(tiny_home, [TINY], ["--max-concurrent", "1", "--max-queue", "1"])
    try:
        running, waiting = _start_stream(server), None
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(request, server.base_url + "/completions", "POST",
                                  {"model": TINY, "prompt": "hi", "max_tokens": 2})
            deadline = time.monotonic() + 10
            while _health(server)["active_requests"] < 2 and time.monotonic() < deadline:
                time.sleep(0.005)
            health = _health(server)
            assert health["active_requests"] == 2 and health["queue_depth"] == 1
            refused = request(server.base_url + "/chat/completions", "POST",
                              {"model": TINY, "messages": [{"role": "user", "content": "hi"}]})
            assert refused.status == 503 and refused.headers["retry-after"] == "2"
            error = refused.json()["error"]
            assert error["code"] == "server_busy" and error["type"] == "service_unavailable"
            running.close()
            assert waiting.result().status == 200
        assert request(server.base_url + "/completions", "POST",
                       {"model": TINY, "prompt": "hi", "max_tokens": 2}).status == 200
    finally:
        server.stop()


def test_health_reports_the_engine_loop(tiny_server: ServerProcess):
    reply = request(tiny_server.base_url.removesuffix("/v1") + "/health")
    body = reply.json()
    assert reply.status == 200 and body["status"] == "ok" and body["healthy"] is True
    assert body["loop_stalled_seconds"] < 5 and body["max_concurrent"] == 32 and body["max_queue"] == 64
