"""The order state machine: every write the executor makes, each in one short transaction.

An order is ``PENDING`` while recovery runs (``AWAITING_AGENT`` in assisted mode while an agent decides), and
ends ``SUCCEEDED`` or ``FAILED`` exactly once (a guarded update), which cancels whatever is still scheduled for
it and enqueues the one merchant webhook. At every decision point (the failure event, a failed attempt, an
unanswered nudge) the executor rebuilds the order's decision request from what it recorded and asks the one
policy, ``decide()``, through ``Decider``; it never decides on its own. Side effects are performed outside
these transactions (see ``service.executor.effects``) and recorded by ``complete`` in the transaction that
marks their action done, guarded by the claim token, so an effect is recorded once however often it was sent.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Final, Literal, TypeVar

import orjson
import sqlalchemy as sa
from sqlalchemy import RowMapping
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from model.catalog import ErrorCatalog, load_catalog
from model.merchant_config import MerchantConfig, ProviderConfig, WinbackConfig
from model.money import format_money
from model.personal_data import mask_addresses_in
from model.requests import Decision, DecisionRequest, Failure
from model.rules import (
    CARD_REATTEMPTS_FIELD,
    LASTING_RETRY_BANS,
    Candidate,
    RuleContext,
    build_context,
    check,
    lasting_bans,
    load_rulebook,
)
from model.vocab import NOT_SILENT_RETRY_STRATEGIES, NUDGE_FOLLOW_UP_HOURS, Action, Channel, Strategy
from model.wording import span_words, utc_second
from service.api.store import decision_row, decisions
from service.executor.by_hand import (
    PAID_TWICE_CASE,
    REFUND_CASE,
    SILENT_NOT_CHARGED_CASE,
    CaseDone,
    Marked,
    done_of,
    note_case,
)
from service.executor.channels.base import ReceiptFailure, SenderBlock, SenderLimit
from service.executor.connectors import ChargeResult
from service.executor.links import LinkClaims, LinkError, LinkSigner, tampered
from service.executor.optouts import (
    address_hash,
    customer_address,
    opted_out_channels,
    order_customer_address,
    record_opt_out,
    with_opt_outs,
)
from service.executor.outages import (
    Blocked,
    down_entry,
    down_note,
    note_accepted,
    note_refusal,
    without_channels,
)
from service.executor.pacing import (
    channels_out,
    forget_idle_customers,
    note_pair_rate_limited,
    note_rate_limited,
    senders_over_quota,
)
from service.executor.store import (
    OPEN_ACTION_STATES,
    OPEN_ORDER_STATES,
    ActionKind,
    ActionState,
    OrderState,
    actions,
    agent_queue,
    as_utc,
    as_utc_or_none,
    cases_by_hand,
    early_receipts,
    event_keys,
    is_postgres,
    nudges,
    orders,
    payment_links,
    transactions,
    upsert_into,
    utcnow,
    webhook_deliveries,
)

log = logging.getLogger("winback.executor")
#: The actions that charge the customer through a connector.
CHARGE_KINDS: Final = (ActionKind.RETRY, ActionKind.LINK_PAYMENT)
#: CHARGE_KINDS as stored (``actions.kind``), for rows read from the database.
CHARGE_KIND_VALUES: Final = frozenset(kind.value for kind in CHARGE_KINDS)
#: An action of CHARGE_KINDS: the one predicate of every query about charges.
IS_CHARGE: Final = actions.c.kind.in_(sorted(CHARGE_KIND_VALUES))
#: How soon a stop waiting for a charge whose lease has already ended looks again.
RECHECK: Final = timedelta(seconds=5)
#: How often a stop waiting for an operator's answer about a charge of unknown outcome looks again (and asks the
#: charge's switch again what became of it, when the last status check got no answer).
UNKNOWN_RECHECK: Final = timedelta(hours=1)
#: How long after a charge is dead-lettered unanswered its switch is first asked what became of it: a request that
#: timed out on the way may still be being processed.
STATUS_CHECK_DELAY: Final = timedelta(minutes=1)
#: How long after its switch first answers "not found" for a charge sent and never answered (the check's own, or one
#: still planned when an operator answered "not charged") the switch is asked once more: a send that timed out on
#: our side may still be on its way. Linux retransmits a connection's unacknowledged data for about a quarter of an
#: hour (``tcp_retries2``'s default of 15 gives 924.6 s, ~15.4 min; ``tcp_orphan_retries`` bounds it alike, and
#: usually sooner, once we closed the connection), and the switch then makes its own call to the processor. Twice
#: that window, counted from the answer, itself at least STATUS_CHECK_DELAY after the last send (data/README.md,
#: "Payment switch calls").
NOT_FOUND_RECHECK_DELAY: Final = timedelta(minutes=30)
#: A charge action's payload key: when it was sent (ISO time), kept as an operator or its switch takes it as never
#: charged (its 'sent' mark goes then): a success the switch reports later is the attempt made at that time.
TAKEN_AS_NOT_CHARGED = "taken_as_not_charged_sent_at"
#: What a charge dispute says of a switch that did not find the payment at its status check, nor at the one more ask.
NOT_FOUND_TWICE = "not found (asked twice)"
#: A status check's payload key: it is the one more ask after "not found" (NOT_FOUND_RECHECK_DELAY), whose own "not
#: found" is final.
AFTER_NOT_FOUND = "after_not_found"
#: A charge action's payload key: when its switch first answered "not found" for it and it was sent again as the
#: same charge (same idempotency key, payment id and body: ``_send_again_after_not_found``), once.
SENT_AGAIN_AFTER_NOT_FOUND = "sent_again_after_not_found_at"
#: A charge action's payload key: when an operator answered that it charged (``resolve-charge --charged``, or an
#: agent in the console). A status check still planned then asks all the same, and a switch that says otherwise
#: ("declined", or "not found" twice) is flagged on that check (SWITCH_CONTRADICTS): the merchant had its
#: ``order.succeeded`` on the operator's word, and a webhook cannot be taken back.
CHARGED_BY_OPERATOR = "charged_by_operator_at"
#: A status check's payload key: the switch contradicted an operator's "charged" (what it said, when). The order
#: keeps its state; the order view, the console and ``winback executor charge-disputes`` show it.
SWITCH_CONTRADICTS = "switch_contradicts_operator"
#: A charge action's payload key: an operator answered "charged" for it on an order its merchant had reported paid by
#: this very payment already (``payment-succeeded`` naming it: ``_names_charge``); a switch that says otherwise
#: contradicts them both (``_flag_dispute``).
REPORTED_PAID_BY_MERCHANT = "reported_paid_by_merchant"
#: The key, in a dispute's flag (SWITCH_CONTRADICTS), of its resolution: who marked it as dealt with, when, and the
#: note saying what was done (``resolve_charge_disputes``).
DISPUTE_RESOLVED = "resolved"
#: A charge action's payload key: the order it settled (a success of winback's retry or link payment) was then
#: reported paid by its merchant's ``payment-succeeded`` naming a payment of the merchant's own (a txn_id that names
#: no charge of winback's): the customer may have paid twice. A dict of the merchant's txn ids, each with when it was
#: reported (one entry per txn id: the same report twice is noted once). Nothing is refunded on it; ``paid_twice``
#: (``winback executor refunds-by-hand``, /metrics) lists it for an operator.
MERCHANT_PAID_TOO = "merchant_paid_too"
#: The longest note a dispute's resolution takes (as an agent's reason in the console).
MAX_DISPUTE_NOTE_LENGTH = 1000
#: Who answers for a charge in ``resolve-charge`` (and the console's answer, which goes through it).
OPERATOR = "an operator"
#: How long the refund of a duplicate charge recorded as charged on an operator's word alone waits for its switch to
#: confirm the charge (``refund_held``) before it goes to an operator to refund by hand (REFUND_BY_HAND): a day. By
#: then the charge's status check has gone unanswered about 24 times, an hour apart (UNKNOWN_RECHECK): an outage, not
#: a blip a retry waits out, while the customer's statement shows the second payment. RBI gives a card payment
#: debited without the merchant's confirmation five days (T+5) to be reversed, at 100 rupees a day after (circular
#: DPSS.CO.PD No.629/02.01.014/2019-20, data/README.md): a day's wait leaves an operator four to refund by hand.
REFUND_WAIT_FOR_SWITCH: Final = timedelta(days=1)
#: How long a charge's status check is asked again (hourly: UNKNOWN_RECHECK) while its switch answers none of its
#: asks, counted from when the check was planned: REFUND_WAIT_FOR_SWITCH, for the same reason (about 24 unanswered
#: asks is an outage, and RBI's T+5 for a card or UPI payment to a merchant debited without the merchant's
#: confirmation leaves an operator four days of it: data/README.md). Then it is asked no more (``_stop_asking``): it
#: was asked hourly for ever.
SWITCH_SILENCE_LIMIT: Final = REFUND_WAIT_FOR_SWITCH
#: A status check's payload key: its switch answered none of its asks for SWITCH_SILENCE_LIMIT, and it is asked no
#: more: when, and what the charge was then (one of CHARGES_ASKED_NO_MORE, a bounded label for /metrics).
SWITCH_SILENT = "asked_no_more"
#: What a charge whose status check is asked no more was: still unknown (an operator's resolve-charge), charged on
#: an operator's word, taken as never charged, or none of those (answered otherwise meanwhile).
CHARGES_ASKED_NO_MORE: Final = ("unknown", "charged_by_operator", "taken_as_not_charged", "other")
#: A refund action's payload key: it was dead-lettered for an operator to refund by hand (``_hand_refund_over``):
#: when, and why (one of REFUND_BY_HAND_REASONS, a bounded label for /metrics).
REFUND_BY_HAND = "refund_by_hand"
#: Why a refund went to an operator: its switch never answered the charge's status checks within
#: REFUND_WAIT_FOR_SWITCH (the refund was never sent); the refund was sent and never answered within its tries; or the
#: switch refused it (or cannot refund).
REFUND_SWITCH_SILENT = "switch_silent"
REFUND_NO_ANSWER = "no_answer"
REFUND_REFUSED = "refused"
REFUND_BY_HAND_REASONS: Final = (REFUND_SWITCH_SILENT, REFUND_NO_ANSWER, REFUND_REFUSED)
#: Why a refund went to an operator (REFUND_BY_HAND_REASONS), in a person's words: the console's card and
#: ``winback executor refunds-by-hand`` write these, never the labels.
_REFUND_WHY: Final = {
    REFUND_SWITCH_SILENT: "its switch answered no status check of the charge",
    REFUND_NO_ANSWER: "it was sent and never answered",
    REFUND_REFUSED: "its switch refused it, or cannot refund",
}
#: The actions that ask or give back through a connector after a charge: they run on settled orders too, and
#: settling an order does not cancel them (a duplicate charge is what they are there to find and give back).
SWITCH_FOLLOW_UPS: Final = (ActionKind.CHARGE_STATUS, ActionKind.REFUND)


def _maybe_with_connector() -> sa.ColumnElement[bool]:
    """A charge action that may be with its connector: claimed now (about to be sent, or sent), or sent before
    and not answered (its re-send is due)."""
    return sa.and_(
        IS_CHARGE,
        sa.or_(actions.c.state == ActionState.CLAIMED.value, actions.c.unanswered_since.is_not(None)),
    )


#: Why an action a new decision replaced was cancelled (``Executor._carry_out``).
REPLACED = "replaced by a later decision"


def _replaceable() -> sa.ColumnElement[bool]:
    """A scheduled action a new decision for its order replaces: a charge never sent (one sent before and not
    answered may be with its connector: its re-send asks the switch), a message never tried, or a message's
    follow-up. A message tried before came back with an answer that leaves it to be tried again (a timeout, a
    provider busy): it may be with the provider, and is re-sent under its own idempotency key, which the provider
    drops as a repeat; cancelled, the customer got it and the next one on the same day (review). Claimed actions
    are ``_carry_out``'s: a retry not sent yet and a message's first try not handed over yet are replaced; one being
    sent is recorded when its answer comes (``Effects._mark_message_sending`` holds back a second message)."""
    return sa.or_(
        sa.and_(IS_CHARGE, actions.c.unanswered_since.is_(None)),
        sa.and_(actions.c.kind == ActionKind.NUDGE.value, actions.c.attempts == 0),
        actions.c.kind == ActionKind.FOLLOW_UP.value,
    )


def _answer_recorded(conn: sa.Connection, action: ActionRow) -> None:
    """Clear the action's 'sent, not answered' mark (``unanswered_since``) as its answer is recorded: a charge's,
    and a message's, which the provider accepted and which kept its 'being sent' mark until now (Effects._nudge)."""
    conn.execute(actions.update().where(actions.c.action_id == action.action_id).values(unanswered_since=None))


#: ``decide()`` bound to a scorer and catalog: the executor's only way to choose what to do.
Decider = Callable[[DecisionRequest, MerchantConfig], Decision]


def _attempt_status(stored: str) -> str:
    """A stored attempt's status as a request carries it: ``success`` or ``failure``. Rows written before requests
    were held to that pair may hold what a caller sent (``"FAILURE "``, ``"failed"``); anything but a success was
    a failure to the model then, and stays one."""
    return "success" if stored.strip().lower() == "success" else "failure"


def _count_own_reattempts(base: dict[str, Any], rows: Sequence[sa.Row[Any]], now: datetime) -> None:
    """Add to the caller's ``card_reattempts_30d`` (the card's silent re-attempts over all its orders, as of the
    failure event) the silent retries this executor made on the order since, within the Visa window.

    The rules take the larger of that figure and the order's own history (the figure already counts the history
    the event carried), so the executor's own retries, made after the event, would never be added to it: a card
    reported at 19 re-attempts (of Visa's 20) got a 20th, 21st and 22nd. The rows of the event's history carry no
    idempotency key; those of the executor's charges do."""
    reported = base.get(CARD_REATTEMPTS_FIELD)
    if isinstance(reported, bool) or not isinstance(reported, int) or reported < 0:
        return  # absent (the history alone counts), or malformed: the rules name the field
    since = now - load_rulebook().visa_window
    own = sum(
        1
        for row in rows
        if row.idempotency_key is not None
        and row.strategy not in NOT_SILENT_RETRY_STRATEGIES
        and as_utc(row.created_at) >= since
    )
    base[CARD_REATTEMPTS_FIELD] = reported + own


class IdempotencyConflictError(ValueError):
    """The idempotency key was used before with a different body."""


class TxnIdTakenError(ValueError):
    """A failure event's history names a txn_id another order of the same merchant already has (a merchant's
    txn_ids are unique across its history: CONTRACT.md section 3; another merchant's never count)."""


class OrderNotFoundError(LookupError):
    """No such order for this merchant."""


class StaleClaimError(RuntimeError):
    """The action is no longer this worker's (its lease ran out and someone else took it, or it was cancelled)."""


class ChargeResolutionError(ValueError):
    """An operator's answer names an action that is not a charge waiting for its answer."""


class DisputeResolutionError(ValueError):
    """A charge dispute cannot be marked as dealt with: no note, a note too long, no such dispute, or it changed
    meanwhile. Nothing written. (One dealt with already is no error: ``Marked.before``, nothing changed.)"""


class AgentQueueError(ValueError):
    """The agent's action cannot be applied (nothing queued, or an unknown action)."""


# ------------------------------------------------------------------------------------------------ outcomes


@dataclass(frozen=True)
class Charged:
    """A connector answered the attempt."""

    result: ChargeResult


@dataclass(frozen=True)
class Sent:
    """A provider accepted the nudge (its link is recorded with it)."""

    nudge_id: str
    channel: str
    template_id: str
    provider_message_id: str | None
    token_id: str
    expires_at: datetime


@dataclass(frozen=True)
class NotSent:
    """A provider refused the nudge for good (or there is no address or adapter for the channel)."""

    nudge_id: str
    channel: str
    template_id: str
    error: str


@dataclass(frozen=True)
class Delivered:
    """The merchant acknowledged the webhook with a 2xx."""

    status_code: int


@dataclass(frozen=True)
class StatusAnswered:
    """The switch said what became of a charge sent and never answered: its answer, or None when no charge under
    its payment id ever reached the switch."""

    result: ChargeResult | None


@dataclass(frozen=True)
class Refunded:
    """The switch took the refund of a duplicate charge: ``succeeded``, or ``pending`` (the money goes back later)."""

    status: str
    refund_id: str | None


@dataclass(frozen=True)
class Transient:
    """No answer this time (5xx, timeout, open circuit): try again later with the same idempotency key.

    ``not_taken``: a message's provider certainly did not take it (it answered 429 or 503, say, or could not be
    reached: ``SendResult.not_taken``); ``retry_after``: how long the provider asked us to wait (its
    ``Retry-After``); ``sender_limited``: it refused the message because the merchant's sender is over its rate or
    daily quota (``SendResult.sender_limited``): the sender is held, and the message with it; ``sender_blocked``:
    it refused the message because the merchant's sender refuses every message until an admin acts, banned or set up
    wrong (``SendResult.sender_blocked``, with ``not_taken``): the channel is down for the merchant at once, or,
    answered at RCPT TO for a recipient of ``rcpt_domain``, once another domain's recipient is refused alike
    (``SendResult.rcpt_domain``)."""

    error: str
    status_code: int | None = None
    not_taken: bool = False
    retry_after: timedelta | None = None
    sender_limited: SenderLimit | None = None
    sender_blocked: SenderBlock | None = None
    rcpt_domain: str | None = None


@dataclass(frozen=True)
class Permanent:
    """The effect can never be performed as configured: dead-letter it.

    ``nothing_charged``: a charge that certainly charged nothing (its connector is not configured, or the switch
    refused it outright); ``refund_by_hand``: for a refund, why it goes to an operator (REFUND_BY_HAND_REASONS) when
    not for the switch's refusal."""

    error: str
    nothing_charged: bool = False
    refund_by_hand: str | None = None


@dataclass(frozen=True)
class Defer:
    """Not now (quiet hours): look again at ``until``; this is not a failed try. ``payload``: the action's payload
    from now on, when the deferral keeps something on it (a message's turn in a paced release)."""

    until: datetime
    reason: str
    payload: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Replan:
    """The hard rules forbid this send now (window, cadence, budget, opt-out): decide again instead."""

    reason: str


@dataclass(frozen=True)
class Skip:
    """The order is no longer open: the action is cancelled without effect."""

    reason: str


@dataclass(frozen=True)
class NoEffect:
    """The action has no outside effect (follow-up, close): recording is everything."""


Outcome = (
    Charged
    | Sent
    | NotSent
    | Delivered
    | StatusAnswered
    | Refunded
    | Transient
    | Permanent
    | Defer
    | Replan
    | Skip
    | NoEffect
)


@dataclass(frozen=True)
class ActionRow:
    """A claimed (or scheduled) action."""

    action_id: int
    merchant_id: str
    order_id: str
    kind: str
    state: str
    due_at: datetime
    planned_at: datetime
    attempts: int
    claim_token: str | None
    idempotency_key: str
    decision_id: str | None
    payload: dict[str, Any]
    #: When it was due before it was claimed (a claim sets ``due_at`` to its lease's end); None if not claimed here.
    was_due_at: datetime | None = None

    @classmethod
    def of(cls, row: RowMapping) -> ActionRow:
        """From a database row."""
        return cls(
            action_id=int(row["action_id"]),
            merchant_id=row["merchant_id"],
            order_id=row["order_id"],
            kind=row["kind"],
            state=row["state"],
            due_at=as_utc(row["due_at"]),
            planned_at=as_utc(row["planned_at"]),
            attempts=int(row["attempts"]),
            claim_token=row["claim_token"],
            idempotency_key=row["idempotency_key"],
            decision_id=row["decision_id"],
            payload=orjson.loads(row["payload_json"] or "{}"),
        )


@dataclass(frozen=True)
class EventAnswer:
    """The answer of the event endpoints: ``{"order_id", "state"}``."""

    order_id: str
    state: str


@dataclass(frozen=True)
class LinkPage:
    """What the payment page shows."""

    token_id: str
    merchant_id: str
    order_id: str
    amount: float
    currency: str
    state: str
    expires_at: datetime


@dataclass(frozen=True)
class LinkPayment:
    """A link payment handed to the effects: the action the API claimed for it."""

    action: ActionRow


@dataclass
class RetryPolicy:
    """How failed tries are spaced and when an action is dead-lettered."""

    max_attempts: int = 8
    #: Tries of a merchant webhook after which its failing is logged as an error; it is re-sent all the same.
    webhook_alert_attempts: int = 20
    backoff_base_seconds: float = 2.0
    backoff_cap_seconds: float = 3600.0
    jitter: Callable[[float], float] = field(default=lambda ceiling: ceiling)
    #: A message its provider certainly did not take (429, 503, unreachable) is tried again for this long from the
    #: first such answer, however many tries that takes, before it is given up.
    message_outage_seconds: float = 3600.0
    #: The longest wait between two tries of such a message (its backoff stops growing there).
    message_backoff_cap_seconds: float = 300.0
    #: The longest ``Retry-After`` honoured; a provider asking for more is tried again after this.
    retry_after_cap_seconds: float = 900.0
    #: A channel whose provider has refused every message for this long is down (service/executor/outages.py):
    #: its messages are decided again, on another channel or later, and not counted against the customer.
    channel_down_after_seconds: float = 900.0
    #: How long a channel is first held down; each time it is found down again in the same outage, twice as long.
    #: A message waiting for the channel goes at most this long after its provider is back, when it is first found
    #: down (as the longest wait between two tries of a refused message, ``message_backoff_cap_seconds``).
    channel_down_first_hold_seconds: float = 300.0
    #: The longest hold of a channel that is down: a message waiting for it goes at most this long after its
    #: provider is back, and an order waiting for it is decided again about this often.
    channel_down_max_hold_seconds: float = 3600.0
    #: How long a merchant's channel is first held back after a receipt said its sender was rate limited
    #: (service/executor/pacing.py); twice as long each time it is again, at most ``rate_limit_max_hold_seconds``.
    rate_limit_first_hold_seconds: float = 60.0
    #: The longest hold of a sender, and of a customer held back after WhatsApp's pair rate limit (131056: Meta's
    #: 4^X seconds, at least 6).
    rate_limit_max_hold_seconds: float = 900.0
    #: How long a merchant's sender is first held after its provider refused a message because the sender is over its
    #: daily quota (an SMTP relay's ``454 Throttling failure: Daily message quota exceeded``, ``550 5.4.5 Daily user
    #: sending limit exceeded``); twice as long each time the first message after the hold is refused so again, at
    #: most ``sender_quota_max_hold_seconds``. Ten minutes: Amazon SES asks to wait up to 10 minutes after a
    #: throttling error before trying again (its quota is over a rolling 24 hours, so room comes back gradually).
    sender_quota_first_hold_seconds: float = 600.0
    #: A day: Google lifts a Workspace account's daily sending limit within 24 hours (data/README.md).
    sender_quota_max_hold_seconds: float = 86_400.0
    #: A sender held for its daily quota longer than this is out, as a channel down is (service/executor/outages.py):
    #: the orders are decided again without the channel (another allowed channel now, or the message waits for the
    #: hold's end when there is none), instead of every e-mail waiting out hours of the quota. Fifteen minutes, as
    #: ``channel_down_after_seconds`` (a channel that sent nothing that long is down) and the longest rate hold: the
    #: first hold (10 minutes, ``sender_quota_first_hold_seconds``) waits, as SES's quota comes back gradually; a
    #: second in a row (20 minutes, then 40, ... up to a day) is decided around.
    sender_quota_replan_after_seconds: float = 900.0
    #: When a sender's hold ends, the messages it held go one at a time, this far apart (service/executor/pacing.py):
    #: all at once, they were the burst that hit the limit again.
    rate_limit_release_spacing_seconds: float = 1.0
    #: The messages that wake at the end of the quiet hours (all due at that one instant) go one at a time, this far
    #: apart, per merchant and channel (service/executor/pacing.py): 10 a second, half the lowest throughput Meta
    #: documents for a business number (20 messages a second, 80 by default; data/README.md), since inbound messages
    #: count towards it too. SMS and push keep it too: no rate of theirs was found.
    quiet_hours_release_spacing_seconds: float = 0.1
    #: The same for e-mail, which goes through the merchant's SMTP relay, not Meta: one a second, the rate Amazon
    #: SES documents for an account in its sandbox (a production account's rate is the account's own, and a
    #: message over it is refused with 454, not queued) and above Exchange Online's 30 a minute; Gmail asks bulk
    #: senders for a steady rate without bursts (data/README.md). A merchant whose relay takes more says so in
    #: ``providers.email.max_per_second``.
    email_quiet_hours_release_spacing_seconds: float = 1.0

    def note_rate_limited(
        self, conn: sa.Connection, merchant_id: str, channel: Channel, now: datetime, limit: SenderLimit = "rate"
    ) -> datetime:
        """``pacing.note_rate_limited`` with this policy's spans: a rate limit's, or a daily quota's (``limit``)."""
        if limit == "daily_quota":
            first, longest = self.sender_quota_first_hold_seconds, self.sender_quota_max_hold_seconds
        else:
            first, longest = self.rate_limit_first_hold_seconds, self.rate_limit_max_hold_seconds
        return note_rate_limited(
            conn,
            merchant_id,
            channel,
            now,
            first_hold=timedelta(seconds=first),
            max_hold=timedelta(seconds=longest),
            why="over its daily quota" if limit == "daily_quota" else "rate limited",
            limit=limit,
        )

    def senders_over_quota(
        self, conn: sa.Connection, merchant_id: str, now: datetime, channel: Channel | None = None
    ) -> dict[Channel, datetime]:
        """``pacing.senders_over_quota``: the merchant's channels (``channel`` only, when given) whose sender is held
        for its daily quota longer than ``sender_quota_replan_after_seconds``, with the end of each hold."""
        longer_than = timedelta(seconds=self.sender_quota_replan_after_seconds)
        return senders_over_quota(conn, merchant_id, now, longer_than, channel)

    def channels_out(
        self, conn: sa.Connection, merchant_id: str, now: datetime, channel: Channel | None = None
    ) -> tuple[dict[Channel, datetime], dict[Channel, datetime]]:
        """The merchant's channels (``channel`` only, when given) that are down (``outages.channels_down``) and
        those whose sender is over its daily quota (``senders_over_quota``), in one read (``pacing.channels_out``)."""
        longer_than = timedelta(seconds=self.sender_quota_replan_after_seconds)
        return channels_out(conn, merchant_id, now, longer_than, channel)

    def note_pair_rate_limited(
        self, conn: sa.Connection, merchant_id: str, channel: Channel, address_sha256: str, now: datetime
    ) -> datetime:
        """``pacing.note_pair_rate_limited`` with this policy's longest hold."""
        return note_pair_rate_limited(
            conn,
            merchant_id,
            channel,
            address_sha256,
            now,
            max_hold=timedelta(seconds=self.rate_limit_max_hold_seconds),
        )

    @property
    def release_spacing(self) -> timedelta:
        """How far apart the messages a sender's hold kept back go when it ends."""
        return timedelta(seconds=self.rate_limit_release_spacing_seconds)

    def wake_spacing(self, channel: Channel, provider: ProviderConfig | None) -> timedelta:
        """How far apart the messages on ``channel`` that wake at the end of the quiet hours go: as fast as the
        merchant's ``provider`` account takes them when its config says (``max_per_second``), else the channel's
        default."""
        if provider is not None and provider.max_per_second is not None:
            return timedelta(seconds=1 / provider.max_per_second)
        if channel == Channel.EMAIL:
            return timedelta(seconds=self.email_quiet_hours_release_spacing_seconds)
        return timedelta(seconds=self.quiet_hours_release_spacing_seconds)

    def note_refusal(
        self,
        conn: sa.Connection,
        merchant_id: str,
        channel: Channel,
        now: datetime,
        retry_after: timedelta | None,
        blocked: Blocked | None = None,
    ) -> datetime | None:
        """``outages.note_refusal`` with this policy's spans."""
        return note_refusal(
            conn,
            merchant_id,
            channel,
            now,
            down_after=timedelta(seconds=self.channel_down_after_seconds),
            first_hold=timedelta(seconds=self.channel_down_first_hold_seconds),
            max_hold=timedelta(seconds=self.channel_down_max_hold_seconds),
            retry_after=retry_after,
            blocked=blocked,
        )

    def delay(self, attempt: int, cap_seconds: float | None = None) -> timedelta:
        """Exponential backoff with full jitter for the ``attempt``-th failed try, at most ``backoff_cap_seconds``
        (and ``cap_seconds`` when given). The exponent stops at 32: a message may be tried many times."""
        cap = self.backoff_cap_seconds if cap_seconds is None else min(self.backoff_cap_seconds, cap_seconds)
        ceiling = min(cap, self.backoff_base_seconds * 2 ** min(max(attempt - 1, 0), 32))
        return timedelta(seconds=self.jitter(ceiling))

    def message_delay(self, attempt: int, retry_after: timedelta | None) -> timedelta:
        """The wait before the next try of a message after its ``attempt``-th failed one: the backoff (capped at
        ``message_backoff_cap_seconds``), or the provider's ``Retry-After`` (up to ``retry_after_cap_seconds``)
        when that is longer."""
        backoff = self.delay(attempt, self.message_backoff_cap_seconds)
        if retry_after is None:
            return backoff
        return max(backoff, min(retry_after, timedelta(seconds=self.retry_after_cap_seconds)))

    def limit(self, kind: str) -> int:
        """Tries allowed for an action of ``kind`` (a webhook has no limit: ``Executor._retry_webhook_later``)."""
        return self.max_attempts


def _canonical(body: Mapping[str, Any]) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def _short_hash(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(str(part) for part in parts).encode()).hexdigest()[:24]


def txn_id_for(idempotency_key: str) -> str:
    """The txn_id of the attempt an action makes (stable across re-sends of the same action)."""
    return "txn_" + _short_hash("txn", idempotency_key)


#: Template of the payment-link message (per merchant, channel and locale in the channels' template folder).
PAYMENT_LINK_TEMPLATE = "payment_link"


def nudge_id_for(idempotency_key: str) -> str:
    """The nudge_id of the message an action sends (stable across re-sends)."""
    return "ndg_" + _short_hash("nudge", idempotency_key)


