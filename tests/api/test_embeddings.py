"""/v1/embeddings through the real server with the OpenAI SDK, on all-MiniLM-L6-v2."""

import base64
import http.client
import json
import threading
from urllib.parse import urlsplit

import numpy as np
import openai
import pytest
from tokenizers import Tokenizer

from tests.conftest import MINILM, SMOLLM
from tests.fixtures.http import request

SENTENCES = ["The cat sat on the mat.", "Hello world", "A man is playing a guitar."]


def vectors(response) -> np.ndarray:
    return np.array([d.embedding for d in response.data], dtype=np.float32)


@pytest.fixture(scope="module")
def tokenizer(default_home):
    tokenizer = Tokenizer.from_file(str(default_home / "models" / MINILM / "tokenizer.json"))
    tokenizer.no_padding()  # the file pads to 128 for training; clients send unpadded ids
    tokenizer.no_truncation()
    return tokenizer


def test_single_string(default_client):
    r = default_client.embeddings.create(model=MINILM, input="Hello world")
    assert r.object == "list" and r.model == MINILM
    assert len(r.data) == 1 and r.data[0].object == "embedding" and r.data[0].index == 0
    v = np.array(r.data[0].embedding)
    assert v.shape == (384,) and abs(np.linalg.norm(v) - 1) < 1e-5
    assert r.usage.prompt_tokens == 4 and r.usage.total_tokens == 4  # [CLS] hello world [SEP]


def test_list_keeps_input_order(default_client):
    together = vectors(default_client.embeddings.create(model=MINILM, input=SENTENCES))
    for i, sentence in enumerate(SENTENCES):
        alone = vectors(default_client.embeddings.create(model=MINILM, input=sentence))[0]
        np.testing.assert_allclose(together[i], alone, atol=1e-5)


def test_token_id_inputs_equal_string_inputs(default_client, tokenizer):
    ids = [tokenizer.encode(s, add_special_tokens=False).ids for s in SENTENCES]
    as_text = vectors(default_client.embeddings.create(model=MINILM, input=SENTENCES))
    as_ids = vectors(default_client.embeddings.create(model=MINILM, input=ids))
    one = vectors(default_client.embeddings.create(model=MINILM, input=ids[0]))
    np.testing.assert_allclose(as_ids, as_text, atol=1e-5)
    np.testing.assert_allclose(one[0], as_text[0], atol=1e-5)


def test_base64_is_little_endian_float32_of_the_same_vector(default_server):
    body = {"model": MINILM, "input": "Hello world"}
    floats = request(default_server.base_url + "/embeddings", "POST", body).json()["data"][0]["embedding"]
    encoded = request(default_server.base_url + "/embeddings", "POST",
                      {**body, "encoding_format": "base64"}).json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    np.testing.assert_array_equal(decoded, np.array(floats, dtype=np.float32))


def test_sdk_default_base64_round_trip(default_client):
    # The Python SDK asks for base64 by default when numpy is present and decodes it itself.
    r = default_client.embeddings.create(model=MINILM, input="Hello world", encoding_format="base64")
    assert isinstance(r.data[0].embedding, str)


def test_dimensions_truncates_and_renormalizes(default_client):
    full = vectors(default_client.embeddings.create(model=MINILM, input="Hello world"))[0]
    short = vectors(default_client.embeddings.create(model=MINILM, input="Hello world", dimensions=128))[0]
    assert short.shape == (128,)
    np.testing.assert_allclose(short, full[:128] / np.linalg.norm(full[:128]), atol=1e-5)


def test_256_strings_in_one_request(default_client):
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'dogs'} and a few more words" for i in range(256)]
    r = default_client.embeddings.create(model=MINILM, input=texts)
    assert [d.index for d in r.data] == list(range(256))
    some = vectors(default_client.embeddings.create(model=MINILM, input=[texts[7], texts[200]]))
    np.testing.assert_allclose(vectors(r)[[7, 200]], some, atol=1e-5)


BAD = [
    ("empty string", ""), ("empty list", []), ("list with empty string", ["a", ""]),
    ("too many", ["a"] * 2049), ("number", 5), ("mixed list", ["a", 3]), ("object", {"text": "a"}),
    ("nested empty", [[]]), ("negative id", [-1, 5]),
    # MiniLM's vocabulary has 30522 ids: one past it read memory past the embedding table, a huge one crashed.
    ("id just past the vocabulary", [[30522]]), ("huge id", [[1000000]]), ("huge id alone", [7, 1000000]),
]


