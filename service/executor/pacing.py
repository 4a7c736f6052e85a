"""Messages held back after their provider said they were rate limited: a merchant's sender on a channel, or one
customer of the merchant on it, and the release of the held messages one at a time.

A failed receipt saying the merchant's number sent too much (Meta's 130429 throughput, Gupshup's 4001:
``ReceiptFailure`` ``rate_limited``) comes after the send, often many at once for one burst. Before, it only logged
a warning, and the number went on sending at full speed into the same limit. Now the merchant's channel is *paced*:
its messages are held back until ``held_until`` (``Effects._mark_message_sending`` defers them: not sent, not
counted, sent when the hold ends). A rate-limited receipt arriving while the channel is held (a message of the same
burst) does not lengthen the hold; one after it ended doubles it, up to ``max_hold``; one after a quiet spell of
``max_hold`` since the hold ended starts over at ``first_hold``. Other merchants, and the merchant's other channels,
are not affected: each has its own provider account and sender.

An SMTP relay says the same at send time: Amazon SES's ``454 Throttling failure``, Google's ``421 4.7.28`` or
``550 5.4.5 Daily user sending limit exceeded`` (``channels.adapters.smtp_sender_limit``). The refused message is
held with its sender (``Executor._hold_with_its_sender``): not a failed try, not a refusal of the channel, not given
up, not recorded as sent. A daily quota holds longer (``RetryPolicy.sender_quota_first_hold_seconds``, doubling up to
a day) than a rate limit. A hold for the daily quota longer than ``RetryPolicy.sender_quota_replan_after_seconds``
(``senders_over_quota``: from the second hold in a row on, the first message after the first hold having been refused
again) is taken as an outage of the channel is: its orders are decided again without it (``Executor
._decide_with_channels_down``), so a customer of a merchant with another channel gets the message there, not hours
later.

When the hold ended, every message held during it went at once: the very burst that had hit the limit. Now each
message the hold (or the release after it) keeps back is given a turn of its own (``release_turn``), ``spacing``
after the one before, from the hold's end on: the held messages go one at a time, and a message planned while they
are still going waits for its turn behind them. The turn is kept on the message (``Defer.payload``), so at its turn
it goes, whoever claims it; a turn that was not recorded (the worker died) is only a gap in the release. Every other
check of the send (the quiet hours, the order's window, the cadence, an opt-out) is made again at the turn.

Meta's 131056 (``pair_rate_limited``: too many messages from the business number to ONE customer phone number) is
about that pair only: Meta says to wait and retry for that number, and that other numbers can be messaged without
waiting (data/README.md). It holds back only that customer's messages on the channel (``customer_pacing``, keyed by
the address's SHA-256, as opt-outs are), for Meta's recommended back-off: 4^X seconds, X counting the pair's limited
receipts in a row from 0, never less than the pair rate's one message every 6 seconds, at most ``max_hold``; the
messages it held (the customer's other orders) then go one every 6 seconds, as the sender's do a spacing apart.
Waiting for a 131056 before keeping the pair rate let two messages to one customer go together first (two orders
failing at once, or due at the end of the quiet hours, released a tenth of a second apart), and two refusals take
WhatsApp off the order: every WhatsApp message therefore takes a turn of its customer's row (``pair_turn``), one
every 6 seconds, the first at once, under the row's lock. That costs each WhatsApp message two writes of its
customer's row (it read it once before), and the worker's clean-up deletes the rows idle for ``max_hold``
(``forget_idle_customers``). The other channels have no pair rate documented, no receipt of theirs is classified
as one, and so no customer's row: their messages do not read the table.

The quiet hours make the same burst with no rate limit at all: a message due in them is deferred to their end, and
the policy plans a night's first messages there too, so every message of a merchant whose customers share a time
zone is due at one instant (09:00 local), into the sender's throughput limit. A message sent, or due, within
``QUIET_HOURS_WAKE`` of the end of its quiet hours (the merchant's, or its customer's) therefore always takes a turn
of the sender's release, ``wake_spacing`` apart (``RetryPolicy.wake_spacing``: the provider account's
``max_per_second`` when the merchant's config says it, else a tenth of a second, from Meta's documented
throughput, and a second for e-mail, which goes through an SMTP relay with a rate of its own; data/README.md): the
first goes at once, the others each at its turn, kept on the message as
above. A message sent at any other time takes no lock of its sender's row and makes no query of it it did not
before.

This is not the outage breaker (service/executor/outages.py): that one counts send-time refusals only (a provider
that certainly did not take a message), and a channel it holds is decided around. A rate-limited receipt is about a
message the provider took; the channel is up and only slowed, so the messages wait on it. The state lives in the
database, so every worker sees it and it survives a restart; it is read and written under the order's lock of the
transaction that records the receipt or marks the message as being sent, and a release's next turn under its row's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Literal

import sqlalchemy as sa

from model.vocab import Channel
from model.wording import utc_second
from service.executor.channels.base import SenderLimit
from service.executor.outages import down_of, down_select
from service.executor.store import (
    as_utc,
    as_utc_or_none,
    channel_outages,
    channel_pacing,
    count_sender_hold,
    customer_pacing,
    sender_holds,
    upsert_into,
)

log = logging.getLogger("winback.executor")

#: Meta's pair rate: a business number may send one message every 6 seconds to one WhatsApp user (data/README.md).
PAIR_RATE_INTERVAL: Final = timedelta(seconds=6)
#: The base of Meta's recommended back-off after a pair rate limit: retry after 4^X seconds (data/README.md).
PAIR_BACKOFF_BASE: Final = 4
#: How long after the end of the quiet hours a message wakes with them and takes a turn (``_release_turn``): one
#: sent then, or one that was due then (``ActionRow.was_due_at``). A worker far behind claims the messages due at
#: that end long after it, all at once: judged by the time it sends them only, it sent them unpaced once it was
#: more than this behind (the release it would have queued behind was over, or had never started).
QUIET_HOURS_WAKE: Final = timedelta(minutes=10)


def _where(table: sa.Table, key: Mapping[str, str]) -> list[sa.ColumnElement[bool]]:
    return [table.c[name] == value for name, value in key.items()]


def _locked_row(conn: sa.Connection, table: sa.Table, key: Mapping[str, str], now: datetime) -> sa.RowMapping:
    """``key``'s row of ``table``, locked until the transaction ends; made if missing, neither held nor limited."""
    insert = upsert_into(conn, table).values(**key, held_until=now, last_limited_at=now, times_limited=0)
    upsert = insert.on_conflict_do_update(
        index_elements=[table.c[name] for name in key],
        set_={"channel": insert.excluded.channel},  # a no-op that locks the row and returns it
    ).returning(*table.c)
    return conn.execute(upsert).mappings().one()