def link_id_for(idempotency_key: str) -> str:
    """The token_id of the payment link a message action sends (stable across re-sends)."""
    return "lnk_" + _short_hash("link", idempotency_key)


def _link_decision(conn: sa.Connection, action: ActionRow) -> tuple[str | None, float | None]:
    """(decision_id, propensity) of the message whose link the link payment ``action`` used; (None, None) for a link of
    no message.

    A payment through a link is the customer's, planned by no decision of its own; the history ties it to the
    decision that sent the link, as the API's export and the simulator do, so that the off-policy evaluation and
    retraining credit a recovery to it. Taken from the message's action, which its nudge row is written from: a
    message whose provider never confirmed it has no nudge row yet when its link pays (``_unconfirmed_link``).
    """
    nudge_id = action.payload.get("nudge_id")
    if nudge_id is None:
        return None, None
    messages = conn.execute(
        sa.select(actions.c.idempotency_key, actions.c.decision_id, actions.c.payload_json).where(
            actions.c.merchant_id == action.merchant_id,
            actions.c.order_id == action.order_id,
            actions.c.kind == ActionKind.NUDGE.value,
        )
    )
    for key, decision_id, payload_json in messages:
        if nudge_id_for(key) == nudge_id:
            propensity = orjson.loads(payload_json or "{}").get("propensity")
            return decision_id, None if propensity is None else float(propensity)
    return None, None


def _dump(value: Any) -> str:
    return orjson.dumps(value).decode()


SelectT = TypeVar("SelectT", bound=sa.Select[Any])


#: A message action's payload keys: when its provider first refused it for load or an outage, and how many of its
#: tries may have reached the provider (a timeout, a 500 or 504, a connection lost mid-request).
MESSAGE_REFUSED_SINCE = "refused_since"
#: A retry action's payload key: its charge never went out through its connector, which the order is not offered
#: again (``Executor._retry_failed_to_go_out``).
CONNECTOR_FAILED = "connector_failed"
#: A retry action's payload key: its connector could not be reached on any try (an outage, a rate limit), so it is
#: left out of the order's connectors only until then (``CONNECTOR_UNREACHED_HOLD`` later), not for good.
CONNECTOR_FAILED_UNTIL = "connector_failed_until"
#: How long a connector no try of a retry reached is not offered to its order again.
CONNECTOR_UNREACHED_HOLD = timedelta(hours=1)
MESSAGE_MAYBE_SENT_TRIES = "maybe_sent_tries"
#: A message action's payload key: when the first of those tries was made (ISO time): the day the customer may have
#: had it, which the one-message-a-day rule and the skip-days cadence count (``Executor._messages_maybe_out``).
MESSAGE_MAYBE_SENT_AT = "maybe_sent_at"
#: How a message that may have reached the customer although its provider never confirmed it is told (the nudge's
#: error, ``Executor._keep_maybe_sent``; the console looks for it).
MAYBE_SENT_NOTE = "may have reached the provider"
#: A message action's payload key: it was planned while its channel was down, to wait for it
#: (``Executor._decide_with_channels_down``); while the channel stays down it is deferred, not decided again.
MESSAGE_WAITS_FOR_CHANNEL = "waits_for_channel"
#: A message action's payload key: its turn (ISO time) in the release of the messages its sender's hold kept back
#: (service/executor/pacing.py ``release_turn``): at its turn it goes, not behind the messages queued after it.
MESSAGE_PACED_TURN = "paced_turn"
#: The same in the release of the messages its customer's hold kept back (WhatsApp's pair rate limit).
MESSAGE_CUSTOMER_PACED_TURN = "customer_paced_turn"


def over_quota_entry(channel: Channel) -> str:
    """The ``rules_applied`` entry of a decision made while ``channel``'s sender was held for hours for its daily
    quota (``RetryPolicy.sender_quota_replan_after_seconds``)."""
    return f"sender_over_quota:{channel.value}"


def waits_for_channel(decision: Decision) -> bool:
    """Whether ``decision`` is a message planned to wait for its channel, which was down (or its sender over its
    daily quota) when it was made (only such a decision names a channel its ``rules_applied`` says was out)."""
    channel = decision.channel
    return channel is not None and bool({down_entry(channel), over_quota_entry(channel)} & set(decision.rules_applied))


def _planned_what(action: ActionRow) -> str:
    """What ``action`` does, as an agent reads it: "silent retry via adyen", "payment by link", "sms message"."""
    if action.kind == ActionKind.RETRY:
        return f"silent retry via {action.payload.get('connector')}"
    if action.kind == ActionKind.LINK_PAYMENT:
        return "customer's payment by link"
    if action.kind == ActionKind.NUDGE:
        return f"{action.payload.get('channel')} message"
    return action.kind.replace("_", " ")


def _maybe_sent_at(action: ActionRow, otherwise: datetime) -> datetime:
    """When a try of message ``action`` may first have reached its provider (``MESSAGE_MAYBE_SENT_AT``), or
    ``otherwise`` for one that kept no such time (marked before it was kept)."""
    at = action.payload.get(MESSAGE_MAYBE_SENT_AT)
    return otherwise if at is None else as_utc(datetime.fromisoformat(str(at)))


def _one_more_maybe_sent_try(payload: Mapping[str, Any], at: datetime) -> dict[str, Any]:
    """A message action's ``payload`` counting one more try that may have reached its provider, made ``at`` (the
    first such try's time is kept)."""
    counted = {MESSAGE_MAYBE_SENT_AT: at.isoformat()} | dict(payload)
    counted[MESSAGE_MAYBE_SENT_TRIES] = int(payload.get(MESSAGE_MAYBE_SENT_TRIES, 0)) + 1
    return counted


def _same_plan(decision: Decision, approved: ActionRow) -> bool:
    """Whether ``decision`` plans what the ``approved`` retry or message waiting to be carried out does: a retry
    with the same strategy through the same connector, or a message on the same channel. Its time is not compared:
    the agent chose the approved one (after payday, say), and the hard rules are checked again at the send."""
    if approved.kind == ActionKind.RETRY:
        connector = str(approved.payload.get("connector") or "").strip().lower()
        return (
            decision.action == Action.RETRY
            and str(decision.strategy) == str(approved.payload.get("strategy"))
            and (decision.connector or "").strip().lower() == connector
        )
    return decision.action == Action.RETARGET and str(decision.channel) == str(approved.payload.get("channel"))


def _stop_close(merchant_id: str, order_id: str) -> sa.ColumnElement[bool]:
    """The order's close planned by a stop and still to run (it waits for a live payment link to expire, or a
    charge to be answered); never the window's end, which every order keeps."""
    return sa.and_(
        actions.c.merchant_id == merchant_id,
        actions.c.order_id == order_id,
        actions.c.kind == ActionKind.CLOSE.value,
        actions.c.idempotency_key != f"{merchant_id}:{order_id}:close:window",
        actions.c.state.in_(OPEN_ACTION_STATES),
    )


#: A charge action dead-lettered after it was sent and never answered: whether it took the money is unknown.
UNKNOWN_CHARGE = sa.and_(
    actions.c.state == ActionState.DEAD.value,
    IS_CHARGE,
    actions.c.unanswered_since.is_not(None),
)


def _taken_as_not_charged(row: RowMapping) -> bool:
    """A charge action an operator or its switch took as never charged, with no attempt recorded for it since."""
    return (
        row["kind"] in CHARGE_KIND_VALUES
        and row["state"] == ActionState.DEAD.value
        and row["unanswered_since"] is None
        and TAKEN_AS_NOT_CHARGED in orjson.loads(row["payload_json"] or "{}")
    )


def _charged_by_operator(row: RowMapping) -> bool:
    """A charge action an operator answered for as charged (its attempt recorded as a success on their word)."""
    return (
        row["kind"] in CHARGE_KIND_VALUES
        and row["state"] == ActionState.DONE.value
        and CHARGED_BY_OPERATOR in orjson.loads(row["payload_json"] or "{}")
    )


def _names_payment(charge: ActionRow, txn_id: object) -> bool:
    """Whether ``txn_id`` (a merchant's ``payment-succeeded``'s) names ``charge``: winback's txn id of it, or the
    processor payment id CONTRACT.md section 5 gives its attempt (``<order_id>_<n>``)."""
    number = charge.payload.get("attempt_number")
    return txn_id in (txn_id_for(charge.idempotency_key), f"{charge.order_id}_{number}")


def _names_charge(order: RowMapping, charge: ActionRow) -> bool:
    """Whether ``order`` succeeded on ``charge`` (its success txn id names it: ``_names_payment``): a merchant's
    report of that payment, an operator's "charged", or its own success."""
    return order["state"] == OrderState.SUCCEEDED and _names_payment(charge, order["success_txn_id"])


def _order_charges(conn: sa.Connection, merchant_id: str, order_id: str) -> list[ActionRow]:
    """Every charge action of the order (a retry or a link payment), in any state: those a merchant's
    ``payment-succeeded`` may name (``_names_payment``)."""
    rows = conn.execute(
        sa.select(actions).where(
            actions.c.merchant_id == merchant_id,
            actions.c.order_id == order_id,
            IS_CHARGE,
        )
    ).mappings()
    return [ActionRow.of(row) for row in rows.all()]


def _paid_on_the_merchants_word(order: RowMapping, charge: ActionRow) -> bool:
    """Whether ``order`` succeeded on its merchant's ``payment-succeeded`` naming ``charge``, a charge of winback's
    whose switch had not said it succeeded: an answer of the switch other than "succeeded" contradicts the merchant.
    Its own success never reaches here (its order succeeded on it, nothing is asked of it again); an operator's
    "charged" on it is the merchant's word only when the merchant had named it first (REPORTED_PAID_BY_MERCHANT)."""
    if not _names_charge(order, charge):
        return False
    return CHARGED_BY_OPERATOR not in charge.payload or REPORTED_PAID_BY_MERCHANT in charge.payload


def _noted(earlier: str | None, note: str) -> str:
    """An action's note (``last_error``) with ``note`` added after what it said before, if anything."""
    return f"{earlier or ''}; {note}".lstrip("; ")


def _answered_later(conn: sa.Connection, row: RowMapping, verdict: str, now: datetime) -> bool:
    """Mark charge ``row``, taken as never charged, as answered by its switch since (``verdict``), so its attempt is
    recorded once; False when another answer recorded it first."""
    done = conn.execute(
        actions.update()
        .where(
            actions.c.action_id == row["action_id"],
            actions.c.state == ActionState.DEAD.value,
            actions.c.unanswered_since.is_(None),
        )
        .values(
            state=ActionState.DONE.value,
            updated_at=now,
            last_error=_noted(row["last_error"], f"the switch answered later: {verdict}"),
        )
    ).rowcount
    return bool(done == 1)


def _status_check_keys(charge_key: str) -> tuple[str, str]:
    """The idempotency keys of the status checks of the charge whose key is ``charge_key``: the first ask
    (``_ask_about``) and the one more ask after "not found" (``_ask_again_after_not_found``)."""
    return f"{charge_key}:status", f"{charge_key}:status:again"


def _charge_key_of_check(check_key: str) -> str:
    """The idempotency key of the charge a status check whose key is ``check_key`` asks about."""
    return check_key.removesuffix(":again").removesuffix(":status")


def _refund_key(charge_key: str) -> str:
    """The idempotency key of the refund of the charge whose key is ``charge_key`` (``_refund_duplicate``)."""
    return f"{charge_key}:refund"


def _charge_key_of_refund(refund_key: str) -> str:
    """The idempotency key of the charge a refund whose key is ``refund_key`` gives back (``_refund_key``'s inverse)."""
    return refund_key.removesuffix(":refund")


def _switch_disputes(conn: sa.Connection, charge_key: str) -> str | None:
    """What the switch said against an operator's "charged" for the charge whose key is ``charge_key`` (flagged on
    one of its status checks: ``SWITCH_CONTRADICTS``), or None when it has not contradicted it."""
    for payload_json in conn.scalars(
        sa.select(actions.c.payload_json).where(actions.c.idempotency_key.in_(_status_check_keys(charge_key)))
    ):
        flag = orjson.loads(payload_json or "{}").get(SWITCH_CONTRADICTS)
        if isinstance(flag, dict):
            return str(flag.get("switch_said"))
    return None


def _whose_word(merchant_txn_id: str | None, operator_said_charged: bool, charge_action_id: int | None = None) -> str:
    """Whose word a charge dispute's switch contradicts, in the words of logs, notes and lists: the merchant's
    ``payment-succeeded`` naming the payment (``merchant_txn_id``), an operator's "charged" (on ``charge_action_id``,
    when named), or both."""
    said = []
    if merchant_txn_id is not None:
        said.append(f"the merchant reported it paid (txn_id {merchant_txn_id!r})")
    if operator_said_charged:
        on = "" if charge_action_id is None else f" (charge action {charge_action_id})"
        said.append(f"an operator answered charged{on}")
    return " and ".join(said)


def _nothing_to_refund(payment_id: object, said: str) -> str:
    """Why the refund of a disputed charge is not sent: the switch says it never took the money."""
    return (
        f"not sent: the switch says payment {payment_id} was never charged ({said}), against an operator's "
        '"charged" (a charge dispute): there is nothing to give back'
    )


def _switch_silent_on_refund(refund: ActionRow, charge: ActionRow, asked_since: datetime, last: str | None) -> str:
    """Why the refund of ``charge`` (charged on an operator's word) goes to an operator: its switch answered no
    status check of the charge from ``asked_since`` to REFUND_WAIT_FOR_SWITCH after the refund was planned (``last``:
    the note of the latest check still asking), and what is known of the charge, for the refund's dead-letter note."""
    payload = refund.payload
    connector = payload.get("connector")
    answered_for = _stored_moment_written(charge.payload.get(CHARGED_BY_OPERATOR))
    last_note = last or "not asked yet"
    amount = _amount_written(payload)
    return (
        f"waited {span_words(REFUND_WAIT_FOR_SWITCH)} (since {utc_second(refund.planned_at)}) for switch "
        f"{connector!r} to confirm payment {payload.get('payment_id')}, and it has answered no status check of it "
        f"since {utc_second(asked_since)} (last: {last_note}); what is known: {amount} "
        f"recorded as charged on an operator's word at {answered_for} "
        f"(charge action {charge.action_id}) on an order settled otherwise, never confirmed or denied by the switch; "
        f"refund it by hand if {connector!r} took it. The switch is still asked hourly until "
        f"{span_words(SWITCH_SILENCE_LIMIT)} after its first ask: a late answer is noted here, and the refund is "
        "never sent by winback after this"
    )


def payload_money(payload: Mapping[str, Any]) -> tuple[float, str] | tuple[None, None]:
    """The amount (major units, as ``orders.amount``) and currency an action's payload carries: the executor writes
    the order's, a JSON number and its ISO code. ``(None, None)`` when either is missing or unreadable (a payload of
    an older release, or one edited by hand), for the lists and cards to say so rather than fail."""
    amount, currency = payload.get("amount"), payload.get("currency")
    if isinstance(amount, bool) or not isinstance(amount, int | float | str):
        return None, None
    try:
        read = float(amount)
    except (OverflowError, ValueError):
        return None, None
    if not math.isfinite(read) or not isinstance(currency, str) or not currency.strip():
        return None, None
    return read, currency.strip()


def _amount_written(payload: Mapping[str, Any]) -> str:
    """A charge's amount as an operator's note writes it (``format_money``); a payload without a readable amount and
    currency (``payload_money``) is written as it is: a note never fails for an odd payload."""
    amount, currency = payload_money(payload)
    if amount is None or currency is None:
        return f"{payload.get('amount')} {payload.get('currency')}"
    return format_money(amount, currency)


def _stored_moment_written(stored: object) -> str:
    """A moment stored in an action's payload (``isoformat()``) as an operator's note writes it (``utc_second``);
    anything that is not one is written as it is, so a note never fails for an odd payload."""
    if isinstance(stored, str):
        try:
            return utc_second(datetime.fromisoformat(stored))
        except ValueError:
            pass
    return str(stored)


def _check_payload(charge: ActionRow) -> dict[str, Any]:
    """What a status check of ``charge`` asks about: its connector and processor payment id."""
    number = charge.payload.get("attempt_number")
    return {
        "charge_action_id": charge.action_id,
        "connector": charge.payload.get("connector"),
        "attempt_number": number,
        "payment_id": f"{charge.order_id}_{number}",
    }


def _declined(result: ChargeResult) -> str:
    """A decline in the words of notes and logs: ``declined (<error code>)``, or ``declined`` without one."""
    return f"declined ({result.error_code})" if result.error_code else "declined"


def _note_last_failure(conn: sa.Connection, charge: ActionRow, result: ChargeResult, now: datetime) -> None:
    """Keep ``result``, a decline of ``charge``, as its order's last failure (``orders.failure_json``: the failure
    of the order's decision requests, and the error class the console shows)."""
    failure = {
        "connector": result.connector,
        "error_code": result.error_code,
        "error_message": result.error_message,
        "network_decline_code": result.network_decline_code,
        "merchant_advice_code": result.merchant_advice_code,
        "unified_code": result.unified_code,
    }
    conn.execute(
        orders.update()
        .where(orders.c.merchant_id == charge.merchant_id, orders.c.order_id == charge.order_id)
        .values(failure_json=_dump(failure), updated_at=now)
    )


def retry_forbidden(context: RuleContext, action: ActionRow, now: datetime) -> tuple[str, ...]:
    """The hard rules retry ``action`` breaks if sent now (none: it may go), ``context`` the rules' facts about its
    order now (``Executor.rules_now``, ``sending``). Checked again at the moment of sending, as for messages: the
    decision may be hours old, and the merchant's config may have changed since (a flow switched off, fewer retries
    allowed); and before a re-send or a send again after "not found", which charge now if the earlier send never
    reached the switch (a checkout window may have closed since)."""
    candidate = Candidate(
        action=Action.RETRY,
        execute_at=now,
        strategy=Strategy(str(action.payload["strategy"])),
        connector=str(action.payload["connector"]),
    )
    verdict = check(context, candidate)
    return () if verdict.allowed else verdict.broken


def _log_unknown_charge(order: RowMapping, action_id: int, what: str) -> None:
    """Tell the operator that ``order`` has a charge sent and never answered, and how to answer for it."""
    log.error(
        "%s: its charge action %s was sent and never answered; ask the connector and run "
        "`winback executor resolve-charge %s --charged|--not-charged`",
        what,
        action_id,
        action_id,
        extra={"merchant_id": order["merchant_id"], "order_id": order["order_id"]},
    )


@dataclass(frozen=True)
class ChargeDispute:
    """A charge an operator answered for as charged, or its merchant reported paid (a ``payment-succeeded`` naming
    it), that its switch then reported declined or not found (flagged on the charge's status check:
    ``SWITCH_CONTRADICTS``)."""

    merchant_id: str
    order_id: str
    order_state: str
    charge_action_id: int
    check_action_id: int
    connector: str
    payment_id: str
    switch_said: str
    flagged_at: datetime
    #: The order succeeded on this charge (its merchant was told so on the operator's word); False: it was settled
    #: before the operator's answer, and the charge was a duplicate whose refund is not sent.
    settled_by_it: bool = True
    #: Who marked the dispute as dealt with ("agent asha@m_demo", "operator alice"), when, and what they did about
    #: it (``resolve_charge_disputes``); None while it is open.
    resolved_by: str | None = None
    resolved_at: datetime | None = None
    resolution_note: str | None = None
    #: The txn_id of the merchant's ``payment-succeeded`` that named this payment as the order's (the order
    #: succeeded on it), when the merchant said it was paid; None when only an operator did.
    merchant_txn_id: str | None = None
    #: Whether an operator answered "charged" for it (False: the merchant's report alone).
    operator_said_charged: bool = True

    @property
    def open(self) -> bool:
        """Whether nobody has marked the dispute as dealt with yet."""
        return self.resolved_at is None

    @property
    def done(self) -> CaseDone | None:
        """Who marked it dealt with, when, and their note (None while open)."""
        if self.resolved_at is None:
            return None
        return CaseDone(by=str(self.resolved_by), at=self.resolved_at, note=self.resolution_note or "")

    def described(self) -> str:
        """The dispute in the words of the CLI's and the console's messages."""
        return f"the charge dispute of payment {self.payment_id}"

    @property
    def said_by(self) -> str:
        """Whose word the switch contradicts, as /metrics labels it: ``merchant`` (its ``payment-succeeded`` named
        the payment; an operator's "charged" may have come after) or ``operator``."""
        return "operator" if self.merchant_txn_id is None else "merchant"

    @property
    def who_said(self) -> str:
        """Whose word the switch contradicts, in the words of logs and lists."""
        return _whose_word(self.merchant_txn_id, self.operator_said_charged, self.charge_action_id)


def _flagged(
    conn: sa.Connection,
    query: sa.Select[Any],
    key: str,
    merchant_id: str | None = None,
    order_id: str | None = None,
) -> Iterator[tuple[sa.Row[Any], dict[str, Any], dict[str, Any]]]:
    """The rows ``query`` selects of actions (with ``payload_json``) whose payload carries the flag ``key`` (a
    dict), of one merchant's (or one order's) when named, oldest first: each row, its payload and the flag."""
    query = query.where(actions.c.payload_json.contains(key))
    if merchant_id is not None:
        query = query.where(actions.c.merchant_id == merchant_id)
    if order_id is not None:
        query = query.where(actions.c.order_id == order_id)
    for row in conn.execute(query.order_by(actions.c.action_id)):
        payload = orjson.loads(row.payload_json or "{}")
        flag = payload.get(key)
        if isinstance(flag, dict):
            yield row, payload, flag


def checks_asked_no_more(conn: sa.Connection) -> list[tuple[str, str]]:
    """The status checks asked no more after their switch's silence (``Executor._stop_asking``), oldest first: each
    one's merchant and what its charge was then (CHARGES_ASKED_NO_MORE)."""
    query = sa.select(actions.c.merchant_id, actions.c.payload_json).where(
        actions.c.kind == ActionKind.CHARGE_STATUS.value
    )
    return [
        (row.merchant_id, str(flag.get("charge", "other"))) for row, _, flag in _flagged(conn, query, SWITCH_SILENT)
    ]


def charge_disputes(
    conn: sa.Connection, merchant_id: str | None = None, order_id: str | None = None, *, open_only: bool = False
) -> list[ChargeDispute]:
    """The charges disputed by their switch after an operator's "charged" (a merchant's, or one order's), oldest
    first; ``open_only``: only those nobody has marked as dealt with. Status checks are few (one or two per charge
    sent and never answered), so their payloads are read here."""
    query = sa.select(
        actions.c.action_id,
        actions.c.merchant_id,
        actions.c.order_id,
        actions.c.idempotency_key,
        actions.c.payload_json,
        orders.c.state,
        orders.c.success_txn_id,
    ).join(orders, sa.and_(orders.c.merchant_id == actions.c.merchant_id, orders.c.order_id == actions.c.order_id))
    query = query.where(actions.c.kind == ActionKind.CHARGE_STATUS.value)
    found = []
    for row, payload, flag in _flagged(conn, query, SWITCH_CONTRADICTS, merchant_id, order_id):
        resolved = flag.get(DISPUTE_RESOLVED)
        if not isinstance(resolved, dict):
            resolved = None
        elif open_only:
            continue
        merchant_said = flag.get("merchant_txn_id")
        charge_key = _charge_key_of_check(row.idempotency_key)
        # Flags written before the merchant's word was kept are an operator's (their "operator_said" is "charged").
        settled_by_it = merchant_said is not None or row.success_txn_id == txn_id_for(charge_key)
        found.append(
            ChargeDispute(
                merchant_id=row.merchant_id,
                order_id=row.order_id,
                order_state=row.state,
                charge_action_id=int(payload["charge_action_id"]),
                check_action_id=int(row.action_id),
                connector=str(payload.get("connector")),
                payment_id=str(payload.get("payment_id")),
                switch_said=str(flag["switch_said"]),
                flagged_at=as_utc(datetime.fromisoformat(str(flag["at"]))),
                settled_by_it=settled_by_it,
                resolved_by=None if resolved is None else str(resolved["by"]),
                resolved_at=None if resolved is None else as_utc(datetime.fromisoformat(str(resolved["at"]))),
                resolution_note=None if resolved is None else str(resolved["note"]),
                merchant_txn_id=None if merchant_said is None else str(merchant_said),
                operator_said_charged=flag.get("operator_said") == "charged",
            )
        )
    return found


@dataclass(frozen=True, kw_only=True)
class CaseByHand:
    """What each money case handed to a person (``cases_by_hand``) says of itself: its order, the connector of the
    payment it concerns, its row (``case_id``), and who marked it dealt with, when, and what was done (``done``,
    None while open)."""

    merchant_id: str
    order_id: str
    order_state: str
    connector: str
    case_id: int = 0
    done: CaseDone | None = None

    @property
    def open(self) -> bool:
        """Whether nobody has marked it dealt with yet."""
        return self.done is None


@dataclass(frozen=True, kw_only=True)
class RefundByHand(CaseByHand):
    """A refund of a duplicate charge dead-lettered for an operator to make by hand (REFUND_BY_HAND), with what is
    known of it: ``state`` is ``dead`` while it is theirs, ``cancelled`` when its switch later said the charge was
    never taken (``note`` says so, and that a refund made by hand meanwhile gave back money never taken)."""

    refund_action_id: int
    payment_id: str
    #: In major units, from the refund's payload; None (and ``currency`` None) when it has no readable amount
    #: and currency (``payload_money``).
    amount: float | None
    currency: str | None
    why: str
    handed_at: datetime
    state: str
    note: str


def refund_why(why: str) -> str:
    """Why a refund went to an operator, in words (an unknown label with its underscores as spaces)."""
    return _REFUND_WHY.get(why, why.replace("_", " "))


def _cases_of(kind: str, *columns: sa.ColumnElement[Any]) -> sa.Select[Any]:
    """The cases of ``kind`` handed to a person (``cases_by_hand``) with their resolution, joined to their action
    (``columns`` of it, and of its order): the flagged actions read by their key, not by a scan of every action's
    payload."""
    return (
        sa.select(
            cases_by_hand.c.case_id,
            cases_by_hand.c.ref,
            cases_by_hand.c.why,
            cases_by_hand.c.flagged_at,
            cases_by_hand.c.done_by,
            cases_by_hand.c.done_at,
            cases_by_hand.c.done_note,
            actions.c.action_id,
            actions.c.merchant_id,
            actions.c.order_id,
            actions.c.payload_json,
            orders.c.state.label("order_state"),
            *columns,
        )
        .select_from(cases_by_hand)
        .join(actions, actions.c.action_id == cases_by_hand.c.action_id)
        .join(orders, sa.and_(orders.c.merchant_id == actions.c.merchant_id, orders.c.order_id == actions.c.order_id))
        .where(cases_by_hand.c.kind == kind)
    )


def _cases_read(
    conn: sa.Connection, query: sa.Select[Any], merchant_id: str | None, order_id: str | None, open_only: bool
) -> Iterator[tuple[sa.Row[Any], dict[str, Any], dict[str, Any]]]:
    """Each case of ``query`` (``_cases_of``) of a merchant's, one order's, or all, the open ones only
    (``open_only``), oldest first: its row, its action's payload, and the fields every ``CaseByHand`` takes."""
    if merchant_id is not None:
        query = query.where(cases_by_hand.c.merchant_id == merchant_id)
    if order_id is not None:
        query = query.where(cases_by_hand.c.order_id == order_id)
    if open_only:
        query = query.where(cases_by_hand.c.done_at.is_(None))
    for row in conn.execute(query.order_by(cases_by_hand.c.action_id, cases_by_hand.c.case_id)):
        payload = orjson.loads(row.payload_json or "{}")
        case = {
            "merchant_id": row.merchant_id,
            "order_id": row.order_id,
            "order_state": row.order_state,
            "connector": str(payload.get("connector")),
            "case_id": int(row.case_id),
            "done": done_of(row),
        }
        yield row, payload, case


def refunds_by_hand(
    conn: sa.Connection, merchant_id: str | None = None, order_id: str | None = None, *, open_only: bool = False
) -> list[RefundByHand]:
    """The refunds given to an operator to make by hand (a merchant's, one order's, or all), oldest first, dealt
    with or not (``open_only``: not)."""
    query = _cases_of(REFUND_CASE, actions.c.state, actions.c.last_error)
    return [
        RefundByHand(
            **case,
            refund_action_id=int(row.action_id),
            payment_id=str(payload.get("payment_id")),
            amount=amount,
            currency=currency,
            why=str(row.why),
            handed_at=as_utc(row.flagged_at),
            state=row.state,
            note=row.last_error or "",
        )
        for row, payload, case in _cases_read(conn, query, merchant_id, order_id, open_only)
        for amount, currency in [payload_money(payload)]
    ]


@dataclass(frozen=True, kw_only=True)
class PaidTwice(CaseByHand):
    """An order settled by winback's charge (``payment_id`` via ``connector``, winback's ``winback_txn_id``) that its
    merchant then reported paid by a payment of its own (``merchant_txn_id``, at ``reported_at``): the customer may
    have paid twice. Winback refunds neither (MERCHANT_PAID_TOO); an operator checks with the merchant."""

    charge_action_id: int
    payment_id: str
    #: The order's, in major units (``orders.amount``).
    amount: float
    currency: str
    winback_txn_id: str
    merchant_txn_id: str
    reported_at: datetime


def paid_twice(
    conn: sa.Connection,
    merchant_id: str | None = None,
    order_id: str | None = None,
    *,
    open_only: bool = False,
) -> list[PaidTwice]:
    """The orders settled by winback's charge whose merchant then reported them paid by a payment of its own (a
    merchant's, one order's, or all), oldest charge first, one per merchant txn id, dealt with or not
    (``open_only``: not). Only the charges flagged (``cases_by_hand``) are read."""
    query = _cases_of(PAID_TWICE_CASE, orders.c.success_txn_id, orders.c.amount, orders.c.currency)
    return [
        PaidTwice(
            **case,
            charge_action_id=int(row.action_id),
            payment_id=f"{row.order_id}_{payload.get('attempt_number')}",
            amount=float(row.amount),
            currency=str(row.currency),
            winback_txn_id=str(row.success_txn_id),
            merchant_txn_id=str(row.ref),
            reported_at=as_utc(row.flagged_at),
        )
        for row, payload, case in _cases_read(conn, query, merchant_id, order_id, open_only)
    ]


