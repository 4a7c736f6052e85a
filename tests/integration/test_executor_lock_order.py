"""Transactions that lock several orders, or several rows of one table, take the locks in one order (real
PostgreSQL, two connections): two of them can no longer deadlock.

Each test holds the first transaction after its first lock until the second one has taken its own first lock (or
waits for one), the interleaving that deadlocked before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from model.vocab import Channel
from service.executor import core
from service.executor.core import ActionRow, Executor, NoEffect, Outcome
from service.executor.store import actions, opt_outs, orders
from tests.integration.test_executor import (  # noqa: F401 - make_harness is a fixture
    Harness,
    event,
    make_harness,
)

PATIENCE = 30.0  # seconds a step may take on a loaded machine before the test fails


def _a_backend_waits_for_a_lock(engine: sa.Engine) -> bool:
    """Whether a PostgreSQL backend of this test's database waits for a lock now."""
    with engine.connect() as conn:  # a new transaction: a fresh snapshot of pg_stat_activity
        waiting = conn.scalar(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'"
            )
        )
    return bool(waiting)


THREADS = ("tx0", "tx1")


class Interleave:
    """Holds each of the two threads of ``_run_both`` after its first step in a transaction until the other thread
    has done its own first step or waits for a lock: both hold what their first step locked before either goes
    on. A thread that waits in vain records the failure (a wait inside a worker's recording would be caught)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.first_done = {name: threading.Event() for name in THREADS}
        self.seen: set[str] = set()
        self.errors: list[str] = []

    def started(self) -> bool:
        """True on this thread's first step."""
        me = threading.current_thread().name
        if me in self.seen:
            return False
        self.seen.add(me)
        return True

    def first_step_done(self) -> None:
        """Wait until the other thread has done its first step too, or waits for a lock."""
        me = threading.current_thread().name
        self.first_done[me].set()
        (other,) = (name for name in THREADS if name != me)
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            if self.first_done[other].is_set() or _a_backend_waits_for_a_lock(self.engine):
                return
            time.sleep(0.02)
        self.errors.append(f"{me}: the other transaction never took its first lock")

    def step_by_step_recording(self, executor: Executor) -> None:
        """Make ``executor`` record an outcome as a step: a thread's first outcome recorded (its order locked) is
        its first step; a database error is noted (a worker's recording would catch it)."""
        complete = executor.complete

        def complete_in_step(conn: sa.Connection, action: ActionRow, outcome: Outcome) -> None:
            starting = self.started()
            try:
                complete(conn, action, outcome)
            except sa.exc.DBAPIError as exc:
                self.errors.append(str(exc.orig).splitlines()[0])
                raise
            if starting:
                self.first_step_done()

        executor.complete = complete_in_step  # type: ignore[method-assign]


