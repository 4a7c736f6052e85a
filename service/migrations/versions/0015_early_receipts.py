"""early_receipts: a delivery receipt that arrives before its send is recorded is kept, not dropped

A provider may post a message's receipt between accepting it and the executor recording the send (``complete``), or
long after, when the worker died before recording it. Such a receipt matched no nudge and was dropped with an info
log: a failed, held-back, rate-limited or opted-out message stayed recorded as sent, counted against the customer's
reminders, its opt-out unrecorded and the merchant's sender not held back. ``early_receipts`` keeps it (per merchant,
provider message id, status and provider time stamp: the same receipt twice is one row) until the send is recorded,
when it is applied and deleted, or until it expires.

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create early_receipts and its index by merchant and arrival (the clean-up and the per-merchant bound)."""
    op.create_table(
        "early_receipts",
        sa.Column("merchant_id", sa.String(128), primary_key=True),
        sa.Column("provider_message_id", sa.String(256), primary_key=True),
        sa.Column("status", sa.String(16), primary_key=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("failure", sa.String(32), nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_early_receipts_received", "early_receipts", ["merchant_id", "received_at"])


def downgrade() -> None:
    """Without it, a receipt that arrives before its send is recorded is dropped again (the receipts kept are
    lost)."""
    op.drop_index("ix_early_receipts_received", table_name="early_receipts")
    op.drop_table("early_receipts")
