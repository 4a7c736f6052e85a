"""Linux's per-process and per-thread settings (``prctl(2)``, through ctypes); elsewhere each call does nothing."""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys

#: ``prctl(2)``'s options used here.
PR_SET_PDEATHSIG = 1
PR_SET_TIMERSLACK = 29


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def prctl(option: int, value: int) -> bool:
    """``prctl(option, value)``, its other arguments 0; False where the system does not support it (not Linux, or a
    kernel that refuses the option)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        unused = ctypes.c_ulong(0)  # prctl(2) takes unsigned longs after the option
        return int(_libc().prctl(option, ctypes.c_ulong(value), unused, unused, unused)) == 0
    except (OSError, AttributeError):
        return False


def end_with_parent(parent_pid: int) -> bool:
    """Have the kernel send this process SIGTERM when its parent (``parent_pid``, as the parent recorded it before
    starting it) ends, however it ends: SIGKILL and the OOM killer leave it no time to stop its children itself.
    A parent already gone when this is called (the process's parent is now another one) is a SIGTERM at once.
    False where the system cannot do it (not Linux): nothing is set then.

    The kernel sends the signal when the *thread* that started the process ends, not the whole parent: the
    parent must start it from a thread that lives as long as it does (its main thread). The setting is not
    inherited by the process's own children."""
    if not prctl(PR_SET_PDEATHSIG, signal.SIGTERM):
        return False
    if os.getppid() != parent_pid:  # it ended before the call, or this process is not its child at all
        os.kill(os.getpid(), signal.SIGTERM)
    return True
