"""Logit processors and samplers: pure functions over MLX arrays.

The chain, in the order it runs (llama.cpp's order; `make_logits_processor`
is the one place that sets it, and the README documents it):

1. `logit_bias`       add the request's bias to raw logits
2. `repeat_penalty`   llama.cpp's multiplicative penalty over the last N tokens
                      of prompt plus output
3. `presence/frequency_penalty`  OpenAI's additive penalties over the output
4. `top_k`            keep the k largest logits
5. `top_p`            keep the smallest set whose probability reaches p
6. `min_p`            drop tokens below min_p times the top probability
7. `temperature`      divide by T (T = 0 is greedy, which skips this step)

The first six are the request's logits processor, which exists only when one of them
would change something. The temperature lives in the sampler (`make_sampler`), which
draws from softmax(logits / T) with the request's own random key, or takes the argmax
at temperature 0: so a request that sets nothing but a temperature runs no processor of
its own, and shares its sampler with every other unseeded request at that temperature.
Logprobs report log_softmax(logits / T) (`at_temperature`), exactly the distribution
sampled from.

Every function takes and returns logits of shape (1, vocab).
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable

import mlx.core as mx

from mlxserve.protocol import SamplingParams

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]
Sampler = Callable[[mx.array], mx.array]

_NEG_INF = float("-inf")


def apply_logit_bias(logits: mx.array, token_ids: mx.array, bias: mx.array) -> mx.array:
    return logits.at[:, token_ids].add(bias.astype(logits.dtype))


def apply_repeat_penalty(logits: mx.array, window: mx.array, penalty: float) -> mx.array:
    """Divide positive logits of recent tokens by `penalty`, multiply negative ones.

    A token that occurs several times in the window is penalised once, as in llama.cpp.
    """
    if window.size == 0:
        return logits
    recent = mx.zeros((logits.shape[-1],), dtype=mx.bool_).at[window].maximum(True)[None, :]
    # A penalty near 0 must not round to 0 in the logits' dtype (a masked -inf times 0 is NaN), and what it
    # divides must stay finite (an infinite logit makes the softmax NaN): both would draw past the grammar.
    # Below 1e-4 (a normal number even in float16) a penalty changes nothing more a user could see.
    penalty = max(penalty, 1e-4)
    penalised = mx.where(logits > 0, logits / penalty, logits * penalty)
    penalised = mx.minimum(penalised, mx.finfo(logits.dtype).max)
    return mx.where(recent, penalised, logits)


def apply_presence_frequency(
    logits: mx.array, generated: mx.array, presence: float, frequency: float
) -> mx.array:
    """OpenAI's `logit[t] -= presence * (count[t] > 0) + frequency * count[t]`."""
    if generated.size == 0:
        return logits
    counts = mx.zeros((logits.shape[-1],), dtype=logits.dtype).at[generated].add(1)
    penalty = presence * (counts > 0).astype(logits.dtype) + frequency * counts
    return logits - penalty[None, :]


def apply_top_k(logits: mx.array, k: int) -> mx.array:
    """Keep the k largest logits; k <= 0 or k >= vocab keeps everything."""
    vocab = logits.shape[-1]
    if k <= 0 or k >= vocab:
        return logits
    kth_largest = mx.sort(logits, axis=-1)[:, vocab - k : vocab - k + 1]
    return mx.where(logits >= kth_largest, logits, _NEG_INF)


def apply_top_p(logits: mx.array, p: float) -> mx.array:
    """Keep the most likely tokens until their probability reaches p (always at least one)."""
    if p >= 1.0:
        return logits
    probs = mx.softmax(logits, axis=-1)
    order = mx.argsort(-logits, axis=-1)
    sorted_probs = mx.take_along_axis(probs, order, axis=-1)
    mass_before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
    # The top token always (a p below float32's smallest, as 5e-324, compares as 0 and kept none).
    keep_sorted = (mass_before < p) | (mx.arange(sorted_probs.shape[-1]) == 0)
    keep = mx.zeros_like(keep_sorted)
    keep = mx.put_along_axis(keep, order, keep_sorted, axis=-1)
    return mx.where(keep, logits, _NEG_INF)


