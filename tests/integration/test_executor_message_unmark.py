"""A payment-link message its provider refused, whose 'being sent' mark could not be taken back (a database blip
on the unmark right after the provider's answer).

The refusal was recorded and the mark stayed: on a message asked to be sent again (a 503), its next claim took the
mark for a hand-over nobody answered and counted the refused try as one that may have reached the customer (the
cadence and ``max_nudges`` counted a message that never went); on a message refused for good (a 4xx), the order
view said, for good, that the message was with its provider and unanswered. Recording the answer clears the mark.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from model.vocab import Channel
from service.executor.channels.base import SendResult
from service.executor.core import MESSAGE_MAYBE_SENT_TRIES
from service.executor.store import actions
from tests.integration.test_executor import (  # noqa: F401 - make_harness is a fixture
    _order_row,
    event,
    make_harness,
)


def _refused_and_unmark_fails(make_harness: Any, database_url: str, answer: SendResult) -> tuple[Any, Any]:  # noqa: F811
    """One order whose SMS the provider answers with ``answer``; the unmark after it hits a database blip."""
    h = make_harness({"action": "retarget", "channel": "sms"}, database_url=database_url)
    h.executor.payment_failed("m_demo", event())
    (message,) = h.executor.claim(1, 30, "w1", "claim-w1")
    assert message.kind == "nudge"
    adapter: Any = h.effects.adapters("m_demo")[Channel.SMS]

    async def refuse(outbound: Any) -> SendResult:
        return answer

    adapter.send = refuse
    real_unmark = h.executor.unmark_sent
    failed: list[int] = []

    def unmark(action: Any) -> None:
        h.executor.unmark_sent = real_unmark  # type: ignore[method-assign]
        failed.append(action.action_id)
        raise sa.exc.OperationalError("UPDATE actions ...", {}, Exception("database is locked"))

    h.executor.unmark_sent = unmark  # type: ignore[method-assign]
    h.worker.record([(message, h.effects.perform(message, _order_row(h)))])
    assert failed == [message.action_id]  # the blip did happen
    return h, message


def _row(h: Any, action_id: int) -> Any:
    with h.executor.engine.connect() as conn:
        return conn.execute(
            sa.select(actions.c.state, actions.c.unanswered_since, actions.c.payload_json).where(
                actions.c.action_id == action_id
            )
        ).one()


@pytest.mark.parametrize(
    "answer",
    [
        SendResult(status="retryable", error="provider busy", not_taken=True),
        SendResult(status="rejected", error="number not on WhatsApp"),
    ],
    ids=["asked-to-send-again", "refused-for-good"],
)
def test_a_refused_message_keeps_no_sending_mark_when_its_unmark_fails(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str,
    answer: SendResult,
) -> None:
    h, message = _refused_and_unmark_fails(make_harness, database_url, answer)
    row = _row(h, message.action_id)
    assert row.state == ("scheduled" if answer.status == "retryable" else "done")
    assert row.unanswered_since is None
    (shown,) = [action for action in h.view().actions if action.action_id == message.action_id]
    assert shown.unanswered_since is None  # the order view does not say it is with its provider


def test_a_message_asked_to_be_sent_again_is_not_counted_as_maybe_sent_at_its_next_claim(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """The provider certainly did not take it (503): its re-send is its first message, not a second one."""
    busy = SendResult(status="retryable", error="provider busy", not_taken=True)
    h, message = _refused_and_unmark_fails(make_harness, database_url, busy)
    h.clock.advance(hours=1)
    (again,) = h.executor.claim(1, 30, "w1", "claim-again")
    assert again.action_id == message.action_id
    assert MESSAGE_MAYBE_SENT_TRIES not in again.payload
    with h.executor.engine.connect() as conn:
        order = h.executor.lock_order(conn, "m_demo", "ord_1")
        assert order is not None
        others = h.executor.request_for(conn, order, h.clock()).history.nudges
    assert others == []  # no message counted as out for the order
