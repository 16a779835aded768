"""The command line against a real background server: server start/status/stop, ps, load, unload, log stream."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.fixtures.cli import mlxserve
from tests.fixtures.http import request
from tests.fixtures.server import ServerProcess, free_port


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


def test_serve_on_a_port_in_use_says_so_without_a_traceback(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = mlxserve(tmp_path, "serve", "--no-preload", "--port", str(port), check=False, timeout=60)
    assert result.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_server_start_on_a_port_another_server_holds_fails(tmp_path: Path, tiny_home: Path):
    other = ServerProcess(tiny_home, [])
    try:
        result = mlxserve(tmp_path, "server", "start", "--port", str(other.port), "--no-preload", check=False)
        assert result.returncode != 0 and "cannot listen" in result.stderr
        assert not (tmp_path / "server.json").exists()
    finally:
        other.stop()


def test_server_stop_never_kills_a_program_that_took_a_dead_servers_pid(tmp_path: Path):
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "server.json").write_text(json.dumps(
            {"pid": bystander.pid, "host": "127.0.0.1", "port": free_port(), "log": "x"}))
        result = mlxserve(tmp_path, "server", "stop")
        assert "No background server is running" in result.stdout
        assert bystander.poll() is None and not (tmp_path / "server.json").exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_ls_json_into_a_closed_pipe_ends_quietly(tmp_path: Path):
    for i in range(600):  # more JSON than a pipe holds, so the writer really meets the closed pipe
        folder = tmp_path / "models" / f"model-{i:04d}"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text('{"model_type": "llama", "max_position_embeddings": 2048}')
    result = subprocess.run(f"{sys.executable} -m mlxserve ls --json | head -n 2", shell=True, capture_output=True,
                            text=True, env={**os.environ, "MLXSERVE_HOME": str(tmp_path)}, timeout=120)
    assert result.stdout.splitlines()[0] == "[" and "Error" not in result.stderr and "Traceback" not in result.stderr


def test_serve_on_a_terminal_prints_no_sanic_developer_hints(tmp_path: Path):
    import pty

    port = free_port()
    pid, fd = pty.fork()
    if pid == 0:
        os.environ["MLXSERVE_HOME"] = str(tmp_path)
        os.execv(sys.executable, [sys.executable, "-m", "mlxserve", "serve", "--no-preload", "--port", str(port)])
    output = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and b"Worker ready" not in output and b"serving" not in output:
            try:
                output += os.read(fd, 4096)
            except OSError:
                break
        time.sleep(1.0)
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            output += os.read(fd, 65536)
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
    assert b"serving" in output and b"PRODUCTION" not in output and b"--debug" not in output


def test_serve_says_where_the_mlxserve_command_is_when_it_is_not_on_path(tmp_path: Path):
    port = free_port()
    env = {**os.environ, "MLXSERVE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-m", "mlxserve", "serve", "--no-preload", "--port", str(port)],
                              env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines = [server.stderr.readline() for _ in range(2)]
    finally:
        server.terminate()
        server.wait(timeout=30)
    command = Path(sys.executable).with_name("mlxserve")
    assert f"the `mlxserve` command (ps, load, log stream, ...) is {command}" in lines[1]
    assert f'export PATH="{command.parent}:$PATH"' in lines[1]


def test_pull_with_the_hub_unreachable_says_so_in_a_line(tmp_path: Path):
    result = mlxserve(tmp_path, "pull", "someone/some-model", check=False, timeout=180,
                      env={"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_ETAG_TIMEOUT": "2",
                           "HF_HUB_DOWNLOAD_TIMEOUT": "2"})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "could not reach the Hugging Face Hub to download someone/some-model" in result.stderr
    assert mlxserve(tmp_path, "ls").stdout.startswith("No models")  # nothing half-made is listed


@pytest.mark.parametrize("command", ["rm", "ps", "load", "unload"])
def test_model_commands_explain_themselves(command: str):
    out = mlxserve(Path("/nonexistent"), command, "--help").stdout
    description = out.split("\n\n")[1]
    assert len(description.split()) > 8, out
