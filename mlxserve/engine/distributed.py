"""One model served by several processes (several Macs) on MLX's distributed engine.

`mlx.launch` (or `mlxserve launch`) starts `mlxserve serve --distributed` on every host; MLX's ring
(TCP) or JACCL (RDMA over Thunderbolt) backend joins them in one group. Rank 0 runs the HTTP
server and the scheduler, as a single-process server does. The other ranks run `follow`: they hold
their shard of each text model (mlx-lm's tensor-parallel `shard`, or `pipeline` with --pipeline)
and mirror rank 0's batch: every operation rank 0's runners make on a `BatchGenerator` or on
a prompt cache (insert, remove, step, remember a finished sequence's KV) is recorded as an op
and sent to the followers before rank 0's next collective operation, so each rank makes the same
model calls in the same order and the collectives inside them line up.

Rank 0 alone samples: each sampler's tokens go through one `all_sum` to which the followers add
zeros, so every rank feeds the same tokens back into its shard whatever the sampler, the grammar,
the penalties or the random state (followers run none of them). Embedding models are not sharded:
they load and run on rank 0 only. Vision models are refused.

Ops travel as JSON (never pickle: a follower must not run what the network hands it). Every
second, even when idle, rank 0 sends a report op that gathers each rank's pid, host and memory,
which /health and `mlxserve ps` show; a rank that dies breaks the ring, the next collective raises
on rank 0 within about a second, and the engine stops with a 503 for every request.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import LRUPromptCache
from mlx_lm.utils import load_model, sharded_load

from mlxserve.engine.batch import cached_prefix, new_generator, prompt_logits
from mlxserve.engine.cpu import optimize_for_cpu
from mlxserve.engine.kinds.text import TextModel, text_model_from
from mlxserve.engine.manager import held_memory, release_memory
from mlxserve.engine.store import ModelStore
from mlxserve.protocol import EngineUnavailableError, InvalidRequestError, RankInfo

log = logging.getLogger("mlxserve.engine")

REPORT_SECONDS = 1.0


class RankLostError(EngineUnavailableError):
    """A collective failed: a rank died or its link broke, and the ranks can no longer agree."""


class DistributedLoadError(InvalidRequestError):
    """A model cannot be served across these ranks (its kind, architecture, head count, a rank's files)."""

    param = "model"
    code = "model_not_shardable"


class Ring:
    """The process group, and the three exchanges this server makes over it besides the model's own."""

    def __init__(self, group: mx.distributed.Group):
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self._stream: mx.Stream | None = None

    @property
    def stream(self) -> mx.Stream:
        """The one stream of every collective of this process, the batch generators' included: MLX runs
        a stream's work in order, so each rank's collectives happen in the order it made them (a decode
        step still computing on another stream would interleave with the next message). Made on first
        use, by the thread that makes them all (MLX's streams belong to the thread that made them)."""
        if self._stream is None:
            self._stream = mx.new_stream(mx.default_device())
        return self._stream

    @classmethod
    def join(cls) -> Ring:
        """The group `mlx.launch` set up for this process (MLX_RANK and MLX_HOSTFILE, or JACCL's variables)."""
        if not mx.distributed.is_available():
            raise SystemExit("mlxserve: --distributed: this MLX has no distributed backend")
        try:
            group = mx.distributed.init(strict=True)
        except RuntimeError as exc:
            raise SystemExit(f"mlxserve: --distributed needs the group `mlx.launch` sets up ({exc}); start it "
                             "with `mlxserve launch --hostfile hosts.json ...`") from exc
        if group.size() < 2:
            raise SystemExit("mlxserve: --distributed was given a group of one process; list two or more "
                             "hosts in the hostfile, or serve without --distributed")
        return cls(group)

    def _sum(self, values: np.ndarray, stream: Any = None) -> np.ndarray:
        return np.array(mx.distributed.all_sum(mx.array(values), group=self.group, stream=stream or self.stream))

    def broadcast(self, data: bytes = b"", stream: Any = None) -> bytes:
        """Rank 0's `data` on every rank (the others pass nothing)."""
        size = int(self._sum(np.array([len(data) if self.rank == 0 else 0], dtype=np.int64), stream)[0])
        mine = np.frombuffer(data, dtype=np.uint8) if self.rank == 0 else np.zeros(size, dtype=np.uint8)
        return self._sum(mine, stream).tobytes()

    def gather(self, data: bytes) -> list[bytes]:
        """Every rank's `data`, in rank order, on every rank."""
        sizes = np.zeros(self.size, dtype=np.int64)
        sizes[self.rank] = len(data)
        sizes = self._sum(sizes)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        mine = np.zeros(int(offsets[-1]), dtype=np.uint8)
        mine[offsets[self.rank]: offsets[self.rank + 1]] = np.frombuffer(data, dtype=np.uint8)
        everything = self._sum(mine).tobytes()
        return [everything[offsets[r]: offsets[r + 1]] for r in range(self.size)]

    def sampler(self, sampler: Any = None) -> Any:
        """A sampler whose tokens are rank 0's on every rank: rank 0 passes its own, the others none."""
        group = self.group

        def sample(logprobs: mx.array) -> mx.array:
            tokens = sampler(logprobs).astype(mx.uint32) if sampler is not None else \
                mx.zeros((logprobs.shape[0],), dtype=mx.uint32)
            return mx.distributed.all_sum(tokens, group=group)

        return sample


# --- lifelines: how a dead process is noticed ----------------------------------------------------------------
#
# A rank that dies in the middle of a collective can leave the others waiting in it for good (MLX fails
# a synchronous exchange within a second, but not always one computed asynchronously inside a decode
# step). So each follower also holds a TCP connection to rank 0 that carries nothing: the kernel
# closes it when the process ends, however it ends, and the other side hears it at once.


def _rank0_address() -> str:
    """Rank 0's address as mlx.launch gave it: the ring's hostfile, or JACCL's coordinator."""
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile:
        with open(hostfile) as f:
            first = json.load(f)[0]
        return (first[0] if isinstance(first, list) else first).rsplit(":", 1)[0]
    coordinator = os.environ.get("MLX_JACCL_COORDINATOR")
    if coordinator:
        return coordinator.rsplit(":", 1)[0]
    raise SystemExit("mlxserve: --distributed: neither MLX_HOSTFILE nor MLX_JACCL_COORDINATOR is set; start the "
                     "group with `mlxserve launch`")


def watch_followers(ring: Ring, lost: Any) -> None:
    """Rank 0: take a lifeline from every follower (address and a secret sent over the ring), and call
    `lost(rank)` from a thread of its own when one closes."""
    server = socket.create_server((_rank0_address(), 0))
    secret = secrets.token_hex(16)
    ring.broadcast(json.dumps([server.getsockname()[1], secret]).encode(), stream=mx.cpu)
    lines: dict[int, socket.socket] = {}
    server.settimeout(120)
    while len(lines) < ring.size - 1:
        connection, _ = server.accept()
        connection.settimeout(10)
        try:
            hello = json.loads(connection.recv(256).decode())
        except (OSError, ValueError):
            connection.close()
            continue
        if hello.get("secret") == secret and hello.get("rank") in range(1, ring.size):
            connection.settimeout(None)
            lines[hello["rank"]] = connection
        else:
            connection.close()
    server.close()
    for rank, line in lines.items():
        def hold(rank: int = rank, line: socket.socket = line) -> None:
            try:
                line.recv(1)  # nothing is ever sent: this returns when the follower's process ends
            except OSError:
                pass
            lost(rank)
        threading.Thread(target=hold, name=f"mlxserve-rank{rank}-lifeline", daemon=True).start()


def hold_lifeline(ring: Ring) -> None:
    """A follower: connect to rank 0's lifeline; when rank 0's process ends, end this one."""
    port, secret = json.loads(ring.broadcast(stream=mx.cpu))
    line = socket.create_connection((_rank0_address(), port), timeout=60)
    line.sendall(json.dumps({"rank": ring.rank, "secret": secret}).encode())
    line.settimeout(None)

    def hold() -> None:
        try:
            line.recv(1)
        except OSError:
            pass
        time.sleep(5)  # rank 0 said stop just before it closed: let `follow` end with that first
        log.error("rank %d: rank 0's process ended; stopping", ring.rank)
        os._exit(1)

    threading.Thread(target=hold, name="mlxserve-lifeline", daemon=True).start()


# --- ops: what rank 0 tells the followers ----------------------------------------------------------------


@dataclass
class Load:
    model: str
    pipeline: bool
    max_sequences: int
    prompt_cache: bool


@dataclass
class Unload:
    model: str


@dataclass
class Insert:
    model: str
    uids: list[int]
    prompts: list[list[int]]
    max_tokens: list[int]
    history: list[list[int]]
    samplers: list[int | None]  # rank 0's shared sampler each one is (None: a sampler of its own)
    cache_key: str | None = None  # the prompt started from this cached prefix ...
    tokens: list[int] | None = None  # ... found for these prompt tokens


@dataclass
class Remove:
    model: str
    uids: list[int]


@dataclass
class Remember:
    model: str
    uid: int
    key: str
    entries: int  # how many entries rank 0's prompt cache kept after this insert


@dataclass
class Step:
    model: str


@dataclass
class PromptPass:
    model: str
    tokens: list[int]


@dataclass
class Report:
    pass


@dataclass
class Stop:
    pass


OPS = {cls.__name__: cls for cls in (Load, Unload, Insert, Remove, Remember, Step, PromptPass, Report, Stop)}


def encode(ops: list[object]) -> bytes:
    return json.dumps([[type(op).__name__, asdict(op)] for op in ops]).encode()


def decode(data: bytes) -> list[object]:
    return [OPS[name](**fields) for name, fields in json.loads(data)]


# --- loading a shard -----------------------------------------------------------------------------------------


def _check_shardable(model_id: str, path: Path, size: int, pipeline: bool) -> None:
    """Refuse, by name, what mlx-lm's model class cannot split this way across `size` ranks."""
    model, config = load_model(path, lazy=True, strict=False)
    architecture = config.get("model_type", type(model).__module__.rsplit(".", 1)[-1])
    if pipeline:
        if not (hasattr(model, "model") and hasattr(model.model, "pipeline")):
            raise DistributedLoadError(
                f"The model '{model_id}' ({architecture}) has no pipeline-parallel form in mlx-lm; serve it "
                "tensor-parallel (without --pipeline)")
        if not (path / "model.safetensors.index.json").is_file():
            raise DistributedLoadError(
                f"The model '{model_id}' has no model.safetensors.index.json, which pipeline-parallel loading reads "
                "to load each rank's layers; import or pull it again with this version")
        layers = len(model.model.layers)
        if layers < size:
            raise DistributedLoadError(f"The model '{model_id}' has {layers} layers, fewer than the {size} ranks")
        return
    if not hasattr(model, "shard"):
        raise DistributedLoadError(
            f"The model '{model_id}' ({architecture}) has no tensor-parallel form in mlx-lm"
            + ("; serve it with --pipeline" if hasattr(getattr(model, "model", None), "pipeline") else ""))
    # mlx-lm divides the heads by the rank count without checking; a remainder would give wrong answers.
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads", heads)
    for count, what in ((heads, "attention heads"), (kv_heads, "key-value heads")):
        if isinstance(count, int) and count % size:
            raise DistributedLoadError(
                f"The model '{model_id}' has {count} {what}, which do not divide among {size} ranks; serve it "
                "on a number of ranks that divides its head counts"
                + (", or with --pipeline" if hasattr(getattr(model, "model", None), "pipeline") else ""))


def load_shard(store: ModelStore, model_id: str, ring: Ring, pipeline: bool) -> TextModel:
    """This rank's shard of a text model; every rank calls it together. A failure on any rank fails
    the load on all of them, with that rank's reason (the ranks must agree on what is loaded)."""
    model = None
    error: str | None = None
    try:
        path = store.path(model_id)
        info = store.get(model_id)
        if info.kind != "text":
            raise DistributedLoadError(f"The model '{model_id}' is a {info.kind} model; only text models are "
                                       "served across ranks")
        _check_shardable(model_id, path, ring.size, pipeline)
    except Exception as exc:  # told to every rank below
        error = str(exc)
    if error is None:
        try:
            groups = {"pipeline_group": ring.group} if pipeline else {"tensor_group": ring.group}
            module, tokenizer, config = sharded_load(str(path), return_config=True, **groups)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            # sharded_load ends with this synchronisation; the ranks that got there wait for this one.
            mx.eval(mx.distributed.all_sum(mx.array(1.0), group=ring.group, stream=mx.cpu))
        else:
            try:
                optimize_for_cpu(module)
                model = text_model_from(model_id, path, module, tokenizer, config)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
    else:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=ring.group, stream=mx.cpu))
    verdicts = [json.loads(v) for v in ring.gather(json.dumps(error).encode())]
    failed = [(rank, why) for rank, why in enumerate(verdicts) if why is not None]
    if failed:
        rank, why = failed[0]
        raise DistributedLoadError(why if all(w == why for _, w in failed) else f"rank {rank}: {why}")
    assert model is not None
    return model


