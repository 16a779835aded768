"""Each processor against values worked out by hand on small logit vectors."""

import math

import mlx.core as mx
import pytest

from mlxserve.engine.sampling import (
    apply_logit_bias,
    apply_min_p,
    apply_presence_frequency,
    apply_repeat_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    make_logits_processor,
    make_sampler,
)
from mlxserve.protocol import SamplingParams

INF = float("inf")


def logits(*values: float) -> mx.array:
    return mx.array([list(values)], dtype=mx.float32)


def as_list(a: mx.array) -> list[float]:
    return a.reshape(-1).tolist()


def test_logit_bias_adds_to_chosen_tokens_only():
    out = apply_logit_bias(logits(1, 2, 3), mx.array([0, 2]), mx.array([-100.0, 5.0]))
    assert as_list(out) == [-99, 2, 8]


def test_repeat_penalty_divides_positive_and_multiplies_negative_once_per_token():
    out = apply_repeat_penalty(logits(2.0, -2.0, 4.0, 1.0), mx.array([0, 1, 0, 0]), 2.0)
    assert as_list(out) == [1.0, -4.0, 4.0, 1.0]


def test_presence_and_frequency_follow_openai_formula():
    # token 1 generated twice, token 3 once
    out = apply_presence_frequency(logits(0, 0, 0, 0), mx.array([1, 3, 1]), presence=0.5, frequency=0.25)
    assert as_list(out) == pytest.approx([0, -(0.5 + 0.5), 0, -(0.5 + 0.25)])


def test_top_k_zero_is_off_and_one_keeps_only_the_best():
    x = logits(1, 3, 2)
    assert as_list(apply_top_k(x, 0)) == [1, 3, 2]
    assert as_list(apply_top_k(x, 1)) == [-INF, 3, -INF]
    assert as_list(apply_top_k(x, 2)) == [-INF, 3, 2]


def test_top_p_keeps_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.2
    x = mx.log(logits(0.5, 0.3, 0.2))
    assert as_list(apply_top_p(x, 0.5))[1:] == [-INF, -INF]
    kept = as_list(apply_top_p(x, 0.7))
    assert kept[2] == -INF and math.isfinite(kept[0]) and math.isfinite(kept[1])
    assert all(math.isfinite(v) for v in as_list(apply_top_p(x, 1.0)))
    assert sum(math.isfinite(v) for v in as_list(apply_top_p(x, 1e-9))) == 1
    # A p that is 0 in float32 (5e-324, as a JSON client may send) still keeps the top token: with
    # none kept, a grammar-constrained request sampled a token the grammar forbids (a 500).
    assert [math.isfinite(v) for v in as_list(apply_top_p(x, 5e-324))] == [True, False, False]


def test_min_p_drops_tokens_below_fraction_of_top():
    x = mx.log(logits(0.6, 0.25, 0.15))
    out = as_list(apply_min_p(x, 0.3))  # threshold 0.18
    assert math.isfinite(out[0]) and math.isfinite(out[1]) and out[2] == -INF


def test_temperature_divides_logits():
    assert as_list(apply_temperature(logits(1, 2), 0.5)) == [2, 4]
    assert as_list(apply_temperature(logits(1, 2), 0.0)) == [1, 2]


def test_chain_counts_penalties_over_generated_tokens_only():
    params = SamplingParams(presence_penalty=1.0)
    process = make_logits_processor(params, prompt_length=2)
    context = mx.array([0, 1, 2])  # prompt [0, 1], generated [2]
    assert as_list(process(context, logits(5, 5, 5))) == [5, 5, 4]


def test_repeat_penalty_window_covers_prompt_and_output():
    params = SamplingParams(repeat_penalty=2.0, repeat_last_n=2)
    process = make_logits_processor(params, prompt_length=2)
    assert as_list(process(mx.array([0, 1, 2]), logits(4, 4, 4))) == [4, 2, 2]


def test_greedy_sampler_takes_argmax():
    assert make_sampler(0.0, None)(logits(0.1, 0.7, 0.2)).item() == 1


def test_same_seed_same_draws_different_seed_different_draws():
    x = mx.zeros((1, 1000))

    def draws(seed: int) -> list[int]:
        sample = make_sampler(1.0, seed)
        return [sample(x).item() for _ in range(8)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_greedy_and_unseeded_requests_share_one_sampler_so_a_batch_samples_in_one_call():
    """mlx-lm samples a whole batch at once only when every sequence has the same sampler object."""
    from mlxserve.engine.sampling import is_shared, make_sampler

    assert make_sampler(0.0, None) is make_sampler(0.0, 7)
    assert make_sampler(0.7, None) is make_sampler(0.7, None)
    assert make_sampler(0.7, None) is not make_sampler(1.3, None)
    assert is_shared(make_sampler(0.0, None)) and is_shared(make_sampler(0.7, None))
    seeded = make_sampler(0.7, 1)
    assert seeded is not make_sampler(0.7, 1) and not is_shared(seeded)


def test_a_request_that_sets_only_a_temperature_runs_no_processor_of_its_own():
    assert make_logits_processor(SamplingParams(temperature=0.7), prompt_length=2) is None


@pytest.mark.parametrize("temperature, expected", [(1.0, 0.731), (0.5, 0.881), (2.0, 0.622)])
def test_the_sampler_draws_at_its_temperature(temperature: float, expected: float):
    """Two tokens one logit apart: P(second) = sigmoid(1 / T)."""
    logits = mx.broadcast_to(mx.array([[0.0, 1.0]]), (20000, 2))
    rows = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    share = make_sampler(temperature, 3)(rows).astype(mx.float32).mean().item()
    assert abs(share - expected) < 0.015