def apply_min_p(logits: mx.array, min_p: float) -> mx.array:
    """Drop tokens whose probability is below min_p times the top token's."""
    if min_p <= 0.0:
        return logits
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    threshold = mx.max(logprobs, axis=-1, keepdims=True) + mx.log(mx.array(min_p, logits.dtype))
    return mx.where(logprobs >= threshold, logits, _NEG_INF)


def apply_temperature(logits: mx.array, temperature: float) -> mx.array:
    if temperature in (0.0, 1.0):
        return logits
    return logits / temperature


def at_temperature(logprobs: mx.array, temperature: float) -> mx.array:
    """The log-softmax of `logprobs / temperature`: what a sampler at that temperature draws from."""
    if temperature in (0.0, 1.0):
        return logprobs
    scaled = logprobs / temperature
    return scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)


def make_logits_processor(params: SamplingParams, prompt_length: int) -> LogitsProcessor | None:
    """The whole chain for one request, as one (context, logits) -> logits function.

    `context` holds the prompt followed by the tokens generated so far, as
    mlx-lm's batch generator passes it; `prompt_length` separates the two.
    None when every step would leave the logits as they are: the batch generator then
    skips the per-sequence processing (worth 10% of decode speed on a CPU).
    """
    if not (params.logit_bias or (params.repeat_penalty != 1.0 and params.repeat_last_n != 0)
            or params.presence_penalty or params.frequency_penalty or params.top_k > 0
            or params.top_p < 1.0 or params.min_p > 0.0):
        return None
    bias_ids = mx.array(list(params.logit_bias.keys()), dtype=mx.int32)
    bias_values = mx.array(list(params.logit_bias.values()), dtype=mx.float32)

    def process(context: mx.array, logits: mx.array) -> mx.array:
        if params.logit_bias:
            logits = apply_logit_bias(logits, bias_ids, bias_values)
        if params.repeat_penalty != 1.0 and params.repeat_last_n != 0:
            n = context.size if params.repeat_last_n < 0 else min(params.repeat_last_n, context.size)
            logits = apply_repeat_penalty(logits, context[-n:], params.repeat_penalty)
        if params.presence_penalty or params.frequency_penalty:
            logits = apply_presence_frequency(
                logits, context[prompt_length:], params.presence_penalty, params.frequency_penalty
            )
        logits = apply_top_k(logits, params.top_k)
        logits = apply_top_p(logits, params.top_p)
        return apply_min_p(logits, params.min_p)

    return process


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def draw(logprobs: mx.array, temperature: float, key: mx.array) -> mx.array:
    """A token per row from softmax(logprobs / temperature), drawn with `key` (on the CPU path, C's:
    `cpu_fused.install_draw`)."""
    # From the top logprob down (the top at exactly 0), so a tiny temperature still leaves one token finite.
    top = mx.max(logprobs, axis=-1, keepdims=True)
    return mx.random.categorical(apply_temperature(logprobs - top, temperature), key=key)


def _categorical(key: mx.array, temperature: float) -> Sampler:
    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, step_key = mx.random.split(key)
        return draw(logprobs, temperature, step_key)

    return sample


@functools.lru_cache(maxsize=64)  # bounded: a client may send any number of distinct temperatures
def _unseeded(temperature: float) -> Sampler:
    """One sampler for every request at this temperature without a seed: its draws need no identity."""
    sample = _categorical(mx.random.key(secrets.randbits(63)), temperature)
    sample.shared = True
    return sample


def make_sampler(temperature: float, seed: int | None) -> Sampler:
    """Argmax at temperature 0; otherwise a categorical draw at `temperature`.

    Greedy requests share one sampler object, and unseeded ones one per temperature: mlx-lm's batch
    generator samples the sequences that share a sampler in one call instead of one per sequence. A
    seeded request has its own key, split once per step, so the same seed gives the same tokens no
    matter what else runs in the batch.
    """
    if temperature == 0.0:
        return greedy
    if seed is None:
        return _unseeded(float(temperature))
    # Any 64-bit seed, negative ones too (and `seed + i` past the top), maps to one key of its own.
    return _categorical(mx.random.key(seed % 2**64), temperature)


def is_shared(sampler: Sampler) -> bool:
    """A sampler many sequences use at once: it cannot fail for one of them alone."""
    return sampler is greedy or getattr(sampler, "shared", False)
