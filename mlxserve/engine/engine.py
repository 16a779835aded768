"""The engine's asyncio face: what the HTTP layer calls.

`generate()` hands a request to the engine thread and returns once the engine
has accepted it (tokenized, context checked) or raised the client's error, so
the HTTP layer can still answer with a 4xx before it commits to a stream.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable

from mlxserve.engine.kinds.text import load_text_model
from mlxserve.engine.scheduler import Scheduler
from mlxserve.engine.store import ModelStore
from mlxserve.protocol import Accepted, Event, GenerationRequest, ModelInfo, Usage


class GenerationStream:
    """The events of one request; `cancel()` stops its generation (safe to call twice)."""

    def __init__(self, events: asyncio.Queue, accepted: Accepted, cancel: Callable[[], None]):
        self._events = events
        self.prompt_tokens = accepted.prompt_tokens
        self.system_fingerprint = accepted.system_fingerprint
        self._cancel = cancel
        self._done = False

    async def __aiter__(self) -> AsyncIterator[Event]:
        while not self._done:
            event = await self._events.get()
            if isinstance(event, BaseException):
                self._done = True
                raise event
            if isinstance(event, Usage):
                self._done = True
            yield event

    def cancel(self) -> None:
        if not self._done:
            self._done = True
            self._cancel()


class Engine:
    def __init__(self, store: ModelStore):
        self.store = store
        self._scheduler = Scheduler(lambda model_id: load_text_model(model_id, store.path(model_id)))
        self._ids = itertools.count()

    def start(self, preload: tuple[str, ...] = ()) -> None:
        """Start the engine thread and load `preload` before returning."""
        self._scheduler.start()
        for model_id in preload:
            self.store.path(model_id)
            self._scheduler.preload(model_id)

    def stop(self) -> None:
        self._scheduler.stop()

    def list_models(self) -> list[ModelInfo]:
        return self.store.list()

    def get_model(self, model_id: str) -> ModelInfo:
        return self.store.get(model_id)

    async def generate(self, request: GenerationRequest) -> GenerationStream:
        """Queue `request`; raise its MlxserveError (unknown model, context too long, ...) before streaming."""
        self.store.path(request.model)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        request_id = next(self._ids)

        def sink(event: object) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop closed (server shutting down); nobody is listening
                pass

        self._scheduler.submit(request_id, request, sink)
        try:
            first = await events.get()
        except asyncio.CancelledError:
            self._scheduler.cancel(request_id)
            raise
        if isinstance(first, BaseException):
            raise first
        assert isinstance(first, Accepted)
        return GenerationStream(events, first, lambda: self._scheduler.cancel(request_id))
