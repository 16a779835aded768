"""Download MLX models from the Hugging Face Hub into the model directory.

huggingface_hub does the transfer: progress bars, resuming a dropped connection
with a Range request, skipping files already complete in `local_dir` when a pull
is run again, and `HF_ENDPOINT` for mirrors. Only the files a model needs are fetched, never
PyTorch or GGUF duplicates that some repositories carry beside the MLX weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mlxserve.engine.install import installing
from mlxserve.protocol import ConversionError

# What mlx-lm, mlx-vlm and the embedding loader read: weights, configs, tokenizers,
# chat templates, and sentence-transformers pooling folders.
MODEL_FILES = [
    "*.safetensors", "*.json", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt", "*.py",
    "1_Pooling/*", "2_Normalize/*",
]


def parse_reference(reference: str) -> tuple[str, str | None]:
    """'owner/name@revision' -> ('owner/name', 'revision'); the revision is optional."""
    repo, _, revision = reference.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"not a Hugging Face repository: {reference!r} (expected OWNER/NAME[@REVISION])")
    return repo, revision or None


def default_name(repo: str) -> str:
    """The model id a pulled repository gets: its name, lower-cased, as LM Studio shows it."""
    return repo.split("/")[1].lower()


def pull(repo: str, revision: str | None, target: Path) -> Path:
    """Download `repo` at `revision` into `target`.

    Files land in `target.partial` first (engine/install.py), so a broken download never looks like a
    model; running the same pull again resumes it there.
    """
    with installing(target.parent, target.name, resume=True) as partial:
        _download(repo, revision, partial)
    return target


def _download(repo: str, revision: str | None, partial: Path) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        snapshot_download(repo_id=repo, revision=revision, local_dir=partial, allow_patterns=MODEL_FILES)
    except HfHubHTTPError as exc:
        raise ConversionError(f"could not download {repo}: {exc}") from exc
    except Exception as exc:  # no connection, DNS, TLS: huggingface_hub raises each transport's own errors
        raise ConversionError(f"could not reach the Hugging Face Hub to download {repo} ({type(exc).__name__}: "
                              f"{exc}); check the network, or set HF_ENDPOINT to a mirror") from exc
    if not (partial / "config.json").is_file():
        shutil.rmtree(partial)
        raise ConversionError(f"{repo} has no config.json: it is not a model mlxserve can serve")
    if not any(partial.glob("*.safetensors")):
        shutil.rmtree(partial)
        raise ConversionError(
            f"{repo} has no safetensors weights; mlxserve serves MLX models (look for the mlx-community "
            "versions) and imports GGUF files with `mlxserve import`")
    shutil.rmtree(partial / ".cache", ignore_errors=True)  # resume bookkeeping, no longer needed
