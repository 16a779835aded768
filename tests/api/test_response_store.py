"""The Responses API's store: what it keeps, for how long, and in how many bytes."""

import time

from mlxserve.api.response_store import ResponseStore
from mlxserve.protocol import ChatMessage, ImagePart, ToolCall

TURNS = (ChatMessage("system", ("Be brief.",)),
         ChatMessage("user", ("Look", ImagePart("data:image/png;base64,AAAA", "input[0].content[1]"))),
         ChatMessage("assistant", ("",), tool_calls=(ToolCall("call_1", "f", '{"a": 1}'),)),
         ChatMessage("tool", ("42",), tool_call_id="call_1"))


def test_a_response_and_its_conversation_come_back_as_stored(tmp_path):
    store = ResponseStore(tmp_path / "r.sqlite", 10**6, 3600)
    store.put({"id": "resp_1", "output": []}, TURNS)
    reopened = ResponseStore(tmp_path / "r.sqlite", 10**6, 3600)  # as after a restart
    assert reopened.get("resp_1") == ({"id": "resp_1", "output": []}, TURNS)
    assert reopened.delete("resp_1") and reopened.get("resp_1") is None and not reopened.delete("resp_1")


def test_the_oldest_responses_go_first_past_the_size_bound(tmp_path):
    store = ResponseStore(tmp_path / "r.sqlite", 2000, 3600)
    for i in range(10):
        store.put({"id": f"resp_{i}", "pad": "x" * 300}, TURNS[:1])
    kept = [i for i in range(10) if store.get(f"resp_{i}") is not None]
    assert kept == list(range(10 - len(kept), 10)) and 2 <= len(kept) < 10


def test_responses_older_than_the_age_bound_are_gone(tmp_path, monkeypatch):
    store = ResponseStore(tmp_path / "r.sqlite", 10**6, 60)
    store.put({"id": "resp_old"}, TURNS[:1])
    later = time.time() + 120
    monkeypatch.setattr(time, "time", lambda: later)
    assert store.get("resp_old") is None
