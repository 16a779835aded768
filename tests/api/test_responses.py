"""OpenAI's Responses API through the official `openai` SDK: one engine, the Responses wire format."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import TINY, TINY_AGENT, TINY_GENERIC
from tests.fixtures.http import request
from tests.fixtures.server import ServerProcess

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}
NO_THINKING = {"reasoning": {"effort": "none"}}


def test_a_response_is_the_answer_chat_completions_gives(tiny_client):
    response = tiny_client.responses.create(model=TINY, instructions="Be brief.", input="Hello", temperature=0,
                                            max_output_tokens=12)
    chat = tiny_client.chat.completions.create(model=TINY, temperature=0, max_tokens=12, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}])
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.output_text == chat.choices[0].message.content
    assert response.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens


def test_a_reply_cut_by_max_output_tokens_is_incomplete(tiny_client):
    response = tiny_client.responses.create(model=TINY, input="Tell me a long story", max_output_tokens=3)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"


def test_the_stream_has_the_responses_event_sequence(tiny_client):
    ask = {"model": TINY, "input": "Say something", "temperature": 0, "max_output_tokens": 200}
    whole = tiny_client.responses.create(**ask)
    events = list(tiny_client.responses.create(**ask, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{whole.status}"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text


def test_input_items_with_calls_and_their_outputs_reach_the_template(agent_client):
    items = [{"role": "developer", "content": "You are terse."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather",
              "arguments": "{\"city\": \"Paris\", \"unit\": \"c\"}"},
             {"type": "function_call_output", "call_id": "call_1", "output": "21 degrees and sunny"}]
    with_results = agent_client.responses.create(model=TINY_GENERIC, input=items, tools=[WEATHER],
                                                 max_output_tokens=2)
    without = agent_client.responses.create(model=TINY_GENERIC, input=items[:2], tools=[WEATHER], max_output_tokens=2)
    assert with_results.usage.input_tokens > without.usage.input_tokens + 20


@pytest.mark.parametrize("model, extra", [(TINY_AGENT, NO_THINKING), (TINY_GENERIC, {})])
def test_a_tool_round_trip_through_previous_response_id(agent_client, model, extra):
    first = agent_client.responses.create(model=model, input="Weather in Paris?", tools=[WEATHER],
                                          tool_choice="required", max_output_tokens=120, **extra)
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    second = agent_client.responses.create(
        model=model, previous_response_id=first.id, tools=[WEATHER], max_output_tokens=3, **extra,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "21 degrees"}])
    assert second.status in ("completed", "incomplete") and second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens  # the history went in again...
    # ...mostly from the prompt cache (a template may render a past turn a little differently)
    assert second.usage.input_tokens_details.cached_tokens > first.usage.input_tokens // 2


def test_a_streamed_function_call(agent_client):
    with agent_client.responses.stream(model=TINY_AGENT, input="Weather?", tools=[WEATHER], max_output_tokens=120,
                                       tool_choice={"type": "function", "name": "get_weather"},
                                       **NO_THINKING) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.done" in kinds
    [call] = final.output
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])


class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=150)


def test_text_format_is_enforced_and_the_sdk_parses_it(agent_client):
    parsed = agent_client.responses.parse(model=TINY_GENERIC, input="Who?", text_format=Person, max_output_tokens=200)
    assert isinstance(parsed.output_parsed, Person)


def test_thinking_is_a_reasoning_item(agent_client):
    response = agent_client.responses.create(model=TINY_AGENT, input="Think", max_output_tokens=10)
    assert response.output[0].type == "reasoning" and response.output[0].content[0].text
    off = agent_client.responses.create(model=TINY_AGENT, input="Think", max_output_tokens=10, **NO_THINKING)
    assert [o.type for o in off.output] == ["message"]


def test_stored_responses_can_be_read_and_deleted(tiny_client):
    kept = tiny_client.responses.create(model=TINY, input="Hi", max_output_tokens=4)
    assert tiny_client.responses.retrieve(kept.id).output_text == kept.output_text
    tiny_client.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        tiny_client.responses.retrieve(kept.id)
    unstored = tiny_client.responses.create(model=TINY, input="Hi", max_output_tokens=4, store=False)
    with pytest.raises(openai.NotFoundError):
        tiny_client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError) as err:
        tiny_client.responses.create(model=TINY, input="Hi", previous_response_id=unstored.id)
    assert err.value.body["param"] == "previous_response_id"


def test_a_chain_goes_on_across_a_restart(tiny_home: Path, tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(tiny_home / "models")
    server = ServerProcess(home, [TINY])
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        first = client.responses.create(model=TINY, input="Remember the word ocean.", max_output_tokens=4)
    finally:
        server.stop()
    server = ServerProcess(home, [TINY])
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        second = client.responses.create(model=TINY, input="Which word?", previous_response_id=first.id,
                                         max_output_tokens=4)
        alone = client.responses.create(model=TINY, input="Which word?", max_output_tokens=4)
    finally:
        server.stop()
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.input_tokens // 2


def test_what_codex_sends_is_served(agent_server):
    """Observed from Codex CLI: streamed, unstored, developer items, reasoning summaries, include, cache keys,
    client metadata, a namespace of functions and a hosted web_search tool."""
    body = {"model": TINY_GENERIC, "stream": True, "store": False, "reasoning": {"summary": "auto"},
            "include": ["reasoning.encrypted_content"], "parallel_tool_calls": False, "prompt_cache_key": "k",
            "client_metadata": {"x": "y"}, "instructions": None,
            "input": [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Rules."}]},
                      {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
            "tools": [{"type": "namespace", "name": "shell", "tools": [WEATHER]}, {"type": "web_search"}],
            "max_output_tokens": 8}
    reply = request(agent_server.base_url + "/responses", "POST", body)
    events = [json.loads(line[6:]) for line in reply.body.decode().splitlines() if line.startswith("data: ")]
    assert reply.status == 200 and events[-1]["type"] in ("response.completed", "response.incomplete")


@pytest.mark.parametrize("body, param", [
    ({"model": TINY}, "input"),
    ({"model": TINY, "input": []}, "input"),
    ({"model": TINY, "input": [{"type": "reasoning", "summary": []}]}, "input"),
    ({"model": TINY, "input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"model": TINY, "input": "x", "background": True}, "background"),
    ({"model": TINY, "input": "x", "tools": [{"type": "function", "parameters": {}}]}, "tools[0].name"),
    ({"model": TINY, "input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"model": TINY, "input": "x", "text": {"format": {"type": "json_schema", "name": "a b", "schema": {}}}},
     "text.format"),
    ({"model": TINY, "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
])
def test_bad_input_gets_openais_error_shape(tiny_server, body, param):
    reply = request(tiny_server.base_url + "/responses", "POST", body)
    assert reply.status == 400
    assert reply.json()["error"]["param"] == param