# --- rank 0 --------------------------------------------------------------------------------------------------


@dataclass
class _RankReport:
    rank: int
    host: str
    pid: int
    active_bytes: int
    models: list[str]


def _report(ring: Ring, models: list[str]) -> list[_RankReport]:
    mine = _RankReport(ring.rank, socket.gethostname(), os.getpid(), held_memory(), models)
    return [_RankReport(**json.loads(r)) for r in ring.gather(json.dumps(asdict(mine)).encode())]


@dataclass
class Leader:
    """Rank 0's side: records the batch's operations and sends them before each collective."""

    ring: Ring
    store: ModelStore
    pipeline: bool
    max_sequences: int
    prompt_cache: bool
    lost: RankLostError | None = None
    _pending: list[object] = field(default_factory=list)
    _sharded: set[str] = field(default_factory=set)
    _reports: list[_RankReport] = field(default_factory=list)
    _reported_at: float = 0.0
    _samplers: weakref.WeakValueDictionary = field(default_factory=weakref.WeakValueDictionary)
    _keys: Iterator[int] = field(default_factory=itertools.count)
    _dead: set[int] = field(default_factory=set)
    # Told when a follower's process ends (from its lifeline's thread): the scheduler fails what is in flight.
    on_lost: Any = None

    def rank_lost(self, rank: int) -> None:
        report = next((r for r in self._reports if r.rank == rank), None)
        where = f" ({report.host}, pid {report.pid})" if report else ""
        self._dead.add(rank)
        if self.lost is None:
            self.lost = RankLostError(
                f"Rank {rank}{where} of the {self.ring.size}-process group stopped; this server cannot generate "
                "until the group is restarted (`mlxserve launch` again, or the service restarts it)")
            log.critical("%s", self.lost)
        if self.on_lost is not None:
            self.on_lost(self.lost)

    def record(self, op: object) -> None:
        self._pending.append(op)

    def send(self, op: object) -> None:
        """Send what is pending and `op`, which every rank then runs together."""
        if self.lost is not None:
            raise self.lost
        self._pending.append(op)
        ops, self._pending = self._pending, []
        self.collective(lambda: self.ring.broadcast(encode(ops)))

    def collective(self, run: Any) -> Any:
        """Run a step that talks to the other ranks; a failure means the ring is gone for good."""
        try:
            return run()
        except RuntimeError as exc:
            if self.lost is None:
                self.lost = RankLostError(
                    f"A rank of the {self.ring.size}-process group stopped answering ({exc}); this server cannot "
                    "generate until it is restarted (`mlxserve launch` again, or the service restarts it)")
                log.critical("%s", self.lost)
            raise self.lost from exc

    def load(self, model_id: str) -> Any:
        """The manager's loader: text models on every rank, embedding models on this one only."""
        kind = self.store.get(model_id).kind
        if kind == "embeddings":
            return self.store.load(model_id)
        if kind != "text":
            raise DistributedLoadError(f"The model '{model_id}' is a {kind} model; a distributed server serves "
                                       "text and embedding models")
        self.send(Load(model_id, self.pipeline, self.max_sequences, self.prompt_cache))
        model = self.collective(lambda: load_shard(self.store, model_id, self.ring, self.pipeline))
        self._sharded.add(model_id)
        return model

    def unloaded(self, model_id: str) -> None:
        if model_id in self._sharded:
            self._sharded.discard(model_id)
            self.record(Unload(model_id))

    def sampler(self, sampler: Any, shared: bool) -> tuple[Any, int | None]:
        """`sampler` with rank 0's tokens sent to every rank, and the key followers mirror it by:
        one object for a shared sampler (mlx-lm samples a batch in one call only when its samplers are
        one object, and every rank must make the same calls). A wrapper lives as long as sequences hold
        it (the map is weak, so distinct temperatures from clients do not pile up); keys are never reused."""
        if not shared:
            return self.ring.sampler(sampler), None
        wrapper = self._samplers.get(id(sampler))  # alive: it holds `sampler`, so the id is still its own
        if wrapper is None:
            wrapper = self.ring.sampler(sampler)
            wrapper.key = next(self._keys)
            self._samplers[id(sampler)] = wrapper
        return wrapper, wrapper.key

    def tick(self, models: list[str]) -> None:
        """Every REPORT_SECONDS, busy or idle: each rank's memory, and proof that every rank is there."""
        now = time.monotonic()
        if now - self._reported_at >= REPORT_SECONDS:
            self._reported_at = now
            self.send(Report())
            self._reports = self.collective(lambda: _report(self.ring, models))

    def stop(self) -> None:
        if self.lost is None:
            try:
                self.send(Stop())
            except RankLostError:
                pass

    def ranks(self) -> list[RankInfo]:
        """Each rank as last reported; once the group broke, the ranks known dead (all but 0 if unknown) lost."""
        dead = self._dead or (set(range(1, self.ring.size)) if self.lost is not None else set())
        reports = {r.rank: r for r in self._reports}
        return [RankInfo(rank, rank not in dead, *((r.host, r.pid, r.active_bytes, r.models)
                                                   if (r := reports.get(rank)) else ("", 0, 0, [])))
                for rank in range(self.ring.size)]


