"""sender_holds: how many times a provider's rate limit held a merchant's sender (or one customer of it), for /metrics

A rate-limited sender (Meta's 130429, Gupshup's 4001, an SMTP relay's throttling answer) or customer (Meta's
131056) was held with only a warning and its pacing row to show for it, and that row forgets: ``times_limited``
starts over after a quiet spell, and a customer's row is deleted once idle. ``/metrics`` reads the executor's
figures from the database (service/executor/metrics.py), so the count of holds is kept here, per merchant, channel
and kind of limit (``rate``, ``daily_quota``, ``pair``), with the end of the last hold (the senders held now).
Before this revision no hold was counted: the counters start at 0.

Revision ID: 0022
Revises: 0021
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the table (primary key: merchant, channel, kind of limit)."""
    op.create_table(
        "sender_holds",
        sa.Column("merchant_id", sa.String(128), primary_key=True),
        sa.Column("channel", sa.String(16), primary_key=True),
        sa.Column("held_for", sa.String(16), primary_key=True),
        sa.Column("holds", sa.Integer, nullable=False, server_default="0"),
        sa.Column("held_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_held_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    """Drop it: the holds go uncounted on /metrics again (the pacing itself does not read it)."""
    op.drop_table("sender_holds")
