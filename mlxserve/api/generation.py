"""One flow for chat and text completions: submit, then answer as JSON or as an SSE stream."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Protocol

from sanic import Request
from sanic.response import HTTPResponse, json

from mlxserve.api import access_log, sse
from mlxserve.api.errors import describe, log
from mlxserve.api.formats import ResponseFormat, now, usage_object
from mlxserve.api.schemas import ParsedGeneration
from mlxserve.protocol import ChoiceFinished, GenerationRequest, TextDelta, TokenLogprob, ToolCall, ToolCallDelta, Usage


class GenerationStream(Protocol):
    prompt_tokens: int
    system_fingerprint: str

    def __aiter__(self): ...

    def cancel(self) -> None: ...


class Generator(Protocol):
    async def generate(self, request: GenerationRequest) -> GenerationStream: ...


async def respond(request: Request, engine: Generator, parsed: ParsedGeneration,
                  fmt: ResponseFormat) -> HTTPResponse | None:
    """Run the generation; a client that disconnects cancels it (Sanic cancels this task)."""
    request.ctx.model = parsed.request.model
    scope = getattr(request.ctx, "key_scope", "")
    stream = await engine.generate(replace(parsed.request, cache_scope=scope) if scope else parsed.request)
    try:
        if parsed.stream:
            request.ctx.streaming = True
            await _stream(request, stream, parsed, fmt)
            return None
        return await _collect(request, stream, parsed, fmt)
    finally:
        stream.cancel()
        if parsed.stream:  # 499: the client went away before the end (nginx's convention)
            failed = getattr(request.ctx, "error_status", None)
            access_log.finish(request, failed or (200 if getattr(request.ctx, "usage", None) else 499))


def _envelope(stream: GenerationStream, parsed: ParsedGeneration, fmt: ResponseFormat, obj: str) -> dict[str, Any]:
    return fmt.envelope(fmt.new_id(), parsed.request.model, now(), obj, stream.system_fingerprint)


async def _collect(request: Request, stream: GenerationStream, parsed: ParsedGeneration,
                   fmt: ResponseFormat) -> HTTPResponse:
    n = parsed.request.n
    texts: list[list[str]] = [[] for _ in range(n)]
    thoughts: list[list[str]] = [[] for _ in range(n)]
    calls: list[list[ToolCall]] = [[] for _ in range(n)]
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
    reasons: list[str | None] = [None] * n
    usage: Usage | None = None
    async for ev in stream:
        if isinstance(ev, TextDelta):
            access_log.note_first_token(request)
            (thoughts if ev.reasoning else texts)[ev.index].append(ev.text)
            logprobs[ev.index].extend(ev.logprobs)
        elif isinstance(ev, ToolCallDelta):
            access_log.note_first_token(request)
            calls[ev.index].append(ev.call)
        elif isinstance(ev, ChoiceFinished):
            reasons[ev.index] = ev.reason
        elif isinstance(ev, Usage):
            usage = request.ctx.usage = ev
    wants_logprobs = parsed.request.logprobs is not None
    body = _envelope(stream, parsed, fmt, fmt.object)
    body["choices"] = [
        fmt.choice(i, "".join(texts[i]), reasons[i], fmt.logprobs(logprobs[i]) if wants_logprobs else None,
                   reasoning="".join(thoughts[i]), calls=calls[i])
        for i in range(n)
    ]
    body["usage"] = usage_object(usage)
    return json(body)


async def _stream(request: Request, stream: GenerationStream, parsed: ParsedGeneration,
                  fmt: ResponseFormat) -> None:
    response = await sse.open_stream(request)
    base = _envelope(stream, parsed, fmt, fmt.chunk_object)
    if parsed.include_usage:
        base["usage"] = None
    wants_logprobs = parsed.request.logprobs is not None
    offsets = [0] * parsed.request.n

    async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
        await response.send(sse.event({**base, "choices": choices, **extra}))

    if fmt.chat:
        await send([fmt.chunk_choice(i, "", None, first=True) for i in range(parsed.request.n)])
    try:
        async for ev in stream:
            if isinstance(ev, TextDelta):
                access_log.note_first_token(request)
                logprobs = fmt.logprobs(list(ev.logprobs), offsets[ev.index]) if wants_logprobs else None
                offsets[ev.index] += len(ev.text)
                await send([fmt.chunk_choice(ev.index, ev.text, None, logprobs=logprobs, reasoning=ev.reasoning)])
            elif isinstance(ev, ToolCallDelta):
                access_log.note_first_token(request)
                for chunk in fmt.call_chunks(ev.index, ev.position, ev.call):
                    await send([chunk])
            elif isinstance(ev, ChoiceFinished):
                await send([fmt.chunk_choice(ev.index, None, ev.reason)])
            elif isinstance(ev, Usage):
                request.ctx.usage = ev
                if parsed.include_usage:
                    await send([], usage=usage_object(ev))
    except Exception as exc:  # the stream is open (status 200 sent): end it with an error event, as OpenAI does
        status, body = describe(exc)
        request.ctx.error_status, request.ctx.error = status, body["error"]["message"]
        log.warning("stream of %s %s failed: %s", request.method, request.path, body["error"]["message"])
        await response.send(sse.event(body))
    await response.send(sse.DONE)
    await response.eof()
