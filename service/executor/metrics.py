"""Prometheus figures of the executor's state, read from its database when ``/metrics`` is scraped.

The executor's work is done by ``winback executor run`` workers, which serve no HTTP, and by ``winback serve``'s
workers, each a process of its own: a count kept in any one process's memory would show a scrape only that
process's share (or nothing). What an operator must see is in the database, which every process shares, so
``winback serve``'s ``/metrics`` reads it (at most once a minute per server process).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.engine import Connection, Engine

from service.executor.by_hand import PAID_TWICE_CASE, REFUND_CASE, SILENT_NOT_CHARGED_CASE, cases_counted
from service.executor.channels.base import SenderBlock
from service.executor.core import charge_disputes, checks_asked_no_more
from service.executor.outages import BAN, SETUP, sender_blocks_counted
from service.executor.pacing import sender_holds_counted
from service.executor.store import utcnow

log = logging.getLogger("winback.executor")

#: How long a server process answers scrapes from its last read of the disputes (Prometheus scrapes every 15-60 s).
DISPUTES_READ_EVERY_SECONDS = 60.0


def dispute_label(switch_said: str) -> str:
    """The bounded label of what a switch said against an operator's "charged" or a merchant's report of the
    payment: ``declined`` or ``not_found``."""
    return "not_found" if switch_said.startswith("not found") else "declined"


class _ReadFromTheDatabase(Collector):
    """A collector whose figures are counts read from the executor's database, at most once every
    ``read_every_seconds`` per server process (the last counts answer a scrape while the database is away)."""

    #: What the figures are, for the warning when they cannot be read.
    what = "figures"

    def __init__(
        self,
        engine: Engine,
        read_every_seconds: float = DISPUTES_READ_EVERY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.read_every_seconds = read_every_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._counts: tuple[Counter[tuple[str, ...]], ...] = ()
        self._read_at: float | None = None

    #: The counter's name (without ``_total``) and help, and its labels, in the order ``_read`` counts them.
    counter: tuple[str, str] = ("", "")
    labels: tuple[str, ...] = ()
    #: A gauge of the same labels, if any (name and help): ``_read``'s second count, 0 for a label it lacks.
    gauge: tuple[str, str] | None = None

    def _read(self, conn: Connection) -> tuple[Counter[tuple[str, ...]], ...]:
        raise NotImplementedError

    def _gauged(self, labels: tuple[str, ...]) -> bool:
        """Whether the gauge has a series for ``labels`` (every counted label, unless a collector says otherwise)."""
        return True

    def _families(self) -> list[CounterMetricFamily | GaugeMetricFamily]:
        families: list[CounterMetricFamily | GaugeMetricFamily] = [
            CounterMetricFamily(*self.counter, labels=list(self.labels))
        ]
        if self.gauge is not None:
            families.append(GaugeMetricFamily(*self.gauge, labels=list(self.labels)))
        return families

    def describe(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """The families without their figures: registering the collector reads no database (without it the
        registry called ``collect``, and the figures read as the app started were answered for the next minute)."""
        yield from self._families()

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        families = self._families()
        read = self._current()
        counts = read[0] if read else Counter()
        gauged = read[1] if len(read) > 1 else Counter()
        for labels, count in sorted(counts.items()):
            families[0].add_metric(list(labels), count)
            if len(families) > 1 and self._gauged(labels):
                families[1].add_metric(list(labels), gauged[labels])
        yield from families

    def _current(self) -> tuple[Counter[tuple[str, ...]], ...]:
        with self._lock:
            now = self.clock()
            if self._read_at is None or now - self._read_at >= self.read_every_seconds:
                try:
                    with self.engine.connect() as conn:
                        self._counts = self._read(conn)
                except Exception:  # the database away for a moment: the last counts, not a failed scrape
                    log.warning("could not read the %s for /metrics", self.what, exc_info=True)
                else:
                    self._read_at = now
            return self._counts


class ChargeDisputesCollector(_ReadFromTheDatabase):
    """``winback_executor_charge_disputes_total{merchant_id, switch_said, said_by}``: the charges an operator
    answered for as charged, or whose merchant reported the order paid by them (a ``payment-succeeded`` naming the
    payment), whose switch then said "declined", or "not found" at the one more ask; ``said_by`` is ``operator`` or
    ``merchant``, whose word the switch contradicts. Each flag stays on its status check, dealt with or not, so the
    count never goes down: a counter, as Prometheus means one, read from the database.
    ``winback_executor_charge_disputes_open`` (same labels, a gauge): those nobody has marked as dealt with yet
    (``resolve_charge_disputes``), 0 once all of a label's are, what an alert should watch."""

    what = "charge disputes"
    counter = (
        "winback_executor_charge_disputes",
        "Charges an operator answered for as charged, or a merchant reported paid, that their switch then reported "
        "declined or not found.",
    )
    gauge = ("winback_executor_charge_disputes_open", "Charge disputes nobody has marked as dealt with yet.")
    labels = ("merchant_id", "switch_said", "said_by")

    def _read(self, conn: Connection) -> tuple[Counter[tuple[str, ...]], ...]:
        found = charge_disputes(conn)
        return (
            Counter((d.merchant_id, dispute_label(d.switch_said), d.said_by) for d in found),
            Counter((d.merchant_id, dispute_label(d.switch_said), d.said_by) for d in found if d.open),
        )


