"""Invalid sampling values get a 400 that names the parameter (tiny model, fast)."""

import pytest

from tests.conftest import TINY
from tests.fixtures.http import request

BAD = [
    ("temperature", "warm"), ("temperature", 3), ("top_p", 0), ("top_p", "x"), ("top_k", 1.5),
    ("top_k", "5"), ("min_p", 1.5), ("presence_penalty", 2.5), ("presence_penalty", -3),
    ("frequency_penalty", "a"), ("frequency_penalty", 9), ("repeat_penalty", 0), ("repeat_penalty", "x"),
    ("repetition_penalty", -1), ("repeat_last_n", -5), ("logit_bias", [1, 2]), ("logit_bias", {"abc": 1}),
    ("logit_bias", {"5": 101}), ("logit_bias", {"99999999": 1}), ("logit_bias", {"-1": 1}), ("seed", "abc"),
    ("seed", 1.5), ("stop", ["s"] * 17), ("stop", [1]), ("n", 0), ("n", 17), ("logprobs", "yes"),
    ("top_logprobs", 21), ("max_tokens", -1), ("stream", "yes"), ("stream_options", {"include_usage": 1}),
]


@pytest.mark.parametrize("param,value", BAD, ids=[f"{p}={v!r}"[:40] for p, v in BAD])
def test_invalid_value_names_the_parameter(tiny_server, param, value):
    body = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, param: value}
    reply = request(tiny_server.base_url + "/chat/completions", "POST", body)
    assert reply.status == 400, reply.body
    assert reply.json()["error"]["param"] == param
    assert param in reply.json()["error"]["message"]


def test_top_logprobs_without_logprobs_is_rejected(tiny_server):
    body = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}
    reply = request(tiny_server.base_url + "/chat/completions", "POST", body)
    assert reply.status == 400 and reply.json()["error"]["param"] == "top_logprobs"


def test_completions_logprobs_over_5_is_rejected(tiny_server):
    reply = request(tiny_server.base_url + "/completions", "POST", {"model": TINY, "prompt": "a", "logprobs": 6})
    assert reply.status == 400 and reply.json()["error"]["param"] == "logprobs"


@pytest.mark.parametrize("value", [0, -1])
def test_top_k_off_values_are_accepted(tiny_client, value):
    r = tiny_client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=2, extra_body={"top_k": value})
    assert r.choices[0].finish_reason in ("stop", "length")
