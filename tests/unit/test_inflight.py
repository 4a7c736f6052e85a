"""The requests in flight, and the background thread that gives way to them (service/api/inflight.py)."""

from __future__ import annotations

import io
import logging
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest

from service.api import inflight
from service.api.inflight import GIVE_WAY_SECONDS, RequestsInFlight, hold_shared, release_shared
from service.api.logging import SharedStreamHandler


def test_with_no_request_in_flight_the_way_is_clear() -> None:
    in_flight = RequestsInFlight()
    assert in_flight.give_way(longest=60) is False
    in_flight.started()
    in_flight.ended()
    assert in_flight.give_way(longest=60) is False


def test_a_background_thread_waits_until_the_last_request_in_flight_is_answered() -> None:
    in_flight = RequestsInFlight()
    in_flight.started()
    in_flight.started()
    worker, waited = _waiting_thread(in_flight)
    worker.join(0.2)
    assert worker.is_alive()  # two requests in flight: still waiting (it would for a minute)
    in_flight.ended()
    worker.join(0.2)
    assert worker.is_alive()  # one left
    in_flight.ended()
    _returned_after_waiting(worker, waited)


def _waiting_thread(in_flight: RequestsInFlight) -> tuple[threading.Thread, list[bool]]:
    """A thread in ``give_way`` for up to a minute, and where it puts what it returned."""
    waited: list[bool] = []
    worker = threading.Thread(target=lambda: waited.append(in_flight.give_way(longest=60)))
    worker.start()
    return worker, waited


def _returned_after_waiting(worker: threading.Thread, waited: list[bool]) -> None:
    worker.join(30)
    assert not worker.is_alive()
    assert waited == [True]


def test_a_worker_that_is_never_idle_keeps_a_background_thread_waiting_only_so_long() -> None:
    in_flight = RequestsInFlight()
    in_flight.started()  # never answered
    assert in_flight.give_way(longest=0.01) is True
    assert in_flight.count == 1


def test_a_waiting_thread_sleeps_and_more_than_one_are_woken() -> None:
    in_flight = RequestsInFlight()
    in_flight.started()
    cpu: list[float] = []

    def wait() -> None:
        began = time.thread_time()
        in_flight.give_way(longest=60)
        cpu.append(time.thread_time() - began)

    waiters = [threading.Thread(target=wait) for _ in range(2)]
    for waiter in waiters:
        waiter.start()
    time.sleep(0.3)
    in_flight.ended()
    for waiter in waiters:
        waiter.join(30)
        assert not waiter.is_alive()
    assert len(cpu) == 2
    assert max(cpu) < 0.1  # blocked, not spinning, for the 0.3 s the request was in flight


def test_a_budget_bounds_what_a_thread_waits_in_all() -> None:
    in_flight = RequestsInFlight()
    in_flight.started()  # never answered
    with in_flight.budget(0.05):
        waits = [in_flight.give_way(longest=60) for _ in range(50)]
    assert waits[0] is True
    assert waits[-1] is False  # the budget was spent: the rest ran without waiting
    assert in_flight.give_way(longest=0.01) is True  # outside the block, each call waits again


def test_a_waiter_returns_at_a_gap_even_when_a_request_came_in_before_it_woke() -> None:
    in_flight = RequestsInFlight()
    in_flight.started()
    worker, waited = _waiting_thread(in_flight)
    while not in_flight._waiting:  # the waiter is in its wait
        time.sleep(0.001)
    in_flight.ended()  # a gap ...
    in_flight.started()  # ... closed before the waiter had the GIL back
    _returned_after_waiting(worker, waited)


def test_budgets_are_per_thread_and_nest() -> None:
    in_flight = RequestsInFlight()
    in_flight.started()  # never answered
    with in_flight.budget(0.05):
        other: list[bool] = []
        thread = threading.Thread(target=lambda: other.append(in_flight.give_way(longest=0.2)))
        thread.start()
        with in_flight.budget(60):  # an inner block gets no more than the outer one has left
            assert in_flight._budget.left <= 0.05
            assert [in_flight.give_way(longest=0.02) for _ in range(20)][-1] is False
        assert in_flight.give_way(longest=60) is False  # what the inner block waited is spent from the outer
        thread.join(30)
        assert other == [True]  # another thread waits on its own terms
    with pytest.raises(RuntimeError, match="the load failed"), in_flight.budget(0.01):
        raise RuntimeError("the load failed")  # its own error, not one of the budget's
    assert in_flight.give_way(longest=0.01) is True  # no budget left behind


