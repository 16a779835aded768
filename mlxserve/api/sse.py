"""Server-Sent Events framing: `data: <json>` events, ending with `data: [DONE]`.

No comment lines (`: ping`), which some OpenAI clients fail to parse.
"""

from __future__ import annotations

import json
from typing import Any

from sanic import Request
from sanic.response import ResponseStream

DONE = "data: [DONE]\n\n"


def event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def open_stream(request: Request) -> ResponseStream:
    return await request.respond(
        content_type="text/event-stream; charset=utf-8",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
