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

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine

from service.executor.core import charge_disputes

log = logging.getLogger("winback.executor")

#: How long a server process answers scrapes from its last read of the disputes (Prometheus scrapes every 15-60 s).
DISPUTES_READ_EVERY_SECONDS = 60.0


def dispute_label(switch_said: str) -> str:
    """The bounded label of what a switch said against an operator's "charged": ``declined`` or ``not_found``."""
    return "not_found" if switch_said.startswith("not found") else "declined"


class ChargeDisputesCollector(Collector):
    """``winback_executor_charge_disputes_total{merchant_id, switch_said}``: the charges an operator answered for as
    charged whose switch then said "declined", or "not found" at the one more ask. Each flag stays on its status
    check, dealt with or not, so the count never goes down: a counter, as Prometheus means one, read from the
    database. ``winback_executor_charge_disputes_open`` (same labels, a gauge): those nobody has marked as dealt
    with yet (``resolve_charge_disputes``), 0 once all of a label's are, what an alert should watch."""

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
        self._counts: Counter[tuple[str, str]] = Counter()
        self._open: Counter[tuple[str, str]] = Counter()
        self._read_at: float | None = None

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, GaugeMetricFamily]:
        raised = CounterMetricFamily(
            "winback_executor_charge_disputes",
            "Charges an operator answered for as charged that their switch then reported declined or not found.",
            labels=["merchant_id", "switch_said"],
        )
        still_open = GaugeMetricFamily(
            "winback_executor_charge_disputes_open",
            "Charge disputes nobody has marked as dealt with yet.",
            labels=["merchant_id", "switch_said"],
        )
        return raised, still_open

    def describe(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """The families without their figures: registering the collector reads no database (without it the
        registry called ``collect``, and the figures read as the app started were answered for the next minute)."""
        yield from self._families()

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        raised, still_open = self._families()
        counts, open_counts = self._current()
        for (merchant_id, said), count in sorted(counts.items()):
            raised.add_metric([merchant_id, said], count)
            still_open.add_metric([merchant_id, said], open_counts[(merchant_id, said)])
        yield raised
        yield still_open

    def _current(self) -> tuple[Counter[tuple[str, str]], Counter[tuple[str, str]]]:
        with self._lock:
            now = self.clock()
            if self._read_at is None or now - self._read_at >= self.read_every_seconds:
                try:
                    with self.engine.connect() as conn:
                        found = charge_disputes(conn)
                except Exception:  # the database away for a moment: the last counts, not a failed scrape
                    log.warning("could not read the charge disputes for /metrics", exc_info=True)
                else:
                    self._counts = Counter((d.merchant_id, dispute_label(d.switch_said)) for d in found)
                    self._open = Counter((d.merchant_id, dispute_label(d.switch_said)) for d in found if d.open)
                    self._read_at = now
            return self._counts, self._open
