"""Random-weight llama models of real models' shapes, for benchmarks on sizes no bundled model has.

The speed of a model depends on its shape and its quantization, not on what its weights say, so a
random model of SmolLM2-360M's or -1.7B's shape, quantized as the built-in SmolLM2-135M is (4-bit
groups of 32, the embedding 8-bit), costs what the real one would. It uses SmolLM2's tokenizer and
chat template (taken from an installed model folder), so every server reads the same prompts.

    python scripts/synthetic_model.py 360m DEST --tokenizer ~/.mlxserve/models/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

# SmolLM2's published shapes: (hidden, layers, heads, kv heads, intermediate).
SHAPES = {"135m": (576, 30, 9, 3, 1536), "360m": (960, 32, 15, 5, 2560), "1.7b": (2048, 24, 32, 32, 8192)}
VOCAB = 49152
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build(size: str, dest: Path, tokenizer: Path, seed: int = 0) -> Path:
    """Write the model folder `dest` (once: an existing one is kept)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models import llama
    from mlx_lm.utils import save_model

    if (dest / "config.json").is_file():
        return dest
    hidden, layers, heads, kv_heads, intermediate = SHAPES[size]
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
              "max_position_embeddings": 8192, "vocab_size": VOCAB, "tie_word_embeddings": True,
              "eos_token_id": [2], "bos_token_id": 1}
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    # Small weights keep activations in range, as trained ones are, so no path sees infinities.
    model.update(nn.utils.tree_map(lambda w: (mx.random.normal(w.shape) * 0.02).astype(mx.float16),
                                   model.parameters()))
    # Norms stay float32, as the built-in model's conversion keeps them (activations then run in float32).
    for layer in model.model.layers:
        layer.input_layernorm.weight = mx.ones((hidden,))
        layer.post_attention_layernorm.weight = mx.ones((hidden,))
    model.model.norm.weight = mx.ones((hidden,))
    nn.quantize(model, group_size=32, bits=4,
                class_predicate=lambda path, m: {"group_size": 32, "bits": 8} if path == "model.embed_tokens"
                else hasattr(m, "to_quantized"))
    config["quantization"] = {"group_size": 32, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": 8}}
    dest.mkdir(parents=True, exist_ok=True)
    save_model(dest, model)
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, dest / name)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("size", choices=sorted(SHAPES))
    parser.add_argument("dest", type=Path, help="the model folder to write")
    parser.add_argument("--tokenizer", type=Path, required=True, help="a folder holding SmolLM2's tokenizer files")
    args = parser.parse_args()
    print(build(args.size, args.dest, args.tokenizer))


if __name__ == "__main__":
    main()
