"""customer_pacing: a customer held back after WhatsApp's pair rate limit; channel_pacing.next_turn_at: held
messages released one at a time

Meta's 131056 (too many messages from the business number to one customer phone number) held the merchant's whole
sender on the channel, every customer alike, though the limit is about that one pair. ``customer_pacing`` keeps,
per merchant, channel and customer address (its SHA-256, as ``opt_outs`` does), until when that customer's messages
on the channel wait, how many such receipts came in a row, and the next turn of its held messages (one every 6 s).

When a sender's hold ended, every message held during it went at once: the burst that had hit the throughput limit.
``channel_pacing.next_turn_at`` is the next free turn of the sender's release: each held message is given its own
turn, a spacing apart, from the hold's end on.

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """channel_pacing gets next_turn_at; customer_pacing is created (primary key: merchant, channel, address)."""
    with op.batch_alter_table("channel_pacing") as batch:
        batch.add_column(sa.Column("next_turn_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "customer_pacing",
        sa.Column("merchant_id", sa.String(128), primary_key=True),
        sa.Column("channel", sa.String(16), primary_key=True),
        sa.Column("address_sha256", sa.String(64), primary_key=True),
        sa.Column("held_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_limited_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("times_limited", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_turn_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    """Without them, a pair rate limit holds the merchant's whole sender again (the customers' holds are lost), and
    the messages held by a sender's hold go at once when it ends."""
    op.drop_table("customer_pacing")
    with op.batch_alter_table("channel_pacing") as batch:
        batch.drop_column("next_turn_at")
