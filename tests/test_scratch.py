"""Scratch arrays: file-backed, unlinked at once, their pages given back after writing."""

from pathlib import Path

import numpy as np

from qronos_onnx.files.scratch import ScratchArrays, release_pages


def _rss_file() -> int:
    """This process's resident file-backed memory, bytes (``/proc/self/status``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


def test_a_kept_array_is_a_map_of_an_unlinked_file_and_keeps_its_values(tmp_path):
    store = ScratchArrays(tmp_path / "s" / "a")
    source = np.arange(70_000, dtype=np.float32).reshape(700, 100)
    kept = store.keep(source)
    assert np.array_equal(kept, source) and kept.dtype == source.dtype
    assert not list((tmp_path / "s").iterdir())  # unlinked: nothing left on disk
    maps = Path("/proc/self/maps").read_text()
    assert f"{tmp_path / 's' / 'a'}.0 (deleted)" in maps
    assert store.bytes == source.nbytes
    assert store.keep(np.zeros((0, 3))).shape == (0, 3)  # empty: as it is


def test_released_pages_leave_resident_memory_and_come_back_on_read(tmp_path):
    """A written 64 MB array holds 64 MB of file-backed resident memory until its pages are
    released; reading it afterwards gives the written values."""
    store = ScratchArrays(tmp_path / "b")
    array = store.allocate((16, 1 << 20), np.float32)
    before = _rss_file()
    array[...] = 1.5
    written = _rss_file()
    assert written - before > 60 << 20
    release_pages(array)
    assert written - _rss_file() > 60 << 20
    assert float(array[7].sum()) == 1.5 * (1 << 20)
    release_pages(np.ones(4))  # an array in memory: nothing to do
