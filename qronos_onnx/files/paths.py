"""File-system rules for the files a run writes beside its output: names the file system can
hold, a folder that can be written, and never a file an input reads (by path, through a
symbolic link or through a hard link)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from qronos_onnx.errors import QronosError

#: How much longer than the output's name the longest name written beside it is: the
#: staging directory ``.OUT.<8 random characters>.tmp``.
STAGING_EXTRA = 14


def new_dirs(directory: Path) -> list[Path]:
    """``directory`` and its ancestors that do not exist yet, deepest first."""
    return [d for d in (directory, *directory.parents) if not d.exists()]


def remove_empty(directories: Sequence[Path]) -> None:
    """Remove ``directories`` (deepest first) while they are empty: the first that is not (or
    is gone) stops it, keeping the ones above."""
    with contextlib.suppress(OSError):
        for directory in directories:
            directory.rmdir()


def check_output_place(output: Path, names: Sequence[str], read: Mapping[Path, str]) -> None:
    """Check, before any work, that the files ``names`` (plain names, ``output``'s own among
    them) can be written beside ``output`` and that none of them is a file an input reads, even
    through a link. ``read`` maps each resolved path an input reads to that input's name.

    Raises:
        QronosError: a name too long for the file system, a folder that cannot be written, a
            name that is a directory, or a file an input reads.
    """
    limit = name_max(output.parent)
    if len(os.fsencode(output.name)) + STAGING_EXTRA > limit:
        raise QronosError(
            f"the output name {output.name!r} is too long: this file system allows {limit} "
            f"bytes per name, and the files written beside it need {limit - STAGING_EXTRA} at "
            "most"
        )
    for name in names:
        if len(os.fsencode(name)) > limit:
            raise QronosError(
                f"the file name {name!r} is longer than the {limit} bytes this file system "
                "allows; choose a shorter name"
            )
    if output.is_dir():
        raise QronosError(f"{output} is a directory; give the output model's file name")
    check_writable_dir(output.parent)
    paths = [output.with_name(name) for name in names]
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            raise QronosError(f"{path} is a directory; it would be replaced by a file")
    inodes = {inode(p): source for p, source in read.items()}
    inodes.pop(None, None)
    for path in paths:
        source = read.get(path.resolve()) or inodes.get(inode(path))
        if source is not None:
            link = "" if path.resolve() in read else " through a hard link"
            raise QronosError(
                f"refusing to overwrite {path}: the input model {source} reads it{link}; "
                "choose another output"
            )


def refuse_existing(output: Path, names: Sequence[str], force: bool) -> None:
    """Refuse (without ``force``) to replace files that exist beside ``output``."""
    existing = [output.with_name(n) for n in names if os.path.lexists(output.with_name(n))]
    if existing and not force:
        raise QronosError(f"{existing[0]} exists; give force to overwrite it")


def inode(path: Path) -> tuple[int, int] | None:
    """``(device, inode)`` of an existing file (hard links share it), else ``None``."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def name_max(directory: Path) -> int:
    """The longest file name (bytes) the file system of ``directory`` (or its nearest existing
    ancestor) allows; 255 where it cannot be asked."""
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def check_writable_dir(directory: Path) -> None:
    """``directory`` exists and is writable, or can be created (its nearest existing ancestor
    is a writable directory)."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise QronosError(f"{existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise QronosError(f"cannot write into {existing}: permission denied")
