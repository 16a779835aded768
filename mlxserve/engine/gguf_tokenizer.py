"""A GGUF file's tokenizer as tokenizer.json and tokenizer_config.json, for mlx-lm.

The vocabulary, merges, token types and pre-tokenizer name are turned into a fast tokenizer by
transformers' own GGUF converters (byte-level BPE, SentencePiece with its per-model fixes, Unigram);
this module only feeds them the metadata (their own reader needs PyTorch, which mlxserve does not
install) and writes what mlx-lm reads: special tokens, whether to add BOS, the chat template, and
every id that ends a turn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import processors

from mlxserve.protocol import ConversionError


def _tokenizer_fields(metadata: dict[str, Any]) -> dict[str, Any]:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

    return {name: metadata[f"tokenizer.{key}"] for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
            if f"tokenizer.{key}" in metadata}


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


def write_tokenizer_files(metadata: dict[str, Any], out_dir: Path, max_length: int) -> dict[str, Any]:
    """Write tokenizer.json and tokenizer_config.json into `out_dir`; returns the token ids for config.json."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    fields = _tokenizer_fields(metadata)
    if "tokens" not in fields:
        raise ConversionError("the GGUF file has no tokenizer (tokenizer.ggml.tokens)")
    try:
        tokenizer, _ = convert_gguf_tokenizer(str(metadata.get("general.architecture")), fields)
    except (ValueError, KeyError) as exc:
        raise ConversionError(f"cannot rebuild the GGUF file's tokenizer: {exc}") from exc
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
    tokenizer.save(str(out_dir / "tokenizer.json"))

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
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))

    ids: dict[str, Any] = {"eos_token_id": _stop_token_ids(metadata)}
    if metadata.get("tokenizer.ggml.bos_token_id") is not None:
        ids["bos_token_id"] = int(metadata["tokenizer.ggml.bos_token_id"])
    return ids