@dataclass(frozen=True, kw_only=True)
class SilentNotCharged(CaseByHand):
    """A charge taken as never charged (an operator's "not charged", or its switch's "not found") whose status checks
    its switch ``connector`` then answered none of since ``silent_since``, and which were asked no more at
    ``given_up_at`` (SWITCH_SILENCE_LIMIT later): if a send reached the connector late, the customer paid, and
    nothing else will show it. An operator checks payment ``payment_id`` with the connector."""

    charge_action_id: int
    check_action_id: int
    payment_id: str
    #: The order's, in major units (``orders.amount``).
    amount: float
    currency: str
    silent_since: datetime
    given_up_at: datetime


def silent_not_charged(
    conn: sa.Connection,
    merchant_id: str | None = None,
    order_id: str | None = None,
    *,
    open_only: bool = False,
) -> list[SilentNotCharged]:
    """The charges taken as never charged whose switch then answered no status check for SWITCH_SILENCE_LIMIT (a
    merchant's, one order's, or all), oldest check first, dealt with or not (``open_only``: not)."""
    query = _cases_of(SILENT_NOT_CHARGED_CASE, actions.c.planned_at, orders.c.amount, orders.c.currency)
    return [
        SilentNotCharged(
            **case,
            charge_action_id=int(payload.get("charge_action_id", 0)),
            check_action_id=int(row.action_id),
            payment_id=str(payload.get("payment_id")),
            amount=float(row.amount),
            currency=str(row.currency),
            silent_since=as_utc(row.planned_at),
            given_up_at=as_utc(row.flagged_at),
        )
        for row, payload, case in _cases_read(conn, query, merchant_id, order_id, open_only)
    ]


def resolve_charge_disputes(
    conn: sa.Connection,
    merchant_id: str,
    order_id: str,
    by: str,
    note: str,
    now: datetime,
    *,
    check_action_id: int | None = None,
) -> Marked[ChargeDispute]:
    """Mark the open charge disputes of ``merchant_id``'s order ``order_id`` (or the one flagged on status check
    ``check_action_id``) as dealt with, ``by`` whom, with ``note`` saying what was done ("fulfilment held, the
    customer charged by hand"): they leave the console queue's first place, the open count on /metrics and
    ``charge-disputes``' list, and stay on the order (its page, and the check's note in ``GET /v1/orders``) with
    who, when and the note. Each resolution is kept on its dispute's flag, compared and set in one statement, so
    two people resolving at once cannot both: the second is reported in ``Marked.before``, nothing written, as is a
    dispute dealt with already (``Marked.now``: those resolved now). DisputeResolutionError, nothing written, when
    there is no note or the order has no such dispute."""
    note = note.strip()
    if not note:
        raise DisputeResolutionError(
            'say what was done about the disputed charge (a note is required: "fulfilment held, customer charged by '
            'hand", say)'
        )
    if len(note) > MAX_DISPUTE_NOTE_LENGTH:
        raise DisputeResolutionError(f"the note is {len(note)} characters long: at most {MAX_DISPUTE_NOTE_LENGTH}")
    found = charge_disputes(conn, merchant_id, order_id)
    if check_action_id is not None:
        found = [dispute for dispute in found if dispute.check_action_id == check_action_id]
    named = f"order {order_id} of merchant {merchant_id}"
    if not found:
        which = (
            "no charge dispute" if check_action_id is None else f"no charge dispute on status check {check_action_id}"
        )
        raise DisputeResolutionError(f'{named} has {which} (an operator\'s "charged" its switch contradicted)')
    before = [dispute for dispute in found if not dispute.open]
    masked = mask_addresses_in(note)
    resolution = {"by": by, "at": now.isoformat(), "note": masked}
    resolved_at = as_utc(now)
    marked = []
    for dispute in (dispute for dispute in found if dispute.open):
        row = conn.execute(
            sa.select(actions.c.payload_json, actions.c.last_error).where(
                actions.c.action_id == dispute.check_action_id
            )
        ).one()
        payload = orjson.loads(row.payload_json)
        payload[SWITCH_CONTRADICTS] = payload[SWITCH_CONTRADICTS] | {DISPUTE_RESOLVED: resolution}
        told = f"dispute dealt with by {by} at {utc_second(now)}: {masked}"
        changed = conn.execute(
            actions.update()
            .where(actions.c.action_id == dispute.check_action_id, actions.c.payload_json == row.payload_json)
            .values(payload_json=_dump(payload), last_error=_noted(row.last_error, told))
        ).rowcount
        if changed != 1:
            [now_seen] = [
                d for d in charge_disputes(conn, merchant_id, order_id) if d.check_action_id == dispute.check_action_id
            ]
            if now_seen.open:
                raise DisputeResolutionError(
                    f"the charge dispute of payment {dispute.payment_id} ({named}) changed meanwhile; look again"
                )
            before.append(now_seen)  # someone else marked it meanwhile: theirs stands
            continue
        marked.append(replace(dispute, resolved_by=by, resolved_at=resolved_at, resolution_note=masked))
        log.warning(
            "charge dispute of payment %s (order %s) marked dealt with by %s: %s",
            dispute.payment_id,
            order_id,
            by,
            masked,
            extra={"merchant_id": merchant_id, "order_id": order_id},
        )
    return Marked(now=marked, before=before)


def _message_with_its_provider() -> sa.ColumnElement[bool]:
    """A message claimed and marked as being sent (``Effects._mark_message_sending``), its answer not yet recorded."""
    return sa.and_(
        actions.c.kind == ActionKind.NUDGE.value,
        actions.c.state == ActionState.CLAIMED.value,
        actions.c.unanswered_since.is_not(None),
    )


def _still_claimed(action: ActionRow) -> sa.ColumnElement[bool]:
    """``action``'s row while its claim (the one this worker holds) is still on it."""
    return sa.and_(
        actions.c.action_id == action.action_id,
        actions.c.state == ActionState.CLAIMED.value,
        actions.c.claim_token == action.claim_token,
    )


# Statements run for (nearly) every action a worker settles, built once with their order's (and moment's) values
# as bound parameters: building a statement and its cache key cost more CPU than running it (a worker's profile over
# 1,000 due retries). Executed with ``_of_order(order)`` (and ``now``).
def _naming_order(table: sa.Table) -> tuple[sa.ColumnElement[bool], sa.ColumnElement[bool]]:
    """``table``'s rows of the order the bound parameters ``of_merchant`` and ``of_order`` name (``_of_order``)."""
    return (
        table.c.merchant_id == sa.bindparam("of_merchant", type_=table.c.merchant_id.type),
        table.c.order_id == sa.bindparam("of_order", type_=table.c.order_id.type),
    )


_ORDER_ACTIONS = _naming_order(actions)
_NOW = sa.bindparam("at_now", type_=actions.c.updated_at.type)
_OTHER_THAN = sa.bindparam("other_than", type_=actions.c.action_id.type)
_UNKNOWN_CHARGE_OF_ORDER: Final = sa.select(sa.func.min(actions.c.action_id)).where(*_ORDER_ACTIONS, UNKNOWN_CHARGE)
_MESSAGES_OPEN_OF_ORDER: Final = sa.select(actions).where(
    *_ORDER_ACTIONS, actions.c.state.in_(OPEN_ACTION_STATES), actions.c.kind == ActionKind.NUDGE.value
)
# A message with its provider keeps its claim's token beside its 'being sent' mark (``_cancel_open``).
_CANCEL_OPEN_OF_ORDER: Final = (
    actions.update()
    .where(
        *_ORDER_ACTIONS,
        actions.c.state.in_(OPEN_ACTION_STATES),
        actions.c.kind != ActionKind.WEBHOOK.value,
        actions.c.kind.not_in([kind.value for kind in SWITCH_FOLLOW_UPS]),
        sa.not_(_maybe_with_connector()),
    )
    .values(
        state=ActionState.CANCELLED.value,
        claim_token=sa.case((_message_with_its_provider(), actions.c.claim_token), else_=sa.null()),
        updated_at=_NOW,
    )
)
_SUPERSEDE_WAITING_OF_ORDER: Final = (
    agent_queue.update()
    .where(
        *_naming_order(agent_queue),
        agent_queue.c.state == "pending",
    )
    .values(state="superseded", acted_at=sa.bindparam("at_now", type_=agent_queue.c.acted_at.type))
)
# ``Executor.charge_ahead_of``: what goes first for a retry, for a message, and for any other charge.
_CHARGE_SENT_UNANSWERED = sa.and_(IS_CHARGE, actions.c.unanswered_since.is_not(None))
_AHEAD_OF_RETRY = sa.or_(
    _CHARGE_SENT_UNANSWERED,
    sa.and_(
        IS_CHARGE,
        actions.c.state == ActionState.CLAIMED.value,
        sa.or_(actions.c.kind == ActionKind.LINK_PAYMENT.value, actions.c.action_id < _OTHER_THAN),
    ),
    # a payment-link message on its way to the provider (Effects._mark_message_sending); a mark left on one that
    # is not claimed (its unmark failed) holds nothing, and a claim clears it
    _message_with_its_provider(),
)


def _first_due_ahead(goes_first: sa.ColumnElement[bool]) -> sa.Select[Any]:
    """The earliest due_at of the order's other open actions that ``goes_first`` (``Executor.charge_ahead_of``)."""
    return sa.select(sa.func.min(actions.c.due_at)).where(
        *_ORDER_ACTIONS, actions.c.action_id != _OTHER_THAN, actions.c.state.in_(OPEN_ACTION_STATES), goes_first
    )


_AHEAD_BY_KIND: Final[dict[str, sa.Select[Any]]] = {
    ActionKind.RETRY.value: _first_due_ahead(_AHEAD_OF_RETRY),
    ActionKind.NUDGE.value: _first_due_ahead(_maybe_with_connector()),  # a charge claimed now, about to be sent, too
}
_AHEAD_OF_OTHERS: Final = _first_due_ahead(_CHARGE_SENT_UNANSWERED)


_RETRIES_DEAD_UNSENT_OF_ORDER: Final = sa.select(actions.c.payload_json).where(
    *_ORDER_ACTIONS,
    actions.c.kind == ActionKind.RETRY.value,
    actions.c.state == ActionState.DEAD.value,
    actions.c.unanswered_since.is_(None),
)
_ATTEMPTS_OF_ORDER: Final = (
    sa.select(transactions).where(*_naming_order(transactions)).order_by(transactions.c.attempt_number)
)
_NUDGES_OF_ORDER: Final = sa.select(nudges).where(*_naming_order(nudges)).order_by(nudges.c.sent_at)
_ORDER: Final = sa.select(orders).where(*_naming_order(orders))
_ORDER_FOR_UPDATE: Final = _ORDER.with_for_update()


def _of_order(order: RowMapping, **more: Any) -> dict[str, Any]:
    """The bound parameters naming ``order`` in the statements above (and ``more``)."""
    return {"of_merchant": order["merchant_id"], "of_order": order["order_id"], **more}


