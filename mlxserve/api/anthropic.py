"""Anthropic's Messages API (`POST /v1/messages`) as a wire format over the one generation flow.

`parse_messages` turns a Messages request into the same `GenerationRequest` chat completions make
(system text, text/image/tool_use/tool_result blocks, tools with `input_schema`, `tool_choice`,
`thinking`); `MessagesWire` renders the engine's events as a Message object or as Anthropic's
stream events. What real clients send that a local server cannot act on is accepted and noted in
the log, never refused (see the README's list): hosted tools (`web_search_...`, `bash_...`) are left
out of the prompt; `cache_control`, `context_management`, `metadata`, `service_tier`,
`anthropic-beta` and the like change nothing here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from sanic import Request
from sanic.response import HTTPResponse
from sanic.response import json as json_response

from mlxserve.api import sse
from mlxserve.api.generation import GenerationStream, collect_events, observe, stream_failed
from mlxserve.api.schemas import ParsedGeneration, _integer, _Invalid, _number, _string
from mlxserve.protocol import (
    ChatMessage,
    ChoiceFinished,
    GenerationRequest,
    ImagePart,
    InvalidRequestError,
    OutputFormat,
    SamplingParams,
    TextDelta,
    Tool,
    ToolCall,
    ToolCallDelta,
    Usage,
)

log = logging.getLogger("mlxserve.api")

# A stream that has sent nothing for this long gets a `ping` event (a model loading, a long prefill).
PING_SECONDS = 10.0

_STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}


def _field(body: dict[str, Any], name: str, parse: Any, required: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidRequestError(f"{name}: Field required", param=name)
        return None
    try:
        return parse(value)
    except _Invalid as exc:
        raise InvalidRequestError(f"{name}: {exc}", param=name) from None


def _bad(where: str, problem: str) -> InvalidRequestError:
    return InvalidRequestError(f"{where}: {problem}", param=where)


def _text_of(content: Any, where: str) -> str:
    """Text blocks (or a string) as one string: system prompts and tool results."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(where, "must be a string or a list of content blocks")
    parts = []
    for j, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise _bad(f"{where}.{j}", "must be a text block ({\"type\": \"text\", \"text\": ...})")
        parts.append(block["text"])
    return "\n".join(parts)


def _image(block: dict[str, Any], where: str) -> ImagePart:
    source = block.get("source")
    if not isinstance(source, dict):
        raise _bad(f"{where}.source", "must be an object")
    if source.get("type") == "base64":
        media, data = source.get("media_type"), source.get("data")
        if not isinstance(media, str) or not isinstance(data, str):
            raise _bad(f"{where}.source", "a base64 source needs media_type and data strings")
        return ImagePart(url=f"data:{media};base64,{data}", where=where)
    if source.get("type") == "url" and isinstance(source.get("url"), str):
        return ImagePart(url=source["url"], where=where)
    raise _bad(f"{where}.source", "must be a base64 or url image source")


# Blocks of a conversation's history that only Anthropic's hosted tools produce, and past thinking
# (chat templates drop it too): nothing of them goes into the prompt.
_SKIPPED_BLOCKS = {"thinking", "redacted_thinking", "server_tool_use", "web_search_tool_result",
                   "web_fetch_tool_result", "code_execution_tool_result", "mcp_tool_use", "mcp_tool_result",
                   "container_upload"}


def _turns(message: Any, i: int) -> list[ChatMessage]:
    """One Messages turn as chat turns: a user turn's tool results become `tool` turns before its text."""
    where = f"messages.{i}"
    if not isinstance(message, dict):
        raise _bad(where, "must be an object")
    role = message.get("role")
    if role not in ("user", "assistant", "system"):
        raise _bad(f"{where}.role", f"must be 'user' or 'assistant'; got {role!r}")
    content = message.get("content")
    if isinstance(content, str):
        return [ChatMessage(role, (content,))]
    if not isinstance(content, list):
        raise _bad(f"{where}.content", "must be a string or a list of content blocks")
    parts: list[str | ImagePart] = []
    calls: list[ToolCall] = []
    results: list[ChatMessage] = []
    for j, block in enumerate(content):
        here = f"{where}.content.{j}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append(block["text"])
        elif kind == "image" and role == "user":
            parts.append(_image(block, here))
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise _bad(here, "a tool_use block needs id and name")
            calls.append(ToolCall(block["id"], block["name"], json.dumps(block.get("input") or {})))
        elif kind == "tool_result" and role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise _bad(f"{here}.tool_use_id", "Field required")
            text = _text_of(block.get("content") or "", f"{here}.content")
            if block.get("is_error"):
                text = f"Error: {text}"
            results.append(ChatMessage("tool", (text,), tool_call_id=block["tool_use_id"]))
        elif kind in _SKIPPED_BLOCKS:
            continue
        else:
            raise _bad(here, f"a {kind!r} block is not supported in a {role} message")
    turns = results
    if parts or calls or not results:
        turns = turns + [ChatMessage(role, tuple(parts) or ("",), tool_calls=tuple(calls))]
    return turns