# --- ranks 1 ... N-1 -----------------------------------------------------------------------------------------


class _Mirror:
    """A follower's copy of one of rank 0's runners: the same generator, fed the same operations."""

    def __init__(self, model: TextModel, op: Load, ring: Ring):
        self.model = model
        self.ring = ring
        self.generator = new_generator(model, op.max_sequences, ring.stream)
        # Unbounded here: rank 0 says how many entries its own cache kept after each insert, and both
        # evict in the same (insertion) order.
        self.prompt_cache = LRUPromptCache(1 << 62, 1 << 62) if op.prompt_cache else None
        self.uids: dict[int, int] = {}  # rank 0's uid -> this generator's
        self.samplers: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # as rank 0's: key -> stand-in
        self.finished: dict[int, Any] = {}  # rank 0's uid -> the response that finished it, until the next step

    def insert(self, op: Insert) -> None:
        caches = None
        if op.cache_key is not None:
            cache, rest = cached_prefix(self.prompt_cache, op.cache_key, op.tokens)
            if cache is None or rest != op.prompts[0]:
                raise RuntimeError("this rank's prompt cache no longer matches rank 0's")
            caches = [cache] + [copy.deepcopy(cache) for _ in op.prompts[1:]]
        samplers = [self.ring.sampler() if key is None else self._shared(key) for key in op.samplers]
        uids = self.generator.insert(op.prompts, max_tokens=op.max_tokens, caches=caches, all_tokens=op.history,
                                     samplers=samplers)
        self.uids.update(zip(op.uids, uids))

    def _shared(self, key: int) -> Any:
        stand_in = self.samplers.get(key)
        if stand_in is None:
            stand_in = self.samplers[key] = self.ring.sampler()
        return stand_in

    def remove(self, op: Remove) -> None:
        uids = [self.uids.pop(u) for u in op.uids if u in self.uids]
        if uids:
            self.generator.remove(uids)

    def step(self, op: Step) -> None:
        self.finished = {}
        _, responses = self.generator.next()
        own = {mine: theirs for theirs, mine in self.uids.items()}
        for r in responses:
            if r.finish_reason is not None and r.uid in own:
                self.finished[own[r.uid]] = r
                del self.uids[own[r.uid]]

    def remember(self, op: Remember) -> None:
        response = self.finished.pop(op.uid, None)
        if response is None or self.prompt_cache is None:
            raise RuntimeError("rank 0 kept a sequence this rank did not finish")
        mx.eval([c.state for c in response.prompt_cache])
        self.prompt_cache.insert_cache(op.key, list(response.all_tokens), response.prompt_cache)
        self.prompt_cache.trim_to(n_sequences=op.entries)

    def prompt_pass(self, op: PromptPass) -> None:
        with mx.stream(self.ring.stream):
            for logits in prompt_logits(self.model.model, op.tokens):
                mx.eval(logits)


