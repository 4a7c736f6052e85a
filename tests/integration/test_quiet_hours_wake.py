"""The messages kept for the end of the quiet hours, all due at that one instant, go one at a time.

Before: a message due in the merchant's quiet hours (21:00-09:00 in Kolkata) was deferred to their end, so every
message of a merchant whose customers share its time zone went at 09:00:00, one burst on its sender, into the
provider's throughput limit (Meta's 130429, Gupshup's 4001); the sender's pacing only began after a rate-limited
receipt said so. Now those messages take turns of the sender's release (service/executor/pacing.py), a tenth of a
second apart, per merchant and channel, kept on the message across a restart.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from model.vocab import Channel
from service.executor.pacing import release_turn
from service.executor.store import as_utc
from tests.integration.test_executor import (  # noqa: F401 - make_harness is a fixture
    Harness,
    demo_merchant,
    event,
    make_harness,
)
from tests.integration.test_whatsapp_held_back import throttle_the_sender

NIGHT = datetime(2026, 11, 1, 17, 0, tzinfo=UTC)  # 22:30 in Kolkata: quiet until 09:00
WAKE = datetime(2026, 11, 2, 3, 30, tzinfo=UTC)  # 09:00 in Kolkata
TURN = timedelta(seconds=0.1)  # RetryPolicy.quiet_hours_release_spacing_seconds
NOW = {"action": "retarget", "channel": "whatsapp"}


def two_merchants() -> dict[str, Any]:
    return {"m_demo": demo_merchant(), "m_other": demo_merchant(api_key_sha256="1" * 64)}


def fail_at_night(h: Harness, merchant_id: str, *orders: str) -> None:
    for order in orders:
        phone = f"+9198{zlib.crc32(f'{merchant_id}/{order}'.encode()) % 10**8:08d}"  # a customer of its own
        h.executor.payment_failed(merchant_id, event(order, customer={"phone": phone}))


def sent(h: Harness, merchant_id: str, *orders: str) -> dict[str, list[datetime]]:
    """Each order's delivered messages' send times."""
    return {order: [as_utc(n.sent_at) for n in h.view(order, merchant_id).nudges if n.delivered] for order in orders}


def test_the_messages_kept_for_the_end_of_the_quiet_hours_go_one_at_a_time_across_a_restart(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """Four customers of one merchant fail at 22:30: their messages wait for 09:00. Before, all four went at
    09:00:00. Now the first goes then and the others a tenth of a second apart, each once, an executor started
    afresh mid-way sending the rest at their turns; another merchant's message goes at 09:00:00 all the same."""
    h = make_harness(*(dict(NOW) for _ in range(5)), merchants=two_merchants(), database_url=database_url)
    h.clock.now = NIGHT
    demo = [f"ord_{number}" for number in range(1, 5)]
    fail_at_night(h, "m_demo", *demo)
    fail_at_night(h, "m_other", "ord_9")
    h.drain()
    assert h.outbox == []  # the quiet hours
    h.clock.now = WAKE
    h.drain()
    # One of the merchant's four, not all four; the other merchant's is not held back by them.
    assert sorted(message.merchant_id for message in h.outbox) == ["m_demo", "m_other"]

    restarted = make_harness(merchants=two_merchants(), database_url=database_url)
    restarted.clock.now = WAKE
    for _ in range(6):
        restarted.clock.advance(seconds=TURN.total_seconds())
        restarted.drain()
    times = sent(restarted, "m_demo", *demo)
    assert all(len(at) == 1 for at in times.values())  # none lost, none sent twice
    assert sorted(at for sends in times.values() for at in sends) == [WAKE + number * TURN for number in range(4)]
    assert sent(restarted, "m_other", "ord_9") == {"ord_9": [WAKE]}
    assert len(h.outbox) + len(restarted.outbox) == 5


