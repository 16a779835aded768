"""glibc's allocator, where there is one (Linux): give freed memory back, and keep arenas few.

glibc gives each thread that allocates its own arena (up to 8 per core), and an arena keeps the
pages it once used; a server whose worker threads (templating, tokenizing, decoding images, HTTP)
take turns allocating grows its resident memory for minutes that way. Elsewhere (macOS, musl)
both calls do nothing.
"""

from __future__ import annotations

import ctypes
import sys

M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h
ARENAS = 2


def _glibc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # musl and other C libraries without them
        return None


_LIBC = _glibc()


def trim() -> None:
    """Return the heap's free pages to the system."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def limit_arenas() -> None:
    """Call before threads start: at most ARENAS arenas, shared by every thread."""
    if _LIBC is not None:
        _LIBC.mallopt(M_ARENA_MAX, ARENAS)
