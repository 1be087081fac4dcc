"""SIGTERM taken as Ctrl-C: what `sr3` and the training scripts do when a job scheduler or `kill` stops them."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator


def _default_sigterm_in_child() -> None:
    # A forked process (a pool or data loader worker) must end on SIGTERM as by default, the moment it arrives: a
    # Python-level handler runs only when the interpreter next gets to bytecode, so a worker that receives it just
    # before it blocks in C (a queue's semaphore) would wait forever, and the pool that stops it with SIGTERM with it.
    # (The forking thread is the child's main thread by now, wherever the fork came from: this may set handlers.)
    if getattr(signal.getsignal(signal.SIGTERM), "_sr3_sigterm_as_interrupt", False):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


if hasattr(os, "register_at_fork"):  # POSIX: Windows has no fork
    os.register_at_fork(after_in_child=_default_sigterm_in_child)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is: a KeyboardInterrupt, so the clean-up that Ctrl-C gets (temporary files
    removed, partial results left as they were, the "where to resume" line) runs for it too."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises [`Terminated`] in this process; the previous handler is put back after it.

    Signal handlers can be set in the main thread only: elsewhere SIGTERM keeps its handler. A process forked inside
    the block (a pool or data loader worker) gets SIGTERM's default back as it starts, so SIGTERM ends it, as the
    pool that sends it to stop its workers expects.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()

    def terminated(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Terminated()

    terminated._sr3_sigterm_as_interrupt = True  # type: ignore[attr-defined]
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        # None: a handler not set from Python, which cannot be put back; the default is what it was.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM are recorded, not acted on; after it, the first one recorded is raised
    again with the handlers put back, so it does then what it would have done (Ctrl-C's KeyboardInterrupt, a
    `sigterm_as_interrupt` block's [`Terminated`], or the process's end).

    For steps that must not be cut in two (a folder's final renames). Main thread only: elsewhere the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def record(signum: int, frame: object) -> None:
        received.append(signum)

    previous = {signum: signal.signal(signum, record) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if received:
            signal.raise_signal(received[0])
