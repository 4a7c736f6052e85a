"""The console's read side: the queue of open orders, one order's timeline, and numbers in a person's terms.

Every query here is scoped by ``merchant_id``: the signed-in agent's merchant is the only one an agent sees.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from model.catalog import ErrorCatalog
from model.merchant_config import MerchantConfig
from model.requests import Alternative, Decision
from model.vocab import Action
from service.api.store import decisions
from service.console.store import audit_log
from service.executor.core import (
    MAYBE_SENT_NOTE,
    UNKNOWN_CHARGE,
    ChargeDispute,
    PaidTwice,
    RefundByHand,
    SilentNotCharged,
    charge_disputes,
    held_back,
    paid_twice,
    refunds_by_hand,
    silent_not_charged,
)
from service.executor.schemas import OrderOut
from service.executor.store import (
    OPEN_ORDER_STATES,
    OrderState,
    actions,
    agent_queue,
    as_utc,
    orders,
    transactions,
)
from service.executor.views import order_view

_CHANNEL_NAMES = {"whatsapp": "WhatsApp", "sms": "SMS", "email": "email", "push": "push"}

SortKey = Literal["age", "amount", "p_success"]
SORT_KEYS: tuple[str, ...] = ("age", "amount", "p_success")
STATE_FILTERS: tuple[str, ...] = (OrderState.AWAITING_AGENT.value, OrderState.PENDING.value)
ACTION_FILTERS: tuple[str, ...] = tuple(action.value for action in Action)


def merchant_zone(merchant: MerchantConfig) -> ZoneInfo:
    """The merchant's timezone (the one its quiet hours are written in)."""
    return ZoneInfo(merchant.retarget.quiet_hours.timezone)


def local_time(moment: datetime | None, zone: ZoneInfo, with_date: bool = True) -> str:
    """``2026-11-02 17:30 IST`` in the merchant's timezone ('' for None)."""
    if moment is None:
        return ""
    local = as_utc(moment).astimezone(zone)
    return local.strftime("%Y-%m-%d %H:%M %Z" if with_date else "%H:%M %Z")


def age(since: datetime, now: datetime) -> str:
    """``2d 4h``, ``3h 12m`` or ``7m``: how long ago ``since`` was."""
    seconds = max(int((now - as_utc(since)).total_seconds()), 0)
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes = rest // 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m"


def channel_name(channel: str) -> str:
    """A channel as people write it: ``WhatsApp``, ``SMS``, ``email``, ``push``."""
    return _CHANNEL_NAMES.get(channel, channel)


def describe(action: str, strategy: str | None, connector: str | None, channel: str | None) -> str:
    """A decision or alternative in words: ``Retry: cascade via adyen``, ``Payment link by WhatsApp``, ``Stop``."""
    if action == Action.RETRY:
        return f"Retry: {(strategy or 'retry').replace('_', ' ')} via {connector}"
    if action == Action.RETARGET:
        return f"Payment link by {_CHANNEL_NAMES.get(channel or '', channel or '?')}"
    return "Stop"


def describe_decision(decision: Decision | Alternative) -> str:
    """``describe`` of a decision or one of its alternatives."""
    return describe(
        decision.action.value,
        decision.strategy.value if decision.strategy else None,
        decision.connector,
        decision.channel.value if decision.channel else None,
    )


def error_class_of(catalog: ErrorCatalog, failure: Mapping[str, Any], payment: Mapping[str, Any]) -> str:
    """The standard error class of a failure (contract ``failure`` fields) on a payment."""
    return catalog.normalise(
        str(failure.get("connector") or ""),
        failure.get("error_code"),
        failure.get("error_message"),
        failure.get("network_decline_code"),
        failure.get("merchant_advice_code"),
        failure.get("unified_code"),
        payment.get("card_network"),
        payment.get("payment_method"),
    ).error_class.value


# ------------------------------------------------------------------------------------------------- queue


@dataclass(frozen=True)
class QueueFilter:
    """What the queue shows: state, error class and recommended action filters, and the sort."""

    state: str = ""
    error_class: str = ""
    action: str = ""
    sort: str = "age"
    descending: bool = True

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> QueueFilter:
        """From query parameters; unknown values fall back to 'all' (and the default sort)."""
        state = params.get("state", "")
        action = params.get("action", "")
        sort = params.get("sort", "age")
        return cls(
            state=state if state in STATE_FILTERS else "",
            error_class=params.get("error_class", "").strip()[:64],
            action=action if action in ACTION_FILTERS else "",
            sort=sort if sort in SORT_KEYS else "age",
            descending=params.get("dir", "desc") != "asc",
        )


@dataclass(frozen=True)
class QueueRow:
    """One open order on the queue."""

    order_id: str
    state: str
    amount: float
    currency: str
    first_failed_at: datetime
    attempts: int
    nudges: int
    error_class: str
    decision: Decision | None
    # A charge of the order was sent and never answered: it waits for someone to ask the connector.
    charge_unknown: bool = False
    # A charge of the order was recorded as charged on an operator's word, and its switch then said it was not
    # (declined, or not found twice): the order is settled on money the switch does not have.
    charge_disputed: bool = False
    # An agent's approval was withdrawn (the order was decided again and planned otherwise) and no agent has acted
    # on the order since: the recommendation waiting replaces what an agent chose.
    approval_withdrawn: bool = False

    @property
    def p_success(self) -> float | None:
        """The recommendation's calibrated chance of recovering the order."""
        return None if self.decision is None else self.decision.expected_success

    @property
    def action(self) -> str | None:
        """The recommended action (retry, retarget, stop)."""
        return None if self.decision is None else self.decision.action.value


@dataclass(frozen=True)
class Queue:
    """The rows shown, how many matched, and the error classes present (for the filter's options)."""

    rows: list[QueueRow]
    matched: int
    total_open: int
    error_classes: list[str]
    awaiting: int
    charges_unknown: int = 0
    charges_disputed: int = 0


def _latest_decisions(conn: sa.Connection, merchant_id: str, order_ids: Sequence[str]) -> dict[str, Decision]:
    found: dict[str, tuple[datetime, Decision]] = {}
    for start in range(0, len(order_ids), 500):
        chunk = list(order_ids[start : start + 500])
        query = sa.select(decisions.c.order_id, decisions.c.created_at, decisions.c.answer_json).where(
            decisions.c.merchant_id == merchant_id, decisions.c.order_id.in_(chunk)
        )
        for order_id, created_at, answer in conn.execute(query):
            when = as_utc(created_at)
            if order_id not in found or when >= found[order_id][0]:
                found[order_id] = (when, Decision.model_validate_json(answer))
    return {order_id: decision for order_id, (_, decision) in found.items()}


def _unanswered_charges(merchant_id: str, order_id: str | None = None) -> sa.Select[Any]:
    """The merchant's (or one order's) dead-lettered charges that were sent and never answered."""
    query = sa.select(actions).where(actions.c.merchant_id == merchant_id, UNKNOWN_CHARGE)
    return query if order_id is None else query.where(actions.c.order_id == order_id)


def _pending_decisions(conn: sa.Connection, merchant_id: str) -> dict[str, Decision]:
    query = (
        sa.select(agent_queue.c.order_id, agent_queue.c.decision_json)
        .where(agent_queue.c.merchant_id == merchant_id, agent_queue.c.state == "pending")
        .order_by(agent_queue.c.item_id)
    )
    return {order_id: Decision.model_validate_json(text) for order_id, text in conn.execute(query)}


#: How many orders one look-up of their queue items names (``_approvals_withdrawn_unseen``).
ORDERS_A_STATEMENT = 500


def withdrawn_approvals(merchant_id: str) -> sa.Select[str, datetime]:
    """The merchant's orders with an approval withdrawn, each with its latest withdrawal (read through the partial
    index ``ix_agent_queue_withdrawn``, migration 0013)."""
    return (
        sa.select(agent_queue.c.order_id, sa.func.max(agent_queue.c.withdrawn_at))
        .where(agent_queue.c.merchant_id == merchant_id, agent_queue.c.withdrawn_at.is_not(None))
        .group_by(agent_queue.c.order_id)
    )


