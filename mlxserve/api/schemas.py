"""Request parameters of /v1/chat/completions and /v1/completions, declared once.

`PARAMS` lists each body field in the order of OpenAI's API reference, then
the extensions other local servers accept (marked with `extension`). Parsing,
validation and the README's parameter table all come from this list; a test
checks the README against it. Every field of OpenAI's request schemas is here:
implemented, accepted because it changes nothing (`user`, `store`, ...), or
refused with a 400 when set to a value that would change the output
(`audio`, `prediction`, ...). Fields outside OpenAI's schema are ignored, as
other clients send their own extensions.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlxserve.protocol import (
    ChatMessage,
    EmbeddingRequest,
    GenerationRequest,
    ImagePart,
    InvalidRequestError,
    OutputFormat,
    SamplingParams,
    Tool,
    ToolCall,
)

CHAT = "chat"
COMPLETIONS = "completions"
BOTH = frozenset({CHAT, COMPLETIONS})

MAX_STOP_STRINGS = 16
MAX_CHOICES = 16


class _Invalid(ValueError):
    """A value failed its parser; the message completes '<param> ...'."""


def _described(schema: dict[str, Any]) -> Callable[[Callable], Callable]:
    """Attach the JSON Schema of what a parser accepts (the OpenAPI document is built from these)."""

    def attach(parse: Callable) -> Callable:
        parse.schema = schema
        return parse

    return attach


def _shown(value: int | float) -> str:
    """A number for an error message: huge integers are not spelled out digit by digit."""
    text = str(value)
    return text if len(text) <= 24 else f"an integer of {len(text.lstrip('-'))} digits"


def _number(lo: float, hi: float, lo_open: bool = False) -> Callable[[Any], float]:
    bounds = {"exclusiveMinimum" if lo_open else "minimum": lo, "maximum": hi}

    @_described({"type": "number", **bounds})
    def parse(value: Any) -> float:
        # Integers compare with the bounds exactly; float() of one past 10**308 would overflow.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not math.isfinite(value)):
            raise _Invalid("must be a number")
        if value > hi or value < lo or (lo_open and value == lo):
            raise _Invalid(f"must be in {'(' if lo_open else '['}{lo}, {hi}]; got {_shown(value)}")
        return float(value)

    return parse


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _integer(lo: int = INT64_MIN, hi: int = INT64_MAX) -> Callable[[Any], int]:
    """An integer in [lo, hi]; every integer field is at most a 64-bit one, as in OpenAI's API."""

    @_described({"type": "integer", "minimum": lo, "maximum": hi})
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise _Invalid("must be an integer")
        if value < lo:
            raise _Invalid(f"must be at least {_shown(lo)}; got {_shown(value)}")
        if value > hi:
            raise _Invalid(f"must be at most {_shown(hi)}; got {_shown(value)}")
        return value

    return parse


@_described({"type": "boolean"})
def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("must be true or false")
    return value


@_described({"type": "string", "minLength": 1})
def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid("must be a non-empty string")
    return value


@_described({"oneOf": [{"type": "string"},
                        {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP_STRINGS}]})
def _stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _Invalid("must be a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise _Invalid(f"accepts at most {MAX_STOP_STRINGS} strings; got {len(stops)}")
    return tuple(s for s in stops if s)


@_described({"type": "object", "propertyNames": {"pattern": "^[0-9]+$"},
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}})
def _logit_bias(value: Any) -> dict[int, float]:
    if not isinstance(value, dict):
        raise _Invalid("must be an object mapping token ids to biases")
    bias = {}
    for key, amount in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise _Invalid(f"key {key!r} is not a token id") from None
        if token < 0:
            raise _Invalid(f"key {key!r} is not a token id")
        try:
            bias[token] = _number(-100, 100)(amount)
        except _Invalid as exc:
            raise _Invalid(f"value for token {key!r} {exc}") from None
    return bias


