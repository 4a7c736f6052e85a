"""SIGTERM raising an exception while a long-running command runs (service/signals.py)."""

from __future__ import annotations

import signal
import threading

import pytest

from service.signals import sigterm_raises


def test_sigterm_raises_the_given_exception_in_the_block_and_the_handler_comes_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    steps: list[str] = []

    def demo() -> None:
        with sigterm_raises(lambda _signum: KeyboardInterrupt()):
            try:
                signal.raise_signal(signal.SIGTERM)
            finally:
                steps.append("cleaned up")

    with pytest.raises(KeyboardInterrupt):
        demo()
    assert steps == ["cleaned up"]
    assert signal.getsignal(signal.SIGTERM) is before


def test_an_ignored_sigterm_stays_ignored_only_when_asked() -> None:
    before = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with sigterm_raises(lambda signum: SystemExit(128 + signum), keep_ignored=True):
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        with sigterm_raises(lambda _signum: KeyboardInterrupt()):
            assert signal.getsignal(signal.SIGTERM) != signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


def test_off_the_main_thread_the_block_runs_as_it_is() -> None:
    before = signal.getsignal(signal.SIGTERM)
    seen: list[object] = []

    def elsewhere() -> None:
        with sigterm_raises(lambda _signum: KeyboardInterrupt()):
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join(5)
    assert seen == [before]
