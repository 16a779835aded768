"""Images in chat messages, on a tiny random Idefics3 (SmolVLM's architecture) through the real server."""

import io

import pytest
from mlx_vlm.utils import load_processor
from PIL import Image

from tests.conftest import TINY_VLM
from tests.fixtures.http import request
from tests.fixtures.images import data_url, image_bytes, serve_files
from tests.fixtures.tiny_vlm import IMAGE_SEQ_LEN, MAX_IMAGES

CAT = image_bytes(seed=1)
DOG = image_bytes(seed=2)


def ask(*images: str, text: str = "What is in the picture?") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def first_token_logprobs(client, messages) -> list[tuple[str, float]]:
    r = client.chat.completions.create(model=TINY_VLM, messages=messages, max_tokens=1, temperature=0,
                                       logprobs=True, top_logprobs=5)
    return [(t.token, t.logprob) for t in r.choices[0].logprobs.content[0].top_logprobs]


def test_models_lists_vision_capability(vlm_server):
    models = {m["id"]: m for m in request(vlm_server.base_url + "/models").json()["data"]}
    assert models[TINY_VLM]["capabilities"] == ["chat", "completions", "vision"]


def test_image_request_succeeds_and_streams(vlm_client):
    r = vlm_client.chat.completions.create(model=TINY_VLM, messages=ask(data_url(CAT)), max_tokens=5,
                                           temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    chunks = list(vlm_client.chat.completions.create(model=TINY_VLM, messages=ask(data_url(CAT)), max_tokens=5,
                                                     temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content


def test_placeholder_expands_to_the_processors_image_tokens(vlm_client, vlm_home):
    r = vlm_client.chat.completions.create(model=TINY_VLM, messages=ask(data_url(CAT)), max_tokens=1)
    processor = load_processor(vlm_home / "models" / TINY_VLM)
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    prompt = processor.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    assert prompt.count("<image>") == 1
    ids = processor(text=[prompt], images=[[Image.open(io.BytesIO(CAT))]], return_tensors="np")["input_ids"][0]
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert list(ids).count(image_token) == IMAGE_SEQ_LEN
    assert r.usage.prompt_tokens == len(ids)


def test_different_images_change_the_logits_and_the_same_image_does_not(vlm_client):
    cat = first_token_logprobs(vlm_client, ask(data_url(CAT)))
    assert first_token_logprobs(vlm_client, ask(data_url(CAT))) == cat
    assert first_token_logprobs(vlm_client, ask(data_url(DOG))) != cat


def test_base64_and_http_url_give_the_same_result(vlm_client):
    with serve_files({"/cat.png": CAT}) as base:
        by_url = first_token_logprobs(vlm_client, ask(base + "/cat.png"))
    assert by_url == first_token_logprobs(vlm_client, ask(data_url(CAT)))


def test_image_positions_matter(vlm_client):
    cat_dog = first_token_logprobs(vlm_client, ask(data_url(CAT), data_url(DOG)))
    dog_cat = first_token_logprobs(vlm_client, ask(data_url(DOG), data_url(CAT)))
    assert cat_dog != dog_cat


def test_images_across_a_conversation(vlm_client):
    messages = ask(data_url(CAT)) + [{"role": "assistant", "content": "A cat."}] + ask(data_url(DOG), text="And now?")
    r = vlm_client.chat.completions.create(model=TINY_VLM, messages=messages, max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens > 2 * (IMAGE_SEQ_LEN + 3)


def test_more_images_than_the_model_allows_names_the_part(vlm_server):
    body = {"model": TINY_VLM, "max_tokens": 1, "messages": ask(*[data_url(CAT)] * (MAX_IMAGES + 1))}
    reply = request(vlm_server.base_url + "/chat/completions", "POST", body)
    assert reply.status == 400
    assert reply.json()["error"]["param"] == f"messages[0].content[{MAX_IMAGES}]"
    assert f"at most {MAX_IMAGES}" in reply.json()["error"]["message"]


@pytest.mark.parametrize("url", ["data:image/png;base64,!!", data_url(b"GIF89a-but-not-really")])
def test_bad_images_are_400_and_the_server_keeps_serving(vlm_server, vlm_client, url):
    reply = request(vlm_server.base_url + "/chat/completions", "POST",
                    {"model": TINY_VLM, "max_tokens": 1, "messages": ask(url)})
    assert reply.status == 400 and reply.json()["error"]["param"] == "messages[0].content[0]"
    ok = vlm_client.chat.completions.create(model=TINY_VLM, messages=ask(data_url(CAT)), max_tokens=1)
    assert ok.choices[0].finish_reason in ("stop", "length")