class RefundsByHandCollector(_ReadFromTheDatabase):
    """``winback_executor_refunds_by_hand_total{merchant_id, why}``: the refunds of duplicate charges given to an
    operator to make by hand (``why``: ``switch_silent``, its switch answered no status check of the charge within
    REFUND_WAIT_FOR_SWITCH; ``no_answer``, the refund was sent and never answered; ``refused``, the switch refused
    it or cannot refund). Each is kept in ``cases_by_hand``, dealt with or not, so the count never goes down: a
    counter, read from the database; an alert watches its increase (``winback executor refunds-by-hand`` lists
    them). ``winback_executor_refunds_by_hand_open`` (same labels, a gauge): those nobody has marked as dealt with
    yet (``refunds-by-hand --resolve``, the console), 0 once all of a label's are."""

    what = "refunds by hand"
    counter = ("winback_executor_refunds_by_hand", "Refunds of duplicate charges given to an operator to make by hand.")
    gauge = ("winback_executor_refunds_by_hand_open", "Refunds by hand nobody has marked as dealt with yet.")
    labels: tuple[str, ...] = ("merchant_id", "why")
    kind = REFUND_CASE

    def _read(self, conn: Connection) -> tuple[Counter[tuple[str, ...]], ...]:
        counted = cases_counted(conn, self.kind)
        return (counted.total, counted.open)


class PaidTwiceCollector(RefundsByHandCollector):
    """``winback_executor_possible_double_payments_total{merchant_id}``: the orders settled by winback's own charge
    that their merchant then reported paid by a payment of its own (a ``payment-succeeded`` naming a txn id that is
    none of winback's charges), one per merchant txn id: the customer may have paid twice, and winback refunds
    nothing on its own. Each is kept in ``cases_by_hand``, dealt with or not, so the count never goes down: a
    counter, read from the database (a grouped read of that small table, not of every charge's payload); an alert
    watches its increase (``winback executor refunds-by-hand`` lists them).
    ``winback_executor_possible_double_payments_open`` (same labels, a gauge): those nobody has marked as dealt
    with yet."""

    what = "possible double payments"
    counter = (
        "winback_executor_possible_double_payments",
        "Orders paid by winback's charge that their merchant then reported paid by a payment of its own.",
    )
    gauge = (
        "winback_executor_possible_double_payments_open",
        "Possible double payments nobody has marked as dealt with yet.",
    )
    labels = ("merchant_id",)
    kind = PAID_TWICE_CASE


class SilentNotChargedCollector(RefundsByHandCollector):
    """``winback_executor_silent_not_charged_total{merchant_id}``: the charges taken as never charged (an operator's
    "not charged", or their switch's "not found") whose status checks their switch then answered none of for
    SWITCH_SILENCE_LIMIT, asked no more: if a send reached the connector late the customer paid, and nothing else
    shows it. Each is kept in ``cases_by_hand``, dealt with or not: a counter, read from the database (``winback
    executor refunds-by-hand`` lists them). ``winback_executor_silent_not_charged_open`` (a gauge): those nobody has
    marked as dealt with yet (checked with the connector), what an alert should watch."""

    what = "charges taken as never charged, their switch silent"
    counter = (
        "winback_executor_silent_not_charged",
        "Charges taken as never charged whose switch then answered no status check for a day.",
    )
    gauge = (
        "winback_executor_silent_not_charged_open",
        "Charges taken as never charged, their switch silent, nobody has checked with the connector yet.",
    )
    labels = ("merchant_id",)
    kind = SILENT_NOT_CHARGED_CASE


