"""SIGTERM taken as Ctrl-C: what `sr3` and the training scripts do when a job scheduler or `kill` stops them."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is: a KeyboardInterrupt, so the clean-up that Ctrl-C gets (temporary files
    removed, partial results left as they were, the "where to resume" line) runs for it too."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises [`Terminated`] in this process; the previous handler is put back after it.

    Signal handlers can be set in the main thread only: elsewhere SIGTERM keeps its handler. A process forked inside
    the block (a pool or data loader worker) inherits the handler; there SIGTERM ends the process as by default, as
    the pool that sends it to stop its workers expects.
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

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        # None: a handler not set from Python, which cannot be put back; the default is what it was.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