def _approvals_withdrawn_unseen(conn: sa.Connection, merchant_id: str) -> set[str]:
    """The merchant's orders whose latest withdrawn approval no agent has acted on since.

    Both look-ups read the withdrawn orders' items only: the withdrawals through the partial index (migration
    0013), then the agents' acts on those orders through ``ix_agent_queue_order`` (merchant, order), a few hundred
    orders a statement. Before, the second read every item the merchant's agents had ever approved or rejected."""
    withdrawn = dict(conn.execute(withdrawn_approvals(merchant_id)).all())
    orders_withdrawn = sorted(withdrawn)
    acted: dict[str, datetime] = {}
    for start in range(0, len(orders_withdrawn), ORDERS_A_STATEMENT):
        acted.update(
            conn.execute(
                sa.select(agent_queue.c.order_id, sa.func.max(agent_queue.c.acted_at))
                .where(
                    agent_queue.c.merchant_id == merchant_id,
                    agent_queue.c.order_id.in_(orders_withdrawn[start : start + ORDERS_A_STATEMENT]),
                    agent_queue.c.state.in_(["approved", "rejected"]),
                )
                .group_by(agent_queue.c.order_id)
            ).all()
        )
    return {
        order_id
        for order_id, at in withdrawn.items()
        if acted.get(order_id) is None or as_utc(acted[order_id]) <= as_utc(at)
    }


def load_queue(
    engine: Engine, catalog: ErrorCatalog, merchant_id: str, chosen: QueueFilter, now: datetime, limit: int = 200
) -> Queue:
    """The merchant's open orders, and settled ones with a charge never answered (the customer may have paid
    twice) or a charge its switch disputes (charged on an operator's word, the switch says not) that nobody has
    marked as dealt with yet: those first,
    then AWAITING_AGENT, then PENDING; filtered and sorted as ``chosen`` says.

    The recommendation is the decision waiting for an agent (assisted mode), else the order's latest decision.
    """
    with engine.connect() as conn:
        unknown = {row.order_id for row in conn.execute(_unanswered_charges(merchant_id))}
        disputed = {dispute.order_id for dispute in charge_disputes(conn, merchant_id, open_only=True)}
        rows = list(
            conn.execute(
                sa.select(
                    orders.c.order_id,
                    orders.c.state,
                    orders.c.amount,
                    orders.c.currency,
                    orders.c.first_failed_at,
                    orders.c.attempt_count,
                    orders.c.nudge_count,
                    orders.c.failure_json,
                    orders.c.request_json,
                ).where(
                    orders.c.merchant_id == merchant_id,
                    sa.or_(orders.c.state.in_(OPEN_ORDER_STATES), orders.c.order_id.in_(sorted(unknown | disputed))),
                )
            ).mappings()
        )
        pending = _pending_decisions(conn, merchant_id)
        withdrawn = _approvals_withdrawn_unseen(conn, merchant_id)
        latest = _latest_decisions(
            conn, merchant_id, [row["order_id"] for row in rows if row["order_id"] not in pending]
        )
    everything: list[QueueRow] = []
    for row in rows:
        payment = orjson.loads(row["request_json"]).get("payment") or {}
        everything.append(
            QueueRow(
                order_id=row["order_id"],
                state=row["state"],
                amount=float(row["amount"]),
                currency=row["currency"],
                first_failed_at=as_utc(row["first_failed_at"]),
                attempts=int(row["attempt_count"]),
                nudges=int(row["nudge_count"]),
                error_class=error_class_of(catalog, orjson.loads(row["failure_json"]), payment),
                decision=pending.get(row["order_id"]) or latest.get(row["order_id"]),
                charge_unknown=row["order_id"] in unknown,
                charge_disputed=row["order_id"] in disputed,
                approval_withdrawn=row["state"] == OrderState.AWAITING_AGENT and row["order_id"] in withdrawn,
            )
        )
    classes = sorted({row.error_class for row in everything})
    shown = [
        row
        for row in everything
        if (not chosen.state or row.state == chosen.state)
        and (not chosen.error_class or row.error_class == chosen.error_class)
        and (not chosen.action or row.action == chosen.action)
    ]

    def value(row: QueueRow) -> float:
        if chosen.sort == "amount":
            return row.amount
        if chosen.sort == "p_success":
            return -1.0 if row.p_success is None else row.p_success
        return (now - row.first_failed_at).total_seconds()

    shown.sort(key=lambda row: row.order_id)
    shown.sort(key=value, reverse=chosen.descending)
    # The work queue comes first whatever the sort: orders whose charge someone must ask the connector about
    # (nothing else happens to them until then), orders an agent must decide on, then the ones winback runs.
    # A charge disputed by its switch comes with them: the merchant shipped on an operator's word.
    shown.sort(
        key=lambda row: (not (row.charge_unknown or row.charge_disputed), row.state != OrderState.AWAITING_AGENT)
    )
    awaiting = sum(1 for row in everything if row.state == OrderState.AWAITING_AGENT)
    return Queue(
        rows=shown[:limit],
        matched=len(shown),
        total_open=sum(1 for row in everything if row.state in OPEN_ORDER_STATES),
        error_classes=classes,
        awaiting=awaiting,
        charges_unknown=sum(1 for row in everything if row.charge_unknown),
        charges_disputed=sum(1 for row in everything if row.charge_disputed),
    )


