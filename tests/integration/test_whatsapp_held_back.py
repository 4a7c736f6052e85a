"""What a WhatsApp message that failed means for the customer's reminders.

Before: a failed receipt after a delivered one marked the message undelivered (WhatsApp may report a message failed
after it was sent; one delivered is delivered); a message WhatsApp held back (Meta's per-user marketing limit 131049,
a rate limit) never reached the customer yet counted toward ``max_nudges`` as a delivered one; and a receipt saying
the merchant's sender number was rate limited (130429, Gupshup 4001) only logged a warning while sends went on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from model.catalog import load_catalog
from model.vocab import Channel
from service.console.views import QueueFilter, load_queue
from service.executor.metrics import SenderHoldsCollector
from service.executor.pacing import customer_paced_until, paced_until, release_turn
from service.executor.store import as_utc, customer_pacing, nudges, orders
from service.executor.worker import make_decider
from tests.integration.test_executor import (  # noqa: F401 - make_harness is a fixture
    START,
    Harness,
    demo_merchant,
    event,
    make_harness,
)

SECOND = timedelta(seconds=1)


@pytest.fixture
def rules_only() -> Iterator[Any]:
    decider, stop = make_decider(load_catalog(), None, seed=1)
    yield decider
    stop()


def delivery(h: Harness) -> list[tuple[bool, str | None]]:
    return [(nudge.delivered, nudge.error) for nudge in h.view().nudges]


def test_receipts_arriving_out_of_order_are_ordered_by_meaning_then_time(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """A delivered or read receipt wins over a failed one whichever comes first; of two failed ones, the later by
    the provider's time stamp stands, however late the earlier one arrives."""
    h = make_harness({"action": "retarget", "channel": "whatsapp"}, database_url=database_url)
    h.executor.payment_failed("m_demo", event())
    h.drain()
    receipt = h.executor.record_receipt
    assert receipt("pm_1", False, "m_demo", error="131000 late", occurred_at=START + 20 * SECOND)
    assert delivery(h) == [(False, "131000 late")]
    assert receipt("pm_1", False, "m_demo", error="131000 early", occurred_at=START + 10 * SECOND)
    assert delivery(h) == [(False, "131000 late")]  # the earlier failure, arriving late, changes nothing
    assert receipt("pm_1", True, "m_demo", occurred_at=START + 5 * SECOND)
    assert delivery(h) == [(True, None)]  # a failed before delivered is replaced by delivered
    assert receipt("pm_1", False, "m_demo", error="131026 failed after", occurred_at=START + 30 * SECOND)
    assert delivery(h) == [(True, None)]  # a delivered message stays delivered
    assert receipt("pm_1", True, "m_demo", status="read", occurred_at=START + 40 * SECOND)
    assert receipt("pm_1", True, "m_demo", status="delivered", occurred_at=START + 50 * SECOND)
    assert receipt("pm_1", False, "m_demo", error="131000", occurred_at=START + 60 * SECOND)
    assert delivery(h) == [(True, None)]
    with h.executor.engine.connect() as conn:
        (status,) = conn.execute(nudges.select().with_only_columns(nudges.c.receipt_status)).one()
    assert status == "read"  # a delivered receipt after the read one does not take it back


def whatsapp_only(max_nudges: int = 2, **retarget: Any) -> Any:
    return demo_merchant(
        retry={"max_retries": 0}, retarget={"channels": ["whatsapp"], "max_nudges": max_nudges} | retarget
    )


def sends(h: Harness) -> list[tuple[Channel, timedelta]]:
    return [(nudge.channel, as_utc(nudge.sent_at) - START) for nudge in h.view().nudges]


def run_for(h: Harness, hours: int) -> None:
    for _ in range(hours):
        h.drain()
        h.clock.advance(hours=1)


