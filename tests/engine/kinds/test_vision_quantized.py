"""A quantized VLM (the usual checkpoint on a Mac) keeps its language layers quantized in mlx-lm's model."""

import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlxserve.engine.kinds import vision
from tests.fixtures.tiny_vlm import write_tiny_vlm


@pytest.fixture
def quantized_vlm(tmp_path):
    from mlx_vlm import load

    path = write_tiny_vlm(tmp_path / "vlm")
    model, _ = load(str(path))
    nn.quantize(model.language_model, group_size=32, bits=4,
                class_predicate=lambda p, m: isinstance(m, nn.Linear))
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config = json.loads((path / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": 4}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_quantized_language_model_is_shared_not_copied(quantized_vlm, monkeypatch):
    monkeypatch.setattr(vision, "optimize_for_cpu", lambda model: None)  # as on a GPU
    loaded = vision.load_vision_model("q", quantized_vlm)
    q_proj = loaded.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear) and q_proj.bits == 4
    vlm_q = loaded.vision.vlm.language_model.layers[0].self_attn.q_proj
    assert q_proj.weight is vlm_q.weight or mx.array_equal(q_proj.weight, vlm_q.weight)
    ids = mx.array([[5, 6, 7]])
    assert mx.allclose(loaded.model(ids), loaded.vision.vlm.language_model(ids).logits, atol=1e-4)
