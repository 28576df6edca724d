"""Signals during a run: SIGTERM and SIGHUP stop it the way Ctrl-C does (so that its clean-up
runs), and the moves that place an output are never cut in half by one.

A signal whose disposition is ``SIG_IGN`` (``nohup``, a script's background job) stays ignored
throughout: a run never starts reacting to a signal its caller chose to ignore.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: Signals that end a run the way Ctrl-C does (with the clean-up of an interrupted run).
TERMINATING = (signal.SIGTERM, signal.SIGHUP)
#: Signals held while files are being placed (``held_signals``).
HELD = (signal.SIGINT, *TERMINATING)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C's ``KeyboardInterrupt`` so that clean-up runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_terminated(signum, frame) -> None:
    raise Terminated(signum)


@contextmanager
def termination_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGHUP raise ``Terminated`` instead of killing the
    process on the spot. Only default handlers are replaced (a program embedding the library
    keeps its own, an ignored signal stays ignored), and only in the main thread (where Python
    runs signal handlers)."""
    previous = {}
    if _in_main_thread():
        for signum in TERMINATING:
            if signal.getsignal(signum) == signal.SIG_DFL:
                previous[signum] = signal.signal(signum, _raise_terminated)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def held_signals() -> Iterator[list[int]]:
    """Hold SIGINT, SIGTERM and SIGHUP until the block ends, then deliver the first one
    received to the handler that was in place. Yields the list of signals received so far,
    for the block to act on. Ignored signals stay ignored (they are neither held nor
    delivered); outside the main thread nothing is held and the list stays empty."""
    received: list[int] = []
    if not _in_main_thread():
        yield received
        return
    previous = {
        s: signal.signal(s, lambda signum, frame: received.append(signum))
        for s in HELD
        if signal.getsignal(s) != signal.SIG_IGN
    }
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            signal.raise_signal(received[0])
