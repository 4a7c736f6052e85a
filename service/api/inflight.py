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
the load, at about half its speed, until the step ended. ``at_each_call`` closes that gap: a swap's loading thread
also gives way at every Python function call it makes, its own or a library's (a trace function of that thread
alone, on Python 3.11), so a request waits for the lock once, not for the step; except while the thread holds
what requests take too (the log handler's lock, the import lock), where they would wait for it. The load pays for
it in CPU: 35 ms became 50-72 ms in a warm process on a slow 2-core machine (no request in flight), run in the
requests' gaps. Code that holds the lock without calling back into Python (a C parser, numpy, LightGBM) still runs
to its end, and threads the load starts (MLflow's download pool, without the registry mirror) do not give way.

A request in flight is not always using the CPU (an outcome waiting on the database, a slow upload), and a worker
that is never idle would keep a load waiting for ever: each ``give_way`` waits at most ``GIVE_WAY_SECONDS``, and a
load gives way for at most ``LOAD_GIVE_WAY_SECONDS`` in all (``budget``), after which it runs to its end sharing
the lock as before. A saturated worker still swaps within about a second of its load's own time.
"""

from __future__ import annotations

import _imp
import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType

from service.linux import PR_SET_TIMERSLACK, prctl

#: Longest one ``give_way`` waits for the requests in flight.
GIVE_WAY_SECONDS = 0.02
#: Longest a whole model load waits for requests, over all its steps (``budget``).
LOAD_GIVE_WAY_SECONDS = 1.0


#: Whether ``sys.settrace`` traces the calling thread alone: up to Python 3.11 it hooks that thread's frame
#: evaluation; from 3.12 it is built on ``sys.monitoring``, which instruments the code every thread runs, so the
#: event loop ran ~3x slower while a load was traced (a review measured 3.1-3.3x on 3.12 and 3.13).
PER_THREAD_TRACE = sys.version_info < (3, 12)

#: Per thread: how many ``hold_shared`` calls it has not released yet.
_shared = threading.local()

#: The timer slack of a worker's event loop thread, in nanoseconds (Linux's default is 50,000).
TIMER_SLACK_NS = 1_000


def precise_timers(slack_ns: int = TIMER_SLACK_NS) -> bool:
    """Set the calling thread's timer slack to ``slack_ns`` (Linux's ``prctl(PR_SET_TIMERSLACK)``); threads it starts
    afterwards inherit it. False where the system does not support it (the slack stays as it was).

    A thread waiting for the GIL waits on a timed condition for the switch interval (20 us while a model loads:
    ``model_holder.LOAD_SWITCH_INTERVAL``) before it asks the holder to let go, and the kernel may wake it up to its
    timer slack late: 50 us by default, more than the interval. The worker's event loop calls this at start, so a
    request that arrives while a load holds the GIL asks for it after the interval, not after the slack. Its other
    timed waits (the loop's timers) only wake more exactly; readiness of a socket wakes it as before."""
    return prctl(PR_SET_TIMERSLACK, slack_ns)


def hold_shared() -> None:
    """From now until ``release_shared``, the thread holds something the requests need too (a lock every thread
    takes, such as the log handler's): ``at_each_call`` does not give way there. Calls nest."""
    _shared.held = getattr(_shared, "held", 0) + 1


def release_shared() -> None:
    """The end of a ``hold_shared``."""
    _shared.held -= 1


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
        """Within the block, this thread also gives way (``give_way(longest)``) at each Python function call it makes:
        a trace function of this thread only, called at each call and at no line (it asks for no local tracing).
        Threads it starts are not traced. Whatever trace function the thread had (a debugger's, coverage's) is put
        back after the block; within it, that one sees no new call of this thread.

        It does not give way while the thread holds something a request may need too (``hold_shared``: the log
        handler's lock; or Python's import lock), where waiting for the requests would make them wait for it. A
        wait that runs its full ``longest`` with no gap means a request that is not using the CPU (an upload, a
        database that hangs) or a worker that is never idle: the thread then stops waiting at calls until the next
        gap, instead of spending the load's ``budget`` 20 ms at a time. On Python 3.12 and later it does nothing
        (``PER_THREAD_TRACE``)."""
        if not PER_THREAD_TRACE:
            yield
            return
        previous = sys.gettrace()
        given_up_at = -1  # the gap count when a wait last ran its full time: no waits at calls before the next gap
        # A call of give_way (this class's, or an override's) waits itself, and its own calls (the condition's) are
        # marked as held (``hold_shared``): neither gives way again.
        give_way_codes = {RequestsInFlight.give_way.__code__, getattr(type(self).give_way, "__code__", None)}

        def trace(frame: FrameType, event: str, arg: object) -> None:
            nonlocal given_up_at
            if (
                self.count
                and self._gaps != given_up_at
                and frame.f_code not in give_way_codes
                and not getattr(_shared, "held", 0)
                and not _imp.lock_held()
            ):
                gaps = self._gaps
                # Calls from inside a trace function are not traced: no recursion.
                if self.give_way(longest) and self.count and self._gaps == gaps:
                    given_up_at = gaps

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
        # The condition's own Python calls do not give way again (``at_each_call``): marked as ``hold_shared`` marks,
        # inline, since a call of it would be traced before its mark.
        _shared.held = getattr(_shared, "held", 0) + 1
        try:
            with self._gap:
                self._waiting += 1
                try:
                    self._gap.wait_for(lambda: not self.count or self._gaps != gaps, longest)
                finally:
                    self._waiting -= 1
        finally:
            _shared.held -= 1
        if left is not None:
            self._budget.left = left - (time.monotonic() - started)
        return True
