"""A distributed server: ranks joined by MLX's ring backend over loopback, against one process.

Two ranks serve the tiny llama tensor-parallel and the tiny Qwen 2 pipeline-parallel (mlx-lm's llama
has no pipeline form); the default model (9 attention heads) needs three ranks to be split by heads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from mlxserve.engine.gguf import convert_gguf
from tests.conftest import MINILM, SMOLLM, TINY, TINY_VLM
from tests.fixtures.http import request
from tests.fixtures.server import ServerProcess, free_port
from tests.fixtures.tiny_gguf import write_tiny_gguf

TINY_QWEN = "tiny-qwen"
PROMPTS = ["hello", "the cat sat", "once upon a time", "é"]


class Group:
    """Ranks 1..N-1 as plain processes, then rank 0 as a server; MLX_RANK and MLX_HOSTFILE as mlx.launch sets them."""

    def __init__(self, home: Path, models: list[str], ranks: int = 2, extra_args: tuple[str, ...] = ()):
        hostfile = home / f"ring-{free_port()}.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(ranks)]))
        args = ["--distributed", *extra_args]
        port = free_port()
        self.followers = []
        for rank in range(1, ranks):
            command = [sys.executable, "-m", "mlxserve", "serve", "--home", str(home), "--port", str(port),
                       "--no-preload", *args]
            env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}
            self.followers.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.DEVNULL))
        try:
            self.server = ServerProcess(home, models, args, env={"MLX_RANK": "0", "MLX_HOSTFILE": str(hostfile)})
        except Exception:
            self.stop()
            raise
        self.client = OpenAI(base_url=self.server.base_url, api_key="anything", max_retries=0)

    def health(self) -> tuple[int, dict]:
        reply = request(self.server.base_url.removesuffix("/v1") + "/health", timeout=5)
        return reply.status, reply.json()

    def stop(self) -> None:
        if hasattr(self, "server"):
            self.server.stop()
        for follower in self.followers:
            try:
                follower.wait(timeout=20)
            except subprocess.TimeoutExpired:
                follower.kill()
                follower.wait()


def complete(client: OpenAI, model: str, prompt: str, **extra) -> str:
    return client.completions.create(model=model, prompt=prompt, **({"max_tokens": 24, "temperature": 0} | extra)
                                     ).choices[0].text


@pytest.fixture(scope="module")
def home(tiny_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("distributed-home")
    (home / "models").mkdir()
    (home / "models" / TINY).symlink_to(tiny_home / "models" / TINY)
    convert_gguf(write_tiny_gguf(home / "qwen.gguf", architecture="qwen2"), home / "models" / TINY_QWEN)
    return home


@pytest.fixture(scope="module")
def single(home: Path):
    server = ServerProcess(home, [TINY, TINY_QWEN])
    yield OpenAI(base_url=server.base_url, api_key="anything", max_retries=0)
    server.stop()


@pytest.fixture(scope="module")
def tensor(home: Path):
    group = Group(home, [TINY])
    yield group
    group.stop()


@pytest.fixture(scope="module")
def pipeline(home: Path):
    group = Group(home, [TINY_QWEN], extra_args=("--pipeline",))
    yield group
    group.stop()


@pytest.fixture(params=["tensor", "pipeline"])
def case(request: pytest.FixtureRequest) -> tuple[Group, str]:
    return request.getfixturevalue(request.param), TINY if request.param == "tensor" else TINY_QWEN


def test_greedy_output_is_the_single_process_servers_token_for_token(case, single) -> None:
    group, model = case
    for prompt in PROMPTS:
        assert complete(group.client, model, prompt) == complete(single, model, prompt)
    messages = [{"role": "user", "content": "Name a colour."}]
    chat = lambda c: c.chat.completions.create(model=model, messages=messages, max_tokens=20,  # noqa: E731
                                               temperature=0).choices[0].message.content
    assert chat(group.client) == chat(single)


def test_streaming_gives_the_same_text(case, single) -> None:
    group, model = case
    stream = group.client.completions.create(model=model, prompt="once upon a time", max_tokens=24, temperature=0,
                                             stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == \
        complete(single, model, "once upon a time")


def test_four_concurrent_requests_each_get_what_they_get_alone(case, single) -> None:
    group, model = case
    seeded = dict(temperature=0.8, seed=7)
    alone = {p: (complete(group.client, model, p), complete(group.client, model, p, **seeded)) for p in PROMPTS}
    with ThreadPoolExecutor(8) as pool:
        greedy = pool.map(lambda p: complete(group.client, model, p), PROMPTS)
        sampled = pool.map(lambda p: complete(group.client, model, p, **seeded), PROMPTS)
        together = dict(zip(PROMPTS, zip(greedy, sampled)))
    assert together == alone
    assert [together[p][0] for p in PROMPTS] == [complete(single, model, p) for p in PROMPTS]


def test_a_repeated_prompt_starts_from_the_prompt_cache_on_every_rank(case) -> None:
    group, model = case
    prompt = "the cat sat on the mat and looked at the dog " * 3
    first = group.client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    again = group.client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    assert again.choices[0].text == first.choices[0].text
    assert group.health()[0] == 200


def test_echo_with_logprobs_runs_the_prompt_pass_on_every_rank(case, single) -> None:
    group, model = case
    got, want = (c.completions.create(model=model, prompt="the cat sat", max_tokens=4, temperature=0, echo=True,
                                      logprobs=2) for c in (group.client, single))
    assert got.choices[0].text == want.choices[0].text
    assert got.choices[0].logprobs.tokens == want.choices[0].logprobs.tokens
    assert got.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want.choices[0].logprobs.token_logprobs[1:],
                                                                       abs=1e-3)


def test_a_cancelled_stream_leaves_every_rank_serving(case, single) -> None:
    group, model = case
    stream = group.client.completions.create(model=model, prompt="hello", max_tokens=200, temperature=0, stream=True)
    for _, _ in zip(range(3), stream):
        pass
    stream.close()
    time.sleep(0.5)
    assert complete(group.client, model, "the cat sat") == complete(single, model, "the cat sat")
    status, health = group.health()
    assert status == 200 and [r["alive"] for r in health["ranks"]] == [True, True]


def test_health_and_ps_show_every_rank(tensor) -> None:
    status, health = tensor.health()
    assert status == 200
    ranks = health["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["alive"] and r["pid"] > 0 and r["active_bytes"] > 0 and r["models"] == [TINY] for r in ranks)
    assert ranks[1]["pid"] == tensor.followers[0].pid
    ps = request(tensor.server.base_url.removesuffix("/v1") + "/api/v0/ps").json()
    assert [r["rank"] for r in ps["ranks"]] == [0, 1]


def test_an_unload_frees_the_model_on_every_rank_and_the_next_request_loads_it_again(tensor, single) -> None:
    base = tensor.server.base_url.removesuffix("/v1")
    assert request(base + "/api/v0/models/unload", "POST", {"model": TINY}).json() == {"unloaded": [TINY]}
    time.sleep(1.5)  # a report from every rank
    assert [r["models"] for r in tensor.health()[1]["ranks"]] == [[], []]
    assert complete(tensor.client, TINY, "the cat sat") == complete(single, TINY, "the cat sat")
    time.sleep(1.5)
    assert [r["models"] for r in tensor.health()[1]["ranks"]] == [[TINY], [TINY]]


def test_a_model_the_architecture_cannot_split_is_refused_by_name(pipeline) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        complete(pipeline.client, TINY, "hello")
    assert refused.value.code == "model_not_shardable"
    assert "llama" in refused.value.message and "pipeline" in refused.value.message
    assert complete(pipeline.client, TINY_QWEN, "hello")  # the group goes on
    assert pipeline.health()[0] == 200


def test_a_rank_killed_mid_stream_ends_the_stream_with_an_error_and_turns_health_red(home: Path) -> None:
    group = Group(home, [TINY])
    try:
        stream = group.client.completions.create(model=TINY, prompt="hello", max_tokens=2000, temperature=0,
                                                 stream=True)
        received = 0
        with pytest.raises(openai.APIError) as ended:
            for chunk in stream:
                received += 1
                if received == 3:
                    group.followers[0].kill()
        assert "Rank 1" in str(ended.value.message)
        status, health = group.health()
        assert status == 503 and health["ranks"][1]["alive"] is False
        with pytest.raises(openai.InternalServerError) as refused:  # 503s, at once
            complete(group.client, TINY, "hello")
        assert refused.value.status_code == 503
        assert group.server.alive()
    finally:
        group.stop()


def test_stopping_rank_0_stops_every_rank(home: Path) -> None:
    group = Group(home, [TINY])
    follower = group.followers[0]
    group.server.stop()
    assert follower.wait(timeout=20) == 0


def test_mlxserve_launch_starts_the_group_and_a_sigterm_leaves_no_process_behind(home: Path) -> None:
    hostfile = home / "hosts.json"
    hostfile.write_text(json.dumps({"backend": "ring", "hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2}))
    port = free_port()
    launch = subprocess.Popen(
        [sys.executable, "-m", "mlxserve", "launch", "--hostfile", str(hostfile), "--starting-port", str(free_port()),
         "--home", str(home), "--port", str(port), "--model", TINY, "--log-file", str(home / "launch.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        health = None
        while time.monotonic() < deadline and health is None:
            try:
                health = request(f"http://127.0.0.1:{port}/health", timeout=1).json()
            except OSError:
                time.sleep(0.5)
        assert health is not None and [r["alive"] for r in health["ranks"]] == [True, True]
        pids = [r["pid"] for r in health["ranks"]]
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="anything", max_retries=0)
        assert complete(client, TINY, "hello")
        launch.send_signal(signal.SIGTERM)
        launch.wait(timeout=40)
        for pid in pids:  # gone, or ended and waiting for its (new) parent to reap it
            stat = Path(f"/proc/{pid}/stat")
            assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def smollm_home(default_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("distributed-smollm")
    (home / "models").mkdir()
    for name in (SMOLLM, MINILM):
        (home / "models" / name).symlink_to(default_home / "models" / name)
    return home


def test_the_default_model_on_three_ranks_answers_as_one_process(smollm_home: Path, default_client: OpenAI) -> None:
    group = Group(smollm_home, [SMOLLM], ranks=3)
    try:
        for prompt in ("The capital of France is", "def fibonacci(n):", "Water boils at"):
            assert complete(group.client, SMOLLM, prompt) == complete(default_client, SMOLLM, prompt)
    finally:
        group.stop()


def test_on_two_ranks_the_default_chat_model_is_refused_and_the_embedding_model_runs_on_rank_0(
        smollm_home: Path, default_client: OpenAI) -> None:
    group = Group(smollm_home, [])
    try:
        with pytest.raises(openai.BadRequestError) as refused:
            complete(group.client, SMOLLM, "hello")
        assert "9 attention heads" in refused.value.message and "2 ranks" in refused.value.message
        texts = ["a distributed server", "embeds on rank 0"]
        got = group.client.embeddings.create(model=MINILM, input=texts).data
        want = default_client.embeddings.create(model=MINILM, input=texts).data
        for mine, theirs in zip(got, want):
            assert mine.embedding == pytest.approx(theirs.embedding, abs=1e-5)
        time.sleep(1.5)  # a report from every rank
        ranks = group.health()[1]["ranks"]
        assert ranks[0]["models"] == [MINILM] and ranks[1]["models"] == []
    finally:
        group.stop()


def test_a_vision_model_is_refused_by_a_distributed_server(vlm_home: Path) -> None:
    group = Group(vlm_home, [])
    try:
        with pytest.raises(openai.BadRequestError) as refused:
            complete(group.client, TINY_VLM, "hello")
        assert refused.value.code == "model_not_shardable" and "vision" in refused.value.message
    finally:
        group.stop()
