"""The engine thread: the one place where MLX runs.

Requests arrive as commands on a thread-safe queue; each loaded model has a
runner around mlx-lm's `BatchGenerator`, which does continuous batching (new
sequences join between decode steps, long prompts are prefilled in chunks).
The runner turns tokens into text events (detokenizing, stop strings, usage)
and hands them to the request's sink, which forwards them to the asyncio loop.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx_lm.generate import GenerationBatch
from mlx_lm.models.cache import LRUPromptCache, make_prompt_cache

from mlxserve.engine.batch import PREFILL_STEP, cached_prefix, new_generator, prompt_logits
from mlxserve.engine.channels import ChannelSplitter, Piece
from mlxserve.engine.detokenize import IncrementalDetokenizer
from mlxserve.engine.distributed import Insert, Leader, PromptPass, Remember, Remove, Step
from mlxserve.engine.kinds.embed import EmbeddingModel
from mlxserve.engine.kinds.text import EncodedPrompt, TextModel
from mlxserve.engine.logprobs import LogprobReporter
from mlxserve.engine.logs import LogHub
from mlxserve.engine.manager import ModelManager
from mlxserve.engine.sampling import greedy, is_shared, make_logits_processor, make_sampler
from mlxserve.engine.stops import StopMatcher
from mlxserve.engine.tools import ToolFormat, parse_calls
from mlxserve.protocol import (
    Accepted,
    ChoiceFinished,
    ContextLengthExceededError,
    EmbeddingRequest,
    EmbeddingResult,
    EngineUnavailableError,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    LoadedModel,
    MlxserveError,
    ModelBusyError,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
    Usage,
)

log = logging.getLogger("mlxserve.engine")

Sink = Callable[[object], None]

# Sequences per embedding forward pass. Between two passes the engine runs a
# decode step for every chat model, so a large request never stalls streams
# for longer than one batch.
EMBED_BATCH = 32


@dataclass
class _Request:
    id: int
    request: GenerationRequest
    sink: Sink
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    open_choices: int = 0


@dataclass
class _Choice:
    index: int
    owner: _Request
    detokenizer: IncrementalDetokenizer
    stops: StopMatcher
    reporter: LogprobReporter | None = None
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    uid: int = -1
    cacheable: bool = True  # its KV state may go to the prompt cache (not for image prompts)
    error: BaseException | None = None  # its sampler or logits processor failed; the step after ends it
    channels: ChannelSplitter | None = None  # splits thinking and tool calls from the answer
    tool_format: ToolFormat | None = None
    calls: int = 0  # tool calls sent so far
    sent_first: bool = False  # its first token went out as soon as it was computed (_send_first_tokens)


def _guarded(choice: _Choice, fn: Callable, fallback: Callable) -> Callable:
    """`fn` as one sequence's processor or sampler in the batched step: an exception it raises fails that
    sequence alone (noted on the choice, handled after the step) instead of the step of every sequence."""

    def run(*args):
        if choice.error is None:
            try:
                return fn(*args)
            except Exception as exc:
                choice.error = exc
        return fallback(*args)

    return run


def _unchanged(context: mx.array, logits: mx.array) -> mx.array:
    return logits


@dataclass
class _Submit:
    id: int
    request: GenerationRequest
    encoded: EncodedPrompt
    sink: Sink


@dataclass
class _Cancel:
    id: int


@dataclass
class _Embed:
    id: int
    request: EmbeddingRequest
    tokens: list[list[int]]  # tokenized off the engine thread
    sink: Sink


@dataclass
class _EmbedJob:
    """An embedding request cut into length-sorted batches, run one batch per engine-loop turn."""

    id: int
    request: EmbeddingRequest
    sink: Sink
    model: EmbeddingModel
    tokens: list[list[int]]
    batches: deque[list[int]]
    vectors: np.ndarray

    @classmethod
    def create(cls, command: _Embed, model: EmbeddingModel) -> _EmbedJob:
        req = command.request
        if req.dimensions is not None and req.dimensions > model.dimensions:
            raise InvalidRequestError(
                f"'dimensions' is {req.dimensions}, but the model '{model.name}' makes "
                f"{model.dimensions}-dimensional embeddings", param="dimensions")
        tokens = command.tokens
        order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))
        batches = deque(order[i : i + EMBED_BATCH] for i in range(0, len(order), EMBED_BATCH))
        vectors = np.zeros((len(tokens), model.dimensions), dtype=np.float32)
        return cls(command.id, req, command.sink, model, tokens, batches, vectors)

    def run_batch(self) -> bool:
        """Embed the next batch; True when the whole request is done (and its result sent)."""
        indices = self.batches.popleft()
        self.vectors[indices] = self.model.embed([self.tokens[i] for i in indices])
        if self.batches:
            return False
        vectors = self.vectors
        if self.request.dimensions is not None:
            vectors = vectors[:, : self.request.dimensions]
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        self.sink(EmbeddingResult(vectors, sum(len(t) for t in self.tokens)))
        return True


@dataclass
class _Call:
    """Run `fn` on the engine thread (load, unload, ps) and hand its result back."""

    fn: Callable[[], object]
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: BaseException | None = None


# Prompt-cache entries per model; the byte budget (a server setting) is the real bound.
PROMPT_CACHE_ENTRIES = 64


class _ModelRunner:
    """One loaded model's batch of running sequences, and its prompt (KV prefix) cache.

    The cache is mlx-lm's LRUPromptCache: a trie of token sequences whose finished KV caches are
    kept, bounded in bytes. A new prompt starts from the longest cached prefix of its own tokens
    (copied, trimmed to the common prefix), so entries are only ever reused for identical tokens.
    Image prompts are neither looked up nor stored: their placeholder tokens do not identify the image.
    """

    def __init__(self, model: TextModel, logs: LogHub, cache_bytes: int, max_sequences: int,
                 leader: Leader | None = None):
        self.model = model
        self.logs = logs
        self.max_sequences = max_sequences
        # On a distributed server, every operation on the generator and the prompt cache goes to the other ranks.
        self.leader = leader
        self.generator = new_generator(model, max_sequences, None if leader is None else leader.ring.stream)
        self.choices: dict[int, _Choice] = {}
        self.prompt_cache = LRUPromptCache(PROMPT_CACHE_ENTRIES, cache_bytes) if cache_bytes > 0 else None

    def _remove(self, uids: list[int]) -> None:
        self.generator.remove(uids)
        if self.leader is not None:
            self.leader.record(Remove(self.model.name, uids))

    def _sampler(self, choice: _Choice, temperature: float, seed: int | None) -> tuple[Callable, int | None]:
        """The choice's sampler, and (distributed) the key of the shared sampler the other ranks mirror."""
        sampler = make_sampler(temperature, seed)
        shared = is_shared(sampler)
        if not shared:
            sampler = _guarded(choice, sampler, greedy)
        return (sampler, None) if self.leader is None else self.leader.sampler(sampler, shared)

    @property
    def busy(self) -> bool:
        return bool(self.choices)

    def add(self, active: _Request, encoded: EncodedPrompt) -> None:
        """Check the tokenized prompt against the context, and queue every choice; raise before any prefill."""
        req = active.request
        model = self.model
        tokens = encoded.tokens
        room = model.context_length - len(tokens)
        if room <= 0:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {model.context_length} tokens, "
                f"but the prompt has {len(tokens)} tokens. Shorten the prompt.",
                param="messages" if req.messages is not None else "prompt",
            )
        if not tokens:  # an empty raw prompt: start from BOS, as llama.cpp does
            tokens = [model.start_token_id]
        embeddings = None if encoded.vision_inputs is None else model.vision.embed(encoded)
        unknown = [t for t in req.sampling.logit_bias if t >= model.vocab_size]
        if unknown:
            raise InvalidRequestError(
                f"'logit_bias' key '{unknown[0]}' is not a token id of this model "
                f"(its vocabulary has {model.vocab_size} tokens)", param="logit_bias")
        max_tokens = min(req.max_tokens or room, room)
        temperature = model.default_temperature if req.sampling.temperature is None else req.sampling.temperature
        active.prompt_tokens = len(tokens)
        active.open_choices = req.n
        reporter = None if req.logprobs is None else LogprobReporter(model.tokenizer, req.logprobs, temperature)
        plan = encoded.output
        splits = plan is not None and plan.splits
        choices = [
            _Choice(i, active, IncrementalDetokenizer(model.tokenizer, keep_special=splits), StopMatcher(req.stop),
                    reporter, cacheable=embeddings is None,
                    channels=ChannelSplitter(plan.thinking, plan.tools and (plan.tools.start, plan.tools.end),
                                             plan.reasoning_first) if splits else None,
                    tool_format=plan.tools if plan is not None else None)
            for i in range(req.n)
        ]
        constraints = []
        if plan is not None and plan.matcher is not None:
            first = model.grammars.constraint(plan.matcher, len(tokens))
            constraints = [first] + [first.copy() for _ in range(req.n - 1)]
        # Seeded choices of one request differ from each other but repeat across runs.
        seeds = [None if req.sampling.seed is None else req.sampling.seed + i for i in range(req.n)]
        if embeddings is not None:
            # Image prompts are prefilled from their embeddings here; the batch generator
            # continues from that cache with the last (text) token, as for a cached prefix.
            prompts, history = [tokens[-1:] for _ in choices], [tokens[:-1] for _ in choices]
            caches = [self._prefill(tokens[:-1], embeddings[:-1]) for _ in range(req.n)]
        else:
            cache, rest = cached_prefix(self.prompt_cache, self._cache_key(req.cache_scope), tokens)
            active.cached_tokens = len(tokens) - len(rest)
            # A list each: mlx-lm extends every sequence's token history in place, and one list shared by
            # the choices would grow once per choice (the penalties and the grammar read it).
            prompts, history = [list(rest) for _ in choices], [tokens[: active.cached_tokens] for _ in choices]
            caches = None if cache is None else [cache] + [copy.deepcopy(cache) for _ in range(req.n - 1)]
        processor = make_logits_processor(req.sampling, len(tokens))
        samplers = [self._sampler(c, temperature, s) for c, s in zip(choices, seeds)]
        uids = self.generator.insert(
            prompts,
            max_tokens=[max_tokens] * req.n,
            caches=caches,
            all_tokens=history,
            samplers=[sampler for sampler, _ in samplers],
            logits_processors=[
                # The grammar's mask comes first: penalties and truncation then act on the tokens it
                # allows, and the sampler's temperature on what they leave.
                [_guarded(c, f, _unchanged) for f in ([constraints[i]] if constraints else []) + [processor] if f]
                for i, c in enumerate(choices)],
        )
        if self.leader is not None:
            cached = caches is not None and embeddings is None
            self.leader.record(Insert(model.name, list(uids), prompts, [max_tokens] * req.n, history,
                                      [key for _, key in samplers], self._cache_key(req.cache_scope) if cached else None,
                                      tokens if cached else None))
        for uid, choice in zip(uids, choices):
            choice.uid = uid
            self.choices[uid] = choice
        active.sink(Accepted(prompt_tokens=len(tokens), system_fingerprint=model.system_fingerprint))
        if req.echo:
            for choice in choices:
                active.sink(TextDelta(choice.index, encoded.text, self._prompt_logprobs(tokens, req.logprobs)))
        log.debug("request %d to %s: %d prompt tokens (%d cached): %r", active.id, model.name, len(tokens),
                  active.cached_tokens, encoded.text)
        self.logs.publish({"type": "request", "id": active.id, "model": model.name,
                           "endpoint": "chat" if req.messages is not None else "completions",
                           "prompt": encoded.text, "prompt_tokens": len(tokens),
                           "cached_tokens": active.cached_tokens,
                           "images": sum(len(m.images) for m in req.messages or ()), "n": req.n})

    def _prompt_logprobs(self, tokens: list[int], top: int | None) -> tuple[TokenLogprob, ...]:
        """`echo` with `logprobs`: each prompt token's logprob given the tokens before it (the first
        token has none), from one more pass over the prompt, chunked like a prefill."""
        if top is None:
            return ()
        reporter = LogprobReporter(self.model.tokenizer, top)
        first = reporter.token_bytes(tokens[0])
        entries = [TokenLogprob(first.decode("utf-8", errors="replace"), tuple(first), None)]
        stream = mx.default_stream(mx.default_device())
        if self.leader is not None:
            self.leader.send(PromptPass(self.model.name, tokens))
            stream = self.leader.ring.stream
        start = 0
        with mx.stream(stream):
            for logits in prompt_logits(self.model.model, tokens):
                logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
                mx.eval(logprobs)
                entries += [reporter.report(logprobs[j], tokens[start + j + 1]) for j in range(logits.shape[0])]
                start += logits.shape[0]
        return tuple(entries)

    def _cache_key(self, scope: str) -> str:
        return f"{self.model.name}\x00{scope}"

    def _remember(self, choice: _Choice, response: GenerationBatch.Response) -> None:
        """Keep a finished sequence's KV cache for later prompts that share its tokens."""
        if self.prompt_cache is not None and choice.cacheable and response.prompt_cache is not None:
            # mlx-lm extracts the sequence's KV as a lazy slice of the whole batch's buffer: evaluated
            # now, the entry owns exactly the bytes the cache counts instead of keeping the batch alive.
            mx.eval([c.state for c in response.prompt_cache])
            key = self._cache_key(choice.owner.request.cache_scope)
            self.prompt_cache.insert_cache(key, list(response.all_tokens), response.prompt_cache)
            if self.leader is not None:
                self.leader.record(Remember(self.model.name, choice.uid, key, len(self.prompt_cache)))

    def _prefill(self, tokens: list[int], embeddings: mx.array) -> list:
        cache = make_prompt_cache(self.model.model)
        for start in range(0, len(tokens), PREFILL_STEP):
            end = start + PREFILL_STEP
            self.model.model(mx.array(tokens[start:end])[None], cache=cache,
                             input_embeddings=embeddings[None, start:end])
            mx.eval([c.state for c in cache])
        return cache

    def step(self) -> None:
        if self.leader is not None:
            self.leader.send(Step(self.model.name))
        prompts, responses = self.generator.next()
        for choice in [c for c in self.choices.values() if c.error is not None]:
            if choice.uid in self.choices:
                log.error("request %d failed in %s's batch: %r", choice.owner.id, self.model.name, choice.error)
                self._fail(choice.owner.id, choice.error)
        for r in responses:
            choice = self.choices.get(r.uid)
            if choice is None:
                continue
            if r.finish_reason is not None:
                self._remember(choice, r)
            if choice.sent_first:
                choice.sent_first = False
                if r.finish_reason is not None:
                    self._finish(choice, r.finish_reason)
                continue
            if r.finish_reason == "stop" and r.token in self.model.stop_token_ids:
                self._finish(choice, "stop")
                continue
            if not self._take(choice, r.token, r.logprobs) and r.finish_reason is not None:
                self._finish(choice, r.finish_reason)
        self._send_first_tokens([p.uid for p in prompts if p.end_of_prompt])

    def _take(self, choice: _Choice, token: int, logprobs: mx.array | None) -> bool:
        """Send a generated token's text; True when a stop string in it ended the choice."""
        choice.owner.completion_tokens += 1
        if choice.reporter is not None:
            choice.pending_logprobs.append(choice.reporter.report(logprobs, token))
        text, hit = choice.stops.feed(choice.detokenizer.add(token))
        if hit:
            self._remove([choice.uid])
            self._send(choice, text, cut=True, final=True)
            self._end(choice, "stop")
        else:
            self._send(choice, text)
        return hit

    def _send_first_tokens(self, uids: list[int]) -> None:
        """Send the first tokens of sequences that have just started generating, as soon as they are computed.

        mlx-lm's generator hands out a step's tokens only after it has queued the next step, and MLX lets a
        caller queue only a few tasks ahead of its stream, so the queueing waits for most of that next
        step: every reply's first token went out a decode step late (33-48 ms for SmolLM2 on a 2-core CPU).
        Waiting here for just this step's tokens sends them then; the generator's later response for the
        same token only finishes the choice. An end-of-sequence token is left to that response. Only when
        every sequence in the batch has just started (new replies on an idle model): with others decoding,
        the wait and the next step's build would hold their steps back (c8 greedy measured 5-9% slower).
        Not with followers (distributed): their steps mirror the generator's calls alone.
        """
        if not uids or self.leader is not None:  # most steps start no sequence
            return
        # mlx-lm 0.32's generation batch: `_next_tokens` holds a row per uid, in `uids` order. Another
        # version's (the pin allows patch releases) may not: then the tokens go out as before.
        batch = getattr(self.generator, "_generation_batch", None)
        if (not all(hasattr(batch, name) for name in ("uids", "_next_tokens", "_next_logprobs"))
                or batch._next_tokens is None or set(batch.uids) - set(uids)):
            return
        rows = {uid: row for row, uid in enumerate(batch.uids)}
        fresh = [c for c in (self.choices.get(uid) for uid in uids) if c is not None and c.error is None
                 and c.uid in rows]
        if not fresh:
            return
        mx.eval(batch._next_tokens, [batch._next_logprobs[rows[c.uid]] for c in fresh if c.reporter is not None])
        for choice in fresh:
            token = batch._next_tokens[rows[choice.uid]].item()
            if token not in self.model.stop_token_ids:
                choice.sent_first = True
                self._take(choice, token, batch._next_logprobs[rows[choice.uid]])

    def _send(self, choice: _Choice, text: str, cut: bool = False, final: bool = False) -> None:
        """Send `text` with the logprobs of the tokens it completes.

        After a stop string (`cut`), only tokens that fit inside the text sent are reported;
        the stop string's own tokens are not part of the answer.
        """
        logprobs = choice.pending_logprobs
        if cut:
            kept, length = [], 0
            for entry in logprobs:
                length += len(entry.token)
                if length > len(text):
                    break
                kept.append(entry)
            logprobs = kept
        if text and self.logs.active:
            self.logs.publish({"type": "output", "id": choice.owner.id, "model": self.model.name,
                               "index": choice.index, "text": text})
        if choice.channels is None:
            pieces = [Piece("normal", text)] if text else []
        else:
            pieces = choice.channels.feed(text) + (choice.channels.finish() if final else [])
        for piece in pieces:
            if piece.channel == "tool":
                calls = parse_calls(choice.tool_format, piece.text, choice.owner.request.tools)
                if calls is not None:
                    for call in calls:
                        choice.owner.sink(ToolCallDelta(choice.index, choice.calls, call))
                        choice.calls += 1
                    continue
                # Not a call after all (cut short, or malformed): the client sees what the model wrote.
                fmt = choice.tool_format
                piece = Piece("normal", fmt.start + piece.text + (fmt.end if not final else ""))
            choice.owner.sink(TextDelta(choice.index, piece.text, tuple(logprobs),
                                        reasoning=piece.channel == "reasoning"))
            logprobs = []
        if final and logprobs:
            choice.owner.sink(TextDelta(choice.index, "", tuple(logprobs)))
            logprobs = []
        choice.pending_logprobs = logprobs if not cut else []

    def _finish(self, choice: _Choice, reason: FinishReason) -> None:
        """Generation ended (length or end-of-sequence): release held-back text, then end the choice."""
        text, hit = choice.stops.feed(choice.detokenizer.flush())
        if not hit:
            text += choice.stops.flush()
        self._send(choice, text, cut=hit, final=True)
        self._end(choice, "stop" if hit else reason)

    def _end(self, choice: _Choice, reason: FinishReason) -> None:
        del self.choices[choice.uid]
        owner = choice.owner
        owner.sink(ChoiceFinished(choice.index, "tool_calls" if reason == "stop" and choice.calls else reason,
                                  choice.stops.matched))
        owner.open_choices -= 1
        if owner.open_choices == 0:
            owner.sink(Usage(owner.prompt_tokens, owner.completion_tokens, owner.cached_tokens))
            self.logs.publish({"type": "done", "id": owner.id, "model": self.model.name,
                               "prompt_tokens": owner.prompt_tokens, "cached_tokens": owner.cached_tokens,
                               "completion_tokens": owner.completion_tokens})

    def cancel(self, request_id: int) -> list[_Choice]:
        """Stop every choice of the request; returns them."""
        choices = [c for c in self.choices.values() if c.owner.id == request_id]
        if choices:
            self._remove([c.uid for c in choices])
            for choice in choices:
                del self.choices[choice.uid]
            log.debug("cancelled request %d (%d running choices)", request_id, len(choices))
        return choices

    def _fail(self, request_id: int, error: BaseException) -> None:
        """End one request with `error`; the rest of the batch goes on."""
        choices = self.cancel(request_id)
        if choices:
            choices[0].owner.sink(error)

    def fail_all(self, error: BaseException) -> None:
        """After an unexpected MLX failure: tell every request, start from a clean batch."""
        owners = {c.owner.id: c.owner for c in self.choices.values()}
        self.choices.clear()
        self.generator = new_generator(self.model, self.max_sequences)  # a single process: no leader here
        for owner in owners.values():
            owner.sink(error)


