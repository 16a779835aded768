"""`mlxserve import` of each architecture and K-quant type gives llama.cpp's tokens on the same file.

The files are tiny random-weight models quantized by llama.cpp itself, with llama.cpp's greedy tokens
and their log-probabilities (scripts/make_gguf_fixtures.py), for prompts of token ids and of text.
Each is imported and loaded the way the server loads it, then fed llama.cpp's tokens one at a time
(after the prompt, text through our tokenizer): at every step our likeliest token is
llama.cpp's unless the two are a near tie for us, and llama.cpp's token gets the log-probability it
got there, within LOGPROB_TOLERANCE. llama.cpp rounds activations to 8 bits before each quantized
product; that is most of the difference.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize

from mlxserve.engine.gguf import convert_gguf
from mlxserve.engine.store import ModelStore

DATA = Path(__file__).parent.parent / "data" / "gguf"
REFERENCE = json.loads((DATA / "reference.json").read_text())
LOGPROB_TOLERANCE = 0.75  # nats; measured: at most 0.56 (qwen2), 0.16 for Q8_0
NEAR_TIE = 2 * LOGPROB_TOLERANCE
# Q2_K and Q3_K scale every 16 weights (MLX's groups are 32 wide), IQ4_XS maps 4 bits to uneven
# levels: at the default 4 bits their weights move by up to half a 4-bit step. At 8 bits, by 1/16 of that.
REQUANTIZED = {"llama-q2_k.gguf", "llama-q3_k.gguf", "llama-iq4_xs.gguf"}


def _imported(tmp_path: Path, file: str, bits: int | None = None):
    convert_gguf(DATA / file, tmp_path / "models" / "imported", bits=bits)
    return ModelStore(tmp_path / "models").load("imported")


def _check_against_llama_cpp(loaded, cases: list[dict]) -> None:
    """Prompts of token ids, and texts: those must also be cut into as many tokens as llama.cpp cut them
    (and into the same ones, or the tokens after them part)."""
    for case in cases:
        tokens = list(case["prompt"]) if "prompt" in case else loaded.tokenizer.encode(case["text"])
        if "text" in case:
            assert len(tokens) == case["prompt_tokens"], case["text"]
        for step, (want, want_logprob) in enumerate(zip(case["tokens"], case["logprobs"])):
            logits = loaded.model(mx.array([tokens]))[0, -1].astype(mx.float32)
            logprobs = np.array(logits - mx.logsumexp(logits))
            where = f"prompt {case.get('prompt') or case['text']!r}, step {step}"
            assert abs(logprobs[want] - want_logprob) <= LOGPROB_TOLERANCE, where
            assert int(logprobs.argmax()) == want or logprobs.max() - logprobs[want] < NEAR_TIE, where
            tokens.append(want)


@pytest.mark.parametrize("file", sorted(set(REFERENCE["files"]) - REQUANTIZED))
def test_imported_model_gives_llama_cpps_tokens(tmp_path: Path, file: str):
    _check_against_llama_cpp(_imported(tmp_path, file), REFERENCE["files"][file])


@pytest.mark.parametrize("file", sorted(REQUANTIZED))
def test_requantized_types_at_8_bits_give_llama_cpps_tokens(tmp_path: Path, file: str):
    _check_against_llama_cpp(_imported(tmp_path, file, bits=8), REFERENCE["files"][file])


@pytest.mark.parametrize("file", sorted(REQUANTIZED))
def test_requantized_types_at_4_bits_stay_within_half_a_step(tmp_path: Path, file: str):
    convert_gguf(DATA / file, tmp_path / "imported")
    config = json.loads((tmp_path / "imported" / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    weights = mx.load(str(tmp_path / "imported" / "model.safetensors"))
    source = next(t for t in GGUFReader(DATA / file).tensors if t.name == "blk.1.ffn_up.weight")
    want = dequantize(source.data, source.tensor_type).reshape(256, 256)
    module = "model.layers.1.mlp.up_proj"
    scales = weights[module + ".scales"].astype(mx.float32)
    got = np.array(mx.dequantize(weights[module + ".weight"], scales, weights[module + ".biases"].astype(mx.float32),
                                 group_size=32, bits=4))
    half_step = np.repeat(np.abs(np.array(scales)), 32, axis=1) / 2
    assert (np.abs(got - want) <= half_step * 1.01 + 1e-3).all()


def test_llama_3s_rotary_scaling_comes_back_from_its_factors(tmp_path: Path):
    """Llama 3.1 and later scale their rotation by frequency; llama.cpp's converter stores the factors
    as a tensor. The short prompts above cannot tell (the scaled frequencies hardly turn in 40
    positions); a long context would. So: the imported model rotates at exactly the file's frequencies."""
    loaded = _imported(tmp_path, "llama3-q4_k_m.gguf")
    reader = GGUFReader(DATA / "llama3-q4_k_m.gguf")
    factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
    base = float(reader.fields["llama.rope.freq_base"].contents())
    head_dim = 2 * len(factors)
    periods = base ** (np.arange(0, head_dim, 2) / head_dim)
    rope = loaded.model.model.layers[0].self_attn.rope
    np.testing.assert_allclose(np.array(rope._freqs), periods * factors, rtol=1e-5)
    assert max(factors) == 8.0 and min(factors) == 1.0  # the fixture does scale some and leave others


def test_a_rotary_scaling_that_is_not_llama_3s_is_refused(tmp_path: Path):
    from mlxserve.engine.gguf import _llama3_rope_scaling
    from mlxserve.protocol import ConversionError

    with pytest.raises(ConversionError, match="rope_freqs"):
        _llama3_rope_scaling(np.linspace(1, 4, 32), 500000.0, 64)
