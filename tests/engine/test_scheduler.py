"""When the scheduler sends a reply's tokens, counted in the batch generator's decode steps."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mlx_lm.generate import GenerationBatch

from mlxserve.engine import scheduler as scheduler_module
from mlxserve.engine.engine import Engine
from mlxserve.engine.store import ModelStore
from mlxserve.protocol import ChoiceFinished, GenerationRequest, SamplingParams, TextDelta
from tests.conftest import TINY

NO_END = {0: -100.0, 1: -100.0, 2: -100.0}  # the tiny model's special tokens: generate to max_tokens


def _text_and_steps_at_each_send(home: Path, monkeypatch, max_tokens: int, **sampling) -> tuple[str, list[int], list]:
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
    engine = Engine(ModelStore(home / "models"), max_memory=2**30, default_ttl=600)
    engine.start()
    try:
        async def run():
            stream = await engine.generate(GenerationRequest(
                model=TINY, prompt="tell me a story", max_tokens=max_tokens,
                sampling=SamplingParams(temperature=0.0, logit_bias=NO_END, **sampling)))
            text, reasons = [], []
            async for event in stream:
                if isinstance(event, TextDelta):
                    text.append(event.text)
                elif isinstance(event, ChoiceFinished):
                    reasons.append(event.reason)
            return "".join(text), reasons

        text, reasons = asyncio.run(run())
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
