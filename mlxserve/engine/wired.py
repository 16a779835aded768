"""The GPU's wired-memory limit (Metal): set once by the process, never put back by a model's generator.

Wired memory is never paged out, so weights wired on Metal do not stall when macOS pages. mlx-lm's
`BatchGenerator` raises the limit to the device's recommended working set when it is made, and puts back
the value it found when it is closed or collected. With several models loaded, unloading one (or
rebuilding its generator after a failure) would put back a value from before the others were loaded,
under them. So the process sets the limit once, from the memory budget its models are held to, and takes
that restoring away from every generator. Where the device reports no recommended working set (the CPU,
CUDA) there is no wired limit to set.
"""

from __future__ import annotations

import mlx.core as mx

_limit: int | None = None


def recommended_working_set() -> int | None:
    """Bytes the GPU may keep resident without hurting the system (Metal); None elsewhere."""
    return mx.device_info().get("max_recommended_working_set_size")


def set_process_limit(budget: int) -> int | None:
    """Wire up to the models' memory budget, never past the recommended working set; the limit set."""
    global _limit
    recommended = recommended_working_set()
    if recommended is None:
        return None
    _limit = min(budget, recommended)
    mx.set_wired_limit(_limit)
    return _limit


def adopt(generator: object) -> None:
    """Put the process's limit back over `generator`'s, and stop it restoring an older one when it goes."""
    generator._old_wired_limit = None  # mlx-lm's BatchGenerator: what close() and __del__ would restore
    if _limit is not None:
        mx.set_wired_limit(_limit)
