"""Blocking database work awaited with a deadline, in a thread that cannot hold up the process's exit.

A database that hangs (a network partition, a table locked for maintenance) blocks a call inside the driver,
where no timeout of ours reaches it. Awaited in FastAPI's thread pool, such a call holds its request open for good,
and with it a graceful shutdown (uvicorn waits for open requests; Python joins pool threads at exit). Here the call
runs in a daemon thread of its own: the request is answered when the deadline passes, and the process may exit
while the call is still stuck. What the call does after its deadline is not reported to anyone, so it must be
safe to repeat (the caller says so in its answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")
#: Most calls running at once, stuck ones included: a hung database must not cost a thread per retried request.
MAX_RUNNING_CALLS = 32
_running = threading.BoundedSemaphore(MAX_RUNNING_CALLS)


class DeadlineCallsExhaustedError(RuntimeError):
    """MAX_RUNNING_CALLS calls are running (or stuck) already: the call was not started."""


async def within_deadline(seconds: float, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``call(*args, **kwargs)`` run in a daemon thread; its result, or its exception, or TimeoutError once
    ``seconds`` have passed without either (the call keeps running on its own). DeadlineCallsExhaustedError,
    without starting it, while MAX_RUNNING_CALLS calls are running."""
    if not _running.acquire(blocking=False):
        raise DeadlineCallsExhaustedError(f"{MAX_RUNNING_CALLS} calls are waiting for the database already")
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if answer.done():  # the deadline passed first
            return
        if error is not None:
            answer.set_exception(error)
        else:
            answer.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result: T | None = call(*args, **kwargs)
            error: BaseException | None = None
        except BaseException as raised:  # handed to the awaiting request, which decides what to answer
            result, error = None, raised
        finally:
            _running.release()
        with contextlib.suppress(RuntimeError):  # a closed loop: the process is shutting down, nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    try:
        threading.Thread(target=run, name="winback-deadline-call", daemon=True).start()
    except BaseException:
        _running.release()
        raise
    return await asyncio.wait_for(answer, seconds)
