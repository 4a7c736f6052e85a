"""A payment-link message's 'being sent' mark (fef3250) that outlives its send must not hold a retry back.

Ninth review: a mark left by a worker killed during the provider call, or by an unmark that hit a database
blip, made the message and the retry of one order wait for each other for good (the order never charged again),
and an unmark that failed lost the provider's 'accepted' (the message was sent again).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from model.vocab import Channel
from service.executor.channels.base import SendResult
from service.executor.store import actions, nudges
from tests.integration.test_executor import (  # noqa: F401 - make_harness is a fixture
    HookConnector,
    _order_row,
    _retry_and_message_due_together,
    event,
    make_harness,
)


def _leave_a_mark_behind(make_harness: Any, how: str) -> tuple[Any, Any]:  # noqa: F811 - the fixture
    """The retry and the message of one order; the retry planned (and due) a second after the message. Worker 2
    takes the message and its mark outlives the send (killed), or its unmark fails (a blip)."""
    h = _retry_and_message_due_together(make_harness, HookConnector(results=["failure", "success"]))
    later = h.clock() + timedelta(seconds=1)
    with h.executor.engine.begin() as conn:
        conn.execute(
            actions.update()
            .where(actions.c.kind == "retry", actions.c.state == "scheduled")
            .values(due_at=later, planned_at=later)
        )
    (message,) = h.executor.claim(1, 30, "w2", "claim-w2")
    assert message.kind == "nudge"
    if how == "worker-killed-mid-send":
        # worker 2 gets as far as the provider call (its mark is set), then the process is killed: no finally runs
        assert h.effects._mark_message_sending(message) is None
    else:  # the provider refuses it for now (a 503); the executor's unmark right after hits a database blip (a
        # message the provider accepted, or may have taken, keeps its mark until its record, which clears it: no
        # unmark to fail)
        adapter: Any = h.effects.adapters("m_demo")[Channel.SMS]
        accept = adapter.send

        async def busy(message: Any) -> SendResult:
            await accept(message)
            return SendResult(status="retryable", error="provider busy", not_taken=True)

        adapter.send = busy
        real_unmark = h.executor.unmark_sent

        def unmark(action: Any) -> None:
            h.executor.unmark_sent = real_unmark  # type: ignore[method-assign]
            raise sa.exc.OperationalError("UPDATE actions ...", {}, Exception("database is locked"))

        h.executor.unmark_sent = unmark  # type: ignore[method-assign]
        outcome = h.effects.perform(message, _order_row(h))
        h.worker.record([(message, outcome)])
    with h.executor.engine.connect() as conn:
        mark = conn.scalar(sa.select(actions.c.unanswered_since).where(actions.c.action_id == message.action_id))
    # The killed worker's mark is left behind; the blip's is cleared by the record of the provider's answer
    # (tests/integration/test_executor_message_unmark.py): the retry must go ahead either way.
    assert (mark is not None) == (how == "worker-killed-mid-send")
    return h, message


def _actions(h: Any) -> list[tuple[str, str, str | None]]:
    with h.executor.engine.connect() as conn:
        return [
            (row.kind, row.state, row.last_error)
            for row in conn.execute(
                sa.select(actions.c.kind, actions.c.state, actions.c.last_error).where(
                    actions.c.kind.in_(["retry", "nudge"]), actions.c.state.in_(["scheduled", "claimed"])
                )
            )
        ]


@pytest.mark.parametrize("how", ["worker-killed-mid-send", "unmark-hits-a-database-blip"])
def test_one_worker_a_message_mark_left_behind_does_not_hold_the_retry_back_for_good(
    make_harness: Any,  # noqa: F811 - the fixture
    how: str,
) -> None:
    """One worker, one batch holding the message (planned first) and the retry: the message defers for the claimed
    retry, the retry (recorded at once) defers for the marked message, which is still claimed by the batch. Both
    come back at the same lease end, together in a batch again: the order is never charged again."""
    h, _ = _leave_a_mark_behind(make_harness, how)
    for _ in range(60):  # an hour of a worker running
        h.clock.advance(minutes=1)
        h.drain()
        if h.view().state != "PENDING":
            break
    assert h.view().state == "SUCCEEDED", (h.view().state, _actions(h), len(h.outbox))


@pytest.mark.parametrize("how", ["worker-killed-mid-send", "unmark-hits-a-database-blip"])
def test_two_workers_a_message_mark_left_behind_does_not_hold_the_retry_back_for_good(
    make_harness: Any,  # noqa: F811 - the fixture
    how: str,
) -> None:
    """Two workers poll at the same moment, one takes the retry, the other the message: each sees the other
    (the marked message, the claimed retry) and defers to the other's lease end, where the same happens again."""
    h, _ = _leave_a_mark_behind(make_harness, how)
    for round_ in range(60):
        h.clock.advance(minutes=1)
        first = h.executor.claim(1, 30, "w1", f"w1-{round_}")
        second = h.executor.claim(1, 30, "w3", f"w3-{round_}")
        batch = first + second
        outcomes = [(action, h.effects.perform(action, _order_row(h))) for action in batch]
        for action, outcome in outcomes:
            h.worker.record([(action, outcome)])
        h.drain()
        if h.view().state != "PENDING":
            break
    assert h.view().state == "SUCCEEDED", (h.view().state, _actions(h), len(h.outbox))


