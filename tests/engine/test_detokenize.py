from pathlib import Path

import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from mlxserve.engine.detokenize import IncrementalDetokenizer
from tests.conftest import TINY


@pytest.fixture(scope="module")
def tokenizer(tiny_home: Path):
    return load_tokenizer(tiny_home / "models" / TINY)


def stream(tokenizer, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    return [detok.add(t) for t in ids] + [detok.flush()]


def test_multibyte_character_is_never_split(tokenizer):
    text = "añb€c"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # the byte-level vocabulary spells ñ and € in several tokens
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)
    for piece in pieces:
        piece.encode("utf-8")  # no lone surrogates or halves


def test_streamed_text_equals_whole_decode(tokenizer):
    text = "the rain in Spain, 12 × 3 = 36 — ok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids)


def test_incomplete_character_at_the_end_becomes_replacement(tokenizer):
    ids = tokenizer.encode("€", add_special_tokens=False)[:-1]
    pieces = stream(tokenizer, ids)
    assert pieces[:-1] == [""] * len(ids)
    assert pieces[-1] == "\ufffd"
