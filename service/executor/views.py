"""The read side: an order with its attempts, nudges, decisions, actions, webhook and agent queue."""

from __future__ import annotations

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from service.api.store import decisions
from service.executor.schemas import ActionOut, AgentItemOut, AttemptOut, NudgeOut, OrderOut, WebhookOut
from service.executor.store import (
    actions,
    agent_queue,
    as_utc,
    as_utc_or_none,
    nudges,
    orders,
    transactions,
    webhook_deliveries,
)


def order_view(engine: Engine, merchant_id: str, order_id: str) -> OrderOut | None:
    """The order as ``GET /v1/orders/{order_id}`` shows it, or None when unknown."""
    with engine.connect() as conn:
        order = (
            conn.execute(sa.select(orders).where(orders.c.merchant_id == merchant_id, orders.c.order_id == order_id))
            .mappings()
            .first()
        )
        if order is None:
            return None

        def rows(table: sa.Table, *order_by: sa.ColumnElement[object]) -> list[sa.RowMapping]:
            query = sa.select(table).where(table.c.merchant_id == merchant_id, table.c.order_id == order_id)
            return list(conn.execute(query.order_by(*order_by)).mappings())

        attempts = [
            AttemptOut.model_validate({**row, "created_at": as_utc(row["created_at"])})
            for row in rows(transactions, transactions.c.attempt_number)
        ]
        sent = [
            NudgeOut.model_validate(
                {**row, "sent_at": as_utc(row["sent_at"]), "clicked_at": as_utc_or_none(row["clicked_at"])}
            )
            for row in rows(nudges, nudges.c.sent_at)
        ]
        scheduled = [
            ActionOut.model_validate(
                {
                    **row,
                    "planned_at": as_utc(row["planned_at"]),
                    "due_at": as_utc(row["due_at"]),
                    "unanswered_since": as_utc_or_none(row["unanswered_since"]),
                }
            )
            for row in rows(actions, actions.c.action_id)
        ]
        queue = [
            AgentItemOut.model_validate(
                {
                    **row,
                    "created_at": as_utc(row["created_at"]),
                    "acted_at": as_utc_or_none(row["acted_at"]),
                    "withdrawn_at": as_utc_or_none(row["withdrawn_at"]),
                }
            )
            for row in rows(agent_queue, agent_queue.c.item_id)
        ]
        hooks = rows(webhook_deliveries, webhook_deliveries.c.created_at)
        answers = [
            orjson.loads(text)
            for text in conn.scalars(
                sa.select(decisions.c.answer_json)
                .where(decisions.c.merchant_id == merchant_id, decisions.c.order_id == order_id)
                .order_by(decisions.c.created_at)
            )
        ]
    webhook = None
    if hooks:
        hook = hooks[0]
        webhook = WebhookOut.model_validate({**hook, "delivered_at": as_utc_or_none(hook["delivered_at"])})
    return OrderOut(
        order_id=order["order_id"],
        merchant_id=order["merchant_id"],
        state=order["state"],
        amount=order["amount"],
        currency=order["currency"],
        created_at=as_utc(order["created_at"]),
        closed_at=as_utc_or_none(order["closed_at"]),
        success_txn_id=order["success_txn_id"],
        attempts=attempts,
        nudges=sent,
        decisions=answers,
        actions=scheduled,
        webhook=webhook,
        agent_queue=queue,
    )
