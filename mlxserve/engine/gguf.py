"""Convert a GGUF file (llama.cpp's format) into an mlx-lm model directory.

`mx.load` reads GGUF natively, including Q4_0, Q4_1 and Q8_0 tensors, which it
returns as MLX affine-quantized triples (weight, scales, biases) with group
size 32. The conversion therefore keeps the quantized weights bit for bit; it
only renames tensors, undoes llama.cpp's rotary permutation of the query and
key rows, and writes the config and tokenizer files mlx-lm expects.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxserve.engine.gguf_tokenizer import write_tokenizer_files
from mlxserve.engine.install import installing
from mlxserve.protocol import ConversionError

GROUP_SIZE = 32

ProgressFn = Callable[[int, int], None]

# GGUF tensor-name stems to mlx-lm module paths, per architecture. A new
# architecture is one more entry here plus its config builder below.
_LLAMA_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
_LLAMA_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# Tensor types that `mx.load` turns into MLX arrays without loss (quantized ones
# as affine triples). It also reads BF16, but as float16, which can overflow.
SUPPORTED_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")


@dataclass(frozen=True)
class GGUFModel:
    """What a GGUF file holds once read: tensors and metadata."""

    tensors: dict[str, mx.array]
    metadata: dict[str, Any]

    def scalar(self, key: str, default: Any = None) -> Any:
        value = self.metadata.get(key, default)
        if isinstance(value, mx.array):
            return value.item()
        return value


def check_tensor_types(path: Path) -> None:
    """Refuse a file with tensor types mlxserve cannot import, naming them.

    Read from the header with gguf-py (llama.cpp's own reader, memory-mapped), because
    `mx.load` only says that a conversion failed.
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise ConversionError(f"{path.name} is not a readable GGUF file: {exc}") from exc
    unsupported: dict[str, list[str]] = {}
    for tensor in reader.tensors:
        if tensor.tensor_type.name not in SUPPORTED_TYPES:
            unsupported.setdefault(tensor.tensor_type.name, []).append(tensor.name)
    if unsupported:
        found = "; ".join(f"{t} ({len(names)} tensors, e.g. {names[0]})" for t, names in unsupported.items())
        raise ConversionError(
            f"{path.name} has tensor types mlxserve cannot import: {found}. Supported: "
            f"{', '.join(SUPPORTED_TYPES)}; use a GGUF quantized to one of those (e.g. Q4_0, Q8_0), "
            "or an MLX model from the Hugging Face Hub (`mlxserve pull`).")


def read_gguf(path: Path) -> GGUFModel:
    check_tensor_types(path)
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as exc:
        raise ConversionError(f"cannot read {path.name}: {exc}") from exc
    return GGUFModel(tensors, metadata)


def _unpermute_rows(array: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's interleaving of the rotary halves in Q/K output rows.

    llama.cpp stores each head's rows as (pairs, 2) so that its RoPE can rotate
    adjacent elements; mlx-lm's llama uses the Hugging Face layout of two halves.
    Rows are output features, and quantization groups run along the input
    features, so permuting rows of weight, scales and biases is exact.
    """
    rows = array.shape[0]
    rest = array.shape[1:]
    head_rows = rows // n_heads
    return (
        array.reshape(n_heads, head_rows // 2, 2, *rest)
        .swapaxes(1, 2)
        .reshape(rows, *rest)
    )


def _llama_config(gguf: GGUFModel) -> dict[str, Any]:
    arch = "llama"
    hidden = gguf.scalar(f"{arch}.embedding_length")
    n_heads = gguf.scalar(f"{arch}.attention.head_count")
    vocab = gguf.scalar(f"{arch}.vocab_size") or len(gguf.metadata["tokenizer.ggml.tokens"])
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": gguf.scalar(f"{arch}.feed_forward_length"),
        "num_hidden_layers": gguf.scalar(f"{arch}.block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": gguf.scalar(f"{arch}.attention.head_count_kv", n_heads),
        # GGUF stores float32; round away the float32 noise (1e-5, not 9.99e-06).
        "rms_norm_eps": float(f'{gguf.scalar(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5):.6g}'),
        "rope_theta": gguf.scalar(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": gguf.scalar(f"{arch}.context_length", 4096),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
    }
    head_dim = gguf.scalar(f"{arch}.attention.key_length")
    if head_dim and head_dim != hidden // n_heads:
        config["head_dim"] = head_dim
    return config


def _llama_name(gguf_name: str) -> str:
    stem, _, suffix = gguf_name.rpartition(".")
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        if part not in _LLAMA_LAYER_NAMES:
            raise ConversionError(f"unexpected tensor {gguf_name!r} in a llama GGUF")
        return f"model.layers.{layer}.{_LLAMA_LAYER_NAMES[part]}.{suffix}"
    if stem not in _LLAMA_GLOBAL_NAMES:
        raise ConversionError(f"unexpected tensor {gguf_name!r} in a llama GGUF")
    return f"{_LLAMA_GLOBAL_NAMES[stem]}.{suffix}"


@dataclass(frozen=True)
class _Architecture:
    config: Callable[[GGUFModel], dict[str, Any]]
    tensor_name: Callable[[str], str]


ARCHITECTURES: dict[str, _Architecture] = {
    "llama": _Architecture(config=_llama_config, tensor_name=_llama_name),
}


def _convert_tensors(
    gguf: GGUFModel, arch: _Architecture, config: dict[str, Any], progress: ProgressFn | None
) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """Rename tensors, un-permute Q/K rows, and describe per-module quantization."""
    heads = {
        "self_attn.q_proj": config["num_attention_heads"],
        "self_attn.k_proj": config["num_key_value_heads"],
    }
    weights: dict[str, mx.array] = {}
    quantization: dict[str, Any] = {}
    names = sorted(gguf.tensors)
    for done, gguf_name in enumerate(names, start=1):
        name = arch.tensor_name(gguf_name)
        array = gguf.tensors[gguf_name]
        module = name.rpartition(".")[0]
        for proj, n_heads in heads.items():
            if module.endswith(proj):
                array = _unpermute_rows(array, n_heads)
        if name.endswith(".weight") and array.dtype == mx.uint32:
            scales = gguf.tensors[gguf_name.replace(".weight", ".scales")]
            in_features = scales.shape[-1] * GROUP_SIZE
            bits = array.shape[-1] * 32 // in_features
            quantization[module] = {"group_size": GROUP_SIZE, "bits": bits}
        weights[name] = array
        if progress:
            progress(done, len(names))
    return weights, quantization


def convert_gguf(
    gguf_path: Path, out_dir: Path, progress: ProgressFn | None = None, replace: bool = True
) -> Path:
    """Write an mlx-lm model directory for `gguf_path` at `out_dir`.

    The directory appears atomically (engine/install.py), so a crash half-way never leaves a model
    that looks complete. Raises ConversionError for an architecture, tokenizer or tensor type that
    mlxserve does not convert, or when `out_dir` exists and `replace` is not set.
    """
    gguf = read_gguf(gguf_path)
    arch_name = gguf.scalar("general.architecture")
    if arch_name not in ARCHITECTURES:
        raise ConversionError(
            f"GGUF architecture {arch_name!r} is not supported; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    arch = ARCHITECTURES[arch_name]
    config = arch.config(gguf)
    weights, quantization = _convert_tensors(gguf, arch, config, progress)
    if quantization:
        # mlx-lm reads a default plus per-module exceptions (GGUF files often
        # keep the embedding at 8 bits while the rest is 4).
        bits = Counter(q["bits"] for q in quantization.values()).most_common(1)[0][0]
        exceptions = {m: q for m, q in quantization.items() if q["bits"] != bits}
        config["quantization"] = {"group_size": GROUP_SIZE, "bits": bits, **exceptions}

    with installing(out_dir.parent, out_dir.name, replace=replace) as tmp:
        special = write_tokenizer_files(gguf, tmp)
        config.update(special)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir
