"""Keep freed memory for reuse, so that every training step does not page-fault its large tensors in afresh.

glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh mappings and unmaps them when
freed. A (2048 x 4608) float32 activation is 38 MB: each step would map, fault in and unmap several of them,
which on this machine made an elementwise op over such a tensor cost 14 ms instead of 2.5 ms and a
2048 x 576 x 4608 matmul 15% slower. Turning mmap off for malloc and raising the trim threshold makes glibc
recycle those blocks from its heap. It is process-wide and only done by training processes; set
SAELAB_KEEP_FREED_MEMORY=0 to leave malloc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_done = False


def keep_freed_memory() -> bool:
    """Ask glibc to keep large freed blocks for reuse; True when it took effect (Linux with glibc)."""
    global _done
    if _done or not sys.platform.startswith("linux") or os.environ.get("SAELAB_KEEP_FREED_MEMORY", "1") == "0":
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**30))
    except (OSError, AttributeError):  # musl or another libc without mallopt
        _done = False
    return _done
