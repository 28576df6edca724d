"""The values that cross stage boundaries, kept for every calibration window until their last
use: in memory up to a byte budget, and beyond it in files (one per value, the windows
appended) in a folder of the run's (the output's staging folder), read back window by window.

Arrays keep their own dtype (the activations' dtype: float32 for a float32 model, float16 for
a float16 one); a window read back from a file is byte for byte the one written. Files are
written and read with plain ``write``/``read`` calls, not memory-mapped: what sits on disk is
in the operating system's page cache at most, never in the process's resident memory.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class _Spilled:
    """Where one window of a value lies in its file."""

    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass
class StoreUse:
    """What a store held: bytes in memory and on disk now, and the most of each at once."""

    in_memory: int = 0
    on_disk: int = 0
    peak_in_memory: int = 0
    peak_on_disk: int = 0
    spilled_values: set = field(default_factory=set)


class BoundaryStore:
    """Per-window arrays under keys, in memory up to ``budget`` bytes, then in files.

    Args:
        windows: the number of calibration windows.
        budget: bytes of arrays kept in memory at once; a window that would go beyond it is
            written to a file instead.
        folder: where the files go (created when the first window spills); ``None``: never
            spill (the budget is then ignored).
    """

    def __init__(self, windows: int, budget: int, folder: Path | None):
        self.windows, self.budget, self.folder = windows, budget, folder
        self._memory: dict[Hashable, dict[int, np.ndarray]] = {}
        self._files: dict[Hashable, tuple[Path, dict[int, _Spilled]]] = {}
        self._opened = 0
        self.use = StoreUse()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._memory or key in self._files

    def put(self, key: Hashable, window: int, array: np.ndarray) -> None:
        """Keep window ``window`` of ``key`` (replacing one kept before)."""
        array = np.ascontiguousarray(array)
        self._forget(key, window)
        if self.folder is None or self.use.in_memory + array.nbytes <= self.budget:
            self._memory.setdefault(key, {})[window] = array
            self.use.in_memory += array.nbytes
            self.use.peak_in_memory = max(self.use.peak_in_memory, self.use.in_memory)
            return
        path, windows = self._files.get(key) or (self._file_for(key), {})
        self._files[key] = (path, windows)
        with open(path, "ab") as f:
            offset = f.tell()
            array.tofile(f)
        windows[window] = _Spilled(offset, array.shape, array.dtype)
        self.use.on_disk += array.nbytes
        self.use.peak_on_disk = max(self.use.peak_on_disk, self.use.on_disk)
        self.use.spilled_values.add(key)

    def get(self, key: Hashable, window: int) -> np.ndarray:
        """Window ``window`` of ``key``."""
        kept = self._memory.get(key, {}).get(window)
        if kept is not None:
            return kept
        path, windows = self._files[key]
        where = windows[window]
        count = int(np.prod(where.shape))
        return np.fromfile(path, where.dtype, count, offset=where.offset).reshape(where.shape)

    def drop(self, key: Hashable) -> None:
        """Forget every window of ``key`` (its file is removed)."""
        for array in self._memory.pop(key, {}).values():
            self.use.in_memory -= array.nbytes
        spilled = self._files.pop(key, None)
        if spilled is not None:
            path, windows = spilled
            self.use.on_disk -= sum(
                int(np.prod(w.shape)) * w.dtype.itemsize for w in windows.values()
            )
            path.unlink(missing_ok=True)

    def clear(self) -> None:
        for key in [*self._memory, *self._files]:
            self.drop(key)

    def _forget(self, key: Hashable, window: int) -> None:
        old = self._memory.get(key, {}).pop(window, None)
        if old is not None:
            self.use.in_memory -= old.nbytes

    def _file_for(self, key: Hashable) -> Path:
        assert self.folder is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        self._opened += 1
        return self.folder / f"value{self._opened}.bin"
