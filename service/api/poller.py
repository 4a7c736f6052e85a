"""A check run at once and then every few seconds in a daemon thread, and the wait before a version that failed is
tried again: the model holder's and the registry mirror's."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("winback.api")
#: Longest wait before a version that failed is tried again.
MAX_RETRY_SECONDS = 300.0


class Poller:
    """Calls ``check`` once, then every ``interval`` seconds, in a daemon thread named ``name``, until stopped."""

    def __init__(self, check: Callable[[], object], interval: float, name: str) -> None:
        self.check = check
        self.interval = interval
        self.name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start(self, wait_seconds: float) -> bool:
        """Start polling; True when the first check ended within ``wait_seconds`` (it goes on in the thread
        otherwise)."""
        first_done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(first_done,), name=self.name, daemon=True)
        self._thread.start()
        return first_done.wait(wait_seconds)

    def _run(self, first_done: threading.Event) -> None:
        try:
            self._check()
        finally:
            first_done.set()
        while not self._stop.wait(self.interval):
            self._check()

    def _check(self) -> None:
        try:
            self.check()
        except Exception:  # a check that should not raise did: it is logged, and the polling goes on
            log.exception("a check of %s failed", self.name)

    def stop(self, wait_seconds: float) -> None:
        """Stop polling, waiting up to ``wait_seconds`` for a check in progress."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=wait_seconds)
            self._thread = None


class RetryWait:
    """A registry version that failed (could not be loaded, or downloaded) is not tried again for ``base_seconds``
    times 2, 4, 8... (at most ``MAX_RETRY_SECONDS``): versions do not change, so what failed will most likely fail
    again, and each try costs seconds of CPU or a download. Another version, or a restart, is tried at once."""

    def __init__(self, base_seconds: float) -> None:
        self.base_seconds = base_seconds
        self.version: str | None = None  # the last version that failed
        self.reason: str | None = None  # why
        self.failures = 0  # how many times in a row it did
        self.retry_at = 0.0  # it is not tried again before this (time.monotonic)

    def waiting(self, version: str) -> str | None:
        """Why ``version`` is not to be tried yet, or None when it may be."""
        return self.reason if version == self.version and time.monotonic() < self.retry_at else None

    def failed(self, version: str, reason: str) -> None:
        self.failures = self.failures + 1 if version == self.version else 1
        self.version, self.reason = version, reason
        self.retry_at = time.monotonic() + min(self.base_seconds * 2.0**self.failures, MAX_RETRY_SECONDS)

    def succeeded(self) -> None:
        self.version, self.failures = None, 0