def _stop_sequences(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _Invalid("must be a list of strings")
    return value


def _tools(value: Any) -> tuple[Tool, ...]:
    if not isinstance(value, list):
        raise _bad("tools", "must be a list")
    tools = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise _bad(f"tools.{i}", "must be an object")
        if tool.get("type") not in (None, "custom"):
            # A tool Anthropic's servers run (web search, code execution, ...): nothing here can run it.
            log.info("left out the hosted tool %r (type %s): this server cannot run it", tool.get("name"),
                     tool.get("type"))
            continue
        name, schema = tool.get("name"), tool.get("input_schema")
        if not isinstance(name, str) or not name:
            raise _bad(f"tools.{i}.name", "Field required")
        if not isinstance(schema, dict) or schema.get("type", "object") != "object":
            raise _bad(f"tools.{i}.input_schema", "must be a JSON Schema of type 'object'")
        tools.append(Tool(name, tool.get("description") or "", schema))
    return tuple(tools)


def _tool_choice(value: Any, tools: tuple[Tool, ...]) -> tuple[str, str | None]:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise _bad("tool_choice.type", "must be 'auto', 'any', 'tool' or 'none'")
    if kind in ("any", "tool") and not tools:
        raise _bad("tool_choice", "asks for a tool call, but 'tools' declares none")
    if kind == "tool":
        name = value.get("name")
        if name not in {t.name for t in tools}:
            raise _bad("tool_choice.name", f"names the tool {name!r}, which 'tools' does not declare")
        return "required", name
    return {"auto": "auto", "any": "required", "none": "none"}[kind], None


def _output_format(body: dict[str, Any]) -> OutputFormat:
    """Structured outputs: `output_format` (beta) or `output_config.format`, a JSON Schema."""
    config = body.get("output_config") if isinstance(body.get("output_config"), dict) else {}
    spec = body.get("output_format") or config.get("format")
    if spec is None:
        return OutputFormat()
    if not isinstance(spec, dict) or spec.get("type") != "json_schema" or not isinstance(spec.get("schema"), dict):
        raise _bad("output_format", "must be {\"type\": \"json_schema\", \"schema\": {...}}")
    return OutputFormat("json_schema", spec["schema"])


def parse_messages(body: dict[str, Any], count_only: bool = False) -> ParsedGeneration:
    """A Messages request (or, `count_only`, a count_tokens request) as a generation request."""
    model = _field(body, "model", _string, required=True)
    max_tokens = None if count_only else _field(body, "max_tokens", _integer(1), required=True)
    system = body.get("system")
    messages: list[ChatMessage] = []
    if system:
        messages.append(ChatMessage("system", (_text_of(system, "system"),)))
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _bad("messages", "must be a non-empty list")
    for i, message in enumerate(raw):
        messages.extend(_turns(message, i))
    stops = _field(body, "stop_sequences", _stop_sequences)
    tools = _tools(body["tools"]) if body.get("tools") is not None else ()
    choice, forced = ("auto", None)
    if body.get("tool_choice") is not None:
        choice, forced = _tool_choice(body["tool_choice"], tools)
    thinking = body.get("thinking")
    think = None
    if isinstance(thinking, dict) and thinking.get("type") == "disabled":
        think = False  # "enabled" and "adaptive" leave a thinking model's template to think
    sampling = SamplingParams(temperature=_field(body, "temperature", _number(0, 1)),
                              top_p=_field(body, "top_p", _number(0, 1, lo_open=True)) or 1.0,
                              top_k=_field(body, "top_k", _integer(0)) or 0)
    request = GenerationRequest(
        model=model, messages=tuple(messages), max_tokens=max_tokens, stop=tuple(stops or ()),
        sampling=sampling, response_format=_output_format(body), tools=tools, tool_choice=choice,
        # One call per forced reply, as with chat completions (`disable_parallel_tool_use` is always so here).
        forced_tool=forced, parallel_tool_calls=False, thinking=think)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "must be true or false")
    return ParsedGeneration(request=request, stream=stream, include_usage=True)


def _usage(usage: Usage, output_tokens: int | None = None) -> dict[str, Any]:
    """Anthropic counts cache reads apart from the (uncached) input tokens."""
    return {"input_tokens": usage.prompt_tokens - usage.cached_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": usage.cached_tokens,
            "output_tokens": usage.completion_tokens if output_tokens is None else output_tokens}


