"""A check run at once and then every few seconds in a daemon thread: the model holder's and the mirror's."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("winback.api")


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
