"""The model directory: one mlx-lm style folder per model under `$MLXSERVE_HOME/models/`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlxserve.engine.kinds import Kind, kind_of
from mlxserve.protocol import ModelInfo, ModelNotFoundError


class ModelStore:
    def __init__(self, models_dir: Path):
        self.models_dir = models_dir
        # Kind by (folder, config mtime): every request asks, and configs rarely change.
        self._kinds: dict[tuple[Path, float], Kind] = {}

    def _is_model(self, path: Path) -> bool:
        return path.is_dir() and (path / "config.json").is_file() and not path.name.endswith(".partial")

    def list(self) -> list[ModelInfo]:
        if not self.models_dir.is_dir():
            return []
        return [
            self._info(p) for p in sorted(self.models_dir.iterdir()) if self._is_model(p)
        ]

    def _kind(self, path: Path) -> Kind:
        mtime = (path / "config.json").stat().st_mtime
        if (path, mtime) not in self._kinds:
            self._kinds[(path, mtime)] = kind_of(path, json.loads((path / "config.json").read_text()))
        return self._kinds[(path, mtime)]

    def _info(self, path: Path) -> ModelInfo:
        kind = self._kind(path)
        return ModelInfo(id=path.name, created=int((path / "config.json").stat().st_mtime),
                         kind=kind.name, capabilities=kind.capabilities)

    def path(self, model_id: str) -> Path:
        """The folder of `model_id`; ModelNotFoundError if there is none."""
        path = self.models_dir / model_id
        # A model id is one folder name: refuse anything that walks out of the directory.
        if "/" in model_id or "\\" in model_id or model_id.startswith(".") or not self._is_model(path):
            raise ModelNotFoundError(f"The model '{model_id}' does not exist")
        return path

    def get(self, model_id: str) -> ModelInfo:
        return self._info(self.path(model_id))

    def load(self, model_id: str) -> Any:
        """Load `model_id` with its kind's loader (on the engine thread: it evaluates MLX arrays)."""
        path = self.path(model_id)
        return self._kind(path).load(model_id, path)
