"""Thinking models: the thinking goes to `reasoning_content`, the answer to `content`, markers to neither."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.conftest import TINY_AGENT, TINY_GENERIC

ASK = [{"role": "user", "content": "Think, then answer."}]
# The tiny agent model's '</think>' token, favoured so that its random thinking ends soon.
END_THINKING_SOON = {"268": 9.0}


def test_thinking_and_answer_are_apart(agent_client):
    reply = agent_client.chat.completions.create(model=TINY_AGENT, messages=ASK, seed=2, max_tokens=60,
                                                 logit_bias=END_THINKING_SOON, temperature=1.0)
    message = reply.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and message.content
    # The first end marker closes the thinking (a random model may write more of them in its answer).
    assert "think>" not in reasoning and not message.content.startswith("</think>")


def test_streamed_thinking_comes_as_reasoning_deltas(agent_client):
    chunks = list(agent_client.chat.completions.create(model=TINY_AGENT, messages=ASK, seed=2, max_tokens=60,
                                                       logit_bias=END_THINKING_SOON, temperature=1.0, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    whole = agent_client.chat.completions.create(model=TINY_AGENT, messages=ASK, seed=2, max_tokens=60,
                                                 logit_bias=END_THINKING_SOON, temperature=1.0)
    assert streamed == whole.choices[0].message.model_extra["reasoning_content"]
    assert "".join(d.content or "" for d in deltas) == whole.choices[0].message.content


def test_the_constraint_applies_to_the_answer_not_the_thinking(agent_client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    reply = agent_client.chat.completions.create(
        model=TINY_AGENT, messages=ASK, seed=2, max_tokens=100, logit_bias=END_THINKING_SOON, temperature=1.0,
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}})
    message = reply.choices[0].message
    assert message.model_extra["reasoning_content"]
    jsonschema.validate(json.loads(message.content), schema)


def test_reasoning_effort_none_turns_thinking_off(agent_client):
    reply = agent_client.chat.completions.create(model=TINY_AGENT, messages=ASK, seed=1, max_tokens=20,
                                                 reasoning_effort="none")
    assert not reply.choices[0].message.model_extra.get("reasoning_content")


def test_reasoning_effort_for_a_model_that_does_not_think_is_a_400(agent_client):
    with pytest.raises(openai.BadRequestError) as err:
        agent_client.chat.completions.create(model=TINY_GENERIC, messages=ASK, max_tokens=5, reasoning_effort="high")
    assert err.value.body["param"] == "reasoning_effort"
