"""Signal handling shared by the service's long-running commands (``winback demo``, the benchmarks, the processes
that start workers)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def sigterm_raises(exception: Callable[[int], BaseException], *, keep_ignored: bool = False) -> Iterator[None]:
    """Run the block with SIGTERM raising ``exception(signum)``, so the process ends through the block's ``finally``
    clauses and context exits, which Python's default handling (ending at once) skips; the previous handler is put
    back after. Off the main thread (where Python runs signal handlers) the block runs as it is, and so it does when
    SIGTERM is ignored and ``keep_ignored`` says a caller ignoring it keeps ignoring it."""
    ignored = keep_ignored and signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    if ignored or threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_it(signum: int, frame: object) -> None:
        raise exception(signum)

    previous = signal.signal(signal.SIGTERM, raise_it)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def sigterm_exits() -> contextlib.AbstractContextManager[None]:
    """While a bench runs, SIGTERM ends it as Ctrl-C does, through its ``finally`` blocks (exit status 128 +
    SIGTERM), so a bench stopped that way stops the processes it started; a caller ignoring SIGTERM keeps ignoring
    it."""
    return sigterm_raises(lambda signum: SystemExit(128 + signum), keep_ignored=True)


def restore_sigchld_default() -> bool:
    """Put SIGCHLD back to its default when this process started with it ignored; whether it did.

    An ignored SIGCHLD is inherited across exec (some supervisors and CI runners leave it so), and with it the
    kernel reaps every child itself: no child's exit can be read. ``multiprocessing`` then reads an ended worker as
    alive for good, and ``subprocess`` reads any child's exit as 0. A process that starts children owns this
    setting: call this in the main thread before the first child starts (off it, where signals cannot be set,
    nothing changes). A handler of the process's own is kept."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGCHLD) != signal.SIG_IGN:
        return False
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    return True
