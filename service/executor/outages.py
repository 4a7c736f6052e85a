"""Messaging channels whose provider is down, per merchant: a circuit breaker kept in the database.

A provider that certainly did not take a message (HTTP 408, 425, 429, 501, 502, 503, or no connection:
``SendResult.not_taken``) starts a refusal streak on its merchant's channel; a message it takes ends it. Once the
streak has lasted ``down_after`` the channel is *down* until a hold ends: messages planned on it are not tried
(nor counted against the customer: none was sent), and the order is decided again without the channel, so the
customer is reached on another one. When no other action is worth taking, the message waits for the channel
instead of the order failing (``Executor._decision_point``). After the hold, one message on the channel is the
probe (``claim_probe``), and the others wait for its answer: taken, the channel is up again; refused, it is down
again for twice as long, up to ``max_hold``. Before, every message waiting for the channel was tried at the hold's
end, by every worker: a herd on a provider that may still be down.

A streak whose last refusal is older than ``down_after`` (and not in the probe window after a hold) starts over:
two refusals days apart are not an outage.

A refusal saying the merchant's sender is banned until an admin acts (``SendResult.sender_banned``: Exchange
Online's 5.7.708, say) puts the channel down at once, without waiting out ``down_after``: every message of the
merchant would be refused alike, and each was recorded as refused and counted against its customer's
``max_nudges``. The hold and its probe then find out when the admin has acted. Each ban is logged as an error and
counted in ``sender_holds`` (``held_for`` ``ban``; /metrics: ``winback_executor_sender_bans_total``).

An answer saying the merchant's SMTP *set-up* is wrong (``SendResult.sender_blocked`` ``setup``: its credentials
refused, Google's relay not knowing its IP or domain, SES's sender not verified, its relay refusing to relay for it,
Exchange Online refusing its login to send as its From address) takes the same path: every message would be
refused alike until an admin fixes the merchant's settings, and each was recorded as refused and counted against its
customer, customer after customer. Its own label: ``held_for`` ``setup``, /metrics
``winback_executor_sender_setup_refusals_total``, and an ERROR line per hold saying an admin must fix the merchant's
settings, naming the answer.

A ban answered at RCPT TO (``SendResult.rcpt_domain``) may be the recipient's provider's, not the relay's: a
relay that passes RCPT through answers there for the recipient's mail server, and Microsoft 365 refusing the
merchant's IP refuses only the recipients it hosts. Taken as the merchant's ban at once, it put every recipient's
e-mail down, the probe after the hold (to another domain) brought it back, and the next such recipient put it down
again. Now it is the merchant's ban only once recipients of two domains have been refused so within one refusal
streak, that is with no message of the channel taken in between (a taken message disproves a ban of the sender);
until then it is one more refusal of its message, tried again later as any not taken. Each domain seen in the
streak is kept in ``sender_holds`` (``held_for`` ``rcpt:`` and a hash of the domain), forgotten once the streak ends;
the first refusal of each domain in a streak, while no other domain confirms it, is logged as a WARNING naming the
domain (not the address) and saying e-mail stays up meanwhile. A set-up answer at RCPT TO is counted the same way,
Postfix's default ``454 4.7.1 Relay access denied`` among them: a 4xx, yet a relay refusing to relay for the merchant
refuses every recipient until an admin acts (tried again message after message, it waited 15 minutes for the
breaker and then was held and probed as a provider's outage, nothing saying an admin must act).
Microsoft hosts many domains: two of its recipients in a row are taken as a ban; a message to any other domain taken
after the hold ends it, as before.

The state is per merchant and channel because each merchant has its own provider account (credentials, sender,
rate limit). All workers share it through the database; it is read and written inside the transaction that records
the message's answer, under the row's lock.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from model.merchant_config import MerchantConfig
from model.vocab import Channel
from model.wording import utc_second
from service.executor.channels.base import SenderBlock
from service.executor.store import (
    as_utc,
    as_utc_or_none,
    channel_outages,
    count_sender_hold,
    sender_holds,
    upsert_into,
)

log = logging.getLogger("winback.executor")


def _key(merchant_id: str, channel: Channel) -> tuple[sa.ColumnElement[bool], sa.ColumnElement[bool]]:
    return channel_outages.c.merchant_id == merchant_id, channel_outages.c.channel == channel.value


def _locked_row(conn: sa.Connection, merchant_id: str, channel: Channel, now: datetime) -> sa.RowMapping:
    """The channel's streak row, a fresh one unless one exists, locked until the transaction ends: one upsert, so a
    row another worker deletes meanwhile (``note_accepted``) cannot leave nothing to read, as an insert that did
    nothing followed by a select could (review of c65ddd9: NoResultFound on PostgreSQL)."""
    values = {"merchant_id": merchant_id, "channel": channel.value, "refused_since": now, "last_refused_at": now}
    insert = upsert_into(conn, channel_outages).values(**values)
    upsert = insert.on_conflict_do_update(
        index_elements=[channel_outages.c.merchant_id, channel_outages.c.channel],
        set_={"channel": insert.excluded.channel},  # a no-op that locks the row and returns it
    ).returning(*channel_outages.c)
    return conn.execute(upsert).mappings().one()


def note_refusal(
    conn: sa.Connection,
    merchant_id: str,
    channel: Channel,
    now: datetime,
    *,
    down_after: timedelta,
    first_hold: timedelta,
    max_hold: timedelta,
    retry_after: timedelta | None = None,
    blocked: Blocked | None = None,
) -> datetime | None:
    """Record that ``channel``'s provider certainly did not take a message at ``now``; the end of the channel's
    hold when it is down (found so now, or already), else None. ``blocked``: the provider said the merchant's sender
    refuses every message until an admin acts: the channel is down at once, unless it was answered at RCPT TO
    (``Blocked.rcpt_domain``) and that domain is the only one refused so in this streak.

    The hold is ``first_hold``, doubled each time the channel is found down again in the same streak, at most
    ``max_hold``, and never shorter than the provider's ``Retry-After`` (itself at most ``max_hold``)."""
    row = _locked_row(conn, merchant_id, channel, now)
    since, last = as_utc(row["refused_since"]), as_utc(row["last_refused_at"])
    down_until = as_utc_or_none(row["down_until"])
    times_down = int(row["times_down"])
    values: dict[str, object] = {"last_refused_at": now}
    if down_until is not None and now < down_until:  # a message that was on its way when the channel went down
        until: datetime | None = down_until
    else:
        probing = down_until is not None and now < down_until + down_after
        if not probing and now - last > down_after:  # the last refusal was long ago: a new streak, not an outage
            since, times_down = now, 0
        values |= {"refused_since": since, "times_down": times_down, "down_until": None}
        until = None
        if (
            blocked is not None
            and blocked.rcpt_domain is not None
            and not _blocked_for_another_domain(conn, merchant_id, channel, blocked, since, now)
        ):
            blocked = None  # maybe that domain's provider only: one more refusal of this message
        if blocked is not None or now - since >= down_after:
            hold = min(first_hold * (1 << min(times_down, 16)), max_hold)
            if retry_after is not None:
                hold = max(hold, min(retry_after, max_hold))
            until = now + hold
            values |= {"down_until": until, "times_down": times_down + 1, "probe_until": None}
            if blocked is not None:
                _note_blocked(conn, merchant_id, channel, blocked, until, now, again=probing)
            else:
                log.warning(
                    "channel %s of merchant %s is down until %s: its provider has refused every message since %s",
                    channel.value, merchant_id, utc_second(until), utc_second(since),
                    extra={"merchant_id": merchant_id, "channel": channel.value},
                )  # fmt: skip
    conn.execute(channel_outages.update().where(*_key(merchant_id, channel)).values(**values))
    return until


