"""The executor's durable state (SQLAlchemy 2.0 Core; SQLite or PostgreSQL): orders, their attempts and nudges,
the schedule of due actions, webhook deliveries, payment links, event idempotency keys, the agent queue and
customers' opt-outs.

Every table lives in the API's ``metadata`` so one Alembic history (``service/migrations``) covers the process.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from service.api.store import SqliteFileWatch, make_engine, metadata, server_connect_args
from service.personal_data import mask_addresses_in

#: Integer primary keys: BIGINT on PostgreSQL, INTEGER (the rowid alias) on SQLite.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class MaskedText(sa.types.TypeDecorator[str]):
    """Text stored with every e-mail address and phone number in it masked (``mask_addresses_in``: the first and
    last characters kept). Connectors echo the customer's in their decline texts ("card holder jane.doe@... declined",
    "OTP sent to +91 98765 43210 failed"), and those are shown (the order view, the console) and exported to the
    history files the model trains on. Masked by the column, every write is: the executor's, a failure event's
    history, a link payment's, an operator's, and any added later. Decline codes, amounts, dates, UUIDs and
    winback's ids are kept as they are (``service.personal_data``). A SQL TEXT column (no migration of the schema);
    rows written before are masked by migration 0017. A merchant webhook's error (``webhook_deliveries.last_error``,
    what its endpoint or the transport answered) is masked the same way: it is its webhook action's error too."""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: sa.Dialect) -> str | None:
        """The value as stored: masked (also a value compared with the column, which is masked the same way)."""
        return None if value is None else mask_addresses_in(value)


class OrderState(StrEnum):
    """Order states of CONTRACT.md section 5."""

    PENDING = "PENDING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    AWAITING_AGENT = "AWAITING_AGENT"


OPEN_ORDER_STATES = (OrderState.PENDING.value, OrderState.AWAITING_AGENT.value)


class ActionKind(StrEnum):
    """What a due action does when a worker claims it."""

    RETRY = "retry"  # a silent re-attempt through a connector
    NUDGE = "nudge"  # a payment link through a channel
    FOLLOW_UP = "follow_up"  # the decision point after an unanswered nudge
    LINK_PAYMENT = "link_payment"  # the customer paying on the link page (claimed by the API at once)
    WEBHOOK = "webhook"  # the merchant's order webhook at the terminal state
    CLOSE = "close"  # the order's window ended (or a stop waits for live links): fail it if still open
    CHARGE_STATUS = "charge_status"  # ask the switch what became of a charge sent and never answered
    REFUND = "refund"  # give back a charge that succeeded on an order already settled (a duplicate)


class ActionState(StrEnum):
    SCHEDULED = "scheduled"
    CLAIMED = "claimed"
    DONE = "done"
    CANCELLED = "cancelled"
    DEAD = "dead"


OPEN_ACTION_STATES = (ActionState.SCHEDULED.value, ActionState.CLAIMED.value)

