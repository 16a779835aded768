"""The output stage after detokenizing: the model's text split into answer, thinking and tool calls.

Runs on mlx-lm's `TextStateMachine` (matching markers in text, not token ids, so a marker's bytes
merged with a neighbour still match, and a partial marker is held back until it is decided). States:
"normal" (the answer), "reasoning" (between the model's think markers), "tool" (between its
tool-call markers). The markers themselves never reach the client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mlx_lm.generate import TextStateMachine

Channel = Literal["normal", "reasoning", "tool"]


@dataclass(frozen=True)
class Piece:
    """Answer or thinking text, or (channel "tool") the complete text of one call between its markers."""

    channel: Channel
    text: str


class ChannelSplitter:
    def __init__(self, thinking: tuple[str, str] | None, tool_markers: tuple[str, str] | None,
                 reasoning_first: bool):
        transitions: dict[str, list[tuple[str, str]]] = {"normal": []}
        if thinking is not None:
            transitions["normal"].append((thinking[0], "reasoning"))
            transitions["reasoning"] = [(thinking[1], "normal")]
        if tool_markers is not None:
            transitions["normal"].append((tool_markers[0], "tool"))
            transitions["tool"] = [(tool_markers[1], "normal")] if tool_markers[1] else []
        self._state = TextStateMachine(transitions).make_state(
            "reasoning" if reasoning_first and thinking is not None else "normal")
        self._call: list[str] = []
        self._in_call = False
        # With tools, blank answer text is held until it is known to lie between words rather than
        # around calls (the newlines a model writes between two calls are not an answer).
        self._hold_blank = tool_markers is not None
        self._blank = ""
        self.calls = 0

    def _pieces(self, segments: list[tuple[Channel, str]]) -> list[Piece]:
        pieces = []
        for channel, text in segments:
            if channel == "tool":
                self._in_call = True
                self._call.append(text)
                continue
            if self._in_call:  # the call's end marker was just passed
                pieces.append(self._end_call())
            if channel == "normal" and self._hold_blank:
                if not text.strip():
                    self._blank += text
                    continue
                text, self._blank = self._blank + text, ""
            if text:
                pieces.append(Piece(channel, text))
        return pieces

    def _end_call(self) -> Piece:
        piece = Piece("tool", "".join(self._call))
        self._call, self._in_call, self._blank = [], False, ""
        self.calls += 1
        return piece

    def feed(self, text: str) -> list[Piece]:
        self._state, segments = TextStateMachine.split(self._state, text)
        return self._pieces(segments)

    def finish(self) -> list[Piece]:
        """At the end of generation: text held back as a possible marker, and a call left open
        (a format without an end marker, or one cut short), which the caller parses or shows as text."""
        self._state, rest, channel = TextStateMachine.flush(self._state)
        pieces = self._pieces([(channel, rest)])
        if self._in_call:
            pieces.append(self._end_call())
        elif self._blank and not self.calls:
            pieces.append(Piece("normal", self._blank))
        return pieces
