"""Image content parts: every bad image is a 400 naming its part, and text-only models say they take no images."""

import asyncio

import pytest

from mlxserve.api.images import ImagePolicy, resolve_images
from mlxserve.protocol import ChatMessage, ImageError, ImagePart
from tests.conftest import TINY
from tests.fixtures.http import request
from tests.fixtures.images import data_url, image_bytes, serve_files


def chat_with_image(url: str) -> dict:
    return {"model": TINY, "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": url, "detail": "auto"}}]}]}


def post(server, body) -> tuple[int, dict]:
    reply = request(server.base_url + "/chat/completions", "POST", body)
    return reply.status, reply.json()


def test_image_to_text_only_model_is_a_400_saying_so(tiny_server):
    status, body = post(tiny_server, chat_with_image(data_url(image_bytes())))
    assert status == 400
    assert "does not accept images" in body["error"]["message"]
    assert body["error"]["param"] == "messages[0].content[1]"


@pytest.mark.parametrize("url,words", [
    ("data:image/png;base64,@@@notbase64@@@", "corrupt"),
    (data_url(b"these bytes are not an image"), "not a readable image"),
    ("data:image/png,rawbytes", "base64"),
    ("file:///etc/hostname", "turned off"),
    ("ftp://example.invalid/a.png", "data:, http(s): or file:"),
])
def test_bad_image_is_a_400_naming_the_part(tiny_server, url, words):
    status, body = post(tiny_server, chat_with_image(url))
    assert status == 400
    assert words in body["error"]["message"]
    assert body["error"]["param"] == "messages[0].content[1]"


def test_image_over_the_size_limit(tiny_server):
    big = image_bytes(size=(200, 200))  # ~120 KB of noise; the test server allows 0.05 MB
    status, body = post(tiny_server, chat_with_image(data_url(big)))
    assert status == 400 and "larger than" in body["error"]["message"]


def test_http_image_is_fetched_from_loopback(tiny_server):
    with serve_files({"/cat.png": image_bytes(), "/fake.png": b"not an image"}) as base:
        ok_status, ok = post(tiny_server, chat_with_image(base + "/cat.png"))
        fake_status, fake = post(tiny_server, chat_with_image(base + "/fake.png"))
        missing_status, missing = post(tiny_server, chat_with_image(base + "/missing.png"))
    assert ok_status == 400 and "does not accept images" in ok["error"]["message"]  # fetched, checked, refused
    assert fake_status == 400 and "not a readable image" in fake["error"]["message"]
    assert missing_status == 400 and "could not fetch" in missing["error"]["message"]


def test_server_keeps_serving_after_bad_images(tiny_server):
    post(tiny_server, chat_with_image("data:image/png;base64,xx"))
    status, body = post(tiny_server, {"model": TINY, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and tiny_server.alive()


def resolve(url: str, policy: ImagePolicy) -> bytes:
    message = ChatMessage("user", ("look", ImagePart(url=url, where="messages[0].content[1]")))
    return asyncio.run(resolve_images((message,), policy))[0].images[0].data


@pytest.mark.parametrize("fmt,mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"),
                                      ("GIF", "image/gif")])
def test_supported_formats_decode(fmt, mime):
    data = image_bytes(fmt)
    assert resolve(data_url(data, mime), ImagePolicy()) == data


def test_remote_fetching_can_be_turned_off():
    with pytest.raises(ImageError, match="turned off"):
        resolve("http://127.0.0.1:9/x.png", ImagePolicy(allow_remote=False))


def test_file_urls_only_inside_the_allowed_folder(tmp_path):
    (tmp_path / "ok.png").write_bytes(image_bytes())
    policy = ImagePolicy(file_folder=tmp_path)
    assert resolve(f"file://{tmp_path}/ok.png", policy) == image_bytes()
    with pytest.raises(ImageError, match="allowed image folder"):
        resolve(f"file://{tmp_path}/../{tmp_path.name}/../etc/passwd", policy)
