"""Chat completions through the real server and the OpenAI SDK, on the tiny random model."""

from tests.conftest import TINY

HELLO = [{"role": "user", "content": "hello"}]


def test_chat_response_has_openai_shape(tiny_client):
    r = tiny_client.chat.completions.create(model=TINY, messages=HELLO, max_tokens=5, temperature=0)
    assert r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion" and r.model == TINY and r.created > 0
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.refusal is None
    assert choice.logprobs is None
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_max_tokens_limits_output(tiny_client):
    r = tiny_client.chat.completions.create(model=TINY, messages=HELLO, max_tokens=3, temperature=0,
                                            logit_bias={"2": -100})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


def test_max_completion_tokens_wins_over_max_tokens(tiny_client):
    r = tiny_client.chat.completions.create(model=TINY, messages=HELLO, max_tokens=9, max_completion_tokens=2,
                                            temperature=0, logit_bias={"2": -100})
    assert r.usage.completion_tokens == 2


def test_prompt_tokens_count_the_templated_prompt(tiny_client):
    one = tiny_client.chat.completions.create(model=TINY, messages=HELLO, max_tokens=1)
    two = tiny_client.chat.completions.create(
        model=TINY, messages=[{"role": "system", "content": "be brief"}] + HELLO, max_tokens=1)
    # "<|im_start|>system\nbe brief<|im_end|>\n": 2 specials + newlines + the text's tokens
    assert two.usage.prompt_tokens > one.usage.prompt_tokens + 4


def test_content_as_list_of_text_parts_equals_string(tiny_client):
    as_string = tiny_client.chat.completions.create(
        model=TINY, messages=[{"role": "user", "content": "hello world"}], max_tokens=8, temperature=0)
    as_parts = tiny_client.chat.completions.create(
        model=TINY, messages=[{"role": "user", "content": [{"type": "text", "text": "hello "},
                                                           {"type": "text", "text": "world"}]}],
        max_tokens=8, temperature=0)
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content
    assert as_parts.usage.prompt_tokens == as_string.usage.prompt_tokens


def test_streamed_text_equals_non_streamed_text(tiny_client):
    kwargs = dict(model=TINY, messages=HELLO, max_tokens=40, temperature=0)
    whole = tiny_client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(tiny_client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_include_usage_adds_a_final_usage_chunk(tiny_client):
    chunks = list(tiny_client.chat.completions.create(
        model=TINY, messages=HELLO, max_tokens=4, stream=True, stream_options={"include_usage": True},
        logit_bias={"2": -100}))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_string_across_tokens_is_cut_and_never_streamed(tiny_client):
    kwargs = dict(model=TINY, messages=HELLO, max_tokens=30, temperature=0, logit_bias={"2": -100})
    text = tiny_client.chat.completions.create(**kwargs).choices[0].message.content
    clean = text.replace("\ufffd", "")
    stop = clean[len(clean) // 2: len(clean) // 2 + 3]
    assert len(stop.encode()) >= 2  # byte-level tokens: a 2+ byte stop spans 2+ tokens
    expected = text[: text.find(stop)]

    r = tiny_client.chat.completions.create(stop=[stop], **kwargs)
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "stop"

    pieces = [c.choices[0].delta.content or "" for c in tiny_client.chat.completions.create(
        stop=stop, stream=True, **kwargs) if c.choices]
    assert "".join(pieces) == expected
