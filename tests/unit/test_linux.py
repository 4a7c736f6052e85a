"""A process that ends with its parent (service/linux.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from service import linux

ROOT = Path(__file__).resolve().parents[2]
ON_LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent's death signal is Linux's")

#: A process that asks to end with its parent (pid in argv[1]), says so, and stops gracefully on SIGTERM.
_CHILD = """
import signal, sys, time
from service.linux import end_with_parent
def stop(signum, frame):
    print("stopped", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("set" if end_with_parent(int(sys.argv[1])) else "not set", flush=True)
time.sleep(60)
print("not stopped", flush=True)
"""

#: A parent that starts ``_CHILD`` with its own pid, says the child's pid, and waits to be killed.
_PARENT = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid())])
print(child.pid, flush=True)
time.sleep(60)
"""


def _python(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", *args], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )


@ON_LINUX
def test_a_process_stops_gracefully_when_its_parent_is_killed_outright() -> None:
    parent = _python(_PARENT, _CHILD)
    assert parent.stdout is not None  # for mypy: PIPE
    child_pid = int(parent.stdout.readline())
    try:
        assert parent.stdout.readline().strip() == "set"
        parent.kill()  # no time to stop its child: the kernel does
        stdout, _ = parent.communicate(timeout=30)  # the pipe ends when the child has ended too
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child_pid, signal.SIGKILL)
    assert stdout.split() == ["stopped"]


@ON_LINUX
def test_a_process_whose_parent_ended_before_it_asked_stops_at_once() -> None:
    """The parent may end between the process's start and its request: the process then has another parent."""
    child = _python(_CHILD, str(os.getppid()))  # the pid of its parent's parent: not its parent
    try:
        stdout, _ = child.communicate(timeout=30)
    finally:
        child.kill()
        child.communicate()
    assert stdout.split() == ["stopped"]  # at the request itself, before it returned


def test_elsewhere_than_on_linux_nothing_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert linux.end_with_parent(-1) is False  # no signal either: a wrong parent is not looked at
