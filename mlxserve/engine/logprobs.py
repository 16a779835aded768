"""Per-token log-probabilities in the shape OpenAI reports them (token text, raw bytes, top alternatives)."""

from __future__ import annotations

import re
from functools import lru_cache

import mlx.core as mx
from mlx_lm.tokenizer_utils import _byte_decoder

from mlxserve.engine.sampling import at_temperature
from mlxserve.protocol import TokenLogprob, TopLogprob

_SPM_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class LogprobReporter:
    """Reads logprobs for one model's tokenizer; `top` is how many alternatives to list."""

    def __init__(self, tokenizer, top: int, temperature: float = 1.0):
        self._tokenizer = tokenizer
        self._top = top
        self._temperature = temperature  # the sampler's: reported logprobs are what it drew from
        self._byte_decoder = _byte_decoder()
        self.token_bytes = lru_cache(maxsize=65536)(self._token_bytes)

    def _token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for, even when they are only part of a UTF-8 character."""
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if all(c in self._byte_decoder for c in piece):  # byte-level BPE
                return bytes(self._byte_decoder[c] for c in piece)
            if match := _SPM_BYTE.match(piece):  # SentencePiece byte fallback
                return bytes([int(match.group(1), 16)])
        return self._tokenizer.decode([token_id]).encode("utf-8")

    def _entry(self, token_id: int, logprob: float) -> TopLogprob:
        raw = self.token_bytes(token_id)
        return TopLogprob(raw.decode("utf-8", errors="replace"), tuple(raw), logprob)

    def report(self, logprobs: mx.array, token_id: int) -> TokenLogprob:
        """`logprobs`: the (vocab,) log-softmax of the processed logits, before the temperature."""
        logprobs = at_temperature(logprobs, self._temperature)
        chosen = self._entry(token_id, logprobs[token_id].item())
        top: tuple[TopLogprob, ...] = ()
        if self._top:
            ids = mx.argpartition(-logprobs, self._top - 1)[: self._top]
            values = logprobs[ids].tolist()
            pairs = sorted(zip(ids.tolist(), values), key=lambda p: -p[1])
            top = tuple(self._entry(i, v) for i, v in pairs)
        return TokenLogprob(chosen.token, chosen.bytes, chosen.logprob, top)
