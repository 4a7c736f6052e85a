"""How `winback serve` and its workers tell each other about a worker's start (service/api/startup.py)."""

from __future__ import annotations

import os
import signal

import pytest

from service.api import startup
from service.api.startup import (
    STARTUP_NOTES_ENV,
    WORKERS_PARENT_ENV,
    StartupWatch,
    WorkerStartupError,
    startup_failed,
    take_worker_settings,
)


@pytest.fixture(autouse=True)
def _fresh_module_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(startup, "_notes_folder", None)
    monkeypatch.setattr(startup, "_failed_here", None)


def _as_a_worker(watch: StartupWatch, monkeypatch: pytest.MonkeyPatch) -> int | None:
    """What a worker started by the command sees: the watch's environment, taken as it starts."""
    for name, value in watch.environment.items():
        if value is not None:
            monkeypatch.setenv(name, value)
    return take_worker_settings()


def test_a_worker_takes_the_command_s_settings_out_of_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing a worker starts inherits them: a process given the command's pid ended itself when that pid was not
    its parent (review)."""
    with StartupWatch(workers=2) as watch:
        assert watch.environment[WORKERS_PARENT_ENV] == str(os.getpid())
        assert _as_a_worker(watch, monkeypatch) == os.getpid()
        assert WORKERS_PARENT_ENV not in os.environ
        assert STARTUP_NOTES_ENV not in os.environ
    monkeypatch.setenv(WORKERS_PARENT_ENV, "12x")
    with pytest.raises(ValueError, match=r"WINBACK_WORKERS_PARENT_PID is not a process id: '12x'"):
        take_worker_settings()


def test_one_worker_has_neither_setting() -> None:
    with StartupWatch(workers=1) as watch:
        assert watch.environment == {WORKERS_PARENT_ENV: None, STARTUP_NOTES_ENV: None}


def test_the_command_fails_with_the_reason_of_the_worker_that_could_not_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with StartupWatch(workers=2) as watch:
        _as_a_worker(watch, monkeypatch)
        watch.raise_if_a_start_failed()  # no note: uvicorn stopped for another reason
        startup_failed(ValueError("the first"))
        startup_failed(KeyError("the newest"))  # the last to fail is the one uvicorn stopped for
        with pytest.raises(WorkerStartupError, match=r"could not start, so the server stopped: KeyError: 'the newest'"):
            watch.raise_if_a_start_failed()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_by_sigterm_or_sigint_is_a_stop_whatever_note_an_earlier_failed_start_left(
    stop: signal.Signals, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn gives up a worker that fails to replace another in a SIGHUP restart, and the old one keeps serving.
    Its note made the command's later stop by SIGTERM exit 2 with "could not start, so the server stopped"
    (review). The watch sees the signals uvicorn's own handlers received."""
    with StartupWatch(workers=2) as watch:
        _as_a_worker(watch, monkeypatch)
        startup_failed(ValueError("a SIGHUP restart's worker"))
        received: list[int] = []
        previous = signal.signal(stop, lambda signum, _frame: received.append(signum))  # as uvicorn's supervisor
        try:
            signal.raise_signal(stop)
        finally:
            signal.signal(stop, previous)
        assert received == [stop]
        watch.raise_if_a_start_failed()  # a stop: nothing raised


def test_a_sighup_alone_is_not_a_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    with StartupWatch(workers=2) as watch:
        _as_a_worker(watch, monkeypatch)
        previous = signal.signal(signal.SIGHUP, lambda _signum, _frame: None)
        try:
            signal.raise_signal(signal.SIGHUP)
        finally:
            signal.signal(signal.SIGHUP, previous)
        startup_failed(ValueError("a worker added later"))
        with pytest.raises(WorkerStartupError, match="a worker added later"):
            watch.raise_if_a_start_failed()


def test_the_watch_puts_back_the_wakeup_fd_and_removes_its_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    read, write = os.pipe()
    os.set_blocking(write, False)
    before = signal.set_wakeup_fd(write)
    try:
        with StartupWatch(workers=2) as watch:
            folder = watch.environment[STARTUP_NOTES_ENV]
            assert folder is not None
            assert os.path.isdir(folder)
        assert signal.set_wakeup_fd(write) == write  # what was there before the watch is back
        assert not os.path.exists(folder)
    finally:
        signal.set_wakeup_fd(before)
        os.close(read)
        os.close(write)
