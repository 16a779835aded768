"""Stored responses of the Responses API, in SQLite under the server's home, so chains survive restarts.

Each row keeps a response object (what `GET /v1/responses/{id}` returns) and the conversation it
ends (its input history and its output, as chat turns), so `previous_response_id` continues from one
row without walking the chain. Bounded in bytes and in age; the oldest rows go first.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mlxserve.protocol import ChatMessage, ImagePart, ToolCall


def turns_to_json(messages: tuple[ChatMessage, ...]) -> list[dict[str, Any]]:
    """Chat turns as JSON; an image keeps its URL (a data URL holds the image itself) and is fetched again."""
    return [{"role": m.role, "parts": [p if isinstance(p, str) else {"image": p.url, "where": p.where}
                                       for p in m.parts],
             "name": m.name, "tool_calls": [asdict(c) for c in m.tool_calls], "tool_call_id": m.tool_call_id}
            for m in messages]


def turns_from_json(rows: list[dict[str, Any]]) -> tuple[ChatMessage, ...]:
    return tuple(ChatMessage(r["role"], tuple(p if isinstance(p, str) else ImagePart(p["image"], p["where"])
                                              for p in r["parts"]),
                             r["name"], tuple(ToolCall(**c) for c in r["tool_calls"]), r["tool_call_id"])
                 for r in rows)


class ResponseStore:
    """Thread-safe; callers run it off the event loop (`asyncio.to_thread`)."""

    def __init__(self, path: Path, max_bytes: int, max_age_seconds: float):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.max_age = max_age_seconds
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, created REAL NOT NULL, "
                         "size INTEGER NOT NULL, response TEXT NOT NULL, history TEXT NOT NULL)")
        self._db.execute("CREATE INDEX IF NOT EXISTS by_created ON responses (created)")

    def put(self, response: dict[str, Any], history: tuple[ChatMessage, ...]) -> None:
        body, turns = json.dumps(response), json.dumps(turns_to_json(history))
        size = len(body) + len(turns)
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                             (response["id"], time.time(), size, body, turns))
            self._prune()
            self._db.execute("COMMIT")

    def _prune(self) -> None:
        self._db.execute("DELETE FROM responses WHERE created < ?", (time.time() - self.max_age,))
        total = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM responses").fetchone()[0]
        if total <= self.max_bytes:
            return
        dropped = 0
        doomed = []
        for rid, size in self._db.execute("SELECT id, size FROM responses ORDER BY created"):
            if total - dropped <= self.max_bytes:
                break
            doomed.append((rid,))
            dropped += size
        self._db.executemany("DELETE FROM responses WHERE id = ?", doomed)

    def get(self, response_id: str) -> tuple[dict[str, Any], tuple[ChatMessage, ...]] | None:
        with self._lock:
            row = self._db.execute("SELECT response, history FROM responses WHERE id = ? AND created >= ?",
                                   (response_id, time.time() - self.max_age)).fetchone()
        if row is None:
            return None
        return json.loads(row[0]), turns_from_json(json.loads(row[1]))

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

    def close(self) -> None:
        with self._lock:
            self._db.close()
