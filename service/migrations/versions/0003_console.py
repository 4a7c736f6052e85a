"""console: agents, sessions, audit log

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create the console's tables."""
    op.create_table(
        "console_agents",
        sa.Column("agent_id", _BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("merchant_id", sa.String(128), nullable=False),
        sa.Column("password_hash", sa.String(512), nullable=False),
        sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("password_changed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "console_sessions",
        sa.Column("token_sha256", sa.String(64), primary_key=True),
        sa.Column("agent_id", _BIG_ID, nullable=False),
        sa.Column("merchant_id", sa.String(128), nullable=False),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_console_sessions_agent", "console_sessions", ["agent_id"])
    op.create_table(
        "console_audit",
        sa.Column("audit_id", _BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("merchant_id", sa.String(128), nullable=False),
        sa.Column("order_id", sa.String(256), nullable=False),
        sa.Column("agent_id", _BIG_ID, nullable=False),
        sa.Column("agent_name", sa.String(128), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("result", sa.String(16), nullable=False),
        sa.Column("rules", sa.Text, nullable=True),
        sa.Column("message", sa.Text, nullable=True),
        sa.Column("decision_id", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_console_audit_order", "console_audit", ["merchant_id", "order_id"])


def downgrade() -> None:
    """Drop the console's tables."""
    op.drop_index("ix_console_audit_order", table_name="console_audit")
    op.drop_table("console_audit")
    op.drop_index("ix_console_sessions_agent", table_name="console_sessions")
    op.drop_table("console_sessions")
    op.drop_table("console_agents")
