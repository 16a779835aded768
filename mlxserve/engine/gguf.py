"""Convert a GGUF file (llama.cpp's format) into an mlx-lm model directory, one tensor at a time.

What maps GGUF to Hugging Face is reused rather than written again: the config keys of each
architecture come from transformers' GGUF integration, the tensor names from gguf-py's table
(the one llama.cpp's own converter names them with), matched against the parameters of the
mlx-lm class that will run the model; the tokenizer from transformers' converters
(engine/gguf_tokenizer.py). What is left here is what mlx-lm's classes need beyond that:
llama.cpp's rotary permutation of llama's Q/K rows, Llama 3's rotary scaling stored as a tensor,
Gemma's norms stored plus one, a few config keys transformers leaves to its own classes' defaults.

Tensors are read one at a time (gguf-py reads the header), converted (engine/gguf_tensors.py) and
written in shards of at most SHARD_BYTES, so the memory a conversion needs does not grow with the
model. An architecture mlx-lm cannot run, a tensor it has no place for, or a type nothing reads
is refused, by name, before anything is written.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlxserve.engine.gguf_tensors import Converted, Target, convert_tensor, readable
from mlxserve.engine.gguf_tokenizer import tokenizer_files
from mlxserve.engine.install import installing
from mlxserve.protocol import ConversionError

# transformers (for its GGUF maps) says at import that PyTorch is missing: nothing here needs it
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

ProgressFn = Callable[[int, int], None]
SHARD_BYTES = 1 << 29
# Tensors llama.cpp's converter makes from a config entry: they go back into the config, not the weights.
ROPE_FREQS = "rope_freqs.weight"


def _gemma2(metadata: dict[str, Any], arch: str) -> dict[str, Any]:
    head_dim = metadata.get(f"{arch}.attention.key_length")
    return {"attn_logit_softcapping": metadata.get(f"{arch}.attn_logit_softcapping", 50.0),
            "final_logit_softcapping": metadata.get(f"{arch}.final_logit_softcapping", 30.0),
            # llama.cpp scales queries by head_dim^-0.5 for every Gemma 2 but the 27B (hidden / heads)
            "query_pre_attn_scalar": head_dim if head_dim else 144.0}


def _gemma3(metadata: dict[str, Any], arch: str) -> dict[str, Any]:
    head_dim = metadata.get(f"{arch}.attention.key_length")
    return {"query_pre_attn_scalar": head_dim, "rope_local_base_freq": 10000.0, "sliding_window_pattern": 6}


def _qwen3moe(metadata: dict[str, Any], arch: str) -> dict[str, Any]:
    experts_width = metadata[f"{arch}.expert_feed_forward_length"]
    return {"moe_intermediate_size": experts_width, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "norm_topk_prob": True,  # as Qwen3's MoE models all do (transformers' GGUF defaults say so too)
            "intermediate_size": metadata.get(f"{arch}.feed_forward_length", experts_width)}


@dataclass(frozen=True)
class Architecture:
    """How a GGUF architecture becomes an mlx-lm model."""

    config_key: str  # transformers' GGUF_CONFIG_MAPPING entry
    model_type: str  # mlx-lm's
    hf_class: str  # config.json's "architectures", as the model's own repository names it
    rotary_permuted: bool = False  # llama.cpp interleaved each head's Q/K rows for its rotation
    norms_plus_one: bool = False  # llama.cpp stored the norm weights + 1 (Gemma's norms compute with 1 + w)
    extra: Callable[[dict[str, Any], str], dict[str, Any]] = lambda metadata, arch: {}


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", "llama", "LlamaForCausalLM", rotary_permuted=True),
    "qwen2": Architecture("qwen2", "qwen2", "Qwen2ForCausalLM"),
    "qwen3": Architecture("qwen3", "qwen3", "Qwen3ForCausalLM"),
    "qwen3moe": Architecture("qwen3_moe", "qwen3_moe", "Qwen3MoeForCausalLM", extra=_qwen3moe),
    "phi3": Architecture("phi3", "phi3", "Phi3ForCausalLM"),
    "gemma2": Architecture("gemma2", "gemma2", "Gemma2ForCausalLM", norms_plus_one=True, extra=_gemma2),
    "gemma3": Architecture("gemma3", "gemma3_text", "Gemma3ForCausalLM", norms_plus_one=True, extra=_gemma3),
}


@dataclass
class GGUFFile:
    """A GGUF file's metadata (plain Python values) and its tensors' descriptions (gguf-py's)."""

    path: Path
    metadata: dict[str, Any]
    tensors: list[Any] = field(repr=False)

    @classmethod
    def open(cls, path: Path) -> GGUFFile:
        from gguf import GGUFReader

        try:
            reader = GGUFReader(path)
        except (ValueError, OSError, KeyError) as exc:
            raise ConversionError(f"{path.name} is not a readable GGUF file: {exc}") from exc
        metadata = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
        return cls(path, metadata, list(reader.tensors))

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture"))


def _architecture(gguf: GGUFFile) -> Architecture:
    arch = ARCHITECTURES.get(gguf.architecture)
    if arch is None:
        raise ConversionError(f"GGUF architecture {gguf.architecture!r} is not supported; supported: "
                              f"{', '.join(sorted(ARCHITECTURES))}")
    return arch


def build_config(gguf: GGUFFile) -> dict[str, Any]:
    """The config.json of the model (without quantization and token ids), from transformers' key map."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch, name = _architecture(gguf), gguf.architecture
    config: dict[str, Any] = {"model_type": arch.model_type, "architectures": [arch.hf_class]}
    for key, hf_key in GGUF_CONFIG_MAPPING[arch.config_key].items():
        if hf_key is not None and f"{name}.{key}" in gguf.metadata:
            config[hf_key] = gguf.metadata[f"{name}.{key}"]
    for needed in ("hidden_size", "num_attention_heads", "num_hidden_layers"):
        if needed not in config:
            raise ConversionError(f"{gguf.path.name} does not say its model's {needed} (no {name}.* key for it)")
    if "vocab_size" not in config and "tokenizer.ggml.tokens" not in gguf.metadata:
        raise ConversionError(f"{gguf.path.name} has no tokenizer (tokenizer.ggml.tokens)")
    # The head size is the key length; rope.dimension_count (which transformers maps for llama) can be a
    # partial rotation. Always stated: some mlx-lm classes default it to one checkpoint's value.
    config["head_dim"] = gguf.metadata.get(f"{name}.attention.key_length",
                                           config["hidden_size"] // config["num_attention_heads"])
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config.setdefault("vocab_size", len(gguf.metadata["tokenizer.ggml.tokens"]))
    if "rms_norm_eps" in config:  # stored as float32: 1e-5, not 9.99999974738e-06
        config["rms_norm_eps"] = float(f"{config['rms_norm_eps']:.6g}")
    config["tie_word_embeddings"] = all(t.name != "output.weight" for t in gguf.tensors)
    config.update(arch.extra(gguf.metadata, name))
    rope_freqs = next((t for t in gguf.tensors if t.name == ROPE_FREQS), None)
    if rope_freqs is not None:
        config["rope_scaling"] = _llama3_rope_scaling(np.asarray(rope_freqs.data, dtype=np.float64),
                                                      config.get("rope_theta", 10000.0), config["head_dim"])
    return config


def _llama3_rope_scaling(factors: np.ndarray, base: float, dims: int) -> dict[str, Any]:
    """The rope_scaling of Llama 3.1 and later, which llama.cpp's converter stores as per-frequency factors.

    Every Llama 3.x release scales with low_freq_factor 1, high_freq_factor 4 and an original context of
    8192, and its own factor (8, or 32 for 3.2): the factor is the largest stored, and the rest is checked
    by computing the factors again as the converter does. Anything else is refused rather than guessed.
    """
    scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    old_context, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    wavelengths = 2 * np.pi * base ** (np.arange(0, dims, 2) / dims)
    smooth = (old_context / wavelengths - 1.0) / (4.0 - 1.0)
    expected = np.where(wavelengths < old_context / 4.0, 1.0,
                        np.where(wavelengths > old_context / 1.0, factor, 1 / ((1 - smooth) / factor + smooth)))
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-4):
        raise ConversionError(f"the file's {ROPE_FREQS} is not a Llama 3 rotary scaling this importer recognises "
                              "(factor, 1, 4, 8192)")
    return scaling


def _model_layout(config: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """The parameters (names and shapes) of the mlx-lm class for `config`, and its modules MLX quantizes
    (Linear and Embedding layers). Nothing is computed: MLX arrays are lazy."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    try:
        model_class, args_class = _get_classes(config)
        model = model_class(args_class.from_dict(config))
    except (ValueError, TypeError, KeyError, ImportError) as exc:
        raise ConversionError(f"mlx-lm cannot build a {config['model_type']!r} model from this file: {exc}") from exc
    quantizable = {path for path, module in model.named_modules() if hasattr(module, "to_quantized")}
    return {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}, quantizable


def tensor_names(gguf: GGUFFile, parameters: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """GGUF tensor name -> mlx-lm parameter name, through gguf-py's table of both namings.

    Refuses a file with a tensor the model has no place for (it would otherwise be silently dropped),
    or one whose shape is not its place's (the model would not load).
    """
    import gguf as gguf_py

    kinds = {value: key for key, value in gguf_py.MODEL_ARCH_NAMES.items()}
    blocks = int(gguf.metadata.get(f"{gguf.architecture}.block_count", 0))
    table = gguf_py.get_tensor_name_map(kinds[gguf.architecture], blocks)
    names: dict[str, str] = {}
    for parameter in parameters:
        # mlx-lm stacks a mixture's experts in `switch_mlp`, where Hugging Face's checkpoints say `experts`
        gguf_name = table.get_name(parameter.replace(".switch_mlp.", ".experts."), try_suffixes=(".weight", ".bias"))
        if gguf_name is not None:
            names[gguf_name] = parameter
    unplaced = [t.name for t in gguf.tensors if t.name not in names and t.name != ROPE_FREQS]
    if unplaced:
        raise ConversionError(f"{gguf.path.name} has tensors mlx-lm's {gguf.architecture} model has no place for: "
                              f"{', '.join(unplaced[:5])}{' …' if len(unplaced) > 5 else ''}")
    for tensor in gguf.tensors:
        shape = _shape(tensor)
        if tensor.name in names and shape != parameters[names[tensor.name]]:
            raise ConversionError(f"{gguf.path.name}: {tensor.name} is {shape}, but its metadata makes the model's "
                                  f"{names[tensor.name]} {parameters[names[tensor.name]]}; the file is inconsistent")
    return names


def _unpermute_rows(array: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's interleaving of the rotary halves in Q/K output rows.

    llama.cpp stores each head's rows as (pairs, 2) so that its RoPE rotates adjacent elements;
    mlx-lm's llama rotates two halves. Quantization groups run along a row, so permuting the rows
    of weight, scales and biases is exact.
    """
    rows, rest = array.shape[0], array.shape[1:]
    return array.reshape(n_heads, rows // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


class _ShardWriter:
    """Safetensors shards of at most SHARD_BYTES, named as mlx-lm and Hugging Face name them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pending: dict[str, mx.array] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []  # the names in each shard written
        self.count = 0

    def add(self, name: str, array: mx.array) -> None:
        if self.pending and self.pending_bytes + array.nbytes > SHARD_BYTES:
            self.flush()
        self.pending[name] = array
        self.pending_bytes += array.nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        self.count += 1
        mx.save_safetensors(str(self.directory / f"part-{self.count}.safetensors"), self.pending,
                            metadata={"format": "mlx"})
        self.files.append(sorted(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self, total_bytes: int) -> None:
        """Name the shards and write the index, for one shard too: mlx-lm's pipeline-parallel loader
        reads it to load only the layers of its rank, as mlx-lm's own conversions always write it."""
        self.flush()
        weight_map = {}
        for i, names in enumerate(self.files, start=1):
            final = "model.safetensors" if self.count == 1 else f"model-{i:05d}-of-{self.count:05d}.safetensors"
            (self.directory / f"part-{i}.safetensors").rename(self.directory / final)
            weight_map |= {name: final for name in names}
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _shape(tensor: Any) -> tuple[int, ...]:
    """A gguf-py tensor's shape in row-major order (GGUF lists the fastest-moving axis first)."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def _read(path: Path, tensor: Any) -> np.ndarray:
    """A tensor's bytes read from the file, shaped as gguf-py maps them. Read, not taken from gguf-py's
    memory map: the pages of a mapping stay in the process's resident memory once touched, so a 40 GB
    file would end up resident whole."""
    raw = np.fromfile(path, dtype=np.uint8, count=int(tensor.n_bytes), offset=int(tensor.data_offset))
    return raw.view(tensor.data.dtype).reshape(tensor.data.shape)


def _check_types(gguf: GGUFFile) -> None:
    unreadable: dict[str, list[str]] = {}
    for tensor in gguf.tensors:
        if not readable(tensor.tensor_type):
            unreadable.setdefault(tensor.tensor_type.name, []).append(tensor.name)
    if unreadable:
        found = "; ".join(f"{t} ({len(names)} tensors, e.g. {names[0]})" for t, names in unreadable.items())
        raise ConversionError(f"{gguf.path.name} has tensor types nothing here can read: {found}. Use another "
                              "quantization of the model (Q4_K_M, Q6_K and Q8_0 all convert), or an MLX model "
                              "from the Hugging Face Hub (`mlxserve pull`).")


def convert_gguf(gguf_path: Path, out_dir: Path, progress: ProgressFn | None = None, replace: bool = True,
                 bits: int | None = None, group_size: int | None = None) -> Path:
    """Write an mlx-lm model directory for `gguf_path` at `out_dir`.

    `bits` and `group_size` quantize every quantizable weight that way (None: by the source type,
    engine/gguf_tensors.py). The directory appears atomically (engine/install.py), so a crash half-way
    never leaves a model that looks complete. Raises ConversionError for what it cannot convert, or when
    `out_dir` exists and `replace` is not set.
    """
    gguf = GGUFFile.open(gguf_path)
    arch = _architecture(gguf)
    _check_types(gguf)
    config = build_config(gguf)
    tokenizer = tokenizer_files(gguf.metadata, config.get("max_position_embeddings", 4096))
    parameters, quantizable = _model_layout(config)
    names = tensor_names(gguf, parameters)
    target = Target(bits, group_size)
    heads = {"self_attn.q_proj": config["num_attention_heads"], "self_attn.k_proj": config["num_key_value_heads"]}

    total = sum(int(t.n_bytes) for t in gguf.tensors)
    done = 0
    quantization: dict[str, dict[str, int]] = {}
    written = 0
    with installing(out_dir.parent, out_dir.name, replace=replace) as tmp:
        tokenizer.write(tmp)
        shards = _ShardWriter(tmp)
        for tensor in gguf.tensors:
            done += int(tensor.n_bytes)
            if tensor.name != ROPE_FREQS:  # that one is in the config already
                name = names[tensor.name]
                module, _, suffix = name.rpartition(".")
                converted: Converted = convert_tensor(tensor.tensor_type, _read(gguf.path, tensor), _shape(tensor),
                                                      target, suffix == "weight" and module in quantizable)
                arrays = converted.arrays
                if arch.rotary_permuted:
                    for proj, n_heads in heads.items():
                        if module.endswith(proj):
                            arrays = {k: _unpermute_rows(v, n_heads) for k, v in arrays.items()}
                if arch.norms_plus_one and module.endswith("norm") and suffix == "weight":
                    arrays = {"weight": arrays["weight"] - 1}
                mx.eval(arrays)  # now, so that what they were made from is freed before the next tensor
                if converted.bits is not None:
                    quantization[module] = {"group_size": converted.group_size, "bits": converted.bits}
                    for part, array in arrays.items():
                        shards.add(f"{module}.{part}", array)
                else:
                    shards.add(name, arrays["weight"])
                written += sum(a.nbytes for a in arrays.values())
            if progress:
                progress(done, total)
        shards.finish(written)
        if quantization:
            config["quantization"] = _quantization_config(quantization)
        config.update(tokenizer.config_ids)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def _quantization_config(per_module: dict[str, dict[str, int]]) -> dict[str, Any]:
    """mlx-lm's form: the most common setting, plus the modules quantized otherwise (GGUF files often keep
    the embedding or output layer at more bits than the rest)."""
    common = Counter(json.dumps(q, sort_keys=True) for q in per_module.values()).most_common(1)[0][0]
    default = json.loads(common)
    return {**default, **{m: q for m, q in per_module.items() if q != default}}
