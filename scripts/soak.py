"""Soak test: a real mlxserve under a bounded mixed load, with errors and memory recorded each minute.

    python scripts/soak.py                     # 10 minutes, concurrency 8, the default models
    python scripts/soak.py --minutes 60 --json soak.json

Eight workers (--concurrency) loop until the time is up, each picking at random: a streamed chat
(a quarter of them cancelled part-way by closing the connection), a plain completion, an
embeddings request, or a bad request from a small corpus (which must get a 4xx). An error is any
5xx, a bad request answered with anything but a 4xx, a stream that ends without `[DONE]`, or a
connection failure. Every minute it records the server's resident memory (ps) and MLX's active
memory (/api/v0/ps). Targets: no errors, and the last minute's RSS within 5% of minute 2's (memory
flat once warm); the exit status is 1 when either is missed.
Traffic goes only to the server this script starts, on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CHAT_MODEL, EMBED_MODEL = "smollm2-135m-instruct", "all-minilm-l6-v2"
TOPICS = "rivers bridges winter gardens music engines lanterns harbors orchards thunder".split()
BAD = [  # (body, why it is bad) -- each must get a 4xx
    (b'{"model": ', "invalid JSON"),
    (json.dumps({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 9}).encode(),
     "temperature out of range"),
    (json.dumps({"model": CHAT_MODEL, "prompt": [10**7]}).encode(), "token id past the vocabulary"),
    (json.dumps({"model": EMBED_MODEL, "input": [[10**6]]}).encode(), "embedding token id past the vocabulary"),
    (b'{"model": "' + b"m" * 300 + b'", "messages": []}', "model id too long"),
    (b'{"model": "smollm2-135m-instruct", "max_tokens": 1' + b"0" * 400 + b', "prompt": "x"}', "10**400"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Minute:
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    cancelled: int = 0
    rss_mb: float = 0.0
    mlx_active_mb: float = 0.0
    mlx_cache_mb: float = 0.0  # freed buffers MLX keeps for reuse


class Soak:
    def __init__(self, port: int, seconds: float, concurrency: int):
        self.port = port
        self.deadline = time.monotonic() + seconds
        self.started = time.monotonic()
        self.concurrency = concurrency
        self.minutes: list[Minute] = [Minute()]
        self.lock = threading.Lock()

    def _note(self, error: str | None = None, cancelled: bool = False) -> None:
        with self.lock:
            minute = self.minutes[-1]
            minute.requests += 1
            minute.cancelled += cancelled
            if error:
                minute.errors.append(error)

    def _post(self, path: str, body: bytes) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def _stream(self, rng: random.Random) -> None:
        body = {"model": CHAT_MODEL, "stream": True, "max_tokens": rng.randint(16, 96),
                "temperature": rng.choice([0, 0.7, 1.0]), "seed": rng.randint(0, 2**31),
                "messages": [{"role": "user", "content": f"Tell me about {rng.choice(TOPICS)}."}]}
        cancel_after = rng.randint(2, 10) if rng.random() < 0.25 else None
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        try:
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                return self._note(f"stream: HTTP {response.status} {response.read()[:200]!r}")
            events = 0
            for line in response:
                if line.startswith(b"data: [DONE]"):
                    return self._note()
                if line.startswith(b"data: "):
                    events += 1
                    if b'"error"' in line:
                        return self._note(f"stream: error event {line[:200]!r}")
                    if cancel_after is not None and events >= cancel_after:
                        return self._note(cancelled=True)  # closing the connection cancels it
            self._note("stream: ended without [DONE]")
        finally:
            conn.close()

    def _one(self, rng: random.Random) -> None:
        kind = rng.choices(["stream", "completion", "embeddings", "bad"], weights=[4, 2, 2, 1])[0]
        if kind == "stream":
            return self._stream(rng)
        if kind == "completion":
            body = {"model": CHAT_MODEL, "prompt": f"The story of {rng.choice(TOPICS)} is", "max_tokens": 24}
            status, reply = self._post("/v1/completions", json.dumps(body).encode())
        elif kind == "embeddings":
            body = {"model": EMBED_MODEL, "input": [f"{rng.choice(TOPICS)} {i}" for i in range(rng.randint(1, 64))]}
            status, reply = self._post("/v1/embeddings", json.dumps(body).encode())
        else:
            bad, why = rng.choice(BAD)
            path = "/v1/embeddings" if b"all-minilm" in bad else (
                "/v1/completions" if b"prompt" in bad else "/v1/chat/completions")
            status, reply = self._post(path, bad)
            return self._note(None if 400 <= status < 500 else f"bad input ({why}): HTTP {status} {reply[:200]!r}")
        self._note(None if status == 200 else f"{kind}: HTTP {status} {reply[:200]!r}")

    def worker(self, seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < self.deadline:
            try:
                self._one(rng)
            except (OSError, http.client.HTTPException) as exc:
                self._note(f"connection: {exc!r}")

    def sample(self, pid: int) -> None:
        rss = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("GET", "/api/v0/ps")
            memory = json.loads(conn.getresponse().read())["memory"]
        finally:
            conn.close()
        with self.lock:
            self.minutes[-1].rss_mb = int(rss or 0) / 1024
            self.minutes[-1].mlx_active_mb = memory["active_bytes"] / 2**20
            self.minutes[-1].mlx_cache_mb = memory["cache_bytes"] / 2**20


def _wait_ready(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.5)
    sys.exit("the server did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10, help="how long to run (default: 10)")
    parser.add_argument("--concurrency", type=int, default=8, help="workers sending requests (default: 8)")
    parser.add_argument("--home", type=Path, help="MLXSERVE_HOME with the default models (default: ~/.mlxserve)")
    parser.add_argument("--json", type=Path, help="write every minute's numbers here")
    args = parser.parse_args()

    port = _free_port()
    log = Path(tempfile.mkdtemp(prefix="mlxserve-soak-")) / "server.log"
    home = ["--home", str(args.home)] if args.home else []
    command = [sys.executable, "-m", "mlxserve", "serve", "--port", str(port), *home,
               "--model", CHAT_MODEL, "--model", EMBED_MODEL, "--log-file", str(log.with_name("mlxserve.log"))]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        _wait_ready(port, process, log)
        soak = Soak(port, args.minutes * 60, args.concurrency)
        workers = [threading.Thread(target=soak.worker, args=(i,), daemon=True) for i in range(args.concurrency)]
        for w in workers:
            w.start()
        while time.monotonic() < soak.deadline:
            time.sleep(min(60.0, max(0.0, soak.deadline - time.monotonic())))
            soak.sample(process.pid)
            m = soak.minutes[-1]
            print(f"minute {len(soak.minutes):3d}: {m.requests:5d} requests ({m.cancelled} cancelled), "
                  f"{len(m.errors)} errors, RSS {m.rss_mb:.0f} MiB, MLX active {m.mlx_active_mb:.0f} MiB, "
                  f"MLX cache {m.mlx_cache_mb:.0f} MiB", flush=True)
            if time.monotonic() < soak.deadline:
                with soak.lock:
                    soak.minutes.append(Minute())
        for w in workers:
            w.join(timeout=300)
        alive = process.poll() is None
    finally:
        process.terminate()
        process.wait(timeout=60)

    errors = [e for m in soak.minutes for e in m.errors]
    requests = sum(m.requests for m in soak.minutes)
    baseline = soak.minutes[1].rss_mb if len(soak.minutes) > 1 else soak.minutes[0].rss_mb
    drift = soak.minutes[-1].rss_mb / baseline - 1 if baseline else 0.0
    print(f"\n{requests} requests in {args.minutes:g} min at concurrency {args.concurrency}: {len(errors)} errors; "
          f"RSS minute 2 {baseline:.0f} MiB -> last minute {soak.minutes[-1].rss_mb:.0f} MiB ({drift:+.1%}); "
          f"server {'alive' if alive else 'DIED'}; log {log}")
    for error in errors[:20]:
        print("  error:", error)
    if args.json:
        args.json.write_text(json.dumps({"minutes": [m.__dict__ for m in soak.minutes], "rss_drift": drift,
                                         "errors": len(errors), "requests": requests}, indent=2))
    sys.exit(0 if not errors and alive and abs(drift) <= 0.05 else 1)


if __name__ == "__main__":
    main()