@_described({"type": "object", "properties": {"include_usage": {"type": "boolean"}}})
def _stream_options(value: Any) -> bool:
    """Returns include_usage."""
    if not isinstance(value, dict):
        raise _Invalid("must be an object")
    include = value.get("include_usage", False)
    if not isinstance(include, bool):
        raise _Invalid("include_usage must be true or false")
    return include


_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NAME_RULE = "1 to 64 letters, digits, underscores or dashes"


@_described({"type": "object", "required": ["type"], "properties": {
    "type": {"enum": ["text", "json_object", "json_schema"]},
    "json_schema": {"type": "object", "properties": {
        "name": {"type": "string", "pattern": _NAME.pattern}, "description": {"type": "string"},
        "schema": {"type": "object"}, "strict": {"type": ["boolean", "null"]}}}}})
def _response_format(value: Any) -> OutputFormat:
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise _Invalid("must be an object with type 'text', 'json_object' or 'json_schema'")
    if value["type"] != "json_schema":
        return OutputFormat(value["type"])
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise _Invalid("of type 'json_schema' needs a 'json_schema' object with the schema in 'schema'")
    name = spec.get("name")
    if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
        raise _Invalid(f"json_schema.name must be {_NAME_RULE}")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise _Invalid("json_schema.schema must be a JSON Schema object")
    return OutputFormat("json_schema", schema, name)


_TOOL_SCHEMA = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "pattern": _NAME.pattern}, "description": {"type": "string"},
        "parameters": {"type": "object"}, "strict": {"type": ["boolean", "null"]}}}}}