def test_a_turn_past_the_orders_window_does_not_send(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """The send's checks are made again at each turn: with turns two hours apart, the third falls at 13:00 in
    Kolkata on the seventh day, after the order's window closed (11:30, seven days after the failure): that
    message is not sent, and the order fails; the first two go at 09:00 and 11:00."""
    h = make_harness(*(dict(NOW) for _ in range(3)), database_url=database_url)
    h.executor.retry_policy.quiet_hours_release_spacing_seconds = 2 * 3600.0
    h.clock.now = NIGHT + timedelta(days=7)
    fail_at_night(h, "m_demo", "ord_1", "ord_2", "ord_3")
    h.drain()
    h.clock.now = WAKE + timedelta(days=7)
    for _ in range(6):
        h.drain()
        h.clock.advance(hours=1)
    times = sent(h, "m_demo", "ord_1", "ord_2", "ord_3")
    wake = WAKE + timedelta(days=7)
    assert sorted(at for sends in times.values() for at in sends) == [wake, wake + timedelta(hours=2)]
    assert len(h.outbox) == 2
    late = next(order for order, sends in times.items() if not sends)
    assert h.view(late).state == "FAILED"  # the window closed at its turn's wait, and its message was dropped
    assert [a.state for a in h.view(late).actions if a.kind == "nudge"] == ["cancelled"]


@contextmanager
def pacing_statements(h: Harness, table: str = "channel_pacing") -> Iterator[list[str]]:
    """The SQL statements about the senders' pacing (or ``table``'s) the executor makes while the block runs."""
    seen: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if table in statement:
            seen.append(" ".join(statement.split()))

    sa.event.listen(h.executor.engine, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        sa.event.remove(h.executor.engine, "before_cursor_execute", note)


def test_a_message_outside_a_wake_up_makes_only_the_one_unlocked_read_of_its_senders_pacing(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """Normal traffic pays nothing new: a message sent at 11:30 in Kolkata reads its sender's pacing once, without
    a lock, as before; only a message sent just after the quiet hours takes the row's lock for its turn."""
    h = make_harness(dict(NOW), dict(NOW), database_url=database_url)
    with pacing_statements(h) as midday:
        h.executor.payment_failed("m_demo", event("ord_1"))
        h.drain()
    assert len(h.outbox) == 1
    assert [statement.split()[0] for statement in midday] == ["SELECT"]
    assert "FOR UPDATE" not in midday[0]

    h.clock.now = NIGHT + timedelta(days=1)
    fail_at_night(h, "m_demo", "ord_2")
    h.drain()
    h.clock.now = WAKE + timedelta(days=1)
    with pacing_statements(h) as waking:
        h.drain()
    assert len(h.outbox) == 2
    assert any(statement.startswith("INSERT") for statement in waking)  # its turn, under the row's lock


def test_workers_waking_at_once_never_both_go_first_nor_share_a_turn(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """Two workers giving the messages waking at 09:00 their turns at the same time, on a sender that never had a
    pacing row: one message goes at once, and every other gets its own turn, a tenth of a second after the one
    before."""
    h = make_harness(database_url=database_url)

    def wake(_: int) -> list[datetime | None]:
        turns = []
        for _ in range(15):
            with h.executor.engine.begin() as conn:
                turns.append(release_turn(conn, "m_demo", Channel.WHATSAPP, WAKE, None, timedelta(seconds=1), TURN))
        return turns

    with ThreadPoolExecutor(2) as pool:
        turns = [turn for taken in pool.map(wake, range(2)) for turn in taken]
    assert turns.count(None) == 1  # the one that goes now
    assert sorted(turn for turn in turns if turn is not None) == [WAKE + number * TURN for number in range(1, 30)]


def test_messages_whose_release_turns_fell_in_the_quiet_hours_wake_in_turns_too(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """A sender's release four hours apart (after Meta's 130429) runs into the quiet hours: two turns, 23:31 and
    03:31 in Kolkata, wait for 09:00. Before, each kept its spent turn and both went at 09:00:00; now they take
    turns of the wake-up like every other message kept for it."""
    h = make_harness(*(dict(NOW) for _ in range(6)), database_url=database_url)
    h.executor.retry_policy.rate_limit_release_spacing_seconds = 4 * 3600.0
    throttle_the_sender(h)
    orders = ["ord_0", *(f"ord_{number}" for number in range(1, 5))]
    fail_at_night(h, "m_demo", *orders[1:])
    h.drain()
    hold_end = h.clock.now + timedelta(seconds=60)
    h.clock.now = hold_end
    for _ in range(22):
        h.drain()
        h.clock.advance(hours=1)
    wake = WAKE + timedelta(days=1)
    h.clock.now = wake
    h.drain()
    h.clock.advance(seconds=TURN.total_seconds())
    h.drain()
    times = sent(h, "m_demo", *orders)
    assert all(len(at) == 1 for at in times.values())
    released = [hold_end + timedelta(hours=4 * number) for number in range(3)]
    assert sorted(at for sends in times.values() for at in sends) == [*released, wake, wake + TURN]


def test_a_worker_far_behind_at_the_end_of_the_quiet_hours_still_sends_their_messages_one_at_a_time(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """The worker first runs at 09:11 in Kolkata, 11 minutes behind the four messages due at 09:00. Before, a
    message was taken for one waking with the quiet hours' end only when sent within 10 minutes of it: the four went
    at once. Now one that was due then wakes too: the first goes at 09:11, the others a tenth of a second apart."""
    h = make_harness(*(dict(NOW) for _ in range(4)), database_url=database_url)
    h.clock.now = NIGHT
    demo = [f"ord_{number}" for number in range(1, 5)]
    fail_at_night(h, "m_demo", *demo)
    h.drain()
    assert h.outbox == []  # the quiet hours
    late = WAKE + timedelta(minutes=11)
    h.clock.now = late
    h.drain()
    assert len(h.outbox) == 1
    for _ in range(4):
        h.clock.advance(seconds=TURN.total_seconds())
        h.drain()
    times = sent(h, "m_demo", *demo)
    assert all(len(at) == 1 for at in times.values())
    assert sorted(at for sends in times.values() for at in sends) == [late + number * TURN for number in range(4)]


EMAIL = {"action": "retarget", "channel": "email"}


def fail_at_night_by_email(h: Harness, *orders: str) -> None:
    for order in orders:
        h.executor.payment_failed("m_demo", event(order, customer={"phone": None, "email": f"{order}@example.com"}))


def test_e_mails_waking_at_09_00_go_at_the_relays_rate_not_whatsapps(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """Three e-mails and two WhatsApp messages wait for 09:00. Before, the e-mails took WhatsApp's turns, a tenth
    of a second apart, set from Meta's throughput: an SMTP relay has its own rate (Amazon SES: 1 a second in its
    sandbox, a message over it refused with 454). Now e-mails go a second apart by default, and WhatsApp as before,
    each channel in its own turns."""
    h = make_harness(EMAIL, EMAIL, EMAIL, dict(NOW), dict(NOW), database_url=database_url)
    h.clock.now = NIGHT
    fail_at_night_by_email(h, "ord_1", "ord_2", "ord_3")
    fail_at_night(h, "m_demo", "ord_4", "ord_5")
    h.drain()
    assert h.outbox == []  # the quiet hours
    h.clock.now = WAKE
    for _ in range(25):
        h.drain()
        h.clock.advance(seconds=TURN.total_seconds())
    emails = sent(h, "m_demo", "ord_1", "ord_2", "ord_3")
    assert sorted(at for sends in emails.values() for at in sends) == [WAKE + timedelta(seconds=s) for s in range(3)]
    assert sorted(at for sends in sent(h, "m_demo", "ord_4", "ord_5").values() for at in sends) == [WAKE, WAKE + TURN]


def test_a_merchant_whose_relay_takes_more_e_mails_a_second_says_so_in_its_config(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """``providers.email.max_per_second: 4`` (the relay account's maximum send rate): the e-mails waking at 09:00
    go a quarter of a second apart."""
    relay = {"kind": "smtp", "host": "localhost", "port": 1025, "sender": "pay@m.example", "max_per_second": 4}
    merchant = demo_merchant(providers={"email": relay})
    h = make_harness(EMAIL, EMAIL, EMAIL, merchants={"m_demo": merchant}, database_url=database_url)
    h.clock.now = NIGHT
    fail_at_night_by_email(h, "ord_1", "ord_2", "ord_3")
    h.drain()
    h.clock.now = WAKE
    for _ in range(12):
        h.drain()
        h.clock.advance(seconds=0.05)
    emails = sent(h, "m_demo", "ord_1", "ord_2", "ord_3")
    quarter = timedelta(seconds=0.25)
    assert sorted(at for sends in emails.values() for at in sends) == [WAKE, WAKE + quarter, WAKE + 2 * quarter]
