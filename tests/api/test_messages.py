"""Anthropic's Messages API through the official `anthropic` SDK: one engine, Anthropic's wire format."""

from __future__ import annotations

import base64
import json

import anthropic
import jsonschema
import pytest

from tests.conftest import TINY, TINY_AGENT, TINY_GENERIC, TINY_VLM
from tests.fixtures.http import request
from tests.fixtures.images import image_bytes

GREEDY = {"temperature": 0}  # the current SDK no longer declares sampling fields; the API still takes them
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"name": "get_weather", "description": "Current weather of a city", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}


def _root(server) -> str:
    return server.base_url.removesuffix("/v1")


def _client(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=_root(server), api_key="anything", max_retries=0)


@pytest.fixture(scope="module")
def tiny(tiny_server):
    return _client(tiny_server)


@pytest.fixture(scope="module")
def agent(agent_server):
    return _client(agent_server)


def test_a_message_is_the_same_answer_chat_completions_gives(tiny, tiny_client):
    reply = tiny.messages.create(model=TINY, max_tokens=12, system="Be brief.", messages=[
        {"role": "user", "content": "Hello"}], extra_body=GREEDY)
    chat = tiny_client.chat.completions.create(model=TINY, max_tokens=12, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}])
    assert reply.type == "message" and reply.role == "assistant" and reply.id.startswith("msg_")
    assert [b.type for b in reply.content] == ["text"]
    assert reply.content[0].text == chat.choices[0].message.content
    assert reply.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[chat.choices[0].finish_reason]
    usage = reply.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == chat.usage.prompt_tokens
    assert usage.output_tokens == chat.usage.completion_tokens


def test_the_streamed_message_equals_the_whole_one(tiny):
    ask = {"model": TINY, "max_tokens": 16, "messages": [{"role": "user", "content": "Tell me"}], "extra_body": GREEDY}
    whole = tiny.messages.create(**ask)
    with tiny.messages.stream(**ask) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert final.content[0].text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert {"content_block_start", "content_block_stop", "message_delta"} <= set(kinds)


def test_raw_stream_events_come_in_anthropics_order(tiny_server):
    body = {"model": TINY, "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    raw = request(_root(tiny_server) + "/v1/messages", "POST", body).body.decode()
    names = [line[7:] for line in raw.splitlines() if line.startswith("event: ")]
    assert names[:2] == ["message_start", "ping"]
    assert names[2] == "content_block_start" and names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}


def test_a_stop_sequence_is_named_in_the_reply(tiny):
    text = tiny.messages.create(model=TINY, max_tokens=20, messages=[{"role": "user", "content": "Go"}],
                                extra_body=GREEDY).content[0].text
    stop = text.strip()[3:5]
    reply = tiny.messages.create(model=TINY, max_tokens=20, messages=[{"role": "user", "content": "Go"}],
                                 stop_sequences=[stop], extra_body=GREEDY)
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == stop
    assert stop not in reply.content[0].text


@pytest.mark.parametrize("model, extra", [(TINY_AGENT, {"thinking": {"type": "disabled"}}), (TINY_GENERIC, {})])
def test_a_tool_round_trip(agent, model, extra):
    first = agent.messages.create(model=model, max_tokens=120, messages=ASK, tools=[WEATHER],
                                  tool_choice={"type": "any"}, **extra)
    assert first.stop_reason == "tool_use"
    [call] = [b for b in first.content if b.type == "tool_use"]
    assert call.name == "get_weather"
    jsonschema.validate(call.input, WEATHER["input_schema"])
    history = ASK + [{"role": "assistant", "content": first.content},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                   "content": "21 degrees and sunny"}]}]
    second = agent.messages.create(model=model, max_tokens=5, messages=history, tools=[WEATHER], **extra)
    assert second.usage.input_tokens + second.usage.cache_read_input_tokens > \
        first.usage.input_tokens + first.usage.cache_read_input_tokens + 20


def test_a_streamed_tool_call_is_assembled_by_the_sdk(agent):
    with agent.messages.stream(model=TINY_AGENT, max_tokens=120, messages=ASK, tools=[WEATHER],
                               tool_choice={"type": "tool", "name": "get_weather"},
                               thinking={"type": "disabled"}) as stream:
        final = stream.get_final_message()
    [call] = final.content
    assert call.type == "tool_use" and final.stop_reason == "tool_use"
    jsonschema.validate(call.input, WEATHER["input_schema"])


