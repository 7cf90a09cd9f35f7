"""Handing freed heap memory back to the operating system (glibc's ``malloc_trim``).

glibc keeps freed blocks of tens of MB in its heap for reuse; a loop that allocates such
blocks with shifting sizes (decoded image chunks, channels-last batch copies) can then see
its resident memory climb by about 100 MB a chunk (measured: ``kdtool eval`` streaming
15,000 224x224 images grew from 1.0 to 1.9 GB) although nothing is alive.
"""

from __future__ import annotations

import ctypes
import ctypes.util


def _load_malloc_trim():
    try:  # glibc only; musl and other C libraries have no malloc_trim
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_freed() -> None:
    """Return the heap's free pages to the kernel (a no-op without glibc); about 1 ms."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
