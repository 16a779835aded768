"""OpenAI's Responses API (`/v1/responses`: Codex, the Agents SDK) as a wire format over the one generation flow.

`parse_responses` turns a request (input items, instructions, function tools, `text.format`,
`reasoning`) into the chat turns and `GenerationRequest` every format shares; `ResponsesWire`
renders the engine's events as a response object or as the Responses stream events, and hands
the finished response to the store (`api/response_store.py`) when the request asks to keep it.
Hosted tools (`web_search`, `file_search`, ...) are left out of the prompt and logged; fields that
tune OpenAI's service (`include`, `prompt_cache_key`, `client_metadata`, ...) change nothing here.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from sanic import Request
from sanic.response import HTTPResponse
from sanic.response import json as json_response

from mlxserve.api import sse
from mlxserve.api.generation import GenerationStream, collect_events, observe, stream_failed
from mlxserve.api.schemas import (
    ParsedGeneration,
    _boolean,
    _integer,
    _Invalid,
    _number,
    _refused,
    _response_format,
    _string,
)
from mlxserve.protocol import (
    ChatMessage,
    ChoiceFinished,
    GenerationRequest,
    ImagePart,
    InvalidRequestError,
    OutputFormat,
    SamplingParams,
    TextDelta,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    Usage,
)

log = logging.getLogger("mlxserve.api")


def _bad(param: str, problem: str) -> InvalidRequestError:
    return InvalidRequestError(f"'{param}' {problem}", param=param)


def _read(body: dict[str, Any], name: str, parse: Callable[[Any], Any]) -> Any:
    if body.get(name) is None:
        return None
    try:
        return parse(body[name])
    except _Invalid as exc:
        raise _bad(name, str(exc)) from None


def _parts(content: Any, where: str) -> tuple[str | ImagePart, ...]:
    if isinstance(content, str):
        return (content,)
    if not isinstance(content, list):
        raise _bad(where, "must be a string or a list of content parts")
    parts: list[str | ImagePart] = []
    for j, part in enumerate(content):
        here = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append(part["refusal"])
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append(ImagePart(url=part["image_url"], where=here))
        else:
            raise _bad(here, f"must be an input_text, input_image or output_text part; got {kind!r}")
    return tuple(parts)


def _output_text(output: Any, where: str) -> str:
    if isinstance(output, str):
        return output
    return "".join(p for p in _parts(output, where) if isinstance(p, str))


# Items only OpenAI's hosted tools produce, and reasoning (chat templates drop past thinking):
# nothing of them goes into the prompt.
_SKIPPED_ITEMS = {"reasoning", "web_search_call", "file_search_call", "computer_call", "computer_call_output",
                  "code_interpreter_call", "image_generation_call", "mcp_list_tools", "mcp_call",
                  "mcp_approval_request", "mcp_approval_response"}


def input_turns(value: Any) -> list[ChatMessage]:
    """`input`: a string, or items (messages, function calls and their outputs) as chat turns."""
    if isinstance(value, str):
        return [ChatMessage("user", (value,))]
    if not isinstance(value, list):
        raise _bad("input", "must be a string or a list of input items")
    turns: list[ChatMessage] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(where, "must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("system", "developer", "user", "assistant"):
                raise _bad(f"{where}.role", f"must be system, developer, user or assistant; got {role!r}")
            turns.append(ChatMessage("system" if role == "developer" else role,
                                     _parts(item.get("content", ""), f"{where}.content")))
        elif kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                raise _bad(where, "a function_call needs call_id, name and arguments strings")
            call = ToolCall(item["call_id"], item["name"], item["arguments"])
            last = turns[-1] if turns else None
            if last is not None and last.role == "assistant":  # calls after the assistant's text are one turn
                turns[-1] = replace(last, tool_calls=last.tool_calls + (call,))
            else:
                turns.append(ChatMessage("assistant", ("",), tool_calls=(call,)))
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise _bad(f"{where}.call_id", "is required")
            turns.append(ChatMessage("tool", (_output_text(item.get("output", ""), f"{where}.output"),),
                                     tool_call_id=item["call_id"]))
        elif kind in _SKIPPED_ITEMS:
            continue
        else:
            raise _bad(f"{where}.type", f"{kind!r} items are not supported by this server")
    return turns


def _tools(value: Any) -> tuple[Tool, ...]:
    if not isinstance(value, list):
        raise _bad("tools", "must be a list")
    tools: list[Tool] = []
    for i, tool in enumerate(value):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "namespace" and isinstance(tool.get("tools"), list):
            tools.extend(_tools(tool["tools"]))  # Codex groups some functions under a namespace
            continue
        if kind != "function":
            # A tool OpenAI's servers run (web search, file search, a computer, ...): nothing here can run it.
            log.info("left out the tool of type %r: this server cannot run it", kind)
            continue
        name, parameters = tool.get("name"), tool.get("parameters")
        if not isinstance(name, str) or not name:
            raise _bad(f"tools[{i}].name", "is required")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise _bad(f"tools[{i}].parameters", "must be a JSON Schema of type 'object'")
        if any(t.name == name for t in tools):
            raise _bad(f"tools[{i}].name", f"'{name}' is declared twice")
        tools.append(Tool(name, tool.get("description") or "", parameters))
    return tuple(tools)


def _tool_choice(value: Any, tools: tuple[Tool, ...]) -> tuple[str, str | None]:
    if value in ("none", "auto", "required"):
        if value == "required" and not tools:
            raise _bad("tool_choice", "asks for a tool call, but 'tools' declares no function")
        return value, None
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str):
        if value["name"] not in {t.name for t in tools}:
            raise _bad("tool_choice", f"names the function '{value['name']}', which 'tools' does not declare")
        return "required", value["name"]
    raise _bad("tool_choice", "must be 'none', 'auto', 'required' or {\"type\": \"function\", \"name\": ...}")


def _text_format(value: Any) -> OutputFormat:
    fmt = value.get("format") if isinstance(value, dict) else None
    if fmt is None:
        return OutputFormat()
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":  # flat in the Responses API
        fmt = {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
    try:
        return _response_format(fmt)
    except _Invalid as exc:
        raise _bad("text.format", str(exc)) from None


def _plain_string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid("must be a string")
    return value


@dataclass(frozen=True)
class ResponsesRequest:
    """A parsed /v1/responses request: the generation, and what the response object echoes or the store needs."""

    parsed: ParsedGeneration
    input: tuple[ChatMessage, ...]  # this request's own input turns (without instructions or history)
    instructions: str | None
    previous_response_id: str | None
    store: bool
    echo: dict[str, Any] = field(default_factory=dict)  # request fields the response object repeats
    history: tuple[ChatMessage, ...] = ()  # the stored conversation `previous_response_id` continues


def parse_responses(body: dict[str, Any]) -> ResponsesRequest:
    """Everything but the history of `previous_response_id`, which the route adds from the store."""
    model = _read(body, "model", _string)
    if model is None:
        raise _bad("model", "is required")
    if body.get("input") is None:
        raise _bad("input", "is required")
    _read(body, "background", _refused("background responses", lambda v: v is False))
    _read(body, "conversation", _refused("the Conversations API; use previous_response_id"))
    _read(body, "prompt", _refused("stored prompt templates"))
    _read(body, "truncation", _refused("'auto' truncation; the context limit is a 400", lambda v: v == "disabled"))
    _read(body, "max_tool_calls", _refused("a cap on tool calls"))
    turns = tuple(input_turns(body["input"]))
    instructions = _read(body, "instructions", _plain_string)
    tools = _tools(body["tools"]) if body.get("tools") is not None else ()
    choice, forced = _tool_choice(body["tool_choice"], tools) if body.get("tool_choice") is not None \
        else ("auto", None)
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
    # "none"/"minimal" turn a thinking model's thinking off; other efforts leave its template to decide.
    thinking = False if reasoning.get("effort") in ("none", "minimal") else None
    top_logprobs = _read(body, "top_logprobs", _integer(0, 20))
    request = GenerationRequest(
        model=model, messages=turns, max_tokens=_read(body, "max_output_tokens", _integer(1)),
        sampling=SamplingParams(temperature=_read(body, "temperature", _number(0, 2)),
                                top_p=_read(body, "top_p", _number(0, 1, lo_open=True)) or 1.0),
        logprobs=top_logprobs, response_format=_text_format(body.get("text")), tools=tools, tool_choice=choice,
        forced_tool=forced, parallel_tool_calls=bool(_read(body, "parallel_tool_calls", _boolean)),
        thinking=thinking)
    stream = _read(body, "stream", _boolean) or False
    store = _read(body, "store", _boolean)
    echo = {k: body.get(k) for k in ("metadata", "user", "service_tier", "safety_identifier", "prompt_cache_key")}
    echo.update(tools=body.get("tools") or [], tool_choice=body.get("tool_choice", "auto"),
                text=body.get("text") or {"format": {"type": "text"}}, reasoning=reasoning or None,
                max_output_tokens=request.max_tokens, temperature=request.sampling.temperature,
                top_p=request.sampling.top_p, parallel_tool_calls=request.parallel_tool_calls,
                top_logprobs=top_logprobs)
    return ResponsesRequest(ParsedGeneration(request, stream, include_usage=True), turns, instructions,
                            _read(body, "previous_response_id", _string), store is not False, echo)


def with_history(req: ResponsesRequest, history: tuple[ChatMessage, ...]) -> ResponsesRequest:
    """The request's turns after the stored conversation, behind this request's own instructions
    (instructions are not carried over from a previous response, as in OpenAI's API)."""
    if not history + req.input:
        raise _bad("input", "holds no message (nor does a previous response): there is nothing to answer")
    system = (ChatMessage("system", (req.instructions,)),) if req.instructions else ()
    request = replace(req.parsed.request, messages=system + history + req.input)
    return replace(req, parsed=replace(req.parsed, request=request), history=history)


def _id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def _logprobs(entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    return [{"token": e.token, "logprob": e.logprob, "bytes": list(e.bytes),
             "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)} for t in e.top]}
            for e in entries]


def _usage(usage: Usage) -> dict[str, Any]:
    return {"input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": usage.cached_tokens},
            "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens}


def _reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {"id": item_id, "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def _text_part(text: str, logprobs: list[TokenLogprob]) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": _logprobs(logprobs)}


def _message_item(item_id: str, text: str, logprobs: list[TokenLogprob], status: str = "completed") -> dict:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [_text_part(text, logprobs)] if status == "completed" else []}


def _call_item(item_id: str, call: ToolCall, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call.id, "name": call.name,
            "arguments": call.arguments if status == "completed" else ""}


@dataclass
class ResponsesWire:
    """Renders one response; `keep(response, history)` stores it when the request asked to."""

    req: ResponsesRequest
    keep: Callable[[dict[str, Any], tuple[ChatMessage, ...]], Any] | None = None
    response_id: str = field(default_factory=lambda: _id("resp_"))
    created: int = field(default_factory=lambda: int(time.time()))

    def _response(self, status: str, output: list[dict[str, Any]], usage: Usage | None,
                  finished: ChoiceFinished | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        incomplete = finished is not None and finished.reason == "length"
        return {"id": self.response_id, "object": "response", "created_at": self.created,
                "status": "incomplete" if incomplete and status == "completed" else status,
                "error": error, "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "instructions": self.req.instructions, "model": self.req.parsed.request.model, "output": output,
                "previous_response_id": self.req.previous_response_id, "store": self.req.store,
                "truncation": "disabled", "usage": _usage(usage) if usage else None, **self.req.echo}

    async def _finish(self, response: dict[str, Any], text: str, calls: list[ToolCall]) -> None:
        """Store the finished response with the conversation it ends, when asked to."""
        if self.keep is None or not self.req.store or response["status"] == "failed":
            return
        reply = ChatMessage("assistant", (text,), tool_calls=tuple(calls))
        await asyncio.to_thread(self.keep, response, self.req.history + self.req.input + (reply,))

    async def collect(self, request: Request, stream: GenerationStream, parsed: ParsedGeneration) -> HTTPResponse:
        collected = await collect_events(request, stream, 1)
        choice = collected.choices[0]
        output: list[dict[str, Any]] = []
        if choice.reasoning:
            output.append(_reasoning_item(_id("rs_"), "".join(choice.reasoning)))
        text = "".join(choice.text)
        if text or not choice.calls:
            output.append(_message_item(_id("msg_"), text, choice.logprobs))
        output += [_call_item(_id("fc_"), call) for call in choice.calls]
        response = self._response("completed", output, collected.usage, choice.finished)
        await self._finish(response, text, choice.calls)
        return json_response(response)

    async def stream(self, request: Request, stream: GenerationStream, parsed: ParsedGeneration) -> None:
        response = await sse.open_stream(request)
        sequence = 0

        async def send(kind: str, **payload: Any) -> None:
            nonlocal sequence
            await response.send(sse.event({"type": kind, "sequence_number": sequence, **payload}))
            sequence += 1

        output: list[dict[str, Any]] = []
        await send("response.created", response=self._response("in_progress", [], None))
        await send("response.in_progress", response=self._response("in_progress", [], None))
        open_item: dict[str, Any] | None = None  # the reasoning or message item being written
        texts: dict[str, list[str]] = {}
        logprobs: list[TokenLogprob] = []
        calls: list[ToolCall] = []
        finished: ChoiceFinished | None = None

        async def close_item() -> None:
            nonlocal open_item
            if open_item is None:
                return
            item, index, text = open_item, len(output), "".join(texts[open_item["id"]])
            if item["type"] == "reasoning":
                await send("response.reasoning_text.done", item_id=item["id"], output_index=index,
                           content_index=0, text=text)
                done = _reasoning_item(item["id"], text)
            else:
                part = _text_part(text, logprobs)
                await send("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                           text=text, logprobs=part["logprobs"])
                await send("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                           part=part)
                done = _message_item(item["id"], text, logprobs)
            await send("response.output_item.done", output_index=index, item=done)
            output.append(done)
            open_item = None

        async def open_text_item(reasoning: bool) -> None:
            nonlocal open_item
            await close_item()
            if reasoning:
                open_item = {"id": _id("rs_"), "type": "reasoning"}
                await send("response.output_item.added", output_index=len(output),
                           item={**_reasoning_item(open_item["id"], ""), "content": []})
            else:
                open_item = {"id": _id("msg_"), "type": "message"}
                await send("response.output_item.added", output_index=len(output),
                           item=_message_item(open_item["id"], "", [], status="in_progress"))
                await send("response.content_part.added", item_id=open_item["id"], output_index=len(output),
                           content_index=0, part=_text_part("", []))
            texts[open_item["id"]] = []

        try:
            async for ev in stream:
                observe(request, ev)
                if isinstance(ev, TextDelta) and (ev.text or ev.logprobs):
                    kind = "reasoning" if ev.reasoning else "message"
                    if open_item is None or open_item["type"] != kind:
                        await open_text_item(ev.reasoning)
                    texts[open_item["id"]].append(ev.text)
                    if ev.reasoning:
                        await send("response.reasoning_text.delta", item_id=open_item["id"],
                                   output_index=len(output), content_index=0, delta=ev.text)
                    else:
                        logprobs.extend(ev.logprobs)
                        await send("response.output_text.delta", item_id=open_item["id"], output_index=len(output),
                                   content_index=0, delta=ev.text, logprobs=_logprobs(list(ev.logprobs)))
                elif isinstance(ev, ToolCallDelta):
                    await close_item()
                    item_id, index = _id("fc_"), len(output)
                    calls.append(ev.call)
                    await send("response.output_item.added", output_index=index,
                               item=_call_item(item_id, ev.call, status="in_progress"))
                    await send("response.function_call_arguments.delta", item_id=item_id, output_index=index,
                               delta=ev.call.arguments)
                    await send("response.function_call_arguments.done", item_id=item_id, output_index=index,
                               arguments=ev.call.arguments)
                    done = _call_item(item_id, ev.call)
                    await send("response.output_item.done", output_index=index, item=done)
                    output.append(done)
                elif isinstance(ev, ChoiceFinished):
                    finished = ev
                elif isinstance(ev, Usage):
                    if not output and open_item is None:  # an empty answer is still a message
                        await open_text_item(False)
                    await close_item()
                    final = self._response("completed", output, ev, finished)
                    await send(f"response.{final['status']}", response=final)
                    message = next((i for i in output if i["type"] == "message"), None)
                    await self._finish(final, message["content"][0]["text"] if message else "", calls)
        except Exception as exc:  # the stream is open: end it with response.failed
            error = stream_failed(request, exc)["error"]
            await send("response.failed", response=self._response(
                "failed", output, None, error={"code": error.get("code") or error["type"], "message": error["message"]}))
        await response.eof()  # the Responses API ends its stream with the last event, not `[DONE]`
