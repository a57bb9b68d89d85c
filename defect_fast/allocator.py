"""The C allocator's settings for a process that allocates the same large tensors call after call.

glibc's malloc hands memory at the top of its heap back to the system once more than
``M_TRIM_THRESHOLD`` of it is free, and serves requests above ``M_MMAP_THRESHOLD`` with fresh
mmap'd pages (that threshold adapts, up to 32 MiB). Inference allocates and frees the same
activations of a few MB on every call, so the next call faults the same pages in again, each
zeroed by the kernel: thousands of minor page faults per 512x512 CMA-AE call.
:func:`keep_freed_memory` sets both thresholds, so freed memory stays in the process for the next
call. The price: the process keeps its peak heap (up to ``trim_threshold`` of free memory is not
returned after a large batch); requests of ``mmap_threshold`` and more are still mapped and
returned.

Setting only one of the two does harm: an explicit ``M_TRIM_THRESHOLD`` switches off the
adaptive mmap threshold, which then stays at 128 KiB and maps every activation afresh.

The command line calls it for every command; an embedding program may call it once at start, or
set ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` itself.
``python3 benchmarks/bench_allocator.py`` measures what it changes (alternating processes).
"""
from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "applied", "keep_freed_memory"]

#: Requests at least this large are mapped afresh and returned on free (glibc's adaptive maximum).
MMAP_THRESHOLD = 32 << 20
#: Free memory at the heap's top kept for later calls before any is returned to the system.
TRIM_THRESHOLD = 256 << 20

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_applied: dict[str, int] | None = None


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> dict[str, int] | None:
    """Set glibc's mmap and trim thresholds for this process (see the module docstring).

    A no-op, returning None, where the C library is not glibc, where the environment already sets
    malloc's settings (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, or ``glibc.malloc.*``
    in ``GLIBC_TUNABLES``: the user's choice), or with ``DEFECT_FAST_MALLOC=default``.
    Returns the thresholds set, for the record.
    """
    global _applied
    if (os.environ.get("DEFECT_FAST_MALLOC", "").strip().lower() == "default" or any(v in os.environ for v in _ENV)
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")):
        return None
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the mmap threshold first: the trim threshold alone would pin the mmap threshold at 128 KiB
    if not mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) or not mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)):
        return None
    _applied = {"mmap_threshold": int(mmap_threshold), "trim_threshold": int(trim_threshold)}
    return dict(_applied)


def applied() -> dict[str, int] | None:
    """The thresholds :func:`keep_freed_memory` set in this process, or None."""
    return None if _applied is None else dict(_applied)
