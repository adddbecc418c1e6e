"""Host memory policy of a dlmjax process: large allocations go back to the OS when they are freed.

Reading or writing a checkpoint allocates and frees one large host buffer per array (TensorStore's read and write
buffers, the host copy before a device transfer), on several threads. glibc's malloc serves such a buffer with
`mmap` only below a threshold that it raises to the size of the largest buffer freed so far (up to 32 MiB); above
it, buffers come from per-thread arenas, and memory freed in one thread's arena is not reused by another thread or
returned to the OS. The process's peak resident memory then grows by a third of the checkpoint's bytes at 100M
parameters (bench/convert_memory.py: `dlmjax.load` of a bf16 checkpoint peaks at 1.35-1.47x its bytes with the
default policy, 1.1-1.2x with a fixed 1 MiB threshold).

`map_large_allocations()` fixes the threshold (glibc's `mallopt(M_MMAP_THRESHOLD)`), which also stops the dynamic
raise. It changes the whole process, for good (glibc cannot switch the dynamic threshold back on): every later
allocation of at least the threshold is mapped and unmapped on its own. The command line does it for the commands
that read or write checkpoints (`convert`, `sample`, `chat`, `forward`, `eval`); in a notebook, start Python with
`MALLOC_MMAP_THRESHOLD_=1048576` in the environment for the same effect, or call this function.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
DEFAULT_THRESHOLD = 1 << 20

__all__ = ["DEFAULT_THRESHOLD", "map_large_allocations"]


def map_large_allocations(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Host allocations of at least `threshold` bytes are mapped on their own and unmapped when freed.

    Returns True if the allocator took the setting, False where there is nothing to set (not Linux, not glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold)))
