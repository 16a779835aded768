"""Image content parts: every bad image is a 400 naming its part, and text-only models say they take no images."""

import asyncio
import io
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from mlxserve.api.images import ImagePolicy, resolve_images
from mlxserve.protocol import ChatMessage, ImageError, ImagePart
from tests.conftest import TINY, TINY_VLM
from tests.fixtures.http import request
from tests.fixtures.images import data_url, image_bytes, serve_files
from mlxserve.settings import Settings
from tests.fixtures.server import free_port


def chat_with_image(url: str, model: str = TINY) -> dict:
    return {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": [
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
def test_bad_image_is_a_400_naming_the_part(vlm_server, url, words):
    status, body = post(vlm_server, chat_with_image(url, TINY_VLM))
    assert status == 400
    assert words in body["error"]["message"]
    assert body["error"]["param"] == "messages[0].content[1]"


def test_image_over_the_size_limit():
    big = image_bytes(size=(200, 200))  # ~120 KB of noise
    with pytest.raises(ImageError, match="larger than"):
        resolve(data_url(big), ImagePolicy(max_bytes=50_000))


def test_an_image_for_a_text_only_model_is_refused_before_it_is_fetched(tiny_server):
    with serve_files({"/cat.png": image_bytes()}) as base:
        status, body = post(tiny_server, chat_with_image(base + "/cat.png"))
        assert status == 400 and "does not accept images" in body["error"]["message"]
        assert base.requests == []


def test_remote_images_are_off_by_default():
    assert ImagePolicy().allow_remote is False and Settings().remote_images is False


def test_a_server_fetches_only_from_its_listed_hosts(vlm_server):
    with serve_files({"/cat.png": image_bytes()}) as base:
        listed = post(vlm_server, chat_with_image(base + "/cat.png", TINY_VLM))
        unlisted = post(vlm_server, chat_with_image(base.replace("127.0.0.1", "localhost") + "/cat.png", TINY_VLM))
    assert listed[0] == 200 and base.requests == ["/cat.png"]
    assert unlisted[0] == 400 and unlisted[1]["error"]["message"].endswith("could not fetch the image URL")


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


LOOPBACK_ALLOWED = ImagePolicy(allow_remote=True, remote_hosts=("127.0.0.1",), fetch_timeout=1.0)


def test_remote_fetching_is_off_unless_turned_on():
    with pytest.raises(ImageError, match="turned off"):
        resolve("http://127.0.0.1:9/x.png", ImagePolicy())


def test_a_listed_host_is_fetched_and_checked():
    with serve_files({"/cat.png": image_bytes(), "/fake.png": b"not an image"}) as base:
        assert resolve(base + "/cat.png", LOOPBACK_ALLOWED) == image_bytes()
        with pytest.raises(ImageError, match="not a readable image"):
            resolve(base + "/fake.png", LOOPBACK_ALLOWED)


@pytest.mark.parametrize("url", ["http://127.0.0.1:{port}/cat.png", "http://localhost:{port}/cat.png",
                                 "http://[::1]:{port}/cat.png", "http://10.0.0.1:{port}/cat.png",
                                 "http://169.254.169.254/latest/meta-data", "http://0.0.0.0:{port}/cat.png"])
def test_private_addresses_are_never_fetched_unless_listed(url):
    with serve_files({"/cat.png": image_bytes()}) as base:
        with pytest.raises(ImageError) as err:
            resolve(url.format(port=base.port), ImagePolicy(allow_remote=True, fetch_timeout=1.0))
        assert base.requests == []
    assert err.value.message == "'messages[0].content[1]': could not fetch the image URL"


def test_every_failed_fetch_says_the_same_thing():
    """Refused connection, HTTP 404, unknown host, unlisted host: one message, so it cannot map a network."""
    with serve_files({}) as base:
        urls = [f"http://127.0.0.1:{free_port()}/x.png", base + "/missing.png", "http://no-such-host.invalid/x.png",
                "http://example.com/x.png"]
        messages = set()
        for url in urls:
            with pytest.raises(ImageError) as err:
                resolve(url, LOOPBACK_ALLOWED)
            messages.add(err.value.message)
    assert messages == {"'messages[0].content[1]': could not fetch the image URL"}


def test_a_slow_image_server_is_cut_off_at_the_fetch_timeout():
    with serve_files({"/slow.png": image_bytes()}, trickle_seconds=0.3) as base:
        started = time.monotonic()
        with pytest.raises(ImageError, match="could not fetch"):
            resolve(base + "/slow.png", LOOPBACK_ALLOWED)
    assert time.monotonic() - started < 2.5


def test_a_redirect_to_an_unlisted_host_is_not_followed():
    with serve_files({"/hop.png": ("redirect", "http://localhost:9/x.png")}) as base:
        with pytest.raises(ImageError, match="could not fetch"):
            resolve(base + "/hop.png", LOOPBACK_ALLOWED)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` (a decompression bomb's first bytes)."""
    out = io.BytesIO()
    Image.new("1", (width, height)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("data,words", [
    (_png_header_only(12000, 12000), "pixels"),
    (image_bytes()[:-40], "not a readable image"),  # truncated: its header is fine, its pixels are not
    (image_bytes("JPEG", size=(64, 64))[:300], "not a readable image"),
])
def test_bombs_and_corrupt_images_are_400s(data, words):
    with pytest.raises(ImageError, match=words):
        resolve(data_url(data), ImagePolicy())


@pytest.mark.parametrize("url", ["http://127.0.0.1/a.png\r\nX-Injected: 1", "data:image/png;base64,AAAA\nBBBB",
                                 "http://127.0.0.1/a b.png"])
def test_urls_with_control_characters_are_refused(url):
    with pytest.raises(ImageError, match="control characters"):
        resolve(url, LOOPBACK_ALLOWED)


def test_file_urls_only_inside_the_allowed_folder(tmp_path):
    (tmp_path / "ok.png").write_bytes(image_bytes())
    policy = ImagePolicy(file_folder=tmp_path)
    assert resolve(f"file://{tmp_path}/ok.png", policy) == image_bytes()
    with pytest.raises(ImageError, match="allowed image folder"):
        resolve(f"file://{tmp_path}/../{tmp_path.name}/../etc/passwd", policy)


def test_slow_image_servers_do_not_hold_up_model_management(vlm_server):
    """Twelve fetches trickling in at once: /api/v0 (which waits in the default thread pool) still answers."""
    with serve_files({"/slow.png": image_bytes()}, trickle_seconds=0.5) as base:
        with ThreadPoolExecutor(12) as pool:
            slow = [pool.submit(post, vlm_server, chat_with_image(base + "/slow.png", TINY_VLM)) for _ in range(12)]
            time.sleep(1.0)
            started = time.monotonic()
            for _ in range(3):
                assert request(vlm_server.base_url.removesuffix("/v1") + "/api/v0/ps").status == 200
            assert time.monotonic() - started < 3
            assert all(f.result()[0] == 400 for f in slow)  # each cut off at its fetch deadline
