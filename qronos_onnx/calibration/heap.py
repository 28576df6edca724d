"""Give the heap memory freed by a stage back to the operating system.

glibc serves allocations below its mmap threshold (which grows up to 32 MB as large blocks are
freed) from per-thread heaps and keeps what is freed there for reuse; with ONNX Runtime's and
torch's threads allocating activations of many sizes, that kept memory grew with depth
(benchmarks/RESULTS.md, "Memory at real widths"). ``malloc_trim`` returns it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return None


def return_freed_memory() -> None:
    """``malloc_trim(0)`` where the C library has it; otherwise nothing."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
