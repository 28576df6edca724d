"""Arrays written once to a scratch file and read back memory-mapped.

What a run must keep for the whole model but reads rarely (every solved layer's codes, until
the output is written) goes here, so that it is held in file-backed pages, which the kernel
drops under memory pressure and reads back on use, instead of in the process's own memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class ScratchArrays:
    """An append-only file of arrays (``keep``), each read back as a copy-on-write memory map.

    The maps stay valid after the file is removed (POSIX): a scratch folder can be cleaned up
    while the arrays are still in use; its disk space is freed with the last map.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        self.bytes = 0

    def keep(self, array: np.ndarray) -> np.ndarray:
        """``array``'s values, now backed by the file (an empty array is returned as is)."""
        if array.size == 0:
            return array
        array = np.ascontiguousarray(array)
        with open(self.path, "ab") as f:
            offset = f.tell()
            array.tofile(f)
        self.bytes += array.nbytes
        return np.memmap(self.path, array.dtype, "c", offset, array.shape)
