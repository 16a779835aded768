"""The request log that `mlxserve log stream` follows: what each model really receives.

The engine thread publishes one event when a request is accepted (the exact prompt text after
the chat template, with images as placeholders; token counts), events for the text it generates,
and one when it is done. Subscribers are asyncio queues; a subscriber that falls behind loses
events rather than growing the server's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

MAX_BACKLOG = 10_000


class LogHub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []

    @property
    def active(self) -> bool:
        return bool(self._subscribers)

    def publish(self, event: dict[str, Any]) -> None:
        """Called from the engine thread."""
        event = {"time": time.time(), **event}
        with self._lock:
            subscribers = list(self._subscribers)
        for loop, events in subscribers:
            with contextlib.suppress(RuntimeError):  # that subscriber's loop is gone
                loop.call_soon_threadsafe(self._offer, events, event)

    @staticmethod
    def _offer(events: asyncio.Queue, event: dict[str, Any]) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            events.put_nowait(event)

    async def follow(self) -> AsyncIterator[dict[str, Any]]:
        """Every event published from now on, until the caller stops iterating.

        The first event is `{"type": "hello"}`, sent once subscribed: a follower that waits for
        it knows that no later request will be missed.
        """
        entry = (asyncio.get_running_loop(), asyncio.Queue(maxsize=MAX_BACKLOG))
        with self._lock:
            self._subscribers.append(entry)
        try:
            yield {"time": time.time(), "type": "hello"}
            while True:
                yield await entry[1].get()
        finally:
            with self._lock:
                self._subscribers.remove(entry)
