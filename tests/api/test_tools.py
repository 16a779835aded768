"""Tools: rendered by the model's template (or a system message), calls parsed into `tool_calls`,
`required` and named functions enforced by grammar in the model family's own call syntax."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.conftest import TINY, TINY_AGENT, TINY_GENERIC

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}},
                                       "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# The agent model thinks first unless told not to; a random model's thinking has no end in sight.
NO_THINKING = {"reasoning_effort": "none"}


def _arguments_valid(call, tool: dict) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == tool["function"]["name"]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


@pytest.mark.parametrize("model", [TINY_AGENT, TINY_GENERIC])
def test_required_returns_a_valid_call_every_time(agent_client, model):
    """The agent model writes calls in its own (json_tools) format; the plain one in the generic format."""
    extra = NO_THINKING if model == TINY_AGENT else {}
    for seed in range(4):
        reply = agent_client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, TIME],
                                                     tool_choice="required", temperature=1.0, seed=seed,
                                                     max_tokens=120, **extra)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        [call] = choice.message.tool_calls
        _arguments_valid(call, WEATHER if call.function.name == "get_weather" else TIME)


def test_a_named_function_is_the_one_called(agent_client):
    reply = agent_client.chat.completions.create(
        model=TINY_AGENT, messages=ASK, tools=[WEATHER, TIME], seed=1, max_tokens=120, **NO_THINKING,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    [call] = reply.choices[0].message.tool_calls
    _arguments_valid(call, TIME)


@pytest.mark.parametrize("parallel", [True, False])
def test_parallel_calls_only_when_allowed(agent_client, parallel):
    """With the end-of-turn token disfavoured, the model goes on after its first call: into a second one
    when parallel calls are allowed; otherwise the grammar leaves it nothing but the end."""
    reply = agent_client.chat.completions.create(
        model=TINY_AGENT, messages=ASK, tools=[TIME], tool_choice="required", parallel_tool_calls=parallel,
        seed=0, max_tokens=150, logit_bias={"2": -100}, **NO_THINKING)
    calls = reply.choices[0].message.tool_calls
    if parallel:
        assert len(calls) >= 2 and len({c.id for c in calls}) == len(calls)
    else:
        assert len(calls) == 1 and reply.choices[0].finish_reason == "tool_calls"


def test_the_sdks_stream_helper_assembles_streamed_calls(agent_client):
    with agent_client.chat.completions.stream(model=TINY_AGENT, messages=ASK, tools=[WEATHER],
                                              tool_choice="required", seed=2, max_tokens=120,
                                              **NO_THINKING) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_completion()
    assert "tool_calls.function.arguments.done" in events
    [call] = final.choices[0].message.tool_calls
    _arguments_valid(call, WEATHER)
    assert final.choices[0].finish_reason == "tool_calls"


def test_streamed_call_deltas_have_openais_shape(agent_client):
    chunks = list(agent_client.chat.completions.create(model=TINY_AGENT, messages=ASK, tools=[WEATHER],
                                                       tool_choice="required", seed=2, max_tokens=120,
                                                       stream=True, **NO_THINKING))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].index == 0 and deltas[0].id and deltas[0].type == "function"
    assert deltas[0].function.name == "get_weather"
    assert all(d.id is None and d.function.name is None for d in deltas[1:])
    jsonschema.validate(json.loads("".join(d.function.arguments or "" for d in deltas)),
                        WEATHER["function"]["parameters"])


def test_auto_parses_a_call_the_model_writes(agent_client):
    """With `auto`, whether to call is the model's choice; once it writes its call marker (favoured here),
    the call is parsed from its own format. `response_format` keeps this random model's call well-formed:
    with tools on `auto` the grammar takes an answer in that format or calls."""
    reply = agent_client.chat.completions.create(
        model=TINY_AGENT, messages=ASK, tools=[WEATHER], seed=0, max_tokens=120, logit_bias={"269": 100},
        response_format={"type": "json_object"}, **NO_THINKING)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    _arguments_valid(choice.message.tool_calls[0], WEATHER)


def test_a_conversation_with_calls_and_results_goes_on(agent_client):
    """The history's assistant `tool_calls` and `tool` results go through the template; the answer follows."""
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": "{\"city\": \"Paris\", \"unit\": \"c\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees, sunny"}]
    with_result = agent_client.chat.completions.create(model=TINY_AGENT, messages=history, tools=[WEATHER],
                                                       max_tokens=5, temperature=0)
    without = agent_client.chat.completions.create(model=TINY_AGENT, messages=ASK, tools=[WEATHER],
                                                   max_tokens=5, temperature=0)
    assert with_result.usage.prompt_tokens > without.usage.prompt_tokens + 20


def test_tool_choice_none_leaves_tools_out(agent_client):
    plain = agent_client.chat.completions.create(model=TINY_AGENT, messages=ASK, max_tokens=5, temperature=0)
    none = agent_client.chat.completions.create(model=TINY_AGENT, messages=ASK, tools=[WEATHER], tool_choice="none",
                                                max_tokens=5, temperature=0)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    assert none.choices[0].message.tool_calls is None


@pytest.mark.parametrize("tools, choice, param", [
    ([{"type": "function", "function": {"description": "no name"}}], None, "tools"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], None, "tools"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], None, "tools"),
    ([{"type": "code_interpreter"}], None, "tools"),
    ([WEATHER, WEATHER], None, "tools"),
    ([WEATHER], {"type": "function", "function": {"name": "get_time"}}, "tool_choice"),
    (None, "required", "tool_choice"),
    ([WEATHER], "sometimes", "tool_choice"),
])
def test_malformed_tools_are_a_400(tiny_client, tools, choice, param):
    body = {k: v for k, v in {"tools": tools, "tool_choice": choice}.items() if v is not None}
    with pytest.raises(openai.BadRequestError) as err:
        tiny_client.chat.completions.create(model=TINY, messages=ASK, max_tokens=5, extra_body=body)
    assert err.value.body["param"] == param


def test_a_tool_message_needs_the_id_of_its_call(tiny_client):
    with pytest.raises(openai.BadRequestError) as err:
        tiny_client.chat.completions.create(model=TINY, max_tokens=5,
                                            messages=ASK + [{"role": "tool", "content": "21 degrees"}])
    assert err.value.body["param"] == "messages[1].tool_call_id"