@pytest.mark.parametrize(("code", "failure"), [("131049", "try_later"), ("130472", "try_later")])
def test_a_message_whatsapp_held_back_as_try_later_does_not_count_and_goes_again_the_next_day(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    rules_only: Any,
    code: str,
    failure: Any,
) -> None:
    """``max_nudges: 2`` on WhatsApp alone: the first message is held back by Meta (its per-user marketing limit).
    Before, it counted: the customer got one message in all. Now it does not: the order is decided again at once,
    WhatsApp is not used again for 24 hours (Meta asks for that much), and the customer still gets two messages,
    each on a day of the skip-days cadence and outside the quiet hours."""
    h = make_harness(decider=rules_only, merchants={"m_demo": whatsapp_only()})
    h.executor.payment_failed("m_demo", event())
    h.drain()
    assert len(h.outbox) == 1
    h.clock.advance(seconds=30)
    assert h.executor.record_receipt("pm_1", False, "m_demo", error=f"{code} held", failure=failure)
    last = h.view().decisions[-1]
    assert (last["action"], last["channel"]) == ("retarget", "whatsapp")
    assert "nudges_left:2" in last["rules_applied"]  # the held-back message is not one of the two
    assert "channel_held:whatsapp" in last["rules_applied"]
    assert datetime.fromisoformat(last["execute_at"]) >= START + timedelta(hours=24)
    run_for(h, 8 * 24)
    delivered = [n for n in h.view().nudges if n.delivered]
    assert len(delivered) == 2
    assert all(as_utc(n.sent_at) >= START + timedelta(hours=24) for n in delivered)  # not again the same day
    assert h.view().state == "FAILED"  # the window closed with no payment: two reminders, as the merchant set