def _note_limited(
    conn: sa.Connection,
    table: sa.Table,
    key: Mapping[str, str],
    now: datetime,
    hold: Callable[[int], timedelta],
    max_hold: timedelta,
) -> tuple[datetime, bool]:
    """Record a rate-limited receipt for ``key``'s row of ``table`` at ``now``: the end of its hold, and whether
    this receipt started it (one arriving during the hold, of the same burst, leaves it as it is). ``hold``: how
    long a hold is after that many holds in a row (at most ``max_hold``; a quiet spell of ``max_hold`` since the
    last one ended starts the count over)."""
    row = _locked_row(conn, table, key, now)
    held_until = as_utc(row["held_until"])
    times = int(row["times_limited"])
    if now < held_until:  # a message of the burst that started the hold: the hold stands
        conn.execute(table.update().where(*_where(table, key)).values(last_limited_at=now))
        return held_until, False
    if times and now - held_until > max_hold:  # a quiet spell since the hold ended: start over
        times = 0
    until = now + min(hold(min(times, 16)), max_hold)
    conn.execute(
        table.update().where(*_where(table, key)).values(held_until=until, last_limited_at=now, times_limited=times + 1)
    )
    return until, True


#: What held a sender, as ``sender_holds`` and /metrics label it: its rate or its daily quota (the whole sender),
#: or Meta's pair rate (one customer of it).
HeldFor = SenderLimit | Literal["pair"]
HELD_FOR: Final[tuple[HeldFor, ...]] = ("rate", "daily_quota", "pair")