def _run_both(first: Callable[[], None], second: Callable[[], None], errors: list[BaseException]) -> None:
    def guarded(work: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                work()
            except BaseException as exc:
                errors.append(exc)

        return run

    threads = [
        threading.Thread(target=guarded(work), name=name) for name, work in zip(THREADS, (first, second), strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(2 * PATIENCE)
        assert not thread.is_alive()


def _two_orders_with_a_follow_up_and_a_close_due(h: Harness) -> tuple[list[ActionRow], list[ActionRow]]:
    """Orders ord_1 and ord_2, each with its SMS sent: due now, in this order, ord_1's follow-up, ord_2's
    follow-up, ord_2's window-end close and ord_1's. Two workers claim two each: the first batch is planned
    ord_1 then ord_2, the second ord_2 then ord_1."""
    h.executor.payment_failed("m_demo", event("ord_1"))
    h.executor.payment_failed("m_demo", event("ord_2"))
    h.drain()  # both messages
    assert len(h.outbox) == 2
    h.clock.advance(hours=1)
    due = h.clock.now
    plan = [("ord_1", "follow_up"), ("ord_2", "follow_up"), ("ord_2", "close"), ("ord_1", "close")]
    with h.executor.engine.begin() as conn:
        for offset, (order_id, kind) in enumerate(plan):
            when = due - timedelta(seconds=len(plan) - offset)
            conn.execute(
                actions.update()
                .where(actions.c.order_id == order_id, actions.c.kind == kind)
                .values(due_at=when, planned_at=when)
            )
    first = h.executor.claim(2, 30, "w1", "claim-w1")
    second = h.executor.claim(2, 30, "w2", "claim-w2")
    assert [(a.order_id, a.kind) for a in first + second] == plan
    return first, second


@pytest.mark.postgres
def test_two_workers_recording_batches_of_the_same_two_orders_do_not_deadlock_on_postgresql(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    postgres_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A batch's follow-ups and closes are recorded in one transaction, each under its order's lock, kept until the
    commit. Recorded in the batch's planned order, one worker locked ord_1 and then waited for ord_2 while the
    other held ord_2 and waited for ord_1: PostgreSQL aborted one ("deadlock detected"), and its worker recorded its
    batch again one action at a time. Both now record order by order: the second waits for the first."""
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retarget", "channel": "sms"},
        database_url=postgres_url,
    )
    first, second = _two_orders_with_a_follow_up_and_a_close_due(h)
    interleave = Interleave(h.executor.engine)
    interleave.step_by_step_recording(h.executor)
    errors: list[BaseException] = []
    with caplog.at_level(logging.WARNING, logger="winback"):
        _run_both(
            lambda: h.worker.record([(action, NoEffect()) for action in first]),
            lambda: h.worker.record([(action, NoEffect()) for action in second]),
            errors,
        )
    assert errors == []
    assert interleave.errors == []
    # The worker's fallback (service/executor/worker.py), not any log line that happens to say "one by one".
    fallbacks = [r for r in caplog.records if r.name == "winback.executor" and "one by one" in r.getMessage()]
    assert [r.getMessage() for r in fallbacks] == []
    with h.executor.engine.connect() as conn:
        recorded = conn.execute(
            sa.select(actions.c.state).where(actions.c.action_id.in_([a.action_id for a in first + second]))
        ).scalars()
        assert "claimed" not in set(recorded)


def _sequential_scans_only(dbapi_connection: Any, _record: Any) -> None:
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET enable_indexscan = off; SET enable_bitmapscan = off; SET enable_indexonlyscan = off")
    dbapi_connection.commit()


@pytest.mark.postgres
def test_an_opt_out_and_a_worker_recording_the_customers_two_orders_do_not_deadlock_on_postgresql(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A customer's opt-out rewrites each of their open orders, and locked each as it rewrote it, in the order a
    sequential scan finds them (ord_2 first once ord_1's row was updated last), while a worker recording follow-ups
    of both orders locks ord_1 and then ord_2: PostgreSQL aborted one ("deadlock detected"). The opt-out now locks
    the customer's orders up front, by order id: it waits for the worker."""
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retarget", "channel": "sms"},
        database_url=postgres_url,
    )
    batch, _closes = _two_orders_with_a_follow_up_and_a_close_due(h)
    engine = h.executor.engine
    # Read by a sequential scan, as on a table where one merchant's orders are most rows (a few rows are read
    # through the primary key, in order id order by chance).
    engine.dispose()
    sa.event.listen(engine, "connect", _sequential_scans_only)
    with engine.begin() as conn:
        conn.execute(sa.update(orders).where(orders.c.order_id == "ord_1").values(updated_at=orders.c.updated_at))
        stored = conn.scalars(sa.select(orders.c.order_id).where(orders.c.customer_id == "cus_71")).all()
    assert stored == ["ord_2", "ord_1"]  # the physical order an unordered read finds them in
    interleave = Interleave(engine)
    interleave.step_by_step_recording(h.executor)
    record_opt_out = core.record_opt_out

    def record_in_step(conn: sa.Connection, *args: Any) -> bool:
        if not interleave.started():  # the opt-out's second order: its first is locked by now
            interleave.first_step_done()
        return record_opt_out(conn, *args)

    monkeypatch.setattr(core, "record_opt_out", record_in_step)
    errors: list[BaseException] = []
    _run_both(
        lambda: h.worker.record([(action, NoEffect()) for action in batch]),
        lambda: h.executor.opt_out("m_demo", "cus_71", Channel.EMAIL),
        errors,
    )
    assert [str(getattr(error, "orig", error)).splitlines()[0] for error in errors] == []
    assert interleave.errors == []
    assert h.count(opt_outs) == 1


def test_renewing_claims_locks_their_rows_order_by_order(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
) -> None:
    """The claim keeper renews the claims of the messages and charges out in one transaction; it locked their rows
    in the order they were kept, and a batch settling their orders locks them order by order (each order's
    messages as it settles it): a renewal holding ord_2's message and waiting for ord_1's could deadlock with a
    batch holding ord_1's and waiting for ord_2's. Renewals now go by order, then action id."""
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retarget", "channel": "sms"},
    )
    h.executor.payment_failed("m_demo", event("ord_1"))
    h.executor.payment_failed("m_demo", event("ord_2"))
    messages = h.executor.claim(10, 30, "w1", "claim-w1")
    assert [a.order_id for a in messages] == ["ord_1", "ord_2"]
    extend_claim, extended = h.executor.extend_claim, []

    def noting_extend_claim(conn: sa.Connection, action: ActionRow, until: Any) -> bool:
        extended.append(action.order_id)
        return extend_claim(conn, action, until)

    h.executor.extend_claim = noting_extend_claim  # type: ignore[method-assign]
    kept_later_first = [(action, timedelta(seconds=30)) for action in reversed(messages)]
    assert h.executor.renew_claims(kept_later_first) == set()
    assert extended == ["ord_1", "ord_2"]
