"""A delivery receipt that arrives before its send is recorded.

A provider may post a message's receipt between accepting the message and the executor recording the send
(``Executor.complete``), or long after, when the worker died before recording it. Before, such a receipt matched no
nudge and was dropped with an info log: a message WhatsApp held back stayed recorded as sent and counted, the
merchant's rate-limited sender was not held back, and an opted-out address was not kept. Now it is kept
(``early_receipts``) and applied when the send is recorded, in the same transaction, as if it had come after.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from model.catalog import load_catalog
from model.merchant_config import MerchantConfig
from model.vocab import Channel
from service.executor.channels.base import OutboundMessage, SendResult
from service.executor.optouts import is_opted_out
from service.executor.pacing import paced_until
from service.executor.store import as_utc, nudges
from service.executor.worker import Worker, make_decider
from service.migrations import downgrade, upgrade
from tests.integration.test_executor import (  # noqa: F401 - make_harness is a fixture
    START,
    CapturingAdapter,
    Harness,
    demo_merchant,
    event,
    make_harness,
)

SECOND = timedelta(seconds=1)
PHONE = "+919800000001"
#: The table as migration 0015 makes it (named here, not imported: the test stands without the store's copy).
early_receipts = sa.table(
    "early_receipts",
    *(
        sa.column(name)
        for name in ("merchant_id", "provider_message_id", "status", "occurred_at", "failure", "received_at")
    ),
)


@pytest.fixture
def rules_only() -> Iterator[Any]:
    decider, stop = make_decider(load_catalog(), None, seed=1)
    yield decider
    stop()


def whatsapp_only() -> MerchantConfig:
    return demo_merchant(retry={"max_retries": 0}, retarget={"channels": ["whatsapp"], "max_nudges": 2})


def two_merchants() -> dict[str, MerchantConfig]:
    return {"m_demo": whatsapp_only(), "m_other": whatsapp_only().model_copy(update={"api_key_sha256": "1" * 64})}


class EarlyReceipts(CapturingAdapter):
    """A provider that posts receipts for a message as it accepts it: before the worker has the answer, so before
    ``complete`` records the send (``early``: the ``record_receipt`` keyword arguments, by merchant and order)."""

    def __init__(self, channel: Channel, outbox: list[OutboundMessage], h: Harness, early: dict[Any, Any]) -> None:
        super().__init__(channel, outbox)
        self.h, self.early = h, early

    async def send(self, message: OutboundMessage) -> SendResult:
        result = await super().send(message)
        assert result.provider_message_id is not None
        for receipt in self.early.pop((message.merchant_id, message.order_id), []):
            found = self.h.executor.record_receipt(
                result.provider_message_id, merchant_id=message.merchant_id, **receipt
            )
            assert not found  # the send is not recorded yet
        return result


def with_early_receipts(h: Harness, early: Mapping[tuple[str, str], list[dict[str, Any]]]) -> None:
    pending = dict(early)

    def adapters(merchant_id: str, merchant: MerchantConfig, http: httpx.AsyncClient) -> dict[Channel, Any]:
        return {channel: EarlyReceipts(channel, h.outbox, h, pending) for channel in Channel}

    h.effects.adapter_factory = adapters


def story(h: Harness, merchant_id: str) -> dict[str, Any]:
    """What the order's record says, the things a receipt may change."""
    view = h.view("ord_1", merchant_id)
    kept = (nudges.c.sent_at, nudges.c.delivered, nudges.c.error, nudges.c.receipt_status, nudges.c.receipt_at)
    mine = (nudges.c.merchant_id == merchant_id, nudges.c.order_id == "ord_1")
    with h.executor.engine.connect() as conn:
        paced = paced_until(conn, merchant_id, Channel.WHATSAPP, h.clock.now)
        opted = is_opted_out(conn, merchant_id, Channel.WHATSAPP, PHONE)
        rows = conn.execute(sa.select(*kept).where(*mine).order_by(nudges.c.sent_at)).all()
    return {
        "nudges": [(as_utc(row[0]) - START, *row[1:4], as_utc(row[4]) if row[4] else None) for row in rows],
        "decisions": [(d["action"], d["channel"], d["rules_applied"], d["execute_at"]) for d in view.decisions],
        "state": view.state,
        "paced": paced,
        "opted_out": opted,
    }


@pytest.mark.parametrize(
    ("error", "failure"),
    [
        ("131049 held back", "try_later"),
        ("130429 throughput", "rate_limited"),
        ("131026 undeliverable", "undeliverable"),
        ("131050 opted out", "opted_out"),
        ("131000 something went wrong", None),
    ],
)
def test_a_failed_receipt_before_the_send_is_recorded_ends_as_if_it_came_after(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    rules_only: Any,
    database_url: str,
    error: str,
    failure: Any,
) -> None:
    """The same order at two merchants: m_demo's receipt comes after the send is recorded, m_other's as the
    provider accepts the message. Before, m_other's was dropped: its message stayed delivered and counted (held
    back), its sender was not held back (rate limited), the channel stayed on the order (undeliverable) and the
    address was not kept as opted out. Now both orders end alike, then and a week on."""
    receipt = {"delivered": False, "error": error, "failure": failure, "status": "failed", "occurred_at": START}
    h = make_harness(decider=rules_only, merchants=two_merchants(), database_url=database_url)
    with_early_receipts(h, {("m_other", "ord_1"): [receipt]})
    h.executor.payment_failed("m_demo", event())
    h.executor.payment_failed("m_other", event(merchant_id="m_other"))
    h.drain()
    assert h.executor.record_receipt("pm_1", merchant_id="m_demo", **receipt)
    if failure == "opted_out":  # as the receipts route does for a receipt that matched when it came
        h.executor.opt_out_message_address("m_demo", "pm_1", "receipt")
    after, early = story(h, "m_demo"), story(h, "m_other")
    assert after["nudges"][0][1:3] == (False, f"{failure}: {error}" if failure else error)

    assert early == after
    for _ in range(8 * 24):
        h.drain()
        h.clock.advance(hours=1)
    assert story(h, "m_other") == story(h, "m_demo")


