"""Outputs survive whatever happens to the run writing them: real signals (SIGTERM, SIGHUP,
SIGINT, SIGKILL) sent at injected points of saving and placing, two runs on one output, files
appearing mid-run, and a full disk."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import onnx
import pytest

from qronos_onnx.cli import main

pytestmark = pytest.mark.slow  # child processes, real signals, mounts

RTN = ["--algo", "rtn", "--group-size", "32", "-q"]

#: A child running the CLI, which sends itself ``SIGNAL`` at an injected point: ``save`` (right
#: after the model and its data are written into the staging directory; ``save:S`` instead
#: waits S seconds before writing them, and sends nothing), ``cleanup`` (when the staging
#: directory is being removed, all files placed) or ``move:N`` (right
#: after the N-th file move of placing or rolling back; several N separated by commas). With a
#: previous output (tokenizer kept), moves 1-3 set data, report and model aside, 4-6 place the
#: new ones, and a rollback moves again from 7 on.
CHILD = textwrap.dedent("""
    import os, signal, sys, time, types
    import qronos_onnx.ir.model_io as model_io, qronos_onnx.files.placement as staging
    point, sig = sys.argv[1], getattr(signal, sys.argv[2])
    kill = lambda: os.kill(os.getpid(), sig)
    if point.startswith("save"):
        write_model, pause = model_io.write_model, float(point[5:] or 0)
        def saving(*args):
            time.sleep(pause)
            written = write_model(*args)
            if not pause:
                kill()
            return written
        model_io.write_model = saving
    elif point == "cleanup":
        rmtree = staging.shutil.rmtree
        def cleaning(*args, **kwargs):
            kill()
            rmtree(*args, **kwargs)
        staging.shutil = types.ModuleType("shutil")
        staging.shutil.__dict__.update(sys.modules["shutil"].__dict__, rmtree=cleaning)
    else:
        at, moves, replace = {int(n) for n in point[5:].split(",")}, [0], os.replace
        def moving(src, dst):
            replace(src, dst)
            moves[0] += 1
            if moves[0] in at:
                kill()
        staging.os = types.ModuleType("os")          # only staging's moves are counted
        staging.os.__dict__.update(os.__dict__, replace=moving)
    from qronos_onnx.cli import main
    sys.exit(main(sys.argv[3:]))