@dataclass
class Executor:
    """The state machine over one database; shared by the HTTP routes and the workers."""

    engine: Engine
    config: WinbackConfig
    decider: Decider
    links: LinkSigner
    retry_policy: RetryPolicy = field(default_factory=RetryPolicy)
    clock: Callable[[], datetime] = utcnow
    #: The error catalog the decider's rules read (the API's carries its gateway status map overlay): the card on
    #: file's bans are judged with it too (``_with_card_on_file_ban``).
    catalog: ErrorCatalog = field(default_factory=load_catalog)
    #: The most receipts kept per merchant that matched no nudge yet (``record_receipt``): past it the oldest go,
    #: so a flood of receipts for ids never sent (another sender's on the same provider account) stays bounded.
    early_receipts_per_merchant: int = 10_000

    # ------------------------------------------------------------------------------------------ helpers

    def merchant(self, merchant_id: str) -> MerchantConfig:
        """The merchant's config; KeyError names an unknown merchant."""
        found = self.config.merchants.get(merchant_id)
        if found is None:
            raise KeyError(f"unknown merchant_id {merchant_id!r}: not in the merchant config")
        return found

    def for_update(self, query: SelectT) -> SelectT:
        """``query`` locking the rows it reads until the transaction ends (PostgreSQL; SQLite's write
        transactions run one at a time)."""
        return query.with_for_update() if is_postgres(self.engine) else query

    def lock_order(self, conn: sa.Connection, merchant_id: str, order_id: str) -> RowMapping | None:
        query = _ORDER_FOR_UPDATE if is_postgres(self.engine) else _ORDER
        return conn.execute(query, {"of_merchant": merchant_id, "of_order": order_id}).mappings().first()

    def _schedule(
        self,
        conn: sa.Connection,
        merchant_id: str,
        order_id: str,
        kind: ActionKind,
        due_at: datetime,
        key: str,
        now: datetime,
        payload: Mapping[str, Any] | None = None,
        decision_id: str | None = None,
    ) -> bool:
        """Insert one scheduled action unless its idempotency key exists already; True when inserted."""
        exists = conn.scalar(sa.select(actions.c.action_id).where(actions.c.idempotency_key == key))
        if exists is not None:
            return False
        conn.execute(
            actions.insert().values(
                merchant_id=merchant_id,
                order_id=order_id,
                kind=kind.value,
                state=ActionState.SCHEDULED.value,
                due_at=due_at,
                planned_at=due_at,
                attempts=0,
                idempotency_key=key,
                decision_id=decision_id,
                payload_json=_dump(dict(payload or {})),
                created_at=now,
                updated_at=now,
            )
        )
        return True

    def request_for(
        self, conn: sa.Connection, order: RowMapping, now: datetime, *, sending: ActionRow | None = None
    ) -> DecisionRequest:
        """The order's decision request at ``now``: the failure event, its last failure and its full history.

        ``sending``: the action whose send is checked against the rules: a charge about to be sent for the first
        time is not an attempt yet, and a message about to be (re-)sent is not in the history yet."""
        base = orjson.loads(order["request_json"])
        base["failure"] = orjson.loads(order["failure_json"])
        base["event_time"] = now.isoformat()
        rows = conn.execute(_ATTEMPTS_OF_ORDER, _of_order(order)).all()
        attempts = [
            {
                "attempt_number": row.attempt_number,
                "connector": row.connector,
                "strategy": row.strategy,
                "status": _attempt_status(row.status),
                "error_code": row.error_code,
                "created_at": as_utc(row.created_at).isoformat(),
                "txn_id": row.txn_id,
            }
            for row in rows
        ]
        _count_own_reattempts(base, rows, now)
        # Numbers reserved for charges that certainly never went out (replaced by a later decision, or refused
        # by the rules at their send) or have not gone out yet are not attempts: the rules would count each gap as
        # a retry made (an approved retry waiting for payday, its number taken before a payment by link's).
        recorded = {attempt["attempt_number"] for attempt in attempts}
        skipped = self._numbers_never_used(conn, order, recorded, sending)
        if skipped:
            for attempt in attempts:
                attempt["attempt_number"] -= sum(1 for number in skipped if number < attempt["attempt_number"])
        # A message WhatsApp held back (a try-later or a rate limit: ``record_receipt``) never reached the customer:
        # left out, it counts neither against max_nudges nor the day, and the next message is the one it was meant
        # to be (held to the same cadence day). It stays on record (and in the exported history) as undelivered.
        recorded_nudges = conn.execute(_NUDGES_OF_ORDER, _of_order(order)).all()
        sent = [
            {
                "channel": row.channel,
                "sent_at": as_utc(row.sent_at).isoformat(),
                "delivered": bool(row.delivered),
                "clicked_at": as_utc(row.clicked_at).isoformat() if row.clicked_at else None,
                "nudge_id": row.nudge_id,
            }
            for row in recorded_nudges
            if not held_back(row.delivered, row.error)
        ]
        on_record = {str(row.nudge_id) for row in recorded_nudges}
        sent.extend(
            message
            for message in self._messages_maybe_out(conn, order, sending)
            if message["nudge_id"] not in on_record
        )
        sent.sort(key=lambda nudge: str(nudge["sent_at"]))
        base["history"] = {"attempts": attempts, "nudges": sent}
        failed = self._failed_connectors(conn, order, now)
        if failed:
            offered = base.get("available_connectors")
            if offered is None:
                offered = list(self.merchant(order["merchant_id"]).connectors)
            base["available_connectors"] = [name for name in offered if name.strip().lower() not in failed]
        # Opt-outs are kept per address, not per order: one made since the failure (or on another order) counts.
        # A channel whose provider said the address cannot get its messages (not on WhatsApp) is off for this
        # order: the rules treat it as opted out, so the order is decided on its other channels.
        opted = opted_out_channels(conn, order["merchant_id"], base["customer"]) | _undeliverable_channels(conn, order)
        if opted:
            with_opt_outs(base["customer"], opted)
        return self._with_card_on_file_ban(DecisionRequest.model_validate(base), rows)

    def _with_card_on_file_ban(self, request: DecisionRequest, rows: Sequence[sa.Row[Any]]) -> DecisionRequest:
        """``request``, or, when its failure is a payment link's decline, the same request about the card on file's
        last decline where that one restricts silent re-attempts for good (``lasting_bans``: every one, or all but a
        3DS step-up after a suspected fraud) in a way the link's does not. A silent retry charges the card on file: a
        Visa category-1 decline or a MAC 03 of it was forgotten once a link payment was declined otherwise (a 91,
        say), and the card was re-attempted (review); so was a Mastercard 83 with MAC 01, whose advice is to
        authenticate the cardholder, as it was, without a step-up (review).

        The card on file's context is built first: most of its declines restrict nothing for good, and then the
        link's context is not built at all (the decider builds the one it decides on)."""
        failed = [row for row in rows if _attempt_status(row.status) == "failure"]
        if not failed or failed[-1].strategy != Strategy.RETARGET_LINK.value:
            return request
        on_file = next((row for row in reversed(failed) if row.strategy != Strategy.RETARGET_LINK.value), None)
        if on_file is None:
            return request
        decline = Failure(
            connector=on_file.connector,
            error_code=on_file.error_code,
            error_message=on_file.error_message,
            network_decline_code=on_file.network_decline_code,
            merchant_advice_code=on_file.merchant_advice_code,
            unified_code=on_file.unified_code,
        )
        stricter = request.model_copy(update={"failure": decline})
        merchant = self.merchant(request.merchant_id)
        on_file_bans = lasting_bans(build_context(stricter, merchant, self.catalog))
        if not on_file_bans:
            return request
        link_bans = lasting_bans(build_context(request, merchant, self.catalog))
        if not LASTING_RETRY_BANS.isdisjoint(link_bans) or on_file_bans <= link_bans:
            return request  # the link's own decline forbids as much already (and keeps its own bans on links)
        return stricter

    @staticmethod
    def _messages_maybe_out(conn: sa.Connection, order: RowMapping, sending: ActionRow | None) -> list[dict[str, Any]]:
        """The order's messages not on record that may have reached the customer, as the history's nudges: a try
        of each timed out (or its worker died) and its re-send waits (``MESSAGE_MAYBE_SENT_TRIES``), dated by that
        first try. A provider that took it told nobody, so counted it is: one message a day, the skip-days cadence
        and ``max_nudges`` hold for a new message as if it had been confirmed (review: an order decided again while
        such a re-send waited got a second message the same day). So does a message with its provider now (claimed
        and marked as being sent, its answer not yet recorded), dated by its hand-over: an order decided again
        meanwhile (its customer paid an earlier link and was declined) planned the next message as if none were out,
        and only that message's send caught it (review). ``sending``: the message being sent, left out; when it is a
        message, another one with its provider now is not counted either: its send waits for that one's answer
        (``message_being_sent``), which decides whether it may still go."""
        rows = conn.execute(_MESSAGES_OPEN_OF_ORDER, _of_order(order)).mappings()
        counts_in_flight = sending is None or sending.kind != ActionKind.NUDGE
        maybe_out = []
        for row in rows:
            action = ActionRow.of(row)
            if sending is not None and sending.action_id == action.action_id:
                continue
            in_flight = action.state == ActionState.CLAIMED and row["unanswered_since"] is not None
            if action.payload.get(MESSAGE_MAYBE_SENT_TRIES):
                sent_at = _maybe_sent_at(action, as_utc(row["updated_at"]))
            elif in_flight and counts_in_flight:
                sent_at = as_utc(row["unanswered_since"])
            else:
                continue
            maybe_out.append(
                {
                    "channel": str(action.payload.get("channel")),
                    "sent_at": sent_at.isoformat(),
                    "delivered": False,
                    "clicked_at": None,
                    "nudge_id": nudge_id_for(action.idempotency_key),
                }
            )
        return maybe_out

    def rules_now(
        self,
        conn: sa.Connection,
        order: RowMapping,
        action: ActionRow,
        now: datetime,
        catalog: ErrorCatalog | None = None,
        *,
        sending: bool = False,
    ) -> RuleContext:
        """The rules' facts about the action's order at ``now``, with its merchant's config as it is now (``catalog``:
        the worker's, else this executor's); ``sending``: the action is a charge about to be sent, not an attempt
        made yet (a first send; or a re-send, or the send again after "not found", which charge if the earlier
        send never reached the switch)."""
        request = self.request_for(conn, order, now, sending=action if sending else None)
        return build_context(request, self.merchant(action.merchant_id), catalog or self.catalog)

    def _numbers_never_used(
        self, conn: sa.Connection, order: RowMapping, recorded: set[int], sending: ActionRow | None = None
    ) -> set[int]:
        """The attempt numbers the order's charge actions reserved and never used: cancelled or done without an
        attempt on record, and never marked sent (so no processor has seen ``<order_id>_<n>``); and those of link
        payments settled without an attempt on record (dead, answered "not charged" by an operator): the customer's
        own payments, never a silent retry, whatever reached the processor. Those not used yet too: scheduled and
        never sent, and ``sending``, the charge whose first send is being checked."""
        settled_or_waiting = (ActionState.CANCELLED, ActionState.DONE, ActionState.DEAD, ActionState.SCHEDULED)
        unused: sa.ColumnElement[bool] = sa.and_(
            actions.c.state.in_([state.value for state in settled_or_waiting]), actions.c.unanswered_since.is_(None)
        )
        # ``sending`` whatever its 'sent' mark: a re-send, or the send again after "not found", checked as the charge
        # it is if the earlier send never reached the switch.
        sending_id = None if sending is None else sending.action_id
        if sending_id is not None:
            unused = sa.or_(unused, actions.c.action_id == sending_id)
        rows = conn.execute(
            sa.select(actions.c.action_id, actions.c.kind, actions.c.state, actions.c.payload_json).where(
                actions.c.merchant_id == order["merchant_id"],
                actions.c.order_id == order["order_id"],
                IS_CHARGE,
                unused,
            )
        )
        numbers = set()
        for action_id, kind, state, payload_json in rows:
            payload = orjson.loads(payload_json or "{}")
            # a dead retry counts only when it certainly never went out (_retry_failed_to_go_out)
            if (
                action_id == sending_id
                or state != ActionState.DEAD.value
                or payload.get(CONNECTOR_FAILED)
                or kind == ActionKind.LINK_PAYMENT
            ):
                numbers.add(payload.get("attempt_number"))
        return {int(number) for number in numbers if isinstance(number, int) and number not in recorded}

    def _failed_connectors(self, conn: sa.Connection, order: RowMapping, now: datetime) -> set[str]:
        """The connectors (lower case) of the order's retries that could not go out through them
        (``_retry_failed_to_go_out``): the order is not offered them again (one no try reached, until its hold
        ends: a short outage or a rate limit does not take the merchant's connector out of the order for good)."""
        payloads = conn.scalars(_RETRIES_DEAD_UNSENT_OF_ORDER, _of_order(order))
        failed = set()
        for payload_json in payloads:
            payload = orjson.loads(payload_json or "{}")
            until = payload.get(CONNECTOR_FAILED_UNTIL)
            if until is not None and as_utc(datetime.fromisoformat(str(until))) <= now:
                continue
            if payload.get(CONNECTOR_FAILED) and payload.get("connector"):
                failed.add(str(payload["connector"]).strip().lower())
        return failed

    # ----------------------------------------------------------------------------------------- events

    def _idempotent(
        self,
        merchant_id: str,
        kind: str,
        body: Mapping[str, Any],
        apply: Callable[[sa.Connection, datetime], EventAnswer],
    ) -> EventAnswer:
        key = str(body["idempotency_key"])
        digest = hashlib.sha256(_canonical(body)).hexdigest()
        for attempt in range(3):
            try:
                with self.engine.begin() as conn:
                    stored = conn.execute(
                        sa.select(event_keys).where(
                            event_keys.c.merchant_id == merchant_id, event_keys.c.idempotency_key == key
                        )
                    ).first()
                    if stored is not None:
                        if stored.kind != kind or stored.body_sha256 != digest:
                            raise IdempotencyConflictError(
                                f"idempotency_key {key!r} was already used with a different {stored.kind} event"
                            )
                        answer = orjson.loads(stored.response_json)
                        return EventAnswer(order_id=answer["order_id"], state=answer["state"])
                    now = self.clock()
                    result = apply(conn, now)
                    conn.execute(
                        event_keys.insert().values(
                            merchant_id=merchant_id,
                            idempotency_key=key,
                            kind=kind,
                            body_sha256=digest,
                            response_json=_dump({"order_id": result.order_id, "state": result.state}),
                            created_at=now,
                        )
                    )
                    return result
            except IntegrityError:
                # A concurrent request with the same key or order won the race (PostgreSQL): look again.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def payment_failed(self, merchant_id: str, body: Mapping[str, Any]) -> EventAnswer:
        """A failed payment arrives: create the order and run its first decision point (idempotent by key).

        ``body`` is the JSON event (a decision request plus ``idempotency_key``). An order that exists already
        is left as it is and its state answered.
        """
        request = DecisionRequest.model_validate({k: v for k, v in body.items() if k != "idempotency_key"})
        merchant = self.merchant(merchant_id)

        def apply(conn: sa.Connection, now: datetime) -> EventAnswer:
            existing = self.lock_order(conn, merchant_id, request.order_id)
            if existing is not None:
                return EventAnswer(order_id=request.order_id, state=existing["state"])
            self._create_order(conn, merchant_id, merchant, request, now)
            order = self.lock_order(conn, merchant_id, request.order_id)
            assert order is not None
            self._decision_point(conn, order, now)
            state = conn.scalar(
                sa.select(orders.c.state).where(
                    orders.c.merchant_id == merchant_id, orders.c.order_id == request.order_id
                )
            )
            return EventAnswer(order_id=request.order_id, state=str(state))

        return self._idempotent(merchant_id, "payment_failed", body, apply)

    @staticmethod
    def _check_txn_ids_free(
        conn: sa.Connection, merchant_id: str, rows: list[tuple[int, str]], history: Sequence[Any]
    ) -> None:
        """TxnIdTakenError naming the first attempt whose txn_id another order of the merchant has already (it was
        a database error, a 500: review). Another merchant's attempts never count: their txn_ids are theirs."""
        if not rows:
            return
        taken = set(
            conn.scalars(
                sa.select(transactions.c.txn_id).where(
                    transactions.c.merchant_id == merchant_id, transactions.c.txn_id.in_([t for _, t in rows])
                )
            )
        )
        for index, txn_id in rows:
            if txn_id in taken:
                number = history[index].attempt_number
                raise TxnIdTakenError(
                    f"history.attempts (attempt_number {number}).txn_id: {txn_id!r} is already the txn_id of another "
                    "order's attempt; txn_ids are unique across the history"
                )

    def _create_order(
        self, conn: sa.Connection, merchant_id: str, merchant: MerchantConfig, request: DecisionRequest, now: datetime
    ) -> None:
        failure = request.failure
        history = sorted(request.history.attempts, key=lambda a: a.attempt_number)
        rows: list[dict[str, Any]] = []
        for index, attempt in enumerate(history):
            extra = attempt.model_extra or {}
            last = index == len(history) - 1
            rows.append(
                {
                    "txn_id": str(
                        extra.get("txn_id")
                        or "txn_" + _short_hash(merchant_id, request.order_id, attempt.attempt_number)
                    ),
                    "attempt_number": attempt.attempt_number,
                    "strategy": str(attempt.strategy),
                    "connector": attempt.connector,
                    "status": attempt.status,
                    "error_code": attempt.error_code,
                    "error_message": failure.error_message if last else None,
                    "network_decline_code": failure.network_decline_code if last else None,
                    "merchant_advice_code": failure.merchant_advice_code if last else None,
                    "unified_code": failure.unified_code if last else None,
                    "created_at": attempt.created_at,
                }
            )
        self._check_txn_ids_free(conn, merchant_id, [(index, row["txn_id"]) for index, row in enumerate(rows)], history)
        if not rows:
            rows.append(
                {
                    "txn_id": "txn_" + _short_hash(merchant_id, request.order_id, 1),
                    "attempt_number": 1,
                    "strategy": Strategy.INITIAL.value,
                    "connector": failure.connector,
                    "status": "failure",
                    "error_code": failure.error_code,
                    "error_message": failure.error_message,
                    "network_decline_code": failure.network_decline_code,
                    "merchant_advice_code": failure.merchant_advice_code,
                    "unified_code": failure.unified_code,
                    "created_at": request.event_time,
                }
            )
        first_failed_at: datetime = min(as_utc(row["created_at"]) for row in rows)
        request_json = request.model_dump_json(exclude={"history"})
        conn.execute(
            orders.insert().values(
                merchant_id=merchant_id,
                order_id=request.order_id,
                state=OrderState.PENDING.value,
                mode=merchant.mode,
                amount=request.amount,
                currency=request.currency,
                customer_id=request.customer.id,
                request_json=request_json,
                failure_json=failure.model_dump_json(),
                attempt_count=max(int(row["attempt_number"]) for row in rows),
                nudge_count=len(request.history.nudges),
                first_failed_at=first_failed_at,
                created_at=now,
                updated_at=now,
            )
        )
        conn.execute(
            transactions.insert(),
            [
                row
                | {
                    "merchant_id": merchant_id,
                    "order_id": request.order_id,
                    "processor_payment_id": f"{request.order_id}_{row['attempt_number']}",
                    "idempotency_key": None,
                }
                for row in rows
            ],
        )
        for index, nudge in enumerate(request.history.nudges):
            conn.execute(
                nudges.insert().values(
                    nudge_id="ndg_" + _short_hash(merchant_id, request.order_id, "history", index),
                    merchant_id=merchant_id,
                    order_id=request.order_id,
                    channel=str(nudge.channel),
                    template_id="external",
                    sent_at=nudge.sent_at,
                    status="accepted",
                    delivered=nudge.delivered,
                    clicked_at=nudge.clicked_at,
                )
            )
        window_end = first_failed_at + timedelta(days=merchant.retarget.retry_window_days)
        self._schedule(
            conn,
            merchant_id,
            request.order_id,
            ActionKind.CLOSE,
            max(window_end, now),
            f"{merchant_id}:{request.order_id}:close:window",
            now,
        )

    def payment_succeeded(self, merchant_id: str, body: Mapping[str, Any]) -> EventAnswer:
        """The order succeeded elsewhere: mark it SUCCEEDED and cancel everything still scheduled (idempotent)."""
        order_id = str(body["order_id"])

        def apply(conn: sa.Connection, now: datetime) -> EventAnswer:
            order = self.lock_order(conn, merchant_id, order_id)
            if order is None:
                raise OrderNotFoundError(f"order {order_id!r} is not known for merchant {merchant_id!r}")
            if order["state"] in OPEN_ORDER_STATES:
                occurred = datetime.fromisoformat(str(body["occurred_at"]))
                if self._succeed(conn, order, str(body["txn_id"]), as_utc(occurred), now):
                    self._named_a_declined_charge(conn, merchant_id, order_id, now)
            elif order["state"] == OrderState.SUCCEEDED:
                self._merchant_paid_too(conn, order, str(body["txn_id"]), now)
            state = conn.scalar(
                sa.select(orders.c.state).where(orders.c.merchant_id == merchant_id, orders.c.order_id == order_id)
            )
            return EventAnswer(order_id=order_id, state=str(state))

        return self._idempotent(merchant_id, "payment_succeeded", body, apply)

    @staticmethod
    def _merchant_paid_too(conn: sa.Connection, order: RowMapping, txn_id: str, now: datetime) -> None:
        """The merchant reports ``order``, settled already, paid by ``txn_id``. When winback's own charge settled it
        (its success txn id names that charge) and ``txn_id`` names no charge of winback's, the merchant took a
        payment of its own: the customer may have paid twice. Noted on the charge (MERCHANT_PAID_TOO: listed by
        ``paid_twice``, counted on /metrics) and logged, once per merchant txn id (a report delivered twice with one
        idempotency key never reaches here; with two keys it finds its txn id noted). Nothing is refunded: which
        payment to give back, if any, is the merchant's and an operator's call. The order stays SUCCEEDED on
        winback's charge, with its one webhook. ``order`` is locked."""
        if txn_id == order["success_txn_id"]:
            return
        charges = _order_charges(conn, order["merchant_id"], order["order_id"])
        if any(_names_payment(charge, txn_id) for charge in charges):
            return  # one of winback's own payments, not the merchant's
        settled_by = next((charge for charge in charges if _names_charge(order, charge)), None)
        if settled_by is None:
            return  # settled by a payment of the merchant's own before: not winback's charge
        reported = settled_by.payload.get(MERCHANT_PAID_TOO)
        reported = dict(reported) if isinstance(reported, dict) else {}
        if txn_id in reported:
            return  # the same report again (under another idempotency key): noted and logged once
        reported[txn_id] = {"at": now.isoformat()}
        conn.execute(
            actions.update()
            .where(actions.c.action_id == settled_by.action_id)
            .values(payload_json=_dump(settled_by.payload | {MERCHANT_PAID_TOO: reported}), updated_at=now)
        )
        note_case(conn, PAID_TWICE_CASE, order["merchant_id"], order["order_id"], settled_by.action_id, now, ref=txn_id)
        log.warning(
            "order %s was paid by winback's charge (payment %s_%s via %s, txn_id %s) and its merchant now reports it "
            "paid by its own payment txn_id %r: the customer may have paid twice; winback refunds nothing on its own, "
            "check with the merchant (winback executor refunds-by-hand lists it)",
            order["order_id"],
            settled_by.order_id,
            settled_by.payload.get("attempt_number"),
            settled_by.payload.get("connector"),
            order["success_txn_id"],
            txn_id,
            extra={"merchant_id": order["merchant_id"], "order_id": order["order_id"]},
        )

    def _named_a_declined_charge(self, conn: sa.Connection, merchant_id: str, order_id: str, now: datetime) -> None:
        """The merchant's ``payment-succeeded`` that settled order ``order_id`` named a charge of winback's whose
        switch had declined it already (its attempt recorded as a failure): flagged as a charge dispute at once
        (``_flag_dispute``). A charge named that is still with its switch, or unknown, is flagged when a decline
        comes (``_record_attempt``, ``_answer_after_not_charged``)."""
        order = self.lock_order(conn, merchant_id, order_id)
        assert order is not None
        for charge in _order_charges(conn, merchant_id, order_id):
            if not _paid_on_the_merchants_word(order, charge):
                continue
            declined = conn.execute(
                sa.select(transactions.c.connector, transactions.c.status, transactions.c.error_code).where(
                    transactions.c.merchant_id == merchant_id,
                    transactions.c.txn_id == txn_id_for(charge.idempotency_key),
                )
            ).first()
            if declined is not None and _attempt_status(declined.status) == "failure":
                result = ChargeResult(status="failure", connector=declined.connector, error_code=declined.error_code)
                self._flag_dispute(conn, order, charge, None, _declined(result), now)

    # ------------------------------------------------------------------------------- decision points

    def _decision_point(
        self, conn: sa.Connection, order: RowMapping, now: datetime, cause: str | None = None
    ) -> Decision | None:
        """Ask decide() what to do next for an open order, record the decision and act on it (or queue it).

        ``cause``: what happened that the order is decided again (a declined attempt, an unanswered message, ...),
        told to the agents whose approval it withdraws or leaves standing (``_approval_stands``)."""
        if order["state"] not in OPEN_ORDER_STATES:
            return None
        unknown = self.unknown_charge(conn, order)
        if unknown is not None:
            # The customer may have paid already: no retry and no message asking them to pay, until an operator
            # has answered for that charge (resolve-charge decides the order again when nothing was taken).
            _log_unknown_charge(order, unknown, "order not decided")
            return None
        merchant = self.merchant(order["merchant_id"])
        request = self.request_for(conn, order, now)
        decision = self._decide_with_channels_down(conn, request, merchant, now)
        conn.execute(decisions.insert().values(**decision_row(request, decision, created_at=now)))
        # Whatever waited for an agent is out of date now (also when the merchant has left assisted mode): left
        # waiting, it became the order's recommendation again once the newer one was acted on.
        self._supersede_waiting(conn, order, now)
        if merchant.mode == "assisted":
            if self._approval_stands(conn, order, request, decision, cause, now):
                return decision
            self._queue_decision(conn, order, request, decision, now)
            self._set_state(conn, order, OrderState.AWAITING_AGENT, now)
            return decision
        self._carry_out(conn, order, decision, now)
        return decision

    def _decide_with_channels_down(
        self, conn: sa.Connection, request: DecisionRequest, merchant: MerchantConfig, now: datetime
    ) -> Decision:
        """decide(), leaving out the merchant's channels that are down (service/executor/outages.py).

        When that leaves nothing worth doing (stop) but a message on a down channel would have been sent, the
        message waits for the channel instead: it is planned for the end of the channel's hold (no sooner than
        decided), and its send checks the rules again then (quiet hours wait, a closed window decides again). A
        provider's outage does not fail the order of a merchant with one channel."""
        listed = set(merchant.retarget.channels)
        down, over = self.retry_policy.channels_out(conn, request.merchant_id, now)
        down = {channel: until for channel, until in down.items() if channel in listed}
        noted = down_note(down)
        # A channel on which WhatsApp held one of the order's messages back as a try-later waits as a channel down
        # does, for this order only: not retried there the same day (Meta: not within 24 hours), while another
        # channel may take the message now.
        held = {channel: until for channel, until in _held_channels(conn, request, now).items() if channel in listed}
        noted += [f"channel_held:{channel.value}" for channel in sorted(held, key=lambda c: c.value)]
        # A sender held for hours for its daily quota is out as a channel down is, for every order of the merchant.
        over = {channel: until for channel, until in over.items() if channel in listed}
        noted += [over_quota_entry(channel) for channel in sorted(over, key=lambda c: c.value)]
        for channel, until in [*held.items(), *over.items()]:
            down[channel] = max(until, down.get(channel, until))
        if not down:
            return self.decider(request, merchant)
        decision = self.decider(request, without_channels(merchant, down))
        if decision.action == Action.STOP:
            # Decided as of the end of the first hold, so its execute_at keeps every rule then (quiet hours, the
            # skip-days cadence, the window): moved there by hand, it fell inside the quiet hours (review of c65ddd9).
            waiting = self.decider(request.model_copy(update={"event_time": min(down.values())}), merchant)
            if waiting.action == Action.RETARGET and waiting.channel is not None and waiting.channel in down:
                until = down[waiting.channel]
                how = "held back" if waiting.channel in {**held, **over} else "down"
                return waiting.model_copy(
                    update={
                        "execute_at": max(as_utc(waiting.execute_at), until),
                        "reasons": [
                            *waiting.reasons,
                            f"{waiting.channel.value} is {how} until {utc_second(until)}: the message waits for it",
                        ],
                        "rules_applied": [*waiting.rules_applied, *noted],
                    }
                )
        return decision.model_copy(update={"rules_applied": [*decision.rules_applied, *noted]})

    def _approval_stands(
        self,
        conn: sa.Connection,
        order: RowMapping,
        request: DecisionRequest,
        decision: Decision,
        cause: str | None,
        now: datetime,
    ) -> bool:
        """Assisted mode, the order decided again: settle the agent's latest approval not yet carried out. True
        when it stands (nothing for an agent to review, ``decision`` is kept as agreeing with it).

        An approved retry or message waiting to be carried out (a retry after payday) stands when ``decision``
        plans the same (``_same_plan``): the agent approved what the policy still recommends. Otherwise it is
        withdrawn, its action cancelled, and says by which decision and why, so the agent sees it next to the new
        recommendation: before, the action stayed scheduled beside the new recommendation and was cancelled
        without a word when it fell due ("order is AWAITING_AGENT"). An approved action that ended without effect
        (the rules refused it at its send, its message could not go, the customer opted out) is withdrawn too.
        An approved action being carried out (a charge sent and waiting for its answer, a message with its
        provider now) is left to finish; one a worker has claimed and not sent yet is settled as if waiting. An
        approved stop whose close waits for a live link is settled the same way (``_approved_stop_stands``)."""
        where = (agent_queue.c.merchant_id == order["merchant_id"], agent_queue.c.order_id == order["order_id"])
        # The latest approval, withdrawn or not: one withdrawn already is settled, and an older one behind it was
        # settled when the newer one was given (review: the latest not withdrawn reached back to an approval carried
        # out or cancelled long before, and stamped it with today's cause).
        approval = (
            conn.execute(
                sa.select(agent_queue)
                .where(*where, agent_queue.c.state == "approved")
                .order_by(agent_queue.c.item_id.desc())
                .limit(1)
            )
            .mappings()
            .first()
        )
        if approval is None or approval["withdrawn_at"] is not None:
            return False
        why = f"decided again: {cause}" if cause else "decided again"
        if Decision.model_validate_json(approval["decision_json"]).action == Action.STOP:
            return self._approved_stop_stands(conn, order, request, decision, approval, why, now)
        of_approval = (
            actions.c.merchant_id == order["merchant_id"],
            actions.c.order_id == order["order_id"],
            actions.c.decision_id == approval["decision_id"],
            actions.c.kind.in_([ActionKind.RETRY.value, ActionKind.NUDGE.value]),
        )
        planned = conn.execute(sa.select(actions.c.action_id, actions.c.state).where(*of_approval)).all()
        if not planned:
            return False  # nothing was planned for it: nothing to settle
        # Waiting to be carried out: a retry never sent, or a message waiting for its time, or for its re-send
        # after a try that timed out (it may be with the customer: review; a new decision does not replace it,
        # ``_replaceable``, but an approval withdrawn is not carried out, and the order waits for an agent). Also
        # one a worker has claimed and not sent yet: it sends only under the order's lock, held here, so it sees
        # what becomes of it (before, it was left to finish, and its worker skipped it, "order is AWAITING_AGENT",
        # with the approval neither kept nor withdrawn: review). Its row is locked first (PostgreSQL): a claim
        # being committed is waited for and read as committed.
        not_out = sa.or_(
            actions.c.unanswered_since.is_(None),
            # a message's mark holds only while it is claimed (a claim clears one its worker left behind)
            sa.and_(actions.c.kind == ActionKind.NUDGE.value, actions.c.state == ActionState.SCHEDULED.value),
        )
        waiting = [
            ActionRow.of(row)
            for row in conn.execute(
                self.for_update(
                    sa.select(actions)
                    .where(*of_approval, actions.c.state.in_(OPEN_ACTION_STATES), not_out)
                    .order_by(actions.c.action_id)
                )
            ).mappings()
        ]
        if not waiting and (
            any(row.state in OPEN_ACTION_STATES for row in planned) or self._carried_out(conn, approval["decision_id"])
        ):
            return False
        if waiting and _same_plan(decision, waiting[0]):
            self._approval_agreed(conn, order, request, decision, approval, why, now)
            return True
        withdrawn_why = why
        for action in waiting:
            if self._keep_maybe_sent(conn, action, f"approval withdrawn: {why}", now):
                withdrawn_why += (
                    f"; its {action.payload.get('channel')} message may have reached the customer (its provider "
                    "never answered a try): it is not sent again, and no other message goes the same day"
                )
        if waiting:
            # A worker holding one of them finds its claim gone and sends nothing ("no longer this worker's").
            _cancel_withdrawn(conn, [action.action_id for action in waiting], why, now)
        self._withdraw(conn, approval, decision, withdrawn_why, now)
        return False

    def _approved_stop_stands(
        self,
        conn: sa.Connection,
        order: RowMapping,
        request: DecisionRequest,
        decision: Decision,
        approval: RowMapping,
        why: str,
        now: datetime,
    ) -> bool:
        """``_approval_stands`` for an approved stop whose close still waits (for the customer's live link to
        expire, or a charge to be answered). It stands when ``decision`` stops too, and is carried out again now
        (the link the customer used is no longer live: the order fails unless another is). Otherwise it is
        withdrawn and its close cancelled: left, it failed the order at the link's expiry under the new
        recommendation, and the agent was told nothing (review)."""
        closes = conn.scalars(
            self.for_update(sa.select(actions.c.action_id).where(_stop_close(order["merchant_id"], order["order_id"])))
        )
        waiting = list(closes)
        if not waiting:
            return False  # carried out: the order failed, or is no longer the stop's to close
        if decision.action == Action.STOP:
            self._approval_agreed(conn, order, request, decision, approval, why, now)
            self._carry_out(conn, order, decision, now)
            return True
        _cancel_withdrawn(conn, waiting, why, now)
        self._withdraw(conn, approval, decision, why, now)
        return False

    def _approval_agreed(
        self,
        conn: sa.Connection,
        order: RowMapping,
        request: DecisionRequest,
        decision: Decision,
        approval: RowMapping,
        why: str,
        now: datetime,
    ) -> None:
        """``decision`` plans what the agent's ``approval`` does: the approval stands, the decision is kept as
        agreeing with it, and nothing waits for an agent."""
        agreement = (
            f"the same plan as {approval['agent'] or 'an agent'}'s approval ({approval['decision_id']}), "
            f"which stands: {why}"
        )
        self._queue_decision(conn, order, request, decision, now, agreed=agreement)
        self._set_state(conn, order, OrderState.PENDING, now)

    @staticmethod
    def _withdraw(conn: sa.Connection, approval: RowMapping, decision: Decision, why: str, now: datetime) -> None:
        """Mark the agent's ``approval`` withdrawn by ``decision``, and why (the console tells the agent)."""
        conn.execute(
            agent_queue.update()
            .where(agent_queue.c.item_id == approval["item_id"])
            .values(withdrawn_at=now, withdrawn_by=decision.decision_id, withdrawn_reason=why)
        )

    @staticmethod
    def _queue_decision(
        conn: sa.Connection,
        order: RowMapping,
        request: DecisionRequest,
        decision: Decision,
        now: datetime,
        *,
        agreed: str | None = None,
    ) -> None:
        """Put ``decision`` in the agent queue: waiting for an agent, or, with ``agreed`` (why), kept as agreeing
        with an approval that stands (nothing for an agent to do)."""
        conn.execute(
            agent_queue.insert().values(
                merchant_id=order["merchant_id"],
                order_id=order["order_id"],
                decision_id=decision.decision_id,
                decision_json=decision.model_dump_json(),
                request_json=request.model_dump_json(),
                state="pending" if agreed is None else "agreed",
                reason=agreed,
                acted_at=None if agreed is None else now,
                created_at=now,
            )
        )

    @staticmethod
    def _carried_out(conn: sa.Connection, decision_id: str) -> bool:
        """Whether the decision's retry was made (answered), or its message went to its provider."""
        attempt = conn.scalar(sa.select(transactions.c.txn_id).where(transactions.c.decision_id == decision_id))
        if attempt is not None:
            return True
        sent = conn.scalar(
            sa.select(nudges.c.nudge_id).where(nudges.c.decision_id == decision_id, nudges.c.status == "accepted")
        )
        return sent is not None

    def _set_state(self, conn: sa.Connection, order: RowMapping, state: OrderState, now: datetime) -> None:
        conn.execute(
            orders.update()
            .where(
                orders.c.merchant_id == order["merchant_id"],
                orders.c.order_id == order["order_id"],
                orders.c.state.in_(OPEN_ORDER_STATES),
            )
            .values(state=state.value, updated_at=now)
        )

    def _carry_out(self, conn: sa.Connection, order: RowMapping, decision: Decision, now: datetime) -> None:
        merchant_id, order_id = order["merchant_id"], order["order_id"]
        # This decision replaces what an earlier one planned and never sent (a retry, or a message and its
        # follow-up, that waited for a link payment, which was then declined, is decided again here): two plans
        # would charge twice, or send two messages (the old message's follow-up would plan another). So does an
        # earlier stop's close, waiting for a link to expire or a charge to be answered (the customer paid on the
        # link and was declined, or an operator answered 'not charged', and the order was decided again): left, it
        # failed the order at the link's expiry and cancelled what this decision plans. A stop plans its own close
        # below; the window's end keeps its close. A close claimed by a worker right now (it fell due as this
        # decision came) is replaced too: it has no outside effect, and left to run it failed the order under this
        # decision's plan; its worker finds it cancelled and records nothing (``_record_settled_meanwhile``).
        # So is a retry a worker has claimed and not sent yet (review: it went ahead beside this plan, two retries
        # or a retry beside a message): a retry is sent only under the order's lock, held here, in the transaction
        # that marks it sent, so its worker finds its claim gone and sends nothing (``Effects._charge``). On
        # PostgreSQL a claim being committed as this runs is waited for and the row read again as claimed: replaced
        # all the same. A retry marked sent may be with its connector and is left to be answered. So is a message a
        # worker has claimed for its first try and not yet handed to its provider (review: it went beside this
        # plan, a payment link beside a silent retry for the same failure, or a message this decision did not
        # choose): it is handed over only under the order's lock (``Effects._mark_message_sending``), so its worker
        # finds its claim gone and sends nothing. One tried before may have reached the provider and stays, as a
        # planned one does (``_replaceable``); one handed over is with its provider and its answer is recorded.
        stop_close = _stop_close(merchant_id, order_id)
        claimed_unsent = sa.and_(
            actions.c.state == ActionState.CLAIMED.value,
            actions.c.unanswered_since.is_(None),
            sa.or_(
                actions.c.kind == ActionKind.RETRY.value,
                sa.and_(actions.c.kind == ActionKind.NUDGE.value, actions.c.attempts == 1),
            ),
        )
        conn.execute(
            actions.update()
            .where(
                actions.c.merchant_id == merchant_id,
                actions.c.order_id == order_id,
                sa.or_(
                    sa.and_(actions.c.state == ActionState.SCHEDULED.value, _replaceable()), claimed_unsent, stop_close
                ),
            )
            .values(
                state=ActionState.CANCELLED.value,
                claim_token=None,
                updated_at=now,
                last_error=REPLACED,
            )
        )
        due = max(as_utc(decision.execute_at), now)
        meta: dict[str, Any] = {"propensity": decision.propensity}
        if decision.action == Action.RETRY:
            # The attempt number is fixed now, so the processor payment id <order_id>_<n> never changes when
            # the action is re-sent after a crash; an action cancelled later leaves a gap only on a closed order.
            # This is the one place a retry is planned: every retry carries its number from here (a claim never
            # takes an order's lock to reserve one; ``Effects._charge`` refuses a retry without).
            number = conn.scalar(
                orders.update()
                .where(orders.c.merchant_id == merchant_id, orders.c.order_id == order_id)
                .values(attempt_count=orders.c.attempt_count + 1)
                .returning(orders.c.attempt_count)
            )
            meta["attempt_number"] = int(number or 0)
            self._schedule(
                conn,
                merchant_id,
                order_id,
                ActionKind.RETRY,
                due,
                f"{merchant_id}:{order_id}:retry:{decision.decision_id}",
                now,
                payload=meta | {"strategy": str(decision.strategy), "connector": decision.connector},
                decision_id=decision.decision_id,
            )
        elif decision.action == Action.RETARGET:
            self._schedule(
                conn,
                merchant_id,
                order_id,
                ActionKind.NUDGE,
                due,
                f"{merchant_id}:{order_id}:nudge:{decision.decision_id}",
                now,
                payload=meta
                | {"channel": str(decision.channel)}
                | ({MESSAGE_WAITS_FOR_CHANNEL: True} if waits_for_channel(decision) else {}),
                decision_id=decision.decision_id,
            )
        else:
            self._close(conn, order, now)

    def _live_link_expiry(self, conn: sa.Connection, order: RowMapping, now: datetime) -> datetime | None:
        latest = conn.scalar(
            sa.select(sa.func.max(payment_links.c.expires_at)).where(
                payment_links.c.merchant_id == order["merchant_id"],
                payment_links.c.order_id == order["order_id"],
                payment_links.c.used_at.is_(None),
                payment_links.c.expires_at > now,
            )
        )
        return as_utc_or_none(latest)

    def _close(self, conn: sa.Connection, order: RowMapping, now: datetime, *, excluding: int | None = None) -> None:
        """Stop: fail the order now, or once no charge of it may be with a connector and its last live payment
        link has expired (the customer may still pay); ``excluding``: the close action doing this. An order with a
        dead-lettered charge whose answer never came is not failed (the customer may have paid): it waits for an
        operator's ``resolve-charge``, looked at again every UNKNOWN_RECHECK."""
        unknown = self.unknown_charge(conn, order)
        if unknown is not None:
            _log_unknown_charge(order, unknown, "order not failed")
            self._ask_switch(conn, unknown, now, now)  # again, when the last check got no answer
            self._close_later(conn, order, now + UNKNOWN_RECHECK, now, excluding)
            return
        in_flight = self.charge_in_flight(conn, order, excluding=excluding)
        wait_until = self._live_link_expiry(conn, order, now) if in_flight is None else max(in_flight, now + RECHECK)
        if wait_until is not None:
            self._close_later(conn, order, wait_until, now, excluding)
            return
        self._fail(conn, order, now)

    def _close_later(
        self, conn: sa.Connection, order: RowMapping, when: datetime, now: datetime, close_action: int | None
    ) -> None:
        """Look at closing ``order`` again at ``when``: the close action doing this waits itself (one row however
        often it looks again), or a new close action is planned."""
        if close_action is not None:
            conn.execute(
                actions.update()
                .where(actions.c.action_id == close_action)
                .values(state=ActionState.SCHEDULED.value, due_at=when, claim_token=None, updated_at=now)
            )
            return
        key = f"{order['merchant_id']}:{order['order_id']}:close:{when.isoformat()}"
        if not self._schedule(conn, order["merchant_id"], order["order_id"], ActionKind.CLOSE, when, key, now):
            # A close for that moment was planned before and replaced by a later decision (``_carry_out``), or has
            # run: planned again, or a stop waiting for that same link would never fail the order before its window.
            conn.execute(
                actions.update()
                .where(
                    actions.c.idempotency_key == key,
                    actions.c.state.in_([ActionState.CANCELLED.value, ActionState.DONE.value]),
                )
                .values(
                    state=ActionState.SCHEDULED.value, due_at=when, claim_token=None, last_error=None, updated_at=now
                )
            )

    # ------------------------------------------------------------------------------- terminal states

    def _cancel_open(self, conn: sa.Connection, order: RowMapping, now: datetime) -> None:
        # A charge that may have reached its connector (claimed now, or sent before without an answer) is not
        # cancelled: its worker records what it did, or a re-send with the same key asks the switch, and the
        # attempt is stored either way (a success on the settled order logs that a refund may be needed).
        # A message that an earlier try may have sent stays in the history: one waiting for another try, and one
        # being tried now, whose worker records only an answer that says it went (``_record_settled_meanwhile``).
        # So does one with its provider now (claimed and marked as being sent), dated by its hand-over: its worker
        # may die before any answer, and no claim takes a cancelled message over to note that it may have gone
        # (review); an answer that comes says what became of it.
        waiting_messages = conn.execute(_MESSAGES_OPEN_OF_ORDER, _of_order(order)).mappings()
        for row in waiting_messages.all():
            message, why = ActionRow.of(row), "cancelled: its order was settled"
            if message.state == ActionState.CLAIMED and row["unanswered_since"] is not None:
                handed_over = as_utc(row["unanswered_since"])
                message = replace(message, payload=_one_more_maybe_sent_try(message.payload, handed_over))
                why += " while it was with its provider"
            self._keep_maybe_sent(conn, message, why, now)
        # A message with its provider keeps its claim's token beside its 'being sent' mark: only that claim's answer
        # says what became of that hand-over (``_record_unanswered_after_settling``), not a claim taken over before.
        conn.execute(_CANCEL_OPEN_OF_ORDER, _of_order(order, at_now=now))
        # Whatever the order's mode: a merchant switched to assisted mode queues for orders begun before.
        self._supersede_waiting(conn, order, now)

    @staticmethod
    def _supersede_waiting(conn: sa.Connection, order: RowMapping, now: datetime) -> None:
        """The order's recommendations waiting for an agent are superseded."""
        conn.execute(_SUPERSEDE_WAITING_OF_ORDER, _of_order(order, at_now=now))

    def _terminal(
        self,
        conn: sa.Connection,
        order: RowMapping,
        state: Literal[OrderState.SUCCEEDED, OrderState.FAILED],
        txn_id: str | None,
        occurred_at: datetime,
        now: datetime,
    ) -> bool:
        changed = conn.execute(
            orders.update()
            .where(
                orders.c.merchant_id == order["merchant_id"],
                orders.c.order_id == order["order_id"],
                orders.c.state.in_(OPEN_ORDER_STATES),
            )
            .values(
                state=state.value,
                success_txn_id=txn_id if state == OrderState.SUCCEEDED else None,
                closed_at=occurred_at,
                updated_at=now,
            )
        ).rowcount
        if changed != 1:
            return False
        unknown = self.unknown_charge(conn, order)
        if unknown is not None:
            charge = ActionRow.of(
                conn.execute(sa.select(actions).where(actions.c.action_id == unknown)).mappings().one()
            )
            if state == OrderState.SUCCEEDED and _names_payment(charge, txn_id):
                # The merchant reports the order paid by this very charge: not a second payment, nothing to refund.
                log.warning(
                    "order succeeded on its merchant's report (txn_id %r) that payment %s_%s, winback's charge action "
                    "%s sent and never answered, took the payment: it is not refunded; its switch is asked to "
                    "confirm, and a decline (or not found, asked twice) is flagged as a charge dispute",
                    txn_id,
                    charge.order_id,
                    charge.payload.get("attempt_number"),
                    unknown,
                    extra={"merchant_id": order["merchant_id"], "order_id": order["order_id"]},
                )
            else:
                _log_unknown_charge(order, unknown, f"order {state.value.lower()}, a refund may be needed")
            self._ask_switch(conn, unknown, now, now)
        self._cancel_open(conn, order, now)
        self._enqueue_webhook(conn, order, state, txn_id, occurred_at, now)
        log.info(
            "order %s", state.value.lower(), extra={"merchant_id": order["merchant_id"], "order_id": order["order_id"]}
        )
        return True

    def _succeed(
        self, conn: sa.Connection, order: RowMapping, txn_id: str, occurred_at: datetime, now: datetime
    ) -> bool:
        return self._terminal(conn, order, OrderState.SUCCEEDED, txn_id, occurred_at, now)

    def _fail(self, conn: sa.Connection, order: RowMapping, now: datetime) -> bool:
        last_txn = conn.scalar(
            sa.select(transactions.c.txn_id)
            .where(transactions.c.merchant_id == order["merchant_id"], transactions.c.order_id == order["order_id"])
            .order_by(transactions.c.attempt_number.desc())
            .limit(1)
        )
        return self._terminal(conn, order, OrderState.FAILED, last_txn, now, now)

    def _enqueue_webhook(
        self,
        conn: sa.Connection,
        order: RowMapping,
        state: OrderState,
        txn_id: str | None,
        occurred_at: datetime,
        now: datetime,
    ) -> None:
        merchant = self.merchant(order["merchant_id"])
        if merchant.webhook is None:
            return
        attempts = [
            {
                "txn_id": row.txn_id,
                "attempt_number": row.attempt_number,
                "processor_payment_id": row.processor_payment_id,
                "strategy": row.strategy,
                "connector": row.connector,
                "status": row.status,
                "error_code": row.error_code,
                "created_at": as_utc(row.created_at).isoformat(),
            }
            for row in conn.execute(
                sa.select(transactions)
                .where(transactions.c.merchant_id == order["merchant_id"], transactions.c.order_id == order["order_id"])
                .order_by(transactions.c.attempt_number)
            )
        ]
        event = "order.succeeded" if state == OrderState.SUCCEEDED else "order.failed"
        body = {
            "event": event,
            "merchant_id": order["merchant_id"],
            "order_id": order["order_id"],
            "txn_id": txn_id,
            "amount": order["amount"],
            "currency": order["currency"],
            "attempts": attempts,
            "occurred_at": occurred_at.isoformat().replace("+00:00", "Z"),
        }
        conn.execute(
            webhook_deliveries.insert().values(
                merchant_id=order["merchant_id"],
                order_id=order["order_id"],
                event=event,
                url=merchant.webhook.url,
                body=_dump(body),
                status="pending",
                attempts=0,
                created_at=now,
            )
        )
        key = f"{order['merchant_id']}:{order['order_id']}:webhook"
        self._schedule(conn, order["merchant_id"], order["order_id"], ActionKind.WEBHOOK, now, key, now)

    # ---------------------------------------------------------------------------------- the worker side

    def claim(self, limit: int, lease_seconds: float, worker_id: str, token: str) -> list[ActionRow]:
        """Claim up to ``limit`` due actions (scheduled and due, or claimed with an expired lease)."""
        now = self.clock()
        lease_until = now + timedelta(seconds=lease_seconds)
        due = sa.and_(actions.c.state.in_(OPEN_ACTION_STATES), actions.c.due_at <= now)
        values = {
            "state": ActionState.CLAIMED.value,
            "due_at": lease_until,
            "claim_token": token,
            "claimed_by": worker_id,
            "attempts": actions.c.attempts + 1,
            "updated_at": now,
            # A message's 'being sent' mark belongs to the claim that set it: one left by a worker that died
            # (or whose unmark failed) must not hold a retry back once the message is claimed again.
            "unanswered_since": sa.case(
                (actions.c.kind == ActionKind.NUDGE.value, sa.null()), else_=actions.c.unanswered_since
            ),
        }
        with self.engine.begin() as conn:
            pick = sa.select(actions.c.action_id, actions.c.kind, actions.c.unanswered_since, actions.c.due_at)
            pick = pick.where(due)
            pick = pick.order_by(actions.c.due_at).limit(limit)
            if is_postgres(self.engine):
                pick = pick.with_for_update(skip_locked=True)
            picked = conn.execute(pick).all()
            if not picked:
                return []
            ids = [row.action_id for row in picked]
            # A message whose 'being sent' mark a claim clears here was handed to its provider by a worker that
            # never recorded the answer (it died, or its lease ran out): it may have been sent (review of c65ddd9).
            taken_over = {
                row.action_id: as_utc(row.unanswered_since)
                for row in picked
                if row.kind == ActionKind.NUDGE and row.unanswered_since is not None
            }
            if is_postgres(self.engine):
                rows = (
                    conn.execute(
                        actions.update().where(actions.c.action_id.in_(ids)).values(**values).returning(actions)
                    )
                    .mappings()
                    .all()
                )
            else:
                conn.execute(actions.update().where(actions.c.action_id.in_(ids)).values(**values))
                rows = conn.execute(sa.select(actions).where(actions.c.action_id.in_(ids))).mappings().all()
            was_due = {row.action_id: as_utc(row.due_at) for row in picked}
            claimed = [replace(ActionRow.of(row), was_due_at=was_due[row["action_id"]]) for row in rows]
            # Action rows only, never an order's: a re-decision and a charge's send lock the order, then its
            # actions, and a claim locking them the other way round could deadlock with them on PostgreSQL.
            self._note_maybe_sent(conn, claimed, taken_over)
        # In the order they were planned (every due_at is now the lease's end): a retry due a minute before a
        # message of the same order goes first, and a success it brings cancels the message before it is sent.
        return sorted(claimed, key=lambda a: (a.planned_at, a.action_id))

    @staticmethod
    def _note_maybe_sent(conn: sa.Connection, claimed: list[ActionRow], taken_over: Mapping[int, datetime]) -> None:
        """Count a try that may have reached the provider for each message in ``taken_over`` (its earlier claim
        marked it as being sent, at the time given, and never recorded an answer): while its channel is down it is
        then deferred and kept in the history (given up, it counts), not dropped as never sent and replaced by
        another message."""
        for index, action in enumerate(claimed):
            handed_over = taken_over.get(action.action_id)
            if handed_over is None:
                continue
            payload = _one_more_maybe_sent_try(action.payload, handed_over)
            conn.execute(
                actions.update().where(actions.c.action_id == action.action_id).values(payload_json=_dump(payload))
            )
            claimed[index] = replace(action, payload=payload)

    def orders_of(self, conn: sa.Connection, batch: Sequence[ActionRow]) -> dict[tuple[str, str], RowMapping]:
        """The orders of a batch of actions, by (merchant_id, order_id)."""
        keys = list({(a.merchant_id, a.order_id) for a in batch})
        found: dict[tuple[str, str], RowMapping] = {}
        for start in range(0, len(keys), 200):
            chunk = keys[start : start + 200]
            query = sa.select(orders).where(sa.tuple_(orders.c.merchant_id, orders.c.order_id).in_(chunk))
            for row in conn.execute(query).mappings():
                found[(row["merchant_id"], row["order_id"])] = row
        return found

    def complete(self, conn: sa.Connection, action: ActionRow, outcome: Outcome) -> None:
        """Record ``outcome`` of a claimed action and settle the action, in the caller's transaction.

        Raises StaleClaimError (changing nothing) when the action is no longer held with this claim token.
        """
        now = self.clock()
        # The order first, then the action's row, as a re-decision (it reads and replaces the order's actions under
        # the order's lock) and a send take them. The other way round, recording an answer that goes on to lock the
        # order (a refused retry decides it again) deadlocked on PostgreSQL with a re-decision waiting for the
        # action's row. Locked once: what follows changes the order's actions, not the order, until it is decided
        # again or settled. A webhook's answer changes only its own rows (its action and its delivery) and takes no
        # order lock: it locked its order after its action's row, the one path the other way round.
        order = (
            None if action.kind == ActionKind.WEBHOOK else self.lock_order(conn, action.merchant_id, action.order_id)
        )
        if isinstance(outcome, Transient):
            try:
                self._retry_later(conn, action, order, outcome, now)
            except StaleClaimError:
                if not self._record_settled_meanwhile(conn, action, outcome, now):
                    raise
                return
            if action.kind == ActionKind.NUDGE:
                # A try that may have reached the provider (a timeout) keeps its 'being sent' mark until here
                # (``Effects._nudge``), now recorded as such; a mark left on it would count it again at its next claim.
                # A refusal's mark was taken back at once, unless that unmark failed: left on, the next claim counted
                # the refused try as one that may have reached the customer (``_note_maybe_sent``).
                _answer_recorded(conn, action)
            return
        if isinstance(outcome, Defer):
            self._release(
                conn,
                action,
                ActionState.SCHEDULED,
                now,
                due_at=outcome.until,
                error=outcome.reason,
                refund=True,
                payload=outcome.payload,
            )
            return
        if isinstance(outcome, Permanent):
            self._release(conn, action, ActionState.DEAD, now, error=outcome.error)
            self._dead(
                conn,
                action,
                order,
                outcome.error,
                now,
                connector_failed=outcome.nothing_charged,
                refund_by_hand=outcome.refund_by_hand,
            )
            return
        if isinstance(outcome, Skip):
            self._release(conn, action, ActionState.CANCELLED, now, error=outcome.reason)
            # A message re-send skipped (a charge of unknown outcome, an order awaiting an agent) after a try that
            # may have reached its provider: the customer may have it (review: it vanished from the history).
            self._keep_maybe_sent(conn, action, f"not sent again: {outcome.reason}", now)
            return
        try:
            # A replanned action keeps why it was not carried out (the order view shows it).
            self._release(
                conn, action, ActionState.DONE, now, error=outcome.reason if isinstance(outcome, Replan) else None
            )
        except StaleClaimError:
            if not self._record_settled_meanwhile(conn, action, outcome, now):
                raise
            return
        if isinstance(outcome, Delivered):
            conn.execute(
                webhook_deliveries.update()
                .where(
                    webhook_deliveries.c.merchant_id == action.merchant_id,
                    webhook_deliveries.c.order_id == action.order_id,
                )
                .values(
                    status="delivered",
                    delivered_at=now,
                    last_status_code=outcome.status_code,
                    attempts=webhook_deliveries.c.attempts + 1,
                )
            )
            return
        if isinstance(outcome, Refunded):
            self._record_refund(conn, action, outcome, now)
            return
        if order is None:
            return
        if isinstance(outcome, StatusAnswered):
            self._resolve_from_switch(conn, order, action, outcome.result, now)
        elif isinstance(outcome, Charged):
            _answer_recorded(conn, action)
            self._record_attempt(conn, order, action, outcome.result, now)
        elif isinstance(outcome, Sent):
            _answer_recorded(conn, action)
            note_accepted(conn, action.merchant_id, Channel(str(action.payload["channel"])))
            self._record_nudge(conn, order, action, outcome, now)
        elif isinstance(outcome, NotSent):
            # Its 'being sent' mark goes with the refusal's record, in case its unmark failed (``Effects._nudge``):
            # left on the done action, the order view said the message was with its provider, unanswered, for good.
            _answer_recorded(conn, action)
            self._record_unsent(conn, order, action, outcome, now)
        elif isinstance(outcome, Replan) or action.kind == ActionKind.FOLLOW_UP:
            if isinstance(outcome, Replan):
                self._keep_maybe_sent(conn, action, f"decided again: {outcome.reason}", now)
                cause = f"the planned {_planned_what(action)} could not go: {outcome.reason}"
            else:
                cause = f"no payment {NUDGE_FOLLOW_UP_HOURS:g} h after the last payment link was sent"
            self._decision_point(conn, order, now, cause)
        elif action.kind == ActionKind.CLOSE:
            self._on_close(conn, order, action, now)

    def _record_settled_meanwhile(
        self, conn: sa.Connection, action: ActionRow, outcome: Outcome, now: datetime
    ) -> bool:
        """Record a message that went out, or may have, while its order was settled (a follow-up or close has
        nothing to record); False when the action was not cancelled that way (another worker's claim holds it and
        records the same answer), or when nothing may have gone out.

        Settling an order (paid elsewhere, failed, an agent's reject) cancels its open actions, claimed nudges
        too (charges that may be with a connector are left to finish: ``_cancel_open``), but the message may
        have gone out. That is history the files need: the nudge is stored (once, whoever records it first) and
        nothing is scheduled for the settled order.
        """
        state = conn.scalar(sa.select(actions.c.state).where(actions.c.action_id == action.action_id))
        if state == ActionState.CANCELLED.value and isinstance(outcome, NoEffect):
            # A follow-up or close of an order settled meanwhile: nothing happened outside, nothing to record.
            log.debug("%s action %s ran while its order was settled", action.kind, action.action_id)
            return True
        if state == ActionState.CANCELLED.value and isinstance(outcome, Transient):
            return self._record_unanswered_after_settling(conn, action, outcome, now)
        if state != ActionState.CANCELLED.value or not isinstance(outcome, Sent | NotSent):
            return False
        log.warning(
            "%s action %s ran while its order was settled; its outcome is recorded",
            action.kind,
            action.action_id,
            extra={"merchant_id": action.merchant_id, "order_id": action.order_id},
        )
        _answer_recorded(conn, action)
        recorded = conn.scalar(sa.select(nudges.c.nudge_id).where(nudges.c.idempotency_key == action.idempotency_key))
        if isinstance(outcome, Sent):
            note_accepted(conn, action.merchant_id, Channel(str(action.payload["channel"])))
        if recorded is not None and isinstance(outcome, Sent):
            self._sent_after_all(conn, recorded, action, outcome, now)
        if recorded is not None and isinstance(outcome, NotSent) and not action.payload.get(MESSAGE_MAYBE_SENT_TRIES):
            # Kept as maybe sent only because this send was out as the order settled (``_cancel_open``): the
            # provider's refusal says it did not go. One an earlier try may have sent stays as it is.
            conn.execute(
                nudges.update()
                .where(nudges.c.nudge_id == recorded, nudges.c.status == "rejected")
                .values(error=outcome.error[:2000])
            )
        if recorded is None and isinstance(outcome, Sent):
            self._insert_sent_nudge(conn, action, outcome, now)
        elif recorded is None and isinstance(outcome, NotSent):
            self._insert_unsent_nudge(conn, action, outcome, now)
        if isinstance(outcome, Sent):
            self._apply_early_receipts(conn, action.merchant_id, outcome.provider_message_id, now)
        return True

    def _record_unanswered_after_settling(
        self, conn: sa.Connection, action: ActionRow, outcome: Transient, now: datetime
    ) -> bool:
        """Record the answer of a message that was with its provider, handed over by this claim, as its order was
        settled, and whose provider then did not answer: its 'being sent' mark goes and the answer is noted on the
        cancelled action. Settling already counted that hand-over as a try that may have reached the provider and
        kept the message as maybe sent (``_cancel_open``): after a timeout or a 500 there is nothing to add. A
        provider that certainly did not take it (429, 503, unreachable) takes back the settling's note, unless an
        earlier try may have sent it. False when the mark on the row is not this claim's (nothing was handed over,
        or a claim that took the message over after this one's lease ended handed it over again: its own answer
        says what became of it). Before, the answer was refused as stale and dropped, and nothing said the customer
        may have the message (review); then a taken-over claim's 503 deleted the note a newer hand-over justified."""
        if action.kind != ActionKind.NUDGE:
            return False
        own_mark = _noted_on_cancelled(
            conn,
            action,
            (actions.c.claim_token == action.claim_token, actions.c.unanswered_since.is_not(None)),
            unanswered_since=None,
            claim_token=None,
            last_error=outcome.error,
            updated_at=now,
        )
        if not own_mark:
            return self._refusal_of_a_replaced_message(conn, action, outcome, now)
        if outcome.not_taken and not action.payload.get(MESSAGE_MAYBE_SENT_TRIES):
            conn.execute(
                nudges.delete().where(nudges.c.idempotency_key == action.idempotency_key, nudges.c.status == "rejected")
            )
        return True

    @staticmethod
    def _refusal_of_a_replaced_message(
        conn: sa.Connection, action: ActionRow, outcome: Transient, now: datetime
    ) -> bool:
        """Keep a provider's refusal of a message that certainly did not take it (429, 503, unreachable:
        ``note_refusal`` counted it toward the channel's outage before the claim was found gone) when a later
        decision replaced the message while the answer was on the way (its worker had cleared the mark: nothing
        went). The answer is noted on the cancelled action, once: a repeat finds it there and is refused as stale.
        Refused as stale, the answer was rolled back with the refusal: a probe of the channel refused so kept its
        slot a whole lease, and the channel's next message then probed a provider that had just refused one
        (review). False otherwise (another answer, a message cancelled another way, or a newer hand-over's mark on
        the row: its own answer says what became of it)."""
        if not outcome.not_taken:
            return False
        return _noted_on_cancelled(
            conn,
            action,
            (actions.c.last_error == REPLACED, actions.c.claim_token.is_(None), actions.c.unanswered_since.is_(None)),
            last_error=f"{REPLACED}; its provider's answer meanwhile: {outcome.error}",
            updated_at=now,
        )

    def _release(
        self,
        conn: sa.Connection,
        action: ActionRow,
        state: ActionState,
        now: datetime,
        *,
        due_at: datetime | None = None,
        error: str | None = None,
        refund: bool = False,
        payload: Mapping[str, Any] | None = None,
    ) -> None:
        values: dict[str, Any] = {"state": state.value, "claim_token": None, "updated_at": now, "last_error": error}
        if due_at is not None:
            values["due_at"] = due_at
        if payload is not None:
            values["payload_json"] = _dump(payload)
        if refund:
            values["attempts"] = actions.c.attempts - 1
        changed = conn.execute(actions.update().where(_still_claimed(action)).values(**values)).rowcount
        if changed != 1:
            raise StaleClaimError(f"action {action.action_id} ({action.kind}) is no longer held by this claim")

    def _retry_later(
        self, conn: sa.Connection, action: ActionRow, order: RowMapping | None, outcome: Transient, now: datetime
    ) -> None:
        """Try ``action`` again later, or give it up; ``order``: its order, locked (None for a webhook)."""
        if action.kind == ActionKind.NUDGE:
            self._retry_message_later(conn, action, order, outcome, now)
            return
        if action.kind == ActionKind.WEBHOOK:
            self._retry_webhook_later(conn, action, outcome, now)
            return
        error = outcome.error
        if action.attempts >= self.retry_policy.limit(action.kind):
            message = f"gave up after {action.attempts} tries: {error}"
            self._release(conn, action, ActionState.DEAD, now, error=message)
            self._dead(conn, action, order, message, now, connector_failed=True, unreached=True)
            return
        due = now + self.retry_policy.delay(action.attempts)
        self._release(conn, action, ActionState.SCHEDULED, now, due_at=due, error=error)

    def _retry_webhook_later(self, conn: sa.Connection, action: ActionRow, outcome: Transient, now: datetime) -> None:
        """Re-send a merchant webhook later, however many tries it has had: CONTRACT.md section 5 says it is re-sent
        with backoff until a 2xx. The backoff stops growing at ``backoff_cap_seconds`` (an hour), so a merchant
        endpoint down for a weekend gets its webhooks hourly and then once it is back. It gave up after 20 tries
        (about ten hours) and the order's webhook was never delivered. At ``webhook_alert_attempts`` tries the
        failing is logged as an error, once."""
        policy = self.retry_policy
        self._release(
            conn, action, ActionState.SCHEDULED, now, due_at=now + policy.delay(action.attempts), error=outcome.error
        )
        conn.execute(
            webhook_deliveries.update()
            .where(
                webhook_deliveries.c.merchant_id == action.merchant_id,
                webhook_deliveries.c.order_id == action.order_id,
            )
            .values(attempts=webhook_deliveries.c.attempts + 1, last_error=outcome.error)
        )
        if action.attempts == policy.webhook_alert_attempts:
            log.error(
                "merchant webhook still failing after %d tries, re-sent until a 2xx: %s",
                action.attempts,
                outcome.error,
                extra={"merchant_id": action.merchant_id, "order_id": action.order_id, "kind": action.kind},
            )

    def _retry_message_later(
        self, conn: sa.Connection, action: ActionRow, order: RowMapping | None, outcome: Transient, now: datetime
    ) -> None:
        """Try a message again later, or give it up.

        A message its provider certainly did not take (it answered 429 or 503, or could not be reached:
        ``not_taken``) is tried again for ``message_outage_seconds`` from the first such answer, however many
        tries that is, no sooner than the provider's ``Retry-After``: a provider's outage or rate limit is
        short-lived, and eight tries spread over about four minutes gave the message up, counted against the
        customer's ``max_nudges`` and their day. Tries that may have reached the provider (a timeout, a 500 or
        504, a connection lost mid-request) are counted apart and allowed ``max_attempts``, as before. Given up,
        the message is recorded as not sent and counts (``rejected``), as before.

        A refusal of the first kind also counts toward the channel's outage (service/executor/outages.py); one
        saying the merchant's sender refuses every message until an admin acts (``sender_blocked``: banned,
        Exchange Online's 5.7.708, say; or set up wrong, a 535 to its credentials, say) puts the channel down at
        once: before, each such message was recorded as refused and counted against its customer's ``max_nudges``,
        customer after customer. One answered at RCPT TO may be the recipient's provider's only (``rcpt_domain``):
        until another domain's recipient is refused alike with no message taken in between, it is one more refusal
        of this message. Once the channel is down, a message no try of
        which may have reached the provider is not recorded at all (it was never sent) and its order is decided
        again without the channel: a long outage costs no message.

        A message to be tried again while its order awaits an agent was with its provider when the order was
        decided again (a message is only sent for a ``PENDING`` order): see ``_decided_while_in_flight``.
        """
        policy = self.retry_policy
        payload = dict(action.payload)
        # ``order`` is locked already (``complete``): the order first, then the action's and the channel's rows.
        if outcome.sender_limited is not None:
            self._hold_with_its_sender(conn, action, order, outcome, outcome.sender_limited, now)
            return
        if outcome.not_taken:
            channel = Channel(str(payload["channel"]))
            blocked = (
                None
                if outcome.sender_blocked is None
                else Blocked(outcome.sender_blocked, outcome.error, outcome.rcpt_domain)
            )
            down_until = policy.note_refusal(conn, action.merchant_id, channel, now, outcome.retry_after, blocked)
            if (
                down_until is not None
                and not payload.get(MESSAGE_MAYBE_SENT_TRIES)
                and payload.get(MESSAGE_WAITS_FOR_CHANNEL)
            ):
                # Planned to wait for the channel, and it is still down: it waits again, uncounted. Deciding again
                # at every hold gave an exploring policy a chance to stop the order at each (review).
                reason = f"{channel.value} is down until {utc_second(down_until)} ({outcome.error})"
                self._release(conn, action, ActionState.SCHEDULED, now, due_at=down_until, error=reason)
                self._decided_while_in_flight(conn, order, action, outcome, now)
                return
            if down_until is not None and not payload.get(MESSAGE_MAYBE_SENT_TRIES):
                # Never taken by its provider, so never sent: no nudge is recorded and none is counted; the order
                # is decided again without the channel (``_decision_point``), once: a message planned then to wait
                # for the channel waits (above).
                reason = f"not sent: {channel.value} is down until {utc_second(down_until)} ({outcome.error})"
                self._release(conn, action, ActionState.DONE, now, error=reason, payload=payload)
                if order is not None:  # locked by ``complete``; releasing the action changed nothing of it
                    self._decision_point(conn, order, now, f"the planned {_planned_what(action)} was {reason}")
                return
            since = as_utc(datetime.fromisoformat(str(payload.setdefault(MESSAGE_REFUSED_SINCE, now.isoformat()))))
            retry = now < since + timedelta(seconds=policy.message_outage_seconds)
        else:
            payload = _one_more_maybe_sent_try(payload, now)
            retry = payload[MESSAGE_MAYBE_SENT_TRIES] < policy.limit(action.kind)
        if retry:
            due = now + policy.message_delay(action.attempts, outcome.retry_after)
            self._release(conn, action, ActionState.SCHEDULED, now, due_at=due, error=outcome.error, payload=payload)
            self._decided_while_in_flight(conn, order, action, outcome, now)
            return
        message = f"gave up after {action.attempts} tries: {outcome.error}"
        self._release(conn, action, ActionState.DEAD, now, error=message, payload=payload)
        self._dead(conn, action, order, message, now)

    def _hold_with_its_sender(
        self,
        conn: sa.Connection,
        action: ActionRow,
        order: RowMapping | None,
        outcome: Transient,
        limit: SenderLimit,
        now: datetime,
    ) -> None:
        """A message its provider refused because the merchant's sender is over its rate or daily quota
        (``Transient.sender_limited``: an SMTP relay's throttling answer). The sender is held, as after a
        rate-limited receipt (service/executor/pacing.py: every message of the merchant on the channel waits, and
        they go one at a time after the hold), and this message waits for the hold's end with them: not a failed try
        (its try is given back), not a refusal of the channel (the outage breaker is not told: the sender is up,
        only limited), never given up for it, and not recorded as a message sent. Before, each such message was tried
        again on its own every few seconds to minutes, into the same limit, counted toward the channel's outage, and
        given up after an hour (a daily quota lasts longer): recorded as a message refused, counted against the
        customer's ``max_nudges``. A daily quota's hold longer than ``sender_quota_replan_after_seconds`` is taken as
        an outage is: the message is not sent nor counted and its order is decided again without the channel (a
        message an earlier try may have sent, or planned to wait for the channel, waits for the hold as before)."""
        channel = Channel(str(action.payload["channel"]))
        until = self.retry_policy.note_rate_limited(conn, action.merchant_id, channel, now, limit)
        waits = action.payload.get(MESSAGE_MAYBE_SENT_TRIES) or action.payload.get(MESSAGE_WAITS_FOR_CHANNEL)
        if not waits and self.retry_policy.senders_over_quota(conn, action.merchant_id, now, channel):
            # Held for hours (``sender_quota_replan_after_seconds``): as in an outage, never sent, so neither
            # recorded nor counted, and the order is decided again without the channel (``_decision_point``).
            reason = f"not sent: {channel.value}'s sender is over its daily quota until {utc_second(until)}"
            self._release(conn, action, ActionState.DONE, now, error=f"{reason} ({outcome.error})")
            if order is not None:  # locked by ``complete``
                self._decision_point(conn, order, now, f"the planned {_planned_what(action)} was {reason}")
            return
        reason = f"{channel.value} is paced until {utc_second(until)}: its sender is limited ({outcome.error})"
        self._release(conn, action, ActionState.SCHEDULED, now, due_at=until, error=reason, refund=True)
        self._decided_while_in_flight(conn, order, action, outcome, now)

    def _decided_while_in_flight(
        self, conn: sa.Connection, order: RowMapping | None, action: ActionRow, outcome: Transient, now: datetime
    ) -> None:
        """Decide ``order`` again when message ``action``, just scheduled for another try, was with its provider as
        the order was decided again and now waits for an agent. That decision could not count the message (it was
        neither answered nor tried before) and left the approval that planned it to finish; at its time the re-send
        was skipped ("order is AWAITING_AGENT") with nothing on record that the customer may have it, the approval
        neither kept nor withdrawn, and the message an agent approved next went the same day (review). Decided again
        now, the message counts as maybe sent (``_messages_maybe_out``) and the approval is settled as one whose
        re-send waits (``_approval_stands``): it stands when the new decision plans the same message, else it is
        withdrawn and the message kept as maybe sent (a try that may have reached the provider) and not re-sent."""
        if order is None or order["state"] != OrderState.AWAITING_AGENT:
            return
        cause = (
            f"the {_planned_what(action)} was with its provider as the order was decided again, and the provider "
            f"did not answer ({outcome.error})"
        )
        self._decision_point(conn, order, now, cause)

    def _dead(
        self,
        conn: sa.Connection,
        action: ActionRow,
        order: RowMapping | None,
        error: str,
        now: datetime,
        *,
        connector_failed: bool = False,
        unreached: bool = False,
        refund_by_hand: str | None = None,
    ) -> None:
        log.error(
            "action dead-lettered: %s",
            error,
            extra={"merchant_id": action.merchant_id, "order_id": action.order_id, "kind": action.kind},
        )
        if action.kind == ActionKind.WEBHOOK:
            conn.execute(
                webhook_deliveries.update()
                .where(
                    webhook_deliveries.c.merchant_id == action.merchant_id,
                    webhook_deliveries.c.order_id == action.order_id,
                )
                .values(status="dead", last_error=error, attempts=webhook_deliveries.c.attempts + 1)
            )
        elif action.kind == ActionKind.NUDGE:
            if order is not None:
                channel = str(action.payload.get("channel"))
                nudge_id = nudge_id_for(action.idempotency_key)
                self._record_unsent(conn, order, action, NotSent(nudge_id, channel, PAYMENT_LINK_TEMPLATE, error), now)
        elif action.kind == ActionKind.REFUND and self._disputed_refund_dropped(conn, action, error, now):
            pass
        elif action.kind == ActionKind.REFUND:
            why = refund_by_hand or (REFUND_NO_ANSWER if connector_failed else REFUND_REFUSED)
            self._hand_refund_over(conn, action, why, error, now)
        elif action.kind == ActionKind.CHARGE_STATUS:
            # No answer within its tries: asked again in an hour, as long as the charge is unknown, taken as never
            # charged and not found charged since, or charged on an operator's word (``_check_again_later``). A
            # switch that cannot be asked is asked again only by the order's close (which looks hourly too) about an
            # unknown charge.
            again = "in an hour" if connector_failed else "when the order's close looks again"
            if now >= action.planned_at + SWITCH_SILENCE_LIMIT:
                again = f"no more ({span_words(SWITCH_SILENCE_LIMIT)} unanswered)"
            log.error(
                "the switch could not say what became of payment %s (%s): charge action %s stays as it is recorded "
                "(unknown, taken as never charged, or charged on an operator's word); the switch is asked again %s, "
                "or an operator answers an unknown one with resolve-charge",
                action.payload.get("payment_id"),
                error,
                action.payload.get("charge_action_id"),
                again,
                extra={"merchant_id": action.merchant_id, "order_id": action.order_id, "kind": action.kind},
            )
            if connector_failed:
                self._check_again_later(conn, action, now + UNKNOWN_RECHECK, now)
        elif action.kind == ActionKind.RETRY and connector_failed:
            self._retry_failed_to_go_out(conn, action, order, now, unreached=unreached)
        if action.kind in CHARGE_KINDS:
            # A dead retry or link payment sent and never answered leaves its order open: whether the charge
            # happened is unknown, so no new attempt is made on top of it. Its switch is asked what became of it
            # (``_resolve_from_switch``); until an answer comes, the order's window-end CLOSE waits for it, and an
            # operator can answer instead (resolve-charge).
            self._ask_switch(conn, action.action_id, now + STATUS_CHECK_DELAY, now)

    def _disputed_refund_dropped(self, conn: sa.Connection, refund: ActionRow, error: str, now: datetime) -> bool:
        """A refund the switch refused whose charge it has since disputed (an operator answered "charged", the
        switch says it never was: ``_flag_dispute``): nothing was taken, so there is nothing to refund by hand. The
        refund is cancelled with both reasons (the switch's refusal kept); True when it was so disputed."""
        charge_key = _charge_key_of_refund(refund.idempotency_key)
        said = _switch_disputes(conn, charge_key)
        if said is None:
            return False
        note = f"{error}; {_nothing_to_refund(refund.payload.get('payment_id'), said)}"
        conn.execute(
            actions.update()
            .where(actions.c.action_id == refund.action_id)
            .values(state=ActionState.CANCELLED.value, last_error=note, updated_at=now)
        )
        log.warning(
            "the refund of payment %s was refused and is not needed: %s",
            refund.payload.get("payment_id"),
            note,
            extra={"merchant_id": refund.merchant_id, "order_id": refund.order_id, "kind": refund.kind},
        )
        return True

    @staticmethod
    def _hand_refund_over(conn: sa.Connection, refund: ActionRow, why: str, error: str, now: datetime) -> None:
        """Mark dead-lettered ``refund`` as one for an operator to make by hand (REFUND_BY_HAND: when, ``why``), in
        the transaction that dead-letters it, so ``refunds_by_hand`` (``winback executor refunds-by-hand``, and
        /metrics) lists it from the moment it is dead, and log it as an error."""
        marked = refund.payload | {REFUND_BY_HAND: {"at": now.isoformat(), "why": why}}
        conn.execute(actions.update().where(actions.c.action_id == refund.action_id).values(payload_json=_dump(marked)))
        note_case(conn, REFUND_CASE, refund.merchant_id, refund.order_id, refund.action_id, now, why=why)
        log.error(
            "the refund of payment %s, charged on order %s after it was settled, was not made: %s; refund it "
            "by hand through connector %r (see refund action %s in GET /v1/orders/%s, or `winback executor "
            "refunds-by-hand`)",
            refund.payload.get("payment_id"),
            refund.order_id,
            error,
            refund.payload.get("connector"),
            refund.action_id,
            refund.order_id,
            extra={"merchant_id": refund.merchant_id, "order_id": refund.order_id, "kind": refund.kind},
        )

    def _retry_failed_to_go_out(
        self,
        conn: sa.Connection,
        action: ActionRow,
        order: RowMapping | None,
        now: datetime,
        *,
        unreached: bool = False,
    ) -> None:
        """A dead-lettered retry whose charge certainly never went out (its connector is not configured, refused it
        outright, or could not be reached on any try): its connector is taken out of the order's connectors
        (``request_for``) and the order is decided again, as for a retry the rules refuse at its send. Left dead
        alone, the order had no decision left: no other connector, no payment link, failed at the window's end."""
        sent = conn.scalar(sa.select(actions.c.unanswered_since).where(actions.c.action_id == action.action_id))
        if sent is not None:
            return  # it may have charged: an operator answers for it first
        conn.execute(
            actions.update()
            .where(actions.c.action_id == action.action_id)
            .values(
                payload_json=_dump(
                    action.payload
                    | {CONNECTOR_FAILED: True}
                    | ({CONNECTOR_FAILED_UNTIL: (now + CONNECTOR_UNREACHED_HOLD).isoformat()} if unreached else {})
                )
            )
        )
        if order is not None and order["state"] == OrderState.PENDING:
            cause = f"the planned {_planned_what(action)} could not go out through its connector"
            self._decision_point(conn, order, now, cause)

    def _record_attempt(
        self,
        conn: sa.Connection,
        order: RowMapping,
        action: ActionRow,
        result: ChargeResult,
        now: datetime,
        *,
        attempted_at: datetime | None = None,
    ) -> None:
        """Store a charge's answer and settle or decide the order; ``attempted_at``: when the charge was made, when
        that is not now (an operator's answer days later); the attempt and the order's success carry it."""
        number, txn_id = self._insert_attempt(conn, action, result, attempted_at or now)
        if action.kind == ActionKind.LINK_PAYMENT:
            conn.execute(
                payment_links.update()
                .where(payment_links.c.token_id == action.payload["token_id"])
                .values(txn_id=txn_id)
            )
        if result.status == "success":
            if _names_charge(order, action):
                # The merchant's payment-succeeded named this very payment (its txn_id is the processor payment id
                # CONTRACT.md section 5 gives this attempt, or winback's txn id of it): its success reached the
                # merchant before its answer reached winback. It is the order's one payment, not a duplicate.
                log.warning(
                    "attempt %s (payment %s_%s) succeeded: the order was settled already by the merchant's report of "
                    "this same payment, so nothing is refunded",
                    txn_id,
                    action.order_id,
                    number,
                    extra={"merchant_id": action.merchant_id, "order_id": action.order_id},
                )
                return
            if order["state"] not in OPEN_ORDER_STATES:
                refund = self._refund_duplicate(conn, order, action, number, now)
                log.error(
                    "attempt %s succeeded on an order already %s: a refund may be needed; refund action %s gives "
                    "payment %s_%s back through connector %r",
                    txn_id,
                    order["state"],
                    refund,
                    action.order_id,
                    number,
                    action.payload.get("connector"),
                    extra={"merchant_id": action.merchant_id, "order_id": action.order_id},
                )
                return
            self._succeed(conn, order, txn_id, attempted_at or now, now)
            return
        _note_last_failure(conn, action, result, now)
        if _paid_on_the_merchants_word(order, action):
            # Declined, though the merchant reported the order paid by this very payment: nothing was taken (so
            # nothing is refunded), and the merchant must hear of it.
            self._flag_dispute(conn, order, action, None, _declined(result), now)
        fresh = self.lock_order(conn, action.merchant_id, action.order_id)
        if fresh is not None and fresh["state"] == OrderState.PENDING:
            declined = _declined(result)
            self._decision_point(conn, fresh, now, f"the {_planned_what(action)} was {declined}")

    @staticmethod
    def _insert_attempt(
        conn: sa.Connection, action: ActionRow, result: ChargeResult, attempted_at: datetime
    ) -> tuple[int, str]:
        """Write charge ``action``'s answer into the order's attempts (the history the models learn from), made at
        ``attempted_at``; its attempt number and txn id."""
        number = int(action.payload["attempt_number"])
        txn_id = txn_id_for(action.idempotency_key)
        strategy = (
            Strategy.RETARGET_LINK.value if action.kind == ActionKind.LINK_PAYMENT else str(action.payload["strategy"])
        )
        decision_id, propensity = action.decision_id, action.payload.get("propensity")
        if action.kind == ActionKind.LINK_PAYMENT:
            decision_id, propensity = _link_decision(conn, action)
        conn.execute(
            transactions.insert().values(
                txn_id=txn_id,
                merchant_id=action.merchant_id,
                order_id=action.order_id,
                attempt_number=number,
                processor_payment_id=f"{action.order_id}_{number}",
                strategy=strategy,
                connector=result.connector,
                status=result.status,
                error_code=result.error_code,
                error_message=result.error_message,
                network_decline_code=result.network_decline_code,
                merchant_advice_code=result.merchant_advice_code,
                unified_code=result.unified_code,
                decision_id=decision_id,
                propensity=propensity,
                nudge_id=action.payload.get("nudge_id"),
                idempotency_key=action.idempotency_key,
                created_at=attempted_at,
            )
        )
        return number, txn_id

    def _record_nudge(
        self, conn: sa.Connection, order: RowMapping, action: ActionRow, sent: Sent, now: datetime
    ) -> None:
        self._insert_sent_nudge(conn, action, sent, now)
        follow_up = now + timedelta(hours=NUDGE_FOLLOW_UP_HOURS)
        self._schedule(
            conn,
            action.merchant_id,
            action.order_id,
            ActionKind.FOLLOW_UP,
            follow_up,
            f"{action.merchant_id}:{action.order_id}:follow_up:{sent.nudge_id}",
            now,
            payload={"nudge_id": sent.nudge_id},
        )
        self._apply_early_receipts(conn, action.merchant_id, sent.provider_message_id, now)

    def _insert_sent_nudge(self, conn: sa.Connection, action: ActionRow, sent: Sent, now: datetime) -> None:
        """The nudge that went out, counted among the order's messages sent, and its payment link."""
        conn.execute(
            nudges.insert().values(
                nudge_id=sent.nudge_id,
                merchant_id=action.merchant_id,
                order_id=action.order_id,
                channel=sent.channel,
                template_id=sent.template_id,
                sent_at=now,
                status="accepted",
                delivered=True,
                provider_message_id=sent.provider_message_id,
                decision_id=action.decision_id,
                propensity=action.payload.get("propensity"),
                idempotency_key=action.idempotency_key,
            )
        )
        _count_sent(conn, action.merchant_id, action.order_id, 1, now)
        self._keep_link(conn, action, sent, now)

    @staticmethod
    def _keep_link(conn: sa.Connection, action: ActionRow, sent: Sent, now: datetime) -> None:
        """The payment link of a message its provider took. The row is there already when the customer used the
        link of an earlier try the provider did not confirm (``_unconfirmed_link``): the link then lives until the
        later of the two tokens' expiries, and the nudge is recorded as clicked when the link was opened."""
        insert = upsert_into(conn, payment_links).values(
            token_id=sent.token_id,
            merchant_id=action.merchant_id,
            order_id=action.order_id,
            nudge_id=sent.nudge_id,
            expires_at=sent.expires_at,
            created_at=now,
        )
        later = sa.case(
            (insert.excluded.expires_at > payment_links.c.expires_at, insert.excluded.expires_at),
            else_=payment_links.c.expires_at,
        )
        upsert = insert.on_conflict_do_update(index_elements=[payment_links.c.token_id], set_={"expires_at": later})
        opened = conn.execute(upsert.returning(payment_links.c.opened_at)).scalar()
        if opened is not None:  # opened through its unconfirmed link before this confirmation: the history says so
            conn.execute(
                nudges.update()
                .where(nudges.c.nudge_id == sent.nudge_id, nudges.c.clicked_at.is_(None))
                .values(clicked_at=opened)
            )

    def _record_unsent(
        self, conn: sa.Connection, order: RowMapping, action: ActionRow, unsent: NotSent, now: datetime
    ) -> None:
        self._insert_unsent_nudge(conn, action, unsent, now)
        # The undelivered nudge is in the history now (it counts against max_nudges): decide again.
        self._decision_point(conn, order, now, f"the planned {_planned_what(action)} was not sent: {unsent.error}")

    def _sent_after_all(self, conn: sa.Connection, nudge_id: str, action: ActionRow, sent: Sent, now: datetime) -> None:
        """The provider took a message its order's settling recorded as not known to be sent (``_keep_maybe_sent``):
        the nudge is recorded as sent, with its link."""
        changed = conn.execute(
            nudges.update()
            .where(nudges.c.nudge_id == nudge_id, nudges.c.status == "rejected")
            .values(status="accepted", delivered=True, provider_message_id=sent.provider_message_id, error=None)
        ).rowcount
        if changed:
            _count_sent(conn, action.merchant_id, action.order_id, 1, now)
            self._keep_link(conn, action, sent, now)

    def _keep_maybe_sent(self, conn: sa.Connection, action: ActionRow, why: str, now: datetime) -> bool:
        """Record a message that ends unsent (cancelled, or decided again) although an earlier try of it may have
        reached the provider (a timeout, a 500, a worker that died after handing it over): the customer may have
        it, so it stays in the history as not known to be sent, and counts against ``max_nudges``, as when it is
        given up. Without it, such a message vanished while its channel was down and its order settled or the
        customer opted out. True when a nudge was recorded."""
        tries = int(action.payload.get(MESSAGE_MAYBE_SENT_TRIES, 0))
        if action.kind != ActionKind.NUDGE or tries == 0:
            return False
        recorded = conn.scalar(sa.select(nudges.c.nudge_id).where(nudges.c.idempotency_key == action.idempotency_key))
        if recorded is not None:
            return False
        error = f"{why}; {tries} earlier {'try' if tries == 1 else 'tries'} {MAYBE_SENT_NOTE}"
        channel = str(action.payload.get("channel"))
        nudge_id = nudge_id_for(action.idempotency_key)
        # Dated by its first try that may have reached the provider: the day the customer may have had it.
        sent_at = _maybe_sent_at(action, now)
        self._insert_unsent_nudge(conn, action, NotSent(nudge_id, channel, PAYMENT_LINK_TEMPLATE, error), sent_at)
        opened = conn.scalar(
            sa.select(payment_links.c.opened_at).where(payment_links.c.token_id == link_id_for(action.idempotency_key))
        )
        if opened is not None:  # the customer opened its link: it reached them
            conn.execute(
                nudges.update()
                .where(nudges.c.nudge_id == nudge_id)
                .values(status="accepted", delivered=True, clicked_at=opened, error=None)
            )
            _count_sent(conn, action.merchant_id, action.order_id, 1, now)
        return True

    def _insert_unsent_nudge(self, conn: sa.Connection, action: ActionRow, unsent: NotSent, now: datetime) -> None:
        """The nudge that could not be sent (it counts against max_nudges all the same)."""
        conn.execute(
            nudges.insert().values(
                nudge_id=unsent.nudge_id,
                merchant_id=action.merchant_id,
                order_id=action.order_id,
                channel=unsent.channel,
                template_id=unsent.template_id,
                sent_at=now,
                status="rejected",
                delivered=False,
                error=unsent.error[:2000],
                decision_id=action.decision_id,
                propensity=action.payload.get("propensity"),
                idempotency_key=action.idempotency_key,
            )
        )

    def charge_in_flight(
        self,
        conn: sa.Connection,
        order: RowMapping,
        kinds: Iterable[ActionKind] = CHARGE_KINDS,
        *,
        excluding: int | None = None,
    ) -> datetime | None:
        """When to look again at a charge of ``order`` (of ``kinds``) that may be with its connector: claimed now
        (its lease's end, which a slow connector can outlast, so an ended lease still counts until the charge is
        recorded), or sent and not answered (its re-send). None when there is none."""
        query = sa.select(sa.func.min(actions.c.due_at)).where(
            actions.c.merchant_id == order["merchant_id"],
            actions.c.order_id == order["order_id"],
            actions.c.state.in_(OPEN_ACTION_STATES),
            actions.c.kind.in_([kind.value for kind in kinds]),
            _maybe_with_connector(),
        )
        if excluding is not None:
            query = query.where(actions.c.action_id != excluding)
        until = conn.scalar(query)
        return None if until is None else as_utc(until)

    def charge_ahead_of(self, conn: sa.Connection, order: RowMapping, action: ActionRow) -> datetime | None:
        """When to look again, for a charge's first send or a payment-link message, at another action of the order
        that goes first. For a charge: a charge sent and not answered; for a retry also a link payment claimed
        now, an older retry claimed now, or a message on its way to its provider. A newer claimed retry waits for
        this one in turn, a claimed retry waits for a claimed link payment, and a message marks itself only when
        no charge is claimed, so two never wait for each other. For a message: any charge claimed now or sent
        and not answered. None when nothing goes first."""
        query = _AHEAD_BY_KIND.get(action.kind, _AHEAD_OF_OTHERS)
        until = conn.scalar(query, _of_order(order, other_than=action.action_id))
        return None if until is None else as_utc(until)

    def message_being_sent(self, conn: sa.Connection, order: RowMapping, action: ActionRow) -> datetime | None:
        """The lease's end of another payment-link message of ``order`` on its way to its provider now (claimed and
        marked by ``Effects._mark_message_sending``, and its answer not yet recorded), or None: two messages of one
        order never go out together, nor before the first is on record for the rules to see. A mark left on one
        that is not claimed holds nothing, and a claim clears it."""
        until = conn.scalar(
            sa.select(sa.func.min(actions.c.due_at)).where(
                actions.c.merchant_id == order["merchant_id"],
                actions.c.order_id == order["order_id"],
                actions.c.action_id != action.action_id,
                _message_with_its_provider(),
            )
        )
        return None if until is None else as_utc(until)

    def unknown_charge(self, conn: sa.Connection, order: RowMapping) -> int | None:
        """A dead-lettered charge of the order that was sent and never answered (whether it took the money is
        for an operator to find out): no new charge goes on top of it. Its action id, or None."""
        found = conn.scalar(_UNKNOWN_CHARGE_OF_ORDER, _of_order(order))
        return None if found is None else int(found)

    def mark_sent(self, conn: sa.Connection, action: ActionRow, now: datetime) -> bool:
        """Note that ``action`` goes out now, a charge to its connector or a message to its provider (kept until
        the answer is recorded); False when the claim is no longer ``action``'s or the mark is already on it (it
        must not be sent as a first send)."""
        marked = conn.execute(
            actions.update()
            .where(_still_claimed(action), actions.c.unanswered_since.is_(None))
            .values(unanswered_since=now)
        ).rowcount
        return marked == 1

    def lock_claim(self, conn: sa.Connection, action: ActionRow) -> bool:
        """Lock ``action``'s row (PostgreSQL) while its claim is still this one; False when it is not (taken over,
        or cancelled: its order settled, or a later decision replaced it). Under the order's lock, as every path
        that changes an order's actions takes it first."""
        return (
            conn.execute(self.for_update(sa.select(actions.c.action_id).where(_still_claimed(action)))).first()
            is not None
        )

    def claims_held(self, tokens: Sequence[str]) -> set[str]:
        """Which of the claim ``tokens`` still hold an action (claimed, not yet completed or taken over)."""
        with self.engine.connect() as conn:
            found = conn.scalars(
                sa.select(actions.c.claim_token)
                .where(actions.c.claim_token.in_(tokens), actions.c.state == ActionState.CLAIMED.value)
                .distinct()
            )
            return {str(token) for token in found}

    def renew_claims(self, claims: Sequence[tuple[ActionRow, timedelta]]) -> set[int]:
        """Extend each action's claim to the clock plus its lease, all in one transaction (one commit however many
        charges are out); the ids of the actions whose claim is no longer this one.

        The rows are locked order by order, then by action id (``by_order_of``), as a worker's batch locks them
        (its orders one after another, each order's actions after it): taken in the order the claims were kept, a
        renewal could lock one order's message while the batch settling that order and another held the other's.
        """
        now = self.clock()
        with self.engine.begin() as conn:
            return {
                action.action_id
                for action, lease in sorted(claims, key=lambda claim: by_order_of(claim[0]))
                if not self.extend_claim(conn, action, now + lease)
            }

    def extend_claim(self, conn: sa.Connection, action: ActionRow, until: datetime) -> bool:
        """Extend ``action``'s claim to ``until`` (never shorten it); False when the claim is no longer this one."""
        held = conn.execute(
            actions.update()
            .where(_still_claimed(action))
            .values(due_at=sa.case((actions.c.due_at < until, until), else_=actions.c.due_at))
        ).rowcount
        return bool(held == 1)

    def unmark_sent(self, action: ActionRow) -> None:
        """Take back ``mark_sent`` for a charge that charged nothing (never sent, or refused outright), or a message
        its provider answered, while the claim is still ``action``'s: another worker may have sent it since."""
        with self.engine.begin() as conn:
            conn.execute(actions.update().where(_still_claimed(action)).values(unanswered_since=None))

    def resolve_charge(self, action_id: int, charged: bool) -> str:
        """An operator's answer for a dead-lettered charge that was sent and never answered (the switch was asked
        by hand): ``charged`` records the attempt as a success (the order succeeds, or, when already settled,
        the refund error is logged); otherwise the charge is taken to have taken nothing (a status check still
        planned asks all the same, and a success it finds is recorded then: ``_charged_after_all``). Either way the
        mark goes, so the order can be charged again, and an open order is decided again. Returns the order's state;
        ChargeResolutionError when the action is not such a charge."""
        now = self.clock()
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(actions).where(actions.c.action_id == action_id)).mappings().first()
            if (
                row is None
                or row["kind"] not in CHARGE_KIND_VALUES
                or row["state"] != ActionState.DEAD.value
                or row["unanswered_since"] is None
            ):
                raise ChargeResolutionError(
                    f"action {action_id} is not a dead-lettered charge waiting for its answer "
                    "(see unanswered_since in GET /v1/orders/<order_id>)"
                )
            action = ActionRow.of(row)
            order = self.lock_order(conn, action.merchant_id, action.order_id)
            if order is None:
                raise ChargeResolutionError(f"the order of action {action_id} is not known")
            connector = str(action.payload.get("connector") or "unknown")
            result = ChargeResult(status="success", connector=connector) if charged else None
            nothing = f"an operator answered that the {_planned_what(action)} sent and never answered took nothing"
            if not self._settle_unknown(conn, order, row, result, OPERATOR, nothing, now):
                raise ChargeResolutionError(f"action {action_id} was resolved by someone else meanwhile")
            state = conn.scalar(
                sa.select(orders.c.state).where(
                    orders.c.merchant_id == action.merchant_id, orders.c.order_id == action.order_id
                )
            )
        return str(state)

    def _settle_unknown(
        self,
        conn: sa.Connection,
        order: RowMapping,
        row: RowMapping,
        result: ChargeResult | None,
        by: str,
        nothing_taken: str,
        now: datetime,
    ) -> bool:
        """Record the answer for a charge sent and never answered (``row``, dead-lettered), given ``by`` an operator
        or its switch: ``result`` is the charge's answer (a success settles the order, or gives a duplicate back on
        one settled already; a decline is recorded and the order decided again), None when nothing was taken (the
        order is decided again, ``nothing_taken`` its cause). Either way its mark goes, so the order can be charged
        again. False (nothing changed) when the charge was answered meanwhile."""
        if row["unanswered_since"] is None:
            return False  # answered meanwhile, or taken as never charged already
        action = ActionRow.of(row)
        if result is None:
            verdict = "not charged"
        elif result.status == "success":
            verdict = "charged"
        else:
            verdict = _declined(result)
        sent_at = as_utc(row["unanswered_since"])
        # Taken as never charged, it keeps when it was sent: a success its switch reports later (a status check
        # still planned, or the one more ask after "not found") is recorded as that attempt (``_charged_after_all``).
        # Charged on an operator's word, it keeps when they said so: a switch that later says otherwise is flagged
        # (``_answer_after_charged``).
        if result is None:
            payload = action.payload | {TAKEN_AS_NOT_CHARGED: sent_at.isoformat()}
        elif result.status == "success" and by == OPERATOR:
            payload = action.payload | {CHARGED_BY_OPERATOR: now.isoformat()}
            if _names_charge(order, action):  # the merchant had reported the order paid by it: theirs is the word
                payload[REPORTED_PAID_BY_MERCHANT] = order["success_txn_id"]
        else:
            payload = action.payload
        changed = conn.execute(
            actions.update()
            .where(actions.c.action_id == action.action_id, UNKNOWN_CHARGE)
            .values(
                state=ActionState.DEAD.value if result is None else ActionState.DONE.value,
                unanswered_since=None,
                updated_at=now,
                last_error=_noted(row["last_error"], f"resolved by {by}: {verdict}"),
                payload_json=_dump(payload),
            )
        ).rowcount
        if changed != 1:
            return False
        log.warning(
            "charge action %s resolved by %s: %s",
            action.action_id,
            by,
            verdict,
            extra={"merchant_id": action.merchant_id, "order_id": action.order_id},
        )
        if result is not None:
            # Dated when it was sent, not when the answer came: the history credits what came before.
            self._record_attempt(conn, order, action, result, now, attempted_at=sent_at)
        elif self.unknown_charge(conn, order) is None and order["state"] == OrderState.PENDING:
            self._decision_point(conn, order, now, nothing_taken)
        return True

    def unasked_standing(self, check: ActionRow) -> str:
        """What stands for the charge status check ``check`` asks about when its switch cannot be asked (no status
        call, an answer that cannot be read), for its dead-letter note: the charge as it is recorded now."""
        with self.engine.connect() as conn:
            row = (
                conn.execute(sa.select(actions).where(actions.c.action_id == int(check.payload["charge_action_id"])))
                .mappings()
                .first()
            )
        payment = f"ask connector {check.payload.get('connector')!r} about payment {check.payload.get('payment_id')}"
        if row is not None and row["unanswered_since"] is not None:
            return "the charge stays unknown until an operator answers for it (resolve-charge)"
        if row is not None and _taken_as_not_charged(row):
            why = "its switch did not find it" if check.payload.get(AFTER_NOT_FOUND) else "as an operator answered"
            late = "a send that reached the switch late goes unseen"
            return f"the charge stays taken as never charged ({why}); {late}: {payment}"
        if row is not None and _charged_by_operator(row):
            return f"the charge stays charged, as an operator answered, unconfirmed by its switch: {payment}"
        return "the charge stays as it is recorded"

    def _ask_switch(self, conn: sa.Connection, charge_action_id: int, due: datetime, now: datetime) -> None:
        """Ask the switch of a charge sent and never answered what became of it (``_ask_about``)."""
        row = conn.execute(sa.select(actions).where(actions.c.action_id == charge_action_id)).mappings().first()
        if row is not None:
            self._ask_about(conn, row, due, now)

    def _ask_about(self, conn: sa.Connection, row: RowMapping, due: datetime, now: datetime) -> None:
        """Ask the switch what became of charge ``row``, sent and never answered (a CHARGE_STATUS action, one per
        charge): planned for ``due``, or planned again when the last check got no answer or could not be made."""
        if row["state"] != ActionState.DEAD.value or row["unanswered_since"] is None:
            return  # not a charge whose outcome is unknown (it never went out, or it was answered)
        charge = ActionRow.of(row)
        key, again = _status_check_keys(charge.idempotency_key)
        payload = _check_payload(charge)
        if SENT_AGAIN_AFTER_NOT_FOUND in charge.payload:
            # Sent again after "not found" and not answered either: the one more ask, a send's time on the way after
            # the last one (NOT_FOUND_RECHECK_DELAY), whose "not found" is final.
            key, payload = again, payload | {AFTER_NOT_FOUND: True}
            due = max(due, now + NOT_FOUND_RECHECK_DELAY)
        if self._schedule(conn, charge.merchant_id, charge.order_id, ActionKind.CHARGE_STATUS, due, key, now, payload):
            return
        self._plan_check_again(conn, actions.c.idempotency_key == key, due, now)

    def _plan_check_again(
        self, conn: sa.Connection, which: sa.ColumnElement[bool], due: datetime, now: datetime
    ) -> None:
        """Plan the dead-lettered status check ``which`` selects (it got no answer within its tries, or its switch
        cannot be asked) again for ``due``; one planned SWITCH_SILENCE_LIMIT ago or more is asked no more
        (``_stop_asking``)."""
        row = (
            conn.execute(sa.select(actions).where(which, actions.c.state == ActionState.DEAD.value)).mappings().first()
        )
        if row is None:
            return
        check = ActionRow.of(row)
        if SWITCH_SILENT in check.payload or now >= check.planned_at + SWITCH_SILENCE_LIMIT:
            self._stop_asking(conn, check, row["last_error"], now)
            return
        conn.execute(
            actions.update()
            .where(actions.c.action_id == check.action_id, actions.c.state == ActionState.DEAD.value)
            .values(state=ActionState.SCHEDULED.value, due_at=due, attempts=0, claim_token=None, updated_at=now)
        )

    def _stop_asking(self, conn: sa.Connection, check: ActionRow, last: str | None, now: datetime) -> None:
        """Ask the switch no more about the charge status check ``check`` asks about: it has answered none of its
        asks since the check was planned, SWITCH_SILENCE_LIMIT ago, an outage an hourly ask does not wait out. The
        check stays dead, marked (SWITCH_SILENT) and noted with why and who takes the charge over, once; logged as
        an error. An unknown charge is its operator's (``resolve-charge``; its order stays open, never failed, and
        its close keeps saying so hourly); a refund waiting on the switch for a charge an operator answered for goes
        to an operator to make by hand (``refund_held``); otherwise the charge stays as recorded."""
        if SWITCH_SILENT in check.payload:
            return  # stopped already (the order's close looks again hourly)
        charge_id = int(check.payload["charge_action_id"])
        row = conn.execute(sa.select(actions).where(actions.c.action_id == charge_id)).mappings().first()
        connector, payment_id = check.payload.get("connector"), check.payload.get("payment_id")
        why = (
            f"no longer asked: switch {connector!r} answered no status check of payment {payment_id} since "
            f"{utc_second(check.planned_at)} ({span_words(SWITCH_SILENCE_LIMIT)}; last: {last or 'not asked'})"
        )
        label = "other"
        if row is not None and row["unanswered_since"] is not None:
            label = "unknown"
            standing = (
                f"charge action {charge_id} stays unknown and its order open (never failed: the customer may have "
                f"paid) until an operator asks {connector!r} and answers with `winback executor resolve-charge "
                f"{charge_id} --charged|--not-charged` (the console's 'Charge unknown')"
            )
        elif row is not None and _charged_by_operator(row):
            label = "charged_by_operator"
            standing = (
                f"charge action {charge_id} stays charged on an operator's word, unconfirmed; a refund of it waiting "
                "for the switch goes to an operator to make by hand (`winback executor refunds-by-hand`)"
            )
        elif row is not None and _taken_as_not_charged(row):
            label = "taken_as_not_charged"
            standing = (
                f"charge action {charge_id} stays taken as never charged; if {connector!r} took payment {payment_id} "
                "after all (a send that reached it late), nobody else will see it: check it with the connector "
                "(`winback executor refunds-by-hand` lists it)"
            )
            note_case(conn, SILENT_NOT_CHARGED_CASE, check.merchant_id, check.order_id, check.action_id, now)
        else:
            standing = f"charge action {charge_id} stays as it is recorded"
        note = f"{why}; {standing}"
        conn.execute(
            actions.update()
            .where(actions.c.action_id == check.action_id)
            .values(
                last_error=_noted(last, note),
                updated_at=now,
                payload_json=_dump(check.payload | {SWITCH_SILENT: {"at": now.isoformat(), "charge": label}}),
            )
        )
        log.error(
            "status checks given up: %s",
            note,
            extra={"merchant_id": check.merchant_id, "order_id": check.order_id, "kind": check.kind},
        )

    def _ask_again_after_not_found(self, conn: sa.Connection, charge: ActionRow, now: datetime) -> None:
        """Plan the one more status check of a charge the switch did not find (NOT_FOUND_RECHECK_DELAY from now): a
        send that timed out may reach the switch after its "not found", and nobody would ask about that payment
        id again. One per charge (its key), whichever check's "not found" planned it: the one that took the charge as
        never charged, or one still planned when an operator answered "not charged" or "charged" (then the one more
        "not found" contradicts them)."""
        _, key = _status_check_keys(charge.idempotency_key)
        payload = _check_payload(charge) | {AFTER_NOT_FOUND: True}
        due = now + NOT_FOUND_RECHECK_DELAY
        self._schedule(conn, charge.merchant_id, charge.order_id, ActionKind.CHARGE_STATUS, due, key, now, payload)

    def _check_again_later(self, conn: sa.Connection, check: ActionRow, due: datetime, now: datetime) -> None:
        """A status check that got no answer within its tries is planned again for ``due`` while its charge still
        waits for the switch's word: unknown, taken as never charged and not found charged since, or charged on an
        operator's word (the switch may yet contradict them)."""
        row = (
            conn.execute(sa.select(actions).where(actions.c.action_id == int(check.payload["charge_action_id"])))
            .mappings()
            .first()
        )
        if row is None:
            return
        if row["unanswered_since"] is not None:
            self._ask_about(conn, row, due, now)
        elif _taken_as_not_charged(row) or _charged_by_operator(row):
            self._plan_check_again(conn, actions.c.action_id == check.action_id, due, now)

    def _resolve_from_switch(
        self, conn: sa.Connection, order: RowMapping, check: ActionRow, result: ChargeResult | None, now: datetime
    ) -> None:
        """The switch's answer about a charge sent and never answered (``check``: the CHARGE_STATUS action that
        asked): recorded as an operator's would be (``_settle_unknown``); a "not found" is asked about once more
        later. On a charge taken as never charged meanwhile (an operator's "not charged", or the switch's "not
        found"), a success is that charge's after all (``_charged_after_all``). Noted on the check either way."""
        charge_id = int(check.payload["charge_action_id"])
        row = conn.execute(sa.select(actions).where(actions.c.action_id == charge_id)).mappings().first()
        payment_id = check.payload.get("payment_id")
        what = "not found: it never reached the switch" if result is None else f"status {result.status}"
        planned = "charge" if row is None else _planned_what(ActionRow.of(row))
        nothing = (
            f"the switch answered that the {planned} sent and never answered never reached it "
            f"(payment {payment_id} not found)"
        )
        sent_again = (
            None
            if row is None or result is not None
            else self._send_again_after_not_found(conn, order, row, check, now)
        )
        if sent_again:
            nothing += f"; not sent again: not allowed now: {sent_again}"
        if sent_again == "":
            note = (
                f"the switch answered: payment {payment_id} not found; sent again as the same charge (same "
                "idempotency key and payment id), so a first send that reaches the switch late is that one payment"
            )
        elif row is not None and self._settle_unknown(conn, order, row, result, "the switch", nothing, now):
            note = f"the switch answered: payment {payment_id} {what}"
            if result is None and check.payload.get(AFTER_NOT_FOUND):
                note = f"the switch answered again: payment {payment_id} not found; it was never charged"
                if _paid_on_the_merchants_word(order, ActionRow.of(row)):
                    note = _noted(note, self._flag_dispute(conn, order, ActionRow.of(row), check, NOT_FOUND_TWICE, now))
            elif result is None:
                self._ask_again_after_not_found(conn, ActionRow.of(row), now)
                note += f"; asked once more in {NOT_FOUND_RECHECK_DELAY}"
                if sent_again:
                    note += f"; not sent again: not allowed now: {sent_again}"
        elif row is not None and _taken_as_not_charged(row):
            note = self._answer_after_not_charged(conn, order, row, check, result, now)
        elif row is not None and _charged_by_operator(row):
            note = self._answer_after_charged(conn, order, row, check, result, now)
        else:
            note = f"the switch answered ({what}) after charge action {charge_id} was answered"
        # A dispute flagged on this check as its answer was recorded (``_flag_dispute``) noted it already.
        flagged = conn.scalar(sa.select(actions.c.last_error).where(actions.c.action_id == check.action_id))
        note = note if flagged is None else _noted(note, flagged)
        conn.execute(actions.update().where(actions.c.action_id == check.action_id).values(last_error=note))

    def _send_again_after_not_found(
        self, conn: sa.Connection, order: RowMapping, row: RowMapping, check: ActionRow, now: datetime
    ) -> str | None:
        """Send charge ``row`` (sent, never answered) again, now, as the same charge, when its switch first answers
        "not found" for it on an order still open. Taken as never charged and decided again,
        the order's next attempt was a new payment (``<order_id>_<n+1>``, a new key): a first send still on its way
        (NOT_FOUND_RECHECK_DELAY) that reached the switch after it charged the customer twice until the one more
        ask found it and refunded it. Sent again under its own idempotency key, payment id and body, it is one
        payment whichever send arrives first: the switch charges a key once, as the executor's re-sends after a
        lost answer already count on (data/README.md, "Payment switch calls"). It keeps its 'sent' mark, so it is
        a re-send: it goes ahead on an open order and holds the order's other charges back until answered; one
        that is not answered again is asked about once more (``_ask_about``), whose "not found" is final. Once
        only, and not on the one more ask itself, nor on an order settled since (a charge there would be a
        duplicate: it is taken as never charged, and asked about once more, as before), nor for a retry the hard
        rules now forbid. "" when sent again; the rules it would break (comma-separated) when they forbid it; None
        when it is not sent again otherwise."""
        charge = ActionRow.of(row)
        if (
            row["unanswered_since"] is None
            or check.payload.get(AFTER_NOT_FOUND)
            or SENT_AGAIN_AFTER_NOT_FOUND in charge.payload
            or order["state"] not in OPEN_ORDER_STATES
        ):
            return None
        if charge.kind == ActionKind.RETRY:
            # A new charge if the first send never arrives: the hard rules again, as at a first send (the decision
            # is minutes old at least, a checkout window may have closed, the merchant's config changed). Forbidden
            # now, it is not sent: taken as never charged and the order decided again, as a retry the rules refuse
            # at its send is (``Replan``); the one more ask still looks for a first send that lands late.
            broken = retry_forbidden(self.rules_now(conn, order, charge, now, sending=True), charge, now)
            if broken:
                log.warning(
                    "payment %s not found by its switch: charge action %s is not sent again, the rules forbid it "
                    "now (%s); the order is decided again",
                    check.payload.get("payment_id"),
                    charge.action_id,
                    ", ".join(broken),
                    extra={"merchant_id": charge.merchant_id, "order_id": charge.order_id},
                )
                return ", ".join(broken)
        note = f"not found by its switch at {utc_second(now)}: sent again as the same charge"
        changed = conn.execute(
            actions.update()
            .where(actions.c.action_id == charge.action_id, UNKNOWN_CHARGE)
            .values(
                state=ActionState.SCHEDULED.value,
                due_at=now,
                attempts=0,
                claim_token=None,
                updated_at=now,
                last_error=_noted(row["last_error"], note),
                payload_json=_dump(charge.payload | {SENT_AGAIN_AFTER_NOT_FOUND: now.isoformat()}),
            )
        ).rowcount
        if changed != 1:
            return None
        log.warning(
            "payment %s not found by its switch: charge action %s is sent again under the same idempotency key",
            check.payload.get("payment_id"),
            charge.action_id,
            extra={"merchant_id": charge.merchant_id, "order_id": charge.order_id},
        )
        return ""

    def _answer_after_not_charged(
        self,
        conn: sa.Connection,
        order: RowMapping,
        row: RowMapping,
        check: ActionRow,
        result: ChargeResult | None,
        now: datetime,
    ) -> str:
        """The switch's answer about a charge already taken as never charged; the note for the check. A success
        is recorded (``_charged_after_all``); a decline agrees (nothing was taken) and is recorded as that attempt
        (``_declined_after_all``); "not found" is asked about once more later, unless this was that last ask."""
        payment_id = check.payload.get("payment_id")
        if result is not None and result.status == "success":
            self._charged_after_all(conn, order, row, result, now)
            return f"the switch answered: payment {payment_id} succeeded, after it was taken as never charged"
        merchants_word = _paid_on_the_merchants_word(order, ActionRow.of(row))
        if result is not None:
            note = (
                f"the switch answered: payment {payment_id} {result.status}; nothing was taken, as recorded, and "
                "the decline is recorded as that attempt"
            )
            if self._declined_after_all(conn, row, result, now) and merchants_word:
                note = _noted(note, self._flag_dispute(conn, order, ActionRow.of(row), check, _declined(result), now))
            return note
        if check.payload.get(AFTER_NOT_FOUND):
            note = f"the switch answered again: payment {payment_id} not found; it was never charged"
            if merchants_word:
                note = _noted(note, self._flag_dispute(conn, order, ActionRow.of(row), check, NOT_FOUND_TWICE, now))
            return note
        self._ask_again_after_not_found(conn, ActionRow.of(row), now)
        return f"the switch answered: payment {payment_id} not found; asked once more in {NOT_FOUND_RECHECK_DELAY}"

    def _declined_after_all(self, conn: sa.Connection, row: RowMapping, result: ChargeResult, now: datetime) -> bool:
        """A charge taken as never charged that its switch now reports declined: the decline goes into the history
        the models learn from as that attempt, dated when it was sent, as ``_settle_unknown`` records one, and is the
        order's last failure unless a charge made since failed later. The order is not decided again: it was when
        the charge was taken as never charged, and has moved on since. False when another answer recorded it
        first."""
        charge = ActionRow.of(row)
        declined = _declined(result)
        if not _answered_later(conn, row, declined, now):
            return False  # recorded by another answer already
        sent_at = as_utc(datetime.fromisoformat(str(charge.payload[TAKEN_AS_NOT_CHARGED])))
        _, txn_id = self._insert_attempt(conn, charge, result, sent_at)
        # The order's last failure (what its next decision and the console read) is this decline, unless a charge
        # made since (decided again after "not charged") failed later: that one stays the last.
        later = conn.execute(
            sa.select(transactions.c.status).where(
                transactions.c.merchant_id == charge.merchant_id,
                transactions.c.order_id == charge.order_id,
                transactions.c.txn_id != txn_id,
                transactions.c.created_at > sent_at,
            )
        ).scalars()
        if all(_attempt_status(status) == "success" for status in later):
            _note_last_failure(conn, charge, result, now)
        return True

    def _answer_after_charged(
        self,
        conn: sa.Connection,
        order: RowMapping,
        row: RowMapping,
        check: ActionRow,
        result: ChargeResult | None,
        now: datetime,
    ) -> str:
        """The switch's answer about a charge an operator answered for as charged; the note for the check. A success
        agrees; "not found" is asked about once more later (a send may still be on its way); a decline, or "not
        found" again at that one more ask, contradicts the operator and is flagged (``_flag_dispute``)."""
        payment_id = check.payload.get("payment_id")
        if result is not None and result.status == "success":
            self._confirm_refund_by_hand(conn, ActionRow.of(row), now)
            return f"the switch answered: payment {payment_id} succeeded, as an operator answered"
        if result is None and not check.payload.get(AFTER_NOT_FOUND):
            self._ask_again_after_not_found(conn, ActionRow.of(row), now)
            return (
                f"the switch answered: payment {payment_id} not found, though an operator answered charged; asked "
                f"once more in {NOT_FOUND_RECHECK_DELAY}"
            )
        said = NOT_FOUND_TWICE if result is None else _declined(result)
        return self._flag_dispute(conn, order, ActionRow.of(row), check, said, now)

    def _flag_dispute(
        self,
        conn: sa.Connection,
        order: RowMapping,
        charge: ActionRow,
        check: ActionRow | None,
        said: str,
        now: datetime,
    ) -> str:
        """Flag that the switch contradicts (``said``) the word the order took ``charge`` as paid on: an operator's
        "charged", or its merchant's ``payment-succeeded`` naming it (``_paid_on_the_merchants_word``). /metrics
        counts these flags (service/executor/metrics.py), labelled by whose word it was; it is logged as an error.
        Flagged on ``check``, the status check whose answer this is, or on the charge's own check (one recorded as
        done, never asked, when the switch's answer came with the charge: ``_check_to_flag``), whose note then says
        so too. The order keeps its state: its merchant had the ``order.succeeded`` webhook, once, and CONTRACT.md
        has no event that takes a webhook back; someone must take it up with the merchant (``winback executor
        charge-disputes`` lists them). Nothing is refunded: there is nothing to give back (a refund planned on an
        operator's "charged" on an order settled before is not sent: ``_drop_refund_of_disputed``). The note for the
        check, saying whose word the switch contradicts."""
        merchant_txn_id = order["success_txn_id"] if _paid_on_the_merchants_word(order, charge) else None
        by_operator = CHARGED_BY_OPERATOR in charge.payload
        flag: dict[str, Any] = {"switch_said": said, "at": now.isoformat()}
        if by_operator:
            flag["operator_said"] = "charged"
        if merchant_txn_id is not None:
            flag |= {"merchant_said": "paid", "merchant_txn_id": merchant_txn_id}
        flagged_on = check or self._check_to_flag(conn, charge, now)
        payment_id = flagged_on.payload.get("payment_id")
        whose = _whose_word(merchant_txn_id, by_operator, charge.action_id)
        note = f"disputed: {_whose_word(merchant_txn_id, by_operator)}, the switch says payment {payment_id} {said}"
        if _switch_disputes(conn, charge.idempotency_key) is not None:
            return note  # flagged already (its resolution, if any, is kept): one dispute per charge
        values: dict[str, Any] = {"payload_json": _dump(flagged_on.payload | {SWITCH_CONTRADICTS: flag})}
        if check is None:
            earlier = conn.scalar(sa.select(actions.c.last_error).where(actions.c.action_id == flagged_on.action_id))
            values["last_error"] = _noted(earlier, note)
        conn.execute(actions.update().where(actions.c.action_id == flagged_on.action_id).values(**values))
        self._drop_refund_of_disputed(conn, charge, said, now)
        if merchant_txn_id is not None:
            consequence = (
                "the order succeeded on the merchant's report of this payment (its one order.succeeded went), and "
                "the customer paid nothing through it: nothing is refunded; take it up with the merchant, who may "
                "ship without the money"
            )
        elif order["success_txn_id"] == txn_id_for(charge.idempotency_key):
            consequence = "the order was settled on the operator's word: take it up with the merchant"
        else:
            consequence = (
                "the order was settled before, and the refund planned for this payment is not sent; its history "
                "records a payment the switch does not have: check it"
            )
        log.error(
            "charge disputed: merchant %s, order %s (%s), payment %s via connector %r: %s, the switch says %s; %s "
            "(`winback executor charge-disputes`)",
            charge.merchant_id,
            charge.order_id,
            order["state"],
            payment_id,
            flagged_on.payload.get("connector"),
            whose,
            said,
            consequence,
            extra={"merchant_id": charge.merchant_id, "order_id": charge.order_id},
        )
        return note

    def _check_to_flag(self, conn: sa.Connection, charge: ActionRow, now: datetime) -> ActionRow:
        """The status check a dispute of ``charge`` is flagged on (charge disputes are read from status checks: the
        index of migration 0020): its last, or, when its switch was never asked (its answer came with the charge,
        a decline, after its merchant had reported it paid), one recorded now as done, saying it was not asked."""
        first, again = _status_check_keys(charge.idempotency_key)
        for key in (again, first):
            row = conn.execute(sa.select(actions).where(actions.c.idempotency_key == key)).mappings().first()
            if row is not None:
                return ActionRow.of(row)
        self._schedule(
            conn, charge.merchant_id, charge.order_id, ActionKind.CHARGE_STATUS, now, first, now, _check_payload(charge)
        )
        conn.execute(
            actions.update()
            .where(actions.c.idempotency_key == first)
            .values(state=ActionState.DONE.value, last_error="not asked: the switch answered the charge itself")
        )
        row = conn.execute(sa.select(actions).where(actions.c.idempotency_key == first)).mappings().one()
        return ActionRow.of(row)

    @staticmethod
    def _drop_refund_of_disputed(conn: sa.Connection, charge: ActionRow, said: str, now: datetime) -> None:
        """The refund planned for disputed ``charge`` (on an order settled before the operator's "charged"), when it
        is still to be sent or was refused by the switch: cancelled, saying why (``_nothing_to_refund``). One being
        sent now is cancelled when its answer is recorded (``_disputed_refund_dropped``) or at its next try
        (``refund_held``)."""
        row = (
            conn.execute(sa.select(actions).where(actions.c.idempotency_key == _refund_key(charge.idempotency_key)))
            .mappings()
            .first()
        )
        if row is None or row["state"] not in (ActionState.SCHEDULED.value, ActionState.DEAD.value):
            return
        refund = ActionRow.of(row)
        note = _nothing_to_refund(refund.payload.get("payment_id"), said)
        handed = refund.payload.get(REFUND_BY_HAND)
        if isinstance(handed, dict):
            # Given to an operator after its switch's long silence: they may have refunded it by hand meanwhile.
            handed_at = _stored_moment_written(handed.get("at"))
            note += (
                f"; it went to an operator to refund by hand at {handed_at}: if it was refunded, the customer "
                "got back money that was never taken"
            )
            log.error(
                "refund action %s of payment %s, given to an operator to make by hand, is not needed: %s",
                refund.action_id,
                refund.payload.get("payment_id"),
                note,
                extra={"merchant_id": refund.merchant_id, "order_id": refund.order_id, "kind": refund.kind},
            )
        if row["state"] == ActionState.DEAD.value:
            note = _noted(row["last_error"], note)
        conn.execute(
            actions.update()
            .where(actions.c.action_id == row["action_id"], actions.c.state == row["state"])
            .values(state=ActionState.CANCELLED.value, claim_token=None, last_error=note, updated_at=now)
        )

    @staticmethod
    def _confirm_refund_by_hand(conn: sa.Connection, charge: ActionRow, now: datetime) -> None:
        """The switch confirms ``charge`` (charged on an operator's word) after its refund went to an operator to
        make by hand (REFUND_BY_HAND): noted on the refund, which stays theirs. It is not sent now: they may have
        refunded it by hand already, and a second refund would give the customer the money back twice."""
        row = (
            conn.execute(sa.select(actions).where(actions.c.idempotency_key == _refund_key(charge.idempotency_key)))
            .mappings()
            .first()
        )
        if row is None or row["state"] != ActionState.DEAD.value:
            return
        refund = ActionRow.of(row)
        if not isinstance(refund.payload.get(REFUND_BY_HAND), dict):
            return
        note = (
            f"the switch confirmed at {utc_second(now)} that payment {refund.payload.get('payment_id')} succeeded: "
            "the customer did pay twice, so the refund by hand is needed (winback does not send it: it may have "
            "been made by hand already)"
        )
        conn.execute(
            actions.update()
            .where(actions.c.action_id == refund.action_id)
            .values(last_error=_noted(row["last_error"], note), updated_at=now)
        )
        log.error(
            "refund action %s, given to an operator to make by hand: %s",
            refund.action_id,
            note,
            extra={"merchant_id": refund.merchant_id, "order_id": refund.order_id, "kind": refund.kind},
        )

    def _charged_after_all(
        self, conn: sa.Connection, order: RowMapping, row: RowMapping, result: ChargeResult, now: datetime
    ) -> None:
        """A charge taken as never charged (by an operator, or by its switch's "not found") that its switch now
        reports succeeded: the attempt is recorded as made when it was sent. An open order settles on it (one
        webhook; its messages and links stop); on one settled since (paid by the charge or link of the decision
        made again, by the merchant, or failed) it is a duplicate and refunded once (``_refund_duplicate``)."""
        charge = ActionRow.of(row)
        if not _answered_later(conn, row, "charged", now):
            return  # recorded by another answer already
        log.error(
            "charge action %s, taken as never charged, succeeded at its switch (payment %s_%s): recorded now; "
            "the order is %s",
            charge.action_id,
            charge.order_id,
            charge.payload.get("attempt_number"),
            "settled by it" if order["state"] in OPEN_ORDER_STATES else f"{order['state']}, so it is refunded",
            extra={"merchant_id": charge.merchant_id, "order_id": charge.order_id},
        )
        sent_at = as_utc(datetime.fromisoformat(str(charge.payload[TAKEN_AS_NOT_CHARGED])))
        self._record_attempt(conn, order, charge, result, now, attempted_at=sent_at)

    def _refund_duplicate(
        self, conn: sa.Connection, order: RowMapping, charge: ActionRow, number: int, now: datetime
    ) -> int | None:
        """Plan the refund of a charge that succeeded on an order already settled (paid by another attempt, a link,
        or the merchant; or failed, its webhook sent): the customer must not pay twice, and the merchant has its one
        webhook already. One REFUND action per charge (its idempotency key derives from the charge's, so the switch
        refunds once however often it is asked); its id."""
        key = _refund_key(charge.idempotency_key)
        payload = {
            "charge_action_id": charge.action_id,
            "connector": charge.payload.get("connector"),
            "attempt_number": number,
            "payment_id": f"{charge.order_id}_{number}",
            "txn_id": txn_id_for(charge.idempotency_key),
            "amount": order["amount"],
            "currency": order["currency"],
            "reason": "duplicate",
        }
        self._schedule(conn, charge.merchant_id, charge.order_id, ActionKind.REFUND, now, key, now, payload)
        found = conn.scalar(sa.select(actions.c.action_id).where(actions.c.idempotency_key == key))
        return None if found is None else int(found)

    def refund_held(self, refund: ActionRow) -> Defer | Skip | Permanent | None:
        """Whether the refund of a duplicate charge waits, is not sent, or goes to an operator (None: it goes now).
        A charge recorded as charged on an operator's word alone may never have been taken: while a status check of
        it is still to ask the switch, its refund waits for that answer (a refund of a payment the switch never took
        is refused, and was dead-lettered for an operator to refund by hand money nobody took); once the switch has
        contradicted the operator (``_flag_dispute``) it is not sent. It waits REFUND_WAIT_FOR_SWITCH at most: a
        switch that answers no status check for that long leaves it to an operator to refund by hand
        (``_switch_silent_on_refund``). A charge the switch itself answered for, or one it cannot be asked about
        (its check dead-lettered), is refunded on the answer that stands."""
        now = self.clock()
        charge_key = _charge_key_of_refund(refund.idempotency_key)
        payment_id = refund.payload.get("payment_id")
        with self.engine.connect() as conn:
            charge = conn.execute(sa.select(actions).where(actions.c.idempotency_key == charge_key)).mappings().first()
            if charge is None or not _charged_by_operator(charge):
                return None
            said = _switch_disputes(conn, charge_key)
            if said is not None:
                return Skip(_nothing_to_refund(payment_id, said))
            checks = conn.execute(
                sa.select(
                    actions.c.due_at,
                    actions.c.planned_at,
                    actions.c.last_error,
                    actions.c.state,
                    actions.c.payload_json,
                )
                .where(actions.c.idempotency_key.in_(_status_check_keys(charge_key)))
                .order_by(actions.c.planned_at)
            ).all()
        asking = [check for check in checks if check.state in OPEN_ACTION_STATES]
        # A check asked no more after its switch's silence (``_stop_asking``) will bring no answer either.
        silent = [check for check in checks if SWITCH_SILENT in orjson.loads(check.payload_json or "{}")]
        if not asking and not silent:
            return None
        gives_up_at = refund.planned_at + REFUND_WAIT_FOR_SWITCH
        if now >= gives_up_at or not asking:
            unanswered = asking or silent
            since, last = as_utc(unanswered[0].planned_at), unanswered[-1].last_error
            why = _switch_silent_on_refund(refund, ActionRow.of(charge), since, last)
            return Permanent(why, refund_by_hand=REFUND_SWITCH_SILENT)
        return Defer(
            min(max(min(as_utc(check.due_at) for check in asking), now + RECHECK), gives_up_at),
            f"waits for the switch's status of payment {payment_id}: it was recorded as charged on an operator's "
            f"word, and is given back once the switch confirms it took it (or by hand, after "
            f"{span_words(REFUND_WAIT_FOR_SWITCH)} without its answer)",
        )

    def _record_refund(self, conn: sa.Connection, action: ActionRow, refunded: Refunded, now: datetime) -> None:
        """Note on the refund action (shown in the order view) that the switch took the refund."""
        note = f"refunded through connector {action.payload.get('connector')!r}: {refunded.status}"
        if refunded.refund_id:
            note += f" (refund {refunded.refund_id})"
        conn.execute(
            actions.update()
            .where(actions.c.action_id == action.action_id)
            .values(
                last_error=note,
                payload_json=_dump(
                    action.payload | {"refund_status": refunded.status, "refund_id": refunded.refund_id}
                ),
            )
        )
        log.warning(
            "duplicate charge %s refunded: %s",
            action.payload.get("payment_id"),
            note,
            extra={"merchant_id": action.merchant_id, "order_id": action.order_id},
        )

    def withdraw_link_payment(self, action: ActionRow) -> bool:
        """Take back a link payment that was never sent (its connector would not take it now): the attempt never
        happened, so its action is cancelled (its number stays used) and the customer's link works again. False
        when the claim is no longer ``action``'s or the charge was sent."""
        now = self.clock()
        with self.engine.begin() as conn:
            # Its attempt number is not given back: a payment id <order_id>_<n> is never used for two charges. The
            # action stays, cancelled and never sent, so the order's history skips that number
            # (``_numbers_never_used``): deleted, the gap counted as a silent retry made against max_retries. Its
            # key moves aside for the link's next payment, which takes the link's key.
            withdrawn = conn.execute(
                actions.update()
                .where(_still_claimed(action), actions.c.unanswered_since.is_(None))
                .values(
                    state=ActionState.CANCELLED.value,
                    claim_token=None,
                    idempotency_key=f"{action.idempotency_key}:withdrawn:{action.action_id}",
                    last_error="withdrawn: its connector would not take it; nothing was sent",
                    updated_at=now,
                )
            ).rowcount
            if withdrawn != 1:
                return False
            conn.execute(
                payment_links.update()
                .where(payment_links.c.token_id == action.payload["token_id"])
                .values(used_at=None)
            )
        return True

    def _on_close(self, conn: sa.Connection, order: RowMapping, action: ActionRow, now: datetime) -> None:
        if order["state"] not in OPEN_ORDER_STATES:
            return
        self._close(conn, order, now, excluding=action.action_id)

    # ----------------------------------------------------------------------------------- payment links

    def new_link(
        self, merchant_id: str, order_id: str, idempotency_key: str, now: datetime
    ) -> tuple[str, str, datetime]:
        """(token_id, token, expires_at) of the link a nudge action sends (token_id stable across re-sends)."""
        merchant = self.merchant(merchant_id)
        token_id = link_id_for(idempotency_key)
        expires_at = now + timedelta(hours=merchant.retarget.link_ttl_hours)
        token = self.links.issue(LinkClaims(token_id, merchant_id, order_id, expires_at))
        return token_id, token, expires_at

    def _link(self, conn: sa.Connection, claims: LinkClaims, now: datetime) -> RowMapping:
        query = sa.select(payment_links).where(payment_links.c.token_id == claims.token_id)
        if is_postgres(self.engine):
            query = query.with_for_update()
        link = conn.execute(query).mappings().first()
        if link is None and self._unconfirmed_link(conn, claims, now):
            link = conn.execute(query).mappings().first()
        if link is None or link["merchant_id"] != claims.merchant_id or link["order_id"] != claims.order_id:
            raise tampered()
        if link["used_at"] is not None:
            raise LinkError(
                409, "This link was already used", "this payment link was already used; each link pays once"
            )
        return link

    @staticmethod
    def _unconfirmed_link(conn: sa.Connection, claims: LinkClaims, now: datetime) -> bool:
        """Keep the link of one of the order's messages whose provider never confirmed it: a try that timed out
        (or whose worker died) may have reached the customer all the same, and a link is kept only with a
        confirmed send. Its token is genuine (``LinkSigner.verify``), so winback minted it for that message; its
        row is made now. Before, the customer who wanted to pay was told "This link is not valid". False when the
        token names no message of the order."""
        keys = conn.scalars(
            sa.select(actions.c.idempotency_key).where(
                actions.c.merchant_id == claims.merchant_id,
                actions.c.order_id == claims.order_id,
                actions.c.kind == ActionKind.NUDGE.value,
            )
        ).all()
        key = next((key for key in keys if link_id_for(key) == claims.token_id), None)
        if key is None:
            return False
        log.warning(
            "a payment link of a message its provider never confirmed is used",
            extra={"merchant_id": claims.merchant_id, "order_id": claims.order_id},
        )
        conn.execute(
            upsert_into(conn, payment_links)
            .values(
                token_id=claims.token_id,
                merchant_id=claims.merchant_id,
                order_id=claims.order_id,
                nudge_id=nudge_id_for(key),
                expires_at=claims.expires_at,
                created_at=now,
            )
            .on_conflict_do_nothing(index_elements=[payment_links.c.token_id])
        )
        return True

    def _locked_link(self, conn: sa.Connection, claims: LinkClaims, now: datetime) -> tuple[RowMapping, RowMapping]:
        """The link of ``claims`` and its order, both locked, the order first: recording a message's send locks the
        order and then keeps the message's link (``_keep_link``), and a link locked before its order deadlocked
        with it on PostgreSQL (the customer paying the link of a message whose re-send was being recorded). The
        link is checked before the order, so a used link says so whatever became of its order."""
        order = self.lock_order(conn, claims.merchant_id, claims.order_id)
        link = self._link(conn, claims, now)
        return link, self._payable_order(order, claims)

    @staticmethod
    def _payable_order(order: RowMapping | None, claims: LinkClaims) -> RowMapping:
        """``order``, the link's, when a link may open or pay it; LinkError says why not."""
        if order is None:
            raise tampered()
        if order["state"] == OrderState.SUCCEEDED:
            raise LinkError(
                409, "This order is already paid", f"order {claims.order_id} is already paid; nothing to do"
            )
        if order["state"] == OrderState.FAILED:
            raise LinkError(410, "This order is closed", f"order {claims.order_id} is closed and can no longer be paid")
        return order

    def open_link(self, token: str) -> LinkPage:
        """Verify a link for the payment page and note the click (LinkError with the page's status otherwise)."""
        now = self.clock()
        claims = self.links.verify(token, now)
        with self.engine.begin() as conn:
            link, order = self._locked_link(conn, claims, now)
            if link["opened_at"] is None:
                conn.execute(
                    payment_links.update().where(payment_links.c.token_id == claims.token_id).values(opened_at=now)
                )
                if link["nudge_id"] is not None:
                    conn.execute(
                        nudges.update()
                        .where(nudges.c.nudge_id == link["nudge_id"], nudges.c.clicked_at.is_(None))
                        .values(clicked_at=now)
                    )
        return LinkPage(
            token_id=claims.token_id,
            merchant_id=claims.merchant_id,
            order_id=claims.order_id,
            amount=float(order["amount"]),
            currency=str(order["currency"]),
            state=str(order["state"]),
            expires_at=claims.expires_at,
        )

    def start_link_payment(self, token: str, lease_seconds: float, holder: str, claim_token: str) -> LinkPayment:
        """Use up a link and claim the payment attempt it makes (performed by the caller right away).

        If the caller dies before recording the answer, a worker re-sends the same attempt (same idempotency
        key, same payment id) once the lease runs out.
        """
        now = self.clock()
        claims = self.links.verify(token, now)
        with self.engine.begin() as conn:
            link, order = self._locked_link(conn, claims, now)
            # One charge at a time per order: a retry or an earlier link payment that may be out may take it too.
            if self.unknown_charge(conn, order) is not None:
                raise LinkError(
                    409,
                    "This payment cannot be taken online",
                    f"an earlier payment for order {claims.order_id} is being checked; the merchant will be in touch",
                )
            if self.charge_in_flight(conn, order) is not None:
                raise LinkError(
                    409,
                    "A payment is being processed",
                    f"a payment for order {claims.order_id} is being processed; try this link again in a minute",
                )
            conn.execute(payment_links.update().where(payment_links.c.token_id == claims.token_id).values(used_at=now))
            if link["opened_at"] is None:
                conn.execute(
                    payment_links.update().where(payment_links.c.token_id == claims.token_id).values(opened_at=now)
                )
            number = int(order["attempt_count"]) + 1
            conn.execute(
                orders.update()
                .where(orders.c.merchant_id == claims.merchant_id, orders.c.order_id == claims.order_id)
                .values(attempt_count=number, updated_at=now)
            )
            request = orjson.loads(order["request_json"])
            connectors = request.get("available_connectors") or self.merchant(claims.merchant_id).connectors
            payload = {
                "attempt_number": number,
                "connector": connectors[0],
                "strategy": Strategy.RETARGET_LINK.value,
                "token_id": claims.token_id,
                "nudge_id": link["nudge_id"],
            }
            key = f"{claims.merchant_id}:{claims.order_id}:link:{claims.token_id}"
            conn.execute(
                actions.insert().values(
                    merchant_id=claims.merchant_id,
                    order_id=claims.order_id,
                    kind=ActionKind.LINK_PAYMENT.value,
                    state=ActionState.CLAIMED.value,
                    due_at=now + timedelta(seconds=lease_seconds),
                    planned_at=now,
                    attempts=1,
                    claim_token=claim_token,
                    claimed_by=holder,
                    idempotency_key=key,
                    payload_json=_dump(payload),
                    created_at=now,
                    updated_at=now,
                )
            )
            row = conn.execute(sa.select(actions).where(actions.c.idempotency_key == key)).mappings().one()
        return LinkPayment(action=ActionRow.of(row))

    def order_state(self, merchant_id: str, order_id: str) -> str | None:
        """The order's state, or None when unknown."""
        with self.engine.connect() as conn:
            state = conn.scalar(
                sa.select(orders.c.state).where(orders.c.merchant_id == merchant_id, orders.c.order_id == order_id)
            )
        return None if state is None else str(state)

    # -------------------------------------------------------------------------------- assisted mode

    def act_on_queued(
        self,
        order_id: str,
        action: str,
        agent: str,
        reason: str,
        merchant_id: str | None = None,
        item_id: int | None = None,
    ) -> str:
        """An agent acts on the decision queued for an order: ``approve`` carries it out, ``reject`` stops.

        ``item_id``: the queued decision the agent chose (the console's); without it, the latest one waiting.
        Returns the order's new state. AgentQueueError when that decision is not waiting any more (another agent
        acted on the order first, or the order settled), when the order does not wait for an agent, or when the
        action is unknown; OrderNotFoundError for an unknown order.
        """
        if action not in {"approve", "reject"}:
            raise AgentQueueError(f"unknown agent action {action!r}: use 'approve' or 'reject'")
        now = self.clock()
        with self.engine.begin() as conn:
            if merchant_id is None:
                merchant_id = conn.scalar(
                    sa.select(agent_queue.c.merchant_id)
                    .where(agent_queue.c.order_id == order_id, agent_queue.c.state == "pending")
                    .order_by(agent_queue.c.item_id.desc())
                    .limit(1)
                )
                if merchant_id is None:
                    raise AgentQueueError(f"order {order_id!r} has no decision waiting for an agent")
            # The order's lock first, then the queue under it: two agents acting at once act one after the other,
            # and the second sees what the first did.
            order = self.lock_order(conn, merchant_id, order_id)
            if order is None:
                raise OrderNotFoundError(f"order {order_id!r} is not known")
            query = sa.select(agent_queue).where(
                agent_queue.c.merchant_id == merchant_id,
                agent_queue.c.order_id == order_id,
                agent_queue.c.state == "pending",
            )
            if item_id is not None:
                query = query.where(agent_queue.c.item_id == item_id)
            item = conn.execute(query.order_by(agent_queue.c.item_id.desc()).limit(1)).mappings().first()
            if item is None:
                raise AgentQueueError(f"order {order_id!r} has no decision waiting for an agent")
            if order["state"] != OrderState.AWAITING_AGENT:
                raise AgentQueueError(f"order {order_id!r} is {order['state']}: it does not wait for an agent")
            conn.execute(
                agent_queue.update()
                .where(agent_queue.c.item_id == item["item_id"])
                .values(
                    state="approved" if action == "approve" else "rejected", agent=agent, reason=reason, acted_at=now
                )
            )
            self._set_state(conn, order, OrderState.PENDING, now)
            order = self.lock_order(conn, merchant_id, order_id)
            assert order is not None
            if action == "approve":
                self._carry_out(conn, order, Decision.model_validate_json(item["decision_json"]), now)
            else:
                self._close(conn, order, now)
            state = conn.scalar(
                sa.select(orders.c.state).where(orders.c.merchant_id == merchant_id, orders.c.order_id == order_id)
            )
        return str(state)

    # ------------------------------------------------------------------------- opt-outs and receipts

    def opt_out_address(self, merchant_id: str, channel: Channel, address: str, source: str) -> bool:
        """``address`` opted out of ``channel`` for ``merchant_id`` (a STOP reply): kept for good, so every
        decision for an order whose customer has that address sees the channel opted out, and a message to it is
        not sent (``Effects._mark_message_sending``). Idempotent; True when it was not kept before."""
        with self.engine.begin() as conn:
            return record_opt_out(conn, merchant_id, channel, address, source, self.clock())

    def opt_out_order_address(self, merchant_id: str, order_id: str, channel: Channel, source: str) -> bool | None:
        """The address on ``channel`` of the order's customer opted out of ``merchant_id`` (an unsubscribe link in
        a message about the order): as ``opt_out_address``; None when the order is not known or its customer has
        no address on ``channel``."""
        with self.engine.begin() as conn:
            request_json = conn.scalar(
                sa.select(orders.c.request_json).where(
                    orders.c.merchant_id == merchant_id, orders.c.order_id == order_id
                )
            )
            address = None if request_json is None else order_customer_address(request_json, channel)
            if address is None:
                return None
            return record_opt_out(conn, merchant_id, channel, address, source, self.clock())

    def opt_out_message_address(self, merchant_id: str, provider_message_id: str, source: str) -> bool | None:
        """The address a nudge of ``merchant_id`` went to opted out of its channel (its provider refused it as
        opted out): as ``opt_out_order_address``; None when no nudge of the merchant has that provider id."""
        with self.engine.connect() as conn:
            nudge = conn.execute(
                sa.select(nudges.c.order_id, nudges.c.channel).where(
                    nudges.c.merchant_id == merchant_id, nudges.c.provider_message_id == provider_message_id
                )
            ).first()
        if nudge is None:
            return None
        return self.opt_out_order_address(merchant_id, nudge.order_id, Channel(nudge.channel), source)

    def opt_out(self, merchant_id: str, customer_id: str, channel: Channel) -> int:
        """The customer opted out of ``channel``: kept for the customer's addresses on it (their later orders
        respect it too), future decisions respect it and nudges still scheduled on that channel for the
        customer's open orders are cancelled. Returns orders touched.

        The customer's orders are locked up front, by order id, the order every transaction that locks several
        orders takes them in (``worker.by_order``): each was locked as it was rewritten, in the table's physical
        order, and a worker recording a batch of the same orders the other way round deadlocked with it on
        PostgreSQL (review). Read under the lock, the rewrite keeps what a re-decision committed meanwhile. An
        order is decided again at most once, after all its messages on ``channel`` are cancelled."""
        now = self.clock()
        touched = 0
        with self.engine.begin() as conn:
            rows = (
                conn.execute(
                    self.for_update(
                        sa.select(orders)
                        .where(
                            orders.c.merchant_id == merchant_id,
                            orders.c.customer_id == customer_id,
                            orders.c.state.in_(OPEN_ORDER_STATES),
                        )
                        .order_by(orders.c.order_id)
                    )
                )
                .mappings()
                .all()
            )
            for order in rows:
                request = orjson.loads(order["request_json"])
                address = customer_address(request["customer"], channel)
                if address is not None:
                    record_opt_out(conn, merchant_id, channel, address, "executor", now)
                with_opt_outs(request["customer"], [channel])
                conn.execute(
                    orders.update()
                    .where(orders.c.merchant_id == merchant_id, orders.c.order_id == order["order_id"])
                    .values(request_json=_dump(request), updated_at=now)
                )
                scheduled = conn.execute(
                    sa.select(actions).where(
                        actions.c.merchant_id == merchant_id,
                        actions.c.order_id == order["order_id"],
                        actions.c.kind == ActionKind.NUDGE.value,
                        actions.c.state == ActionState.SCHEDULED.value,
                    )
                ).mappings()
                cancelled = 0
                for row in scheduled.all():
                    action = ActionRow.of(row)
                    if action.payload.get("channel") == channel.value:
                        self._keep_maybe_sent(conn, action, "cancelled: the customer opted out", now)
                        conn.execute(
                            actions.update()
                            .where(actions.c.action_id == action.action_id)
                            .values(state=ActionState.CANCELLED.value, last_error="customer opted out", updated_at=now)
                        )
                        cancelled += 1
                # Decided once for all its cancelled messages: a decision per message decided the order twice (two
                # decisions, two plans) when two of its messages were scheduled on the channel.
                if cancelled:
                    fresh = self.lock_order(conn, merchant_id, order["order_id"])
                    if fresh is not None:
                        self._decision_point(conn, fresh, now, f"the customer opted out of {channel.value}")
                touched += 1
        return touched

    def record_receipt(
        self,
        provider_message_id: str,
        delivered: bool,
        merchant_id: str | None = None,
        *,
        error: str | None = None,
        failure: ReceiptFailure | None = None,
        status: ReceiptStatus | None = None,
        occurred_at: datetime | None = None,
    ) -> bool:
        """A provider's delivery receipt for a nudge (of ``merchant_id``'s, when given: a merchant's callback
        never touches another's nudges); True when a nudge matched. A failed one keeps its ``error`` on the nudge,
        led by the ``failure``'s kind: an ``undeliverable`` one takes the channel off the order's later decisions
        (``request_for``); a delivered or read one clears it.

        Receipts are ordered by what they say, then by their provider time stamp ``occurred_at`` (``status``:
        ``read``, ``delivered`` or ``failed``; by default what ``delivered`` says): a message delivered or read stays
        so whatever failed receipt comes after (WhatsApp may report a message failed after it was sent, never one
        delivered), a delivered one replaces a failed one, and of two receipts saying the same, the later one
        counts (an older one arriving late changes nothing).

        A failed receipt saying WhatsApp held the message back (``HELD_BACK_FAILURES``: a try-later or a rate
        limit) means it never reached the customer: it no longer counts against ``max_nudges`` or the day
        (``request_for``) nor in the order's ``nudge_count`` (a later delivered receipt puts it back), and its
        order, when open, is decided again now, for the message it still needs; after a try-later, not on that
        channel for ``TRY_LATER_WAIT`` (``_decide_with_channels_down``).

        A receipt of ``merchant_id``'s that matches no nudge yet (it came before its send was recorded) is kept
        (``_keep_early_receipt``) and applied when the send is recorded, as if it had come after it; False then."""
        receipt = _Receipt(status or ("delivered" if delivered else "failed"), occurred_at, error, failure)
        now = self.clock()
        with self.engine.begin() as conn:
            if self._apply_receipt(conn, provider_message_id, merchant_id, receipt, now):
                return True
            if merchant_id is None or len(provider_message_id) > PROVIDER_ID_MAX:
                return False  # no nudge can ever match it: kept, it would only wait to expire
            # Taken before the send's record reads the kept receipts (``_apply_early_receipts``): a send recorded
            # while this transaction looked is seen now, and one recorded after it finds this receipt kept.
            self._lock_provider_id(conn, merchant_id, provider_message_id)
            if self._apply_receipt(conn, provider_message_id, merchant_id, receipt, now):
                return True
            self._keep_early_receipt(conn, merchant_id, provider_message_id, receipt, now)
        return False

    def _apply_receipt(
        self,
        conn: sa.Connection,
        provider_message_id: str,
        merchant_id: str | None,
        receipt: _Receipt,
        now: datetime,
        *,
        opt_out: bool = False,
    ) -> bool:
        """Apply ``receipt`` to the nudges with ``provider_message_id`` (``record_receipt``); True when one matched.
        ``opt_out``: an opted-out receipt keeps the opt-out of the address the nudge went to (as the receipts route
        does for a receipt that matched when it came)."""
        status, failure = receipt.status, receipt.failure
        where = [nudges.c.provider_message_id == provider_message_id]
        if merchant_id is not None:
            where.append(nudges.c.merchant_id == merchant_id)
        # A delivered one clears the error an earlier failed one left (a provider may retry a delivery it first
        # reported failed): the nudge reached the customer, and ``error`` says why one did not (as when a message
        # kept as maybe sent turns out taken, ``_sent_after_all``).
        values: dict[str, Any] = {"delivered": status != "failed", "error": None, "receipt_status": status}
        if receipt.occurred_at is not None:
            values["receipt_at"] = receipt.occurred_at
        if status == "failed":
            note = f"{failure}: {receipt.error or ''}".strip() if failure else receipt.error
            values["error"] = (note or "failed")[:500]
        keys = conn.execute(sa.select(nudges.c.merchant_id, nudges.c.order_id).where(*where).distinct()).all()
        for key in sorted(keys, key=tuple):
            # The order first, then its nudges, as every transaction that changes both takes them.
            order = self.lock_order(conn, key.merchant_id, key.order_id)
            found = conn.execute(
                self.for_update(
                    sa.select(nudges).where(
                        *where, nudges.c.merchant_id == key.merchant_id, nudges.c.order_id == key.order_id
                    )
                )
            ).mappings()
            newly_held = False
            sent_change = 0
            for nudge in found.all():
                if opt_out and failure == "opted_out" and order is not None:
                    _keep_opt_out(conn, order, str(nudge["channel"]), now)
                if not _receipt_applies(nudge, status, receipt.occurred_at):
                    continue
                conn.execute(nudges.update().where(nudges.c.nudge_id == nudge["nudge_id"]).values(**values))
                was_held = held_back(nudge["delivered"], nudge["error"])
                if nudge["status"] == "accepted":  # the sends ``nudge_count`` counts (``_count_sent``)
                    sent_change += int(was_held) - int(held_back(values["delivered"], values["error"]))
                newly = failure in HELD_BACK_FAILURES and not was_held
                if newly and failure in RATE_LIMITED_FAILURES and nudge["channel"] in _CHANNEL_NAMES:
                    # The sender (or, for a pair rate limit, this customer on it) is slowed down before the order
                    # plans its next message on it.
                    self._note_rate_limited(conn, order, key.merchant_id, Channel(nudge["channel"]), failure, now)
                newly_held |= newly
            if sent_change:
                # A message WhatsApp held back never reached the customer: the order's count of messages sent
                # (the console's "nudges") leaves it out, and takes it back if a later receipt says it was delivered.
                _count_sent(conn, key.merchant_id, key.order_id, sent_change, now)
            if newly_held and order is not None:
                self._decision_point(
                    conn, order, now, f"WhatsApp held back a message ({failure}): it never reached the customer"
                )
        return bool(keys)

    def _note_rate_limited(
        self,
        conn: sa.Connection,
        order: RowMapping | None,
        merchant_id: str,
        channel: Channel,
        failure: ReceiptFailure | None,
        now: datetime,
    ) -> None:
        """Hold back what a rate-limited receipt says sent too much (service/executor/pacing.py): for Meta's pair
        rate limit (131056), the order's customer on ``channel`` only (the merchant's other customers are not
        slowed: Meta says they can be messaged without waiting); for the sender's throughput (130429, Gupshup's
        4001), the merchant's whole sender on it."""
        if failure != "pair_rate_limited":
            self.retry_policy.note_rate_limited(conn, merchant_id, channel, now)
            return
        address = None if order is None else order_customer_address(order["request_json"], channel)
        if address is not None:  # no address, no message to hold back
            self.retry_policy.note_pair_rate_limited(conn, merchant_id, channel, address_hash(channel, address), now)

    @staticmethod
    def _lock_provider_id(conn: sa.Connection, merchant_id: str, provider_message_id: str) -> None:
        """Hold, until the transaction ends, the lock that a receipt kept for the provider id and the recording of
        the send with that id take (PostgreSQL; SQLite's write transactions run one at a time)."""
        if conn.dialect.name != "postgresql":
            return
        digest = hashlib.blake2b(f"{merchant_id}\x00{provider_message_id}".encode(), digest_size=8).digest()
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(int.from_bytes(digest, "big", signed=True))))

    def _keep_early_receipt(
        self, conn: sa.Connection, merchant_id: str, provider_message_id: str, receipt: _Receipt, now: datetime
    ) -> None:
        """Keep a receipt that matched no nudge of ``merchant_id``'s, for when its send is recorded
        (``_apply_early_receipts``); the same receipt twice is kept once. Past ``early_receipts_per_merchant`` the
        merchant's oldest kept ones go (logged): the callback URL is the merchant's, but what the provider posts
        to it for ids winback never sent (another sender on the account, or a token that leaked) must not grow
        the table without bound."""
        conn.execute(
            upsert_into(conn, early_receipts)
            .values(
                merchant_id=merchant_id,
                provider_message_id=provider_message_id,
                status=receipt.status,
                occurred_at=receipt.occurred_at or now,
                failure=receipt.failure,
                error=receipt.error[:2000] if receipt.error else None,
                received_at=now,
            )
            .on_conflict_do_nothing()
        )
        log.info(
            "delivery receipt for unknown message %s kept until its send is recorded (or it expires)",
            provider_message_id[:256],
            extra={"merchant_id": merchant_id},
        )
        mine = early_receipts.c.merchant_id == merchant_id
        cutoff = conn.scalar(
            sa.select(early_receipts.c.received_at)
            .where(mine)
            .order_by(early_receipts.c.received_at.desc())
            .offset(self.early_receipts_per_merchant)
            .limit(1)
        )
        if cutoff is not None:
            dropped = conn.execute(early_receipts.delete().where(mine, early_receipts.c.received_at <= cutoff)).rowcount
            log.warning(
                "%d kept delivery receipts of merchant %s dropped, the oldest: more than %d matched no message",
                dropped,
                merchant_id[:128],
                self.early_receipts_per_merchant,
                extra={"merchant_id": merchant_id},
            )

    def _apply_early_receipts(
        self, conn: sa.Connection, merchant_id: str, provider_message_id: str | None, now: datetime
    ) -> None:
        """Apply the receipts kept for a send whose provider id is being recorded (``_keep_early_receipt``), in the
        provider's time order, as if each had come after it, and delete them; in the transaction that records it."""
        if provider_message_id is None:
            return
        self._lock_provider_id(conn, merchant_id, provider_message_id)
        kept_for = (
            early_receipts.c.merchant_id == merchant_id,
            early_receipts.c.provider_message_id == provider_message_id,
        )
        kept = (
            conn.execute(
                sa.select(early_receipts)
                .where(*kept_for)
                .order_by(early_receipts.c.occurred_at, early_receipts.c.received_at)
            )
            .mappings()
            .all()
        )
        for row in kept:
            receipt = _Receipt(row["status"], as_utc(row["occurred_at"]), row["error"], row["failure"])
            self._apply_receipt(conn, provider_message_id, merchant_id, receipt, now, opt_out=True)
        if kept:
            conn.execute(early_receipts.delete().where(*kept_for))

    def expire_early_receipts(self) -> int:
        """Delete the receipts kept longer than ``EARLY_RECEIPT_TTL`` without their send being recorded (a message
        of another sender, or one whose send is never recorded); how many. Run by the worker
        (``Worker.clean_up_seconds``)."""
        with self.engine.begin() as conn:
            expired = conn.execute(
                early_receipts.delete().where(early_receipts.c.received_at < self.clock() - EARLY_RECEIPT_TTL)
            ).rowcount
        if expired:
            log.info("%d delivery receipts that matched no message in %s were deleted", expired, EARLY_RECEIPT_TTL)
        return int(expired)

    def forget_idle_customers(self) -> int:
        """Delete the customers' pacing rows idle longer than the policy's longest hold (``pacing.
        forget_idle_customers``: every WhatsApp message makes one); how many. Run by the worker
        (``Worker.clean_up_seconds``)."""
        with self.engine.begin() as conn:
            return forget_idle_customers(
                conn, self.clock(), timedelta(seconds=self.retry_policy.rate_limit_max_hold_seconds)
            )


