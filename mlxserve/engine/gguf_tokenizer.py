"""A GGUF file's tokenizer as tokenizer.json and tokenizer_config.json, for mlx-lm.

The vocabulary, merges, token types and pre-tokenizer name are turned into a fast tokenizer by
transformers' own GGUF converters (byte-level BPE, SentencePiece with its per-model fixes, Unigram);
this module only feeds them the metadata (their own reader needs PyTorch, which mlxserve does not
install) and writes what mlx-lm reads: special tokens, whether to add BOS, the chat template, and
every id that ends a turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import pre_tokenizers, processors

from mlxserve.protocol import ConversionError


def _tokenizer_fields(metadata: dict[str, Any]) -> dict[str, Any]:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

    return {name: metadata[f"tokenizer.{key}"] for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
            if f"tokenizer.{key}" in metadata}


# Byte-level BPE files name the pre-tokenizer (the split before the merges) llama.cpp applies. Those
# transformers knows by name, the GPT-2 split itself, and two that split digits one by one first; any
# other would be cut with the GPT-2 split and tokenize differently without a word, so it is refused.
_GPT2_SPLIT = {"default", "gpt-2", "gpt2"}
_DIGITS_THEN_GPT2 = {"smollm", "starcoder"}


def _pre_tokenizer_fits(tokenizer: Any, pre: str) -> None:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    if pre in _DIGITS_THEN_GPT2:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                           tokenizer.pre_tokenizer])
    elif pre not in GGUF_PRE_TOKENIZER_SPLITS and pre not in _GPT2_SPLIT:
        known = sorted({*GGUF_PRE_TOKENIZER_SPLITS, *_GPT2_SPLIT, *_DIGITS_THEN_GPT2})
        raise ConversionError(f"the GGUF file's pre-tokenizer {pre!r} is not one this importer knows, so its text "
                              f"would be cut differently from llama.cpp's; known: {', '.join(known)}")


def _add_bos(metadata: dict[str, Any]) -> bool:
    # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
    return bool(metadata.get("tokenizer.ggml.add_bos_token", metadata.get("tokenizer.ggml.model") == "llama"))


def _stop_token_ids(metadata: dict[str, Any]) -> list[int]:
    """Every id the model declares as ending a turn or the sequence."""
    ids: list[int] = []
    for role in ("eos", "eot", "eom"):
        token_id = metadata.get(f"tokenizer.ggml.{role}_token_id")
        if token_id is not None and token_id not in ids:
            ids.append(int(token_id))
    return ids


@dataclass(frozen=True)
class TokenizerFiles:
    """A GGUF file's tokenizer, made before anything is written (a tokenizer it cannot rebuild stops the
    import first), and the token ids that belong in config.json."""

    tokenizer: Any  # tokenizers.Tokenizer
    tokenizer_config: dict[str, Any]
    config_ids: dict[str, Any]

    def write(self, out_dir: Path) -> None:
        self.tokenizer.save(str(out_dir / "tokenizer.json"))
        (out_dir / "tokenizer_config.json").write_text(json.dumps(self.tokenizer_config, indent=2))


def tokenizer_files(metadata: dict[str, Any], max_length: int) -> TokenizerFiles:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    fields = _tokenizer_fields(metadata)
    if "tokens" not in fields:
        raise ConversionError("the GGUF file has no tokenizer (tokenizer.ggml.tokens)")
    try:
        tokenizer, _ = convert_gguf_tokenizer(str(metadata.get("general.architecture")), fields)
    except (ValueError, KeyError) as exc:
        raise ConversionError(f"cannot rebuild the GGUF file's tokenizer: {exc}") from exc
    if fields.get("tokenizer_type") == "gpt2":
        _pre_tokenizer_fits(tokenizer, str(fields.get("pre_tokenizer_type", "default")))
    tokens = fields["tokens"]
    specials = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            specials[name] = tokens[token_id]
    add_bos = _add_bos(metadata) and "bos_token" in specials
    if add_bos:
        bos, bos_id = specials["bos_token"], int(metadata["tokenizer.ggml.bos_token_id"])
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    else:
        tokenizer.post_processor = None
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        **specials,
    }
    template = metadata.get("tokenizer.chat_template")
    if template:
        tokenizer_config["chat_template"] = template
    ids: dict[str, Any] = {"eos_token_id": _stop_token_ids(metadata)}
    if metadata.get("tokenizer.ggml.bos_token_id") is not None:
        ids["bos_token_id"] = int(metadata["tokenizer.ggml.bos_token_id"])
    return TokenizerFiles(tokenizer, tokenizer_config, ids)
