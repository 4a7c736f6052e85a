"""One payment-link message of an order at a time, and never more than the merchant's ``max_nudges``.

Defect hunt 30: after a link payment was declined, the decision that followed planned a new message while the
paid message's follow-up was still planned, and that follow-up planned a second one (a new decision cancelled only
earlier planned charges). Two workers then claimed the two messages and sent both: the same minute, three
messages with ``max_nudges: 2``. Marking a message as being sent took the order's lock but did not look for
another message of the order being sent, nor check the rules (one message a day, the skip-days cadence,
``max_nudges``) again: they had been checked on a read without the lock, which cannot see a message another
worker is sending, or one it has sent and not yet recorded.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from model.catalog import load_catalog
from model.merchant_config import MerchantConfig
from model.vocab import Channel
from service.executor.channels.base import ChannelAdapter, OutboundMessage, SendResult
from service.executor.core import (
    MAYBE_SENT_NOTE,
    PAYMENT_LINK_TEMPLATE,
    ActionRow,
    Defer,
    NotSent,
    Replan,
    Transient,
    nudge_id_for,
)
from service.executor.routes import _pay
from service.executor.settings import ExecutorSettings
from service.executor.store import ActionKind, actions, as_utc, channel_outages, nudges, orders
from service.executor.worker import Worker, build_effects
from tests.factories import insert_lost_charge
from tests.integration.test_executor import (  # noqa: F401 - make_harness is a fixture
    START,
    FakeConnector,
    Harness,
    _order_row,
    demo_merchant,
    event,
    make_harness,
    runtime,
    token_of,
)

#: Day 2 of an order failed at START (Day 0), 10:00 in Kolkata: the next day the skip-days cadence (1) allows.
DAY_2 = datetime(2026, 11, 4, 4, 30, tzinfo=UTC)
#: How long a test waits for another thread before it fails (never reached when the executor behaves).
PATIENCE = 10.0


class SlowProvider:
    """A message provider that takes a moment to answer: once ``hold`` is set, the next message sent waits until
    ``release`` (``waiting`` says it is with the provider); it counts how many messages it had at once."""

    def __init__(self) -> None:
        self.outbox: list[OutboundMessage] = []
        self.hold = False
        self.waiting = threading.Event()
        self.release = threading.Event()
        self.most_at_once = 0
        self.time_outs = 0  # the next this many sends time out (the provider may have taken them)
        self._at_once = 0
        self._lock = threading.Lock()

    def adapters(self, merchant_id: str, merchant: MerchantConfig, http: httpx.AsyncClient) -> dict[Channel, Any]:
        return {channel: _SlowChannel(channel, self) for channel in Channel}

    def send(self, message: OutboundMessage) -> SendResult:
        with self._lock:
            self.outbox.append(message)
            self._at_once += 1
            self.most_at_once = max(self.most_at_once, self._at_once)
            held, self.hold = self.hold, False
            if self.time_outs:
                self.time_outs -= 1
                self._at_once -= 1
                return SendResult(status="retryable", error="timeout")
        try:
            if held:
                self.waiting.set()
                self.release.wait(PATIENCE)
        finally:
            with self._lock:
                self._at_once -= 1
        return SendResult(status="accepted", provider_message_id=f"pm_{len(self.outbox)}")


class BusyProvider(SlowProvider):
    """A provider that runs ``during()`` while the next message is with it, before it answers."""

    def __init__(self) -> None:
        super().__init__()
        self.during: Callable[[], None] | None = None

    def send(self, message: OutboundMessage) -> SendResult:
        hook, self.during = self.during, None
        if hook is not None:
            hook()
        return super().send(message)


class _SlowChannel:
    def __init__(self, channel: Channel, provider: SlowProvider) -> None:
        self.channel, self.provider_, self.provider = channel, provider, "fake"

    async def send(self, message: OutboundMessage) -> SendResult:
        return self.provider_.send(message)


def _harness(build: Callable[..., Harness], *steps: dict[str, Any], **options: Any) -> tuple[Harness, SlowProvider]:
    provider = SlowProvider()
    h = build(*steps, **options)
    h.effects.adapter_factory = provider.adapters
    return h, provider


def _two_workers_at_once(h: Harness, provider: SlowProvider) -> None:
    """Worker A takes the first message due and holds it at the provider; meanwhile worker B (another process's
    effects, its own event loop) runs a batch; then the provider answers A."""
    settings = ExecutorSettings(database_url=h.executor.engine.url.render_as_string(hide_password=False))
    connectors: dict[str, Any] = {"*": h.connector}
    adapters: Callable[[str, MerchantConfig, httpx.AsyncClient], dict[Channel, ChannelAdapter]] = provider.adapters
    other = build_effects(h.executor, settings, load_catalog(), connectors=connectors, adapters=adapters)
    first, second = Worker(h.executor, h.effects, "wA", batch_size=1), Worker(h.executor, other, "wB", batch_size=1)
    provider.hold = True
    thread = threading.Thread(target=first.run_once)
    thread.start()
    try:
        assert provider.waiting.wait(PATIENCE), "worker A sent no message"
        second.run_once()
    finally:
        provider.release.set()
        thread.join(PATIENCE)
        other.close()
    assert not thread.is_alive()


def _sent(h: Harness) -> list[datetime]:
    with h.executor.engine.connect() as conn:
        return list(conn.scalars(sa.select(nudges.c.sent_at).where(nudges.c.status == "accepted")))


def _planned(h: Harness, *kinds: ActionKind) -> list[str]:
    with h.executor.engine.connect() as conn:
        return list(
            conn.scalars(
                sa.select(actions.c.kind).where(
                    actions.c.kind.in_([kind.value for kind in kinds]), actions.c.state == "scheduled"
                )
            )
        )


def _link_paid_and_declined(build: Callable[..., Harness], **options: Any) -> tuple[Harness, SlowProvider]:
    """N1 goes out on Day 0; an hour later the customer pays its link and is declined: the decision then plans a
    message on Day 2, and N1's follow-up (Day 1) would have planned another for the same moment."""
    h, provider = _harness(
        build,
        {"action": "retarget", "channel": "sms"},  # N1, now
        {"action": "retarget", "channel": "whatsapp", "delay": DAY_2 - (START + timedelta(hours=1))},  # decline
        {"action": "retarget", "channel": "sms", "delay": DAY_2 - (START + timedelta(hours=24))},  # N1's follow-up
        merchants={"m_demo": demo_merchant(retarget={"max_nudges": 2})},
        connector=FakeConnector(results=["failure"]),
        **options,
    )
    h.executor.payment_failed("m_demo", event())
    h.drain()
    assert len(provider.outbox) == 1
    h.outbox.extend(provider.outbox)  # for token_of
    h.clock.advance(hours=1)
    payment = h.executor.start_link_payment(token_of(h), 30, "api", "claim-link")
    h.worker.record([(payment.action, h.effects.perform(payment.action, _order_row(h)))])  # declined
    h.clock.now = START + timedelta(hours=24)
    h.drain()  # N1's follow-up, were it still planned
    return h, provider


