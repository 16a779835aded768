"""Rank 0's sampler wrappers, without a group: what they cost over many requests."""

from __future__ import annotations

import gc

import mlx.core as mx

from mlxserve.engine.distributed import Leader, Ring
from mlxserve.engine.sampling import make_sampler


def test_wrappers_of_shared_samplers_go_with_the_sequences_that_used_them(tmp_path) -> None:
    leader = Leader(Ring(mx.distributed.init()), store=None, pipeline=False, max_sequences=8, prompt_cache=True)
    greedy_a, key_a = leader.sampler(make_sampler(0.0, None), shared=True)
    greedy_b, key_b = leader.sampler(make_sampler(0.0, None), shared=True)
    assert greedy_a is greedy_b and key_a == key_b  # one object while a batch holds it: one batched call
    for i in range(1000):  # a client sending a new temperature each time
        leader.sampler(make_sampler(0.5 + i / 10_000, None), shared=True)
    gc.collect()
    assert len(leader._samplers) <= 2
