"""Review of c65ddd9 (channel circuit breaker): a waiting decision inside quiet hours, a taken message dropped
when its worker died and the channel went down, and a refusal racing an acceptance on PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from service.executor.channels.fakes import FakeState
from tests.integration.test_executor import Harness, event, make_harness  # noqa: F401
from tests.integration.test_executor_message_outage import (  # noqa: F401
    gupshup,
    harness_for,
    rules_only,
    statuses,
    step,
)

IST = ZoneInfo("Asia/Kolkata")


def in_quiet_hours(at: datetime) -> bool:
    local = at.astimezone(IST).time()
    return local >= time(21, 0) or local < time(9, 0)


def test_waiting_decision_execute_at_lands_in_quiet_hours(
    make_harness: Callable[..., Harness],  # noqa: F811
    gupshup: Any,  # noqa: F811
    rules_only: Any,  # noqa: F811
) -> None:
    h = harness_for(make_harness, gupshup, rules_only)
    state: FakeState = gupshup.state
    state.fail(times=100_000, status=503)
    h.clock.now = datetime(2026, 11, 2, 14, 30, tzinfo=UTC)  # 20:00 in Kolkata
    body = event()
    body["event_time"] = h.clock.now.isoformat()
    h.executor.payment_failed("m_demo", body)
    step(h, 75, minutes=1)
    rows = h.view().decisions
    for d in rows:
        made = d.get("created_at")
        ex = datetime.fromisoformat(str(d["execute_at"]).replace("Z", "+00:00"))
        print(d["action"], d["channel"], "made", made, "execute_at IST", ex.astimezone(IST), d["rules_applied"])
    bad = [d for d in rows if in_quiet_hours(datetime.fromisoformat(str(d["execute_at"]).replace("Z", "+00:00")))]
    assert not bad, f"{len(bad)} recorded decisions have execute_at inside the merchant's quiet hours"


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_a_message_taken_by_its_provider_then_its_worker_died_vanishes_from_history_when_the_channel_goes_down(
    db: str,
    request: pytest.FixtureRequest,
    make_harness: Callable[..., Harness],  # noqa: F811
    gupshup: Any,  # noqa: F811
    rules_only: Any,  # noqa: F811
) -> None:
    """Worker A sends the message; the provider takes it; A dies before recording the answer. The provider then
    goes down. The next claim re-sends (same key), is refused for 15 minutes, the channel goes down, and the message
    is released as 'never sent': no nudge, no count, and the order is decided again. When the provider is back the
    customer gets a second message, and the history shows one."""
    url = None if db == "sqlite" else request.getfixturevalue("postgres_url")
    h = harness_for(lambda **kw: make_harness(database_url=url, **kw), gupshup, rules_only)
    state: FakeState = gupshup.state
    state.dedupe = True  # a provider that drops a repeat of an idempotency key (the best case)
    h.executor.payment_failed("m_demo", event())
    (action,) = h.executor.claim(1, 30.0, "w_dead", "tok_dead")
    with h.executor.engine.connect() as conn:
        order = h.executor.orders_of(conn, [action])[(action.merchant_id, action.order_id)]
    outcome = h.effects.perform(action, order)
    print("dead worker's outcome:", type(outcome).__name__, "provider has", len(state.messages))
    assert type(outcome).__name__ == "Sent"  # taken by the provider; the worker dies here, nothing recorded
    assert len(state.messages) == 1
    state.fail(times=100_000, status=503)
    step(h, 40, minutes=1)
    print(
        "after 40 min of outage: nudges",
        statuses(h),
        "actions",
        [(a.kind, a.state, a.last_error) for a in h.view().actions if a.kind == "nudge"],
    )
    state._faults.clear()  # the provider is back (received messages kept)
    step(h, 61, minutes=1)
    got = {m["idempotency_key"] for m in state.messages}
    print("provider got", len(got), "distinct messages; history:", statuses(h))
    assert len(h.view().nudges) == len(got), (
        f"the customer got {len(got)} messages; the history has {len(h.view().nudges)}"
    )


def test_concurrent_refusals_and_acceptances_on_postgresql(postgres_url: str) -> None:
    """Two workers recording refusals (and a third an acceptance) on one merchant channel at once: no error, one
    row, and the streak ends when a message is taken."""
    import threading

    import sqlalchemy as sa

    from model.vocab import Channel
    from service.executor.outages import channels_down, note_accepted, note_refusal
    from service.executor.store import channel_outages, make_executor_engine
    from service.migrations import upgrade

    engine = make_executor_engine(postgres_url)
    upgrade(engine)
    spans = {"down_after": timedelta(minutes=15), "first_hold": timedelta(minutes=5), "max_hold": timedelta(hours=1)}
    t0 = datetime(2026, 11, 2, 6, 0, tzinfo=UTC)
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def refuse(offset: int) -> None:
        try:
            barrier.wait()
            for i in range(60):
                with engine.begin() as conn:
                    note_refusal(conn, "m_demo", Channel.WHATSAPP, t0 + timedelta(minutes=i, seconds=offset), **spans)
        except BaseException as exc:
            errors.append(exc)

    def accept() -> None:
        try:
            barrier.wait()
            for _ in range(30):
                with engine.begin() as conn:
                    note_accepted(conn, "m_demo", Channel.WHATSAPP)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=refuse, args=(0,)),
        threading.Thread(target=refuse, args=(1,)),
        threading.Thread(target=accept),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("errors:", len(errors), sorted({type(e).__name__ for e in errors}))
    assert errors == []
    with engine.connect() as conn:
        assert int(conn.scalar(sa.select(sa.func.count()).select_from(channel_outages)) or 0) <= 1
        print("down:", channels_down(conn, "m_demo", t0 + timedelta(minutes=60)))
    engine.dispose()