def test_a_gap_between_the_waiters_count_test_and_its_lock_ends_the_wait() -> None:
    """The event loop may answer the last request and take the next one after ``give_way`` found a request in
    flight and before it holds its lock: that gap ends the wait too."""
    in_flight = RequestsInFlight()
    in_flight.started()

    class GapBeforeTheLock:
        def __init__(self, condition: threading.Condition) -> None:
            self.condition = condition
            self.gapped = False

        def __enter__(self) -> bool:
            if not self.gapped:  # as if the loop ran here: the last request answered, the next one arrived
                self.gapped = True
                in_flight.ended()
                in_flight.started()
            return self.condition.__enter__()

        def __exit__(self, *exc: Any) -> None:
            self.condition.__exit__(*exc)

        def __getattr__(self, name: str) -> object:
            return getattr(self.condition, name)

    in_flight._gap = GapBeforeTheLock(in_flight._gap)  # type: ignore[assignment]
    worker, waited = _waiting_thread(in_flight)
    worker.join(10)  # it would wait its whole minute without the gap
    _returned_after_waiting(worker, waited)
    assert in_flight.count == 1


def test_within_at_each_call_the_thread_gives_way_at_its_python_calls_while_a_request_is_in_flight() -> None:
    gave_way: list[int] = []

    class Recorded(RequestsInFlight):
        def give_way(self, longest: float = GIVE_WAY_SECONDS) -> bool:
            gave_way.append(threading.get_ident())
            return False

    in_flight = Recorded()
    with in_flight.at_each_call():
        _python_step()
        _python_step()
    assert gave_way == []  # no request in flight: nothing to give way to
    in_flight.started()
    with in_flight.at_each_call():
        before = len(gave_way)
        _python_step()
        _python_step()
        assert len(gave_way) == before + 2  # one at each call
        other = threading.Thread(target=_python_step)
        other.start()
        other.join()
    after = len(gave_way)
    _python_step()
    assert len(gave_way) == after  # after the block, calls are not traced
    assert set(gave_way) == {threading.get_ident()}  # the other thread was never traced


def _python_step() -> None:
    """A Python function: calling it is a call the trace function sees (a C function's would not be)."""


def test_at_each_call_puts_back_the_trace_function_the_thread_had_even_after_an_error() -> None:
    seen: list[str] = []

    def outer(frame: FrameType, event: str, arg: object) -> None:
        seen.append(frame.f_code.co_name)

    in_flight = RequestsInFlight()
    previous = sys.gettrace()
    sys.settrace(outer)
    try:
        with pytest.raises(RuntimeError, match="load failed"), in_flight.at_each_call():
            raise RuntimeError("load failed")
        assert sys.gettrace() is outer
        _python_step()
    finally:
        sys.settrace(previous)
    assert "_python_step" in seen  # the thread's own trace function works again


def test_a_thread_at_each_call_waits_at_its_next_call_until_the_requests_are_answered() -> None:
    in_flight = RequestsInFlight()
    in_flight.started()
    progress: list[str] = []

    def load() -> None:
        with in_flight.at_each_call(longest=60):
            progress.append("before the call")  # list.append is C: no call the trace function sees
            _python_step()
            progress.append("after the call")

    loader = threading.Thread(target=load)
    loader.start()
    _until(lambda: in_flight._waiting == 1)
    assert loader.is_alive()
    assert progress == ["before the call"]  # waiting at _python_step's call, without the GIL
    in_flight.ended()
    loader.join(30)
    assert not loader.is_alive()
    assert progress == ["before the call", "after the call"]


