"""Give the memory a worker freed back to the operating system.

Loading a model (MLflow's client and store, the download, unpickling, the canary decision) allocates and frees
tens of megabytes. glibc's malloc keeps freed memory in its heaps for reuse instead of returning it, so a worker's
RSS stays at its start-up peak: about 17 MB above what it holds (measured on the shipped demo model). A worker's
RSS counts against the scorer's memory budget (ISSUE 4: under 400 MB each), so after start-up and after each model
swap the worker asks malloc to return what is free (``malloc_trim``). Elsewhere than glibc (musl, macOS) this does
nothing.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from functools import cache


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    try:
        # The process's own symbols: the C library it runs on, found without ldconfig (slim images lack it).
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]  # a ctypes function: argtypes and restype are set above


def release_free_memory() -> bool:
    """Return the free memory of malloc's heaps to the OS; True when some was returned, False when none was (or
    the C library cannot). The call releases the GIL (ctypes), so a poller thread can make it beside requests."""
    trim = _malloc_trim()
    if trim is None:
        return False
    return bool(trim(0))
