"""One generation flow for every wire format: submit, then answer as JSON or as an SSE stream.

A wire format (OpenAI chat and completions here, Anthropic Messages in `api/anthropic.py`) is an
adapter with two methods: `collect` renders the whole answer from `Collected`, `stream` writes the
events as they come. Submitting, cancelling on disconnect and the access log live here, once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from sanic import Request
from sanic.response import HTTPResponse, json

from mlxserve.api import access_log, sse
from mlxserve.api.errors import describe, log, message_of
from mlxserve.api.formats import ResponseFormat, now, usage_object
from mlxserve.api.images import resolve_images
from mlxserve.api.schemas import ParsedGeneration
from mlxserve.protocol import (
    ChoiceFinished,
    Event,
    GenerationRequest,
    TextDelta,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    Usage,
)


class GenerationStream(Protocol):
    prompt_tokens: int
    system_fingerprint: str

    def __aiter__(self) -> AsyncIterator[Event]: ...

    def cancel(self) -> None: ...


class Generator(Protocol):
    async def generate(self, request: GenerationRequest) -> GenerationStream: ...


class WireFormat(Protocol):
    async def collect(self, request: Request, stream: GenerationStream, parsed: ParsedGeneration) -> HTTPResponse: ...

    async def stream(self, request: Request, stream: GenerationStream, parsed: ParsedGeneration) -> None: ...


@dataclass
class Choice:
    """One choice's whole answer."""

    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: ChoiceFinished | None = None


@dataclass
class Collected:
    choices: list[Choice]
    usage: Usage


def observe(request: Request, event: Event) -> None:
    """What the access log notes of every event, whatever the wire format."""
    if isinstance(event, (TextDelta, ToolCallDelta)):
        access_log.note_first_token(request)
    elif isinstance(event, Usage):
        request.ctx.usage = event


async def collect_events(request: Request, stream: GenerationStream, n: int) -> Collected:
    choices = [Choice() for _ in range(n)]
    usage = None
    async for ev in stream:
        observe(request, ev)
        if isinstance(ev, TextDelta):
            (choices[ev.index].reasoning if ev.reasoning else choices[ev.index].text).append(ev.text)
            choices[ev.index].logprobs.extend(ev.logprobs)
        elif isinstance(ev, ToolCallDelta):
            choices[ev.index].calls.append(ev.call)
        elif isinstance(ev, ChoiceFinished):
            choices[ev.index].finished = ev
        elif isinstance(ev, Usage):
            usage = ev
    assert usage is not None  # the engine always ends a request with its usage
    return Collected(choices, usage)


async def with_images(request: Request, parsed: ParsedGeneration) -> ParsedGeneration:
    """`parsed` with its image parts fetched and decoded, once the model is known to take images
    (a request for a text model is refused before any image is fetched)."""
    request.app.ctx.engine.check(parsed.request)
    messages = await resolve_images(parsed.request.messages, request.app.ctx.image_policy)
    return replace(parsed, request=replace(parsed.request, messages=messages))


async def respond(request: Request, engine: Generator, parsed: ParsedGeneration, wire: WireFormat
                  ) -> HTTPResponse | None:
    """Run the generation; a client that disconnects cancels it (Sanic cancels this task)."""
    request.ctx.model = parsed.request.model
    scope = getattr(request.ctx, "key_scope", "")
    stream = await engine.generate(replace(parsed.request, cache_scope=scope) if scope else parsed.request)
    try:
        if parsed.stream:
            request.ctx.streaming = True
            await wire.stream(request, stream, parsed)
            return None
        return await wire.collect(request, stream, parsed)
    finally:
        stream.cancel()
        if parsed.stream:  # 499: the client went away before the end (nginx's convention)
            failed = getattr(request.ctx, "error_status", None)
            access_log.finish(request, failed or (200 if getattr(request.ctx, "usage", None) else 499))


def stream_failed(request: Request, exc: Exception) -> dict[str, Any]:
    """A stream is open (status 200 sent) and failed: the error object its last event carries."""
    status, body = describe(exc, request.path)
    request.ctx.error_status, request.ctx.error = status, message_of(body)
    log.warning("stream of %s %s failed: %s", request.method, request.path, message_of(body))
    return body


@dataclass(frozen=True)
class OpenAIWire:
    """OpenAI's chat and text completions; `fmt` holds where the two differ."""

    fmt: ResponseFormat

    def _envelope(self, stream: GenerationStream, parsed: ParsedGeneration, obj: str) -> dict[str, Any]:
        return self.fmt.envelope(self.fmt.new_id(), parsed.request.model, now(), obj, stream.system_fingerprint)

    async def collect(self, request: Request, stream: GenerationStream, parsed: ParsedGeneration) -> HTTPResponse:
        fmt = self.fmt
        collected = await collect_events(request, stream, parsed.request.n)
        wants_logprobs = parsed.request.logprobs is not None
        body = self._envelope(stream, parsed, fmt.object)
        body["choices"] = [
            fmt.choice(i, "".join(c.text), c.finished.reason if c.finished else None,
                       fmt.logprobs(c.logprobs) if wants_logprobs else None,
                       reasoning="".join(c.reasoning), calls=c.calls)
            for i, c in enumerate(collected.choices)
        ]
        body["usage"] = usage_object(collected.usage)
        return json(body)

    async def stream(self, request: Request, stream: GenerationStream, parsed: ParsedGeneration) -> None:
        fmt = self.fmt
        response = await sse.open_stream(request)
        base = self._envelope(stream, parsed, fmt.chunk_object)
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
                observe(request, ev)
                if isinstance(ev, TextDelta):
                    logprobs = fmt.logprobs(list(ev.logprobs), offsets[ev.index]) if wants_logprobs else None
                    offsets[ev.index] += len(ev.text)
                    await send([fmt.chunk_choice(ev.index, ev.text, None, logprobs=logprobs,
                                                 reasoning=ev.reasoning)])
                elif isinstance(ev, ToolCallDelta):
                    for chunk in fmt.call_chunks(ev.index, ev.position, ev.call):
                        await send([chunk])
                elif isinstance(ev, ChoiceFinished):
                    await send([fmt.chunk_choice(ev.index, None, ev.reason)])
                elif isinstance(ev, Usage) and parsed.include_usage:
                    await send([], usage=usage_object(ev))
        except Exception as exc:  # end the open stream with an error event, as OpenAI does
            await response.send(sse.event(stream_failed(request, exc)))
        await response.send(sse.DONE)
        await response.eof()
