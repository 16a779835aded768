"""Every field of OpenAI's request schemas is implemented, accepted as harmless, or refused by name."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import TINY

ASK = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("field, value", [
    ("audio", {"voice": "alloy", "format": "mp3"}), ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "Hello"}), ("web_search_options", {}),
    ("functions", [{"name": "f"}]), ("function_call", "auto"), ("verbosity", "low")])
def test_chat_fields_that_would_change_the_output_are_refused(tiny_client, field, value):
    with pytest.raises(openai.BadRequestError) as err:
        tiny_client.chat.completions.create(model=TINY, messages=ASK, max_tokens=2, extra_body={field: value})
    assert err.value.body["param"] == field


@pytest.mark.parametrize("field, value", [("best_of", 3), ("suffix", "the end")])
def test_completion_fields_that_would_change_the_output_are_refused(tiny_client, field, value):
    with pytest.raises(openai.BadRequestError) as err:
        tiny_client.completions.create(model=TINY, prompt="Hi", max_tokens=2, extra_body={field: value})
    assert err.value.body["param"] == field


def test_fields_that_change_nothing_are_accepted(tiny_client):
    plain = tiny_client.chat.completions.create(model=TINY, messages=ASK, max_tokens=8, temperature=0)
    noted = tiny_client.chat.completions.create(
        model=TINY, messages=ASK, max_tokens=8, temperature=0, user="u1", metadata={"k": "v"}, store=False,
        service_tier="auto", modalities=["text"], prompt_cache_key="k", safety_identifier="s",
        extra_body={"some_other_servers_extension": 1})
    assert noted.choices[0].message.content == plain.choices[0].message.content


def test_echo_returns_the_prompt_first_with_its_logprobs(tiny_client):
    plain = tiny_client.completions.create(model=TINY, prompt="the cat", max_tokens=4, temperature=0)
    echoed = tiny_client.completions.create(model=TINY, prompt="the cat", max_tokens=4, temperature=0, echo=True,
                                            logprobs=1)
    choice = echoed.choices[0]
    assert choice.text == "the cat" + plain.choices[0].text
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert echoed.usage.completion_tokens == plain.usage.completion_tokens
