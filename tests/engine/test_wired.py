"""Metal's wired-memory limit is the process's: set once from the budget, never put back by a model's generator."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator
from mlx_lm.models import llama

from mlxserve.engine import wired
from mlxserve.settings import GB, default_max_memory, physical_memory

ON_METAL = mx.metal.is_available()


def _tiny_model() -> llama.Model:
    return llama.Model(llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                                       num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-5,
                                       vocab_size=64))


@pytest.fixture
def metal_like(monkeypatch):
    """A device that reports a recommended working set (as Metal does), with every set_wired_limit recorded."""
    calls: list[int] = []
    current = [0]

    def set_wired_limit(limit: int) -> int:
        calls.append(limit)
        previous, current[0] = current[0], limit
        return previous

    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 12 * GB})
    monkeypatch.setattr(mx, "set_wired_limit", set_wired_limit)
    monkeypatch.setattr(wired, "_limit", None)
    return calls


def test_a_generator_neither_raises_the_limit_past_the_budget_nor_puts_an_old_one_back(metal_like):
    """mlx-lm's generator wires the whole recommended set when made, and puts back what it found when closed:
    with two models loaded, unloading the second put back the first one's raised limit, or 0 under both."""
    assert wired.set_process_limit(8 * GB) == 8 * GB
    first = BatchGenerator(_tiny_model())
    wired.adopt(first)
    second = BatchGenerator(_tiny_model())
    wired.adopt(second)
    assert metal_like[-1] == 8 * GB
    before = len(metal_like)
    second.close()
    first.close()
    del first, second
    assert len(metal_like) == before


def test_the_limit_never_exceeds_the_recommended_working_set(metal_like):
    assert wired.set_process_limit(64 * GB) == 12 * GB and metal_like == [12 * GB]


def test_without_a_recommended_working_set_nothing_is_wired(monkeypatch):
    monkeypatch.setattr(mx, "device_info", lambda: {"device_name": "cpu"})
    monkeypatch.setattr(mx, "set_wired_limit", lambda limit: pytest.fail("no wired limit off Metal"))
    assert wired.set_process_limit(8 * GB) is None


def test_the_default_budget_is_metals_recommended_working_set(metal_like):
    assert default_max_memory() == 12 * GB


def test_the_default_budget_elsewhere_is_three_quarters_of_memory(monkeypatch):
    monkeypatch.setattr(mx, "device_info", lambda: {"device_name": "cpu"})
    assert default_max_memory() == int(physical_memory() * 0.75)


@pytest.mark.skipif(not ON_METAL, reason="wired memory exists on Metal only")
def test_on_metal_the_limit_survives_an_unloaded_models_generator():
    recommended = mx.device_info()["max_recommended_working_set_size"]
    limit = wired.set_process_limit(recommended // 2)
    generator = BatchGenerator(_tiny_model())
    wired.adopt(generator)
    generator.close()
    assert mx.set_wired_limit(limit) == limit
    assert default_max_memory() == recommended
