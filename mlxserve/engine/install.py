"""Writing a model into the model directory: one install of a name at a time, visible only when whole.

Every way a model arrives (GGUF import, Hub pull, built-in wheel) writes into `<name>.partial` while it
holds `.<name>.lock`, and renames the folder into place when it is complete: a listed model is never half
written, two installs of one name never mix their files, and what an interrupted install left behind
is cleared by the next one (or, for Hub downloads, resumed).
"""

from __future__ import annotations

import fcntl
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlxserve.engine.names import check_model_name
from mlxserve.protocol import ConversionError


def is_installed(target: Path) -> bool:
    return (target / "config.json").is_file()


def exists_error(name: str) -> ConversionError:
    return ConversionError(f"a model named '{name}' exists; choose another --name, or pass --force (import) "
                           f"or `mlxserve rm {name}` first")


@contextmanager
def installing(models_dir: Path, name: str, *, replace: bool = False, wait: bool = False,
               resume: bool = False) -> Iterator[Path | None]:
    """Yield the folder to write model `name` into; when the block ends without an error it becomes
    `models_dir/name` in one rename (replacing an existing model only with `replace`).

    Yields None when `wait` is set and the model is already installed (another process may just have
    installed it). Without `wait`, a concurrent install of the same name is a ConversionError at once.
    `resume` keeps what an earlier, interrupted install left in the partial folder.
    """
    check_model_name(name)
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / name
    with open(models_dir / f".{name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConversionError(f"another install of '{name}' is running; wait for it to finish, then "
                                  "check `mlxserve ls`") from None
        if is_installed(target) and not replace:
            if wait:
                yield None
                return
            raise exists_error(name)
        partial = models_dir / f"{name}.partial"
        if not resume:
            shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(exist_ok=True)
        try:
            yield partial
        except BaseException:
            if not resume:
                shutil.rmtree(partial, ignore_errors=True)
            raise
        if not is_installed(partial):
            shutil.rmtree(partial, ignore_errors=True)
            raise ConversionError(f"the install of '{name}' wrote no config.json; nothing was installed")
        old = models_dir / f".{name}.replaced-{secrets.token_hex(4)}"
        if target.exists():
            target.rename(old)
        partial.rename(target)
        shutil.rmtree(old, ignore_errors=True)
