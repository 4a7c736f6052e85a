"""How `winback serve` and its worker processes tell each other about a worker's start.

With several workers, uvicorn starts each in a process of its own, from the command's main thread, and starts
another in place of one that died. Two things cross that boundary:

- **The command's pid** (``WORKERS_PARENT_ENV``): each worker asks the kernel for a SIGTERM when the command ends
  (``service/linux.py``), so a command killed outright (SIGKILL, the OOM killer) leaves no worker holding the port
  and serving a model that no longer follows the registry.
- **Why a worker could not start** (``STARTUP_NOTES_ENV``, a folder per command). A worker whose app or lifespan
  fails ends with uvicorn's start-up failure code, on which uvicorn stops the other workers and returns; a worker
  that ended any other way is started again, and one whose start fails for good (a merchant config broken on disk
  since the command checked it, read again by a worker started in place of a dead one) was started again for ever.
  The worker leaves its reason in the folder, and the command fails with it (``WorkerStartupError``).

uvicorn does not stop for every failed start: a worker that fails to replace another in a SIGHUP restart is given
up, and the old one keeps serving. Its note must not make the command's later stop (by SIGINT or SIGTERM) read as a
failure: ``StartupWatch`` notes the signals the command received, and a stop that came with one is a stop.

A worker takes both settings out of its environment as it starts (``take_worker_settings``), so nothing it starts
inherits them. With one worker uvicorn serves in the command's process: its failed start is kept in memory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from pathlib import Path
from types import TracebackType

#: The pid of the command whose worker processes serve (unset with one worker).
WORKERS_PARENT_ENV = "WINBACK_WORKERS_PARENT_PID"
#: The folder where a worker that cannot start leaves its reason (unset with one worker).
STARTUP_NOTES_ENV = "WINBACK_STARTUP_NOTES_DIR"
#: A note is the error's text, cut to this many characters.
_NOTE_CHARS = 4000
#: The signals that stop uvicorn's supervisor.
_STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})

#: This process's notes folder, taken from the environment as the worker started.
_notes_folder: str | None = None
#: Why a start in this process failed (one worker: uvicorn serves in the command's process).
_failed_here: str | None = None


class WorkerStartupError(RuntimeError):
    """A worker of the decision API could not start (its app or its lifespan failed); the server stopped."""


def take_worker_settings() -> int | None:
    """In a worker, as it starts: take the command's settings for its workers out of the environment (nothing the
    worker starts inherits them); the command's pid to end with, if it has one.

    ValueError if the pid is not a number."""
    global _notes_folder
    _notes_folder = os.environ.pop(STARTUP_NOTES_ENV, None) or _notes_folder
    parent_pid = os.environ.pop(WORKERS_PARENT_ENV, None)
    if parent_pid is None:
        return None
    try:
        return int(parent_pid)
    except ValueError:
        raise ValueError(f"{WORKERS_PARENT_ENV} is not a process id: {parent_pid!r}") from None


def startup_failed(error: BaseException) -> None:
    """In a worker whose start failed: keep ``error``'s text for the command (in memory, and in the notes folder
    when the command named one)."""
    global _failed_here
    text = f"{type(error).__name__}: {error}"[:_NOTE_CHARS]
    _failed_here = text
    if _notes_folder:
        with contextlib.suppress(OSError):  # the worker's own log line says it anyway
            Path(_notes_folder, f"worker-{os.getpid()}.txt").write_text(text, encoding="utf-8")


class StartupWatch:
    """The command's side, around ``uvicorn.run``: the environment its workers start with (``environment``: the
    command sets it), and afterwards whether it stopped because a worker could not start
    (``raise_if_a_start_failed``). In the main thread."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._stack = contextlib.ExitStack()
        self._notes: Path | None = None
        self._signals_read: int | None = None  # the read end of the pipe the interpreter writes signal numbers to
        self._previous_wakeup = -1
        #: What the workers' environment holds while the watch runs (None: unset), for the command to set.
        self.environment: dict[str, str | None] = {WORKERS_PARENT_ENV: None, STARTUP_NOTES_ENV: None}

    def __enter__(self) -> StartupWatch:
        global _failed_here
        _failed_here = None
        if self.workers > 1:
            self._notes = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="winback-serve-")))
            self.environment = {WORKERS_PARENT_ENV: str(os.getpid()), STARTUP_NOTES_ENV: str(self._notes)}
            self._watch_signals()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stack.close()

    def _watch_signals(self) -> None:
        """Have the interpreter write the number of each signal it handles to a pipe (``signal.set_wakeup_fd``):
        uvicorn's supervisor replaces the command's handlers with its own, and this sees what they received."""
        if threading.current_thread() is not threading.main_thread():
            return
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        self._signals_read = read
        self._previous_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)

        def restore() -> None:
            signal.set_wakeup_fd(self._previous_wakeup)
            os.close(read)
            os.close(write)

        self._stack.callback(restore)

    def _stopped_by_signal(self) -> bool:
        if self._signals_read is None:
            return False
        received = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._signals_read, 4096):
                received += chunk
        return any(number in _STOP_SIGNALS for number in received)

    def raise_if_a_start_failed(self) -> None:
        """WorkerStartupError with a worker's reason if uvicorn stopped because a worker could not start."""
        if self._notes is None:
            failure = _failed_here
        elif self._stopped_by_signal():  # a stop; a note then is from a start uvicorn gave up (SIGHUP)
            failure = None
        else:
            notes = sorted(self._notes.glob("worker-*.txt"), key=lambda note: note.stat().st_mtime_ns)
            failure = notes[-1].read_text(encoding="utf-8", errors="replace") if notes else None
        if failure is not None:
            raise WorkerStartupError(f"a worker of the decision API could not start, so the server stopped: {failure}")
