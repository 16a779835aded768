"""Tool calls: how a model family writes them, how the prompt shows the tools, and the grammar that forces one.

A model whose chat template renders tools has a tool-call format mlx-lm recognises (its
`tool_parsers` package, picked from the template by `mlx_lm.tokenizer_utils`): the tools go to the
template and calls are parsed by that family's parser. A model whose template knows nothing of
tools gets the generic format below, explained in a system message (LM Studio does the same).

`tool_choice: "required"` or a named function is enforced by a grammar in the family's own call
syntax around the function's parameter schema; `GRAMMARS` holds the families that have one.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlxserve.engine.grammar import lark_json
from mlxserve.protocol import ChatMessage, InvalidRequestError, Tool, ToolCall

GENERIC = "generic"

# The generic format: the markers Hermes-style templates use, with the call as one JSON object.
GENERIC_START, GENERIC_END = "<tool_call>", "</tool_call>"

GENERIC_INSTRUCTIONS = """You can call functions. They are described here as JSON Schema:
{tools}

To call a function, answer with exactly this and nothing else, one block per call:
<tool_call>
{{"name": "<function name>", "arguments": {{<arguments as a JSON object>}}}}
</tool_call>
The results come back in a later message, inside <tool_response></tool_response>."""


def _parse_json_call(text: str, tools: Any = None) -> dict[str, Any]:
    return json.loads(text.strip())


@dataclass(frozen=True)
class ToolFormat:
    """One family's tool-call syntax: the markers around a call, and the parser of the text between."""

    name: str
    start: str
    end: str
    parse: Callable[[str, Any], Any]
    native: bool  # the model's template renders tools and tool turns itself


def tool_format(tokenizer: Any) -> ToolFormat:
    """The model's own format when mlx-lm knows its template's, else the generic one."""
    if getattr(tokenizer, "has_tool_calling", False):
        family = tokenizer.init_kwargs.get("tool_parser_type", "")
        return ToolFormat(family, tokenizer.tool_call_start, tokenizer.tool_call_end or "",
                          tokenizer.tool_parser, native=True)
    return ToolFormat(GENERIC, GENERIC_START, GENERIC_END, _parse_json_call, native=False)


def tool_schemas(tools: tuple[Tool, ...]) -> list[dict[str, Any]]:
    """The tools as OpenAI declares them, which is what chat templates expect."""
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": t.parameters}} for t in tools]


def template_turns(messages: tuple[ChatMessage, ...], fmt: ToolFormat | None) -> list[dict[str, Any]]:
    """Messages as chat-template dicts. Native formats get OpenAI's tool fields (arguments as objects,
    as Hugging Face templates expect); the generic format writes calls and results as text."""
    turns = []
    for m in messages:
        turn: dict[str, Any] = {"role": m.role, "content": m.text}
        if m.name:
            turn["name"] = m.name
        if fmt is not None and not fmt.native:
            if m.tool_calls:
                turn["content"] = m.text + "".join(
                    f"{GENERIC_START}\n{json.dumps({'name': c.name, 'arguments': _arguments(c)})}\n{GENERIC_END}"
                    for c in m.tool_calls)
            if m.role == "tool":
                turn = {"role": "user", "content": f"<tool_response>\n{m.text}\n</tool_response>"}
        else:
            if m.tool_calls:
                turn["tool_calls"] = [{"id": c.id, "type": "function",
                                       "function": {"name": c.name, "arguments": _arguments(c)}}
                                      for c in m.tool_calls]
            if m.tool_call_id is not None:
                turn["tool_call_id"] = m.tool_call_id
        turns.append(turn)
    return turns


def with_instructions(turns: list[dict[str, Any]], tools: tuple[Tool, ...]) -> list[dict[str, Any]]:
    """The generic format's tool description, added to the system message (or as one)."""
    text = GENERIC_INSTRUCTIONS.format(tools=json.dumps(tool_schemas(tools), indent=1))
    if turns and turns[0]["role"] == "system":
        return [{**turns[0], "content": f"{turns[0]['content']}\n\n{text}"}] + turns[1:]
    return [{"role": "system", "content": text}] + turns


def _arguments(call: ToolCall) -> Any:
    try:
        return json.loads(call.arguments)
    except ValueError:
        return call.arguments


def _json_calls(tools: tuple[Tool, ...], start: str, end: str, parallel: bool) -> str:
    """Lark: one call (or several, when parallel calls are allowed) of `start` + JSON + `end`
    (the markers as Lark terms)."""
    body = {"anyOf": [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                       "required": ["name", "arguments"], "additionalProperties": False} for t in tools]}
    repeat = ' ("\\n" call)*' if parallel else ""
    return (f"start: call{repeat}\n"
            f'call: {start} "\\n" body "\\n" {end}\n'
            f"body: {lark_json(body)}\n")


# Families whose call syntax has a grammar here: the name mlx-lm gives their parser.
GRAMMARS: dict[str, Callable[[tuple[Tool, ...], str, str, bool], str]] = {
    GENERIC: _json_calls,
    "json_tools": _json_calls,
}


def forced_call_grammar(fmt: ToolFormat, tools: tuple[Tool, ...], parallel: bool,
                        marker: Callable[[str], str]) -> str:
    """The Lark grammar of a reply made only of calls to `tools`; a 400 for families without one.
    `marker` turns a marker into its Lark term (`GrammarCompiler.marker`)."""
    build = GRAMMARS.get(fmt.name)
    if build is None:
        raise InvalidRequestError(
            f"'tool_choice' must be 'auto' or 'none' for this model: forcing a call is not supported for "
            f"its tool-call format ({fmt.name}); supported formats: {', '.join(sorted(GRAMMARS))}",
            param="tool_choice")
    return build(tools, marker(fmt.start), marker(fmt.end), parallel)


def parse_calls(fmt: ToolFormat, text: str, tools: tuple[Tool, ...]) -> list[ToolCall] | None:
    """The calls in the text between one pair of markers; None when it is not a well-formed call."""
    try:
        parsed = fmt.parse(text, tool_schemas(tools))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    calls = []
    for item in parsed if isinstance(parsed, list) else [parsed]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        calls.append(ToolCall(id="call_" + secrets.token_hex(12), name=item["name"],
                              arguments=json.dumps(arguments, ensure_ascii=False)))
    return calls
