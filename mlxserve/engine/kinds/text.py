"""Text-generation models: mlx-lm model code and tokenizer, plus what serving needs from their config."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from jinja2 import TemplateError
from mlx_lm import load as mlx_lm_load
from mlx_lm import __version__ as mlx_lm_version
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlxserve import __version__
from mlxserve.engine.cpu import optimize_for_cpu
from mlxserve.engine.grammar import GrammarCompiler, lark_grammar, lark_json
from mlxserve.engine.tools import (
    GRAMMARS,
    ToolFormat,
    forced_call_grammar,
    template_turns,
    tool_format,
    tool_schemas,
    with_instructions,
)
from mlxserve.protocol import (
    ChatMessage,
    ContextLengthExceededError,
    GenerationRequest,
    InvalidRequestError,
    OutputFormat,
)


def check_token_ids(ids: tuple[int, ...] | list[int], vocab_size: int, param: str) -> None:
    """Token ids from a client index the model's embedding table: one past its end reads foreign memory."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(
            f"'{param}' holds the token id {bad}, which is not in this model's vocabulary "
            f"(ids 0 to {vocab_size - 1})", param=param)


def longest_token_bytes(tokenizer: Any) -> int:
    """An upper bound of the bytes of text one token stands for: its vocabulary entry's UTF-8 length.

    A vocabulary entry is never shorter than the text it decodes to (byte-level BPE spells each byte
    as one character, SentencePiece spells a space as the 3-byte '▁' and a byte as '<0xAB>').
    """
    return max((len(t.encode("utf-8", "surrogatepass")) for t in tokenizer.get_vocab()), default=1)


@dataclass
class EncodedPrompt:
    """What the model receives: `text` as the log shows it (images as placeholders), and its tokens.

    Made off the engine thread (templating, tokenizing and decoding images cost time that grows with
    the request); `vision_inputs` holds the processor's pixel arrays, which the engine thread turns
    into input embeddings.
    """

    text: str
    tokens: list[int]
    vision_inputs: dict[str, Any] | None = None  # numpy arrays, set for prompts with images
    output: OutputPlan | None = None


@dataclass
class OutputPlan:
    """How a chat answer is read and constrained: the grammar its tokens must follow (a compiled
    llguidance matcher), the think markers (and whether the prompt already opened thinking), and the
    tool-call format to parse calls with."""

    matcher: Any = None
    thinking: tuple[str, str] | None = None
    reasoning_first: bool = False
    tools: ToolFormat | None = None

    @property
    def splits(self) -> bool:
        return self.thinking is not None or self.tools is not None


