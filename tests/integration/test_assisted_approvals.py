"""Assisted mode: what becomes of an agent's approval when its order is decided again before it is carried out.

An agent approved a silent retry (or a payment link) planned for later, after payday say; before it is due, the
order is decided again: the customer paid on a live link from an earlier message and was declined, or opted out
of the approved message's channel. Before, the new recommendation waited for an agent while the approved action
stayed scheduled, and when it fell due it was cancelled without a word ("order is AWAITING_AGENT"): the agent's
approval vanished. Now it stands when the new decision plans the same thing; otherwise it is withdrawn, with why,
and the new recommendation waits for review. Never two plans of the same order, never a charge after the customer
paid. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from model.requests import Decision
from model.vocab import Channel
from service.executor.core import Executor, Transient
from service.executor.routes import _pay
from service.executor.store import actions, agent_queue, nudges, orders
from tests.factories import make_request
from tests.integration.test_console import CSRF_RE, Console, console, flash  # noqa: F401 - console is a fixture
from tests.integration.test_executor import (  # noqa: F401 - make_harness is a fixture
    PAID_BY_MERCHANT,
    Clock,
    FakeConnector,
    Harness,
    HookConnector,
    ScriptedDecider,
    demo_merchant,
    event,
    make_harness,
    runtime,
    token_of,
    webhook_events,
)
from tests.integration.test_executor_one_message import BusyProvider, SlowProvider

SMS = {"action": "retarget", "channel": "sms"}
AFTER_PAYDAY = timedelta(days=3)
RETRY_AFTER_PAYDAY = {"action": "retry", "strategy": "cascade", "connector": "adyen", "delay": AFTER_PAYDAY}
EMAIL_TOMORROW = {"action": "retarget", "channel": "email", "delay": timedelta(days=1)}


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """None (the harness's SQLite file) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("postgres_url"))


def _approved_later(
    make: Any,
    database_url: str | None,
    approved: dict[str, Any],
    *after: dict[str, Any],
    provider: SlowProvider | None = None,
    connector: FakeConnector | None = None,
) -> Harness:
    """An assisted order: an approved SMS link went out; at its follow-up (a day later) an agent approved
    ``approved``, planned for later; ``after`` answers the decisions that follow. The SMS's link lives on.
    ``provider``: the messages' provider (else one that takes every message); ``connector``: the charges' (else
    one that declines the first and takes the second)."""
    h: Harness = make(
        *(dict(step) for step in (SMS, approved, *after)),  # the scripted decider pops a step's delay
        merchants={"m_demo": demo_merchant(mode="assisted")},
        connector=connector or FakeConnector(results=["failure", "success"]),
        database_url=database_url,
    )
    if provider is not None:
        h.effects.adapter_factory = provider.adapters
    h.executor.payment_failed("m_demo", event())
    h.executor.act_on_queued("ord_1", "approve", "ana", "send the link")
    h.drain()  # the SMS with its link (48 h) goes out
    h.clock.advance(hours=24)
    h.drain()  # its follow-up: the next decision waits for an agent
    assert h.executor.act_on_queued("ord_1", "approve", "ana", "after payday") == "PENDING"
    h.drain()
    return h


def _queue(h: Harness) -> list[dict[str, Any]]:
    with h.executor.engine.connect() as conn:
        return [dict(row) for row in conn.execute(sa.select(agent_queue).order_by(agent_queue.c.item_id)).mappings()]


def _withdrawn_for_the_new_recommendation(h: Harness) -> dict[str, Any]:
    """The approval (the order's second queue item) withdrawn by the new recommendation, which waits for an agent."""
    queue = _queue(h)
    assert [item["state"] for item in queue] == ["approved", "approved", "pending"]
    withdrawn = queue[1]
    assert withdrawn["withdrawn_at"] is not None
    assert withdrawn["withdrawn_by"] == queue[2]["decision_id"]
    return withdrawn


def _decline_the_link(h: Harness) -> None:
    h.clock.advance(hours=6)
    code, _title, _message = _pay(runtime(h), token_of(h))
    assert code == 402  # declined: the order is decided again


def test_an_approved_retry_stands_when_the_order_decided_again_plans_the_same_retry(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str | None,
) -> None:
    h = _approved_later(make_harness, database_url, RETRY_AFTER_PAYDAY, RETRY_AFTER_PAYDAY)
    _decline_the_link(h)
    view = h.view()
    assert view.state == "PENDING"  # nothing new for an agent to review
    queue = _queue(h)
    assert [item["state"] for item in queue] == ["approved", "approved", "agreed"]
    assert queue[1]["withdrawn_at"] is None
    assert "stands" in queue[2]["reason"]
    assert "ana" in queue[2]["reason"]
    assert "payment by link" in queue[2]["reason"]
    retry = next(a for a in view.actions if a.kind == "retry")
    assert retry.state == "scheduled"
    h.clock.advance(days=3)
    h.drain()  # the approved retry, at the time the agent approved
    assert h.view().state == "SUCCEEDED"
    assert [key for key in h.connector.calls if ":retry:" in key] == [f"m_demo:ord_1:retry:{retry.decision_id}"]


def test_an_approved_retry_is_withdrawn_with_why_when_the_order_decided_again_plans_otherwise(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str | None,
) -> None:
    h = _approved_later(make_harness, database_url, RETRY_AFTER_PAYDAY, EMAIL_TOMORROW)
    _decline_the_link(h)
    view = h.view()
    assert view.state == "AWAITING_AGENT"
    withdrawn = _withdrawn_for_the_new_recommendation(h)
    assert "payment by link" in withdrawn["withdrawn_reason"]
    assert "declined" in withdrawn["withdrawn_reason"]
    retry = next(a for a in view.actions if a.kind == "retry")
    assert retry.state == "cancelled"
    assert "withdrawn" in (retry.last_error or "")
    h.clock.advance(days=4)
    h.drain()
    assert [key for key in h.connector.calls if ":retry:" in key] == []  # no charge the agent did not approve


def test_an_older_approval_is_not_withdrawn_behind_a_newer_one_already_withdrawn(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str | None,
) -> None:
    # Review: the settling took the latest approval *not withdrawn*, so behind a withdrawn one it reached an older
    # approval, settled long before (here made to look like one from before withdrawals were recorded: its message
    # never went and its action was cancelled), and stamped it with today's cause.
    h = _approved_later(make_harness, database_url, RETRY_AFTER_PAYDAY, EMAIL_TOMORROW)
    _decline_the_link(h)
    first, withdrawn, _pending = _queue(h)
    assert withdrawn["withdrawn_at"] is not None
    with h.executor.engine.begin() as conn:
        conn.execute(nudges.update().where(nudges.c.decision_id == first["decision_id"]).values(status="failed"))
        conn.execute(actions.update().where(actions.c.decision_id == first["decision_id"]).values(state="cancelled"))
        order = conn.execute(sa.select(orders)).mappings().one()
        decision = Decision.model_construct(decision_id="dec_later")
        assert not h.executor._approval_stands(conn, order, make_request(), decision, "a later cause", h.clock())
    assert _queue(h)[0]["withdrawn_at"] is None


def test_an_agent_approving_the_new_recommendation_plans_one_charge(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str | None,
) -> None:
    cascade_now = {"action": "retry", "strategy": "cascade", "connector": "cybersource"}
    h = _approved_later(make_harness, database_url, RETRY_AFTER_PAYDAY, cascade_now)
    _decline_the_link(h)
    assert h.view().state == "AWAITING_AGENT"
    h.executor.act_on_queued("ord_1", "approve", "ana", "retry on cybersource now")
    h.clock.advance(days=4)
    h.drain()
    retries = [key for key in h.connector.calls if ":retry:" in key]
    assert retries == ["m_demo:ord_1:retry:dec_3_ord_1"]  # the new recommendation's; the withdrawn one never
    assert h.view().state == "SUCCEEDED"


def test_an_approved_retry_is_not_charged_after_the_customer_paid(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str | None,
) -> None:
    h = _approved_later(make_harness, database_url, RETRY_AFTER_PAYDAY)
    h.executor.payment_succeeded("m_demo", PAID_BY_MERCHANT | {"occurred_at": h.clock.now.isoformat()})
    h.clock.advance(days=4)
    h.drain()
    assert [key for key in h.connector.calls if ":retry:" in key] == []
    assert h.view().state == "SUCCEEDED"


def test_an_approved_message_stands_when_the_order_decided_again_plans_the_same_message(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str | None,
) -> None:
    h = _approved_later(make_harness, database_url, EMAIL_TOMORROW, EMAIL_TOMORROW)
    _decline_the_link(h)
    assert h.view().state == "PENDING"
    assert [item["state"] for item in _queue(h)] == ["approved", "approved", "agreed"]
    h.clock.advance(days=1)
    h.drain()
    assert [message.channel for message in h.outbox] == [Channel.SMS, Channel.EMAIL]


def test_an_approved_message_is_withdrawn_with_why_when_the_order_decided_again_plans_otherwise(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str | None,
) -> None:
    h = _approved_later(make_harness, database_url, EMAIL_TOMORROW, RETRY_AFTER_PAYDAY)
    _decline_the_link(h)
    assert h.view().state == "AWAITING_AGENT"
    queue = _queue(h)
    assert [item["state"] for item in queue] == ["approved", "approved", "pending"]
    assert "declined" in queue[1]["withdrawn_reason"]
    h.clock.advance(days=1)
    h.drain()
    assert [message.channel for message in h.outbox] == [Channel.SMS]  # the withdrawn email never went


def test_an_approved_message_the_customer_opted_out_of_is_withdrawn_with_why(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str | None,
) -> None:
    """The approved message itself can no longer go (the customer opted out of its channel): the order is decided
    again, and the approval says why it was not carried out, even though the new decision is for an agent too."""
    h = _approved_later(make_harness, database_url, EMAIL_TOMORROW, RETRY_AFTER_PAYDAY)
    h.executor.opt_out("m_demo", "cus_71", Channel.EMAIL)
    queue = _queue(h)
    assert queue[1]["state"] == "approved"
    assert "opted out of email" in (queue[1]["withdrawn_reason"] or "")
    assert queue[-1]["state"] == "pending"
    assert h.view().state == "AWAITING_AGENT"


def test_a_standing_approved_retry_keeps_its_place_in_a_budget_of_one_retry(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str | None,
) -> None:
    """The approved retry reserved its payment number (ord_1_2) before the customer's payment by link took the next
    one (ord_1_3). Before, every check of the order's history counted the number the retry held as a retry already
    made: with a budget of one retry, the retry was refused at its own send ("max_retries") and the agent's
    approval withdrawn. A retry not yet sent has not been made."""
    h: Harness = make_harness(
        *(dict(step) for step in (SMS, RETRY_AFTER_PAYDAY, RETRY_AFTER_PAYDAY)),
        merchants={"m_demo": demo_merchant(mode="assisted", retry={"max_retries": 1})},
        connector=FakeConnector(results=["failure", "success"]),
        database_url=database_url,
    )
    h.executor.payment_failed("m_demo", event())
    h.executor.act_on_queued("ord_1", "approve", "ana", "send the link")
    h.drain()
    h.clock.advance(hours=24)
    h.drain()
    h.executor.act_on_queued("ord_1", "approve", "ana", "after payday")
    _decline_the_link(h)
    assert h.view().state == "PENDING"  # the approval stands
    h.clock.advance(days=3)
    h.drain()
    view = h.view()
    assert view.state == "SUCCEEDED", [(a.kind, a.state, a.last_error) for a in view.actions]
    assert [(a.processor_payment_id, a.strategy) for a in view.attempts] == [
        ("ord_1_1", "initial"),
        ("ord_1_2", "cascade"),  # the number it took when approved
        ("ord_1_3", "retarget_link"),
    ]


#: The approved email, on Day 2 (the next day the skip-days cadence allows) at 09:30 in Kolkata, while the SMS's
#: link (sent on Day 0, 48 h) still lives.
EMAIL_DAY_2 = {"action": "retarget", "channel": "email", "delay": timedelta(hours=22)}
WHATSAPP_NOW = {"action": "retarget", "channel": "whatsapp"}


def _approved_email_timed_out(make: Any, database_url: str | None, *after: dict[str, Any]) -> tuple[Harness, Any]:
    """The approved email's first try timed out at its provider (it may have reached the customer): it waits to
    be re-sent. Then the customer pays on the SMS's link and is declined: ``after`` answers the new decision. The
    harness and the email's action."""
    provider = SlowProvider()
    h = _approved_later(make, database_url, EMAIL_DAY_2, *after, provider=provider)
    h.clock.advance(hours=22)
    provider.time_outs = 1
    h.drain()
    email = next(a for a in h.view().actions if a.kind == "nudge" and a.decision_id == "dec_2_ord_1")
    assert (email.state, email.attempts) == ("scheduled", 1)  # its re-send waits
    h.clock.advance(seconds=0.5)  # before the re-send is due
    sms_link = provider.outbox[0].variables["link_url"].rsplit("/pay/", 1)[1]
    code, _title, _message = _pay(runtime(h), sms_link)
    assert code == 402
    return h, provider


def test_an_approved_message_waiting_for_its_re_send_after_a_timeout_is_withdrawn_and_kept_as_maybe_sent(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str | None,
) -> None:
    """Review: the approved email's try timed out (so it may be with the customer) and its re-send waited; the
    order was decided again and the re-send was neither kept nor withdrawn: at its time it was dropped without a
    word ("order is AWAITING_AGENT"), and nothing said it may have been sent. Now the approval is withdrawn with
    why, the email stays in the history as maybe sent (its day and the order's max_nudges count it), and a
    message the agent approves next does not go the same day."""
    h, provider = _approved_email_timed_out(make_harness, database_url, WHATSAPP_NOW)
    tried_at = h.clock.now - timedelta(seconds=0.5)
    assert h.view().state == "AWAITING_AGENT"
    withdrawn = _withdrawn_for_the_new_recommendation(h)
    assert "declined" in withdrawn["withdrawn_reason"]
    assert "email message may have reached the customer" in withdrawn["withdrawn_reason"]
    # The new decision was made knowing the email may be with the customer (decide() keeps the day's one message).
    decided = h.executor.decider.requests[-1]
    assert [(n.channel, n.sent_at) for n in decided.history.nudges] == [
        (Channel.SMS, h.view().nudges[0].sent_at),
        (Channel.EMAIL, tried_at),
    ]
    _email_kept_as_maybe_sent_and_no_whatsapp_that_day(h, provider, withdrawn, tried_at)


def _email_kept_as_maybe_sent_and_no_whatsapp_that_day(
    h: Harness, provider: SlowProvider, withdrawn: dict[str, Any], tried_at: datetime
) -> None:
    """The approved email whose try timed out is in the history as maybe sent, dated by that try, and is never
    re-sent; the WhatsApp link the agent approves next does not go on the day the email may have reached the
    customer."""
    email = next(n for n in h.view().nudges if n.channel == "email")
    assert email.decision_id == "dec_2_ord_1"
    assert "may have reached the provider" in (email.error or "")
    assert email.sent_at == tried_at  # the day it may have reached the customer
    h.clock.advance(minutes=10)
    h.drain()
    assert [m.channel for m in provider.outbox] == [Channel.SMS, Channel.EMAIL]  # never re-sent
    h.executor.act_on_queued("ord_1", "approve", "ana", "whatsapp then")
    h.drain()
    assert [m.channel for m in provider.outbox] == [Channel.SMS, Channel.EMAIL]
    whatsapp = next(a for a in h.view().actions if a.decision_id == withdrawn["withdrawn_by"])
    assert "one_nudge_per_day" in (whatsapp.last_error or "")


def test_an_approved_message_waiting_for_its_re_send_stands_when_the_order_decided_again_plans_the_same(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str | None,
) -> None:
    h, provider = _approved_email_timed_out(make_harness, database_url, {"action": "retarget", "channel": "email"})
    assert h.view().state == "PENDING"
    queue = _queue(h)
    assert [item["state"] for item in queue] == ["approved", "approved", "agreed"]
    assert queue[1]["withdrawn_at"] is None
    _email_re_sent_under_its_first_key(h, provider)


def _email_re_sent_under_its_first_key(h: Harness, provider: SlowProvider) -> None:
    """The approved email that stands is re-sent at its time under its first try's key."""
    h.clock.advance(minutes=10)
    h.drain()  # the re-send, under the first try's key: a provider that took the first drops it as a repeat
    assert [(m.channel, m.idempotency_key) for m in provider.outbox][1:] == [
        (Channel.EMAIL, "m_demo:ord_1:nudge:dec_2_ord_1"),
        (Channel.EMAIL, "m_demo:ord_1:nudge:dec_2_ord_1"),
    ]
    assert [(n.channel, n.status) for n in h.view().nudges] == [("sms", "accepted"), ("email", "accepted")]


STOP = {"action": "stop"}


def _approved_email_times_out_as_the_order_is_decided_again(
    make: Any, database_url: str | None, *after: dict[str, Any]
) -> tuple[Harness, SlowProvider, datetime]:
    """The approved email is with its provider when the customer pays on the SMS's link and is declined: the order
    is decided again (``after``) while the email is in flight. Then the provider's answer times out: it may have
    the email. The harness, the provider and when the email was handed over."""
    provider = BusyProvider()
    h = _approved_later(make, database_url, EMAIL_DAY_2, *after, provider=provider)
    h.clock.advance(hours=22)
    sms_link = provider.outbox[0].variables["link_url"].rsplit("/pay/", 1)[1]
    paid: list[int] = []
    provider.during = lambda: paid.append(_pay(runtime(h), sms_link)[0])
    provider.time_outs = 1
    handed_over = h.clock.now
    h.drain()
    assert paid == [402]  # declined while the email was with its provider
    assert [m.channel for m in provider.outbox] == [Channel.SMS, Channel.EMAIL]
    return h, provider, handed_over


def test_an_approved_message_in_flight_as_the_order_is_decided_again_that_times_out_is_kept_as_maybe_sent(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str | None,
) -> None:
    """Review: the re-decision left the approved email in flight to finish; its provider then timed out, its
    re-send was scheduled, and at its time the re-send was skipped ("order is AWAITING_AGENT"): nothing said the
    customer may have the email, the approval was neither kept nor withdrawn, and the WhatsApp the agent approved
    next went the same day. Now the timeout on an order awaiting an agent decides it again, knowing the email may be
    out: the approval is withdrawn with why, the email is kept as maybe sent, and no other message goes that day."""
    h, provider, handed_over = _approved_email_times_out_as_the_order_is_decided_again(
        make_harness, database_url, WHATSAPP_NOW, WHATSAPP_NOW
    )
    assert h.view().state == "AWAITING_AGENT"
    queue = _queue(h)
    assert [item["state"] for item in queue] == ["approved", "approved", "superseded", "pending"]
    withdrawn = queue[1]
    assert withdrawn["withdrawn_by"] == queue[3]["decision_id"]
    assert "email message may have reached the customer" in withdrawn["withdrawn_reason"]
    # The recommendation the agent sees was made knowing the email may be with the customer.
    decided = h.executor.decider.requests[-1]
    assert [n.channel for n in decided.history.nudges] == [Channel.SMS, Channel.EMAIL]
    _email_kept_as_maybe_sent_and_no_whatsapp_that_day(h, provider, withdrawn, handed_over)


def test_an_approved_message_in_flight_as_the_order_is_decided_again_that_times_out_stands_for_the_same_plan(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str | None,
) -> None:
    h, provider, _handed_over = _approved_email_times_out_as_the_order_is_decided_again(
        make_harness, database_url, WHATSAPP_NOW, {"action": "retarget", "channel": "email"}
    )
    assert h.view().state == "PENDING"
    queue = _queue(h)
    assert [item["state"] for item in queue] == ["approved", "approved", "superseded", "agreed"]
    assert queue[1]["withdrawn_at"] is None
    _email_re_sent_under_its_first_key(h, provider)


def test_an_approved_message_in_flight_as_the_order_is_settled_that_times_out_is_kept_as_maybe_sent(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str | None,
) -> None:
    """Review: the merchant reported the order paid while the approved email was with its provider; settling
    cancelled the email's action, and the provider's answer then timed out: the answer was refused as stale and
    dropped, and nothing said the customer may have the email. It is kept as maybe sent, with why, and nothing
    more is sent or scheduled for the settled order, whose webhook goes once."""
    provider = BusyProvider()
    h = _approved_later(make_harness, database_url, EMAIL_DAY_2, provider=provider)
    h.clock.advance(hours=22)
    paid = PAID_BY_MERCHANT | {"occurred_at": h.clock.now.isoformat()}
    provider.during = lambda: h.executor.payment_succeeded("m_demo", paid)
    provider.time_outs = 1
    handed_over = h.clock.now
    h.drain()
    view = h.view()
    assert view.state == "SUCCEEDED"
    email = next(n for n in view.nudges if n.channel == "email")
    assert (email.decision_id, email.status, email.delivered) == ("dec_2_ord_1", "rejected", False)
    assert email.sent_at == handed_over  # the day it may have reached the customer
    assert "its order was settled while it was with its provider" in (email.error or "")
    assert "1 earlier try may have reached the provider" in (email.error or "")
    [action] = [a for a in h.view().actions if a.kind == "nudge" and a.decision_id == "dec_2_ord_1"]
    assert (action.state, action.last_error) == ("cancelled", "timeout")  # its answer, not dropped as stale
    h.clock.advance(days=2)
    h.drain()
    assert [m.channel for m in provider.outbox] == [Channel.SMS, Channel.EMAIL]  # never re-sent
    assert [a.state for a in h.view().actions if a.state in ("scheduled", "claimed")] == []
    assert webhook_events(h) == ["order.succeeded"]


def _close_actions(h: Harness) -> list[Any]:
    return [a for a in h.view().actions if a.kind == "close" and a.state in ("scheduled", "claimed")]


def test_an_approved_stop_waiting_for_a_live_link_is_withdrawn_with_why_when_its_link_payment_is_declined(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str | None,
) -> None:
    """The agent approved a stop: the order fails once the SMS's link (live for another day) expires. The customer
    pays on that link and is declined, and the order is decided again. Before, the stop was not marked withdrawn
    and its close stayed planned: at the link's expiry it failed the order under the new recommendation."""
    h = _approved_later(make_harness, database_url, STOP, EMAIL_TOMORROW)
    assert len(_close_actions(h)) == 2  # the window's end, and the stop's at the link's expiry
    _decline_the_link(h)
    assert h.view().state == "AWAITING_AGENT"
    withdrawn = _withdrawn_for_the_new_recommendation(h)
    assert "payment by link was declined" in withdrawn["withdrawn_reason"]
    assert len(_close_actions(h)) == 1  # the window's end only
    h.clock.advance(hours=24)  # past the link's expiry
    h.drain()
    assert h.view().state == "AWAITING_AGENT"  # the new recommendation still waits for an agent


def test_an_approved_stop_stands_when_the_order_decided_again_stops_too(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str | None,
) -> None:
    h = _approved_later(make_harness, database_url, STOP, STOP)
    _decline_the_link(h)
    queue = _queue(h)
    assert [item["state"] for item in queue] == ["approved", "approved", "agreed"]
    assert queue[1]["withdrawn_at"] is None
    assert h.view().state == "FAILED"  # no live link is left to wait for
    h.drain()
    assert [hook.content.count(b"order.failed") for hook in h.receiver.received] == [1]


RETRY_IN_6H = {"action": "retry", "strategy": "cascade", "connector": "adyen", "delay": timedelta(hours=6)}


def _retry_claimed_as_the_order_is_decided_again(
    make: Any, database_url: str | None, *after: dict[str, Any]
) -> tuple[Harness, Any]:
    """An agent approved a retry in 6 h while the SMS's link lives. When it falls due the customer pays on the
    link; while that payment is with the connector, a worker claims the approved retry (the same moment), and the
    link payment's decline decides the order again (``after``). Then the worker goes on with the retry it holds.
    The harness and the retry as claimed."""
    connector = HookConnector(results=["failure", "success"])
    h = _approved_later(make, database_url, RETRY_IN_6H, *after, connector=connector)
    h.clock.advance(hours=6)
    claimed: list[Any] = []

    def worker_claims_the_retry() -> None:
        claimed.extend(h.executor.claim(limit=10, lease_seconds=30, worker_id="w2", token="claim_w2"))

    connector.during[":link:"] = worker_claims_the_retry
    code, _title, _message = _pay(runtime(h), token_of(h))
    assert code == 402
    [retry] = claimed
    assert retry.kind == "retry"
    with h.executor.engine.connect() as conn:
        order = h.executor.orders_of(conn, [retry])[("m_demo", "ord_1")]
    h.worker.record([(retry, h.effects.perform(retry, order))])
    return h, retry


def test_an_approved_retry_claimed_as_the_order_is_decided_again_otherwise_is_withdrawn_with_why(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str | None,
) -> None:
    """Before, the re-decision left a claimed retry to finish, and its worker then skipped it ("order is
    AWAITING_AGENT"): the approval vanished without a mark. A claimed retry not yet sent is the order's to settle
    under its lock, as one still scheduled: here withdrawn, and its worker finds its claim gone."""
    h, retry = _retry_claimed_as_the_order_is_decided_again(make_harness, database_url, EMAIL_TOMORROW)
    withdrawn = _withdrawn_for_the_new_recommendation(h)
    assert "payment by link was declined" in withdrawn["withdrawn_reason"]
    action = next(a for a in h.view().actions if a.action_id == retry.action_id)
    assert action.state == "cancelled"
    assert "approval withdrawn" in (action.last_error or "")
    assert [key for key in h.connector.calls if ":retry:" in key] == []
    assert h.view().state == "AWAITING_AGENT"


def test_an_approved_retry_claimed_as_the_order_is_decided_again_to_the_same_retry_is_charged(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str | None,
) -> None:
    h, retry = _retry_claimed_as_the_order_is_decided_again(make_harness, database_url, RETRY_IN_6H)
    assert [item["state"] for item in _queue(h)] == ["approved", "approved", "agreed"]
    assert [key for key in h.connector.calls if ":retry:" in key] == [retry.idempotency_key]
    assert h.view().state == "SUCCEEDED"


# ------------------------------------------------------------------------------------------- the console


def _approve_in_console(
    console: Console,  # noqa: F811 - the fixture's type
    *steps: dict[str, Any],
    meanwhile: Callable[[Executor], None] | None = None,
) -> Any:
    """Order ``ord_p`` of assisted merchant ``m_a``, decided by ``steps``: asha approves the first decision in the
    console; ``meanwhile`` happens; the order is then decided again (the customer's payment by link was declined).
    The executor."""
    assert console.engine is not None  # building the engine builds the executor
    executor = console.api.app.state.executor.executor
    executor.decider = ScriptedDecider(Clock(), *(dict(step) for step in steps))
    # Not an Indian card's renewal (its RBI e-mandate would refuse the scripted cascade): USD, no country.
    console.fail_order("m_a", "ord_p", currency="USD", customer={"country": None})
    console.sign_in("asha@m_a")
    page = console.get("/console/orders/ord_p").text
    shown = re.search(r'name="decision_id" value="([^"]+)"', page)
    csrf = CSRF_RE.search(page)
    assert shown is not None
    assert csrf is not None
    answer = console.act(
        "/console/orders/ord_p/actions",
        {"action": "approve", "decision_id": shown.group(1), "csrf_token": csrf.group(1)},
    )
    assert re.fullmatch(r"Carry out the recommendation: .+: done; the order is PENDING", flash(answer)), flash(answer)
    if meanwhile is not None:
        meanwhile(executor)
    with executor.engine.begin() as conn:
        order = executor.lock_order(conn, "m_a", "ord_p")
        executor._decision_point(conn, order, datetime.now(UTC), "the customer's payment by link was declined (51)")
    return executor


def test_the_console_shows_an_approval_withdrawn_next_to_the_new_recommendation(
    console: Console,  # noqa: F811 - the fixture
) -> None:
    _approve_in_console(console, RETRY_AFTER_PAYDAY, EMAIL_TOMORROW)
    page = console.get("/console/orders/ord_p").text
    notice = re.search(r'data-testid="approval-withdrawn">(.*?)</section>', page, re.S)
    assert notice is not None, page
    text = " ".join(notice.group(1).split())
    assert "asha@m_a approved <strong>Retry: cascade via adyen</strong>" in text
    assert "the order was decided again: the customer&#39;s payment by link was declined (51)" in text
    assert "nothing was charged or sent for it" in text
    assert 'data-testid="approve"' in page  # the new recommendation waits for review
    assert "Payment link by email" in page
    assert "Approval withdrawn: Retry: cascade via adyen (approved by asha@m_a), not carried out" in page
    with console.engine.connect() as conn:
        retry = conn.execute(sa.select(actions).where(actions.c.kind == "retry")).mappings().one()
    assert retry["state"] == "cancelled"
    queue = console.get("/console/queue").text
    row = re.search(r'<tr data-order="ord_p".*?</tr>', queue, re.S)
    assert row is not None
    assert 'data-testid="approval-withdrawn-badge"' in row.group(0)


def test_the_console_shows_an_approval_that_stands_and_no_withdrawal(
    console: Console,  # noqa: F811 - the fixture
) -> None:
    _approve_in_console(console, RETRY_AFTER_PAYDAY, RETRY_AFTER_PAYDAY)
    page = console.get("/console/orders/ord_p").text
    assert 'data-testid="approval-withdrawn"' not in page
    assert 'data-testid="approve"' not in page  # nothing waits for an agent
    assert "Decided again: Retry: cascade via adyen, as approved; the approval stands" in page
    assert "payment by link was declined (51)" in page
    assert "retry at" in page  # still scheduled, at the time asha approved
    assert 'data-testid="approval-withdrawn-badge"' not in console.get("/console/queue?state=all").text


def _email_times_out(executor: Executor) -> None:
    """The approved email is claimed and its provider's answer times out: its re-send waits."""
    [email] = executor.claim(limit=10, lease_seconds=30, worker_id="w1", token="claim_1")
    assert email.kind == "nudge"
    with executor.engine.begin() as conn:
        executor.complete(conn, email, Transient("email provider timed out"))


def test_the_console_says_a_withdrawn_message_whose_try_timed_out_may_have_reached_the_customer(
    console: Console,  # noqa: F811 - the fixture
) -> None:
    email_now = {"action": "retarget", "channel": "email"}
    _approve_in_console(console, email_now, RETRY_AFTER_PAYDAY, meanwhile=_email_times_out)
    page = console.get("/console/orders/ord_p").text
    notice = re.search(r'data-testid="approval-withdrawn">(.*?)</section>', page, re.S)
    assert notice is not None, page
    text = " ".join(notice.group(1).split())
    assert "asha@m_a approved <strong>Payment link by email</strong>" in text
    assert "<strong>may have reached the customer</strong>" in text
    assert "nothing was charged or sent" not in text
    assert "Approval withdrawn: Payment link by email (approved by asha@m_a), not carried out" in page
    assert "email message may have reached the customer" in page  # the timeline's line says why
