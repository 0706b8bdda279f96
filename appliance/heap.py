"""Give the C heap's free memory back to the kernel once the daemon goes idle.

Connections come and go on threads of their own, and glibc keeps a heap arena per thread that
only shrinks from its top: after a burst of clients the freed memory of the arenas stays in the
daemon's RSS though nothing uses it. `malloc_trim(0)` returns the free pages of every arena.
It walks all of them, so it runs when the last client leaves, not per request.
"""

from __future__ import annotations

import ctypes
import ctypes.util

try:
    _trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    _trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):  # not glibc: nothing to give back this way
    _trim = None


def release_free_memory() -> None:
    if _trim is not None:
        _trim(0)
