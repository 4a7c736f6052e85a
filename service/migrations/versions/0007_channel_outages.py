"""channel_outages: a messaging provider that refuses every message is a channel down, per merchant

Before this revision a provider's outage of more than an hour cost each waiting customer a message: it was given
up, recorded as a nudge that was never sent (counted against max_nudges, and in the exported history), and the
order was decided again onto the same channel. The table keeps, per merchant and channel, since when its provider
has refused every message and until when the channel is held down.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create channel_outages (primary key: merchant, channel)."""
    op.create_table(
        "channel_outages",
        sa.Column("merchant_id", sa.String(128), primary_key=True),
        sa.Column("channel", sa.String(16), primary_key=True),
        sa.Column("refused_since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_refused_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("down_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("times_down", sa.Integer, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    """Drop channel_outages."""
    op.drop_table("channel_outages")