def test_an_opted_out_receipt_before_the_send_is_recorded_keeps_the_opt_out(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    rules_only: Any,
    database_url: str,
) -> None:
    """Meta's 131050 (the customer stopped the merchant's marketing messages) arriving before the send is recorded:
    the address is kept as opted out of WhatsApp, so no later message of the merchant goes to it there."""
    receipt = {"delivered": False, "error": "131050 stopped", "failure": "opted_out", "occurred_at": START}
    h = make_harness(decider=rules_only, merchants={"m_demo": whatsapp_only()}, database_url=database_url)
    with_early_receipts(h, {("m_demo", "ord_1"): [receipt]})
    h.executor.payment_failed("m_demo", event())
    h.drain()
    with h.executor.engine.connect() as conn:
        assert is_opted_out(conn, "m_demo", Channel.WHATSAPP, PHONE)
    assert [(n.delivered, n.error) for n in h.view().nudges] == [(False, "opted_out: 131050 stopped")]
    assert h.count(early_receipts) == 0  # applied, then deleted


def test_the_same_early_receipt_twice_applies_once(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    rules_only: Any,
    database_url: str,
) -> None:
    """Providers re-send callbacks: a rate-limited receipt posted twice before the send is recorded is kept once,
    holds the merchant's sender back once (not twice as long) and decides the order again once."""
    receipt = {"delivered": False, "error": "130429 limit", "failure": "rate_limited", "occurred_at": START}
    h = make_harness(decider=rules_only, merchants={"m_demo": whatsapp_only()}, database_url=database_url)
    kept: list[int] = []

    class Counting(EarlyReceipts):
        async def send(self, message: OutboundMessage) -> SendResult:
            result = await super().send(message)
            kept.append(h.count(early_receipts))
            return result

    pending = {("m_demo", "ord_1"): [receipt, receipt]}
    h.effects.adapter_factory = lambda *_: {channel: Counting(channel, h.outbox, h, pending) for channel in Channel}
    h.executor.payment_failed("m_demo", event())
    h.drain()
    assert kept == [1]
    assert h.count(early_receipts) == 0
    assert len(h.view().decisions) == 2  # the failure event's, and once for the message held back
    with h.executor.engine.connect() as conn:
        held = paced_until(conn, "m_demo", Channel.WHATSAPP, h.clock.now)
    assert held == h.clock.now + h.executor.retry_policy.rate_limit_first_hold_seconds * SECOND


def test_a_receipt_for_an_id_never_sent_is_kept_bounded_and_expires(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """A receipt for an id winback never sent (another sender's message on the same provider account) is kept for
    a while, then the worker's clean-up deletes it; a merchant's kept receipts are bounded (the oldest go first);
    one that names no merchant, or an id longer than any message's, is not kept."""
    h = make_harness(database_url=database_url)
    record = h.executor.record_receipt
    assert not record("pm_never", False, "m_demo", error="131026", occurred_at=START)
    assert not record("pm_no_merchant", False, None, error="131026", occurred_at=START)
    assert not record("p" * 257, False, "m_demo", error="131026", occurred_at=START)
    assert h.count(early_receipts) == 1
    h.clock.advance(days=2)
    h.drain()
    assert h.count(early_receipts) == 1  # kept for its send, should it be recorded yet
    h.clock.advance(days=1, seconds=1)
    Worker(h.executor, h.effects, "w2").run(until_idle=True)
    assert h.count(early_receipts) == 0

    h.executor.early_receipts_per_merchant = 3
    for index in range(5):
        h.clock.advance(seconds=1)
        record(f"pm_other_{index}", True, "m_demo", occurred_at=h.clock.now)
    with h.executor.engine.connect() as conn:
        ids = conn.scalars(sa.select(early_receipts.c.provider_message_id)).all()
    assert sorted(ids) == ["pm_other_2", "pm_other_3", "pm_other_4"]


def test_the_early_receipts_migration_goes_up_and_down_on_a_store_with_data(database_url: str) -> None:
    """0015 adds the table next to the messages already stored, and takes it away again, leaving them."""
    engine = sa.create_engine(database_url)
    try:
        upgrade(engine, "0014")
        nudge = {
            "nudge_id": "n_1",
            "merchant_id": "m_demo",
            "order_id": "ord_1",
            "channel": "whatsapp",
            "template_id": "t",
            "sent_at": START,
            "status": "accepted",
            "delivered": True,
            "provider_message_id": "pm_1",
        }
        with engine.begin() as conn:
            conn.execute(nudges.insert().values(**nudge))
        upgrade(engine)
        row = {"merchant_id": "m_demo", "provider_message_id": "pm_2", "status": "failed", "occurred_at": START}
        with engine.begin() as conn:
            conn.execute(early_receipts.insert().values(**row, failure="try_later", received_at=START))
            assert conn.scalar(sa.select(sa.func.count()).select_from(early_receipts)) == 1
        downgrade(engine, "0014")
        assert "early_receipts" not in sa.inspect(engine).get_table_names()
        with engine.connect() as conn:
            assert conn.scalar(sa.select(nudges.c.provider_message_id)) == "pm_1"
        upgrade(engine)
        assert "early_receipts" in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()
