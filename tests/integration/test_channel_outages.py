"""The channel circuit breaker (service/executor/outages.py) on SQLite and on the real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from model.vocab import Channel
from service.executor.outages import channels_down, down_note, note_accepted, note_refusal, without_channels
from service.executor.store import make_executor_engine
from service.migrations import upgrade
from tests.factories import make_merchant

T0 = datetime(2026, 11, 2, 6, 0, tzinfo=UTC)
SPANS = {
    "down_after": timedelta(minutes=15),
    "first_hold": timedelta(minutes=5),
    "max_hold": timedelta(hours=1),
}
WA = Channel.WHATSAPP


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    url = (
        f"sqlite:///{tmp_path / 'outages.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    )
    made = make_executor_engine(url)
    upgrade(made)
    yield made
    made.dispose()


def refuse(engine: sa.Engine, at: datetime, channel: Channel = WA, **extra: timedelta) -> datetime | None:
    with engine.begin() as conn:
        return note_refusal(conn, "m_demo", channel, at, **SPANS, **extra)


def down(engine: sa.Engine, at: datetime) -> dict[Channel, datetime]:
    with engine.connect() as conn:
        return channels_down(conn, "m_demo", at)


def test_a_channel_is_down_after_fifteen_minutes_of_refusals_and_its_hold_doubles_up_to_an_hour(
    engine: sa.Engine,
) -> None:
    for minute in range(0, 15, 3):
        assert refuse(engine, T0 + timedelta(minutes=minute)) is None
    assert down(engine, T0 + timedelta(minutes=14)) == {}
    at = T0 + timedelta(minutes=15)
    assert refuse(engine, at) == at + timedelta(minutes=5)
    assert down(engine, at) == {WA: at + timedelta(minutes=5)}
    assert refuse(engine, at + timedelta(minutes=1)) == at + timedelta(minutes=5)  # a message already on its way
    holds = []
    for _ in range(6):  # each probe at the end of the hold is refused
        probe = down(engine, at)[WA]
        assert down(engine, probe) == {}  # the hold is over: the next message is the probe
        until = refuse(engine, probe)
        assert until is not None
        holds.append(until - probe)
        at = probe
    assert holds == [timedelta(minutes=m) for m in (10, 20, 40, 60, 60, 60)]


def test_refusals_far_apart_are_no_outage(engine: sa.Engine) -> None:
    assert refuse(engine, T0) is None
    assert refuse(engine, T0 + timedelta(days=2)) is None  # the streak starts over
    assert refuse(engine, T0 + timedelta(days=2, minutes=14)) is None
    assert down(engine, T0 + timedelta(days=2, minutes=14)) == {}


def test_a_message_taken_ends_the_outage_and_the_next_one_starts_a_new_streak(engine: sa.Engine) -> None:
    refuse(engine, T0)
    until = refuse(engine, T0 + timedelta(minutes=15))
    assert until is not None
    with engine.begin() as conn:
        note_accepted(conn, "m_demo", WA)
    assert down(engine, T0 + timedelta(minutes=16)) == {}
    assert refuse(engine, T0 + timedelta(minutes=16)) is None
    assert refuse(engine, T0 + timedelta(minutes=30)) is None  # 14 minutes into the new streak


def test_retry_after_sets_the_least_hold_up_to_the_longest(engine: sa.Engine) -> None:
    refuse(engine, T0)
    at = T0 + timedelta(minutes=15)
    assert refuse(engine, at, retry_after=timedelta(minutes=25)) == at + timedelta(minutes=25)
    probe = at + timedelta(minutes=25)
    assert refuse(engine, probe, retry_after=timedelta(days=1)) == probe + timedelta(hours=1)


def test_channels_and_merchants_are_apart(engine: sa.Engine) -> None:
    refuse(engine, T0)
    refuse(engine, T0 + timedelta(minutes=15))
    with engine.begin() as conn:
        assert note_refusal(conn, "m_other", WA, T0 + timedelta(minutes=15), **SPANS) is None
    assert refuse(engine, T0 + timedelta(minutes=15), Channel.SMS) is None
    assert set(down(engine, T0 + timedelta(minutes=16))) == {WA}


def test_a_decision_leaves_down_channels_out_of_the_merchants_channels() -> None:
    merchant = make_merchant(retarget={"channels": ["whatsapp", "sms", "email"]})
    kept = without_channels(merchant, {WA})
    assert kept.retarget.channels == [Channel.SMS, Channel.EMAIL]
    assert merchant.retarget.channels == [WA, Channel.SMS, Channel.EMAIL]  # the config itself is untouched
    assert down_note({Channel.SMS: T0, WA: T0}) == ["channel_down:sms", "channel_down:whatsapp"]
