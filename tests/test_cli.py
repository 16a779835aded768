"""The command line against a real background server: server start/status/stop, ps, load, unload, log stream."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.fixtures.cli import mlxserve
from tests.fixtures.http import request
from tests.fixtures.server import free_port


@pytest.fixture
def background(tiny_home: Path):
    port = free_port()
    started = mlxserve(tiny_home, "server", "start", "--port", str(port), "--no-preload")
    yield port, started
    mlxserve(tiny_home, "server", "stop", check=False)


def test_help_lists_every_command():
    out = mlxserve(Path("/nonexistent"), "--help").stdout
    for command in ("serve", "server", "ls", "pull", "import", "rm", "ps", "load", "unload", "log"):
        assert f"    {command} " in out


def test_server_start_status_stop(tiny_home: Path, background):
    port, started = background
    assert f"http://127.0.0.1:{port}/v1" in started.stdout
    record = json.loads((tiny_home / "server.json").read_text())
    assert record["port"] == port
    status = mlxserve(tiny_home, "server", "status")
    assert f"running on http://127.0.0.1:{port}/v1 (pid {record['pid']})" in status.stdout
    again = mlxserve(tiny_home, "server", "start", check=False)
    assert again.returncode != 0 and "already running" in again.stderr
    assert "Stopped" in mlxserve(tiny_home, "server", "stop").stdout
    assert not (tiny_home / "server.json").exists()
    down = mlxserve(tiny_home, "ps", check=False)
    assert down.returncode != 0 and "no mlxserve server answers" in down.stderr
    assert "Traceback" not in down.stderr


def test_load_ps_unload(tiny_home: Path, background):
    assert mlxserve(tiny_home, "ps").stdout.startswith("No models loaded.\nMLX memory: ")
    assert mlxserve(tiny_home, "load", TINY, "--ttl", "90").stdout.startswith(f"Loaded {TINY}")
    table = mlxserve(tiny_home, "ps").stdout.splitlines()
    assert table[0].split() == ["NAME", "KIND", "MEMORY", "TTL", "LEFT", "IN", "FLIGHT"]
    assert table[1].split()[0] == TINY and table[1].split()[4] in ("1m30s", "1m29s")
    [entry] = json.loads(mlxserve(tiny_home, "ps", "--json").stdout)["data"]
    assert entry["id"] == TINY and entry["ttl_seconds"] == 90 and entry["requests_in_flight"] == 0
    assert mlxserve(tiny_home, "unload", "--all").stdout.strip() == f"Unloaded {TINY}"
    missing = mlxserve(tiny_home, "load", "no-such-model", check=False)
    assert missing.returncode != 0 and "does not exist" in missing.stderr


def test_log_stream_shows_the_templated_prompt_and_the_output(tiny_home: Path, background):
    port, _ = background
    follower = subprocess.Popen(
        [sys.executable, "-m", "mlxserve", "log", "stream", "--output", "--json"],
        env={**os.environ, "MLXSERVE_HOME": str(tiny_home), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "Following" in follower.stderr.readline()  # subscribed: requests from now on are shown
        reply = request(f"http://127.0.0.1:{port}/v1/chat/completions", "POST", {
            "model": TINY, "max_tokens": 5, "temperature": 0,
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]})
        assert reply.status == 200
        event = json.loads(follower.stdout.readline())
        assert event["type"] == "request"
        assert event["model"] == TINY and event["endpoint"] == "chat"
        assert event["prompt"] == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
                                   "<|im_start|>assistant\n")
        assert event["prompt_tokens"] == reply.json()["usage"]["prompt_tokens"] and event["cached_tokens"] == 0
        text = ""
        while (event := json.loads(follower.stdout.readline()))["type"] == "output":
            text += event["text"]
        assert event["type"] == "done" and event["completion_tokens"] == reply.json()["usage"]["completion_tokens"]
        assert text == reply.json()["choices"][0]["message"]["content"]
    finally:
        follower.terminate()
        follower.wait(timeout=10)


def test_rm_of_a_loaded_model_unloads_it_first(tmp_path: Path, tiny_home: Path):
    home = tmp_path / "home"
    shutil.copytree(tiny_home / "models" / TINY, home / "models" / "doomed")
    port = free_port()
    mlxserve(home, "server", "start", "--port", str(port), "--no-preload")
    try:
        mlxserve(home, "load", "doomed")
        removed = mlxserve(home, "rm", "doomed")
        assert "Unloaded doomed" in removed.stderr and "Removed doomed" in removed.stdout
        assert not (home / "models" / "doomed").exists()
        assert mlxserve(home, "ps").stdout.startswith("No models loaded.")
    finally:
        mlxserve(home, "server", "stop", check=False)


def test_rm_without_a_server_removes_from_disk(tmp_path: Path, tiny_home: Path):
    home = tmp_path / "home"
    shutil.copytree(tiny_home / "models" / TINY, home / "models" / "gone")
    assert "Removed gone" in mlxserve(home, "rm", "gone", "--port", str(free_port())).stdout
    assert not (home / "models" / "gone").exists()
