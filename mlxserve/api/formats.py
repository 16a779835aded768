"""OpenAI response and stream-chunk objects for chat and text completions.

The two endpoints differ only in names and in where a choice keeps its text
(`message`/`delta` versus `text`); `CHAT` and `TEXT` hold those differences
so one generation flow serves both.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from mlxserve.protocol import TokenLogprob, ToolCall, Usage


def usage_object(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


@dataclass(frozen=True)
class ResponseFormat:
    id_prefix: str
    object: str
    chunk_object: str
    chat: bool

    def new_id(self) -> str:
        return self.id_prefix + secrets.token_hex(12)

    def envelope(self, response_id: str, model: str, created: int, obj: str,
                 fingerprint: str) -> dict[str, Any]:
        return {"id": response_id, "object": obj, "created": created, "model": model,
                "system_fingerprint": fingerprint}

    def logprobs(self, entries: list[TokenLogprob], text_offset: int = 0) -> dict[str, Any]:
        """Chat's `{"content": [...]}` or the completions API's parallel lists."""
        if self.chat:
            return {"content": [_chat_entry(e) for e in entries], "refusal": None}
        offsets = []
        for e in entries:
            offsets.append(text_offset)
            text_offset += len(e.token)
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [None if e.logprob is None else {t.token: t.logprob for t in e.top} for e in entries],
            "text_offset": offsets,
        }

    def choice(self, index: int, text: str, finish_reason: str | None,
               logprobs: dict[str, Any] | None = None, reasoning: str = "",
               calls: list[ToolCall] | None = None) -> dict[str, Any]:
        if self.chat:
            # OpenAI's content is null when the answer is only tool calls.
            message: dict[str, Any] = {"role": "assistant", "content": None if calls and not text else text,
                                       "refusal": None}
            if reasoning:
                message["reasoning_content"] = reasoning
            if calls:
                message["tool_calls"] = [_call(c) for c in calls]
            return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def chunk_choice(self, index: int, text: str | None, finish_reason: str | None, first: bool = False,
                     logprobs: dict[str, Any] | None = None, reasoning: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["reasoning_content" if reasoning else "content"] = text
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}

    def call_chunks(self, index: int, position: int, call: ToolCall) -> list[dict[str, Any]]:
        """OpenAI's streamed form of a call: the first delta names it, the next carries its arguments."""
        head = {"index": position, "id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": ""}}
        tail = {"index": position, "function": {"arguments": call.arguments}}
        return [{"index": index, "delta": {"tool_calls": [part]}, "logprobs": None, "finish_reason": None}
                for part in (head, tail)]


def _call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _chat_entry(e: TokenLogprob) -> dict[str, Any]:
    return {
        "token": e.token, "logprob": e.logprob, "bytes": list(e.bytes),
        "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)} for t in e.top],
    }


CHAT = ResponseFormat("chatcmpl-", "chat.completion", "chat.completion.chunk", chat=True)
TEXT = ResponseFormat("cmpl-", "text_completion", "text_completion", chat=False)


def now() -> int:
    return int(time.time())
