"""The engine's health follows its loop: a stalled loop is unhealthy even though HTTP would still answer."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from mlxserve.engine.engine import Engine
from mlxserve.engine.store import ModelStore


def test_a_stuck_engine_loop_makes_the_engine_unhealthy(tiny_home: Path):
    engine = Engine(ModelStore(tiny_home / "models"), max_memory=2**30, default_ttl=60, stall_seconds=0.3)
    engine.start()
    try:
        assert engine.health().healthy
        # Inject a stall: a call that blocks the engine thread, as a hung kernel or a stuck load would.
        stall = threading.Thread(target=engine._scheduler.call, args=(lambda: time.sleep(1.5),))
        stall.start()
        time.sleep(0.8)
        report = engine.health()
        assert not report.healthy and report.loop_stalled_seconds > 0.3
        stall.join()
        time.sleep(0.1)
        assert engine.health().healthy
    finally:
        engine.stop()