def test_a_declined_link_payment_replaces_the_planned_follow_up_so_one_message_is_planned(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
) -> None:
    """The decision after the declined link payment planned a message; N1's follow-up stayed planned and, a day
    later, planned a second message for the same moment: two planned messages of one order."""
    h, _ = _link_paid_and_declined(make_harness)
    assert _planned(h, ActionKind.NUDGE, ActionKind.FOLLOW_UP) == ["nudge"]


def test_two_workers_with_a_slow_provider_send_no_more_than_max_nudges_one_at_a_time(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """The order of the test above, with two workers on Day 2: each claimed one of the two messages and sent it
    while the other's was with the provider, three messages with ``max_nudges: 2``, two of them the same minute."""
    h, provider = _link_paid_and_declined(make_harness, database_url=database_url)
    h.clock.now = DAY_2
    _two_workers_at_once(h, provider)
    h.clock.advance(minutes=1)
    h.drain()
    assert (len(_sent(h)), len(provider.outbox), provider.most_at_once) == (2, 2, 1)


def _two_messages_due_now(build: Callable[..., Harness], **options: Any) -> tuple[Harness, SlowProvider]:
    """An order with two messages planned for now: N1 (by SMS), decided at the failure, and a second (by email)."""
    h, provider = _harness(build, {"action": "retarget", "channel": "sms"}, **options)
    h.executor.payment_failed("m_demo", event())
    with h.executor.engine.begin() as conn:
        h.executor._schedule(
            conn, "m_demo", "ord_1", ActionKind.NUDGE, START, "m_demo:ord_1:nudge:second", START, {"channel": "email"}
        )
    return h, provider


def test_two_workers_holding_two_planned_messages_of_an_order_send_one(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """However an order came to hold two planned messages (one claimed while a new decision planned the next and
    deferred afterwards, or rows planned before the fix), two workers sent both at once: the second checked the
    rules on a read that could not see the first, with its provider."""
    h, provider = _two_messages_due_now(make_harness, database_url=database_url)
    _two_workers_at_once(h, provider)
    with h.executor.engine.connect() as conn:
        messages = conn.execute(sa.select(actions.c.state, actions.c.last_error).where(actions.c.kind == "nudge")).all()
    assert (len(provider.outbox), provider.most_at_once) == (1, 1)
    assert sorted(map(tuple, messages)) == [("done", None), ("scheduled", "another message of the order is being sent")]
    h.clock.advance(minutes=1)
    h.drain()  # the second comes back once the first is on record: one message a day, it is decided again
    assert (len(_sent(h)), len(provider.outbox)) == (1, 1)


def _two_messages_claimed(build: Callable[..., Harness]) -> tuple[Harness, Any, Any]:
    """The two messages of ``_two_messages_due_now``, claimed by one worker (N1 first)."""
    h, _ = _two_messages_due_now(build)
    first, second = h.executor.claim(2, 30, "w2", "claim-w2")
    return h, first, second


def test_a_message_waits_while_another_of_its_order_was_accepted_and_is_not_yet_recorded(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
) -> None:
    """The 'being sent' mark was taken back as soon as the provider answered, before the answer was recorded: a
    message marking itself in between saw neither the mark nor the message on record, and went out too."""
    h, first, second = _two_messages_claimed(make_harness)
    accepted = h.effects.perform(first, _order_row(h))  # the provider accepted it; not yet recorded
    assert isinstance(h.effects._mark_message_sending(second), Defer)
    h.worker.record([(first, accepted)])
    with h.executor.engine.connect() as conn:
        mark = conn.scalar(sa.select(actions.c.unanswered_since).where(actions.c.action_id == first.action_id))
    assert mark is None  # the mark went with the record


def test_a_message_checks_the_rules_again_under_its_orders_lock(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
) -> None:
    """A message checked the rules before its link was minted, without the order's lock; another message of the
    order recorded after that check was not seen, and both went out the same day."""
    h, first, second = _two_messages_claimed(make_harness)
    h.worker.record([(first, h.effects.perform(first, _order_row(h)))])
    outcome = h.effects._mark_message_sending(second)
    assert isinstance(outcome, Replan), outcome
    assert "one_nudge_per_day" in outcome.reason


def test_a_message_whose_send_timed_out_is_not_replaced_by_a_later_decision(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
) -> None:
    """A send that timed out may be with the provider: it is tried again under its own idempotency key, so the
    provider drops a repeat. A decision made meanwhile (the customer paid an earlier link and was declined)
    cancelled it as a message never sent and planned another: the customer got two messages that day, one of them
    on no record (review)."""
    h, provider = _harness(
        make_harness,
        {"action": "retarget", "channel": "sms"},  # N1, now
        {"action": "retarget", "channel": "sms"},  # N1's follow-up on Day 2: N2, now
        {"action": "retarget", "channel": "whatsapp"},  # after the declined link payment: a message now
        merchants={"m_demo": demo_merchant(retarget={"max_nudges": 4})},
        connector=FakeConnector(results=["failure"]),
    )
    h.executor.payment_failed("m_demo", event())
    h.drain()
    h.outbox.extend(provider.outbox)  # for token_of
    h.clock.now = START + timedelta(hours=46, minutes=30)
    provider.time_outs = 1
    h.drain()  # N2 times out: it is tried again after a back-off
    assert _planned(h, ActionKind.NUDGE) == ["nudge"]
    payment = h.executor.start_link_payment(token_of(h), 30, "api", "claim-link")
    h.worker.record([(payment.action, h.effects.perform(payment.action, _order_row(h)))])  # N1's link, declined
    h.clock.advance(minutes=2)
    h.drain()
    keys = [message.idempotency_key for message in provider.outbox]
    assert len(keys) == 3  # N1, N2 and N2 again
    assert len(set(keys)) == 2, keys  # no third message


def test_a_message_whose_re_send_a_charge_of_unknown_outcome_holds_back_stays_in_the_history_as_maybe_sent(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """The SMS's try timed out at its provider (it may be with the customer) and its re-send waited. Meanwhile a
    charge of the order was sent and never answered, so at its time the re-send was skipped (the customer may have
    paid) and cancelled with nothing on record: once an operator answered 'not charged', the order was decided again
    as if no message had gone, and another could go the same day. A message skipped after a try that may have
    reached its provider now stays in the history as maybe sent, as one cancelled or given up does."""
    h, provider = _harness(make_harness, {"action": "retarget", "channel": "sms"}, database_url=database_url)
    provider.time_outs = 1
    h.executor.payment_failed("m_demo", event())
    h.drain()
    tried_at = h.clock.now
    with h.executor.engine.begin() as conn:  # the lost charge below is payment ord_1_2
        conn.execute(sa.text("UPDATE orders SET attempt_count = attempt_count + 1"))
    lost = insert_lost_charge(h.executor.engine, "m_demo", "ord_1", h.clock.now)
    h.clock.advance(minutes=10)
    h.drain()  # the re-send is held back by the charge
    assert len(provider.outbox) == 1
    [sms] = h.view().nudges
    assert (sms.channel, sms.status, sms.sent_at) == ("sms", "rejected", tried_at)
    assert MAYBE_SENT_NOTE in (sms.error or "")
    h.executor.resolve_charge(lost, charged=False)  # decided again, knowing the SMS may be with the customer
    assert [n.channel for n in h.executor.decider.requests[-1].history.nudges] == [Channel.SMS]


def test_a_message_with_its_provider_counts_in_a_decision_made_meanwhile(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """Review: while N2 was with its provider, the customer paid N1's link and was declined, and the order was
    decided again as if N2 were not out (only N2's record, later, or the next message's own send could show it):
    decide() could plan another message that day, or before the skip-days cadence allowed. The decision made
    meanwhile counts N2 as maybe sent, dated by its hand-over; once N2 is on record it counts once."""
    provider = BusyProvider()
    h = make_harness(
        {"action": "retarget", "channel": "sms"},  # N1, now
        {"action": "retarget", "channel": "email"},  # N1's follow-up on Day 2: N2, now
        {"action": "retarget", "channel": "whatsapp"},  # after the declined link payment, while N2 is out
        merchants={"m_demo": demo_merchant(retarget={"max_nudges": 4})},
        connector=FakeConnector(results=["failure"]),
        database_url=database_url,
    )
    h.effects.adapter_factory = provider.adapters
    h.executor.payment_failed("m_demo", event())
    h.drain()
    n1_link = provider.outbox[0].variables["link_url"].rsplit("/pay/", 1)[1]
    h.clock.now = START + timedelta(hours=46, minutes=30)
    handed_over = h.clock.now
    paid: list[int] = []
    provider.during = lambda: paid.append(_pay(runtime(h), n1_link)[0])
    h.drain()
    assert paid == [402]  # declined while N2 was with its provider
    decided_meanwhile = h.executor.decider.requests[2]
    assert [(n.channel, n.sent_at) for n in decided_meanwhile.history.nudges] == [
        (Channel.SMS, START),
        (Channel.EMAIL, handed_over),
    ]
    assert [n.channel for n in h.executor.decider.requests[-1].history.nudges] == [Channel.SMS, Channel.EMAIL]
    assert [m.channel for m in provider.outbox] == [Channel.SMS, Channel.EMAIL]  # no WhatsApp the same day


@pytest.mark.parametrize("max_attempts", [8, 1], ids=["tried-again", "given-up"])
def test_recording_a_message_timeout_reads_and_locks_its_order_once(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str,
    max_attempts: int,
) -> None:
    """Recording a message's timeout locked its order, then locked it again to decide whether to re-decide, and,
    when the message was given up, a third time to record it as not sent: one lock of the order in the
    transaction is enough (nothing in between changes the order's row)."""
    h, _provider = _harness(
        make_harness, {"action": "retarget", "channel": "sms"}, database_url=database_url, max_attempts=max_attempts
    )
    h.executor.payment_failed("m_demo", event())
    [sms] = h.executor.claim(10, 30, "w1", "claim-1")
    assert sms.kind == "nudge"
    order_reads: list[str] = []

    def note_order_reads(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM orders" in statement:
            order_reads.append(statement)

    sa.event.listen(h.executor.engine, "before_cursor_execute", note_order_reads)
    try:
        with h.executor.engine.begin() as conn:
            h.executor.complete(conn, sms, Transient("timeout"))
    finally:
        sa.event.remove(h.executor.engine, "before_cursor_execute", note_order_reads)
    assert len(order_reads) == 1, order_reads
    [action] = [a for a in h.view().actions if a.kind == "nudge"]
    assert action.state == ("scheduled" if max_attempts > 1 else "dead")


def _paid_elsewhere(h: Harness) -> None:
    """The merchant reports the order paid (elsewhere, now): it is settled."""
    paid = {"order_id": "ord_1", "txn_id": "txn_ext", "occurred_at": h.clock.now.isoformat(), "idempotency_key": "s1"}
    assert h.executor.payment_succeeded("m_demo", paid).state == "SUCCEEDED"


def _settled_while_with_its_provider(build: Callable[..., Harness], database_url: str) -> tuple[Harness, ActionRow]:
    """An order whose one SMS a worker has handed to its provider (claimed and marked, no answer yet) when the
    order is paid elsewhere; the SMS's claimed action."""
    h, _provider = _harness(build, {"action": "retarget", "channel": "sms"}, database_url=database_url)
    h.executor.payment_failed("m_demo", event())
    [sms] = h.executor.claim(10, 30, "w2", "claim-w2")
    assert h.effects._mark_message_sending(sms) is None
    _paid_elsewhere(h)
    return h, sms


def test_a_message_whose_worker_died_with_its_provider_is_kept_as_maybe_sent_when_its_order_settles(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """The worker handed the SMS to its provider and was killed before any answer; the merchant then reported the
    order paid. Settling cancelled the message, and no claim ever takes a cancelled message over to note that its
    worker may have sent it: nothing said the customer may have it. Settling keeps it as maybe sent, dated by its
    hand-over, and the order's webhook goes once."""
    h, provider = _harness(make_harness, {"action": "retarget", "channel": "sms"}, database_url=database_url)
    h.executor.payment_failed("m_demo", event())
    [sms] = h.executor.claim(10, 30, "w2", "claim-w2")
    assert h.effects._mark_message_sending(sms) is None  # with the provider now; then the process is killed
    handed_over = h.clock.now
    h.clock.advance(minutes=5)
    _paid_elsewhere(h)
    h.clock.advance(minutes=5)  # past the dead worker's lease
    h.drain()
    [nudge] = h.view().nudges
    assert (nudge.channel, nudge.status, nudge.sent_at) == ("sms", "rejected", handed_over)
    assert MAYBE_SENT_NOTE in (nudge.error or "")
    assert "its order was settled while it was with its provider" in (nudge.error or "")
    assert provider.outbox == []  # nothing sent by the workers that are alive
    assert [json.loads(hook.content)["event"] for hook in h.receiver.received] == ["order.succeeded"]


@pytest.mark.parametrize("for_good", [True, False], ids=["refused-for-good", "certainly-not-taken"])
def test_a_message_its_provider_refuses_after_its_order_settled_keeps_the_providers_answer(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str,
    for_good: bool,
) -> None:
    """Settling keeps a message with its provider as maybe sent; the provider's answer that it refused the message
    for good replaces that note (the message is on record as not sent, as before), and an answer that it certainly
    did not take it (a 503) takes the note back: nothing went, nothing is on record, as before."""
    h, sms = _settled_while_with_its_provider(make_harness, database_url)
    refusal = (
        NotSent(nudge_id_for(sms.idempotency_key), "sms", PAYMENT_LINK_TEMPLATE, "invalid number")
        if for_good
        else Transient("sms provider answered HTTP 503", not_taken=True)
    )
    h.worker.record([(sms, refusal)])
    recorded = [(n.status, n.error) for n in h.view().nudges]
    assert recorded == ([("rejected", "invalid number")] if for_good else [])


def test_a_taken_over_claims_refusal_after_its_order_settled_leaves_the_newer_hand_over_on_record(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """Worker A handed the SMS to a slow provider and its lease ran out; worker B took the message over and handed
    it over again; then the order was paid, and settling kept the message as maybe sent (two tries may have reached
    the provider). A's answer came last: a 503 for A's own try. It was taken as the answer to the hand-over on the
    row, which was B's: the settling's note was deleted (A's copy of the message counted no earlier try) and B's
    mark cleared, so nothing said the customer may have B's message. A stale claim's answer is refused now; B's
    own answer is still recorded."""
    h, provider = _harness(make_harness, {"action": "retarget", "channel": "sms"}, database_url=database_url)
    h.executor.payment_failed("m_demo", event())
    [first] = h.executor.claim(10, 30, "wA", "claim-A")
    assert h.effects._mark_message_sending(first) is None  # with the provider; A hears nothing for a while
    handed_over = h.clock.now
    h.clock.advance(seconds=31)  # past A's lease
    [second] = h.executor.claim(10, 30, "wB", "claim-B")
    assert second.action_id == first.action_id
    assert h.effects._mark_message_sending(second) is None  # B hands it over again
    _paid_elsewhere(h)
    h.worker.record([(first, Transient("sms provider answered HTTP 503", not_taken=True))])  # A's, stale
    h.worker.record([(second, Transient("timeout"))])  # B's: its try may have reached the provider
    [nudge] = h.view().nudges
    assert (nudge.channel, nudge.status, nudge.sent_at) == ("sms", "rejected", handed_over)
    assert f"2 earlier tries {MAYBE_SENT_NOTE}" in (nudge.error or "")
    [action] = [a for a in h.view().actions if a.kind == "nudge"]
    assert (action.state, action.last_error) == ("cancelled", "timeout")  # B's answer, recorded
    assert provider.outbox == []


def _another_backend_waits_for_a_lock(engine: sa.Engine, patience: float = PATIENCE) -> None:
    """Return once another PostgreSQL backend of this test's database waits for a lock (fail after ``patience``)."""
    deadline = time.monotonic() + patience
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            waiting = conn.scalar(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'"
                )
            )
            if waiting:
                return
            conn.rollback()  # a fresh snapshot of pg_stat_activity
    raise AssertionError("no other backend waited for a lock")


@pytest.mark.postgres
def test_paying_a_link_while_its_message_is_recorded_as_sent_does_not_deadlock_on_postgresql(
    make_harness: Any,  # noqa: F811 - the fixture
    postgres_url: str,
) -> None:
    """The SMS's first try timed out and the customer opened its link (its row is made then: the provider never
    confirmed the message); a re-send is accepted, and as the worker records it the customer pays on the link.
    Paying locked the link's row and then waited for the order's lock; recording the send held the order's lock
    and then waited for the link's row (it keeps the link of a confirmed message): a deadlock, one of the two
    aborted ("deadlock detected"). A link's page and its payment now take the order's lock first, as every other
    path does: the payment waits for the record, then goes ahead."""
    h, provider = _harness(make_harness, {"action": "retarget", "channel": "sms"}, database_url=postgres_url)
    h.executor.payment_failed("m_demo", event())
    provider.time_outs = 1
    h.drain()  # the first try times out: the message is tried again after a back-off
    token = provider.outbox[0].variables["link_url"].rsplit("/pay/", 1)[1]
    assert h.executor.open_link(token).state == "PENDING"  # the customer opens the link of that try
    h.clock.advance(minutes=1)
    [sms] = h.executor.claim(10, 30, "w1", "claim-w1")
    sent = h.effects.perform(sms, _order_row(h))
    assert type(sent).__name__ == "Sent"
    engine = h.executor.engine
    errors: list[BaseException] = []
    started: list[str] = []

    def customer_pays() -> None:
        try:
            started.append(h.executor.start_link_payment(token, 30, "api", "claim-link").action.kind)
        except BaseException as exc:
            errors.append(exc)

    payer = threading.Thread(target=customer_pays)
    try:
        with engine.begin() as conn:  # the worker records the send: the order's lock first
            assert h.executor.lock_order(conn, "m_demo", "ord_1") is not None
            payer.start()
            _another_backend_waits_for_a_lock(engine)
            h.executor.complete(conn, sms, sent)
    except sa.exc.OperationalError as exc:
        errors.append(exc)
    payer.join(PATIENCE * 3)
    assert not payer.is_alive()
    assert errors == []
    assert started == ["link_payment"]
    [nudge] = h.view().nudges
    assert (nudge.status, nudge.clicked_at is not None) == ("accepted", True)


@pytest.mark.parametrize("replanned", ["retry", "retarget"])
def test_a_message_claimed_and_not_yet_handed_over_is_replaced_by_a_later_decision(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str,
    replanned: str,
) -> None:
    """N2 (email) was claimed by a worker and not yet handed to its provider when the customer paid N1's link and
    was declined; the order was decided again. A new decision replaced a planned message, and a claimed retry not
    yet sent, but left a claimed message to its worker, which then sent it beside the new plan: a payment link
    beside a silent retry for the same failure (a message goes only when no silent retry is made), or a message the
    new decision did not choose. It is replaced now: its worker finds its claim gone and sends nothing."""
    new_plan = (
        {"action": "retry", "strategy": "cascade", "connector": "adyen"}
        if replanned == "retry"
        else {"action": "retarget", "channel": "whatsapp", "delay": timedelta(hours=1)}
    )
    h, provider = _harness(
        make_harness,
        {"action": "retarget", "channel": "sms"},  # N1, now
        {"action": "retarget", "channel": "email", "delay": DAY_2 - (START + timedelta(hours=24))},  # N2, Day 2
        new_plan,  # after N1's link is paid and declined
        merchants={"m_demo": demo_merchant(retarget={"max_nudges": 4})},
        connector=FakeConnector(results=["failure", "failure"]),
        database_url=database_url,
    )
    h.executor.payment_failed("m_demo", event())
    h.drain()
    n1_link = provider.outbox[0].variables["link_url"].rsplit("/pay/", 1)[1]
    h.clock.now = START + timedelta(hours=24)
    h.drain()  # N1's follow-up plans N2 for Day 2
    h.clock.now = DAY_2
    [n2] = h.executor.claim(10, 30, "w1", "claim-w1")
    assert (n2.kind, n2.payload["channel"]) == ("nudge", "email")
    assert _pay(runtime(h), n1_link)[0] == 402  # declined: the order is decided again
    h.worker.record([(n2, h.effects.perform(n2, _order_row(h)))])  # N2's worker goes on
    assert [m.channel for m in provider.outbox] == [Channel.SMS]
    [replaced] = [a for a in h.view().actions if a.action_id == n2.action_id]
    assert (replaced.state, replaced.last_error) == ("cancelled", "replaced by a later decision")
    h.drain()
    if replanned == "retry":
        assert [a.strategy for a in h.view().attempts][-1] == "cascade"
        assert [m.channel for m in provider.outbox] == [Channel.SMS]
    else:
        h.clock.advance(hours=1)
        h.drain()
        assert [m.channel for m in provider.outbox] == [Channel.SMS, Channel.WHATSAPP]


def test_a_503_for_a_message_whose_order_settled_meanwhile_counts_once_toward_its_channels_outage(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """The refusal is noted on the channel's streak before the claim is found cancelled by the settling; the stale
    claim is then recorded as a settled message's answer in the same transaction, so the refusal stays (once), and a
    repeat of the answer changes nothing. (A claim taken over by another worker is refused as stale, the refusal
    with it: the holder's own send brings its own answer.)"""
    h, sms = _settled_while_with_its_provider(make_harness, database_url)
    refused_at = h.clock.now
    h.clock.advance(seconds=5)
    h.worker.record([(sms, Transient("sms provider answered HTTP 503", not_taken=True))])
    h.clock.advance(seconds=5)
    h.worker.record([(sms, Transient("sms provider answered HTTP 503", not_taken=True))])  # stale now: dropped
    with h.executor.engine.connect() as conn:
        streaks = conn.execute(sa.select(channel_outages)).mappings().all()
    assert [(row["channel"], as_utc(row["refused_since"]), as_utc(row["last_refused_at"])) for row in streaks] == [
        ("sms", refused_at + timedelta(seconds=5), refused_at + timedelta(seconds=5))
    ]


def test_a_message_whose_try_timed_out_is_not_replaced_before_its_answer_is_recorded(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """The SMS's provider times out (it may have taken the message), and the order is decided again before that
    answer is recorded. The worker cleared the message's 'being sent' mark as the answer came, before recording it:
    the re-decision saw no message out, replaced the SMS as one never handed over ("replaced by a later decision"),
    and the timeout's answer was then refused as stale: a message the customer may have got vanished from the
    history, and the new plan was made as if none had gone. The mark now stays until the timeout is recorded: the
    re-decision counts the SMS, which stays to be re-sent (its provider drops a repeat of the same key)."""
    h, provider = _harness(
        make_harness,
        {"action": "retarget", "channel": "sms"},
        {"action": "retarget", "channel": "email", "delay": timedelta(hours=1)},
        database_url=database_url,
    )
    h.executor.payment_failed("m_demo", event())
    [sms] = h.executor.claim(10, 30, "w1", "claim-w1")
    provider.time_outs = 1
    outcome = h.effects.perform(sms, _order_row(h))
    assert outcome == Transient("timeout")
    with h.executor.engine.begin() as conn:  # decided again (a link payment declined) as the answer is recorded
        order = h.executor.lock_order(conn, "m_demo", "ord_1")
        assert order is not None
        h.executor._decision_point(conn, order, h.clock(), "the customer's payment by link was declined")
    request = h.executor.decider.requests[-1]  # type: ignore[attr-defined]
    assert [nudge.channel for nudge in request.history.nudges] == [Channel.SMS]
    h.worker.record([(sms, outcome)])
    [action] = [a for a in h.view().actions if a.action_id == sms.action_id]
    assert (action.state, action.last_error, action.unanswered_since) == ("scheduled", "timeout", None)
    with h.executor.engine.connect() as conn:
        payload = conn.scalar(sa.select(actions.c.payload_json).where(actions.c.action_id == sms.action_id))
    assert json.loads(payload)["maybe_sent_tries"] == 1


def test_a_message_maybe_sent_whose_link_the_customer_opened_is_counted_as_sent(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """The SMS's try timed out at its provider, and the customer opened its link: it reached them. The customer
    then opts out of SMS, and the re-send is cancelled: the nudge is kept as sent (accepted, clicked). Before, the
    order's count of messages sent (``orders.nudge_count``, the console queue's "nudges") left it out, while the
    order's page counted it; now both say one."""
    h, provider = _harness(make_harness, {"action": "retarget", "channel": "sms"}, database_url=database_url)
    provider.time_outs = 1
    h.executor.payment_failed("m_demo", event())
    h.drain()
    token = provider.outbox[0].variables["link_url"].rsplit("/pay/", 1)[1]
    assert h.executor.open_link(token).state == "PENDING"
    with h.executor.engine.connect() as conn:
        customer_id = conn.scalar(sa.select(orders.c.customer_id))
    assert h.executor.opt_out("m_demo", str(customer_id), Channel.SMS) == 1
    [sms] = h.view().nudges
    assert (sms.status, sms.clicked_at is not None) == ("accepted", True)
    with h.executor.engine.connect() as conn:
        assert conn.scalar(sa.select(orders.c.nudge_count)) == 1