def _stop(finished: ChoiceFinished | None) -> tuple[str | None, str | None]:
    if finished is None:
        return None, None
    if finished.stop_sequence is not None:
        return "stop_sequence", finished.stop_sequence
    return _STOP_REASONS.get(finished.reason, "end_turn"), None


def _input(call: ToolCall) -> Any:
    try:
        return json.loads(call.arguments)
    except ValueError:
        return {}


def _message(message_id: str, model: str) -> dict[str, Any]:
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None}


def _event(kind: str, payload: dict[str, Any]) -> str:
    return f"event: {kind}\n" + sse.event({"type": kind, **payload})


@dataclass(frozen=True)
class MessagesWire:
    async def collect(self, request: Request, stream: GenerationStream, parsed: ParsedGeneration) -> HTTPResponse:
        collected = await collect_events(request, stream, 1)
        choice = collected.choices[0]
        body = _message("msg_" + secrets.token_hex(12), parsed.request.model)
        if choice.reasoning:
            body["content"].append({"type": "thinking", "thinking": "".join(choice.reasoning), "signature": ""})
        if choice.text and "".join(choice.text):
            body["content"].append({"type": "text", "text": "".join(choice.text)})
        for call in choice.calls:
            body["content"].append({"type": "tool_use", "id": call.id, "name": call.name, "input": _input(call)})
        body["stop_reason"], body["stop_sequence"] = _stop(choice.finished)
        body["usage"] = _usage(collected.usage)
        return json_response(body)

    async def stream(self, request: Request, stream: GenerationStream, parsed: ParsedGeneration) -> None:
        response = await sse.open_stream(request)
        message = _message("msg_" + secrets.token_hex(12), parsed.request.model)
        start = Usage(stream.prompt_tokens, 0)
        await response.send(_event("message_start", {"message": {**message, "usage": _usage(start, 1)}}))
        await response.send(_event("ping", {}))
        blocks = -1  # index of the open content block
        open_kind: str | None = None

        async def open_block(kind: str, block: dict[str, Any]) -> None:
            nonlocal blocks, open_kind
            if open_kind is not None:
                await response.send(_event("content_block_stop", {"index": blocks}))
            blocks += 1
            open_kind = kind
            await response.send(_event("content_block_start", {"index": blocks, "content_block": block}))

        finished: ChoiceFinished | None = None
        try:
            async for ev in _with_pings(stream):
                if ev is None:
                    await response.send(_event("ping", {}))
                    continue
                observe(request, ev)
                if isinstance(ev, TextDelta) and ev.text:
                    kind = "thinking" if ev.reasoning else "text"
                    if open_kind != kind:
                        await open_block(kind, {"type": "thinking", "thinking": "", "signature": ""}
                                         if ev.reasoning else {"type": "text", "text": ""})
                    delta = {"type": "thinking_delta", "thinking": ev.text} if ev.reasoning \
                        else {"type": "text_delta", "text": ev.text}
                    await response.send(_event("content_block_delta", {"index": blocks, "delta": delta}))
                elif isinstance(ev, ToolCallDelta):
                    await open_block("tool_use", {"type": "tool_use", "id": ev.call.id, "name": ev.call.name,
                                                  "input": {}})
                    await response.send(_event("content_block_delta", {"index": blocks, "delta": {
                        "type": "input_json_delta", "partial_json": ev.call.arguments}}))
                    open_kind = "tool_use:done"  # the next piece of any kind starts a new block
                elif isinstance(ev, ChoiceFinished):
                    finished = ev
                elif isinstance(ev, Usage):
                    if open_kind is not None:
                        await response.send(_event("content_block_stop", {"index": blocks}))
                    reason, sequence = _stop(finished)
                    await response.send(_event("message_delta", {
                        "delta": {"stop_reason": reason, "stop_sequence": sequence}, "usage": _usage(ev)}))
                    await response.send(_event("message_stop", {}))
        except Exception as exc:  # the stream is open: end it with Anthropic's error event
            await response.send(_event("error", {"error": stream_failed(request, exc)["error"]}))
        await response.eof()


async def _with_pings(stream: GenerationStream):
    """The stream's events, with None whenever PING_SECONDS pass without one."""
    events = aiter(stream)
    while True:
        pending = asyncio.ensure_future(anext(events))
        try:
            while not (await asyncio.wait({pending}, timeout=PING_SECONDS))[0]:
                yield None
        finally:
            if not pending.done():  # the client went away while we waited
                pending.cancel()
        try:
            event = pending.result()
        except StopAsyncIteration:
            return
        yield event
