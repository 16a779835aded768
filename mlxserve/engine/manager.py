"""Which models are in memory: just-in-time loading, idle time-to-live, and a memory budget.

Lives on the engine thread (it loads and frees MLX arrays), so one load at a
time is a given: concurrent requests for a model that is loading queue behind
that one load. A model that is serving requests is never unloaded.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from mlxserve.engine.cpu import placeholder_bytes
from mlxserve.engine.store import ModelStore
from mlxserve.protocol import InsufficientMemoryError, LoadedModel, MemoryUsage, ModelNotAllowedError
from mlxserve.settings import human_bytes

log = logging.getLogger("mlxserve.engine")

def release_memory() -> None:
    """Give an unloaded model's memory back to the system, not just to MLX or to malloc.

    MLX keeps freed buffers in its cache; on Linux, glibc keeps freed heap pages in the process
    (its mmap threshold grows after large frees, so later big arrays come from the heap).
    """
    gc.collect()
    mx.clear_cache()
    trim_heap()


def held_memory() -> int:
    """The bytes MLX's arrays hold, less the CPU path's placeholders, which MLX counts but no page backs."""
    return mx.get_active_memory() - placeholder_bytes()


def trim_heap() -> None:
    """Return the free pages inside glibc's heaps to the system (a few ms; nothing elsewhere)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # musl and other C libraries without malloc_trim
        return None


_LIBC = _glibc()
TRIM_SECONDS = 60


@dataclass
class _Resident:
    id: str
    kind: str
    model: Any
    memory_bytes: int
    ttl: float
    loaded_at: float
    last_used: float


class ModelManager:
    def __init__(self, store: ModelStore, max_bytes: int, default_ttl: float,
                 allowed: frozenset[str] | None = None, clock: Callable[[], float] = time.monotonic,
                 prompt_cache_bytes: int = 0, loader: Callable[[str], Any] | None = None):
        self.store = store
        self._loader = loader  # a distributed server's: text models on every rank (None: the store's)
        self.max_bytes = max_bytes
        self.prompt_cache_bytes = prompt_cache_bytes  # each generating model may fill this much
        self.default_ttl = default_ttl
        self.allowed = allowed
        self._clock = clock
        self._residents: dict[str, _Resident] = {}
        # Called with a model id just before it is unloaded (the scheduler drops its batch).
        self.on_unload: Callable[[str], None] = lambda model_id: None
        self.loading: str | None = None  # the model being loaded now (read by /health from any thread)
        self._trimmed = clock()

    def check_allowed(self, model_id: str) -> None:
        if self.allowed is not None and model_id not in self.allowed:
            raise ModelNotAllowedError(
                f"The model '{model_id}' may not be loaded on this server (allowed: {', '.join(sorted(self.allowed))})")

    def acquire(self, model_id: str, ttl: float | None, busy: Callable[[str], bool]) -> Any:
        """The loaded model, loading it first (and unloading idle ones to fit) if need be."""
        self.check_allowed(model_id)
        resident = self._residents.get(model_id)
        if resident is None:
            resident = self._load(model_id, busy)
        resident.last_used = self._clock()
        if ttl is not None:
            resident.ttl = ttl
        return resident.model

    def peek(self, model_id: str) -> Any:
        """The model if it is loaded, else None; safe from any thread (one dict read)."""
        resident = self._residents.get(model_id)
        return None if resident is None else resident.model

    def _need(self, model_id: str) -> tuple[int, int]:
        """What a model counts against the budget: its weights as they will be held once loaded (not their
        size on disk: on the CPU they become float32), and a full prompt cache for a generating model."""
        cache = self.prompt_cache_bytes if self.store.get(model_id).kind != "embeddings" else 0
        return self.store.resident_bytes(model_id), cache

    def _load(self, model_id: str, busy: Callable[[str], bool]) -> _Resident:
        weights, cache = self._need(model_id)
        need = weights + cache
        needs = (f"needs {human_bytes(need)} ({human_bytes(weights)} of weights as loaded here"
                 + (f", {human_bytes(cache)} of prompt cache, --prompt-cache)" if cache else ")"))
        if need > self.max_bytes:
            raise InsufficientMemoryError(
                f"The model '{model_id}' {needs}, more than the server's memory budget of "
                f"{human_bytes(self.max_bytes)} (--max-memory)")
        idle = sorted((r for r in self._residents.values() if not busy(r.id)), key=lambda r: r.last_used)
        while self._used() + need > self.max_bytes and idle:
            victim = idle.pop(0)
            log.info("unloading %s (least recently used) to make room for %s", victim.id, model_id)
            self.unload(victim.id)
        if self._used() + need > self.max_bytes:
            serving = ", ".join(f"{r.id} ({human_bytes(r.memory_bytes)})" for r in self._residents.values())
            raise InsufficientMemoryError(
                f"The model '{model_id}' {needs}, but {human_bytes(self._used())} of the "
                f"{human_bytes(self.max_bytes)} budget is held by models serving requests: {serving}. Try again later.")
        before = held_memory()
        started = time.perf_counter()
        self.loading = model_id
        try:
            model = (self._loader or self.store.load)(model_id)
        finally:
            self.loading = None
        memory = max(held_memory() - before, weights) + cache
        log.info("loaded %s in %.1fs (%s in memory)", model_id, time.perf_counter() - started, human_bytes(memory))
        now = self._clock()
        resident = _Resident(model_id, self.store.get(model_id).kind, model, memory, self.default_ttl, time.time(), now)
        self._residents[model_id] = resident
        return resident

    def _used(self) -> int:
        return sum(r.memory_bytes for r in self._residents.values())

    def loaded_ids(self) -> list[str]:
        return sorted(self._residents)

    def is_loaded(self, model_id: str) -> bool:
        return model_id in self._residents

    def unload(self, model_id: str) -> bool:
        """Free a model's memory; False if it was not loaded."""
        if model_id not in self._residents:
            return False
        self.on_unload(model_id)
        del self._residents[model_id]
        release_memory()
        log.info("unloaded %s", model_id)
        return True

    def expire(self, busy: Callable[[str], bool]) -> None:
        """Unload models idle for longer than their TTL; a busy model's idle time starts over.

        Once a minute it also trims the heap: freed requests' pages otherwise stay resident, scattered
        between live ones, and a busy server's RSS climbs to a high-water mark it never leaves.
        """
        now = self._clock()
        if now - self._trimmed >= TRIM_SECONDS:
            self._trimmed = now
            trim_heap()
        for resident in list(self._residents.values()):
            if busy(resident.id):
                resident.last_used = now
            elif now - resident.last_used >= resident.ttl:
                log.info("unloading %s: idle for %.0fs (ttl %.0fs)", resident.id, now - resident.last_used, resident.ttl)
                self.unload(resident.id)

    def memory(self) -> MemoryUsage:
        return MemoryUsage(held_memory(), mx.get_cache_memory(), self.max_bytes)

    def snapshot(self, in_flight: Callable[[str], int]) -> list[LoadedModel]:
        now = self._clock()
        return [LoadedModel(r.id, r.kind, r.memory_bytes, r.ttl, now - r.last_used, in_flight(r.id), r.loaded_at)
                for r in self._residents.values()]