def test_a_rate_limited_message_does_not_count_and_goes_again_the_same_day(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    rules_only: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A message refused by the pair rate limit (131056) never reached the customer: it does not count, and the
    order is decided again at once; WhatsApp stays open to it the same day, once the customer's short hold ends."""
    h = make_harness(decider=rules_only, merchants={"m_demo": whatsapp_only(max_nudges=1)})
    h.executor.payment_failed("m_demo", event())
    h.drain()
    h.clock.advance(minutes=1)
    caplog.set_level(logging.WARNING, logger="winback.executor")
    h.executor.record_receipt("pm_1", False, "m_demo", error="131056 pair", failure="pair_rate_limited")
    h.drain()
    assert len(h.outbox) == 1  # the customer is held back for 6 seconds first (Meta's pair rate)
    # The hold's end as operators read times (UTC to the second, Z), as the message's reason says it: not isoformat().
    assert "a customer of merchant m_demo is paced on whatsapp until 2026-11-02T06:01:06Z:" in caplog.text
    h.clock.advance(seconds=6)
    h.drain()
    assert [(n.delivered, (n.error or "")[:18]) for n in h.view().nudges] == [
        (False, "pair_rate_limited:"),
        (True, ""),
    ]
    assert sends(h)[1][1] < timedelta(hours=1)
    assert h.view().state == "PENDING"  # its one reminder reached the customer: it waits for a payment


def test_the_same_held_back_receipt_twice_decides_the_order_once(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    rules_only: Any,
) -> None:
    """Providers re-send callbacks: a second copy of the same receipt changes nothing."""
    h = make_harness(decider=rules_only, merchants={"m_demo": whatsapp_only()})
    h.executor.payment_failed("m_demo", event())
    h.drain()
    for _ in range(2):
        h.executor.record_receipt("pm_1", False, "m_demo", error="131049 held", failure="try_later")
    assert len(h.view().decisions) == 2


def messages_sent(h: Harness) -> tuple[int, int]:
    """The order's count of messages sent (``orders.nudge_count``), and the console queue's "nudges" for it."""
    with h.executor.engine.connect() as conn:
        count = conn.scalar(sa.select(orders.c.nudge_count).where(orders.c.order_id == "ord_1"))
    (row,) = load_queue(h.executor.engine, load_catalog(), "m_demo", QueueFilter(), h.clock.now).rows
    return int(count or 0), row.nudges


def test_a_message_whatsapp_held_back_is_not_counted_as_sent_until_a_receipt_says_it_was_delivered(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """Before, ``orders.nudge_count`` counted every message its provider took: one WhatsApp then held back (a
    try-later, a rate limit) never reached the customer, yet the console's queue showed it among the order's
    nudges. Now it is taken off the count, once however many held-back receipts come, and put back if a later
    receipt says the message was delivered after all."""
    h = make_harness({"action": "retarget", "channel": "whatsapp"}, database_url=database_url)
    h.executor.payment_failed("m_demo", event())
    h.drain()
    assert messages_sent(h) == (1, 1)
    held = START + 10 * SECOND
    assert h.executor.record_receipt(
        "pm_1", False, "m_demo", error="131049 held", failure="try_later", occurred_at=held
    )
    assert messages_sent(h) == (0, 0)
    later = held + SECOND
    h.executor.record_receipt(
        "pm_1", False, "m_demo", error="131056 pair", failure="pair_rate_limited", occurred_at=later
    )
    assert messages_sent(h) == (0, 0)  # held back still: not taken off twice
    assert h.executor.record_receipt("pm_1", True, "m_demo", occurred_at=later + SECOND)
    assert messages_sent(h) == (1, 1)


def two_merchants() -> dict[str, Any]:
    return {"m_demo": demo_merchant(), "m_other": demo_merchant(api_key_sha256="1" * 64)}


def test_a_rate_limited_receipt_holds_back_the_merchants_sender_only_and_loses_nothing_across_a_restart(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: Meta's 130429 (the merchant's number over its throughput) only logged a warning, and the number
    went on sending at full speed. Now the merchant's WhatsApp is held back for a minute: its messages wait (none
    is dropped, none counted), another merchant's go at once, and the hold is in the database, so an executor
    started afresh on it keeps it and sends the held messages when it ends."""
    now = {"action": "retarget", "channel": "whatsapp"}
    h = make_harness(now, now, now, now, merchants=two_merchants(), database_url=database_url)
    h.executor.payment_failed("m_demo", event("ord_1"))
    h.drain()
    h.clock.advance(seconds=5)
    caplog.set_level(logging.WARNING, logger="winback.executor")
    h.executor.record_receipt("pm_1", False, "m_demo", error="130429 throughput", failure="rate_limited")
    # Logged with the hold's end as operators read times (UTC to the second, Z), not isoformat()'s ``+00:00``.
    assert "channel whatsapp of merchant m_demo is paced until 2026-11-02T06:01:05Z: its provider said" in caplog.text
    # Another customer: ord_1's, messaged again at the hold's end, may get one message every 6 s (the pair rate).
    h.executor.payment_failed("m_demo", event("ord_2", customer={"phone": "+919800000002"}))
    h.executor.payment_failed("m_other", event("ord_3"))
    h.drain()
    assert [(m.merchant_id, m.order_id) for m in h.outbox] == [("m_demo", "ord_1"), ("m_other", "ord_3")]
    held = [a for a in h.view("ord_2").actions if a.kind == "nudge"]
    # Its turn in UTC to the second with a Z, as the lists write times (it was isoformat()'s ``+00:00``).
    assert [(a.state, a.last_error) for a in held] == [
        ("scheduled", "whatsapp is paced until 2026-11-02T06:01:06Z (its turn): its sender was rate limited")
    ]

    restarted = make_harness(merchants=two_merchants(), database_url=database_url)
    restarted.clock.now = h.clock.now + timedelta(seconds=30)
    restarted.drain()
    assert restarted.outbox == []  # still held after the restart
    restarted.clock.advance(seconds=31)
    restarted.drain()
    assert sorted(m.order_id for m in restarted.outbox) == ["ord_1", "ord_2"]  # the re-send and the held one
    assert [n.delivered for n in restarted.view("ord_2").nudges] == [True]


def test_the_hold_grows_on_repeats_is_bounded_and_starts_over_after_a_quiet_spell(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """A receipt of the same burst (the hold still on) does not lengthen it; one after it ended doubles it, up to
    the bound; one after a quiet spell starts over."""
    h = make_harness(database_url=database_url)
    policy = h.executor.retry_policy
    held = []
    moment = START
    with h.executor.engine.begin() as conn:
        for wait in [0, 10, 61, 121, 241, 481, 901, 901, 2000]:
            moment += timedelta(seconds=wait)
            held.append((policy.note_rate_limited(conn, "m_demo", Channel.WHATSAPP, moment) - moment).total_seconds())
        assert paced_until(conn, "m_other", Channel.WHATSAPP, moment) is None
        assert paced_until(conn, "m_demo", Channel.SMS, moment) is None
    assert held == [60, 50, 120, 240, 480, 900, 900, 900, 60]


def test_a_channel_that_keeps_holding_messages_back_is_taken_off_the_order(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    rules_only: Any,
) -> None:
    """A held-back message does not count, so a customer WhatsApp holds back every time (a Meta experiment, 130472)
    was messaged there every day of the window, uncounted: seven messages to a merchant set at two. After two held
    back, WhatsApp is off the order (no opt-out: the customer's next order may use it); with no other channel the
    order ends."""
    h = make_harness(decider=rules_only, merchants={"m_demo": whatsapp_only()})
    h.executor.payment_failed("m_demo", event())
    answered: set[str] = set()
    for _ in range(8 * 24):
        h.drain()
        for number in range(1, len(h.outbox) + 1):
            if f"pm_{number}" not in answered:
                answered.add(f"pm_{number}")
                h.executor.record_receipt(f"pm_{number}", False, "m_demo", error="130472 x", failure="try_later")
        h.clock.advance(hours=1)
    assert len(h.outbox) == 2
    assert h.view().state == "FAILED"


def held_back_twice(h: Harness, error: str, failure: Any) -> None:
    """The order's first message, and the one sent again when the sender's hold ends, both held back so."""
    h.executor.payment_failed("m_demo", event())
    h.drain()
    for number in (1, 2):
        h.clock.advance(seconds=5)
        h.executor.record_receipt(f"pm_{number}", False, "m_demo", error=error, failure=failure)
        h.clock.advance(minutes=5)
        h.drain()


def test_the_merchants_sender_throttled_twice_does_not_take_whatsapp_off_an_order(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    rules_only: Any,
    database_url: str,
) -> None:
    """Before: two of the order's messages refused because the merchant's number was over its throughput (Meta's
    130429: the sender as a whole, not this customer) took WhatsApp off the order like two try-laters, and a
    WhatsApp-only merchant's order was left with no reminder at all (the decider stopped) after a couple of
    minutes of throttling. Now the sender's limit only paces the merchant's messages: the order still gets its two
    reminders once the number is no longer throttled."""
    h = make_harness(decider=rules_only, merchants={"m_demo": whatsapp_only()}, database_url=database_url)
    held_back_twice(h, "130429 throughput", "rate_limited")
    assert len(h.outbox) == 3
    assert h.view().decisions[-1]["action"] == "retarget"
    run_for(h, 8 * 24)
    assert len([n for n in h.view().nudges if n.delivered]) == 2
    assert len(h.outbox) == 4  # two throttled, two that reached the customer


def test_a_customer_twice_held_back_by_the_pair_rate_limit_is_not_messaged_there_again(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    rules_only: Any,
    database_url: str,
) -> None:
    """The pair rate limit (131056) is about this customer: two of them on WhatsApp take it off the order, as two
    try-laters do."""
    h = make_harness(decider=rules_only, merchants={"m_demo": whatsapp_only()}, database_url=database_url)
    held_back_twice(h, "131056 pair", "pair_rate_limited")
    assert len(h.outbox) == 2
    assert h.view().decisions[-1]["action"] == "stop"


def test_a_pair_rate_limit_holds_back_that_customer_only_and_not_the_merchants_sender(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """Before: Meta's 131056 (too many messages from the business number to one customer's number) held the
    merchant's whole WhatsApp sender a minute, every customer alike. Meta's limit is about the pair, and it says other
    numbers can be messaged without waiting: now only that customer's messages on WhatsApp wait (6 s, the pair rate),
    then go one every 6 s, and the merchant's other customers are messaged at once."""
    now = {"action": "retarget", "channel": "whatsapp"}
    h = make_harness(now, now, now, now, database_url=database_url)
    h.executor.payment_failed("m_demo", event("ord_1"))
    h.drain()
    h.clock.advance(seconds=5)
    h.executor.record_receipt("pm_1", False, "m_demo", error="131056 pair", failure="pair_rate_limited")
    h.executor.payment_failed("m_demo", event("ord_2", customer={"phone": "+919800000002"}))
    h.executor.payment_failed("m_demo", event("ord_3"))  # the same customer as ord_1, another order
    h.drain()
    assert [m.order_id for m in h.outbox] == ["ord_1", "ord_2"]  # the other customer is not slowed
    held = [a for a in h.view("ord_3").actions if a.kind == "nudge"]
    assert [(a.state, "to this customer is paced" in (a.last_error or "")) for a in held] == [("scheduled", True)]
    with h.executor.engine.connect() as conn:
        assert paced_until(conn, "m_demo", Channel.WHATSAPP, h.clock.now) is None
    h.clock.advance(seconds=6)
    h.drain()
    assert len(h.outbox) == 3  # one of the customer's two at the hold's end...
    h.clock.advance(seconds=6)
    h.drain()
    assert sorted(m.order_id for m in h.outbox[2:]) == ["ord_1", "ord_3"]  # ...the other 6 s on (Meta's pair rate)
    assert [n.delivered for n in h.view("ord_3").nudges] == [True]


def test_a_customers_pair_hold_follows_metas_back_off_and_is_forgotten_after_a_quiet_spell(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """Meta's recommended back-off after a pair rate limit: 4^X seconds, X from 0 up by one after each, here never
    less than the pair rate's 6 s and at most the longest hold (15 minutes). A receipt of the same burst (the hold
    still on) does not lengthen it; after a quiet spell the customer is forgotten, and starts over."""
    h = make_harness(database_url=database_url)
    policy = h.executor.retry_policy
    customer, other = "a" * 64, "b" * 64
    held = []
    moment = START
    with h.executor.engine.begin() as conn:
        policy.note_pair_rate_limited(conn, "m_demo", Channel.WHATSAPP, other, moment)
        for wait in [0, 3, 7, 7, 17, 65, 257, 2000]:
            moment += timedelta(seconds=wait)
            until = policy.note_pair_rate_limited(conn, "m_demo", Channel.WHATSAPP, customer, moment)
            held.append((until - moment).total_seconds())
        assert customer_paced_until(conn, "m_demo", Channel.WHATSAPP, customer, moment) == until
        assert customer_paced_until(conn, "m_demo", Channel.WHATSAPP, other, moment) is None
        assert customer_paced_until(conn, "m_other", Channel.WHATSAPP, customer, moment) is None
        assert paced_until(conn, "m_demo", Channel.WHATSAPP, moment) is None
    assert held == [6, 3, 6, 16, 64, 256, 900, 6]
    assert h.count(customer_pacing) == 1  # the other customer's hold, long over, is gone


def throttle_the_sender(h: Harness) -> None:
    """ord_0's message goes, and 5 s later Meta says the merchant's number was over its throughput (130429): the
    sender is held for a minute."""
    h.executor.payment_failed("m_demo", event("ord_0"))
    h.drain()
    h.clock.advance(seconds=5)
    h.executor.record_receipt("pm_1", False, "m_demo", error="130429 throughput", failure="rate_limited")


def sent_at(h: Harness, *orders: str) -> dict[str, list[timedelta]]:
    return {order: [as_utc(n.sent_at) - START for n in h.view(order).nudges if n.delivered] for order in orders}


def test_messages_a_senders_hold_kept_back_go_one_at_a_time_across_a_restart_none_lost_or_sent_twice(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """Before: when the sender's hold ended, every message it had held went at once, the very burst that had hit
    Meta's throughput limit. Now each gets a turn of its own, a second apart from the hold's end on, kept in the
    database: an executor started afresh mid-release sends the rest at their turns, each once, and a message planned
    during the release waits behind them."""
    now = {"action": "retarget", "channel": "whatsapp"}
    h = make_harness(*(dict(now) for _ in range(6)), database_url=database_url)
    throttle_the_sender(h)
    for number in range(1, 5):
        h.executor.payment_failed("m_demo", event(f"ord_{number}", customer={"phone": f"+91980000000{number + 1}"}))
    h.drain()
    assert len(h.outbox) == 1  # all five held (the re-send of ord_0 and four new ones)
    h.clock.now = START + timedelta(seconds=65)  # the hold's end
    h.drain()
    assert len(h.outbox) == 2  # one, not five

    restarted = make_harness(now, database_url=database_url)
    restarted.clock.now = h.clock.now + timedelta(seconds=1)
    restarted.drain()
    assert len(restarted.outbox) == 1
    restarted.clock.advance(seconds=0.5)
    restarted.executor.payment_failed("m_demo", event("ord_5", customer={"phone": "+919800000009"}))
    for _ in range(10):
        restarted.drain()
        restarted.clock.advance(seconds=0.5)
    orders = [f"ord_{number}" for number in range(6)]
    times = sorted(at for sends in sent_at(restarted, *orders).values() for at in sends)
    assert times == [timedelta(seconds=second) for second in range(65, 71)]  # one a second, ord_5 last
    assert all(len(sends) == 1 for sends in sent_at(restarted, *orders).values())
    assert len(h.outbox) + len(restarted.outbox) == 7  # the throttled one and six that went, none twice


def test_a_released_messages_turn_in_the_quiet_hours_waits_for_their_end(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """The send's checks are made again at the turn: with turns six hours apart, the third falls at 23:31 in
    Kolkata, in the merchant's quiet hours (21:00-09:00), and the message goes when they end, not then."""
    now = {"action": "retarget", "channel": "whatsapp"}
    h = make_harness(*(dict(now) for _ in range(4)), database_url=database_url)
    h.executor.retry_policy.rate_limit_release_spacing_seconds = 6 * 3600.0
    throttle_the_sender(h)
    for number in (1, 2):
        h.executor.payment_failed("m_demo", event(f"ord_{number}", customer={"phone": f"+91980000000{number + 1}"}))
    h.drain()
    h.clock.now = START + timedelta(seconds=65)  # the hold's end: the first turn
    for _ in range(30):
        h.drain()
        h.clock.advance(hours=1)
    sends = sorted(at for order_sends in sent_at(h, "ord_0", "ord_1", "ord_2").values() for at in order_sends)
    quiet_end = timedelta(hours=21, minutes=30)  # 09:00 in Kolkata the next day
    assert sends[:2] == [timedelta(seconds=65), timedelta(hours=6, seconds=65)]  # at its turn, 6 h on
    assert quiet_end <= sends[2] < quiet_end + timedelta(hours=1)  # its turn at 23:31 waited for 09:00


def test_workers_reserving_turns_at_once_never_get_the_same_one(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """Two workers giving held messages their turns at the same time (each in its own transaction, as
    ``_mark_message_sending`` does) never give out one turn twice: each is a spacing after the one before."""
    h = make_harness(database_url=database_url)
    with h.executor.engine.begin() as conn:
        end = h.executor.retry_policy.note_rate_limited(conn, "m_demo", Channel.WHATSAPP, START)

    def reserve(_: int) -> list[datetime]:
        turns = []
        for _ in range(15):
            with h.executor.engine.begin() as conn:
                turn = release_turn(conn, "m_demo", Channel.WHATSAPP, START + SECOND, None, SECOND)
            assert turn is not None
            turns.append(turn)
        return turns

    with ThreadPoolExecutor(2) as pool:
        turns = sorted(turn for reserved in pool.map(reserve, range(2)) for turn in reserved)
    assert turns == [end + number * SECOND for number in range(30)]


def holds_scraped(h: Harness, limit: str, channel: str = "whatsapp") -> tuple[float | None, float | None]:
    """What a scrape of ``/metrics`` reads from the database at the harness's time: the count of holds of m_demo's
    sender on ``channel`` for ``limit``, and whether it is held for it now (None: no such series)."""
    registry = CollectorRegistry()
    registry.register(SenderHoldsCollector(h.executor.engine, read_every_seconds=0, now=lambda: h.clock.now))
    labels = {"merchant_id": "m_demo", "channel": channel, "limit": limit}
    return (
        registry.get_sample_value("winback_executor_sender_holds_total", labels),
        registry.get_sample_value("winback_executor_senders_held", labels),
    )


def test_rate_limited_and_pair_rate_limited_receipts_are_counted_on_metrics_once_per_hold(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """Meta's 130429 holds the merchant's WhatsApp: one hold, counted as ``rate`` (a second receipt of the same
    burst is not another), the sender shown held until the hold ends. Meta's 131056 holds one customer: counted as
    ``pair``, with no held-sender series (the sender is not held; no customer's number is a label). Before,
    /metrics had nothing of either."""
    now = {"action": "retarget", "channel": "whatsapp"}
    h = make_harness(now, now, now, now, database_url=database_url)
    h.executor.payment_failed("m_demo", event("ord_1"))
    h.drain()
    h.executor.record_receipt("pm_1", False, "m_demo", error="130429 throughput", failure="rate_limited")
    assert holds_scraped(h, "rate") == (1.0, 1.0)
    h.clock.advance(seconds=5)
    h.executor.record_receipt("pm_1", False, "m_demo", error="130429 again", failure="rate_limited")
    assert holds_scraped(h, "rate") == (1.0, 1.0)  # the same burst: the same hold
    h.clock.advance(seconds=60)
    assert holds_scraped(h, "rate") == (1.0, 0.0)
    assert holds_scraped(h, "pair") == (None, None)
    h.executor.payment_failed("m_demo", event("ord_2", customer={"phone": "+919800000002"}))
    for _ in range(10):  # the held messages go one at a time after the hold
        h.drain()
        h.clock.advance(seconds=1)
    [nudge] = h.view("ord_2").nudges
    h.executor.record_receipt(
        str(nudge.provider_message_id), False, "m_demo", error="131056 pair", failure="pair_rate_limited"
    )
    assert holds_scraped(h, "pair") == (1.0, None)
    assert holds_scraped(h, "rate") == (1.0, 0.0)
    with h.executor.engine.connect() as conn:
        held = [as_utc(until) for until in conn.scalars(sa.select(customer_pacing.c.held_until))]
    assert sum(until > h.clock.now for until in held) == 1  # one customer held, really
