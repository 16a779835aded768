"""The MLX encoder against sentence-transformers' own vectors, and the pooling functions by hand."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlxserve.engine.kinds.embed import POOLINGS, load_embedding_model
from tests.conftest import MINILM

REFERENCE = json.loads((Path(__file__).resolve().parents[2] / "data" / "minilm_reference.json").read_text())


@pytest.fixture(scope="module")
def minilm(default_home):
    return load_embedding_model(MINILM, default_home / "models" / MINILM)


def test_vectors_match_sentence_transformers(minilm):
    ours = minilm.embed(minilm.tokenize(REFERENCE["sentences"]))
    ref = np.array(REFERENCE["vectors"], dtype=np.float32)
    cosines = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    assert cosines.min() >= 0.9999, cosines


def test_padding_in_a_batch_does_not_change_vectors(minilm):
    tokens = minilm.tokenize(REFERENCE["sentences"])
    together = minilm.embed(tokens)
    alone = np.stack([minilm.embed([t])[0] for t in tokens])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_model_config_is_read_from_sentence_transformers_files(minilm):
    assert minilm.normalize and minilm.max_tokens == 256 and minilm.dimensions == 384
    assert minilm.pooling is POOLINGS["pooling_mode_mean_tokens"]


def test_pooling_functions_by_hand():
    hidden = mx.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = mx.array([[1, 1, 0]])  # last position is padding
    assert POOLINGS["pooling_mode_mean_tokens"](hidden, mask).tolist() == [[2.0, 3.0]]
    assert POOLINGS["pooling_mode_cls_token"](hidden, mask).tolist() == [[1.0, 2.0]]
    assert POOLINGS["pooling_mode_lasttoken"](hidden, mask).tolist() == [[3.0, 4.0]]
    assert POOLINGS["pooling_mode_max_tokens"](hidden, mask).tolist() == [[3.0, 4.0]]
