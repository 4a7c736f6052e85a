"""nudges: the receipt that decided a message's delivery; channel_pacing: a sender held back after a rate limit

A failed receipt arriving after a delivered one for the same message marked it undelivered: WhatsApp may report a
message failed after it was sent, but one delivered stays delivered. Each nudge now keeps the status of the receipt
that decided its delivery (``receipt_status``) and that receipt's provider time stamp (``receipt_at``), so receipts
are ordered by their meaning and time, whatever order they arrive in.

A receipt saying the merchant's sender number was rate limited (Meta 130429, Gupshup 4001) only logged a warning,
and sends went on at full speed. ``channel_pacing`` keeps, per merchant and channel, until when its sends are held
back and how many rate-limited receipts came in a row (the hold grows with them).

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """nudges get receipt_status and receipt_at; channel_pacing is created (primary key: merchant, channel)."""
    with op.batch_alter_table("nudges") as batch:
        batch.add_column(sa.Column("receipt_status", sa.String(16), nullable=True))
        batch.add_column(sa.Column("receipt_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "channel_pacing",
        sa.Column("merchant_id", sa.String(128), primary_key=True),
        sa.Column("channel", sa.String(16), primary_key=True),
        sa.Column("held_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_limited_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("times_limited", sa.Integer, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    """Without them, a failed receipt after a delivered one marks the message undelivered again, and a rate-limited
    sender is not held back."""
    op.drop_table("channel_pacing")
    with op.batch_alter_table("nudges") as batch:
        batch.drop_column("receipt_at")
        batch.drop_column("receipt_status")