@dataclass(frozen=True)
class Blocked:
    """A provider's answer that the merchant's sender refuses every message until an admin acts."""

    #: Why: banned, or set up wrong (``SendResult.sender_blocked``); also its ``sender_holds.held_for``.
    why: SenderBlock
    #: The provider's answer, for the log.
    answer: str
    #: The domain of the recipient it refused at RCPT TO, if answered there (``SendResult.rcpt_domain``).
    rcpt_domain: str | None = None


#: ``sender_holds.held_for`` of a ban of the merchant's sender, and of its set-up found wrong.
BAN: SenderBlock = "ban"
SETUP: SenderBlock = "setup"


def _note_blocked(
    conn: sa.Connection,
    merchant_id: str,
    channel: Channel,
    blocked: Blocked,
    until: datetime,
    now: datetime,
    *,
    again: bool,
) -> None:
    """Log a block of the merchant's sender (``blocked.why``) that put ``channel`` down until ``until``, saying who
    must act and naming the answer, and count it in ``sender_holds`` unless ``again`` (the probe after a hold
    refused: the same block, not fixed yet)."""
    if blocked.why == BAN:
        what = (
            f"{'still bans' if again else 'banned'} the merchant's sender ({blocked.answer}); an admin of the "
            "merchant's account must act"
        )
    else:
        what = (
            f"{'still refuses' if again else 'refused'} every message as the merchant's {channel.value} set-up is "
            f"wrong ({blocked.answer}); an admin must fix the merchant's {channel.value} settings"
        )
    log.error(
        "channel %s of merchant %s is down until %s: its provider %s, then a probe after the hold finds it up again",
        channel.value, merchant_id, utc_second(until), what,
        extra={"merchant_id": merchant_id, "channel": channel.value},
    )  # fmt: skip
    if not again:
        count_sender_hold(conn, merchant_id, channel.value, blocked.why, until, now)


#: ``sender_holds.held_for`` of a recipient domain refused at RCPT TO with a block in the current refusal streak:
#: this and the first 11 hex digits of the domain's SHA-256 (the column holds 16 characters).
RCPT_BAN_PREFIX = "rcpt:"


def _blocked_for_another_domain(
    conn: sa.Connection, merchant_id: str, channel: Channel, blocked: Blocked, since: datetime, now: datetime
) -> bool:
    """Note that a recipient of ``blocked.rcpt_domain`` was refused at RCPT TO with a block of the merchant's sender
    at ``now``, in the refusal streak that began at ``since``; whether a recipient of another domain was refused so
    in the same streak. The domains of earlier streaks are deleted: a message taken since (or a long quiet spell)
    disproves them. The first refusal of a domain in the streak not confirmed by another is logged as a WARNING:
    before, it left only the action's ``last_error``. Called under the streak row's lock (``_locked_row``), so two
    workers' answers are seen in turn."""
    domain = blocked.rcpt_domain or ""
    seen = sa.and_(
        sender_holds.c.merchant_id == merchant_id,
        sender_holds.c.channel == channel.value,
        sender_holds.c.held_for.startswith(RCPT_BAN_PREFIX),
    )
    conn.execute(sender_holds.delete().where(seen, sender_holds.c.last_held_at < since))
    key = RCPT_BAN_PREFIX + hashlib.sha256(domain.encode()).hexdigest()[: 16 - len(RCPT_BAN_PREFIX)]
    domains = set(conn.scalars(sa.select(sender_holds.c.held_for).where(seen)))
    count_sender_hold(conn, merchant_id, channel.value, key, now, now)
    others = bool(domains - {key})
    if not others and key not in domains:
        log.warning(
            "channel %s of merchant %s: its provider refused a recipient at %s at RCPT TO saying the merchant's "
            "sender is %s (%s); maybe that domain's provider's only: %s stays up until a recipient of another "
            "domain is refused alike with none taken in between",
            channel.value, merchant_id, domain, "banned" if blocked.why == BAN else "set up wrong", blocked.answer,
            channel.value, extra={"merchant_id": merchant_id, "channel": channel.value},
        )  # fmt: skip
    return others