@pytest.mark.parametrize("name,value", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_input(default_server, name, value):
    reply = request(default_server.base_url + "/embeddings", "POST", {"model": MINILM, "input": value})
    assert reply.status == 400, reply.body
    assert reply.json()["error"]["param"] == "input"


def test_too_long_input_states_both_lengths(default_server):
    reply = request(default_server.base_url + "/embeddings", "POST",
                    {"model": MINILM, "input": ["ok", "word " * 300]})
    assert reply.status == 400
    message = reply.json()["error"]["message"]
    assert "256" in message and "302" in message  # 300 words + [CLS] + [SEP]


def test_dimensions_larger_than_model_is_rejected(default_server):
    reply = request(default_server.base_url + "/embeddings", "POST",
                    {"model": MINILM, "input": "a", "dimensions": 385})
    assert reply.status == 400 and reply.json()["error"]["param"] == "dimensions"
    assert "384" in reply.json()["error"]["message"]


def test_chat_model_on_embeddings_says_what_it_is(default_client):
    with pytest.raises(openai.BadRequestError) as err:
        default_client.embeddings.create(model=SMOLLM, input="hi")
    assert "chat" in err.value.body["message"] and err.value.body["param"] == "model"


def test_embedding_model_on_chat_says_what_it_is(default_client):
    for call in (lambda: default_client.chat.completions.create(model=MINILM, messages=[{"role": "user", "content": "hi"}]),
                 lambda: default_client.completions.create(model=MINILM, prompt="hi")):
        with pytest.raises(openai.BadRequestError) as err:
            call()
        assert "embedding model" in err.value.body["message"]


def test_models_list_capabilities(default_server):
    models = {m["id"]: m for m in request(default_server.base_url + "/models").json()["data"]}
    assert models[MINILM]["capabilities"] == ["embeddings"]
    assert models[SMOLLM]["capabilities"] == ["chat", "completions"]


def test_big_embedding_request_does_not_freeze_a_chat_stream(default_client, default_server):
    """The engine runs one embedding batch, then a decode step: the stream finishes first."""
    order: list[str] = []
    stream = default_client.chat.completions.create(
        model=SMOLLM, messages=[{"role": "user", "content": "Count from one to twenty."}],
        max_tokens=12, temperature=0, stream=True, extra_body={"logit_bias": {"2": -100}})
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"

    def embed() -> None:
        body = {"model": MINILM, "input": [f"text {i} " * 5 for i in range(1024)]}  # 32 batches
        request(default_server.base_url + "/embeddings", "POST", json.dumps(body).encode(),
                {"Content-Type": "application/json"})
        order.append("embeddings")

    worker = threading.Thread(target=embed)
    worker.start()
    chunks = list(stream)
    order.append("chat")
    worker.join()
    assert chunks[-1].choices[0].finish_reason == "length"
    assert order == ["chat", "embeddings"]


def test_the_listed_context_is_what_the_model_accepts(default_home):
    from mlxserve.engine.store import ModelStore

    assert ModelStore(default_home / "models").get(MINILM).context_length == 256


def test_log_stream_shows_embedding_requests(default_server):
    parts = urlsplit(default_server.base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("GET", "/api/v0/logs/stream?model=" + MINILM)
        events = conn.getresponse()
        assert json.loads(events.readline().decode().removeprefix("data: "))["type"] == "hello"
        request(default_server.base_url + "/embeddings", "POST", {"model": MINILM, "input": ["first", "second"]})
        seen = []
        while len(seen) < 2:
            line = events.readline().decode()
            if line.startswith("data: "):
                seen.append(json.loads(line.removeprefix("data: ")))
        assert seen[0]["type"] == "request" and seen[0]["endpoint"] == "embeddings"
        assert seen[0]["prompt"] == "first\nsecond" and seen[0]["prompt_tokens"] == 6 and seen[0]["n"] == 2
        assert seen[1]["type"] == "done" and seen[1]["id"] == seen[0]["id"]
    finally:
        conn.close()
