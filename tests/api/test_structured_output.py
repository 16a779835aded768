"""`response_format`: enforced while decoding, so even a random-weight model's answer parses and validates."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import TINY

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


def _ask(client, seed: int, **kwargs):
    return client.chat.completions.create(
        model=TINY, messages=[{"role": "user", "content": "Describe a person."}], temperature=1.0, seed=seed,
        max_tokens=200, **kwargs)


def test_json_schema_output_validates_at_any_seed(tiny_client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda s: _ask(tiny_client, s, response_format=fmt), range(8)))
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)


# The tiny model's byte tokens for '"' and '}': favouring them lets a random model close its strings
# and objects (left alone it writes one string until it runs out of tokens).
CLOSERS = {"37": 6.0, "128": 6.0}


def test_json_object_output_is_one_json_object(tiny_client):
    """Every answer the model ends itself is a JSON object (`length` is the one exception to "always parses")."""
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda s: _ask(tiny_client, s, response_format={"type": "json_object"},
                                               logit_bias=CLOSERS), range(6)))
    ended = [r.choices[0].message.content for r in replies if r.choices[0].finish_reason == "stop"]
    assert ended
    assert all(isinstance(json.loads(text), dict) for text in ended)


def test_text_format_is_free_text(tiny_client):
    free = _ask(tiny_client, 2, max_completion_tokens=20)
    text = _ask(tiny_client, 2, max_completion_tokens=20, response_format={"type": "text"})
    assert text.choices[0].message.content == free.choices[0].message.content


class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=150)


def test_the_sdks_parse_helper_gets_its_pydantic_model(tiny_client):
    reply = tiny_client.chat.completions.parse(
        model=TINY, messages=[{"role": "user", "content": "Who?"}], response_format=Person, seed=3, max_tokens=300)
    assert isinstance(reply.choices[0].message.parsed, Person)


def test_streamed_constrained_output_parses(tiny_client):
    stream = tiny_client.chat.completions.create(
        model=TINY, messages=[{"role": "user", "content": "Who?"}], seed=4, max_tokens=200, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_completions_take_response_format_too(tiny_client):
    reply = tiny_client.completions.create(
        model=TINY, prompt="Data:", max_tokens=200, seed=5, temperature=1.0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}})
    jsonschema.validate(json.loads(reply.choices[0].text), PERSON)


def test_constrained_and_free_requests_share_a_batch(tiny_client):
    """Per-row masks: a free request batched with constrained ones is not constrained by them."""
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    alone = _ask(tiny_client, 9, max_completion_tokens=24).choices[0].message.content
    with ThreadPoolExecutor(4) as pool:
        constrained = [pool.submit(_ask, tiny_client, s, response_format=fmt) for s in range(3)]
        free = pool.submit(_ask, tiny_client, 9, max_completion_tokens=24)
        assert free.result().choices[0].message.content == alone
        for f in constrained:
            jsonschema.validate(json.loads(f.result().choices[0].message.content), PERSON)


@pytest.mark.parametrize("schema, keyword", [({"not": {"type": "string"}}, "not"),
                                             ({"type": "array", "uniqueItems": True}, "uniqueItems")])
def test_a_schema_keyword_that_cannot_be_enforced_is_a_400_naming_it(tiny_client, schema, keyword):
    with pytest.raises(openai.BadRequestError) as err:
        _ask(tiny_client, 0, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert err.value.body["param"] == "response_format"
    assert keyword in err.value.body["message"]


@pytest.mark.parametrize("fmt", [{"type": "yaml"}, {"type": "json_schema"},
                                 {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}},
                                 {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}])
def test_a_malformed_response_format_is_a_400(tiny_client, fmt):
    with pytest.raises(openai.BadRequestError) as err:
        _ask(tiny_client, 0, response_format=fmt)
    assert err.value.body["param"] == "response_format"


def test_every_choice_of_n_is_constrained(tiny_client):
    """Each choice has its own token history (a shared one grew once per choice, and the grammar then read
    the prompt as if it had been generated: a 500 found by schemathesis)."""
    reply = tiny_client.completions.create(
        model=TINY, prompt="LPT1", n=4, seed=2005, max_tokens=200, presence_penalty=-0.7,
        extra_body={"repeat_penalty": 8.8, "response_format": {"type": "json_schema",
                                                               "json_schema": {"name": "p", "schema": PERSON}}})
    assert len(reply.choices) == 4
    for choice in reply.choices:
        jsonschema.validate(json.loads(choice.text), PERSON)