@dataclass(frozen=True)
class _Receipt:
    """What a delivery receipt says (``Executor.record_receipt``), as it is applied or kept."""

    status: ReceiptStatus
    occurred_at: datetime | None
    error: str | None
    failure: ReceiptFailure | None


#: A provider message id longer than a nudge keeps (``nudges.provider_message_id``) never matches one.
PROVIDER_ID_MAX: Final = 256
#: How long a receipt that matched no nudge is kept for its send to be recorded (``Executor.expire_early_receipts``).
#: A send is recorded seconds after its provider took it; a worker that died before recording it leaves the message
#: to be sent again when its lease ends, well within this.
EARLY_RECEIPT_TTL: Final = timedelta(days=3)


def _keep_opt_out(conn: sa.Connection, order: RowMapping, channel: str, now: datetime) -> None:
    """The address on ``channel`` of ``order``'s customer opted out (its provider refused a message as opted out)."""
    if channel not in _CHANNEL_NAMES:
        return
    address = order_customer_address(order["request_json"], Channel(channel))
    if address is not None:
        record_opt_out(conn, order["merchant_id"], Channel(channel), address, "receipt", now)


def _receipt_applies(nudge: RowMapping, status: ReceiptStatus, occurred_at: datetime | None) -> bool:
    """Whether a receipt saying ``status`` at ``occurred_at`` decides ``nudge``'s delivery now: it says more than
    the one that decided it (read over delivered over failed), or the same and not earlier."""
    known = nudge["receipt_status"]
    if known is None:
        return True
    rank, known_rank = RECEIPT_RANK[status], RECEIPT_RANK.get(str(known), 0)
    if rank != known_rank:
        return rank > known_rank
    known_at = as_utc_or_none(nudge["receipt_at"])
    return occurred_at is None or known_at is None or as_utc(occurred_at) >= known_at


