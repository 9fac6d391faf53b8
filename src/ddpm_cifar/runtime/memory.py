"""Keep freed memory in the process on Linux (glibc), so CPU training does not pay page faults.

glibc's malloc hands memory of a freed block back to the kernel when the top of the heap holds more
than ``M_TRIM_THRESHOLD`` free bytes (by default twice the mmap threshold, at most 64 MiB), and
serves blocks above ``M_MMAP_THRESHOLD`` with a fresh mmap. A training step on CPU allocates and frees
the same few-MB activations every micro-step, so each step faults the same pages in again, zeroed by
the kernel: on the quick run's U-Net keeping them made steps 1.18x as fast
(``benchmarks/allocator.py``, 2-core AMD EPYC VM).
Raising both thresholds keeps those pages; the process's resident memory stays at its peak, which
a stage reaches anyway. Numbers are unchanged: only where memory comes from changes.

CUDA memory has its own caching allocator and is not affected; on other C libraries this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h> option numbers
# glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): blocks above it are mmapped
# whatever is asked, and they are few and large (a batch of Inception activations).
_MMAP_THRESHOLD = 32 << 20
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: trim only past 2 GiB free, i.e. in practice never


def retain_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds for this process; True where that took effect."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    return bool(mmap_ok) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
