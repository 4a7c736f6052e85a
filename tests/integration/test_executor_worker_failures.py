"""A worker whose database fails: it goes on through a short outage, and stops, visibly, when the failure lasts.

Found by the seventh review (of 24bf49a): a failure that comes after the claim leaves the batch leased, so the
empty polls that follow looked like a healthy idle worker; the backoff outlived ``stop_after``; the executor's
PostgreSQL engine had no connect timeout; one failed worker process left the others running short.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import sqlalchemy as sa

from service.executor import worker as worker_module
from service.executor.bench import counting_connectors, seed_retry_actions, write_bench_config
from service.executor.store import make_executor_engine
from service.migrations import upgrade
from tests.integration.test_executor import event, make_harness  # noqa: F401 - make_harness is a fixture

RETRY = {"action": "retry", "strategy": "retry_same", "connector": "stripe"}


def _schema_behind_the_code(h: Any) -> None:
    """A lasting failure that comes after the claim: the code's ``orders`` table has a column the database lacks
    (a migration not run, a wrong database), so reading the batch's orders fails every time, while claiming
    (which touches ``actions`` and only ``orders.attempt_count``) still works."""
    with h.executor.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE orders RENAME COLUMN nudge_count TO nudge_count_old"))


def test_a_run_until_idle_does_not_hide_a_lasting_failure_that_comes_after_the_claim(
    make_harness: Any,  # noqa: F811 - the fixture
) -> None:
    """The failed batch is still leased, so the next claim finds nothing due: that is not 'idle'."""
    h = make_harness(RETRY)
    h.executor.payment_failed("m_demo", event())
    _schema_behind_the_code(h)
    h.worker.poll_seconds = 0.001
    with pytest.raises(sa.exc.OperationalError, match="nudge_count"):
        h.worker.run(until_idle=True, stop_after=60)
    assert h.connector.calls == []


def test_a_daemon_worker_stops_when_a_lasting_failure_comes_after_the_claim(
    make_harness: Any,  # noqa: F811 - the fixture
) -> None:
    """Each failed batch is followed by empty polls while its lease runs; they used to reset the count, so the
    worker failed the same batch at every lease end, for ever."""
    h = make_harness(RETRY)
    h.executor.payment_failed("m_demo", event())
    _schema_behind_the_code(h)
    h.worker.poll_seconds = 0.001
    h.worker.lease_seconds = 5  # the clock below runs 1 s per batch: the lease ends every few polls
    failed = {"n": 0}
    real_run_once = h.worker.run_once

    def ticking() -> int:
        h.clock.advance(seconds=1)
        try:
            return real_run_once()
        except sa.exc.DBAPIError:
            failed["n"] += 1
            raise

    h.worker.run_once = ticking  # type: ignore[method-assign]
    with pytest.raises(sa.exc.OperationalError, match="nudge_count"):
        h.worker.run(stop_after=30)
    assert failed["n"] == worker_module.MAX_DATABASE_FAILURES


def test_failures_far_apart_are_not_in_a_row(make_harness: Any) -> None:  # noqa: F811 - the fixture
    """Two outages more than the failure window apart are counted apart: the worker does not stop on the sum of
    unrelated blips."""
    h = make_harness(RETRY)
    h.worker.poll_seconds = 0.001
    h.worker.lease_seconds = 0.01  # window: 2 leases + the longest backoff
    outage = {"on": True}
    real_claim = h.executor.claim
    moments = iter([0.0, 1000.0, 2000.0, 3000.0, 4000.0])
    now = {"t": 0.0}

    def claim(*args: Any, **kwargs: Any) -> Any:
        if outage["on"]:
            now["t"] = next(moments, None) or now["t"]
            if now["t"] >= 4000.0:
                outage["on"] = False
            raise sa.exc.OperationalError("SELECT", {}, Exception("the database is restarting"))
        return real_claim(*args, **kwargs)

    h.executor.claim = claim  # type: ignore[method-assign]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(worker_module.time, "monotonic", lambda: now["t"])
        patch.setattr(worker_module.Worker, "_wait", staticmethod(lambda *args: None))
        assert h.worker.run(until_idle=True) == 0  # five failures, each a window after the one before


def test_a_run_with_stop_after_is_not_held_past_its_deadline_by_the_database_backoff(
    make_harness: Any,  # noqa: F811 - the fixture
) -> None:
    """The backoff (doubling up to 30 s) was waited in full even past ``stop_after``."""
    h = make_harness(RETRY)
    h.executor.payment_failed("m_demo", event())
    with h.executor.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE actions"))
    h.worker.poll_seconds = 0.5  # the default
    waits: list[float] = []
    real_wait = worker_module.Worker._wait

    def recorded(stop: Any, seconds: float, deadline: float | None = None) -> None:
        before = time.monotonic()
        real_wait(stop, seconds, deadline)
        waits.append(time.monotonic() - before if deadline is None else deadline - time.monotonic())

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(worker_module.Worker, "_wait", staticmethod(recorded))
        with contextlib.suppress(sa.exc.DBAPIError):
            h.worker.run(stop_after=4)
    # after each wait, the deadline is still ahead or just reached, never passed by a whole backoff
    assert min(waits) > -0.25, f"a backoff ran {-min(waits):.1f} s past the run's deadline"


def test_a_worker_whose_postgres_does_not_answer_stops_when_told(
    make_harness: Any,  # noqa: F811 - the fixture
) -> None:
    """A PostgreSQL that accepts the TCP connection and never answers (a hung server, a half-dead proxy): the
    executor's engine had no connect_timeout, so psycopg's default of 130 s held every batch, and a stop (what
    SIGTERM sets in worker_main) waited for it. It now has the API's libpq bounds (5 s to connect)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # the kernel completes the handshake; nothing ever answers
    port = listener.getsockname()[1]
    h = make_harness(RETRY)
    h.executor.engine = make_executor_engine(f"postgresql+psycopg://winback@127.0.0.1:{port}/test")
    stop = threading.Event()
    outcome: dict[str, Any] = {}

    def go() -> None:
        try:
            outcome["total"] = h.worker.run(stop=stop)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=go, daemon=True)
    try:
        thread.start()
        time.sleep(1.0)
        stop.set()  # what worker_main's SIGTERM handler does
        thread.join(timeout=20)
        assert not thread.is_alive(), "the worker was told to stop and is still in its first batch 20 s later"
    finally:
        listener.close()  # the pending connection is reset: the thread ends
        thread.join(timeout=10)
    assert outcome == {"total": 0}


