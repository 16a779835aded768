"""Tool-call formats: parsing a family's call text, the generic format's prompt, and which formats can be forced."""

import json

import pytest

from mlxserve.engine.tools import GENERIC, ToolFormat, _parse_json_call, forced_call_grammar, parse_calls, \
    template_turns, with_instructions
from mlxserve.protocol import ChatMessage, InvalidRequestError, Tool, ToolCall

GENERIC_FORMAT = ToolFormat(GENERIC, "<tool_call>", "</tool_call>", _parse_json_call, native=False)
TOOLS = (Tool("get_weather", "Weather", {"type": "object", "properties": {"city": {"type": "string"}}}),)


def test_a_call_parses_into_name_and_json_arguments():
    [call] = parse_calls(GENERIC_FORMAT, '\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n', TOOLS)
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")


def test_arguments_given_as_a_json_string_are_read_too():
    [call] = parse_calls(GENERIC_FORMAT, '{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}', TOOLS)
    assert json.loads(call.arguments) == {"city": "Oslo"}


@pytest.mark.parametrize("text", ['{"name": "get_weather", "arguments": {"city": ', '{"arguments": {}}', "[1, 2]"])
def test_text_that_is_not_a_call_is_not_one(text):
    assert parse_calls(GENERIC_FORMAT, text, TOOLS) is None


def test_the_generic_format_writes_history_as_text_a_template_understands():
    messages = (ChatMessage("user", ("Weather?",)),
                ChatMessage("assistant", ("",), tool_calls=(ToolCall("c1", "get_weather", '{"city": "Paris"}'),)),
                ChatMessage("tool", ("21 C",), tool_call_id="c1"))
    turns = with_instructions(template_turns(messages, GENERIC_FORMAT), TOOLS)
    assert turns[0]["role"] == "system" and "get_weather" in turns[0]["content"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in turns[2]["content"]
    assert turns[3] == {"role": "user", "content": "<tool_response>\n21 C\n</tool_response>"}


def test_forcing_a_call_in_a_format_without_a_grammar_is_a_400():
    mistral = ToolFormat("mistral", "[TOOL_CALLS]", "", _parse_json_call, native=True)
    with pytest.raises(InvalidRequestError) as err:
        forced_call_grammar(mistral, TOOLS, False, json.dumps)
    assert err.value.param == "tool_choice" and "mistral" in err.value.message