# ------------------------------------------------------------------------------------------------- order


@dataclass(frozen=True)
class TimelineEvent:
    """One line of an order's timeline."""

    at: datetime
    kind: str  # attempt | decision | nudge | click | agent | audit | dispute | closed
    title: str
    detail: str = ""
    status: str = ""  # good | bad | info | warn
    reasons: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AuditEntry:
    """An agent's action on an order, as the audit log recorded it."""

    at: datetime
    agent_name: str
    action: str
    detail: str
    reason: str | None
    result: str
    rules: list[str]
    message: str | None


@dataclass(frozen=True)
class UnansweredCharge:
    """A charge sent to its connector whose answer never came back: whether it took the money is unknown, and
    the order is neither charged again, nudged nor closed until someone records what the connector says."""

    action_id: int
    kind: str  # retry | link_payment
    connector: str
    payment_id: str  # what the connector knows the charge by: <order_id>_<attempt number>
    sent_at: datetime
    last_error: str | None


@dataclass(frozen=True)
class WithdrawnApproval:
    """An agent's approval that was not carried out: before it ran, the order was decided again and the new
    recommendation planned otherwise (or the approved action itself could not go), so it was withdrawn."""

    agent: str
    approved_at: datetime
    plan: str  # the approved decision in words: "Retry: cascade via adyen"
    planned_for: datetime  # when it was to be carried out
    withdrawn_at: datetime
    reason: str  # what happened, e.g. "decided again: the customer's payment by link was declined (card_declined)"
    #: Its message may have reached the customer: a try timed out at the provider before it was withdrawn.
    maybe_sent: bool = False


@dataclass(frozen=True)
class OrderPage:
    """Everything the order page shows."""

    order: OrderOut
    error_class: str
    customer: dict[str, Any]
    payment: dict[str, Any]
    pending: Decision | None
    latest: Decision | None
    timeline: list[TimelineEvent]
    audit: list[AuditEntry]
    scheduled: list[dict[str, Any]]
    unanswered: list[UnansweredCharge] = field(default_factory=list)
    #: Charges recorded as charged on an operator's word that their switch then said were not (open ones, and
    #: those marked as dealt with, with who, when and what was done).
    disputes: list[ChargeDispute] = field(default_factory=list)
    #: Payments of the merchant's own it reported after winback's charge had paid the order: the customer may have
    #: paid twice (winback refunds neither).
    paid_twice: list[PaidTwice] = field(default_factory=list)
    #: Charges of the order taken as never charged whose switch then answered no status check for a day: a late
    #: send may have charged the customer after all (open, and dealt with).
    silent_not_charged: list[SilentNotCharged] = field(default_factory=list)
    #: Refunds of duplicate charges of the order given to an operator to make by hand (open, and dealt with).
    refunds_by_hand: list[RefundByHand] = field(default_factory=list)
    #: The approval withdrawn since an agent last acted on the order (shown next to the new recommendation).
    withdrawn: WithdrawnApproval | None = None

    @property
    def links_sent(self) -> tuple[int, int]:
        """(payment links sent that count, links sent that WhatsApp held back: a try-later or a rate limit). A
        held-back one never reached the customer and does not count against ``max_nudges``; counted with the
        others, an order whose first message was held back showed three links sent to a merchant set at two."""
        accepted = [nudge for nudge in self.order.nudges if nudge.status == "accepted"]
        held = sum(1 for nudge in accepted if held_back(nudge.delivered, nudge.error))
        return len(accepted) - held, held

    @property
    def reachable(self) -> list[str]:
        """How the customer can be reached: ``phone``, ``email``, ``app``."""
        keys = (("phone_present", "phone"), ("email_present", "email"), ("app_present", "app"))
        return [label for key, label in keys if self.customer.get(key)]

    @property
    def retry_option(self) -> Decision | Alternative | None:
        """The silent retry an agent can schedule: the recommendation if it is one, else the best alternative."""
        if self.pending is None:
            return None
        if self.pending.action == Action.RETRY:
            return self.pending
        return next((alt for alt in self.pending.alternatives if alt.action == Action.RETRY), None)


