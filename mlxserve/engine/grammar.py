"""Constrained decoding with llguidance: a grammar becomes a per-sequence token mask in the batched step.

Why llguidance (measured on SmolLM2's 49,152-token vocabulary, 2-core x86, ARCHITECTURE.md has the
figures): a 10-property JSON Schema compiles in ~6 ms (outlines-core: 240-680 ms), a mask takes a
median 17-38 us (outlines-core 80-95 us), it takes Lark grammars (a tool call's syntax around its
arguments' schema), and mlx-vlm already depends on it. xgrammar needs torch.

A `Grammar` is compiled once per distinct grammar text (cached) off the engine thread; each sequence
gets a copy of its matcher, which `Constraint` advances with the tokens the batch generator samples.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from collections import OrderedDict
from typing import Any

import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlxserve.protocol import InvalidRequestError

GRAMMAR_CACHE_ENTRIES = 128

# JSON as a model should write it: no free whitespace between tokens, which would let a sampled
# model pad with spaces and newlines until it runs out of tokens.
_JSON_OPTIONS = {"whitespace_flexible": False}


def lark_json(schema: dict[str, Any]) -> str:
    """`schema` as an inline Lark rule body (for grammars that wrap JSON in other syntax)."""
    return "%json " + json.dumps({**schema, "x-guidance": _JSON_OPTIONS})


def lark_grammar(lark: str) -> str:
    return llguidance.LLMatcher.grammar_from_lark(lark)


class GrammarCompiler:
    """One model's grammar compiler: its tokenizer in llguidance's form, and a cache of compiled grammars.

    Thread-safe; used from the prepare pool. Building the tokenizer takes about a second for a 49k
    vocabulary, so it happens once, on the first constrained request.
    """

    def __init__(self, tokenizer: Any, stop_token_ids: frozenset[int]):
        self._hf = tokenizer
        self._eos = sorted(stop_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                hf = self._hf._tokenizer if isinstance(self._hf, TokenizerWrapper) else self._hf
                self._tokenizer = llguidance.hf.from_tokenizer(hf, eos_token=self._eos)
            return self._tokenizer

    def marker(self, text: str) -> str:
        """A model's marker (`<tool_call>`, `</think>`) as a Lark term: its token when it is one special
        token (which no text spells), else the literal text."""
        ids = self._hf.encode(text, add_special_tokens=False)
        if len(ids) == 1 and self._llg_tokenizer().is_special_token(ids[0]):
            return f"<[{ids[0]}]>"
        return json.dumps(text)

    def constraint(self, matcher: llguidance.LLMatcher, prompt_length: int) -> Constraint:
        """A sequence's constraint from a compiled matcher, starting after its prompt."""
        return Constraint(matcher, prompt_length, self._llg_tokenizer().vocab_size)

    def compile(self, grammar: str, param: str) -> llguidance.LLMatcher:
        """A fresh matcher for `grammar`; a grammar llguidance cannot build is a 400 naming `param`."""
        with self._lock:
            template = self._cache.get(grammar)
            if template is not None:
                self._cache.move_to_end(grammar)
                return template.deep_copy()
        # One compile: a grammar llguidance cannot build leaves the matcher in an error state that names why.
        template = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        template.compute_bitmask()  # the lexer's lazy work for the first step, here rather than on the engine thread
        if template.is_error():
            raise InvalidRequestError(f"'{param}' cannot be enforced: {_plain(template.get_error())}", param=param)
        with self._lock:
            self._cache[grammar] = template
            while len(self._cache) > GRAMMAR_CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return template.deep_copy()


def _plain(message: str) -> str:
    """llguidance's message without its grammar-position prefix, e.g. 'Unimplemented keys: ["not"]'."""
    return re.sub(r"^at \d+\(\d+\): (failed to compile JSON schema: )?", "", message.split("\n")[0].strip())


class Constraint:
    """One sequence's grammar state as a logits processor: (context, logits) -> masked logits.

    mlx-lm's batch generator calls it with the prompt plus every token sampled so far; the tokens the
    matcher has not seen yet are consumed first (reading them waits for the previous step, which the
    step would wait for anyway), then every token the grammar does not allow next gets -inf.
    Called on the engine thread only.
    """

    def __init__(self, matcher: llguidance.LLMatcher, prompt_length: int, vocab_size: int):
        self.matcher = matcher
        self._seen = prompt_length
        self._words = np.zeros((1, (vocab_size + 31) // 32), dtype=np.int32)

    def copy(self) -> Constraint:
        """The same state for another sequence of the request (`n` > 1)."""
        twin = copy.copy(self)
        twin.matcher = self.matcher.deep_copy()
        twin._words = self._words.copy()
        return twin

    def __call__(self, context: mx.array, logits: mx.array) -> mx.array:
        if context.size > self._seen:
            new = context[self._seen:].tolist()
            self._seen = context.size
            for token in new:
                # The batch generator computes one step ahead: after the grammar ended (its end-of-sequence
                # token sampled), this sequence may run once more before it is retired.
                if self.matcher.is_stopped():
                    break
                if not self.matcher.consume_token(token):
                    raise RuntimeError(f"the grammar rejected a sampled token: {self.matcher.get_error()}")
        self.matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        allowed = np.unpackbits(self._words.view(np.uint8), bitorder="little")
        width = logits.shape[-1]
        if allowed.size < width:
            allowed = np.pad(allowed, (0, width - allowed.size))
        return mx.where(mx.array(allowed[:width].astype(np.bool_))[None, :], logits, float("-inf"))
