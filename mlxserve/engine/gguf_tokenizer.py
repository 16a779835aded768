"""Rebuild a Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) from GGUF metadata.

GGUF files carry the vocabulary, merges, token types, special token ids and
chat template; the `tokenizers` library turns those back into the fast
tokenizer that mlx-lm loads through transformers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from mlxserve.protocol import ConversionError

if TYPE_CHECKING:
    from mlxserve.engine.gguf import GGUFModel

# llama.cpp's token types (llama_token_type).
_CONTROL = 3
_USER_DEFINED = 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_pre() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), _gpt2_pre()]
    )


def _llama3_pre() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# `tokenizer.ggml.pre` names (llama.cpp's pre-tokenizer types) to HF pre-tokenizers.
PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "default": _gpt2_pre,
    "gpt-2": _gpt2_pre,
    "smollm": _digits_then_gpt2_pre,
    "starcoder": _digits_then_gpt2_pre,
    "llama-bpe": _llama3_pre,
    "llama3": _llama3_pre,
}


def _bpe_tokenizer(gguf: GGUFModel) -> Tokenizer:
    tokens: list[str] = gguf.metadata["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in gguf.metadata.get("tokenizer.ggml.merges", [])]
    pre = gguf.scalar("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ConversionError(
            f"GGUF pre-tokenizer {pre!r} is not supported; "
            f"supported: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _special_token_names(gguf: GGUFModel) -> dict[str, str]:
    tokens = gguf.metadata["tokenizer.ggml.tokens"]
    names = {}
    for role in ("bos", "eos", "unknown", "padding"):
        token_id = gguf.scalar(f"tokenizer.ggml.{role}_token_id")
        if token_id is not None:
            key = {"unknown": "unk", "padding": "pad"}.get(role, role)
            names[f"{key}_token"] = tokens[token_id]
    return names


def _stop_token_ids(gguf: GGUFModel) -> list[int]:
    """Every id the model declares as ending a turn or the sequence."""
    ids = []
    for role in ("eos", "eot", "eom"):
        token_id = gguf.scalar(f"tokenizer.ggml.{role}_token_id")
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    return ids


def write_tokenizer_files(gguf: GGUFModel, out_dir: Path) -> dict[str, Any]:
    """Write tokenizer.json and tokenizer_config.json into `out_dir`.

    Returns the special-token ids that belong in the model's config.json.
    """
    model = gguf.scalar("tokenizer.ggml.model")
    if model != "gpt2":
        raise ConversionError(
            f"GGUF tokenizer model {model!r} is not supported; supported: 'gpt2' (byte-level BPE)"
        )
    tokenizer = _bpe_tokenizer(gguf)
    tokens: list[str] = gguf.metadata["tokenizer.ggml.tokens"]
    types = gguf.metadata.get("tokenizer.ggml.token_type")
    type_list = types.tolist() if types is not None else []
    added = [
        AddedToken(tokens[i], special=(t == _CONTROL), normalized=False)
        for i, t in enumerate(type_list)
        if t in (_CONTROL, _USER_DEFINED)
    ]
    tokenizer.add_tokens(added)

    specials = _special_token_names(gguf)
    add_bos = bool(gguf.scalar("tokenizer.ggml.add_bos_token", False))
    if add_bos and "bos_token" in specials:
        bos = specials["bos_token"]
        bos_id = gguf.scalar("tokenizer.ggml.bos_token_id")
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    tokenizer.save(str(out_dir / "tokenizer.json"))

    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": gguf.scalar("llama.context_length", 4096),
        **specials,
    }
    template = gguf.metadata.get("tokenizer.chat_template")
    if template:
        tokenizer_config["chat_template"] = template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))

    ids: dict[str, Any] = {"eos_token_id": _stop_token_ids(gguf)}
    bos_id = gguf.scalar("tokenizer.ggml.bos_token_id")
    if bos_id is not None:
        ids["bos_token_id"] = bos_id
    return ids
