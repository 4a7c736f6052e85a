"""decisions and outcomes tables

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the decisions served and the outcomes reported."""
    op.create_table(
        "decisions",
        sa.Column("decision_id", sa.String(64), primary_key=True),
        sa.Column("merchant_id", sa.String(128), nullable=False),
        sa.Column("order_id", sa.String(256), nullable=False),
        sa.Column("event_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("strategy", sa.String(32), nullable=True),
        sa.Column("connector", sa.String(128), nullable=True),
        sa.Column("channel", sa.String(16), nullable=True),
        sa.Column("execute_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("propensity", sa.Float, nullable=False),
        sa.Column("request_json", sa.Text, nullable=False),
        sa.Column("answer_json", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_decisions_merchant_order", "decisions", ["merchant_id", "order_id"])
    op.create_table(
        "outcomes",
        sa.Column("decision_id", sa.String(64), primary_key=True),
        sa.Column("merchant_id", sa.String(128), nullable=False),
        sa.Column("order_id", sa.String(256), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("body_json", sa.Text, nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_outcomes_merchant_order", "outcomes", ["merchant_id", "order_id"])


def downgrade() -> None:
    """Drop both tables."""
    op.drop_index("ix_outcomes_merchant_order", table_name="outcomes")
    op.drop_table("outcomes")
    op.drop_index("ix_decisions_merchant_order", table_name="decisions")
    op.drop_table("decisions")
