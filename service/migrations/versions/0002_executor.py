"""executor: orders, transactions, nudges, actions, webhook deliveries, payment links, event keys, agent queue

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create the executor's tables."""
    op.create_table(
        "orders",
        sa.Column("merchant_id", sa.String(128), primary_key=True),
        sa.Column("order_id", sa.String(256), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("amount", sa.Float, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("customer_id", sa.String(256), nullable=False),
        sa.Column("request_json", sa.Text, nullable=False),
        sa.Column("failure_json", sa.Text, nullable=False),
        sa.Column("attempt_count", sa.Integer, nullable=False),
        sa.Column("nudge_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("first_failed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("success_txn_id", sa.String(64), nullable=True),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "transactions",
        sa.Column("txn_id", sa.String(64), primary_key=True),
        sa.Column("merchant_id", sa.String(128), nullable=False),
        sa.Column("order_id", sa.String(256), nullable=False),
        sa.Column("attempt_number", sa.Integer, nullable=False),
        sa.Column("processor_payment_id", sa.String(300), nullable=False),
        sa.Column("strategy", sa.String(32), nullable=False),
        sa.Column("connector", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error_code", sa.String(256), nullable=True),
        sa.Column("error_message", sa.Text, nullable=True),
        sa.Column("network_decline_code", sa.String(32), nullable=True),
        sa.Column("merchant_advice_code", sa.String(32), nullable=True),
        sa.Column("unified_code", sa.String(64), nullable=True),
        sa.Column("decision_id", sa.String(64), nullable=True),
        sa.Column("propensity", sa.Float, nullable=True),
        sa.Column("nudge_id", sa.String(64), nullable=True),
        sa.Column("idempotency_key", sa.String(400), nullable=True, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("merchant_id", "order_id", "attempt_number", name="uq_transactions_attempt"),
    )
    op.create_table(
        "nudges",
        sa.Column("nudge_id", sa.String(64), primary_key=True),
        sa.Column("merchant_id", sa.String(128), nullable=False),
        sa.Column("order_id", sa.String(256), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("template_id", sa.String(128), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("delivered", sa.Boolean, nullable=True),
        sa.Column("clicked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("provider_message_id", sa.String(256), nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("decision_id", sa.String(64), nullable=True),
        sa.Column("propensity", sa.Float, nullable=True),
        sa.Column("idempotency_key", sa.String(400), nullable=True, unique=True),
    )
    op.create_index("ix_nudges_order", "nudges", ["merchant_id", "order_id"])
    op.create_index("ix_nudges_provider_message", "nudges", ["provider_message_id"])
    op.create_table(
        "actions",
        sa.Column("action_id", _BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("merchant_id", sa.String(128), nullable=False),
        sa.Column("order_id", sa.String(256), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("planned_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("claim_token", sa.String(64), nullable=True),
        sa.Column("claimed_by", sa.String(128), nullable=True),
        sa.Column("idempotency_key", sa.String(400), nullable=False, unique=True),
        sa.Column("decision_id", sa.String(64), nullable=True),
        sa.Column("payload_json", sa.Text, nullable=False, server_default="{}"),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_actions_due", "actions", ["state", "due_at"])
    op.create_index("ix_actions_order", "actions", ["merchant_id", "order_id"])
    op.create_table(
        "webhook_deliveries",
        sa.Column("merchant_id", sa.String(128), primary_key=True),
        sa.Column("order_id", sa.String(256), primary_key=True),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_status_code", sa.Integer, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "payment_links",
        sa.Column("token_id", sa.String(64), primary_key=True),
        sa.Column("merchant_id", sa.String(128), nullable=False),
        sa.Column("order_id", sa.String(256), nullable=False),
        sa.Column("nudge_id", sa.String(64), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("txn_id", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_payment_links_order", "payment_links", ["merchant_id", "order_id"])
    op.create_table(
        "event_keys",
        sa.Column("merchant_id", sa.String(128), primary_key=True),
        sa.Column("idempotency_key", sa.String(256), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("body_sha256", sa.String(64), nullable=False),
        sa.Column("response_json", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "agent_queue",
        sa.Column("item_id", _BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("merchant_id", sa.String(128), nullable=False),
        sa.Column("order_id", sa.String(256), nullable=False),
        sa.Column("decision_id", sa.String(64), nullable=False, unique=True),
        sa.Column("decision_json", sa.Text, nullable=False),
        sa.Column("request_json", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("agent", sa.String(128), nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("acted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_agent_queue_state", "agent_queue", ["state", "created_at"])
    op.create_index("ix_agent_queue_order", "agent_queue", ["merchant_id", "order_id"])


def downgrade() -> None:
    """Drop the executor's tables."""
    for index, table in (
        ("ix_agent_queue_order", "agent_queue"),
        ("ix_agent_queue_state", "agent_queue"),
        ("ix_payment_links_order", "payment_links"),
        ("ix_actions_order", "actions"),
        ("ix_actions_due", "actions"),
        ("ix_nudges_provider_message", "nudges"),
        ("ix_nudges_order", "nudges"),
    ):
        op.drop_index(index, table_name=table)
    for table in (
        "agent_queue",
        "event_keys",
        "payment_links",
        "webhook_deliveries",
        "actions",
        "nudges",
        "transactions",
        "orders",
    ):
        op.drop_table(table)
