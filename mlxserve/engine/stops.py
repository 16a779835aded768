"""Stop strings over streamed text.

Text that could still turn out to be the start of a stop string is held back,
so a streaming client never sees any part of a stop string, and a stop string
that spans several tokens is found all the same.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]):
        self._stops = tuple(s for s in stops if s)
        self._pending = ""
        self.matched: str | None = None  # the stop string that ended generation

    def feed(self, text: str) -> tuple[str, bool]:
        """Add generated text; return (text safe to send, whether a stop string was hit).

        After a hit, the returned text is everything before the earliest stop string.
        """
        buffer = self._pending + text
        hits = [(i, s) for i, s in ((buffer.find(s), s) for s in self._stops) if i >= 0]
        if hits:
            self._pending = ""
            at, self.matched = min(hits)
            return buffer[:at], True
        held = self._held_suffix(buffer)
        self._pending = buffer[len(buffer) - held :]
        return buffer[: len(buffer) - held], False

    def _held_suffix(self, buffer: str) -> int:
        """Length of the longest end of `buffer` that begins some stop string."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def flush(self) -> str:
        """Held-back text, released when generation ends without a stop string."""
        text, self._pending = self._pending, ""
        return text