def test_thinking_comes_as_a_thinking_block(agent):
    ask = {"model": TINY_AGENT, "max_tokens": 12, "messages": [{"role": "user", "content": "Think"}],
           "thinking": {"type": "adaptive"}, "extra_body": GREEDY}
    reply = agent.messages.create(**ask)
    assert reply.content[0].type == "thinking" and reply.content[0].thinking
    with agent.messages.stream(**ask) as stream:
        deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert set(deltas) == {"thinking_delta"} and final.content[0].thinking == reply.content[0].thinking
    off = agent.messages.create(**{**ask, "thinking": {"type": "disabled"}})
    assert [b.type for b in off.content] == ["text"]


def test_structured_output_is_enforced(agent):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    reply = agent.messages.create(model=TINY_GENERIC, max_tokens=60, messages=[{"role": "user", "content": "?"}],
                                  output_config={"format": {"type": "json_schema", "schema": schema}})
    jsonschema.validate(json.loads(reply.content[0].text), schema)


def test_count_tokens_counts_what_create_would_prefill(tiny):
    messages = [{"role": "user", "content": "Count these tokens"}]
    counted = tiny.messages.count_tokens(model=TINY, messages=messages, system="Be brief.")
    reply = tiny.messages.create(model=TINY, max_tokens=1, messages=messages, system="Be brief.")
    assert counted.input_tokens == reply.usage.input_tokens + reply.usage.cache_read_input_tokens


def test_what_claude_code_sends_is_served(agent_server):
    """Observed from Claude Code 2.1: a query string, both key headers, betas, adaptive thinking, hosted-service
    tuning, cache_control on blocks, a system message inside `messages`, and a hosted tool."""
    body = {"model": TINY_GENERIC, "max_tokens": 32000, "stream": False, "thinking": {"type": "adaptive"},
            "output_config": {"effort": "high"}, "context_management": {"edits": []},
            "metadata": {"user_id": "u"}, "system": [{"type": "text", "text": "You are Claude Code.",
                                                      "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "system", "content": "Environment: linux"},
                         {"role": "user", "content": [{"type": "text", "text": "hi",
                                                       "cache_control": {"type": "ephemeral"}}]}],
            "tools": [WEATHER, {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]}
    reply = request(_root(agent_server) + "/v1/messages?beta=true", "POST", body, headers={
        "x-api-key": "k", "Authorization": "Bearer k", "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"})
    assert reply.status == 200, reply.body
    assert json.loads(reply.body)["stop_reason"] in ("end_turn", "max_tokens", "tool_use")


def test_an_image_block_reaches_a_vision_model(vlm_server):
    data = base64.b64encode(image_bytes()).decode()
    reply = _client(vlm_server).messages.create(model=TINY_VLM, max_tokens=3, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
        {"type": "text", "text": "What is this?"}]}])
    assert reply.usage.input_tokens + reply.usage.cache_read_input_tokens > 20


@pytest.mark.parametrize("body, status, kind", [
    ({"model": TINY, "messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request_error"),
    ({"model": TINY, "max_tokens": 5, "messages": []}, 400, "invalid_request_error"),
    ({"model": TINY, "max_tokens": 5, "messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_request_error"),
    ({"model": TINY, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "document"}]}]}, 400,
     "invalid_request_error"),
    ({"model": TINY, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
      "tools": [{"name": "f", "input_schema": {"type": "array"}}]}, 400, "invalid_request_error"),
    ({"model": TINY, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
      "tool_choice": {"type": "tool", "name": "f"}}, 400, "invalid_request_error"),
    ({"model": "no-such-model", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, 404,
     "not_found_error"),
])
def test_bad_input_gets_anthropics_error_shape(tiny_server, body, status, kind):
    reply = request(_root(tiny_server) + "/v1/messages", "POST", body)
    error = json.loads(reply.body)
    assert reply.status == status
    assert error["type"] == "error" and error["error"]["type"] == kind and error["error"]["message"]


def test_an_unknown_route_under_messages_is_anthropic_shaped_too(tiny_server):
    reply = request(_root(tiny_server) + "/v1/messages/batches")
    assert json.loads(reply.body)["type"] == "error"
