"""Vision-language models: mlx-vlm's vision encoder and processor, mlx-lm's language model.

mlx-vlm turns the prompt's image placeholders and the images into input embeddings; the
language model that consumes them is rebuilt as an mlx-lm model over the very same weight
arrays (nothing is copied), so generation runs in mlx-lm's batch generator exactly as for
text models: continuous batching, every sampling parameter, stop strings, logprobs.
This works for families whose language model is an mlx-lm architecture with ordinary
positions; Idefics3 / SmolVLM (llama) is the one tested here.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import _get_classes
from PIL import Image

from mlxserve.engine.cpu import optimize_for_cpu
from mlxserve.engine.kinds.text import EncodedPrompt, TextModel, text_model_from
from mlxserve.protocol import ChatMessage, InvalidRequestError

# mlx-vlm model types whose language model mlx-lm can run from input embeddings, with the
# prefix their language-model parameters need in mlx-lm's naming.
SUPPORTED = {"idefics3": "model.", "smolvlm": "model."}
DEFAULT_MAX_IMAGES = 8


def is_vision_model(path: Path, config: dict[str, Any]) -> bool:
    return config.get("model_type") in SUPPORTED and "vision_config" in config


@dataclass
class VisionTower:
    """What only image requests need: the mlx-vlm model (vision side used) and its processor."""

    vlm: nn.Module
    processor: Any
    max_images: int

    def encode(self, messages: tuple[ChatMessage, ...], model_name: str) -> EncodedPrompt:
        """Token ids (image placeholders expanded by the processor) and, with images, its pixel inputs.

        Decodes images and runs the processor (numpy only), so it runs off the engine thread.
        """
        images = [part for m in messages for part in m.images]
        if len(images) > self.max_images:
            raise InvalidRequestError(
                f"'{images[self.max_images].where}': the model '{model_name}' accepts at most "
                f"{self.max_images} images per request; this one has {len(images)}",
                param=images[self.max_images].where)
        turns = [{"role": m.role, "content": [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"}
                                              for p in m.parts]} for m in messages]
        prompt = self.processor.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        if not images:
            return EncodedPrompt(prompt, self.processor.tokenizer.encode(prompt, add_special_tokens=False))
        pictures = [_first_frame(image.data) for image in images]
        inputs = self.processor(text=[prompt], images=[pictures], return_tensors="np")
        return EncodedPrompt(prompt, inputs["input_ids"][0].tolist(),
                             {k: v for k, v in inputs.items() if k != "attention_mask"})

    def embed(self, encoded: EncodedPrompt) -> mx.array:
        """The prompt's input embeddings, image features in place of the placeholders (engine thread)."""
        inputs = encoded.vision_inputs
        ids = mx.array(inputs["input_ids"])
        kwargs = {k: mx.array(v) for k, v in inputs.items() if k != "input_ids"}
        return self.vlm.get_input_embeddings(ids, **kwargs).inputs_embeds[0]


def _first_frame(data: bytes) -> Image.Image:
    """RGB pixels of the image (an animated GIF's first frame)."""
    with Image.open(io.BytesIO(data)) as image:
        image.seek(0)
        return image.convert("RGB")


def load_vision_model(name: str, path: Path) -> TextModel:
    from mlx_vlm import load as mlx_vlm_load

    config = json.loads((path / "config.json").read_text())
    vlm, processor = mlx_vlm_load(str(path))
    optimize_for_cpu(vlm)  # before sharing, so both halves see the same (float32) arrays on a CPU
    text_config = {**config["text_config"], "vocab_size": config["text_config"].get("vocab_size", config.get("vocab_size"))}
    model_class, args_class = _get_classes(text_config)
    language = model_class(args_class.from_dict(text_config))
    prefix = SUPPORTED[config["model_type"]]
    rename = lambda k: k if k.startswith("lm_head") else prefix + k  # noqa: E731
    # Quantized checkpoints (the usual case on a Mac) keep their layers quantized in mlx-lm's model too.
    quantized = {rename(p): {"group_size": m.group_size, "bits": m.bits, "mode": getattr(m, "mode", "affine")}
                 for p, m in vlm.language_model.named_modules() if hasattr(m, "scales")}
    if quantized:
        nn.quantize(language, class_predicate=lambda p, m: quantized.get(p, False))
    language.load_weights([(rename(k), v) for k, v in tree_flatten(vlm.language_model.parameters())], strict=True)
    if quantized:
        optimize_for_cpu(language)  # on a CPU, its quantized layers (the tower's arrays) go to the shim too
    eos = config.get("eos_token_id") or []
    tokenizer = TokenizerWrapper(processor.tokenizer, eos_token_ids=eos if isinstance(eos, list) else [eos])
    tower = VisionTower(vlm, processor, int(config.get("max_images", DEFAULT_MAX_IMAGES)))
    return text_model_from(name, path, language, tokenizer, text_config, vision=tower)
