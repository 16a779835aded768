"""The typed seam between the HTTP layer and the engine.

Both sides import this module; it imports neither MLX nor Sanic. Requests go
in as dataclasses, results come back as events, and failures are raised as
the exceptions below, which the HTTP layer maps to OpenAI error objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union

# --- requests -----------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings. `None` means "the model's default"."""

    temperature: float | None = None
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None


@dataclass(frozen=True)
class ImagePart:
    """An image content part. `where` names it for errors ("messages[0].content[1]").

    The HTTP layer parses `url` and fills `data` (the encoded file, checked to be an image
    within the size limit) before the request reaches the engine.
    """

    url: str
    where: str
    data: bytes = b""


@dataclass(frozen=True)
class ToolCall:
    """A function call the assistant made: `arguments` is the JSON text of an object."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation: text and images, in the order the client sent them.

    An assistant turn may carry the calls it made; a `tool` turn answers the call `tool_call_id`.
    """

    role: str
    parts: tuple[str | ImagePart, ...]
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    @property
    def text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))

    @property
    def images(self) -> tuple[ImagePart, ...]:
        return tuple(p for p in self.parts if isinstance(p, ImagePart))


@dataclass(frozen=True)
class Tool:
    """A function the model may call; `parameters` is the JSON Schema of its arguments object."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})


@dataclass(frozen=True)
class OutputFormat:
    """`response_format`: free text, any JSON object, or JSON matching `schema` (enforced while decoding)."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    schema: dict[str, Any] | None = None
    name: str | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """A chat (messages) or raw completion (prompt) request for a text model."""

    model: str
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | tuple[int, ...] | None = None
    max_tokens: int | None = None
    ttl: float | None = None  # seconds the model may stay loaded while idle (LM Studio's `ttl`)
    stop: tuple[str, ...] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    # None: no logprobs; k >= 0: the chosen token's logprob plus the k most likely alternatives.
    logprobs: int | None = None
    # Requests share prompt-cache entries only within one scope (one API key), so that `cached_tokens`
    # cannot tell one client what another one's prompts begin with.
    cache_scope: str = ""
    response_format: OutputFormat = field(default_factory=OutputFormat)
    tools: tuple[Tool, ...] = ()
    # "none", "auto", "required", or the name of the one function the model must call.
    tool_choice: str = "auto"
    forced_tool: str | None = None
    parallel_tool_calls: bool = False
    echo: bool = False  # completions: the prompt comes back before the completion
    thinking: bool | None = None  # `reasoning_effort`: thinking on or off; None: the template's default


# --- events -------------------------------------------------------------------

FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True)
class Accepted:
    """The engine validated the request and queued it; prefill has not started."""

    prompt_tokens: int
    system_fingerprint: str


@dataclass(frozen=True)
class TopLogprob:
    token: str
    bytes: tuple[int, ...]
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token and its log-probability under the distribution it was sampled from."""

    token: str
    bytes: tuple[int, ...]
    logprob: float | None  # None only for an echoed prompt's first token, which nothing predicts
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """New text for choice `index`; never ends inside a UTF-8 character or a possible stop string.

    `logprobs` covers the tokens whose text this delta completes (empty unless asked for).
    """

    index: int
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    reasoning: bool = False  # the model's thinking (`reasoning_content`), not its answer


@dataclass(frozen=True)
class ToolCallDelta:
    """A complete tool call of choice `index`, the `position`-th of that choice."""

    index: int
    position: int
    call: ToolCall


@dataclass(frozen=True)
class ChoiceFinished:
    index: int
    reason: FinishReason
    stop_sequence: str | None = None  # the stop string that ended it, if one did


@dataclass(frozen=True)
class Usage:
    """Sent once, last: token counts over every choice of the request."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV state came from the prompt cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


Event = Union[TextDelta, ToolCallDelta, ChoiceFinished, Usage]


@dataclass(frozen=True)
class ModelInfo:
    """A model on disk, as listed by the store."""

    id: str
    created: int
    kind: str
    capabilities: tuple[str, ...]
    architecture: str
    quantization: str
    context_length: int | None
    size_bytes: int  # weights on disk
    owned_by: str = "mlxserve"