def sender_blocks_counted(conn: sa.Connection, why: SenderBlock) -> dict[tuple[str, str], int]:
    """How many blocks of each merchant's sender for ``why`` (``ban``, ``setup``) on each channel were found ever, by
    (merchant, channel), as /metrics reads them (``sender_holds``, ``held_for`` ``why``)."""
    rows = conn.execute(
        sa.select(sender_holds.c.merchant_id, sender_holds.c.channel, sender_holds.c.holds).where(
            sender_holds.c.held_for == why
        )
    )
    return {(row.merchant_id, row.channel): int(row.holds) for row in rows}


def claim_probe(
    conn: sa.Connection, merchant_id: str, channel: Channel, now: datetime, lease: timedelta
) -> datetime | None:
    """None when a message may go on ``channel`` now: no hold of it has ended without an answer since, or this
    message is now the probe, holding the channel until ``now + lease``. Else when the current probe's claim ends:
    the message waits for the probe's answer (taken, the streak row is gone; refused, a new hold has begun). A
    probe whose worker died frees the channel when its claim ends."""
    after_hold = sa.and_(
        *_key(merchant_id, channel), channel_outages.c.down_until.is_not(None), channel_outages.c.down_until <= now
    )
    probe = sa.select(channel_outages.c.probe_until).where(after_hold)
    # Read first: with no outage of the channel (nearly every send) this is the only statement.
    found = conn.execute(probe).first()
    if found is None:
        return None
    probing_until = as_utc_or_none(found.probe_until)
    if probing_until is not None and probing_until > now:
        return probing_until
    free = sa.or_(channel_outages.c.probe_until.is_(None), channel_outages.c.probe_until <= now)
    if conn.execute(channel_outages.update().where(after_hold, free).values(probe_until=now + lease)).rowcount:
        return None
    return as_utc_or_none(conn.scalar(probe))  # another worker's message became the probe meanwhile


def note_accepted(conn: sa.Connection, merchant_id: str, channel: Channel) -> None:
    """``channel``'s provider took a message: its refusal streak, and any hold, end."""
    ended = conn.execute(
        channel_outages.delete().where(*_key(merchant_id, channel)).returning(channel_outages.c.times_down)
    ).scalar()
    if ended:
        log.warning(
            "channel %s of merchant %s is up again: its provider took a message",
            channel.value, merchant_id, extra={"merchant_id": merchant_id, "channel": channel.value},
        )  # fmt: skip


def channels_down(conn: sa.Connection, merchant_id: str, now: datetime) -> dict[Channel, datetime]:
    """The merchant's channels that are down at ``now``, with the end of each one's hold."""
    return down_of(conn.execute(down_select(merchant_id, now)))


def down_of(rows: Iterable[sa.Row[Any]]) -> dict[Channel, datetime]:
    """The channels down, with the end of each one's hold, of ``down_select``'s rows."""
    return {Channel(row.channel): as_utc(row.until) for row in rows if row.channel in _CHANNEL_NAMES}


def down_select(merchant_id: str, now: datetime, channel: Channel | None = None) -> sa.Select[tuple[str, datetime]]:
    """The statement reading ``channels_down``'s rows (``channel``, ``until``): ``channel``'s only when given."""
    where = [channel_outages.c.merchant_id == merchant_id, channel_outages.c.down_until > now]
    if channel is not None:
        where.append(channel_outages.c.channel == channel.value)
    return sa.select(channel_outages.c.channel, channel_outages.c.down_until.label("until")).where(*where)


_CHANNEL_NAMES = frozenset(channel.value for channel in Channel)


def without_channels(merchant: MerchantConfig, channels: Collection[Channel]) -> MerchantConfig:
    """``merchant``'s config with ``channels`` taken out of its retarget channels (for one decision)."""
    kept = [channel for channel in merchant.retarget.channels if channel not in channels]
    return merchant.model_copy(update={"retarget": merchant.retarget.model_copy(update={"channels": kept})})


def down_entry(channel: Channel) -> str:
    """The ``rules_applied`` entry of a decision made while ``channel`` was down."""
    return f"channel_down:{channel.value}"


def down_note(down: Mapping[Channel, datetime]) -> list[str]:
    """The ``rules_applied`` entries of a decision made while ``down`` channels were left out."""
    return [down_entry(channel) for channel in sorted(down, key=lambda channel: channel.value)]