class ChecksAskedNoMoreCollector(_ReadFromTheDatabase):
    """``winback_executor_status_checks_asked_no_more_total{merchant_id, charge}``: the charges' status checks whose
    switch answered none of their asks for SWITCH_SILENCE_LIMIT, and which are asked no more (``charge``: what the
    charge was then: ``unknown``, for an operator's resolve-charge; ``charged_by_operator``;
    ``taken_as_not_charged``; ``other``). Each stays marked on its check, so the count never goes down: a counter,
    read from the database; an alert watches its increase."""

    what = "status checks asked no more"
    counter = (
        "winback_executor_status_checks_asked_no_more",
        "Charge status checks whose switch answered none of their asks for a day, asked no more.",
    )
    labels = ("merchant_id", "charge")

    def _read(self, conn: Connection) -> tuple[Counter[tuple[str, ...]], ...]:
        return (Counter(checks_asked_no_more(conn)),)


class SenderHoldsCollector(_ReadFromTheDatabase):
    """``winback_executor_sender_holds_total{merchant_id, channel, limit}``: the times a provider's rate limit held
    a merchant's sender on a channel (service/executor/pacing.py), each hold once (the receipts of the burst that
    started it, arriving during it, are not counted again), by what it said: ``rate`` (Meta's 130429, Gupshup's 4001,
    an SMTP relay's throttling answer), ``daily_quota`` (a relay's daily sending limit), or ``pair`` (Meta's 131056:
    one customer of the sender held, not the sender). Kept in ``sender_holds``, so the count never goes down; an
    alert watches its increase. ``winback_executor_senders_held`` (same labels but ``pair``, a gauge): 1 while the
    sender is held for that limit, 0 once its hold is over. The table has a row per merchant, channel and limit:
    reading it is cheap."""

    what = "sender holds"
    counter = (
        "winback_executor_sender_holds",
        "Times a provider's rate limit held a merchant's sender on a channel (pair: one customer of it), by limit.",
    )
    gauge = (
        "winback_executor_senders_held",
        "1 while a merchant's sender on a channel is held by its provider's rate limit or daily quota, else 0.",
    )
    labels = ("merchant_id", "channel", "limit")

    def __init__(
        self,
        engine: Engine,
        read_every_seconds: float = DISPUTES_READ_EVERY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        super().__init__(engine, read_every_seconds, clock)
        self.now = now

    def _gauged(self, labels: tuple[str, ...]) -> bool:
        """No held-sender series for ``pair``: it holds one customer, not the sender."""
        return labels[-1] != "pair"

    def _read(self, conn: Connection) -> tuple[Counter[tuple[str, ...]], ...]:
        found = sender_holds_counted(conn, self.now())
        return (
            Counter({(h.merchant_id, h.channel, h.held_for): h.holds for h in found}),
            Counter({(h.merchant_id, h.channel, h.held_for): int(h.held_now) for h in found}),
        )


class SenderBansCollector(_ReadFromTheDatabase):
    """``winback_executor_sender_bans_total{merchant_id, channel}``: the times a provider said a merchant's sender
    (its account, sending IP or domain) is banned until an admin acts (Exchange Online's 5.7.708, say), which put
    the merchant's channel down at once (service/executor/outages.py); a probe refused after a hold is the same
    ban, not counted again. Kept in ``sender_holds`` (``held_for`` ``ban``), so the count never goes down; an
    alert watches its increase: nothing but an admin lifts a ban."""

    what = "sender bans"
    counter = (
        "winback_executor_sender_bans",
        "Times a provider banned a merchant's sender on a channel until an admin acts (the channel put down).",
    )
    labels = ("merchant_id", "channel")
    #: The ``sender_holds.held_for`` counted.
    why: SenderBlock = BAN

    def _read(self, conn: Connection) -> tuple[Counter[tuple[str, ...]], ...]:
        return (Counter(sender_blocks_counted(conn, self.why)),)


class SenderSetupRefusalsCollector(SenderBansCollector):
    """``winback_executor_sender_setup_refusals_total{merchant_id, channel}``: the times a provider refused a
    merchant's messages because its set-up is wrong (its SMTP credentials refused, a relay not knowing its IP or
    domain, its sender not verified), which put the merchant's channel down at once until an admin fixes the
    merchant's settings (service/executor/outages.py); a probe refused after a hold is not counted again."""

    what = "sender set-up refusals"
    counter = (
        "winback_executor_sender_setup_refusals",
        "Times a provider refused a merchant's messages on a channel as its set-up is wrong (the channel put down).",
    )
    why = SETUP