@dataclass(frozen=True)
class SenderHolds:
    """The holds of ``merchant_id``'s sender on ``channel`` for ``held_for`` (``HELD_FOR``): how many ever started
    (``holds``), and whether the sender is held for it at the moment read (``held_now``; never for ``pair``, which
    holds one customer, not the sender)."""

    merchant_id: str
    channel: str
    held_for: str
    holds: int
    held_now: bool


def sender_holds_counted(conn: sa.Connection, now: datetime) -> list[SenderHolds]:
    """Every merchant's holds by channel and kind of limit (``sender_holds``: one row each, a small table), as
    /metrics reads them at ``now``."""
    limits = sender_holds.c.held_for.in_(HELD_FOR)  # not the bans (service/executor/outages.py)
    rows = conn.execute(sa.select(sender_holds).where(limits).order_by(*sender_holds.primary_key.columns)).mappings()
    return [
        SenderHolds(
            merchant_id=row["merchant_id"],
            channel=row["channel"],
            held_for=row["held_for"],
            holds=int(row["holds"]),
            held_now=row["held_for"] != "pair" and as_utc(row["held_until"]) > now,
        )
        for row in rows
    ]


def note_rate_limited(
    conn: sa.Connection,
    merchant_id: str,
    channel: Channel,
    now: datetime,
    *,
    first_hold: timedelta,
    max_hold: timedelta,
    why: str = "rate limited",
    limit: SenderLimit = "rate",
) -> datetime:
    """Record a rate-limited receipt (or a send refused for the same reason: an SMTP relay's throttling answer) for
    ``merchant_id``'s ``channel`` at ``now``; the end of the channel's hold. ``why``: what the provider said of the
    sender (``rate limited``, ``over its daily quota``), for the log; ``limit``: the same, as ``sender_holds``
    counts a hold it starts."""
    key = {"merchant_id": merchant_id, "channel": channel.value}
    until, started = _note_limited(conn, channel_pacing, key, now, lambda times: first_hold * (1 << times), max_hold)
    if started:
        count_sender_hold(conn, merchant_id, channel.value, limit, until, now)
        log.warning(
            "channel %s of merchant %s is paced until %s: its provider said its sender is %s",
            channel.value, merchant_id, utc_second(until), why,
            extra={"merchant_id": merchant_id, "channel": channel.value},
        )  # fmt: skip
    return until


def senders_over_quota(
    conn: sa.Connection, merchant_id: str, now: datetime, longer_than: timedelta, channel: Channel | None = None
) -> dict[Channel, datetime]:
    """The merchant's channels whose sender is held at ``now`` for its daily quota by a hold longer than
    ``longer_than``, with the end of each one's hold (``sender_holds``: the start and end of the last hold);
    ``channel``: that channel's row only (one read by its key)."""
    return _over_quota(conn.execute(_over_quota_select(merchant_id, now, channel)), longer_than)


def channels_out(
    conn: sa.Connection, merchant_id: str, now: datetime, longer_than: timedelta, channel: Channel | None = None
) -> tuple[dict[Channel, datetime], dict[Channel, datetime]]:
    """``outages.channels_down`` and ``senders_over_quota``, read in one statement: each read alone was one more
    round trip of every decision and every message sent. ``channel``: that channel's rows only (a message's own)."""
    kind: sa.Label[str] = sa.literal_column("'down'").label("kind")
    down = down_select(merchant_id, now, channel).add_columns(channel_outages.c.down_until.label("since"), kind)
    over = _over_quota_select(merchant_id, now, channel).add_columns(sa.literal_column("'over'").label("kind"))
    rows = conn.execute(sa.union_all(down, over)).all()
    return down_of(row for row in rows if row.kind == "down"), _over_quota(
        (row for row in rows if row.kind == "over"), longer_than
    )


