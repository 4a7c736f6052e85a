"""SIGTERM raising an exception while a long-running command runs, and SIGCHLD put back to its default where it
was inherited ignored (service/signals.py)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from model.merchant_config import ConfigError
from service.api import server
from service.signals import restore_sigchld_default, sigterm_raises


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


@pytest.fixture
def sigchld_ignored() -> Iterator[None]:
    """SIGCHLD ignored, as whatever started the command may leave it; put back as it was after the test."""
    before = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, before)


@pytest.mark.usefixtures("sigchld_ignored")
def test_an_ignored_sigchld_is_put_back_to_its_default() -> None:
    assert restore_sigchld_default() is True
    assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL
    assert restore_sigchld_default() is False  # once is enough


@pytest.mark.usefixtures("sigchld_ignored")
def test_a_sigchld_handler_of_the_process_own_is_kept() -> None:
    def handler(_signum: int, _frame: object) -> None:
        pass

    signal.signal(signal.SIGCHLD, handler)
    assert restore_sigchld_default() is False
    assert signal.getsignal(signal.SIGCHLD) is handler


@pytest.mark.usefixtures("sigchld_ignored")
def test_off_the_main_thread_sigchld_is_left_as_it_is() -> None:
    answers: list[bool] = []
    thread = threading.Thread(target=lambda: answers.append(restore_sigchld_default()))
    thread.start()
    thread.join(5)
    assert answers == [False]
    assert signal.getsignal(signal.SIGCHLD) == signal.SIG_IGN


@pytest.mark.usefixtures("sigchld_ignored")
def test_serving_puts_sigchld_back_before_anything_else(tmp_path: Path) -> None:
    """``server.run`` is started without the CLI too (``python -c``, by the benches): it puts SIGCHLD back itself,
    before uvicorn starts any worker (here it stops at once, on a config that is not there)."""
    with pytest.raises(ConfigError, match="config file not found"):
        server.run(config_path=tmp_path / "missing.yaml")
    assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL
