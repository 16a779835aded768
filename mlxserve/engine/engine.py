"""The engine's asyncio face: what the HTTP layer calls.

`generate()` hands a request to the engine thread and returns once the engine
has accepted it (tokenized, context checked) or raised the client's error, so
the HTTP layer can still answer with a 4xx before it commits to a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

from mlxserve.cpus import usable_cpus
from mlxserve.engine import wired
from mlxserve.engine.cpu import compute_path
from mlxserve.engine.distributed import Leader
from mlxserve.engine.logs import LogHub
from mlxserve.engine.manager import ModelManager
from mlxserve.engine.scheduler import Scheduler
from mlxserve.engine.store import ModelStore
from mlxserve.protocol import (
    Accepted,
    EmbeddingRequest,
    EmbeddingResult,
    Event,
    GenerationRequest,
    Health,
    LoadedModel,
    MemoryUsage,
    ModelInfo,
    RankInfo,
    ServerBusyError,
    Usage,
    WrongModelKindError,
)

log = logging.getLogger("mlxserve.engine")


_KIND_LABELS = {"text": "a chat (text generation) model", "vision": "a vision-language chat model",
                "embeddings": "an embedding model"}


class GenerationStream:
    """The events of one request; `cancel()` stops its generation (safe to call twice)."""

    def __init__(self, events: asyncio.Queue, accepted: Accepted, cancel: Callable[[], None],
                 closed: Callable[[], None]):
        self._events = events
        self.prompt_tokens = accepted.prompt_tokens
        self.system_fingerprint = accepted.system_fingerprint
        self._cancel = cancel
        self._closed = closed
        self._done = False

    def _close(self) -> None:
        self._done = True
        self._closed()

    async def __aiter__(self) -> AsyncIterator[Event]:
        while not self._done:
            event = await self._events.get()
            if isinstance(event, BaseException):
                self._close()
                raise event
            if isinstance(event, Usage):
                self._close()
            yield event

    def cancel(self) -> None:
        if not self._done:
            self._close()
            self._cancel()


class Engine:
    def __init__(self, store: ModelStore, *, max_memory: int, default_ttl: float,
                 allowed: frozenset[str] | None = None, prompt_cache_bytes: int = 0,
                 max_concurrent: int = 32, max_queue: int = 64, stall_seconds: float = 60,
                 leader: Leader | None = None):
        self.store = store
        wired.set_process_limit(max_memory)
        self.leader = leader
        self.manager = ModelManager(store, max_memory, default_ttl, allowed, prompt_cache_bytes=prompt_cache_bytes,
                                    loader=None if leader is None else leader.load)
        self.logs = LogHub()
        self._scheduler = Scheduler(self.manager, self.logs, prompt_cache_bytes, max_concurrent, leader)
        if leader is not None:
            leader.on_lost = self._scheduler.abort
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.stall_seconds = stall_seconds
        self._active = 0  # requests accepted and not finished, counted on the asyncio side
        self._ids = itertools.count()
        # Templating, tokenizing and decoding images: off the engine thread (its streams keep moving) and
        # off the event loop, in a pool of their own so that nothing else waits behind a big prompt.
        self._prepare_pool = ThreadPoolExecutor(max_workers=min(4, usable_cpus()),
                                                thread_name_prefix="mlxserve-prepare")

    def start(self, preload: tuple[str, ...] = ()) -> None:
        """Start the engine thread and load `preload` before returning."""
        log.info("compute: %s", compute_path().note)
        self._scheduler.start()
        for model_id in preload:
            self.store.path(model_id)
            self._scheduler.load(model_id)

    def stop(self) -> None:
        self._scheduler.stop()
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)

    def list_models(self) -> list[ModelInfo]:
        """Models on disk that this server may load."""
        allowed = self.manager.allowed
        return [m for m in self.store.list() if allowed is None or m.id in allowed]

    def get_model(self, model_id: str) -> ModelInfo:
        info = self.store.get(model_id)
        self.manager.check_allowed(model_id)
        return info

    def is_loaded(self, model_id: str) -> bool:
        return self.manager.is_loaded(model_id)

    async def load(self, model_id: str, ttl: float | None = None) -> LoadedModel:
        """Load now (just-in-time loading does this for requests); returns the model as `ps` shows it."""
        self.get_model(model_id)
        await asyncio.to_thread(self._scheduler.load, model_id, ttl)
        return next(m for m in await self.loaded() if m.id == model_id)

    async def unload(self, model_id: str) -> bool:
        if not self.manager.is_loaded(model_id):  # a loaded model may be gone from disk (`rm`): unload it all the same
            self.store.path(model_id)
        return await asyncio.to_thread(self._scheduler.unload, model_id)

    async def loaded(self) -> list[LoadedModel]:
        return await asyncio.to_thread(self._scheduler.loaded)

    def memory(self) -> MemoryUsage:
        return self.manager.memory()

    def ranks(self) -> list[RankInfo] | None:
        """A distributed server's processes with their memory; None for a single process."""
        return None if self.leader is None else self.leader.ranks()

    def health(self) -> Health:
        scheduler = self._scheduler
        stalled = scheduler.stalled_seconds
        failure = scheduler.failure
        return Health(healthy=stalled <= self.stall_seconds and failure is None, loop_stalled_seconds=stalled,
                      active_requests=self._active, queue_depth=max(0, self._active - self.max_concurrent),
                      max_concurrent=self.max_concurrent, max_queue=self.max_queue,
                      loading=self.manager.loading, error=None if failure is None else repr(failure),
                      compute=asdict(compute_path()), ranks=self.ranks())

    def _admit(self) -> None:
        """Count a new request in, or refuse it when every slot and every queue place is taken."""
        if self._active >= self.max_concurrent + self.max_queue:
            raise ServerBusyError(f"The server is busy: {self._active} requests are running or waiting "
                                  f"(at most {self.max_concurrent} run at once and {self.max_queue} wait). "
                                  "Try again shortly.")
        self._active += 1

    def _release(self) -> None:
        self._active -= 1

    def _require(self, model_id: str, capability: str, endpoint: str, needs: str) -> ModelInfo:
        info = self.get_model(model_id)
        if capability not in info.capabilities:
            raise WrongModelKindError(f"The model '{model_id}' is {_KIND_LABELS[info.kind]}, but {endpoint} needs {needs}")
        return info

    async def _loaded(self, model_id: str, ttl: float | None) -> Any:
        """The model, loaded on the engine thread if it is not yet (waiting off the event loop)."""
        if self._scheduler.failure is None:
            model = self.manager.peek(model_id)
            if model is not None:
                return model
        return await asyncio.to_thread(self._scheduler.model, model_id, ttl)

    async def _prepare(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._prepare_pool, fn, *args)

    async def _first_event(self, submit: Callable[[int, Callable[[object], None]], None]
                           ) -> tuple[int, asyncio.Queue, object]:
        """Submit to the engine thread; wait for its first event, raising it if it is an error."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        request_id = next(self._ids)

        def sink(event: object) -> None:
            # RuntimeError: the loop closed (server shutting down) and nobody is listening.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(events.put_nowait, event)

        submit(request_id, sink)
        try:
            first = await events.get()
        except asyncio.CancelledError:
            self._scheduler.cancel(request_id)
            raise
        if isinstance(first, BaseException):
            raise first
        return request_id, events, first

    def check(self, request: GenerationRequest) -> None:
        """Raise what is wrong with the request's model (unknown, not allowed, wrong kind, no images)
        before anything costly happens for it, such as fetching its images."""
        capability = "chat" if request.messages is not None else "completions"
        info = self._require(request.model, capability, "this endpoint", "a chat (text generation) model")
        images = [i for m in request.messages or () for i in m.images]
        if images and "vision" not in info.capabilities:
            raise WrongModelKindError(
                f"The model '{request.model}' does not accept images (its capabilities: "
                f"{', '.join(info.capabilities)}); send text only or use a vision model", param=images[0].where)

    async def generate(self, request: GenerationRequest) -> GenerationStream:
        """Queue `request`; raise its MlxserveError (unknown model, context too long, ...) before streaming."""
        self.check(request)
        self._admit()
        try:
            model = await self._loaded(request.model, request.ttl)
            encoded = await self._prepare(model.encode, request)
            request_id, events, first = await self._first_event(
                lambda rid, sink: self._scheduler.submit(rid, request, encoded, sink))
        except BaseException:
            self._release()
            raise
        assert isinstance(first, Accepted)
        return GenerationStream(events, first, lambda: self._scheduler.cancel(request_id), self._release)

    async def count_tokens(self, request: GenerationRequest) -> int:
        """The prompt tokens `request` would have (its template, tools and images applied), without generating."""
        self.check(request)
        model = await self._loaded(request.model, request.ttl)
        encoded = await self._prepare(model.encode, request)
        return len(encoded.tokens)

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """Embed every input, batched on the engine thread; raises the client's MlxserveError."""
        self._require(request.model, "embeddings", "/v1/embeddings", "an embedding model")
        self._admit()
        try:
            model = await self._loaded(request.model, request.ttl)
            tokens = await self._prepare(model.tokenize, list(request.inputs))
            _, _, result = await self._first_event(
                lambda rid, sink: self._scheduler.embed(rid, request, tokens, sink))
        finally:
            self._release()
        assert isinstance(result, EmbeddingResult)
        return result