def broken_on_first(flag: str, calls: str) -> Any:
    """A ``connectors_factory``: the first worker process to build its connectors fails (as a worker whose
    database keeps failing ends with an error); the others count their calls in ``calls``."""
    try:
        Path(flag).open("x").close()
    except FileExistsError:
        return counting_connectors(calls)
    raise RuntimeError("this worker stops on an error")


def test_one_worker_stopping_on_an_error_stops_the_others(tmp_path: Path) -> None:
    """The parent joined its workers one after another, so a worker that stopped on an error went unnoticed while
    the others ran (short of a worker, the supervisor never told). Now the command stops them all and fails."""
    url = f"sqlite:///{tmp_path / 'w.db'}"
    engine = make_executor_engine(url)
    try:
        upgrade(engine)
        seed_retry_actions(engine, 5)
    finally:
        engine.dispose()
    config = write_bench_config(tmp_path / "merchants.yaml")
    factory = functools.partial(broken_on_first, str(tmp_path / "first"), str(tmp_path / "calls.txt"))
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="executor workers exited with an error: winback-executor-"):
            worker_module.run(url, 2, config, None, stop_after=STOP_AFTER, connectors_factory=factory)
    finally:
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
    # the healthy worker was stopped by the command, not by its own stop_after
    assert time.monotonic() - started < STOP_AFTER / 2, "one worker failed, and the command ran the other on"


#: The healthy worker's own deadline in the test above: long enough that it cannot be what ended the command.
STOP_AFTER = 120.0


def test_a_stop_is_logged_once_per_streak(make_harness: Any, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    """A lasting failure says so once as an error when the worker stops, after a line per failed batch."""
    h = make_harness(RETRY)
    h.executor.payment_failed("m_demo", event())
    with h.executor.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE actions"))
    h.worker.poll_seconds = 0.001
    with caplog.at_level(logging.ERROR, logger="winback"), pytest.raises(sa.exc.OperationalError):
        h.worker.run(until_idle=True)
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("the database failed 3 batches in a row; the worker stops") == 1