def load_audit(engine: Engine, merchant_id: str, order_id: str) -> list[AuditEntry]:
    """The audit log of one order, newest first."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(audit_log)
            .where(audit_log.c.merchant_id == merchant_id, audit_log.c.order_id == order_id)
            .order_by(audit_log.c.audit_id.desc())
        ).mappings()
        return [
            AuditEntry(
                at=as_utc(row["created_at"]),
                agent_name=row["agent_name"],
                action=row["action"],
                detail=row["detail"],
                reason=row["reason"],
                result=row["result"],
                rules=[rule for rule in (row["rules"] or "").split(",") if rule],
                message=row["message"],
            )
            for row in rows
        ]


def _decision_event(answer: Mapping[str, Any], at: datetime) -> TimelineEvent:
    decision = Decision.model_validate(answer)
    title = f"Decision: {describe_decision(decision)}"
    detail = (
        f"model {decision.model_version} · p(success) {decision.expected_success:.0%}"
        f" · retry probability {decision.retry_probability:.0%}"
    )
    extra = [f"rules: {', '.join(decision.rules_applied)}"] if decision.rules_applied else []
    alternatives = [f"{describe_decision(alt)} ({alt.p_success:.0%})" for alt in decision.alternatives]
    if alternatives:
        extra.append("alternatives: " + "; ".join(alternatives))
    return TimelineEvent(
        at=at, kind="decision", title=title, detail=detail, status="info", reasons=list(decision.reasons), extra=extra
    )


def load_order(engine: Engine, catalog: ErrorCatalog, merchant_id: str, order_id: str) -> OrderPage | None:
    """The order page of ``order_id`` for ``merchant_id``; None when that merchant has no such order."""
    view = order_view(engine, merchant_id, order_id)
    if view is None:
        return None
    with engine.connect() as conn:
        stored = conn.execute(
            sa.select(orders.c.request_json, orders.c.failure_json).where(
                orders.c.merchant_id == merchant_id, orders.c.order_id == order_id
            )
        ).one()
        decided_at = {
            decision_id: as_utc(created)
            for decision_id, created in conn.execute(
                sa.select(decisions.c.decision_id, decisions.c.created_at).where(
                    decisions.c.merchant_id == merchant_id, decisions.c.order_id == order_id
                )
            )
        }
        pending_json = conn.scalar(
            sa.select(agent_queue.c.decision_json)
            .where(
                agent_queue.c.merchant_id == merchant_id,
                agent_queue.c.order_id == order_id,
                agent_queue.c.state == "pending",
            )
            .order_by(agent_queue.c.item_id.desc())
            .limit(1)
        )
        approvals = _approvals_decided_over(conn, merchant_id, order_id, view)
        unanswered = [
            UnansweredCharge(
                action_id=int(row.action_id),
                kind=str(row.kind),
                connector=str(payload.get("connector") or "unknown"),
                payment_id=f"{order_id}_{payload.get('attempt_number')}",
                sent_at=as_utc(row.unanswered_since),
                last_error=row.last_error,
            )
            for row in conn.execute(_unanswered_charges(merchant_id, order_id).order_by(actions.c.action_id))
            for payload in [orjson.loads(row.payload_json or "{}")]
        ]
        disputes = charge_disputes(conn, merchant_id, order_id)
        twice = paid_twice(conn, merchant_id, order_id)
        by_hand = refunds_by_hand(conn, merchant_id, order_id)
        silent = silent_not_charged(conn, merchant_id, order_id)
        errors = {
            row.txn_id: row
            for row in conn.execute(
                sa.select(transactions).where(
                    transactions.c.merchant_id == merchant_id, transactions.c.order_id == order_id
                )
            )
        }
    request = orjson.loads(stored.request_json)
    payment = request.get("payment") or {}
    events: list[TimelineEvent] = []
    for attempt in view.attempts:
        ok = attempt.status == "success"
        row = errors.get(attempt.txn_id)
        failure = dict(row._mapping) if row is not None else {}
        detail = (
            f"{attempt.strategy.replace('_', ' ')} via {attempt.connector} · payment id {attempt.processor_payment_id}"
        )
        extra = []
        if not ok:
            code = " / ".join(str(v) for v in (attempt.error_code, attempt.network_decline_code) if v)
            extra.append(
                f"{code}: {attempt.error_message or 'no message'}"
                f" ({error_class_of(catalog, failure, payment).replace('_', ' ')})"  # as the facts panel writes it
            )
        events.append(
            TimelineEvent(
                at=attempt.created_at,
                kind="attempt",
                title=f"Attempt {attempt.attempt_number} {'succeeded' if ok else 'failed'}",
                detail=detail,
                status="good" if ok else "bad",
                extra=extra,
            )
        )
    for answer in view.decisions:
        at = decided_at.get(str(answer.get("decision_id")), as_utc(datetime.fromisoformat(str(answer["execute_at"]))))
        events.append(_decision_event(answer, at))
    for nudge in view.nudges:
        sent = nudge.status == "accepted"
        channel = _CHANNEL_NAMES.get(nudge.channel, nudge.channel)
        events.append(
            TimelineEvent(
                at=nudge.sent_at,
                kind="nudge",
                title=f"Payment link {'sent' if sent else 'not sent'} by {channel}",
                detail=f"template {nudge.template_id}"
                + ("" if nudge.delivered is None else f" · delivered: {'yes' if nudge.delivered else 'no'}"),
                status="info" if sent else "warn",
                extra=[nudge.error] if nudge.error else [],
            )
        )
        if nudge.clicked_at is not None:
            events.append(
                TimelineEvent(
                    at=nudge.clicked_at, kind="click", title=f"Customer opened the {channel} link", status="good"
                )
            )
    events.extend(approvals.events)
    events.extend(event for dispute in disputes for event in _dispute_events(dispute))
    audit = load_audit(engine, merchant_id, order_id)
    # Queue items an agent acted on through the console are told by its audit entry already.
    audited = {(entry.agent_name, int(entry.at.timestamp())) for entry in audit}
    for item in view.agent_queue:
        if item.acted_at is None or not item.agent:
            continue
        if (item.agent, int(as_utc(item.acted_at).timestamp())) not in audited:
            events.append(
                TimelineEvent(
                    at=item.acted_at,
                    kind="agent",
                    title=f"Agent {item.agent} {item.state} the queued decision",
                    detail=item.reason or "",
                    status="info",
                )
            )
    for entry in audit:
        status = {"done": "good", "refused": "warn", "failed": "bad"}.get(entry.result, "info")
        extra = [f"refused by rule: {', '.join(entry.rules)}"] if entry.rules else []
        events.append(
            TimelineEvent(
                at=entry.at,
                kind="audit",
                title=f"{entry.agent_name}: {entry.detail} ({entry.result})",
                detail=entry.reason or "",
                status=status,
                extra=extra + ([entry.message] if entry.message else []),
            )
        )
    if view.closed_at is not None:
        won = view.state == OrderState.SUCCEEDED
        events.append(
            TimelineEvent(
                at=view.closed_at,
                kind="closed",
                title="Order recovered" if won else "Order closed unrecovered",
                status="good" if won else "bad",
            )
        )
    order_rank = {
        "attempt": 0,
        "decision": 1,
        "agent": 2,
        "audit": 3,
        "dispute": 4,
        "nudge": 5,
        "click": 6,
        "closed": 7,
    }
    events.sort(key=lambda e: (e.at, order_rank.get(e.kind, 9)), reverse=True)
    scheduled = [
        {"kind": action.kind, "planned_at": action.planned_at, "state": action.state}
        for action in view.actions
        if action.state in {"scheduled", "claimed"}
    ]
    latest = Decision.model_validate(view.decisions[-1]) if view.decisions else None
    return OrderPage(
        order=view,
        error_class=error_class_of(catalog, orjson.loads(stored.failure_json), payment),
        customer=request.get("customer") or {},
        payment=payment,
        pending=Decision.model_validate_json(pending_json) if pending_json else None,
        latest=latest,
        timeline=events,
        audit=audit,
        scheduled=scheduled,
        unanswered=unanswered,
        disputes=disputes,
        paid_twice=twice,
        silent_not_charged=silent,
        refunds_by_hand=by_hand,
        withdrawn=approvals.unseen if view.state == OrderState.AWAITING_AGENT else None,
    )


def _dispute_events(dispute: ChargeDispute) -> list[TimelineEvent]:
    """The timeline's lines for a charge dispute: when the switch contradicted the operator, and who marked it as
    dealt with, when, and what they did (the order's history keeps both)."""
    flagged = TimelineEvent(
        at=dispute.flagged_at,
        kind="dispute",
        title=f"Charge disputed: {dispute.connector} says payment {dispute.payment_id} {dispute.switch_said}",
        detail=f"{dispute.who_said}, before the switch said not",
        status="bad",
    )
    if dispute.resolved_at is None:
        return [flagged]
    dealt = TimelineEvent(
        at=dispute.resolved_at,
        kind="dispute",
        title=f"Charge dispute of payment {dispute.payment_id} dealt with by {dispute.resolved_by}",
        detail=dispute.resolution_note or "",
        status="info",
    )
    return [flagged, dealt]


@dataclass(frozen=True)
class _ApprovalFates:
    """What became of an order's approvals when it was decided again before they were carried out."""

    events: list[TimelineEvent]
    unseen: WithdrawnApproval | None  # the latest withdrawn one, when no agent has acted on the order since


def _approvals_decided_over(conn: sa.Connection, merchant_id: str, order_id: str, view: OrderOut) -> _ApprovalFates:
    """The timeline's lines for approvals withdrawn, and for decisions that left an approval standing; and the
    withdrawn approval the agent has not acted on since (an approval vanishing without a word is what agents
    complained of: the retry they approved for payday was cancelled when it fell due)."""
    rows = (
        conn.execute(
            sa.select(agent_queue)
            .where(agent_queue.c.merchant_id == merchant_id, agent_queue.c.order_id == order_id)
            .order_by(agent_queue.c.item_id)
        )
        .mappings()
        .all()
    )
    planned_at = {action.decision_id: action.planned_at for action in view.actions if action.decision_id}
    maybe_sent = {nudge.decision_id for nudge in view.nudges if MAYBE_SENT_NOTE in (nudge.error or "")}
    events: list[TimelineEvent] = []
    withdrawn: list[WithdrawnApproval] = []
    for row in rows:
        plan = describe_decision(Decision.model_validate_json(row["decision_json"]))
        if row["state"] == "agreed" and row["acted_at"] is not None:
            events.append(
                TimelineEvent(
                    at=as_utc(row["acted_at"]),
                    kind="agent",
                    title=f"Decided again: {plan}, as approved; the approval stands",
                    detail=row["reason"] or "",
                    status="info",
                )
            )
        if row["withdrawn_at"] is None:
            continue
        approval = WithdrawnApproval(
            agent=row["agent"] or "an agent",
            approved_at=as_utc(row["acted_at"] or row["created_at"]),
            plan=plan,
            planned_for=planned_at.get(
                row["decision_id"], as_utc(Decision.model_validate_json(row["decision_json"]).execute_at)
            ),
            withdrawn_at=as_utc(row["withdrawn_at"]),
            reason=row["withdrawn_reason"] or "decided again",
            maybe_sent=row["decision_id"] in maybe_sent,
        )
        withdrawn.append(approval)
        events.append(
            TimelineEvent(
                at=approval.withdrawn_at,
                kind="agent",
                title=f"Approval withdrawn: {plan} (approved by {approval.agent}), not carried out",
                detail=approval.reason,
                status="warn",
            )
        )
    latest = max(withdrawn, key=lambda approval: approval.withdrawn_at, default=None)
    acted_since = latest is not None and any(
        row["state"] in ("approved", "rejected") and as_utc(row["acted_at"] or row["created_at"]) > latest.withdrawn_at
        for row in rows
    )
    return _ApprovalFates(events=events, unseen=None if acted_since else latest)


def recent(now: datetime, days: int) -> datetime:
    """The start of the last ``days`` days."""
    return now - timedelta(days=days)