def _over_quota_select(
    merchant_id: str, now: datetime, channel: Channel | None
) -> sa.Select[tuple[str, datetime, datetime]]:
    where = [
        sender_holds.c.merchant_id == merchant_id,
        sender_holds.c.held_for == "daily_quota",
        sender_holds.c.held_until > now,
    ]
    if channel is not None:
        where.append(sender_holds.c.channel == channel.value)
    return sa.select(
        sender_holds.c.channel, sender_holds.c.held_until.label("until"), sender_holds.c.last_held_at.label("since")
    ).where(*where)


def _over_quota(rows: Iterable[sa.Row[Any]], longer_than: timedelta) -> dict[Channel, datetime]:
    return {
        Channel(row.channel): as_utc(row.until) for row in rows if as_utc(row.until) - as_utc(row.since) > longer_than
    }


def note_pair_rate_limited(
    conn: sa.Connection, merchant_id: str, channel: Channel, address_sha256: str, now: datetime, *, max_hold: timedelta
) -> datetime:
    """Record a pair-rate-limited receipt (Meta's 131056) for the customer at ``address_sha256`` on
    ``merchant_id``'s ``channel`` at ``now``; the end of that customer's hold. The merchant's customers whose last
    hold (and release) ended more than ``max_hold`` ago are forgotten here (their next one would start over anyway),
    so the table keeps only the customers recently limited."""
    forget_idle_customers(conn, now, max_hold, merchant_id)
    key = {"merchant_id": merchant_id, "channel": channel.value, "address_sha256": address_sha256}
    until, started = _note_limited(
        conn,
        customer_pacing,
        key,
        now,
        lambda times: max(PAIR_RATE_INTERVAL, timedelta(seconds=PAIR_BACKOFF_BASE**times)),
        max_hold,
    )
    if started:
        count_sender_hold(conn, merchant_id, channel.value, "pair", until, now)
        log.warning(
            "a customer of merchant %s is paced on %s until %s: too many messages to their number (pair rate limit)",
            merchant_id, channel.value, utc_second(until), extra={"merchant_id": merchant_id, "channel": channel.value},
        )  # fmt: skip
    return until


def _held_until(conn: sa.Connection, table: sa.Table, key: Mapping[str, str], now: datetime) -> datetime | None:
    until = conn.scalar(sa.select(table.c.held_until).where(*_where(table, key), table.c.held_until > now))
    return None if until is None else as_utc(until)


def paced_until(conn: sa.Connection, merchant_id: str, channel: Channel, now: datetime) -> datetime | None:
    """The end of the hold of ``merchant_id``'s ``channel`` while it is held back at ``now``, else None."""
    return _held_until(conn, channel_pacing, {"merchant_id": merchant_id, "channel": channel.value}, now)


def customer_paced_until(
    conn: sa.Connection, merchant_id: str, channel: Channel, address_sha256: str, now: datetime
) -> datetime | None:
    """The end of the hold of the customer at ``address_sha256`` on ``merchant_id``'s ``channel`` while it is held
    back at ``now`` (a pair rate limit), else None."""
    key = {"merchant_id": merchant_id, "channel": channel.value, "address_sha256": address_sha256}
    return _held_until(conn, customer_pacing, key, now)


