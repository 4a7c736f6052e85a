"""The requests a worker is answering, so that work beside them waits for the gaps between them.

A worker loads a new champion in a thread of its own, beside the requests (``model_holder.py``). Both need the
interpreter's lock (the GIL): while the load runs Python, a request gets the lock only at the interpreter's switch
interval and then shares it with the load, and the operating system may run neither when the machine's cores are
busy. A request answered during a load took up to several times its usual time (the swap bench, ISSUE 4: "no
failed or slowed request during the swap").

So the serving app counts the requests in flight (``started`` / ``ended``, on its event loop), and the loading
thread calls ``give_way`` between the steps of a load: it returns at once when no request is in flight, and
otherwise blocks (without the GIL) until the last one has been answered. A load then runs in the gaps between
requests. Within a step (a file, a booster's warm-up, a few errors' text features, one merchant's canary
decision: 1-11 ms), a request that arrived meanwhile got the lock at the switch interval and then shared it with
the load, at about half its speed, until the step ended. ``at_each_call`` closes that gap: the loading thread
also gives way at every Python function call it makes, its own or a library's (a trace function of that thread
alone), so a request waits for the lock once, not for the step. The load pays for it in CPU: 35 ms became 50-72 ms
in a warm process on a slow 2-core machine (no request in flight), run in the requests' gaps. Code that holds the
lock without calling back into Python (a C parser, numpy, LightGBM) still runs to its end.

A request in flight is not always using the CPU (an outcome waiting on the database, a slow upload), and a worker
that is never idle would keep a load waiting for ever: each ``give_way`` waits at most ``GIVE_WAY_SECONDS``, and a
load gives way for at most ``LOAD_GIVE_WAY_SECONDS`` in all (``budget``), after which it runs to its end sharing
the lock as before. A saturated worker still swaps within about a second of its load's own time.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType

#: Longest one ``give_way`` waits for the requests in flight.
GIVE_WAY_SECONDS = 0.02
#: Longest a whole model load waits for requests, over all its steps (``budget``).
LOAD_GIVE_WAY_SECONDS = 1.0


class RequestsInFlight:
    """How many requests the worker is answering; ``started`` and ``ended`` are called on its event loop around each
    one, ``give_way`` by background threads between the steps of their work."""

    def __init__(self) -> None:
        self.count = 0
        self._gap = threading.Condition()  # notified when the count falls to 0 while a thread waits for it
        self._waiting = 0  # threads in give_way (changed under the condition's lock)
        self._gaps = 0  # times the count fell to 0: a waiter returns at a gap even if a request came in since
        self._budget = threading.local()  # per thread: seconds it may still wait (``budget``)

    def started(self) -> None:
        """A request arrived."""
        self.count += 1

    def ended(self) -> None:
        """A request has been answered (or failed)."""
        self.count -= 1
        if self.count == 0:
            self._gaps += 1
            # A waiter counts itself before it tests the gaps (both under the lock), and they change before this
            # test: either it sees the new gap, or it is counted here and woken.
            if self._waiting:
                with self._gap:
                    self._gap.notify_all()

    @contextlib.contextmanager
    def budget(self, seconds: float = LOAD_GIVE_WAY_SECONDS) -> Iterator[None]:
        """Within the block, this thread's ``give_way`` calls wait ``seconds`` in all at most (and no more than an
        enclosing block has left)."""
        outer: float | None = getattr(self._budget, "left", None)
        inner = seconds if outer is None else min(seconds, outer)
        self._budget.left = inner
        try:
            yield
        finally:
            if outer is None:
                del self._budget.left
            else:  # what the block waited is spent from the enclosing one too
                self._budget.left = outer - (inner - self._budget.left)

    @contextlib.contextmanager
    def at_each_call(self, longest: float = GIVE_WAY_SECONDS) -> Iterator[None]:
        """Within the block, this thread also gives way (``give_way(longest)``) at each Python function call it makes: a
        trace function of this thread only, called at each call and at no line (it asks for no local tracing).
        Whatever trace function the thread had (a debugger's, coverage's) is put back after the block; within it,
        that one sees nothing of this thread."""
        previous = sys.gettrace()

        def trace(frame: FrameType, event: str, arg: object) -> None:
            if self.count:
                self.give_way(longest)  # calls from inside a trace function are not traced: no recursion

        sys.settrace(trace)
        try:
            yield
        finally:
            sys.settrace(previous)

    def give_way(self, longest: float = GIVE_WAY_SECONDS) -> bool:
        """Return once no request is in flight (or the count fell to 0 since the call, even if another request came
        in before this thread got the GIL back), or after ``longest`` seconds (or what is left of this thread's
        ``budget``); True when a request was in flight at the call."""
        gaps = self._gaps  # read first: a gap from here on ends the wait
        if not self.count:
            return False
        left: float | None = getattr(self._budget, "left", None)
        if left is not None:
            if left <= 0:
                return False
            longest = min(longest, left)
        started = time.monotonic()
        with self._gap:
            self._waiting += 1
            try:
                self._gap.wait_for(lambda: not self.count or self._gaps != gaps, longest)
            finally:
                self._waiting -= 1
        if left is not None:
            self._budget.left = left - (time.monotonic() - started)
        return True
