"""The model directory: one mlx-lm style folder per model under `$MLXSERVE_HOME/models/`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlxserve.protocol import ModelInfo, ModelNotFoundError


class ModelStore:
    def __init__(self, models_dir: Path):
        self.models_dir = models_dir

    def _is_model(self, path: Path) -> bool:
        return path.is_dir() and (path / "config.json").is_file() and not path.name.endswith(".partial")

    def list(self) -> list[ModelInfo]:
        if not self.models_dir.is_dir():
            return []
        return [
            self._info(p) for p in sorted(self.models_dir.iterdir()) if self._is_model(p)
        ]

    def _info(self, path: Path) -> ModelInfo:
        return ModelInfo(id=path.name, created=int((path / "config.json").stat().st_mtime))

    def path(self, model_id: str) -> Path:
        """The folder of `model_id`; ModelNotFoundError if there is none."""
        path = self.models_dir / model_id
        # A model id is one folder name: refuse anything that walks out of the directory.
        if "/" in model_id or "\\" in model_id or model_id.startswith(".") or not self._is_model(path):
            raise ModelNotFoundError(f"The model '{model_id}' does not exist")
        return path

    def get(self, model_id: str) -> ModelInfo:
        return self._info(self.path(model_id))

    def config(self, model_id: str) -> dict[str, Any]:
        return json.loads((self.path(model_id) / "config.json").read_text())

    def exists(self, model_id: str) -> bool:
        try:
            self.path(model_id)
        except ModelNotFoundError:
            return False
        return True