def _noted_on_cancelled(
    conn: sa.Connection, action: ActionRow, where: tuple[sa.ColumnElement[bool], ...], **values: Any
) -> bool:
    """Write ``values`` on ``action``'s row if it is cancelled and ``where`` holds; whether it was."""
    noted = conn.execute(
        actions.update()
        .where(actions.c.action_id == action.action_id, actions.c.state == ActionState.CANCELLED.value, *where)
        .values(**values)
    ).rowcount
    return bool(noted == 1)


def by_order_of(action: ActionRow) -> tuple[str, str, int]:
    """Where ``action``'s row comes in the lock order of every transaction that locks several orders or several
    actions: by merchant, order id, then action id."""
    return action.merchant_id, action.order_id, action.action_id


#: How a nudge's ``error`` starts when its provider's receipt said the address cannot get its channel's messages.
UNDELIVERABLE_ERROR_PREFIX: Final = "undeliverable:"

#: What a delivery receipt may say, by how much it says: a read message was delivered, a delivered one stays so.
ReceiptStatus = Literal["failed", "delivered", "read"]
RECEIPT_RANK: Final[Mapping[str, int]] = {"failed": 0, "delivered": 1, "read": 2}

#: Failed receipts saying WhatsApp held the message back (``ReceiptFailure``): it never reached the customer, who
#: did nothing, so it does not count against ``max_nudges`` nor the skip-days cadence (``Executor.request_for``).
HELD_BACK_FAILURES: Final[frozenset[str]] = frozenset({"try_later", "rate_limited", "pair_rate_limited"})
#: Those of them that hold messages back a while (service/executor/pacing.py): the merchant's sender on the channel,
#: or for the pair rate limit the one customer on it.
RATE_LIMITED_FAILURES: Final[frozenset[str]] = frozenset({"rate_limited", "pair_rate_limited"})
#: Those of them about this customer (not the merchant's sender as a whole): ``HELD_BACK_LIMIT`` of them on one
#: channel take it off the order (``_undeliverable_channels``).
CUSTOMER_HELD_BACK_FAILURES: Final[frozenset[str]] = frozenset({"try_later", "pair_rate_limited"})
TRY_LATER_ERROR_PREFIX: Final = "try_later:"
HELD_BACK_LIMIT: Final = 2
#: How long a channel is not used again for an order after WhatsApp held one of its messages back as a try-later
#: (Meta's per-user marketing limit, 131049): Meta asks to wait at least 24 hours before resending (data/README.md).
TRY_LATER_WAIT: Final = timedelta(hours=24)