def _until(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        time.sleep(0.001)


class _Counted(RequestsInFlight):
    """Counts the calls of ``give_way`` and the waits they ask for, then gives way for real."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[float] = []

    def give_way(self, longest: float = GIVE_WAY_SECONDS) -> bool:
        self.calls.append(longest)
        return super().give_way(longest)


def test_at_each_call_waits_as_long_as_it_is_told_and_once_for_an_explicit_give_way() -> None:
    in_flight = _Counted()
    in_flight.started()
    with in_flight.at_each_call(longest=0.001):
        _python_step()
        assert in_flight.calls == [0.001]
        in_flight.ended()
        in_flight.started()  # a gap: the next request is waited for at calls again (as a fresh one would be)
        in_flight.give_way(longest=0.002)  # neither its call nor its own calls (the condition's) give way again
        assert in_flight.calls == [0.001, 0.002]


def test_a_request_in_flight_past_a_whole_wait_is_not_waited_for_again_until_the_next_gap() -> None:
    """An upload, a database that hangs, or a worker never idle: one wait, not the load's whole budget."""
    in_flight = _Counted()
    in_flight.started()  # never answered
    with in_flight.budget(60), in_flight.at_each_call(longest=0.01):
        for _ in range(50):
            _python_step()
        assert len(in_flight.calls) == 1
        in_flight.ended()
        in_flight.started()  # a gap: the next request is waited for again
        for _ in range(50):
            _python_step()
        assert len(in_flight.calls) == 2


def test_no_way_is_given_while_the_thread_holds_what_requests_need() -> None:
    """``hold_shared``, and the API's log handler, whose lock the requests' decision lines take."""
    handler = SharedStreamHandler(io.StringIO())
    in_the_block = [False]
    waits: list[
        tuple[bool, bool]
    ] = []  # per give_way: (the handler's lock held, between hold_shared and release_shared)

    class Recorded(RequestsInFlight):
        def give_way(self, longest: float = GIVE_WAY_SECONDS) -> bool:
            waits.append((bool(handler.lock._is_owned()), in_the_block[0]))  # type: ignore[union-attr]  # an RLock
            return False

    logger = logging.getLogger("winback.test.inflight")
    logger.handlers[:] = [handler]
    logger.propagate = False
    in_flight = Recorded()
    in_flight.started()
    try:
        with in_flight.at_each_call():
            hold_shared()
            try:
                in_the_block[0] = True  # an assignment: no call
                _python_step()
                in_the_block[0] = False
            finally:
                release_shared()
            logger.warning("a model load says something")
    finally:
        logger.handlers.clear()
    assert set(waits) == {(False, False)}  # it gave way on the way in and out, never inside either
    assert "a model load says something" in handler.stream.getvalue()


def test_from_python_3_12_at_each_call_traces_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """There ``sys.settrace`` would slow every thread, the event loop included."""
    monkeypatch.setattr(inflight, "PER_THREAD_TRACE", False)
    previous = sys.gettrace()
    with RequestsInFlight().at_each_call():
        assert sys.gettrace() is previous


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timer slack is Linux's (prctl)")
def test_precise_timers_set_the_calling_thread_s_slack_which_threads_it_starts_inherit() -> None:
    import ctypes

    from service.api.inflight import TIMER_SLACK_NS, precise_timers

    libc = ctypes.CDLL(None, use_errno=True)
    seen: dict[str, int] = {}

    def slack() -> int:
        return int(libc.prctl(30, 0, 0, 0, 0))  # PR_GET_TIMERSLACK

    def event_loop_thread() -> None:
        # Another value first: this thread inherits the test runner's, which an app's lifespan may have set already.
        assert libc.prctl(29, ctypes.c_ulong(50_000), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
        seen["before"] = slack()
        seen["set"] = int(precise_timers())
        seen["after"] = slack()
        started_later = threading.Thread(target=lambda: seen.update(child=slack()))
        started_later.start()
        started_later.join()

    runner_slack = slack()
    thread = threading.Thread(target=event_loop_thread)  # not the test runner's own thread
    thread.start()
    thread.join(5)
    assert seen["set"] == 1
    assert seen["after"] == TIMER_SLACK_NS != seen["before"]
    assert seen["child"] == TIMER_SLACK_NS
    assert seen["before"] == 50_000
    assert slack() == runner_slack  # other threads keep theirs