class Scheduler:
    # The idle loop wakes this often to unload models whose TTL ran out.
    IDLE_TICK = 0.5
    # How long `call` waits for the engine thread: a load may take minutes, a question should not.
    LOAD_TIMEOUT = 30 * 60
    CALL_TIMEOUT = 60

    def __init__(self, manager: ModelManager, logs: LogHub, prompt_cache_bytes: int, max_concurrent: int,
                 leader: Leader | None = None):
        self.manager = manager
        self.leader = leader  # rank 0 of a distributed server: the other ranks follow this thread's steps
        self.logs = logs
        self.prompt_cache_bytes = prompt_cache_bytes
        self.max_concurrent = max_concurrent
        # When the loop last began a turn; /health calls the engine stuck when this gets old.
        self.heartbeat = time.monotonic()
        # Why the engine thread stopped; once set, every request fails at once instead of waiting.
        self.failure: BaseException | None = None
        manager.on_unload = self._drop
        self._commands: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._runners: dict[str, _ModelRunner] = {}
        self._embed_jobs: deque[_EmbedJob] = deque()
        self._thread = threading.Thread(target=self._run, name="mlxserve-engine", daemon=True)

    # --- called from any thread ---------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._commands.put(None)
        self._thread.join(timeout=30)

    @property
    def stalled_seconds(self) -> float:
        """Since the loop last turned; a model load in progress is work, not a stall."""
        return 0.0 if self.manager.loading else time.monotonic() - self.heartbeat

    def _put(self, command: object) -> None:
        self._commands.put(command)
        if self.failure is not None:  # nobody will take it: fail it (and anything else left) now
            self._drain()

    def submit(self, request_id: int, request: GenerationRequest, encoded: EncodedPrompt, sink: Sink) -> None:
        self._put(_Submit(request_id, request, encoded, sink))

    def embed(self, request_id: int, request: EmbeddingRequest, tokens: list[list[int]], sink: Sink) -> None:
        self._put(_Embed(request_id, request, tokens, sink))

    def cancel(self, request_id: int) -> None:
        self._put(_Cancel(request_id))

    def call(self, fn: Callable[[], object], timeout: float = CALL_TIMEOUT) -> object:
        """Run `fn` on the engine thread and wait for its result (or its exception)."""
        call = _Call(fn)
        self._put(call)
        if not call.done.wait(timeout):
            raise EngineUnavailableError(f"The engine did not answer within {timeout:.0f} s; try again later "
                                         "(GET /health shows what it is doing)")
        if call.error is not None:
            raise call.error
        return call.result

    def model(self, model_id: str, ttl: float | None = None) -> object:
        """The loaded model (loading it if need be) for work that runs off the engine thread."""
        return self.manager.peek(model_id) or self.call(
            lambda: self.manager.acquire(model_id, ttl, self._busy), timeout=self.LOAD_TIMEOUT)

    def load(self, model_id: str, ttl: float | None = None) -> None:
        self.call(lambda: self.manager.acquire(model_id, ttl, self._busy) and None, timeout=self.LOAD_TIMEOUT)

    def unload(self, model_id: str) -> bool:
        def run() -> bool:
            if self._busy(model_id):
                raise ModelBusyError(f"The model '{model_id}' is serving {self._in_flight(model_id)} "
                                     "request(s); unload it when they finish")
            return self.manager.unload(model_id)
        return self.call(run)

    def loaded(self) -> list[LoadedModel]:
        return self.call(lambda: self.manager.snapshot(self._in_flight))

    def _unavailable(self) -> EngineUnavailableError:
        return EngineUnavailableError(
            f"The engine stopped ({self.failure!r}) and cannot serve requests; restart mlxserve "
            "(its log has the traceback)")

    def abort(self, failure: BaseException, told: Callable[[], BaseException] | None = None) -> None:
        """Record why the engine cannot go on, and fail everything in flight and after with `failure` (or
        what `told` makes of it). Safe from any thread: a distributed server that lost a rank calls it from
        the rank's lifeline while the engine thread may wait in a collective that never completes."""
        if self.failure is not None:
            return
        self.failure = failure
        error = failure if told is None else told()
        owners = {c.owner.id: c.owner for r in list(self._runners.values()) for c in list(r.choices.values())}
        for sink in [o.sink for o in owners.values()] + [j.sink for j in list(self._embed_jobs)]:
            sink(error)
        self._drain()

    def _drain(self) -> None:
        """After the engine thread died: fail every command still queued (safe from any thread)."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, (_Submit, _Embed)):
                command.sink(self._unavailable())
            elif isinstance(command, _Call):
                command.error = self._unavailable()
                command.done.set()

    # --- engine thread --------------------------------------------------------

    def _busy(self, model_id: str) -> bool:
        return self._in_flight(model_id) > 0

    def _in_flight(self, model_id: str) -> int:
        runner = self._runners.get(model_id)
        requests = {c.owner.id for c in runner.choices.values()} if runner else set()
        return len(requests) + sum(1 for j in self._embed_jobs if j.model.name == model_id)

    def _drop(self, model_id: str) -> None:
        self._runners.pop(model_id, None)
        if self.leader is not None:
            self.leader.unloaded(model_id)

    def _runner(self, model_id: str, ttl: float | None) -> _ModelRunner:
        model = self.manager.acquire(model_id, ttl, self._busy)
        if model_id not in self._runners:
            self._runners[model_id] = _ModelRunner(model, self.logs, self.prompt_cache_bytes, self.max_concurrent,
                                                   self.leader)
        return self._runners[model_id]

    def _handle(self, command: object) -> None:
        if isinstance(command, _Submit):
            active = _Request(command.id, command.request, command.sink)
            try:
                self._runner(command.request.model, command.request.ttl).add(active, command.encoded)
            except MlxserveError as exc:
                command.sink(exc)
        elif isinstance(command, _Embed):
            try:
                model = self.manager.acquire(command.request.model, command.request.ttl, self._busy)
                self._embed_jobs.append(_EmbedJob.create(command, model))
            except MlxserveError as exc:
                command.sink(exc)
                return
            inputs = command.request.inputs
            if self.logs.active:  # decoding token-id inputs for the log costs nothing when nobody follows
                self.logs.publish({"type": "request", "id": command.id, "model": model.name, "endpoint": "embeddings",
                                   "prompt": "\n".join(i if isinstance(i, str) else model.tokenizer.decode(list(i))
                                                       for i in inputs),
                                   "prompt_tokens": sum(len(t) for t in command.tokens), "cached_tokens": 0,
                                   "images": 0, "n": len(inputs)})
        elif isinstance(command, _Cancel):
            for runner in self._runners.values():
                runner.cancel(command.id)
            self._embed_jobs = deque(j for j in self._embed_jobs if j.id != command.id)
        elif isinstance(command, _Call):
            try:
                command.result = command.fn()
            except BaseException as exc:  # handed back to the waiting caller
                command.error = exc
            command.done.set()

    def _embed_step(self) -> None:
        """One batch of the oldest embedding job, then that job goes to the back (round robin)."""
        if not self._embed_jobs:
            return
        job = self._embed_jobs.popleft()
        try:
            if not job.run_batch():
                self._embed_jobs.append(job)
            else:
                self.logs.publish({"type": "done", "id": job.id, "model": job.model.name,
                                   "prompt_tokens": sum(len(t) for t in job.tokens), "cached_tokens": 0,
                                   "completion_tokens": 0})
        except Exception as exc:
            log.exception("embedding failed for %s", job.model.name)
            job.sink(exc)

    def _decode_step(self) -> None:
        """One decode step of every model with running sequences; a failed step fails that batch only."""
        for runner in list(self._runners.values()):
            if runner.busy:
                try:
                    runner.step()
                except Exception as exc:
                    if self.leader is not None:  # the other ranks' batches cannot be known: stop the engine
                        raise
                    log.exception("generation step failed for %s", runner.model.name)
                    runner.fail_all(exc)

    def _pending_commands(self, block: bool) -> list[object]:
        """Everything queued now; when idle, wait (a tick at most) for a command."""
        commands = []
        if block:
            try:
                commands.append(self._commands.get(timeout=self.IDLE_TICK))
            except queue.Empty:
                return commands
        while not self._commands.empty():
            commands.append(self._commands.get_nowait())
        return commands

    def _turn(self) -> bool:
        """One turn of the loop: commands, an embedding batch, a decode step, TTL expiry. False: stop."""
        self.heartbeat = time.monotonic()
        busy = bool(self._embed_jobs) or any(r.busy for r in self._runners.values())
        for command in self._pending_commands(block=not busy):
            if command is None:
                if self.leader is not None:
                    self.leader.stop()
                return False
            try:
                self._handle(command)
            except Exception as exc:
                log.exception("engine command failed")
                if isinstance(command, (_Submit, _Embed)):
                    command.sink(exc)
        if self.leader is not None and self.leader.lost is not None:
            raise self.leader.lost  # a command's collective found the group broken
        self._embed_step()
        self._decode_step()
        self.manager.expire(self._busy)
        if self.leader is not None:
            self.leader.tick(self.manager.loaded_ids())
        return True

    def _run(self) -> None:
        try:
            while self._turn():
                pass
        except BaseException as exc:
            # A bug outside the per-request guards: fail everything now, rather than let requests
            # wait on a thread that will never answer them.
            log.critical("the engine thread stopped", exc_info=True)
            self.abort(exc, self._unavailable)
