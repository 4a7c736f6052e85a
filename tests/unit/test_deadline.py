"""Blocking calls awaited with a deadline: answered in time, never a thread per stuck call beyond the bound."""

from __future__ import annotations

import asyncio
import threading

import pytest

from service.api.deadline import MAX_RUNNING_CALLS, DeadlineCallsExhaustedError, within_deadline


def test_a_call_s_result_or_error_comes_back_and_a_stuck_one_times_out() -> None:
    async def scenario() -> None:
        assert await within_deadline(1.0, lambda a, b: a + b, 2, 3) == 5
        with pytest.raises(ZeroDivisionError):
            await within_deadline(1.0, lambda: 1 / 0)
        released = threading.Event()
        with pytest.raises(TimeoutError):
            await within_deadline(0.05, released.wait)
        released.set()

    asyncio.run(scenario())


def test_stuck_calls_are_bounded_and_their_slots_come_back_when_they_end() -> None:
    released = threading.Event()

    async def scenario() -> None:
        for _ in range(MAX_RUNNING_CALLS):
            with pytest.raises(TimeoutError):
                await within_deadline(0.01, released.wait)
        with pytest.raises(DeadlineCallsExhaustedError):
            await within_deadline(0.01, lambda: None)
        released.set()
        for _ in range(200):  # the stuck calls end and give their slots back
            try:
                assert await within_deadline(1.0, lambda: "ok") == "ok"
                return
            except DeadlineCallsExhaustedError:
                await asyncio.sleep(0.01)
        raise AssertionError("the slots never came back")

    try:
        asyncio.run(scenario())
    finally:
        released.set()
