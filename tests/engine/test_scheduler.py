"""When the scheduler sends a reply's tokens, counted in the batch generator's decode steps."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mlx_lm.generate import GenerationBatch

from mlxserve.engine import scheduler as scheduler_module
from tests.fixtures.engine import greedy_request, reply, started_engine


def _text_and_steps_at_each_send(home: Path, monkeypatch, max_tokens: int) -> tuple[str, list[int], list[str]]:
    """The reply, how many decode steps the generator had queued when each piece of text was sent, and how
    the choice finished."""
    steps, at_send = [0], []
    queue_step, send = GenerationBatch._step, scheduler_module._ModelRunner._send

    def counted_step(batch):
        steps[0] += 1
        return queue_step(batch)

    def noted_send(runner, choice, text, cut=False, final=False):
        if text:
            at_send.append(steps[0])
        return send(runner, choice, text, cut, final)

    monkeypatch.setattr(GenerationBatch, "_step", counted_step)
    monkeypatch.setattr(scheduler_module._ModelRunner, "_send", noted_send)
    engine = started_engine(home)
    try:
        text, reasons = asyncio.run(reply(engine, greedy_request(max_tokens)))
    finally:
        engine.stop()
    return text, at_send, reasons


def test_the_first_token_is_sent_when_computed_not_after_the_next_step_is_queued(tiny_home: Path, monkeypatch):
    """mlx-lm hands a step's tokens out only after queueing the next step (and on a CPU queueing waits for
    most of that step): the first token went out a decode step late. It goes out after the first step."""
    text, at_send, reasons = _text_and_steps_at_each_send(tiny_home, monkeypatch, max_tokens=6)
    assert at_send[0] == 1
    assert reasons == ["length"] and len(at_send) >= 2  # the rest of the reply as before, once each


def test_a_one_token_reply_is_sent_once_and_finishes(tiny_home: Path, monkeypatch):
    text, at_send, reasons = _text_and_steps_at_each_send(tiny_home, monkeypatch, max_tokens=1)
    assert text and at_send == [1] and reasons == ["length"]
