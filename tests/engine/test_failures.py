"""One request's failure stays its own; a dead engine thread fails requests at once; unloading frees memory."""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path

import mlx.core as mx
import pytest

from mlxserve.engine import scheduler as scheduler_module
from mlxserve.engine.engine import Engine
from mlxserve.protocol import EngineUnavailableError, GenerationRequest, SamplingParams
from tests.conftest import TINY
from tests.fixtures.engine import NO_END, greedy_request, reply, started_engine
from tests.fixtures.faulty_server import MARKER, breaking

def test_a_failing_sequence_fails_alone_and_its_batch_goes_on(tiny_home: Path, monkeypatch):
    monkeypatch.setattr(scheduler_module, "make_logits_processor", breaking(scheduler_module.make_logits_processor))
    engine = started_engine(tiny_home)
    try:
        async def scenario():
            alone = await reply(engine, greedy_request())
            together = await asyncio.gather(reply(engine, greedy_request()),
                                            reply(engine, greedy_request(presence_penalty=MARKER)),
                                            return_exceptions=True)
            return alone, together

        alone, (healthy, failed) = asyncio.run(scenario())
        assert healthy == alone and healthy[1] == ["length"] and len(healthy[0]) > 20
        assert isinstance(failed, RuntimeError) and "injected failure" in str(failed)
        assert engine.health().healthy
    finally:
        engine.stop()


def test_a_dead_engine_thread_fails_waiting_and_new_requests_at_once(tiny_home: Path, monkeypatch):
    engine = started_engine(tiny_home)
    try:
        async def scenario():
            stream = await engine.generate(greedy_request(max_tokens=200))
            monkeypatch.setattr(engine.manager, "expire", lambda busy: 1 / 0)  # a bug outside the guards
            started = time.monotonic()
            with pytest.raises(EngineUnavailableError):
                async for _ in stream:
                    pass
            with pytest.raises(EngineUnavailableError):
                await engine.generate(greedy_request())
            return time.monotonic() - started

        assert asyncio.run(scenario()) < 5
        report = engine.health()
        assert not report.healthy and "ZeroDivisionError" in report.error
        with pytest.raises(EngineUnavailableError):
            engine._scheduler.call(lambda: None)
    finally:
        engine.stop()


def test_a_call_the_engine_does_not_answer_times_out(tiny_home: Path):
    engine = started_engine(tiny_home)
    try:
        engine._scheduler.call(lambda: time.sleep(0), timeout=5)
        with pytest.raises(EngineUnavailableError):
            engine._scheduler.call(lambda: time.sleep(1.5), timeout=0.2)
    finally:
        engine.stop()


def test_a_model_load_is_not_a_stall(tiny_home: Path, monkeypatch):
    engine = started_engine(tiny_home, stall_seconds=0.3)
    real_load = engine.store.load
    seen = []

    def slow_load(model_id):
        time.sleep(1.0)
        seen.append(engine.health())
        return real_load(model_id)

    monkeypatch.setattr(engine.store, "load", slow_load)
    try:
        asyncio.run(engine.load(TINY))
        assert seen[0].healthy and seen[0].loading == TINY
        assert engine.health().loading is None
    finally:
        engine.stop()


def _active_memory(engine: Engine) -> int:
    return engine._scheduler.call(lambda: (gc.collect(), mx.get_active_memory())[1])


def test_unload_after_serving_returns_the_memory(tiny_home: Path):
    engine = started_engine(tiny_home, prompt_cache_bytes=1 << 20)
    try:
        empty = _active_memory(engine)
        asyncio.run(engine.load(TINY))
        loaded = _active_memory(engine)
        assert loaded > empty + 100_000
        asyncio.run(reply(engine, greedy_request(max_tokens=5)))
        assert asyncio.run(engine.unload(TINY))
        assert _active_memory(engine) - empty < 10_000
    finally:
        engine.stop()


def test_the_prompt_cache_holds_no_more_than_its_budget(tiny_home: Path):
    budget = 256 * 1024
    engine = started_engine(tiny_home, prompt_cache_bytes=budget, max_concurrent=32)
    try:
        asyncio.run(engine.load(TINY))
        baseline = _active_memory(engine)

        async def round_of_chats(r: int):
            await asyncio.gather(*(reply(engine, GenerationRequest(
                model=TINY, prompt=f"question {i} of round {r}: tell me something", max_tokens=20,
                sampling=SamplingParams(temperature=0.0, logit_bias=NO_END))) for i in range(32)))

        for r in range(3):
            asyncio.run(round_of_chats(r))
            held = _active_memory(engine) - baseline
            assert held <= budget + 64 * 1024, f"round {r}: {held} bytes held for a {budget}-byte prompt cache"
    finally:
        engine.stop()


def test_a_loaded_model_deleted_from_disk_can_still_be_unloaded(tiny_home: Path, tmp_path: Path):
    import shutil

    shutil.copytree(tiny_home / "models" / TINY, tmp_path / "models" / "doomed")
    engine = started_engine(tmp_path)
    try:
        asyncio.run(engine.load("doomed"))
        shutil.rmtree(tmp_path / "models" / "doomed")
        assert asyncio.run(engine.unload("doomed"))
        assert not engine.is_loaded("doomed")
    finally:
        engine.stop()


def test_the_budget_counts_a_quantized_model_at_its_quantized_size_on_the_cpu():
    """On the CPU a 4-bit layer is held as its quantized bytes with float32 scales and biases, norms in
    float32, and no dense float32 copy (which was 8x its size on disk)."""
    from mlxserve.engine.cpu import resident_bytes

    rows, cols, group = 64, 128, 64
    tensors = {"layers.0.proj.weight": ("U32", [rows, cols * 4 // 32]),
               "layers.0.proj.scales": ("F16", [rows, cols // group]),
               "layers.0.proj.biases": ("F16", [rows, cols // group]),
               "norm.weight": ("BF16", [cols])}
    on_disk = rows * cols // 2 + 2 * (rows * cols // group) * 2 + cols * 2
    held = resident_bytes(tensors)
    assert held == rows * cols // 2 + 2 * (rows * cols // group) * 4 + cols * 4 and held < 2 * on_disk