orders = sa.Table(
    "orders",
    metadata,
    sa.Column("merchant_id", sa.String(128), primary_key=True),
    sa.Column("order_id", sa.String(256), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("mode", sa.String(16), nullable=False),
    sa.Column("amount", sa.Float, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("customer_id", sa.String(256), nullable=False),
    sa.Column("request_json", sa.Text, nullable=False),  # the failure event's decision request
    sa.Column("failure_json", sa.Text, nullable=False),  # the last failed attempt, as a contract ``failure``
    sa.Column("attempt_count", sa.Integer, nullable=False),
    # The messages its provider took, less those WhatsApp then held back (they never reached the customer).
    sa.Column("nudge_count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("first_failed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("success_txn_id", sa.String(64), nullable=True),
    sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

transactions = sa.Table(
    "transactions",
    metadata,
    # Keyed per merchant (migration 0010): a txn_id is the merchant's own, and never occupies another merchant's.
    sa.Column("txn_id", sa.String(64), nullable=False),
    sa.Column("merchant_id", sa.String(128), nullable=False),
    sa.Column("order_id", sa.String(256), nullable=False),
    sa.Column("attempt_number", sa.Integer, nullable=False),
    sa.Column("processor_payment_id", sa.String(300), nullable=False),
    sa.Column("strategy", sa.String(32), nullable=False),
    sa.Column("connector", sa.String(128), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # success | failure
    # A connector's codes as it sent them, whatever their length (migration 0008).
    sa.Column("error_code", sa.Text, nullable=True),
    sa.Column("error_message", MaskedText, nullable=True),
    sa.Column("network_decline_code", sa.Text, nullable=True),
    sa.Column("merchant_advice_code", sa.Text, nullable=True),
    sa.Column("unified_code", sa.Text, nullable=True),
    sa.Column("decision_id", sa.String(64), nullable=True),
    sa.Column("propensity", sa.Float, nullable=True),
    sa.Column("nudge_id", sa.String(64), nullable=True),
    sa.Column("idempotency_key", sa.String(400), nullable=True, unique=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("merchant_id", "order_id", "attempt_number", name="uq_transactions_attempt"),
    sa.PrimaryKeyConstraint("merchant_id", "txn_id", name="pk_transactions_merchant_id_txn_id"),
)

nudges = sa.Table(
    "nudges",
    metadata,
    sa.Column("nudge_id", sa.String(64), primary_key=True),
    sa.Column("merchant_id", sa.String(128), nullable=False),
    sa.Column("order_id", sa.String(256), nullable=False),
    sa.Column("channel", sa.String(16), nullable=False),
    sa.Column("template_id", sa.String(128), nullable=False),
    sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # accepted | rejected
    sa.Column("delivered", sa.Boolean, nullable=True),
    sa.Column("clicked_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("provider_message_id", sa.String(256), nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("decision_id", sa.String(64), nullable=True),
    sa.Column("propensity", sa.Float, nullable=True),
    sa.Column("idempotency_key", sa.String(400), nullable=True, unique=True),
    # The provider receipt that decided ``delivered`` (delivered | read | failed) and its time stamp (migration
    # 0014): a delivered or read one is never undone by a failed one, whenever that arrives.
    sa.Column("receipt_status", sa.String(16), nullable=True),
    sa.Column("receipt_at", sa.DateTime(timezone=True), nullable=True),
    sa.Index("ix_nudges_order", "merchant_id", "order_id"),
    sa.Index("ix_nudges_provider_message", "provider_message_id"),
)

actions = sa.Table(
    "actions",
    metadata,
    sa.Column("action_id", BigId, primary_key=True, autoincrement=True),
    sa.Column("merchant_id", sa.String(128), nullable=False),
    sa.Column("order_id", sa.String(256), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    # When someone should next look at it: the planned time while scheduled, the lease's end while claimed.
    sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("planned_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("claim_token", sa.String(64), nullable=True),
    sa.Column("claimed_by", sa.String(128), nullable=True),
    sa.Column("idempotency_key", sa.String(400), nullable=False, unique=True),
    sa.Column("decision_id", sa.String(64), nullable=True),
    sa.Column("payload_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("last_error", MaskedText, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    # A charge sent to its connector and not answered yet (set just before each first send, cleared by the
    # answer): whether it took the money is unknown until then. Migration 0005.
    sa.Column("unanswered_since", sa.DateTime(timezone=True), nullable=True),
    sa.Index("ix_actions_due", "state", "due_at"),
    sa.Index("ix_actions_order", "merchant_id", "order_id"),
    # The status checks the charge disputes are read from (core.charge_disputes), without reading every action.
    # Migration 0020.
    sa.Index("ix_actions_kind", "kind", "merchant_id"),
)

webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    sa.Column("merchant_id", sa.String(128), primary_key=True),
    sa.Column("order_id", sa.String(256), primary_key=True),
    sa.Column("event", sa.String(32), nullable=False),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("body", sa.Text, nullable=False),  # the exact bytes sent every time (only the signature's t moves)
    sa.Column("status", sa.String(16), nullable=False),  # pending | delivered | dead
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_status_code", sa.Integer, nullable=True),
    # The merchant endpoint's answer or the transport's error, masked as an action's is (both show the same text).
    sa.Column("last_error", MaskedText, nullable=True),
    sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

payment_links = sa.Table(
    "payment_links",
    metadata,
    sa.Column("token_id", sa.String(64), primary_key=True),
    sa.Column("merchant_id", sa.String(128), nullable=False),
    sa.Column("order_id", sa.String(256), nullable=False),
    sa.Column("nudge_id", sa.String(64), nullable=True),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("opened_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("txn_id", sa.String(64), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_payment_links_order", "merchant_id", "order_id"),
)

event_keys = sa.Table(
    "event_keys",
    metadata,
    sa.Column("merchant_id", sa.String(128), primary_key=True),
    sa.Column("idempotency_key", sa.String(256), primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("body_sha256", sa.String(64), nullable=False),
    sa.Column("response_json", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

agent_queue = sa.Table(
    "agent_queue",
    metadata,
    sa.Column("item_id", BigId, primary_key=True, autoincrement=True),
    sa.Column("merchant_id", sa.String(128), nullable=False),
    sa.Column("order_id", sa.String(256), nullable=False),
    sa.Column("decision_id", sa.String(64), nullable=False, unique=True),
    sa.Column("decision_json", sa.Text, nullable=False),
    sa.Column("request_json", sa.Text, nullable=False),
    # pending | approved | rejected | superseded | agreed (decided again while an approval of the same plan
    # waited to be carried out: the approval stands, nothing for an agent to review)
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("agent", sa.String(128), nullable=True),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("acted_at", sa.DateTime(timezone=True), nullable=True),
    # An approval taken back before it was carried out: when, by which decision (its decision_id), and why.
    sa.Column("withdrawn_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("withdrawn_by", sa.String(64), nullable=True),
    sa.Column("withdrawn_reason", sa.Text, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_agent_queue_state", "state", "created_at"),
    sa.Index("ix_agent_queue_order", "merchant_id", "order_id"),
    # The approvals withdrawn, which the console's queue looks up per merchant (migration 0013): a few rows only.
    sa.Index(
        "ix_agent_queue_withdrawn",
        "merchant_id",
        "order_id",
        "withdrawn_at",
        postgresql_where=sa.text("withdrawn_at IS NOT NULL"),
        sqlite_where=sa.text("withdrawn_at IS NOT NULL"),
    ),
)


opt_outs = sa.Table(
    "opt_outs",
    metadata,
    sa.Column("merchant_id", sa.String(128), primary_key=True),
    # SHA-256 of the normalised phone number or address (service.executor.optouts), never the address itself.
    sa.Column("address_sha256", sa.String(64), primary_key=True),
    sa.Column("channel", sa.String(16), primary_key=True),
    sa.Column("source", sa.String(64), nullable=False),  # the provider whose callback reported it, or "executor"
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)


channel_outages = sa.Table(
    "channel_outages",
    metadata,
    sa.Column("merchant_id", sa.String(128), primary_key=True),
    sa.Column("channel", sa.String(16), primary_key=True),
    # The first certain refusal (HTTP 429/503, no connection, ...) since the channel's provider last took a message.
    sa.Column("refused_since", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_refused_at", sa.DateTime(timezone=True), nullable=False),
    # While in the future, the channel is down: no message is tried on it and decisions leave it out.
    sa.Column("down_until", sa.DateTime(timezone=True), nullable=True),
    # How many times it was found down since ``refused_since``: each time the wait doubles.
    sa.Column("times_down", sa.Integer, nullable=False, server_default="0"),
    # After a hold, the message that probes the channel holds it until then; the others wait for its answer.
    sa.Column("probe_until", sa.DateTime(timezone=True), nullable=True),
)


channel_pacing = sa.Table(
    "channel_pacing",
    metadata,
    sa.Column("merchant_id", sa.String(128), primary_key=True),
    sa.Column("channel", sa.String(16), primary_key=True),
    # Until then the merchant's messages on the channel are held back (a receipt said its sender was rate limited).
    sa.Column("held_until", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_limited_at", sa.DateTime(timezone=True), nullable=False),
    # Rate-limited receipts in a row (each one doubles the hold); a quiet spell starts the count over.
    sa.Column("times_limited", sa.Integer, nullable=False, server_default="0"),
    # The next free turn of the messages released after a hold, one at a time (migration 0016); None: no release.
    sa.Column("next_turn_at", sa.DateTime(timezone=True), nullable=True),
)


sender_holds = sa.Table(
    # How many times a provider's rate limit held a merchant's sender on a channel (``held_for``: ``rate``,
    # ``daily_quota``) or one customer of it (``pair``: Meta's 131056), ever, for /metrics (migration 0022): the
    # pacing rows forget theirs (``times_limited`` starts over after a quiet spell, a customer's row is deleted when
    # idle). One row per merchant, channel and kind of limit, so it stays small. Also the recipient domains refused
    # at RCPT TO with a ban of the sender in a channel's current refusal streak (``rcpt:`` and a hash of the domain,
    # service/executor/outages.py), a few rows deleted when the streak ends.
    "sender_holds",
    metadata,
    sa.Column("merchant_id", sa.String(128), primary_key=True),
    sa.Column("channel", sa.String(16), primary_key=True),
    sa.Column("held_for", sa.String(16), primary_key=True),
    sa.Column("holds", sa.Integer, nullable=False, server_default="0"),
    # The end of the last hold of this kind (the sender's hold for ``rate`` and ``daily_quota``: held while later).
    sa.Column("held_until", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_held_at", sa.DateTime(timezone=True), nullable=False),
)


cases_by_hand = sa.Table(
    # The money cases the executor hands to a person (migration 0023), one row each, written in the transaction that
    # flags it on its action: a refund of a duplicate charge to make by hand (``kind`` ``refund``, ``why`` from
    # REFUND_BY_HAND_REASONS) and a possible double payment (``paid_twice``, ``ref`` the merchant's own txn id, one
    # row per txn id). The flag stays on the action's payload too; this table is what /metrics counts (a few rows,
    # not a scan of every action's payload) and where a person marks a case dealt with: who, when, what was done.
    "cases_by_hand",
    metadata,
    sa.Column("case_id", BigId, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("merchant_id", sa.String(128), nullable=False),
    sa.Column("order_id", sa.String(256), nullable=False),
    sa.Column("action_id", BigId, nullable=False),
    sa.Column("ref", sa.String(256), nullable=False, server_default=""),
    sa.Column("why", sa.String(16), nullable=True),
    sa.Column("flagged_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("done_by", sa.String(256), nullable=True),
    sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("done_note", MaskedText, nullable=True),
    sa.UniqueConstraint("kind", "action_id", "ref", name="uq_cases_by_hand_case"),
    sa.Index("ix_cases_by_hand_order", "merchant_id", "order_id"),
)


customer_pacing = sa.Table(
    # One customer of a merchant held back on a channel after WhatsApp's pair rate limit (Meta's 131056: too many
    # messages from the business number to this phone number), migration 0016; the merchant's other customers are not.
    "customer_pacing",
    metadata,
    sa.Column("merchant_id", sa.String(128), primary_key=True),
    sa.Column("channel", sa.String(16), primary_key=True),
    # SHA-256 of the normalised address (service.executor.optouts.address_hash), never the address itself.
    sa.Column("address_sha256", sa.String(64), primary_key=True),
    sa.Column("held_until", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_limited_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("times_limited", sa.Integer, nullable=False, server_default="0"),
    # The next free turn of the customer's messages, one every 6 s (Meta's pair rate): the worker's clean-up of the
    # idle rows reads it by its index (migration 0018).
    sa.Column("next_turn_at", sa.DateTime(timezone=True), nullable=True),
    # When the customer's last message reached its provider at the latest (migration 0018): the moment its call
    # was answered, or, while the call is out, the end of the claim it is sent under (``pacing.pair_turn``,
    # ``pair_answered``). The next goes 6 s after it at the soonest, whatever turn it was planned at.
    sa.Column("last_sent_at", sa.DateTime(timezone=True), nullable=True),
    sa.Index("ix_customer_pacing_next_turn", "next_turn_at"),
)


early_receipts = sa.Table(
    # A provider's delivery receipt that matched no nudge when it came (migration 0015): it arrived before its send
    # was recorded (the provider answered, ``Executor.complete`` had not committed, or the worker died before it
    # did). Applied when the nudge's provider id is recorded, then deleted; deleted unmatched after
    # ``EARLY_RECEIPT_TTL``. One row per receipt: the same receipt twice is kept once.
    "early_receipts",
    metadata,
    sa.Column("merchant_id", sa.String(128), primary_key=True),
    sa.Column("provider_message_id", sa.String(256), primary_key=True),
    sa.Column("status", sa.String(16), primary_key=True),  # failed | delivered | read
    sa.Column("occurred_at", sa.DateTime(timezone=True), primary_key=True),  # the provider's time stamp
    sa.Column("failure", sa.String(32), nullable=True),  # ReceiptFailure
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_early_receipts_received", "merchant_id", "received_at"),
)


def utcnow() -> datetime:
    """The wall clock, in UTC."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """A stored timestamp as an aware UTC datetime (SQLite hands back naive ones; everything stored is UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def as_utc_or_none(value: datetime | None) -> datetime | None:
    """``as_utc`` that lets None through."""
    return None if value is None else as_utc(value)


def make_executor_engine(url: str, pool_size: int = 5) -> Engine:
    """An engine for the executor's short write transactions.

    SQLite: every transaction starts with ``BEGIN IMMEDIATE`` (the write lock is taken up front, so two
    writers queue on the busy timeout instead of one failing when it upgrades a read snapshot). PostgreSQL:
    READ COMMITTED with row locks; claiming uses ``FOR UPDATE SKIP LOCKED``.
    """
    if not url.startswith("sqlite"):
        # A server that accepts and never answers, or a link that dies under an open connection, fails a batch
        # within seconds (the worker backs off, and a stop is honoured), not after psycopg's 130 s connect.
        return sa.create_engine(
            url,
            pool_pre_ping=True,
            pool_size=pool_size,
            max_overflow=pool_size,
            connect_args=server_connect_args(url),
        )
    engine = make_engine(url)
    # SQLite goes on writing into a file deleted or replaced under it, where every row is lost: every transaction
    # (and every new connection, before it would create an empty file in its place) checks the file first and
    # raises DatabaseFileGoneError once it is not the one this process started with.
    watch = SqliteFileWatch(engine.url)

    @sa.event.listens_for(engine, "do_connect")
    def _file_still_there(*_args: Any) -> None:
        watch.ensure_present()

    @sa.event.listens_for(engine, "connect")
    def _autocommit_driver(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (pysqlite's own implicit BEGIN is deferred and would race).
        dbapi_connection.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin_immediate(conn: sa.Connection) -> None:
        watch.ensure_present()
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def is_postgres(engine: Engine) -> bool:
    """Whether ``engine`` talks to PostgreSQL (which claims with SKIP LOCKED)."""
    return engine.dialect.name == "postgresql"


def upsert_into(conn: sa.Connection, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT into ``table`` in ``conn``'s dialect, which has ``on_conflict_do_nothing``/``_do_update``."""
    return postgresql.insert(table) if conn.dialect.name == "postgresql" else sqlite.insert(table)


def count_sender_hold(
    conn: sa.Connection, merchant_id: str, channel: str, held_for: str, until: datetime, now: datetime
) -> None:
    """Count a hold of ``merchant_id``'s sender on ``channel`` started at ``now`` until ``until`` in ``sender_holds``
    (read by /metrics), in the transaction that starts it: a hold rolled back is not counted. ``held_for``: a
    provider's limit (service/executor/pacing.py ``HELD_FOR``), ``ban`` or a recipient domain's ban answered at RCPT
    TO (service/executor/outages.py)."""
    insert = upsert_into(conn, sender_holds).values(
        merchant_id=merchant_id, channel=channel, held_for=held_for, holds=1, held_until=until, last_held_at=now
    )
    conn.execute(
        insert.on_conflict_do_update(
            index_elements=[sender_holds.c.merchant_id, sender_holds.c.channel, sender_holds.c.held_for],
            set_={"holds": sender_holds.c.holds + 1, "held_until": until, "last_held_at": now},
        )
    )