def _release_turn(
    conn: sa.Connection,
    table: sa.Table,
    key: Mapping[str, str],
    now: datetime,
    turn: datetime | None,
    spacing: timedelta,
    wake_spacing: timedelta | None = None,
) -> datetime | None:
    """When a message held back by ``key``'s row of ``table`` may go: None for now, else its turn, later than
    ``now``, reserved for it. While the row's hold is on, and while the messages it held are going after it, each
    message gets the next free turn (the first at the hold's end), ``spacing`` after the one before. ``turn``: the
    turn the message was given before, which it keeps; one from before the hold's end is an earlier hold's, and the
    message queues again. A turn is given under the row's lock (two workers never give out the same one); a row with
    no hold nor release going on is only read, so the sends it paces do not wait on each other.

    ``wake_spacing``: the message wakes with the end of quiet hours, when all of them wake at once
    (``QUIET_HOURS_WAKE``). It always takes a turn, ``wake_spacing`` after the one before (``spacing`` while the
    sender is held), the row made if the sender never had one: the first goes at once, the others queue, and every
    message that comes while they are going queues behind them, as behind a hold's release."""
    where = _where(table, key)
    row: sa.RowMapping | None
    for locked in (False, True) if wake_spacing is None else (True,):
        if wake_spacing is None:
            query = sa.select(table.c.held_until, table.c.next_turn_at).where(*where)
            row = conn.execute(query.with_for_update() if locked else query).mappings().first()
        else:  # made if missing, locked either way: two workers waking at once must not both go first
            row = _locked_row(conn, table, key, now)
        if row is None:
            return None
        held_until, next_turn = as_utc(row["held_until"]), as_utc_or_none(row["next_turn_at"])
        if now >= held_until:
            if turn is not None and turn >= held_until:  # its own turn of this release
                return None if turn <= now else turn
            if (next_turn is None or next_turn <= now) and wake_spacing is None:  # no release going on: it goes
                return None
    if wake_spacing is not None and now >= held_until:
        spacing = wake_spacing
    mine = max(held_until, now) if next_turn is None else max(held_until, next_turn, now)
    conn.execute(table.update().where(*where).values(next_turn_at=mine + spacing))
    return None if mine <= now else mine  # a message waking first goes now, and the next one a spacing later


def release_turn(
    conn: sa.Connection,
    merchant_id: str,
    channel: Channel,
    now: datetime,
    turn: datetime | None,
    spacing: timedelta,
    wake_spacing: timedelta | None = None,
) -> datetime | None:
    """``_release_turn`` of ``merchant_id``'s sender on ``channel``: its held messages go ``spacing`` apart, and
    those waking with the end of quiet hours (``wake_spacing`` given) ``wake_spacing`` apart."""
    key = {"merchant_id": merchant_id, "channel": channel.value}
    return _release_turn(conn, channel_pacing, key, now, turn, spacing, wake_spacing)