def _count_sent(conn: sa.Connection, merchant_id: str, order_id: str, change: int, now: datetime) -> None:
    """Change the order's count of messages sent (``orders.nudge_count``, the console queue's "nudges") by
    ``change``: the nudges recorded as taken by their provider (``status`` accepted), less those WhatsApp held back
    (``held_back``). Every path that makes a nudge one of them, or stops it being one, goes through here."""
    conn.execute(
        orders.update()
        .where(orders.c.merchant_id == merchant_id, orders.c.order_id == order_id)
        .values(nudge_count=orders.c.nudge_count + change, updated_at=now)
    )


def held_back(delivered: bool | None, error: str | None) -> bool:
    """Whether a nudge so recorded was held back by WhatsApp (``HELD_BACK_FAILURES``, kept as its error's lead)."""
    return delivered is False and error is not None and error.split(":", 1)[0] in HELD_BACK_FAILURES


def _undeliverable_channels(conn: sa.Connection, order: RowMapping) -> set[Channel]:
    """The channels on which a nudge of the order failed as undeliverable (``Executor.record_receipt``), and those
    on which ``HELD_BACK_LIMIT`` of its nudges were held back for this customer (``CUSTOMER_HELD_BACK_FAILURES``):
    a held-back message does not count, so without it a customer WhatsApp keeps holding back (a Meta experiment, a
    marketing limit that does not lift) would be messaged again and again, uncounted, until the window closed.

    The merchant's sender rate limited as a whole (Meta's 130429 throughput, Gupshup's 4001) says nothing of this
    customer: it holds every message of the merchant's back a growing while (service/executor/pacing.py) and takes
    the channel off no order. Counted here, two of a burst took WhatsApp off each order they hit, and a WhatsApp-only
    merchant's orders got no reminder at all while its number was throttled for a couple of minutes."""
    rows = conn.execute(
        sa.select(nudges.c.channel, nudges.c.error).where(
            nudges.c.merchant_id == order["merchant_id"],
            nudges.c.order_id == order["order_id"],
            nudges.c.delivered.is_(False),
            nudges.c.error.is_not(None),
        )
    )
    off: set[str] = set()
    held: dict[str, int] = {}
    for row in rows:
        if row.error.startswith(UNDELIVERABLE_ERROR_PREFIX):
            off.add(row.channel)
        elif row.error.split(":", 1)[0] in CUSTOMER_HELD_BACK_FAILURES:
            held[row.channel] = held.get(row.channel, 0) + 1
    off.update(channel for channel, times in held.items() if times >= HELD_BACK_LIMIT)
    return {Channel(channel) for channel in off if channel in _CHANNEL_NAMES}


