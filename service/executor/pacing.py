"""A merchant's messaging sender held back after its provider said it was rate limited, per merchant and channel.

A failed receipt saying the merchant's number sent too much (Meta's 130429 throughput, Gupshup's 4001:
``ReceiptFailure`` ``rate_limited``; 131056, too much to one customer: ``pair_rate_limited``) comes after the
send, often many at once for one burst. Before, it only logged a warning, and the number went on sending at full
speed into the same limit. Now the merchant's channel is
*paced*: its messages are held back until ``held_until`` (``Effects._mark_message_sending`` defers them: not sent,
not counted, sent when the hold ends). A rate-limited receipt arriving while the channel is held (a message of the
same burst) does not lengthen the hold; one after it ended doubles it, up to ``max_hold``; one after a quiet spell
of ``max_hold`` since the hold ended starts over at ``first_hold``. Other merchants, and the merchant's other
channels, are not affected: each has its own provider account and sender.

This is not the outage breaker (service/executor/outages.py): that one counts send-time refusals only (a provider
that certainly did not take a message), and a channel it holds is decided around. A rate-limited receipt is about a
message the provider took; the channel is up and only slowed, so the messages wait on it. The state lives in the
database, so every worker sees it and it survives a restart; it is read and written under the order's lock of the
transaction that records the receipt or marks the message as being sent.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import sqlalchemy as sa

from model.vocab import Channel
from service.executor.store import as_utc, channel_pacing, upsert_into

log = logging.getLogger("winback.executor")


def _key(merchant_id: str, channel: Channel) -> tuple[sa.ColumnElement[bool], sa.ColumnElement[bool]]:
    return channel_pacing.c.merchant_id == merchant_id, channel_pacing.c.channel == channel.value


def note_rate_limited(
    conn: sa.Connection,
    merchant_id: str,
    channel: Channel,
    now: datetime,
    *,
    first_hold: timedelta,
    max_hold: timedelta,
) -> datetime:
    """Record a rate-limited receipt for ``merchant_id``'s ``channel`` at ``now``; the end of the channel's hold."""
    insert = upsert_into(conn, channel_pacing).values(
        merchant_id=merchant_id, channel=channel.value, held_until=now, last_limited_at=now, times_limited=0
    )
    upsert = insert.on_conflict_do_update(
        index_elements=[channel_pacing.c.merchant_id, channel_pacing.c.channel],
        set_={"channel": insert.excluded.channel},  # a no-op that locks the row and returns it
    ).returning(*channel_pacing.c)
    row = conn.execute(upsert).mappings().one()
    held_until = as_utc(row["held_until"])
    times = int(row["times_limited"])
    if now < held_until:  # a message of the burst that started the hold: the hold stands
        conn.execute(channel_pacing.update().where(*_key(merchant_id, channel)).values(last_limited_at=now))
        return held_until
    if times and now - held_until > max_hold:  # a quiet spell since the hold ended: start over
        times = 0
    until = now + min(first_hold * (1 << min(times, 16)), max_hold)
    conn.execute(
        channel_pacing.update()
        .where(*_key(merchant_id, channel))
        .values(held_until=until, last_limited_at=now, times_limited=times + 1)
    )
    log.warning(
        "channel %s of merchant %s is paced until %s: its provider said its sender is rate limited",
        channel.value, merchant_id, until.isoformat(), extra={"merchant_id": merchant_id, "channel": channel.value},
    )  # fmt: skip
    return until


def paced_until(conn: sa.Connection, merchant_id: str, channel: Channel, now: datetime) -> datetime | None:
    """The end of the hold of ``merchant_id``'s ``channel`` while it is held back at ``now``, else None."""
    until = conn.scalar(
        sa.select(channel_pacing.c.held_until).where(*_key(merchant_id, channel), channel_pacing.c.held_until > now)
    )
    return None if until is None else as_utc(until)
