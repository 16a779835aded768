"""The model directory: one mlx-lm style folder per model under `$MLXSERVE_HOME/models/`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mlxserve.engine.cpu import resident_bytes
from mlxserve.engine.kinds import Kind, kind_of
from mlxserve.engine.names import check_model_name
from mlxserve.protocol import ModelInfo, ModelNotFoundError

WEIGHT_SUFFIXES = (".safetensors", ".npz", ".gguf")


def _quantization(config: dict[str, Any]) -> str:
    q = config.get("quantization") or config.get("quantization_config")
    if not q:
        return config.get("torch_dtype") or config.get("dtype") or "none"
    if isinstance(q, dict) and "bits" in q:
        bits = {q["bits"]} | {v["bits"] for v in q.values() if isinstance(v, dict) and "bits" in v}
        return "/".join(f"{b}" for b in sorted(bits)) + f"-bit (group {q.get('group_size', '?')})"
    return str(q.get("quant_method", "quantized")) if isinstance(q, dict) else "quantized"


def _context_length(config: dict[str, Any], path: Path) -> int | None:
    # An embedding model takes what sentence-transformers declares (MiniLM: 256), not its position table (512).
    st = path / "sentence_bert_config.json"
    declared = json.loads(st.read_text()).get("max_seq_length") if st.is_file() else None
    if isinstance(declared, int):
        return declared
    for source in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
            if isinstance(source.get(key), int):
                return source[key]
    return None


class ModelStore:
    def __init__(self, models_dir: Path):
        self.models_dir = models_dir
        # Info by (folder, config mtime): every request asks, and configs rarely change.
        self._infos: dict[tuple[Path, float], ModelInfo] = {}

    def _is_model(self, path: Path) -> bool:
        return path.is_dir() and (path / "config.json").is_file() and not path.name.endswith(".partial")

    def list(self) -> list[ModelInfo]:
        if not self.models_dir.is_dir():
            return []
        return [self._info(p) for p in sorted(self.models_dir.iterdir()) if self._is_model(p)]

    def _config(self, path: Path) -> dict[str, Any]:
        return json.loads((path / "config.json").read_text())

    def _kind(self, path: Path) -> Kind:
        return kind_of(path, self._config(path))

    def _info(self, path: Path) -> ModelInfo:
        mtime = (path / "config.json").stat().st_mtime
        if (path, mtime) not in self._infos:
            config = self._config(path)
            kind = kind_of(path, config)
            arch = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
            self._infos[(path, mtime)] = ModelInfo(
                id=path.name, created=int(mtime), kind=kind.name, capabilities=kind.capabilities,
                architecture=arch, quantization=_quantization(config),
                context_length=_context_length(config, path), size_bytes=size)
        return self._infos[(path, mtime)]

    def path(self, model_id: str) -> Path:
        """The folder of `model_id`; InvalidModelNameError for a name no model can have,
        ModelNotFoundError if there is none."""
        path = self.models_dir / check_model_name(model_id)
        if not self._is_model(path):
            raise ModelNotFoundError(f"The model '{model_id}' does not exist")
        return path

    def get(self, model_id: str) -> ModelInfo:
        return self._info(self.path(model_id))

    def resident_bytes(self, model_id: str) -> int:
        """What the model will hold in memory once loaded (engine/cpu.py), read from its files' headers."""
        path = self.path(model_id)
        tensors: dict[str, tuple[str, list[int]]] = {}
        for file in path.rglob("*.safetensors"):
            with open(file, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            tensors.update({k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"})
        return resident_bytes(tensors) if tensors else self._info(path).size_bytes

    def load(self, model_id: str) -> Any:
        """Load `model_id` with its kind's loader (on the engine thread: it evaluates MLX arrays)."""
        path = self.path(model_id)
        return self._kind(path).load(model_id, path)

    def remove(self, model_id: str) -> None:
        shutil.rmtree(self.path(model_id))
