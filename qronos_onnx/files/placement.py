"""Outputs placed all or nothing, whatever happens to the process writing them.

A run that writes ``OUT.onnx`` and its companions (data file, report, tokenizer), holding the
output's lock (``files.lock``):

1. repairs what an earlier run killed mid-write left behind (``recover``);
2. writes every file into a staging directory beside it (``staged_output``:
   ``.OUT.onnx.<random>.tmp/new``);
3. places them: each name already there moves into ``old/``, then each new file moves into
   place, the model last. A plan file written first records what was there; a marker written
   after the last move says the placing completed. Any failure, Ctrl-C, SIGTERM or SIGHUP
   rolls back (previous files back byte for byte); signals arriving while files are being
   moved or put back are held until the moves are done (``files.signals``), so a rollback is
   never cut in half.

SIGKILL cannot be caught. What it can leave: killed while writing, the staging directory
(no previous file touched); killed while placing, the previous files in ``old/`` and some of
the new ones in place. The next run on the same output finds that directory (the lock says
no live run owns it), puts the previous files back, removes the rest, and says so.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from qronos_onnx.errors import QronosError

from .paths import new_dirs, remove_empty
from .signals import held_signals

_PLAN = "plan.json"  # written before the first move: what placing will do
_PLACED = "placed"  # written after the last move: nothing to undo


def staging_dirs(output: Path) -> list[Path]:
    """Staging directories of ``output`` (``.OUT.onnx.*.tmp``) beside it."""
    return sorted(output.parent.glob(f".{output.name}.*.tmp"))


def recover(output: str | os.PathLike) -> list[str]:
    """Repair what runs killed while writing ``output`` left behind; call it holding the lock
    (so that no live run owns a staging directory). Returns (and warns) what was done."""
    output = Path(output)
    done = []
    for tmp in staging_dirs(output):
        plan = _read_plan(tmp)
        if plan is not None and not (tmp / _PLACED).exists():
            restored = _roll_back(
                tmp / "new", tmp / "old", output.parent, plan["names"], plan["existing"]
            )
            what = (
                f"put back the previous {', '.join(restored)}"
                if restored
                else "removed its partly placed files"
            )
            done.append(
                f"a run on {output} (pid {plan['pid']}) was killed while placing its files: {what}"
            )
        elif plan is not None:
            done.append(
                f"removed the staging directory {tmp} of a run on {output} that was "
                "killed after placing its files (its output is complete)"
            )
        else:
            done.append(
                f"removed the staging directory {tmp} of a run on {output} that was "
                "killed while writing (no previous file had been touched)"
            )
        shutil.rmtree(tmp, ignore_errors=True)
    for message in done:
        warnings.warn(message, UserWarning, stacklevel=3)
    return done


def _read_plan(tmp: Path) -> dict | None:
    """The plan of a staging directory; ``None`` when placing never started (no plan, or one
    cut short while being written: nothing had moved yet)."""
    try:
        return json.loads((tmp / _PLAN).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _new_staging_dir(output: Path) -> Path:
    """A new ``.OUT.onnx.<random>.tmp`` beside ``output`` (the name ``recover`` looks for)."""
    return Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))


@contextmanager
def staging_folder(output: str | os.PathLike) -> Iterator[Path]:
    """The run's staging folder beside ``output`` (``.OUT.onnx.<random>.tmp``; its folder
    exists), for what the run writes while it works (activations beyond its memory budget) and
    then for ``staged_output``. Removed at the end, unless it keeps previous files that could
    not be put back (its ``old/``: the error said so); after SIGKILL, ``recover`` removes it."""
    tmp = _new_staging_dir(Path(output))
    try:
        yield tmp
    finally:  # after placing, ``staged_output`` removed it already (signals held)
        old = tmp / "old"
        if tmp.exists() and not (old.is_dir() and any(old.iterdir())):
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def staged_output(
    output: str | os.PathLike,
    names: Sequence[str],
    force: bool = False,
    folder: Path | None = None,
) -> Iterator[Path]:
    """A staging directory beside ``output`` for the files ``names``, placed together at the end
    (``folder``: a ``staging_folder`` of the run's to stage in; else one is made).

    The block writes (some of) ``names`` into the yielded directory. When it completes, the
    files are placed (see the module docstring) in the order given: name the model last, so
    that it never appears before its data; a name the block did not write is thereby removed
    (a stale data file of an older output). Without ``force`` a name that exists at placing
    time is refused (it appeared while the run was working), before anything moves. If the
    block or any move fails, interrupts included, the file system is left as it was.

    Raises:
        QronosError: an ``OSError`` while writing or placing the files, a file that appeared
            at the output without ``force``, or previous files that could not be put back
            (the message says where they are).
    """
    output = Path(output)
    parent = output.parent
    created = new_dirs(parent)
    tmp, done = folder, False
    try:
        parent.mkdir(parents=True, exist_ok=True)
        if tmp is None:
            tmp = _new_staging_dir(output)
        (tmp / "new").mkdir()
        (tmp / "old").mkdir()
        yield tmp / "new"
        with held_signals() as received:
            _place(tmp, parent, names, force, received)
            done = True
            _clean_up(tmp, done, created)  # signals still held: never cut short
    except OSError as err:
        raise QronosError(f"could not write {output}: {err}") from err
    except KeyboardInterrupt as err:  # Terminated included
        if done:  # arrived after the point of no return
            err.completed_output = output  # type: ignore[attr-defined]
        raise
    finally:
        if not done:
            _clean_up(tmp, done, created)


def _clean_up(tmp: Path | None, done: bool, created: Sequence[Path]) -> None:
    """Remove the staging directory (kept when placing failed and previous files could not be
    put back: they are in its ``old/``) and, on failure, the directories made for the output."""
    if tmp is not None:
        shutil.rmtree(tmp / "new", ignore_errors=True)
        old = tmp / "old"
        if done or not (old.is_dir() and any(old.iterdir())):
            shutil.rmtree(tmp, ignore_errors=True)
    if not done:
        remove_empty(created)


class _SignalWhilePlacing(Exception):
    """A held signal arrived while the files were being placed: undo, then let it act."""


def _place(
    tmp: Path, parent: Path, names: Sequence[str], force: bool, received: Sequence[int] = ()
) -> None:
    """Move ``names`` from ``tmp/new`` into ``parent`` after moving those there into
    ``tmp/old``; on any exception, or when a signal was ``received`` meanwhile, undo (see
    ``staged_output``)."""
    new, old = tmp / "new", tmp / "old"
    existing = [name for name in names if os.path.lexists(parent / name)]
    if existing and not force:
        raise QronosError(
            f"{parent / existing[0]} appeared while this run was working; it was "
            "left as it is and nothing was written (give force to replace it)"
        )
    plan = {"pid": os.getpid(), "names": list(names), "existing": existing}
    (tmp / _PLAN).write_text(json.dumps(plan), encoding="utf-8")
    try:
        for name in existing:
            os.replace(parent / name, old / name)
        for name in names:
            if (new / name).exists():
                os.replace(new / name, parent / name)
        if received:
            raise _SignalWhilePlacing
        (tmp / _PLACED).touch()
    except BaseException as err:
        _roll_back(new, old, parent, names, existing)
        lost = [name for name in existing if os.path.lexists(old / name)]
        if lost:
            raise QronosError(
                f"could not put back {', '.join(lost)} after a failed write; the "
                f"previous files are in {old}"
            ) from err
        raise


def _roll_back(
    new: Path, old: Path, parent: Path, names: Sequence[str], existing: Sequence[str]
) -> list[str]:
    """Undo a partial placing: files placed from ``new`` are removed, files moved into ``old``
    go back. Returns the names put back (a name that cannot be is left in ``old``)."""
    restored = []
    for name in names:
        placed = (
            (name not in existing or os.path.lexists(old / name))
            and os.path.lexists(parent / name)
            and not os.path.lexists(new / name)
        )
        if placed:
            (parent / name).unlink(missing_ok=True)
        if os.path.lexists(old / name):
            try:
                os.replace(old / name, parent / name)
                restored.append(name)
            except OSError:
                pass
    return restored


def write_text_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` all or nothing: into a temporary file beside it, renamed over
    it when complete (a full disk leaves the previous file, or none, never a truncated one).

    Raises:
        QronosError: the file could not be written.
    """
    created = new_dirs(path.parent)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(name)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as err:
        raise QronosError(f"could not write {path}: {err}") from err
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if not path.exists():
            remove_empty(created)