""")


def _default_signal_handling():
    """In the child: default dispositions, whatever the test run inherited (under ``nohup``
    SIGHUP is ignored, and the tool rightly leaves an ignored signal ignored)."""
    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)


def run_child(point, signame, *args, dispositions=_default_signal_handling):
    """The child, with the signal dispositions ``dispositions`` sets before it starts."""
    return subprocess.run(
        [sys.executable, "-c", CHILD, point, signame, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        preexec_fn=dispositions,
    )


def contents(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


@pytest.fixture
def previous(tiny_models, tmp_path):
    """An earlier output in ``tmp_path/out`` (model, data, report, tokenizer): ``(model,
    output, files)``."""
    model = tiny_models("nokv")
    output = tmp_path / "out" / "q.onnx"
    assert main(["optimize", str(model), "-o", str(output), *RTN]) == 0
    files = contents(output.parent)
    assert set(files) == {"q.onnx", "q.onnx.data", "q.report.json", "tokenizer.json"}
    return model, output, files


@pytest.mark.parametrize("signame,code", [("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT", 130)])
@pytest.mark.parametrize("point", ["save", "move:1", "move:4"])
def test_a_signal_while_writing_leaves_the_previous_output(previous, signame, code, point):
    """SIGTERM and SIGHUP roll back like Ctrl-C: killed while saving or between the moves of
    placing (move 1 sets a previous file aside, move 4 places a new one), the previous files
    are back byte for byte, and no staging directory or lock is left."""
    model, output, files = previous
    r = run_child(point, signame, "optimize", model, "-o", output, "--force", "--bits", "2", *RTN)
    assert r.returncode == code, r.stderr
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith(("qronos-onnx: terminated", "qronos-onnx: interrupted"))
    )
    assert contents(output.parent) == files


@pytest.mark.parametrize("signame,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_on_the_last_move_still_rolls_back(previous, signame, code):
    """A signal held while the model (the last file) is moved into place: the placing is
    undone before the signal acts."""
    model, output, files = previous
    r = run_child(
        "move:6", signame, "optimize", model, "-o", output, "--force", "--bits", "2", *RTN
    )
    assert r.returncode == code, r.stderr
    assert contents(output.parent) == files


@pytest.mark.parametrize("signame,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_after_placing_says_the_output_was_written(previous, signame, code):
    """Past the point of no return (every file placed, the staging directory being removed)
    a signal waits for the clean-up, then stops the run, which says that the output is
    complete: the new files are all in place and nothing else is left."""
    model, output, files = previous
    r = run_child(
        "cleanup", signame, "optimize", model, "-o", output, "--force", "--bits", "2", *RTN
    )
    assert r.returncode == code, r.stderr
    assert r.stderr.strip().endswith(f"after {output} was written completely"), r.stderr
    now = contents(output.parent)
    assert set(now) == set(files) and now["q.onnx.data"] != files["q.onnx.data"]
    onnx.checker.check_model(str(output))


def test_closed_standard_streams_are_not_an_error(previous):
    """`>&-` / `2>&-`: the run does its work; what it would print goes nowhere."""
    model, output, files = previous
    for close in (">&-", "2>&-"):
        r = subprocess.run(
            [
                "bash",
                "-c",
                f'"$@" {close}',
                "bash",
                sys.executable,
                "-m",
                "qronos_onnx.cli",
                "optimize",
                str(model),
                "-o",
                str(output),
                "--force",
                "--bits",
                "2",
                *RTN,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
        assert contents(output.parent)["q.onnx.data"] != files["q.onnx.data"]


def test_a_second_interrupt_during_the_rollback_is_held(previous):
    """Ctrl-C while placing, then again: each time the next move could be one of putting the
    previous files back (move 3 right after an interrupt at move 2; move 7 is the rollback's
    first when placing completes first). The rollback completes, then the run stops."""
    model, output, files = previous
    r = run_child(
        "move:2,3,7", "SIGINT", "optimize", model, "-o", output, "--force", "--bits", "2", *RTN
    )
    assert r.returncode == 130, r.stderr
    assert contents(output.parent) == files


@pytest.mark.parametrize(
    "point,left", [("save", "staging directory"), ("move:4", "killed while placing")]
)
def test_the_next_run_repairs_what_a_killed_run_left(previous, point, left, capsys):
    """SIGKILL cannot be handled: killed while saving, the staging directory stays; killed
    while placing, the previous files are in it and a new file is in place. The next run on
    the same output puts the previous files back, removes the rest, and says so."""
    model, output, files = previous
    r = run_child(point, "SIGKILL", "optimize", model, "-o", output, "--force", "--bits", "2", *RTN)
    assert r.returncode == -signal.SIGKILL
    staging = [p for p in output.parent.iterdir() if p.name.endswith(".tmp")]
    assert len(staging) == 1
    set_aside = {p.name for p in (staging[0] / "old").iterdir()}
    assert set_aside == (set() if point == "save" else {"q.onnx", "q.onnx.data", "q.report.json"})
    # the next run on this output repairs first (here it then fails: nothing to quantize)
    assert main(["optimize", str(model), "-o", str(output), "--force", "--exclude", "*", *RTN]) == 2
    err = capsys.readouterr().err
    assert left in err and "UserWarning" in err
    assert contents(output.parent) == files


def test_a_second_run_on_the_same_output_fails_at_once_naming_the_first(previous):
    """Two runs writing one output: the second stops before any work, naming the first's pid
    (which holds the lock for a while here); the first completes and its output loads."""
    model, output, _ = previous
    first = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            "save:20",
            "SIGTERM",
            "optimize",
            str(model),
            "-o",
            str(output),
            "--force",
            *RTN,
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = output.with_name("q.onnx.lock")
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text().strip()):
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "qronos_onnx.cli",
            "optimize",
            str(model),
            "-o",
            str(output),
            "--force",
            *RTN,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert second.returncode == 2
    assert f"being written by another run (pid {first.pid})" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert first.poll() is None  # it failed while the first still ran
    assert first.wait(timeout=300) == 0, first.stderr.read()
    first.stderr.close()
    onnx.checker.check_model(str(output))  # model and data of the same run
    assert not lock.exists()


def test_a_file_that_appears_mid_run_is_not_replaced_without_force(
    tiny_models, tmp_path, monkeypatch, capsys
):
    """The existence check is repeated when placing: an output that another program wrote
    while the run worked is left as it is, and nothing is written."""
    import qronos_onnx.ir.model_io as model_io

    output = tmp_path / "q.onnx"
    write_model = model_io.write_model

    def meanwhile(*args):
        output.with_name("q.onnx.data").write_text("another program's")
        return write_model(*args)

    monkeypatch.setattr(model_io, "write_model", meanwhile)
    assert main(["optimize", str(tiny_models("nokv")), "-o", str(output), *RTN]) == 2
    assert "q.onnx.data appeared while this run was working" in capsys.readouterr().err
    assert contents(tmp_path) == {"q.onnx.data": b"another program's"}


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (Linux, as root); skipped where it cannot be mounted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("a size-limited tmpfs needs Linux and root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)  # even with files open


def test_a_full_disk_while_copying_the_tokenizer_writes_nothing(
    tiny_models, tmp_path, small_disk, capsys
):
    """The tokenizer is placed with the other outputs: a disk that fills up while it is
    copied leaves no output and no truncated tokenizer.json."""
    source = tiny_models("nokv")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        (model_dir / name).write_bytes((source.parent / name).read_bytes())
    size = sum(p.stat().st_size for p in model_dir.iterdir())
    assert size < 1 << 20  # the model fits, the tokenizer not
    (model_dir / "tokenizer.json").write_bytes(b" " * (2 << 20))
    assert (
        main(["optimize", str(model_dir / "model.onnx"), "-o", str(small_disk / "q.onnx"), *RTN])
        == 2
    )
    err = capsys.readouterr().err
    assert "No space left on device" in err and len(err.strip().splitlines()) == 1
    assert list(small_disk.iterdir()) == []


def fill(disk: Path) -> None:
    """Fill ``disk`` to the last byte (unbuffered writes, smaller and smaller)."""
    with open(disk / "filler", "wb", buffering=0) as f:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)


def test_a_full_disk_leaves_no_lock_and_no_olive_config(tiny_models, small_disk, capsys):
    """On a full disk: the lock cannot be written (no empty lock file stays), and
    ``olive-config`` leaves neither a new empty file nor a truncated previous one."""
    (small_disk / "o.json").write_text('{"passes": {}}\n')
    fill(small_disk)
    before = contents(small_disk)
    assert main(["optimize", str(tiny_models("nokv")), "-o", str(small_disk / "q.onnx"), *RTN]) == 2
    assert "No space left on device" in capsys.readouterr().err
    for args in (
        ["-o", str(small_disk / "new.json")],
        ["-o", str(small_disk / "o.json"), "--force"],
    ):
        assert main(["olive-config", "--ours-only", *args]) == 2
        err = capsys.readouterr().err
        assert "No space left on device" in err and len(err.strip().splitlines()) == 1
    assert contents(small_disk) == before


# -- the lock file (round 3 sweep) ------------------------------------------------------------


@pytest.mark.parametrize("link", ["symbolic", "hard", "symbolic elsewhere"])
def test_a_lock_file_that_is_a_link_is_refused_and_its_target_kept(
    tiny_models, tmp_path, link, capsys
):
    """``OUT.onnx.lock`` is written and removed by the run: a lock path that is a link to the
    input's data file (a symbolic link, or a hard link), or a symbolic link anywhere, is
    refused before any work, and the file it leads to stays byte for byte."""
    source = tiny_models("nokv")
    model = tmp_path / "m" / "model.onnx"
    shutil.copytree(source.parent, model.parent)
    target = model.with_name("model.onnx.data")
    if link == "symbolic elsewhere":
        target = tmp_path / "notes.txt"
        target.write_text("somebody's notes")
    before = target.read_bytes()
    lock = tmp_path / "out.onnx.lock"
    if link == "hard":
        os.link(target, lock)
    else:
        lock.symlink_to(target.relative_to(tmp_path))
    assert main(["optimize", str(model), "-o", str(tmp_path / "out.onnx"), *RTN]) == 2
    err = capsys.readouterr().err
    assert "out.onnx.lock" in err and len(err.strip().splitlines()) == 1, err
    assert target.read_bytes() == before
    assert not (tmp_path / "out.onnx").exists()


def test_an_input_named_like_the_lock_is_not_deleted(tiny_models, tmp_path, capsys):
    """An input model ``q.onnx.lock`` with ``-o q.onnx``: the lock would be that file."""
    source = tiny_models("nokv")
    shutil.copy(source.with_name("model.onnx.data"), tmp_path / "model.onnx.data")
    shutil.copy(source, tmp_path / "q.onnx.lock")
    before = (tmp_path / "q.onnx.lock").read_bytes()
    assert (
        main(["optimize", str(tmp_path / "q.onnx.lock"), "-o", str(tmp_path / "q.onnx"), *RTN]) == 2
    )
    assert "reads it" in capsys.readouterr().err
    assert (tmp_path / "q.onnx.lock").read_bytes() == before


def _ignore_sigint():
    _default_signal_handling()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a script's background job has it


def test_an_ignored_signal_while_placing_stays_ignored(previous):
    """SIGINT ignored by the caller (a background job of a script; ``nohup`` does the same to
    SIGHUP) and sent while the files are being placed: it stays ignored, the run completes."""
    model, output, files = previous
    args = ["optimize", model, "-o", output, "--force", "--bits", "2", *RTN]
    r = run_child("move:4", "SIGINT", *args, dispositions=_ignore_sigint)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    now = contents(output.parent)
    assert set(now) == set(files) and now["q.onnx.data"] != files["q.onnx.data"]


def test_the_repair_after_sigkill_runs_without_force(previous, capsys):
    """Killed while placing, a run leaves the previous files set aside: the next run on the
    output, even without ``--force``, repairs first (with a warning) and only then refuses to
    replace the output; ``eval`` meanwhile says what happened."""
    model, output, files = previous
    r = run_child(
        "move:4", "SIGKILL", "optimize", model, "-o", output, "--force", "--bits", "2", *RTN
    )
    assert r.returncode == -signal.SIGKILL
    assert not output.exists()
    assert main(["eval", str(output), "--windows", "1", "--seqlen", "16"]) == 2
    assert "a run writing it was killed" in capsys.readouterr().err
    assert main(["optimize", str(model), "-o", str(output), *RTN]) == 2
    err = capsys.readouterr().err
    assert "killed while placing" in err and "exists; give force" in err
    assert contents(output.parent) == files
