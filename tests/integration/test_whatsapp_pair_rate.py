"""Meta's pair rate is kept for every WhatsApp message, not only after Meta refused one.

Meta's Cloud API takes one message every 6 seconds from a business number to one WhatsApp user, and refuses the
next with 131056 (data/README.md). Before, the customer was paced only after such a refusal (``customer_pacing``);
until then two messages to one customer could go a tenth of a second apart (the messages kept for the end of the
quiet hours, two orders of one customer due at 09:00) or at once (two orders failing together), and the second was
refused; two refusals take WhatsApp off the order. Now every WhatsApp message takes a turn of its customer's row,
one every 6 seconds, under the row's lock (service/executor/pacing.py ``pair_turn``).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

from model.vocab import Channel
from service.executor.channels.base import OutboundMessage, SendResult
from service.executor.pacing import customer_paced_until, pair_turn
from service.executor.store import as_utc, customer_pacing
from tests.integration.test_executor import (  # noqa: F401 - make_harness is a fixture
    START,
    Harness,
    event,
    make_harness,
)
from tests.integration.test_quiet_hours_wake import NIGHT, NOW, TURN, WAKE, pacing_statements

PAIR = timedelta(seconds=6)
SECOND = timedelta(seconds=1)
#: What the tests that call ``pair_turn`` directly take a send to be: a call answered the moment it goes.
INSTANT = timedelta(0)
CUSTOMER = {"phone": "+919800000001"}
OTHER = {"phone": "+919800000002"}


def sends(h: Harness, *orders: str) -> dict[str, list[datetime]]:
    """Each order's delivered messages' send times."""
    return {order: [as_utc(n.sent_at) for n in h.view(order).nudges if n.delivered] for order in orders}


def run_until(h: Harness, *moments: datetime) -> None:
    for moment in moments:
        h.clock.now = moment
        h.drain()


def test_two_orders_of_one_customer_waking_at_09_00_go_6_seconds_apart(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """Two orders of one customer fail at 22:30 in Kolkata and wait for 09:00 with another customer's. Before, the
    wake-up sent the three a tenth of a second apart, the customer's second 0.1 s after the first, into Meta's pair
    rate limit. Now the customer's second waits 6 seconds; the other customer's is not slowed by it."""
    h = make_harness(*(dict(NOW) for _ in range(3)), database_url=database_url)
    h.clock.now = NIGHT
    h.executor.payment_failed("m_demo", event("ord_1", customer=CUSTOMER))
    h.executor.payment_failed("m_demo", event("ord_2", customer=CUSTOMER))
    h.executor.payment_failed("m_demo", event("ord_3", customer=OTHER))
    h.drain()
    assert h.outbox == []  # the quiet hours
    run_until(h, *(WAKE + number * TURN for number in range(5)), WAKE + PAIR - TURN, WAKE + PAIR, WAKE + 2 * PAIR)
    times = sends(h, "ord_1", "ord_2", "ord_3")
    assert all(len(at) == 1 for at in times.values())  # none lost, none sent twice
    customers = sorted([*times["ord_1"], *times["ord_2"]])
    assert customers == [WAKE, WAKE + PAIR]
    assert times["ord_3"][0] < WAKE + PAIR  # the wake-up's turns, not the pair rate
    assert len(h.outbox) == 3


def test_two_orders_of_one_customer_failing_together_are_messaged_6_seconds_apart(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """At midday, with no quiet hours and no rate limit before: two orders of one customer fail together. Before,
    both messages went at once; now the second 6 seconds after the first, and a third customer's at once."""
    h = make_harness(*(dict(NOW) for _ in range(3)), database_url=database_url)
    h.executor.payment_failed("m_demo", event("ord_1", customer=CUSTOMER))
    h.executor.payment_failed("m_demo", event("ord_2", customer=CUSTOMER))
    h.executor.payment_failed("m_demo", event("ord_3", customer=OTHER))
    run_until(h, START, START + PAIR - timedelta(seconds=1))
    assert sorted(m.order_id for m in h.outbox) in (["ord_1", "ord_3"], ["ord_2", "ord_3"])
    held = next(order for order in ("ord_1", "ord_2") if order not in {m.order_id for m in h.outbox})
    waiting = [a for a in h.view(held).actions if a.kind == "nudge"]
    # Its turn in UTC to the second with a Z, as the lists write times (it was isoformat()'s ``+00:00``).
    assert [(a.state, a.last_error) for a in waiting] == [
        (
            "scheduled",
            "whatsapp to this customer is paced until 2026-11-02T06:00:06Z (its turn): at most one message every "
            "6 seconds to their number (pair rate limit)",
        )
    ]
    run_until(h, START + PAIR)
    assert sends(h, "ord_1", "ord_2", "ord_3") == {
        "ord_1": [START] if held == "ord_2" else [START + PAIR],
        "ord_2": [START + PAIR] if held == "ord_2" else [START],
        "ord_3": [START],
    }