def _held_channels(conn: sa.Connection, request: DecisionRequest, now: datetime) -> dict[Channel, datetime]:
    """The channels on which WhatsApp held a message of the order back as a try-later (``record_receipt``) less
    than ``TRY_LATER_WAIT`` ago, with the end of each one's wait (from the receipt, else the send)."""
    rows = conn.execute(
        sa.select(nudges.c.channel, nudges.c.sent_at, nudges.c.receipt_at).where(
            nudges.c.merchant_id == request.merchant_id,
            nudges.c.order_id == request.order_id,
            nudges.c.delivered.is_(False),
            nudges.c.error.startswith(TRY_LATER_ERROR_PREFIX, autoescape=True),
        )
    )
    held: dict[Channel, datetime] = {}
    for row in rows:
        until = max(as_utc(row.sent_at), as_utc_or_none(row.receipt_at) or as_utc(row.sent_at)) + TRY_LATER_WAIT
        if until > now and row.channel in _CHANNEL_NAMES:
            channel = Channel(row.channel)
            held[channel] = max(until, held.get(channel, until))
    return held


_CHANNEL_NAMES: Final = frozenset(channel.value for channel in Channel)


def _cancel_withdrawn(conn: sa.Connection, action_ids: list[Any], why: str, now: datetime) -> None:
    """Cancel the actions of an approval being withdrawn, their claims cleared, saying why."""
    conn.execute(
        actions.update()
        .where(actions.c.action_id.in_(action_ids))
        .values(
            state=ActionState.CANCELLED.value,
            claim_token=None,
            last_error=f"approval withdrawn: {why}",
            updated_at=now,
        )
    )
