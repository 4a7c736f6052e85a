"""The requests a worker is answering, so that work beside them waits for the gaps between them.

A worker loads a new champion in a thread of its own, beside the requests (``model_holder.py``). Both need the
interpreter's lock (the GIL): while the load runs Python, a request gets the lock only at the interpreter's switch
interval and then shares it with the load, and the operating system may run neither when the machine's cores are
busy. A request answered during a load took up to several times its usual time (the swap bench, ISSUE 4: "no
failed or slowed request during the swap").

So the serving app counts the requests in flight (``started`` / ``ended``, on its event loop), and the loading
thread calls ``give_way`` between the steps of a load: it returns at once when no request is in flight, and
otherwise blocks (without the GIL) until the last one has been answered. A load then runs in the gaps between
requests, and a request that arrives during a step shares the lock only until that step ends (steps are kept
short: a file, a booster's warm-up, a few errors' text features, one merchant's canary decision).

A worker that is never idle (saturated) would keep a load waiting for ever: ``give_way`` waits at most
``GIVE_WAY_SECONDS`` each time, so the load still ends, sharing the lock as before.
"""

from __future__ import annotations

import threading
import time

#: Longest one ``give_way`` waits for the requests in flight: a load has a few dozen steps, so a worker that is
#: never idle still swaps within a second or two.
GIVE_WAY_SECONDS = 0.02


class RequestsInFlight:
    """How many requests the worker is answering; ``started`` and ``ended`` are called on its event loop around each
    one, ``give_way`` by a background thread between the steps of its work."""

    def __init__(self) -> None:
        self.count = 0
        self._gap = threading.Event()  # set when the count falls to 0 while a thread waits for it
        self._waiting = 0

    def started(self) -> None:
        """A request arrived."""
        self.count += 1

    def ended(self) -> None:
        """A request has been answered (or failed)."""
        self.count -= 1
        if self.count == 0 and self._waiting:
            self._gap.set()

    def give_way(self, longest: float = GIVE_WAY_SECONDS) -> bool:
        """Return once no request is in flight, or after ``longest`` seconds; True when it had to wait."""
        if not self.count:
            return False
        deadline = time.monotonic() + longest
        self._waiting += 1
        try:
            while self.count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._gap.clear()
                if self.count:  # not answered between the test above and the clear: wait for ``ended``'s set
                    self._gap.wait(remaining)
        finally:
            self._waiting -= 1
        return True
