"""Raw text completions: no chat template."""

from pathlib import Path

import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from tests.conftest import TINY


@pytest.fixture(scope="module")
def tokenizer(tiny_home: Path):
    return load_tokenizer(tiny_home / "models" / TINY)


def test_completion_continues_raw_prompt(tiny_client, tokenizer):
    r = tiny_client.completions.create(model=TINY, prompt="the cat", max_tokens=6, temperature=0,
                                       logit_bias={"2": -100})
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.choices[0].finish_reason == "length"
    # no template: the prompt is exactly its own tokens
    assert r.usage.prompt_tokens == len(tokenizer.encode("the cat"))
    assert r.usage.completion_tokens == 6


def test_completion_stream_matches_whole(tiny_client):
    kwargs = dict(model=TINY, prompt="hello", max_tokens=20, temperature=0)
    whole = tiny_client.completions.create(**kwargs).choices[0].text
    chunks = list(tiny_client.completions.create(stream=True, **kwargs))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole


def test_token_id_prompt_equals_text_prompt(tiny_client, tokenizer):
    kwargs = dict(model=TINY, max_tokens=8, temperature=0)
    as_text = tiny_client.completions.create(prompt="hello there", **kwargs)
    as_ids = tiny_client.completions.create(prompt=tokenizer.encode("hello there"), **kwargs)
    assert as_ids.choices[0].text == as_text.choices[0].text
    assert as_ids.usage.prompt_tokens == as_text.usage.prompt_tokens