@dataclass(frozen=True)
class LoadedModel:
    """A model in memory, as `ps` shows it."""

    id: str
    kind: str
    memory_bytes: int
    ttl_seconds: float
    idle_seconds: float
    requests_in_flight: int
    loaded_at: float

    @property
    def expires_in_seconds(self) -> float:
        return max(0.0, self.ttl_seconds - self.idle_seconds) if self.requests_in_flight == 0 else self.ttl_seconds


@dataclass(frozen=True)
class Health:
    """What /health reports: whether the engine loop still turns, and how loaded the server is."""

    healthy: bool
    loop_stalled_seconds: float  # since the engine loop last completed a turn (0 while it loads a model)
    active_requests: int  # accepted and not finished (generating, or waiting for a slot)
    queue_depth: int  # waiting for a generation slot
    max_concurrent: int
    max_queue: int
    loading: str | None = None  # the model being loaded, which is not a stall
    error: str | None = None  # why the engine thread stopped, once it has
    compute: dict[str, Any] = field(default_factory=dict)  # engine/cpu.py's ComputePath: device, BLAS, shim
    ranks: list[RankInfo] | None = None  # a distributed server's processes; None for one process


@dataclass(frozen=True)
class RankInfo:
    """One process of a distributed server, as its last report (every second) had it."""

    rank: int
    alive: bool  # false once the group has lost a rank: no rank can generate until a restart
    host: str
    pid: int
    active_bytes: int  # MLX memory held by this rank's arrays (its shards, KV caches)
    models: list[str]  # the models this rank holds a shard of (rank 0: every loaded model)


@dataclass(frozen=True)
class MemoryUsage:
    """MLX's own accounting: what `ps` shows and what tests check after an unload."""

    active_bytes: int  # held by live arrays (weights, KV caches)
    cache_bytes: int  # freed buffers MLX keeps for reuse
    budget_bytes: int  # --max-memory


@dataclass(frozen=True)
class EmbeddingRequest:
    """Inputs are strings or token-id sequences; `dimensions` truncates and re-normalizes."""

    model: str
    inputs: tuple[str | tuple[int, ...], ...]
    dimensions: int | None = None
    ttl: float | None = None


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: Any  # numpy float32 array, one row per input, in input order
    prompt_tokens: int


# --- errors -------------------------------------------------------------------


class MlxserveError(Exception):
    """Base of every error a client can cause; the HTTP layer maps each to a 4xx."""

    param: str | None = None
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        if param is not None:
            self.param = param
        if code is not None:
            self.code = code


class InvalidRequestError(MlxserveError):
    """The request is well-formed JSON but asks for something invalid."""


class ModelNotFoundError(MlxserveError):
    param = "model"
    code = "model_not_found"


class WrongModelKindError(InvalidRequestError):
    """The model exists but is of another kind than the endpoint serves (chat vs embeddings)."""

    param = "model"
    code = "model_not_supported"


class ModelNotAllowedError(MlxserveError):
    """The server was started with a list of models it may load, and this one is not on it."""

    param = "model"
    code = "model_not_allowed"


class ModelBusyError(MlxserveError):
    """An explicit unload of a model that is still serving requests."""

    param = "model"
    code = "model_busy"


class InsufficientMemoryError(MlxserveError):
    """Loading the model would exceed the memory budget even after unloading idle models."""

    code = "insufficient_memory"


class ServerBusyError(MlxserveError):
    """Every generation slot is taken and the queue of waiting requests is full."""

    code = "server_busy"
    retry_after: int = 2  # seconds a client should wait before trying again


class EngineUnavailableError(MlxserveError):
    """The engine thread has stopped (or did not answer in time): nothing can be generated now."""

    code = "engine_unavailable"
    retry_after: int = 5


class ContextLengthExceededError(InvalidRequestError):
    param = "messages"
    code = "context_length_exceeded"


class ImageError(InvalidRequestError):
    """An image part that cannot be used: corrupt, not an image, too large, or not allowed."""

    code = "invalid_image"


class ConversionError(MlxserveError):
    """A model file cannot be converted into mlxserve's model format."""
