"""Each sampling parameter has its documented effect, shown on the real SmolLM2 model."""

import threading

import pytest

from tests.conftest import SMOLLM, TINY
from tests.fixtures.device import BATCH_ORDER, ON_GPU
from tests.fixtures.server import ServerProcess

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
APPLE = [{"role": "user", "content": "Repeat the word apple 30 times."}]
STORY = [{"role": "user", "content": "Write one sentence about a cat."}]


def chat(client, messages=FRANCE, **kwargs):
    kwargs.setdefault("max_tokens", 8)
    return client.chat.completions.create(model=SMOLLM, messages=messages, **kwargs)


def first_token(client, **kwargs):
    r = chat(client, max_tokens=1, temperature=0, logprobs=True, **kwargs)
    return r.choices[0].logprobs.content[0]


def token_id(home, text: str) -> int:
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    ids = load_tokenizer(home / "models" / SMOLLM).encode(text, add_special_tokens=False)
    assert len(ids) == 1
    return ids[0]


def test_logit_bias_minus_100_bans_the_greedy_first_token(default_client, default_home):
    greedy = first_token(default_client).token
    banned = token_id(default_home, greedy)
    assert first_token(default_client, logit_bias={str(banned): -100}).token != greedy


def test_logit_bias_plus_100_forces_a_token(default_client, default_home):
    forced = token_id(default_home, " banana")
    r = chat(default_client, temperature=0, max_tokens=3, logit_bias={str(forced): 100})
    assert "banana" in r.choices[0].message.content


def test_top_k_1_is_greedy_even_at_high_temperature(default_client):
    greedy = chat(default_client, messages=STORY, temperature=0, max_tokens=12).choices[0].message.content
    top1 = chat(default_client, messages=STORY, temperature=1.5, max_tokens=12, extra_body={"top_k": 1}).choices[0].message.content
    assert top1 == greedy


def test_penalties_change_a_repetitive_answer(default_client):
    kwargs = dict(messages=APPLE, temperature=0, max_tokens=20)
    plain = chat(default_client, **kwargs).choices[0].message.content
    assert plain.lower().count("apple") >= 5
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"extra_body": {"repeat_penalty": 3.0}}):
        penalised = chat(default_client, **kwargs, **penalty).choices[0].message.content
        assert penalised != plain, penalty
        assert penalised.lower().count("apple") < plain.lower().count("apple"), penalty


def test_repetition_penalty_is_an_alias(default_client):
    kwargs = dict(messages=APPLE, temperature=0, max_tokens=12)
    a = chat(default_client, **kwargs, extra_body={"repeat_penalty": 3.0}).choices[0].message.content
    b = chat(default_client, **kwargs, extra_body={"repetition_penalty": 3.0}).choices[0].message.content
    assert a == b


def test_same_seed_same_text_alone_and_streamed(default_client):
    kwargs = dict(messages=STORY, temperature=1.0, max_tokens=12, seed=1234)
    alone = chat(default_client, **kwargs).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(default_client, stream=True, **kwargs)
                       if c.choices)
    assert streamed == alone


@pytest.mark.skipif(ON_GPU, reason=BATCH_ORDER)
def test_a_rows_log_probabilities_are_the_same_bits_alone_and_among_8_requests(default_client):
    """Prompts of different lengths (so a batch left-pads them) give every token the same
    log-probability, to the last bit, alone and eight at a time: nothing a row computes depends on the
    rows batched with it (attention's products were OpenBLAS's, which sum in an order picked by the
    shapes: apart by up to 1.6e-5 before)."""
    prompts = [[1000 + 37 * i + j for j in range(12 + 3 * i)] for i in range(8)]

    def logprobs(i: int) -> list[float]:
        reply = default_client.completions.create(model=SMOLLM, prompt=prompts[i], max_tokens=20, temperature=0,
                                                  logprobs=1)
        return reply.choices[0].logprobs.token_logprobs

    alone = [logprobs(i) for i in range(8)]
    together: dict[int, list[float]] = {}
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, logprobs(i))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [together[i] for i in range(8)] == alone


@pytest.mark.skipif(ON_GPU, reason=BATCH_ORDER)
def test_same_seed_same_text_alone_and_among_3_or_8_requests(default_client, default_home):
    """At temperature 0.8, eight seeded requests (different prompts, 40 tokens each, the end token banned
    so that every text runs its full length) give each the same text alone, three at a time and all
    eight together: a row's sums do not depend on the rows batched with it."""
    prompts = [[{"role": "user", "content": f"Tell me a story about {topic}."}]
               for topic in ("a cat", "the sea", "a robot", "winter", "a king", "bread", "a train", "the moon")]
    ban_end = {str(token_id(default_home, "<|im_end|>")): -100}

    def text(i: int) -> str:
        return chat(default_client, messages=prompts[i], temperature=0.8, max_tokens=40, seed=1000 + i,
                    logit_bias=ban_end).choices[0].message.content

    def together(indices: list[int]) -> dict[int, str]:
        results: dict[int, str] = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, text(i))) for i in indices]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    alone = {i: text(i) for i in range(8)}
    assert len(set(alone.values())) == 8
    assert together([0, 1, 2]) == {i: alone[i] for i in (0, 1, 2)}
    assert together(list(range(8))) == alone


