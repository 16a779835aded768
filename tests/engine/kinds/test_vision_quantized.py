"""A quantized VLM (the usual checkpoint on a Mac) keeps its language layers quantized in mlx-lm's model."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlxserve.engine.kinds import vision
from tests.fixtures.tiny_vlm import write_tiny_vlm
from tests.test_blas import SHIM_READY


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


SHIMMED_SCRIPT = """
import json, sys
from pathlib import Path
from mlxserve import blas
blas.preload_openblas()  # as the server does, before MLX
import mlx.core as mx
from mlxserve.engine import cpu
from mlxserve.engine.kinds import vision
loaded = vision.load_vision_model("q", Path(sys.argv[1]))
q_proj = loaded.model.model.layers[0].self_attn.q_proj
vlm_q = loaded.vision.vlm.language_model.layers[0].self_attn.q_proj
ids = mx.array([[5, 6, 7]])
before = blas.quantized_products()
same = bool(mx.allclose(loaded.model(ids), loaded.vision.vlm.language_model(ids).logits, atol=1e-4))
print(json.dumps({"types": [type(q_proj).__name__, type(vlm_q).__name__], "shared": q_proj.weight is vlm_q.weight,
                  "products": blas.quantized_products() - before, "same": same}))
"""


@SHIM_READY
def test_on_the_cpu_the_quantized_language_model_computes_through_the_shim(quantized_vlm, tmp_path):
    """Its layers become the shim's over the tower's own arrays, as the tower's did (they were MLX's one-core
    quantized layers), and give the tower's logits."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", SHIMMED_SCRIPT, str(quantized_vlm)], capture_output=True, text=True,
                         env=env)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["types"] == ["ShimLinear", "ShimLinear"] and result["shared"] and result["same"], result
    assert result["products"] > 0, result
