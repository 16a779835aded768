"""Token ids to text, one token at a time, never splitting a UTF-8 character.

Byte-level BPE and SentencePiece byte-fallback tokens can each carry part of a
multi-byte character, and SentencePiece drops a leading space unless it sees
the token before. So each step decodes a small window that starts one token
before the last emitted text, and emits only what is new and complete (the
window's text does not end in U+FFFD, the decoder's mark for a cut character).
"""

from __future__ import annotations

from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """`keep_special`: special tokens stay in the text (a model's think or tool-call markers may be
    special tokens, and the channel stage after this one must see them)."""

    def __init__(self, tokenizer: Decoder, keep_special: bool = False):
        self._tokenizer = tokenizer
        self._skip = not keep_special
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens before this index are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def add(self, token: int) -> str:
        """Feed one token; return the text it completes (often '', never a partial character)."""
        self._ids.append(token)
        emitted = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) > len(emitted) and not text.endswith("\ufffd"):
            self._prefix = self._read
            self._read = len(self._ids)
            return text[len(emitted) :]
        return ""

    def flush(self) -> str:
        """Text still held back at the end of generation (an incomplete character becomes U+FFFD)."""
        emitted = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(emitted) :]
