"""Arrays written once to scratch files and read back memory-mapped.

What a run must keep for the whole model but reads rarely (every solved layer's codes, the
rotated weights, until the output is written) goes here, so that it is held in file-backed
pages, which the kernel drops under memory pressure and reads back on use, instead of in the
process's own memory.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np


class ScratchArrays:
    """Arrays each in a file of its own (``<path>.<k>``), memory-mapped and unlinked at once.

    An unlinked file lives as long as its map (POSIX): an array's disk space is freed when the
    array is, a replaced array (a weight rotated twice) takes no space, and a killed run leaves
    no file behind.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.bytes = 0  # written so far
        self._count = 0

    def keep(self, array: np.ndarray) -> np.ndarray:
        """``array``'s values, now backed by a file (an empty array is returned as is)."""
        if array.size == 0:
            return array
        kept = self.allocate(array.shape, array.dtype)
        kept[...] = array
        release_pages(kept)
        return kept

    def allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A new zero-filled array backed by a file, for the caller to fill (block by block:
        its pages go to the file, not to the process's heap)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes == 0:
            return np.zeros(shape, dtype)
        path = self.path.with_name(f"{self.path.name}.{self._count}")
        self._count += 1
        self.bytes += nbytes
        with open(path, "wb") as f:
            f.truncate(nbytes)
        try:
            return np.memmap(path, dtype, "r+", 0, shape)
        finally:
            path.unlink()


def release_pages(array: np.ndarray) -> None:
    """Take a file-backed array's pages out of the process's resident memory (they stay in
    the page cache, written back to the file, and come back on the next read); nothing for
    an array in memory."""
    base = array.base
    while isinstance(base, (np.ndarray, memoryview)):
        base = base.obj if isinstance(base, memoryview) else base.base
    if isinstance(base, mmap.mmap):
        base.madvise(mmap.MADV_DONTNEED)