def pair_turn(
    conn: sa.Connection,
    merchant_id: str,
    channel: Channel,
    address_sha256: str,
    now: datetime,
    turn: datetime | None,
    *,
    call_bound: timedelta,
) -> datetime | None:
    """When a WhatsApp message to the customer at ``address_sha256`` on ``merchant_id``'s ``channel`` may go, as
    ``_release_turn`` says, for every message and not only after a pair rate limit: Meta refuses a second message
    to one customer within 6 seconds (131056), so each message takes a turn of the customer's row, under its lock
    (made if missing: two workers sending to one customer never both go), one every 6 seconds, the first at once.

    ``turn``: the turn the message was given before. It goes at it, or within 6 seconds after it (a worker claims it
    a moment late); a turn older than that (a message retried, or kept waiting by another check, long after) or
    from before the customer's hold ended is spent, and the message takes a new one. Whatever its turn, a message
    goes no sooner than 6 seconds after the customer's last one went (``last_sent_at``): the turns are planned 6
    seconds apart, but one that went a few seconds late had the next already planned less than 6 seconds after it,
    and that one now waits the rest (its new turn, kept on it). The next free turn is never less than 6 seconds
    after the message that goes, however late it goes. Normal traffic (a customer messaged once in a while) pays
    three writes of this row, no wait: only that customer's sends and receipts take the row's lock.

    The 6 seconds hold between the provider's receipts of the messages, not between their marks: a message that
    goes is marked here, and its call may reach the provider any time until it is answered. So the message that
    goes sets ``last_sent_at`` to ``now + call_bound`` (the longest its call may take: the claim it is sent
    under), and ``pair_answered`` brings it back to the moment its answer came. Before, ``last_sent_at`` was the
    mark: a call 4 seconds slow reached the provider 2 seconds before the next message, sent at its turn. A message
    that asks while another is still out waits for that bound; one asking after the answer, 6 seconds from it."""
    key = {"merchant_id": merchant_id, "channel": channel.value, "address_sha256": address_sha256}
    row = _locked_row(conn, customer_pacing, key, now)
    held_until, next_turn = as_utc(row["held_until"]), as_utc_or_none(row["next_turn_at"])
    last_sent = as_utc_or_none(row["last_sent_at"])
    if turn is not None and turn >= held_until and turn > now:  # its turn, still to come
        return turn
    if turn is not None and turn >= held_until and now - turn < PAIR_RATE_INTERVAL:  # its turn
        mine = now
    else:
        mine = max(held_until, now) if next_turn is None else max(held_until, next_turn, now)
    if last_sent is not None:
        mine = max(mine, last_sent + PAIR_RATE_INTERVAL)
    free = mine + PAIR_RATE_INTERVAL if next_turn is None else max(next_turn, mine + PAIR_RATE_INTERVAL)
    goes = mine <= now
    if free != next_turn or goes:
        sent = {"last_sent_at": now + call_bound} if goes else {}
        conn.execute(customer_pacing.update().where(*_where(customer_pacing, key)).values(next_turn_at=free, **sent))
    return None if goes else mine


def pair_answered(
    conn: sa.Connection,
    merchant_id: str,
    channel: Channel,
    address_sha256: str,
    *,
    marked_bound: datetime,
    answered_at: datetime,
) -> bool:
    """The provider answered the WhatsApp message that ``pair_turn`` let go with ``last_sent_at`` set to
    ``marked_bound``: it reached the provider by ``answered_at`` at the latest, and the customer's next message goes
    6 seconds after that (``pair_turn``), not after the bound. Whether the row was still this message's: a message
    that went after it (its bound was over, its worker presumed gone) keeps its own bound. Any answer counts, a
    refusal too: a refused call may still have reached Meta through the provider."""
    key = {"merchant_id": merchant_id, "channel": channel.value, "address_sha256": address_sha256}
    where = [*_where(customer_pacing, key), customer_pacing.c.last_sent_at == marked_bound]
    return conn.execute(customer_pacing.update().where(*where).values(last_sent_at=answered_at)).rowcount == 1


def forget_idle_customers(
    conn: sa.Connection, now: datetime, max_hold: timedelta, merchant_id: str | None = None
) -> int:
    """Delete the customers' pacing rows (of ``merchant_id``, else of every merchant) whose last hold and turn
    ended more than ``max_hold`` before ``now``: their next message goes at once anyway, and a next pair rate limit
    would start over (``note_pair_rate_limited``); how many. Every WhatsApp message makes its customer's row
    (``pair_turn``): the worker's clean-up keeps the table to the customers messaged recently.

    Both ends are compared: a hold is not always before the turns (a 131056 receipt may come well after the send it
    is about), and a row whose hold is still on is kept. A row made by a receipt alone has no turn. The index on
    ``next_turn_at`` (migration 0018) finds the rows whose turns are over without reading the others."""
    cutoff = now - max_hold
    turn = customer_pacing.c.next_turn_at
    where = [sa.or_(turn < cutoff, turn.is_(None)), customer_pacing.c.held_until < cutoff]
    if merchant_id is not None:
        where.append(customer_pacing.c.merchant_id == merchant_id)
    return int(conn.execute(customer_pacing.delete().where(*where)).rowcount)