@_described({"type": "array", "items": _TOOL_SCHEMA})
def _tools(value: Any) -> tuple[Tool, ...]:
    if not isinstance(value, list):
        raise _Invalid("must be a list of function tools")
    tools: list[Tool] = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or item.get("type") != "function":
            raise _Invalid(f"[{i}] must be an object with type 'function' (the only tool type served)")
        function = item.get("function")
        if not isinstance(function, dict):
            raise _Invalid(f"[{i}].function must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise _Invalid(f"[{i}].function.name must be {_NAME_RULE}")
        if any(t.name == name for t in tools):
            raise _Invalid(f"[{i}].function.name '{name}' is declared twice")
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise _Invalid(f"[{i}].function.description must be a string")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise _Invalid(f"[{i}].function.parameters must be a JSON Schema of type 'object'")
        tools.append(Tool(name, description, parameters))
    return tuple(tools)


@_described({"oneOf": [{"enum": ["none", "auto", "required"]},
                       {"type": "object", "required": ["type", "function"], "properties": {
                           "type": {"const": "function"}, "function": {
                               "type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}}]})
def _tool_choice(value: Any) -> tuple[str, str | None]:
    """("none" | "auto" | "required", the function the model must call or None)."""
    if value in ("none", "auto", "required"):
        return value, None
    function = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise _Invalid("must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}")
    return "required", function["name"]


def _refused(what: str, harmless: Callable[[Any], bool] = lambda v: False, schema: dict[str, Any] | None = None
             ) -> Callable[[Any], None]:
    """A field of OpenAI's API this server cannot honour: a 400 unless its value changes nothing."""

    @_described(schema or {"type": "null"})
    def parse(value: Any) -> None:
        if not harmless(value):
            raise _Invalid(f"is not supported by this server: {what}")

    return parse


def _accepted(schema: dict[str, Any]) -> Callable[[Any], None]:
    """A field that does not change the output (bookkeeping for OpenAI's platform): read and dropped."""

    @_described(schema)
    def parse(value: Any) -> None:
        return None

    return parse


_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


@_described({"enum": list(_EFFORTS)})
def _reasoning_effort(value: Any) -> bool:
    """Whether the model should think: 'none' and 'minimal' turn a thinking model's thinking off."""
    if value not in _EFFORTS:
        raise _Invalid(f"must be one of {', '.join(_EFFORTS)}")
    return value not in ("none", "minimal")


@dataclass(frozen=True)
class Param:
    name: str
    parse: Callable[[Any], Any]
    doc: str
    endpoints: frozenset[str] = BOTH
    extension: str | None = None  # who else accepts it, for fields outside OpenAI's API
    alias_of: str | None = None


PARAMS: tuple[Param, ...] = (
    Param("model", _string, "Model id from `/v1/models`."),
    Param("audio", _refused("audio output needs an audio model"),
          "Refused (400): no audio output.", endpoints=frozenset({CHAT})),
    Param("best_of", _refused("it would need server-side ranking of choices; use 'n'", lambda v: v == 1,
                              {"const": 1}), "Only 1 (the default) is accepted.", endpoints=frozenset({COMPLETIONS})),
    Param("echo", _boolean,
          "Return the prompt before the completion; with `logprobs`, the prompt tokens' logprobs too "
          "(the first token's is null).", endpoints=frozenset({COMPLETIONS})),
    Param("function_call", _refused("the deprecated functions API; use 'tools' and 'tool_choice'"),
          "Refused (400): use `tool_choice`.", endpoints=frozenset({CHAT})),
    Param("functions", _refused("the deprecated functions API; use 'tools' and 'tool_choice'"),
          "Refused (400): use `tools`.", endpoints=frozenset({CHAT})),
    Param("frequency_penalty", _number(-2, 2),
          "[-2, 2], default 0. Subtracts `frequency_penalty * count[t]` from the logit of every token "
          "t generated so far in this completion."),
    Param("logit_bias", _logit_bias,
          "Token id (string key) to a bias in [-100, 100] added to the raw logit; -100 bans the token, "
          "+100 practically forces it. A key that is not a token id of the model is a 400."),
    Param("logprobs", _boolean,
          "Return each generated token's log-probability under the distribution it was sampled "
          "from (after penalties, truncation and temperature).", endpoints=frozenset({CHAT})),
    Param("logprobs", _integer(0, 5),
          "0 to 5: each generated token's log-probability plus that many most likely alternatives.",
          endpoints=frozenset({COMPLETIONS})),
    Param("max_completion_tokens", _integer(1),
          "Most tokens to generate; wins over `max_tokens`. Default: up to the context length.",
          endpoints=frozenset({CHAT})),
    Param("max_tokens", _integer(1), "Most tokens to generate (≥ 1). Default: up to the context length."),
    Param("metadata", _accepted({"type": "object"}), "Accepted; changes nothing.", endpoints=frozenset({CHAT})),
    Param("modalities", _refused("only text output is served", lambda v: v == ["text"],
                                 {"type": "array", "items": {"const": "text"}, "minItems": 1, "maxItems": 1}),
          "Only `[\"text\"]`.", endpoints=frozenset({CHAT})),
    Param("n", _integer(1, MAX_CHOICES),
          f"Number of independent choices, 1 to {MAX_CHOICES}; usage counts all of them."),
    Param("parallel_tool_calls", _boolean,
          "Whether a forced call (`tool_choice` `required` or a function) may be several calls. Default false, "
          "as in llama.cpp's server (OpenAI's default is true): small models asked for calls repeat them "
          "until they run out of tokens.", endpoints=frozenset({CHAT})),
    Param("prediction", _refused("predicted outputs (speculative decoding from given text)"),
          "Refused (400).", endpoints=frozenset({CHAT})),
    Param("presence_penalty", _number(-2, 2),
          "[-2, 2], default 0. Subtracts `presence_penalty` from the logit of every token generated "
          "at least once so far in this completion."),
    Param("prompt_cache_key", _accepted({"type": "string"}),
          "Accepted; changes nothing (prompts are cached by their tokens, per API key).",
          endpoints=frozenset({CHAT})),
    Param("prompt_cache_retention", _accepted({"type": "string"}), "Accepted; changes nothing.",
          endpoints=frozenset({CHAT})),
    Param("reasoning_effort", _reasoning_effort,
          "For models that think (`<think>` markers): `none` or `minimal` turns thinking off, any other "
          "value on. Asking a model that does not think to think is a 400.", endpoints=frozenset({CHAT})),
    Param("response_format", _response_format,
          "`text`, `json_object`, or `json_schema` (`{\"json_schema\": {\"name\", \"schema\"}}`): enforced "
          "while decoding, so the answer always parses (and validates) unless it ran out of tokens. A schema "
          "keyword the grammar engine cannot enforce is a 400 naming it."),
    Param("safety_identifier", _accepted({"type": "string"}), "Accepted; changes nothing.",
          endpoints=frozenset({CHAT})),
    Param("seed", _integer(),
          "Same seed, prompt and parameters give the same output on the same machine, alone or "
          "batched with other requests on the CPU (on a GPU, batched may part after a near tie: "
          "[How sampling works](#how-sampling-works)). Without it each request draws fresh randomness."),
    Param("service_tier", _accepted({"type": "string"}), "Accepted; changes nothing.", endpoints=frozenset({CHAT})),
    Param("stop", _stop,
          f"A string or up to {MAX_STOP_STRINGS} strings; generation ends before the first one, "
          "which is not returned (`finish_reason: \"stop\"`)."),
    Param("store", _accepted({"type": "boolean"}), "Accepted; changes nothing.", endpoints=frozenset({CHAT})),
    Param("stream", _boolean, "Send Server-Sent Events, ending with `data: [DONE]`."),
    Param("stream_options", _stream_options,
          "`{\"include_usage\": true}` adds a last chunk with `usage` and empty `choices`."),
    Param("suffix", _refused("fill-in-the-middle", lambda v: v == "", {"const": ""}),
          "Refused (400) unless empty: no fill-in-the-middle.", endpoints=frozenset({COMPLETIONS})),
    Param("temperature", _number(0, 2),
          "[0, 2]. 0 is greedy (argmax); otherwise logits are divided by it. Default: the model's "
          "`generation_config.json` temperature if it has one, else 1.0."),
    Param("tool_choice", _tool_choice,
          "`auto` (default with tools), `none`, `required`, or `{\"type\": \"function\", \"function\": "
          "{\"name\"}}`. `required` and a named function are enforced by grammar in the model's own "
          "call syntax.", endpoints=frozenset({CHAT})),
    Param("tools", _tools,
          "Function tools (`{\"type\": \"function\", \"function\": {\"name\", \"description\", "
          "\"parameters\"}}`), rendered by the model's chat template, or in a system message for templates "
          "without tools. Calls come back in `message.tool_calls`.", endpoints=frozenset({CHAT})),
    Param("top_logprobs", _integer(0, 20),
          "With `logprobs: true`: also return the 0 to 20 most likely tokens at each step.",
          endpoints=frozenset({CHAT})),
    Param("top_p", _number(0, 1, lo_open=True), "(0, 1], default 1 (off). Nucleus sampling."),
    Param("user", _accepted({"type": "string"}), "Accepted; changes nothing."),
    Param("verbosity", _refused("answer length is the model's own"), "Refused (400).",
          endpoints=frozenset({CHAT})),
    Param("web_search_options", _refused("web search"), "Refused (400).", endpoints=frozenset({CHAT})),
    Param("top_k", _integer(),
          "Keep only the k most likely tokens; 0, -1 or absent is off; 1 is greedy.",
          extension="LM Studio, llama.cpp, vLLM"),
    Param("min_p", _number(0, 1),
          "[0, 1], default 0 (off). Drop tokens whose probability is below min_p times the top "
          "token's.", extension="LM Studio, llama.cpp, vLLM"),
    Param("repeat_penalty", _number(0, 10, lo_open=True),
          "Default 1.0 (off). llama.cpp's penalty over the last `repeat_last_n` tokens of prompt "
          "plus output: a positive logit is divided by it, a negative one multiplied.",
          extension="LM Studio, llama.cpp"),
    Param("repetition_penalty", _number(0, 10, lo_open=True), "Alias of `repeat_penalty`.",
          extension="vLLM, mlx-lm", alias_of="repeat_penalty"),
    Param("repeat_last_n", _integer(-1),
          "Window of `repeat_penalty`, default 64; 0 turns it off, -1 means the whole context.",
          extension="llama.cpp"),
    Param("ttl", _number(1e-3, 1e9),
          "Seconds the model may stay loaded while idle after this request (server default: `--ttl`, "
          "60 minutes).", extension="LM Studio"),
)

PARAMS_BY_NAME = {p.name: p for p in PARAMS if p.endpoints == BOTH}

_ROLES = {"system", "developer", "user", "assistant", "tool"}


def params_for(endpoint: str) -> tuple[Param, ...]:
    return tuple(p for p in PARAMS if endpoint in p.endpoints)


def read_fields(body: dict[str, Any], params: tuple[Param, ...], required: tuple[str, ...] = ("model",)
                ) -> dict[str, Any]:
    """Parse every known, non-null field of `body`; a bad value, or a missing required one, names its param."""
    values: dict[str, Any] = {}
    for param in params:
        if body.get(param.name) is None:
            continue
        try:
            values[param.alias_of or param.name] = param.parse(body[param.name])
        except _Invalid as exc:
            raise InvalidRequestError(f"'{param.name}' {exc}", param=param.name) from None
    missing = next((name for name in required if name not in values), None)
    if missing is not None:
        raise InvalidRequestError(f"'{missing}' is required", param=missing)
    return values


def _content_parts(content: Any, where: str, role: str) -> tuple[str | ImagePart, ...]:
    """A message's content as text and image parts, in order; images are fetched later (api/images.py)."""
    if isinstance(content, str):
        return (content,)
    if content is None and role in ("assistant", "tool"):
        return ("",)
    if not isinstance(content, list):
        raise InvalidRequestError(f"'{where}' must be a string or a list of content parts", param=where)
    parts: list[str | ImagePart] = []
    for j, part in enumerate(content):
        here = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise InvalidRequestError(f"'{here}.text' must be a string", param=f"{here}.text")
            parts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise InvalidRequestError(f"'{here}.image_url.url' must be a string", param=f"{here}.image_url.url")
            parts.append(ImagePart(url=url, where=here))
        else:
            raise InvalidRequestError(
                f"'{here}' must be an object with type 'text' or 'image_url'; got {kind!r}", param=here)
    return tuple(parts)


_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
_IMAGE_PART = {"type": "object", "required": ["type", "image_url"], "properties": {
    "type": {"const": "image_url"},
    "image_url": {"oneOf": [{"type": "string"}, {"type": "object", "required": ["url"],
                                                  "properties": {"url": {"type": "string"}}}]}}}
_CALL = {"type": "object", "required": ["id", "type", "function"], "properties": {
    "id": {"type": "string"}, "type": {"const": "function"},
    "function": {"type": "object", "required": ["name", "arguments"],
                 "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}}}}}


def _tool_calls(value: Any, where: str) -> tuple[ToolCall, ...]:
    """An assistant turn's `tool_calls`, as the history sends them back."""
    if not isinstance(value, list):
        raise InvalidRequestError(f"'{where}' must be a list of tool calls", param=where)
    calls = []
    for j, call in enumerate(value):
        here = f"{where}[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not isinstance(call.get("id"), str):
            raise InvalidRequestError(f"'{here}' must be {{\"id\", \"type\": \"function\", \"function\": "
                                      "{\"name\", \"arguments\"}}", param=here)
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        calls.append(ToolCall(call["id"], function["name"], arguments))
    return tuple(calls)


@_described({"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["role"], "properties": {
        "role": {"enum": sorted(_ROLES)}, "name": {"type": "string"},
        "content": {"oneOf": [{"type": "string"}, {"type": "null"},
                              {"type": "array", "items": {"oneOf": [_TEXT_PART, _IMAGE_PART]}}]},
        "tool_calls": {"type": "array", "items": _CALL}, "tool_call_id": {"type": "string"}}}})
def _messages(value: Any) -> tuple[ChatMessage, ...]:
    if not isinstance(value, list) or not value:
        raise InvalidRequestError("'messages' must be a non-empty list", param="messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequestError(f"'{where}' must be an object", param=where)
        role = message.get("role")
        if role not in _ROLES:
            raise InvalidRequestError(
                f"'{where}.role' must be one of {', '.join(sorted(_ROLES))}; got {role!r}",
                param=f"{where}.role")
        parts = _content_parts(message.get("content"), f"{where}.content", role)
        name = message.get("name") if isinstance(message.get("name"), str) else None
        calls = ()
        if role == "assistant" and message.get("tool_calls") is not None:
            calls = _tool_calls(message["tool_calls"], f"{where}.tool_calls")
        call_id = message.get("tool_call_id")
        if role == "tool" and not isinstance(call_id, str):
            raise InvalidRequestError(f"'{where}.tool_call_id' is required for a tool message (the id of the "
                                      "call it answers)", param=f"{where}.tool_call_id")
        # Chat templates know "system"; OpenAI's newer "developer" role means the same.
        messages.append(ChatMessage("system" if role == "developer" else role, parts, name, calls,
                                    call_id if role == "tool" else None))
    return tuple(messages)


@_described({"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "integer"}},
                       {"type": "array", "minItems": 1, "maxItems": 1, "items": {"type": "string"}}]})
def _prompt(value: Any) -> str | tuple[int, ...]:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return tuple(value)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    raise InvalidRequestError(
        "'prompt' must be a string, a list of token ids, or a list with one string", param="prompt")


@dataclass(frozen=True)
class ParsedGeneration:
    """A generation request plus how the client wants the answer delivered."""

    request: GenerationRequest
    stream: bool
    include_usage: bool


def _generation(values: dict[str, Any], logprobs: int | None, **inputs: Any) -> ParsedGeneration:
    sampling_fields = SamplingParams.__dataclass_fields__
    sampling = SamplingParams(**{k: v for k, v in values.items() if k in sampling_fields})
    tool_choice, forced = values.get("tool_choice", ("auto", None))
    request = GenerationRequest(
        model=values["model"],
        max_tokens=values.get("max_completion_tokens", values.get("max_tokens")),
        stop=values.get("stop", ()),
        sampling=sampling,
        n=values.get("n", 1),
        ttl=values.get("ttl"),
        logprobs=logprobs,
        response_format=values.get("response_format", OutputFormat()),
        tools=values.get("tools", ()),
        tool_choice=tool_choice,
        forced_tool=forced,
        parallel_tool_calls=values.get("parallel_tool_calls", False),
        echo=values.get("echo", False),
        thinking=values.get("reasoning_effort"),
        **inputs,
    )
    return ParsedGeneration(
        request=request,
        stream=values.get("stream", False),
        include_usage=values.get("stream_options", False),
    )


# What each endpoint's request holds besides PARAMS, and must hold.
INPUTS = {CHAT: Param("messages", _messages, "The conversation so far.", frozenset({CHAT})),
          COMPLETIONS: Param("prompt", _prompt, "The text (or token ids) to continue.", frozenset({COMPLETIONS}))}


def parse_chat(body: dict[str, Any]) -> ParsedGeneration:
    values = read_fields(body, params_for(CHAT))
    if "messages" not in body:
        raise InvalidRequestError("'messages' is required", param="messages")
    if values.get("top_logprobs") and not values.get("logprobs"):
        raise InvalidRequestError("'top_logprobs' needs 'logprobs' set to true", param="top_logprobs")
    logprobs = values.get("top_logprobs", 0) if values.get("logprobs") else None
    tools = values.get("tools", ())
    choice, forced = values.get("tool_choice", ("auto", None))
    if choice == "required" and not tools:
        raise InvalidRequestError("'tool_choice' asks for a tool call, but 'tools' declares none", param="tool_choice")
    if forced is not None and forced not in {t.name for t in tools}:
        raise InvalidRequestError(f"'tool_choice' names the function '{forced}', which 'tools' does not declare",
                                  param="tool_choice")
    return _generation(values, logprobs, messages=_messages(body["messages"]))


def parse_completion(body: dict[str, Any]) -> ParsedGeneration:
    values = read_fields(body, params_for(COMPLETIONS))
    if "prompt" not in body:
        raise InvalidRequestError("'prompt' is required", param="prompt")
    return _generation(values, values.get("logprobs"), prompt=_prompt(body["prompt"]))


def params_markdown() -> str:
    """The README's parameter table, generated from PARAMS so the two cannot drift apart."""
    rows = ["| parameter | endpoints | meaning |", "|---|---|---|"]
    for p in PARAMS:
        where = "both" if p.endpoints == BOTH else ("chat" if CHAT in p.endpoints else "completions")
        name = f"`{p.name}`" + (f" (extension: {p.extension})" if p.extension else "")
        rows.append(f"| {name} | {where} | {p.doc} |")
    return "\n".join(rows)


# --- /v1/embeddings -------------------------------------------------------------

MAX_EMBEDDING_INPUTS = 2048


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)


@_described({"oneOf": [
    {"type": "string", "minLength": 1},
    {"type": "array", "minItems": 1, "maxItems": MAX_EMBEDDING_INPUTS, "items": {"type": "string", "minLength": 1}},
    {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
    {"type": "array", "minItems": 1, "maxItems": MAX_EMBEDDING_INPUTS,
     "items": {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}}]})
def _embedding_inputs(value: Any) -> tuple[str | tuple[int, ...], ...]:
    """OpenAI's four input forms: a string, strings, token ids, lists of token ids."""
    if isinstance(value, str):
        value = [value]
    elif _is_token_ids(value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise InvalidRequestError(
            "'input' must be a non-empty string, a non-empty list of strings, a list of token ids, "
            "or a list of lists of token ids", param="input")
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequestError(
            f"'input' has {len(value)} items; at most {MAX_EMBEDDING_INPUTS} are allowed", param="input")
    inputs: list[str | tuple[int, ...]] = []
    for i, item in enumerate(value):
        if isinstance(item, str) and item:
            inputs.append(item)
        elif _is_token_ids(item):
            inputs.append(tuple(item))
        else:
            problem = "is empty" if item in ("", []) else "is neither a string nor a list of token ids"
            raise InvalidRequestError(f"'input[{i}]' {problem}", param="input")
    return tuple(inputs)


@dataclass(frozen=True)
class ParsedEmbedding:
    request: EmbeddingRequest
    base64: bool


@_described({"enum": ["float", "base64"]})
def _encoding_format(value: Any) -> str:
    if value not in ("float", "base64"):
        raise _Invalid("must be 'float' or 'base64'")
    return value


EMBEDDING_PARAMS: tuple[Param, ...] = (
    PARAMS_BY_NAME["model"],
    Param("input", _embedding_inputs, "A string, up to 2048 strings, token ids, or lists of token ids."),
    Param("encoding_format", _encoding_format, "`float` (default) or `base64` (little-endian float32)."),
    Param("dimensions", _integer(1), "Truncate to this many dimensions and re-normalize."),
    PARAMS_BY_NAME["ttl"],
)


def parse_embedding(body: dict[str, Any]) -> ParsedEmbedding:
    values = read_fields(body, EMBEDDING_PARAMS, required=("model", "input"))
    request = EmbeddingRequest(model=values["model"], inputs=values["input"], dimensions=values.get("dimensions"),
                               ttl=values.get("ttl"))
    return ParsedEmbedding(request, base64=values.get("encoding_format") == "base64")


# --- /api/v0 ---------------------------------------------------------------------

LOAD_PARAMS: tuple[Param, ...] = (PARAMS_BY_NAME["model"], PARAMS_BY_NAME["ttl"])
UNLOAD_PARAMS: tuple[Param, ...] = (PARAMS_BY_NAME["model"], Param("all", _boolean, "Unload every model."))
