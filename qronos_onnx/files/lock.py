"""The exclusive lock of an output: ``OUT.onnx.lock`` beside it, an ``flock`` the kernel
releases when the process dies, holding the pid for the error a second run gives.

The lock file is opened without following a symbolic link, and a file with other hard links
is refused: the lock is written and removed, and must never be a file something else reads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from qronos_onnx.errors import QronosError

from .paths import new_dirs, remove_empty


def lock_path(output: Path) -> Path:
    """The lock file of ``output``: ``OUT.onnx.lock`` beside it."""
    return output.with_name(output.name + ".lock")


@contextmanager
def output_lock(
    output: str | os.PathLike, repair: Callable[[Path], object] | None = None
) -> Iterator[None]:
    """Hold the exclusive lock on ``output`` for the block, after calling ``repair(output)``
    (holding the lock: no live run owns what it finds). The output's directory is created if
    needed, and removed again when the block leaves it empty.

    Raises:
        QronosError: another live process holds the lock (the message names its pid), or the
            lock file is a symbolic link or has other hard links.
    """
    output = Path(output)
    path = lock_path(output)
    created = new_dirs(output.parent)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, output)
    except OSError as err:
        remove_empty(created)
        raise QronosError(f"cannot lock {output} for writing ({path}): {err}") from err
    except BaseException:
        remove_empty(created)
        raise
    try:
        if repair is not None:
            repair(output)
        yield
    finally:
        with contextlib.suppress(OSError):
            if _same_file(fd, path):
                path.unlink()
        os.close(fd)
        remove_empty(created)


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` (not followed) is still the file open as ``fd``."""
    try:
        here = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


def _open(path: Path) -> int:
    """Open (create) the lock file: never through a symbolic link, never a file with other
    hard links, never anything but a regular file."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise QronosError(
                f"the lock file {path} is a symbolic link; remove it (a run never follows "
                "one: it writes and removes its lock)"
            ) from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        what = "is not a regular file" if not stat.S_ISREG(info.st_mode) else "has other hard links"
        raise QronosError(
            f"the lock file {path} {what}; remove it (a run writes and removes its lock, "
            "which must be a file of its own)"
        )
    return fd


def _acquire(path: Path, output: Path) -> int:
    """Open and ``flock`` ``path``; returns the descriptor, holding our pid."""
    while True:
        fd = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise QronosError(
                f"{output} is being written by another run (pid {holder}); wait "
                f"for it to finish (its lock is {path})"
            ) from None
        if not _same_file(fd, path):
            os.close(fd)  # the holder removed the file as we locked it: lock the new one
            continue
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:  # a full disk: leave no empty lock behind
            path.unlink(missing_ok=True)
            os.close(fd)
            raise
        return fd