@dataclass
class TextModel:
    name: str
    model: nn.Module
    tokenizer: TokenizerWrapper
    context_length: int
    stop_token_ids: frozenset[int]
    default_temperature: float
    vocab_size: int
    system_fingerprint: str
    vision: Any = None  # a VisionTower (kinds/vision.py) for models that accept images
    longest_token_bytes: int = 64  # an upper bound of the text bytes one token stands for
    grammars: GrammarCompiler = None  # type: ignore[assignment]  # set by text_model_from

    @property
    def max_prompt_bytes(self) -> int:
        """A prompt text longer than this cannot fit the context, whatever its tokens: refused untokenized."""
        return self.context_length * self.longest_token_bytes

    @property
    def start_token_id(self) -> int:
        """What an empty prompt starts from: BOS, else the end-of-sequence token."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else min(self.stop_token_ids)

    def render_chat(self, messages: tuple[ChatMessage, ...], request: GenerationRequest | None = None) -> str:
        """The exact prompt text the model sees: its chat template applied (with the request's tools,
        in the template or, for templates without tools, in a system message), generation prompt added."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(
                f"The model '{self.name}' has no chat template; use /v1/completions with a raw prompt",
                param="messages",
            )
        fmt = self.tool_format if request is not None and (
            request.tools or any(m.tool_calls or m.role == "tool" for m in messages)) else None
        turns = template_turns(messages, fmt)
        extra: dict[str, Any] = {}
        if request is not None and request.thinking is not None:
            if self.thinking is None and request.thinking:
                raise InvalidRequestError(f"'reasoning_effort' is for models that think; '{self.name}' does not",
                                          param="reasoning_effort")
            if self.thinking is not None:
                extra["enable_thinking"] = request.thinking
        if fmt is not None and request.tools and request.tool_choice != "none":
            if fmt.native:
                extra["tools"] = tool_schemas(request.tools)
            else:
                turns = with_instructions(turns, request.tools)
        try:
            return self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False, **extra)
        except (TemplateError, ValueError) as exc:  # transformers raises ValueError for what no template can take
            raise InvalidRequestError(
                f"The model's chat template rejected these messages: {exc}", param="messages"
            ) from exc

    def _check_size(self, text: str, param: str) -> None:
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > self.max_prompt_bytes:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {self.context_length} tokens, and the prompt "
                f"({size} bytes) is longer than any prompt of that many tokens can be. Shorten the prompt.",
                param=param)

    @property
    def tool_format(self) -> ToolFormat:
        return tool_format(self.tokenizer)

    @property
    def thinking(self) -> tuple[str, str] | None:
        tok = self.tokenizer
        return (tok.think_start, tok.think_end) if getattr(tok, "has_thinking", False) else None

    def encode(self, request: GenerationRequest) -> EncodedPrompt:
        """The request's prompt as the model will see it, and how its output is constrained and read;
        thread-safe, and never on the engine thread (templating, tokenizing and compiling a grammar
        cost time that grows with the request)."""
        if request.messages is not None:
            self._check_size("".join(m.text for m in request.messages), "messages")
            encoded = self.encode_chat(request.messages, request)
            encoded.output = self._chat_output(request, encoded.text)
            return encoded
        if isinstance(request.prompt, str):
            self._check_size(request.prompt, "prompt")
        encoded = self.encode_prompt(request.prompt)
        answer = _answer_grammar(request.response_format)
        if answer is not None:
            encoded.output = OutputPlan(matcher=self._compile(f"start: answer\nanswer: {answer}", "response_format"))
        return encoded

    def _chat_output(self, request: GenerationRequest, prompt: str) -> OutputPlan:
        thinking = self.thinking
        reasoning_first = thinking is not None and prompt.rfind(thinking[0]) > prompt.rfind(thinking[1])
        calls = request.tools and request.tool_choice != "none"
        fmt = self.tool_format if calls else None
        plan = OutputPlan(thinking=thinking, reasoning_first=reasoning_first, tools=fmt)
        rules = []
        answer = _answer_grammar(request.response_format)
        if fmt is not None and (request.tool_choice == "required" or answer is not None):
            tools = request.tools
            if request.forced_tool is not None:
                tools = tuple(t for t in tools if t.name == request.forced_tool)
            if request.tool_choice == "required" or fmt.name in GRAMMARS:
                rules.append(forced_call_grammar(fmt, tools, request.parallel_tool_calls,
                                                 self.grammars.marker).replace("start:", "calls:", 1))
            else:
                raise InvalidRequestError(
                    f"'response_format' cannot be combined with tools for this model: its tool-call format "
                    f"({fmt.name}) has no grammar here; send 'tool_choice': 'none' or leave out "
                    "'response_format'", param="response_format")
        if request.tool_choice == "required" and fmt is not None:
            body = "calls"
        elif answer is not None:
            body = "answer" + (" | calls" if rules else "")
            rules.append(f"answer: {answer}")
        else:
            return plan
        if reasoning_first:
            # Constraints apply to the answer: the thinking is free text up to the model's end marker.
            end = self.grammars.marker(thinking[1])
            rules.append(f"think: /(?s:.*)/ {end}" if end.startswith("<[")
                         else f"think[suffix={end}]: /(?s:.*)/")
            body = f"think ({body})"
        param = "tool_choice" if body.endswith("calls") and answer is None else "response_format"
        plan.matcher = self._compile("\n".join([f"start: {body}"] + rules), param)
        return plan

    def _compile(self, lark: str, param: str) -> Any:
        return self.grammars.compile(lark_grammar(lark), param)

    def encode_chat(self, messages: tuple[ChatMessage, ...], request: GenerationRequest | None = None
                    ) -> EncodedPrompt:
        """The templated prompt, its token ids, and the processor's image inputs when the messages hold images."""
        if self.vision is not None:  # its template expects content parts, images or not
            if request is not None and request.tools:
                raise InvalidRequestError("'tools' are not supported for vision models yet; leave them out "
                                          "or use a text model", param="tools")
            return self.vision.encode(messages, self.name)
        text = self.render_chat(messages, request)
        # The rendered template already holds any BOS it wants; adding special
        # tokens again would double it.
        return EncodedPrompt(text, self.tokenizer.encode(text, add_special_tokens=False))

    def encode_prompt(self, prompt: str | tuple[int, ...]) -> EncodedPrompt:
        if isinstance(prompt, tuple):
            check_token_ids(prompt, self.vocab_size, "prompt")
            return EncodedPrompt(self.tokenizer.decode(list(prompt)), list(prompt))
        return EncodedPrompt(prompt, self.tokenizer.encode(prompt, add_special_tokens=True))


def _answer_grammar(fmt: OutputFormat) -> str | None:
    """The Lark rule body of an answer in `response_format`; None for free text."""
    if fmt.type == "json_object":
        return lark_json({"type": "object"})
    if fmt.type == "json_schema":
        return lark_json(fmt.schema if fmt.schema is not None else {})
    return None


def _generation_config(path: Path) -> dict[str, Any]:
    file = path / "generation_config.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def load_text_model(name: str, path: Path) -> TextModel:
    """Load weights and tokenizer; runs on the engine thread (it evaluates MLX arrays)."""
    model, tokenizer, config = mlx_lm_load(str(path), return_config=True)
    optimize_for_cpu(model)
    return text_model_from(name, path, model, tokenizer, config)


def text_model_from(name: str, path: Path, model: nn.Module, tokenizer: TokenizerWrapper,
                    config: dict[str, Any], vision: Any = None) -> TextModel:
    """The serving record for a loaded language model and its tokenizer."""
    generation = _generation_config(path)
    stop_ids = set(tokenizer.eos_token_ids)
    eos = generation.get("eos_token_id")
    stop_ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    context = config.get("max_position_embeddings") or getattr(tokenizer, "model_max_length", 4096)
    return TextModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        context_length=int(context),
        stop_token_ids=frozenset(stop_ids),
        default_temperature=float(generation.get("temperature", 1.0)),
        # Ids past the tokenizer's vocabulary decode to nothing, and past the embedding table read foreign memory.
        vocab_size=min(int(config.get("vocab_size") or len(tokenizer)), len(tokenizer)),
        system_fingerprint=_fingerprint(name),
        vision=vision,
        longest_token_bytes=longest_token_bytes(tokenizer),
        grammars=GrammarCompiler(tokenizer, frozenset(stop_ids)),
    )


def _fingerprint(name: str) -> str:
    """Changes when anything that can change outputs for a seed changes: versions, device, model."""
    identity = f"mlxserve {__version__} mlx {mx.__version__} mlx-lm {mlx_lm_version} {mx.default_device()} {name}"
    return "fp_" + hashlib.sha256(identity.encode()).hexdigest()[:12]
