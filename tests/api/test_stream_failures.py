"""A request that fails inside the batched step ends alone, in OpenAI's shape; the batch goes on."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.conftest import TINY
from tests.fixtures.faulty_server import MARKER
from tests.fixtures.http import request, sse_events
from tests.fixtures.server import ServerProcess

NO_END = {"0": -100, "1": -100, "2": -100}


@pytest.fixture(scope="module")
def faulty_server(tiny_home: Path):
    server = ServerProcess(tiny_home, [TINY], module="tests.fixtures.faulty_server")
    yield server
    server.stop()


def _stream(server: ServerProcess, **extra) -> list[dict]:
    body = {"model": TINY, "prompt": "once upon a time", "max_tokens": 60, "temperature": 0, "stream": True,
            "logit_bias": NO_END, **extra}
    reply = request(server.base_url + "/completions", "POST", body)
    assert reply.status == 200
    events = sse_events(reply.body)
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_a_failing_stream_ends_with_an_error_event_and_done_and_the_other_finishes(faulty_server):
    alone = _stream(faulty_server)
    with ThreadPoolExecutor(2) as pool:
        healthy = pool.submit(_stream, faulty_server)
        failing = pool.submit(_stream, faulty_server, presence_penalty=MARKER)
        healthy, failing = healthy.result(), failing.result()
    text = lambda events: "".join(e["choices"][0]["text"] for e in events if e["choices"])  # noqa: E731
    assert text(healthy) == text(alone) and len(text(alone)) > 30
    assert healthy[-1]["choices"][0]["finish_reason"] == "length"
    error = failing[-1]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "server_error" and "injected failure" in error["message"]
    assert all("choices" in e for e in failing[:-1])
    log = faulty_server.log()
    assert "status=500" in log and "injected failure" in log


def test_a_failure_without_streaming_is_a_500_naming_it(faulty_server):
    client = openai.OpenAI(base_url=faulty_server.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model=TINY, prompt="hello", max_tokens=30, presence_penalty=MARKER,
                                  logit_bias=NO_END, temperature=0)
    assert "RuntimeError: injected failure" in err.value.body["message"]
    assert client.completions.create(model=TINY, prompt="hello", max_tokens=3).choices[0].text is not None