def test_same_seed_same_text_in_another_server_process(default_client, default_home):
    kwargs = dict(messages=STORY, temperature=1.0, max_tokens=12, seed=99)
    here = chat(default_client, **kwargs)
    other = ServerProcess(default_home, [SMOLLM])
    try:
        from openai import OpenAI

        there = chat(OpenAI(base_url=other.base_url, api_key="x", max_retries=0), **kwargs)
    finally:
        other.stop()
    assert there.choices[0].message.content == here.choices[0].message.content
    assert there.system_fingerprint == here.system_fingerprint and here.system_fingerprint.startswith("fp_")


def test_different_seeds_usually_differ(default_client):
    texts = {chat(default_client, messages=STORY, temperature=1.2, max_tokens=10, seed=s).choices[0].message.content
             for s in (1, 2, 3)}
    assert len(texts) >= 2


def test_n_gives_independent_choices(default_client):
    r = chat(default_client, messages=STORY, temperature=1.2, max_tokens=6, n=3, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    assert len({c.message.content for c in r.choices}) >= 2
    assert r.usage.completion_tokens >= 3  # counts every choice


def test_n_streamed_chunks_carry_their_choice_index(default_client):
    chunks = list(chat(default_client, messages=STORY, temperature=1.0, max_tokens=4, n=2, stream=True, seed=3))
    finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]


def test_greedy_logprob_equals_top_alternative(default_client):
    r = chat(default_client, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == entry.top_logprobs[0].logprob
        # an exact tie (common in half precision on a GPU) may list the other token first
        assert entry.token == entry.top_logprobs[0].token or entry.logprob == entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert bytes(entry.bytes).decode() == entry.token


def test_completion_logprobs_shape(default_client):
    r = default_client.completions.create(model=SMOLLM, prompt="The capital of France is", max_tokens=3,
                                         temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(len(alts) == 2 for alts in lp.top_logprobs)
    assert lp.text_offset[0] == 0


def test_the_penalties_of_n_choices_count_only_their_own_output(tiny_client):
    """A presence penalty over "what this choice generated" must not see the prompt once per other choice:
    with n = 3, each choice equals the same request's n = 1 answer with its seed."""
    ask = {"model": TINY, "prompt": "the cat sat", "max_tokens": 12, "presence_penalty": 2.0, "temperature": 0.9}
    many = tiny_client.completions.create(n=3, seed=40, **ask)
    for i, choice in enumerate(many.choices):
        assert choice.text == tiny_client.completions.create(seed=40 + i, **ask).choices[0].text


def test_reported_logprobs_are_at_the_requests_temperature(tiny_client):
    """The sampler applies the temperature, and logprobs report what it drew from: at T = 0.5 the gap
    between two alternatives is twice their gap at T = 1."""
    def first_alternatives(temperature: float) -> dict[str, float]:
        reply = tiny_client.chat.completions.create(
            model=TINY, messages=STORY, max_tokens=1, temperature=temperature, seed=5, logprobs=True, top_logprobs=5)
        return {alt.token: alt.logprob for alt in reply.choices[0].logprobs.content[0].top_logprobs}

    plain, sharp = first_alternatives(1.0), first_alternatives(0.5)
    a, b = sorted(plain, key=plain.get, reverse=True)[:2]
    assert sharp[a] - sharp[b] == pytest.approx(2 * (plain[a] - plain[b]), rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("sampling", [{"repeat_penalty": 4.9e-89, "temperature": 1.0},
                                      {"temperature": 1e-40}], ids=["tiny-repeat-penalty", "tiny-temperature"])
def test_extreme_valid_sampling_values_keep_the_grammar_and_answer(tiny_client, sampling):
    """A penalty near 0 made positive logits infinite (NaN after the softmax), and a temperature near 0 made every
    logprob -inf: the draw then ignored the grammar's mask and the request ended in a 500 (schemathesis)."""
    reply = tiny_client.completions.create(model=TINY, prompt="the cat", max_tokens=8, seed=3,
                                           extra_body={"response_format": {"type": "json_object"}, **sampling})
    assert reply.choices[0].text.startswith("{")