_MIRRORED = {Insert: "insert", Remove: "remove", Remember: "remember", Step: "step", PromptPass: "prompt_pass"}


def follow(ring: Ring, store: ModelStore) -> int:
    """A follower's life: run rank 0's ops until it says stop (0) or the ring breaks (1)."""
    mirrors: dict[str, _Mirror] = {}
    hold_lifeline(ring)
    log.info("rank %d of %d: following rank 0", ring.rank, ring.size)
    while True:
        try:
            ops = decode(ring.broadcast())
        except RuntimeError as exc:
            log.error("rank %d: lost rank 0 (%s); stopping", ring.rank, exc)
            return 1
        for op in ops:
            if isinstance(op, Stop):
                log.info("rank %d: rank 0 stopped; stopping", ring.rank)
                return 0
            if isinstance(op, Report):
                _report(ring, sorted(mirrors))
            elif isinstance(op, Load):
                try:
                    mirrors[op.model] = _Mirror(load_shard(store, op.model, ring, op.pipeline), op, ring)
                    log.info("rank %d: loaded %s", ring.rank, op.model)
                except DistributedLoadError as exc:
                    log.error("rank %d: %s not loaded: %s", ring.rank, op.model, exc)
            elif isinstance(op, Unload):
                mirrors.pop(op.model, None)
                release_memory()
            else:  # an operation on one model's batch: the mirror's method of that name
                getattr(mirrors[op.model], _MIRRORED[type(op)])(op)