def test_a_message_the_provider_answered_is_recorded_when_the_unmark_hits_a_blip(
    make_harness: Any,  # noqa: F811 - the fixture
) -> None:
    """fef3250 takes the mark back in a ``finally`` after the provider call. When that UPDATE failed on a database
    blip, its exception replaced the provider's answer: ``perform`` turned it into a Transient, and an accepted
    message was not recorded (no nudge row, no link row) and was sent to the customer again later. An accepted
    message now keeps its mark until its record; the unmark of any other answer must not replace that answer."""
    h, message = _leave_a_mark_behind(make_harness, "unmark-hits-a-database-blip")
    assert len(h.outbox) == 2  # N1, and N2, which the provider asked to send again
    with h.executor.engine.connect() as conn:
        state, error = conn.execute(
            sa.select(actions.c.state, actions.c.last_error).where(actions.c.action_id == message.action_id)
        ).one()
    assert (state, error) == ("scheduled", "provider busy"), (state, error)


def test_a_message_is_recorded_before_the_rest_of_its_batch_runs(
    make_harness: Any,  # noqa: F811 - the fixture
) -> None:
    """(Tenth review.) A message's answer was recorded at the end of its batch, after its claim stopped being
    renewed. A slow charge of another order later in the batch let the message's lease end, and another worker
    took the message over: the customer got it twice (or, had that worker deferred, the provider's 'accepted'
    was refused as stale and the message was nowhere on record). A message's answer is now recorded at once, as
    a charge's is."""
    h = make_harness(
        {"action": "retarget", "channel": "sms"},  # ord_1: a payment link now
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},  # ord_2: a retry now
        connector=HookConnector(results=["failure"]),
    )
    h.executor.payment_failed("m_demo", event("ord_1"))
    h.executor.payment_failed("m_demo", event("ord_2"))
    taken: list[tuple[str, str]] = []

    def slow_charge() -> None:  # ord_2's send outlasts a lease; worker 4 polls meanwhile
        h.clock.advance(seconds=31)
        for action in h.executor.claim(10, 30, "w4", "claim-w4"):
            taken.append((action.order_id, action.kind))
            with h.executor.engine.connect() as conn:
                order = h.executor.orders_of(conn, [action])[(action.merchant_id, action.order_id)]
            h.worker.record([(action, h.effects.perform(action, order))])

    h.connector.during["retry"] = slow_charge
    assert h.worker.run_once() == 2  # ord_1's message, then ord_2's retry
    with h.executor.engine.connect() as conn:
        recorded = conn.scalar(sa.select(sa.func.count()).select_from(nudges).where(nudges.c.order_id == "ord_1"))
    # (ord_2's retry is taken as a re-send: this clock jumps past its lease with no renewal beat in between)
    assert (len(h.outbox), recorded, [kind for order, kind in taken if order == "ord_1"]) == (1, 1, [])