def test_a_customers_turns_that_fell_in_the_quiet_hours_go_6_seconds_apart_at_their_end(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """A customer's message goes at 20:59:50 in Kolkata and Meta refuses the next second (131056): the customer is
    held 6 s, and their three messages (the refused one again, two other orders) get turns at 20:59:57, 21:00:03
    and 21:00:09. The last two fall in the quiet hours (21:00-09:00) and wait for 09:00. Before, each kept its turn,
    spent long before, and both went at 09:00, a tenth of a second apart; now they go 6 seconds apart."""
    h = make_harness(*(dict(NOW) for _ in range(4)), database_url=database_url)
    first = NIGHT.replace(hour=15, minute=29, second=50)  # 20:59:50 in Kolkata
    h.clock.now = first
    h.executor.payment_failed("m_demo", event("ord_1", customer=CUSTOMER))
    h.drain()
    assert len(h.outbox) == 1
    h.clock.advance(seconds=1)
    h.executor.record_receipt("pm_1", False, "m_demo", error="131056 pair", failure="pair_rate_limited")
    h.executor.payment_failed("m_demo", event("ord_2", customer=CUSTOMER))
    h.executor.payment_failed("m_demo", event("ord_3", customer=CUSTOMER))
    run_until(h, h.clock.now, first + timedelta(seconds=7), first + timedelta(seconds=13), first + 2 * PAIR)
    assert len(h.outbox) == 2  # one at 20:59:57, the others wait for 09:00
    run_until(h, *(WAKE + number * TURN for number in range(5)), WAKE + PAIR, WAKE + 2 * PAIR)
    times = sends(h, "ord_1", "ord_2", "ord_3")  # delivered only: ord_1's first was refused
    assert all(len(at) == 1 for at in times.values())
    assert sorted(at for order in times.values() for at in order) == [first + timedelta(seconds=7), WAKE, WAKE + PAIR]


def test_workers_sending_to_one_customer_at_once_never_both_go_nor_share_a_turn(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """Two workers giving messages to one customer their turns at the same time, each in its own transaction as
    ``_mark_message_sending`` does, on a customer with no pacing row: one message goes at once, and every other
    gets its own turn, 6 seconds after the one before."""
    h = make_harness(database_url=database_url)

    def send(_: int) -> list[datetime | None]:
        turns = []
        for _ in range(15):
            with h.executor.engine.begin() as conn:
                turns.append(pair_turn(conn, "m_demo", Channel.WHATSAPP, "a" * 64, START, None, call_bound=INSTANT))
        return turns

    with ThreadPoolExecutor(2) as pool:
        turns = [turn for taken in pool.map(send, range(2)) for turn in taken]
    assert turns.count(None) == 1
    assert sorted(turn for turn in turns if turn is not None) == [START + number * PAIR for number in range(1, 30)]


def test_a_turn_come_back_to_long_after_it_is_spent_and_the_message_queues_again(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """A message given its turn (6 s on) and claimed again long after it (a retry, a check that kept it waiting)
    does not go on that old turn 1 second after another message to the customer: it takes the next free one."""
    h = make_harness(database_url=database_url)
    customer = "a" * 64

    def turn(moment: datetime, kept: datetime | None) -> datetime | None:
        with h.executor.engine.begin() as conn:
            return pair_turn(conn, "m_demo", Channel.WHATSAPP, customer, moment, kept, call_bound=INSTANT)

    assert turn(START, None) is None  # the first goes
    given = turn(START + timedelta(seconds=1), None)
    assert given == START + PAIR
    assert turn(START + PAIR + timedelta(seconds=1), given) is None  # at its turn, claimed a moment late: it goes
    assert turn(START + timedelta(seconds=19), None) is None  # another message, 12 s on: it goes
    assert turn(START + timedelta(seconds=20), given) == START + timedelta(seconds=25)  # the old turn is spent


def test_what_the_pair_rate_costs_a_message_and_the_rows_it_leaves_are_forgotten(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """The cost, stated: a WhatsApp message writes its customer's pacing row three times (made or locked, then its
    next turn, then when its call was answered) where it read it once; an SMS or e-mail message, with no pair rate,
    does not touch it (before, each read a row only WhatsApp makes). The rows a message leaves are deleted by the
    worker's clean-up once idle for the longest hold (15 minutes), so the table keeps the customers messaged
    recently only."""
    by = [dict(NOW), {"action": "retarget", "channel": "sms"}, {"action": "retarget", "channel": "email"}]
    h = make_harness(*by, database_url=database_url)
    h.drain()  # the worker's first run cleans up (a DELETE), then not again for an hour
    with pacing_statements(h, "customer_pacing") as whatsapp:
        h.executor.payment_failed("m_demo", event("ord_1", customer=CUSTOMER))
        h.drain()
    assert [m.channel for m in h.outbox] == [Channel.WHATSAPP]
    assert [statement.split()[0] for statement in whatsapp] == ["INSERT", "UPDATE", "UPDATE"]
    with pacing_statements(h, "customer_pacing") as sms_and_email:
        h.executor.payment_failed("m_demo", event("ord_2", customer=OTHER))
        h.executor.payment_failed("m_demo", event("ord_3", customer=OTHER))
        h.drain()
    assert [m.channel for m in h.outbox] == [Channel.WHATSAPP, Channel.SMS, Channel.EMAIL]
    assert sms_and_email == []

    assert h.count(customer_pacing) == 1
    h.clock.advance(seconds=15 * 60)
    assert h.executor.forget_idle_customers() == 0  # its turn ended 15 minutes ago less 6 s
    h.clock.advance(seconds=7)
    assert h.executor.forget_idle_customers() == 1
    assert h.count(customer_pacing) == 0


def test_a_message_gone_late_at_its_turn_keeps_the_next_one_6_seconds_behind_it(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """Turns are planned 6 s apart, but a worker may claim a message a few seconds after its turn. Before, the next
    message, planned 6 s after that turn, went at it: 3 seconds after the late one, into Meta's pair rate limit.
    Now it waits until 6 s after the late one went, and a message asking after it queues behind that."""
    h = make_harness(database_url=database_url)
    customer = "a" * 64

    def turn(moment: datetime, kept: datetime | None) -> datetime | None:
        with h.executor.engine.begin() as conn:
            return pair_turn(conn, "m_demo", Channel.WHATSAPP, customer, moment, kept, call_bound=INSTANT)

    assert turn(START, None) is None  # the first goes
    second = turn(START + timedelta(seconds=1), None)
    third = turn(START + timedelta(seconds=2), None)
    assert (second, third) == (START + PAIR, START + 2 * PAIR)
    late = START + PAIR + timedelta(seconds=3)
    assert turn(late, second) is None  # its turn, claimed 3 s late: it goes
    assert turn(START + 2 * PAIR, third) == late + PAIR  # not 3 s after it: its new turn
    assert turn(START + 2 * PAIR + timedelta(seconds=1), None) == late + 2 * PAIR
    assert turn(late + PAIR, late + PAIR) is None


def test_the_clean_up_keeps_a_customer_whose_hold_is_still_on_after_their_turns(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """A 131056 receipt may come well after its message: the customer's hold then ends after their last turn.
    Before, the clean-up judged a row by its turns alone and deleted a hold still on (the customer's next message
    went at once, into the same limit); now a row goes once both its turns and its hold are 15 minutes over."""
    h = make_harness(database_url=database_url)
    customer = "a" * 64
    policy = h.executor.retry_policy
    with h.executor.engine.begin() as conn:
        assert pair_turn(conn, "m_demo", Channel.WHATSAPP, customer, START, None, call_bound=INSTANT) is None
        moment = START
        for _ in range(6):  # limited again after each hold: 6 s, 6 s, 16 s, 64 s, 256 s, then 15 minutes
            moment = policy.note_pair_rate_limited(conn, "m_demo", Channel.WHATSAPP, customer, moment) + SECOND
        held_until = moment - SECOND
        assert held_until - (START + PAIR) > timedelta(minutes=15)
    h.clock.now = START + PAIR + timedelta(minutes=15, seconds=1)
    assert h.clock.now < held_until
    assert h.executor.forget_idle_customers() == 0
    with h.executor.engine.begin() as conn:
        assert customer_paced_until(conn, "m_demo", Channel.WHATSAPP, customer, h.clock.now) == held_until
    h.clock.now = held_until + timedelta(minutes=15, seconds=1)
    assert h.executor.forget_idle_customers() == 1


class SlowProvider:
    """A WhatsApp provider whose calls take ``took[n]`` seconds (by the harness's clock) for its n-th message, and
    which keeps when each message reached it: at the end of its call, the latest moment the executor can know of.
    ``meanwhile``: what happens while the n-th call is out (another worker's turn), run in its own thread."""

    def __init__(self, h: Harness, took: list[float], meanwhile: dict[int, Callable[[], None]] | None = None) -> None:
        self.h = h
        self.took = took
        self.meanwhile = meanwhile or {}
        self.reached: dict[str, datetime] = {}
        self.channel = Channel.WHATSAPP
        self.provider = "slow"

    async def send(self, message: OutboundMessage) -> SendResult:
        number = len(self.reached)
        self.reached[message.order_id] = START  # a place kept: the call is out
        self.h.clock.advance(seconds=self.took[number] if number < len(self.took) else 0.0)
        during = self.meanwhile.get(number)
        if during is not None:
            await asyncio.to_thread(during)
        self.reached[message.order_id] = self.h.clock.now
        self.h.outbox.append(message)
        return SendResult(status="accepted", provider_message_id=f"pm_slow_{number}")


def use_provider(h: Harness, provider: SlowProvider) -> None:
    h.effects.adapter_factory = lambda merchant_id, merchant, http: {Channel.WHATSAPP: provider}
    h.effects._adapters.clear()


def gaps(reached: dict[str, datetime]) -> list[float]:
    times = sorted(reached.values())
    return [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(times)]


def test_a_slow_call_keeps_the_customers_next_message_6_seconds_behind_its_answer(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """Two orders of one customer fail together; the first message's call to the provider takes 4 seconds. Before,
    the 6 seconds counted from its mark: the second went at its turn, 6 s after the first was marked and 2 s after
    the first reached the provider, into Meta's pair rate. Now they count from the first's answer."""
    h = make_harness(*(dict(NOW) for _ in range(2)), database_url=database_url)
    provider = SlowProvider(h, took=[4.0])
    use_provider(h, provider)
    h.executor.payment_failed("m_demo", event("ord_1", customer=CUSTOMER))
    h.executor.payment_failed("m_demo", event("ord_2", customer=CUSTOMER))
    run_until(h, START, START + PAIR, START + PAIR + 4 * SECOND, START + 2 * PAIR)
    assert len(provider.reached) == 2
    assert gaps(provider.reached) == [6.0]


def test_a_message_asking_while_the_customers_last_call_is_out_waits_for_its_bound(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """The first message's call is out for 8 seconds; meanwhile another order of the customer fails and a second
    worker takes its message, at once (given its turn, 6 s after the first's mark) and again at that turn (the call
    still out). Before, it went then, 7 s after the first's mark: 1 s before the first reached the provider. Now it
    waits until 6 s after the end of the first's claim, the longest its call could have lasted, and goes then."""
    h = make_harness(dict(NOW), database_url=database_url)
    second = make_harness(dict(NOW), database_url=database_url)
    second.clock = second.executor.clock = h.clock
    lease = h.effects.lease

    def another_worker() -> None:
        second.executor.payment_failed("m_demo", event("ord_2", customer=CUSTOMER))
        second.drain()  # ord_2 is given a turn
        h.clock.advance(seconds=6)
        second.drain()  # at its turn, with ord_1's call still out

    provider = SlowProvider(h, took=[1.0, 0.0], meanwhile={0: another_worker})
    use_provider(h, provider)
    use_provider(second, provider)
    h.executor.payment_failed("m_demo", event("ord_1", customer=CUSTOMER))
    run_until(h, START)  # ord_1's call: 1 s, then the other worker's 6, then its answer, at START + 7 s
    assert provider.reached == {"ord_1": START + 7 * SECOND}
    run_until(second, START + lease + PAIR - SECOND)
    assert len(provider.reached) == 1
    run_until(second, START + lease + PAIR)
    assert provider.reached == {"ord_1": START + 7 * SECOND, "ord_2": START + lease + PAIR}
