"""`mlxserve import FILE.gguf`: types MLX can hold as they are kept exactly, others converted; a type nothing
reads, refused by name before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize

from tests.fixtures.cli import mlxserve
from tests.fixtures.gguf_rewrite import quantized, rewrite_gguf
from tests.fixtures.tiny_gguf import write_tiny_gguf

BITS = {"F32": None, "F16": None, "Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "Q5_0": 8, "Q5_1": 8}


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf")


def _dequantized(model_dir: Path, module: str, config: dict) -> np.ndarray:
    weights = mx.load(str(model_dir / "model.safetensors"))
    q = config.get("quantization")
    if q is None:
        return np.array(weights[module + ".weight"].astype(mx.float32))
    scales, biases = (weights[f"{module}.{n}"].astype(mx.float32) for n in ("scales", "biases"))
    return np.array(mx.dequantize(weights[module + ".weight"], scales, biases,
                                  group_size=q["group_size"], bits=q["bits"]))


@pytest.mark.parametrize("type_name", BITS)
def test_import_keeps_each_tensor_type_exactly(f32_gguf: Path, tmp_path: Path, type_name: str):
    source = f32_gguf if type_name == "F32" else quantized(f32_gguf, tmp_path / f"tiny-{type_name}.gguf", type_name)
    result = mlxserve(tmp_path, "import", str(source), "--name", "imported")
    model_dir = tmp_path / "models" / "imported"
    assert result.stdout.strip() == str(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert (config.get("quantization") or {}).get("bits") == BITS[type_name]
    original = next(t for t in GGUFReader(source).tensors if t.name == "blk.1.ffn_down.weight")
    expected = dequantize(original.data, original.tensor_type).reshape(64, 128)
    np.testing.assert_allclose(_dequantized(model_dir, "model.layers.1.mlp.down_proj", config), expected,
                               rtol=0, atol=1e-6)
    listed = json.loads(mlxserve(tmp_path, "ls", "--json").stdout)
    assert listed[0]["id"] == "imported" and listed[0]["architecture"] == "LlamaForCausalLM"


def test_a_type_nothing_reads_is_refused_by_name(f32_gguf: Path, tmp_path: Path):
    def as_integers(name: str, values: np.ndarray):
        return (values.astype(np.int32), GGMLQuantizationType.I32) if name == "blk.0.ffn_up.weight" else (values, None)

    source = rewrite_gguf(f32_gguf, tmp_path / "tiny.gguf", as_integers)
    result = mlxserve(tmp_path, "import", str(source), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "I32" in result.stderr and "blk.0.ffn_up.weight" in result.stderr and "Q4_K_M" in result.stderr
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_import_does_not_overwrite_without_force(f32_gguf: Path, tmp_path: Path):
    mlxserve(tmp_path, "import", str(f32_gguf))
    again = mlxserve(tmp_path, "import", str(f32_gguf), check=False)
    assert again.returncode != 0 and "--force" in again.stderr
    mlxserve(tmp_path, "import", str(f32_gguf), "--force")
    assert [m["id"] for m in json.loads(mlxserve(tmp_path, "ls", "--json").stdout)] == ["tiny-f32"]


def test_rm_deletes_a_model(f32_gguf: Path, tmp_path: Path):
    mlxserve(tmp_path, "import", str(f32_gguf), "--name", "doomed")
    assert "Removed doomed" in mlxserve(tmp_path, "rm", "doomed").stdout
    assert json.loads(mlxserve(tmp_path, "ls", "--json").stdout) == []
    missing = mlxserve(tmp_path, "rm", "doomed", check=False)
    assert missing.returncode != 0 and "does not exist" in missing.stderr


def test_bits_and_group_size_are_the_users_choice(f32_gguf: Path, tmp_path: Path):
    result = mlxserve(tmp_path, "import", str(f32_gguf), "--name", "chosen", "--bits", "8", "--group-size", "64")
    assert "converting tensors: 100%" in result.stderr
    config = json.loads((tmp_path / "models" / "chosen" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 8}
    original = next(t for t in GGUFReader(f32_gguf).tensors if t.name == "blk.1.ffn_down.weight")
    expected = dequantize(original.data, original.tensor_type).reshape(64, 128)
    got = _dequantized(tmp_path / "models" / "chosen", "model.layers.1.mlp.down_proj", config)
    np.testing.assert_allclose(got, expected, atol=np.abs(expected).max() / 255)


def test_an_architecture_mlx_lm_cannot_run_is_refused_by_name_before_anything_is_written(f32_gguf: Path,
                                                                                        tmp_path: Path):
    reader = GGUFReader(f32_gguf)
    source = tmp_path / "mamba.gguf"
    writer = GGUFWriter(source, arch="mamba")
    writer.add_tensor("token_embd.weight", dequantize(reader.tensors[0].data, reader.tensors[0].tensor_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = mlxserve(tmp_path, "import", str(source), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "'mamba'" in result.stderr and "qwen3moe" in result.stderr  # what it is, and what is supported
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_a_pre_tokenizer_nothing_here_knows_is_refused_by_name(tmp_path: Path):
    """Cut with the GPT-2 split instead, its text would tokenize otherwise than in llama.cpp, silently."""
    source = write_tiny_gguf(tmp_path / "odd.gguf", pre_tokenizer="brand-new-split")
    result = mlxserve(tmp_path, "import", str(source), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "'brand-new-split'" in result.stderr and "llama-bpe" in result.stderr
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_a_tensor_whose_shape_its_metadata_contradicts_is_refused_before_anything_is_written(f32_gguf: Path,
                                                                                            tmp_path: Path):
    def narrower(name: str, values: np.ndarray):
        return (values[:64], None) if name == "blk.0.ffn_up.weight" else (values, None)

    source = rewrite_gguf(f32_gguf, tmp_path / "odd.gguf", narrower)
    result = mlxserve(tmp_path, "import", str(source), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "blk.0.ffn_up.weight" in result.stderr and "(64, 64)" in result.stderr and "(128, 64)" in result.stderr
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())
