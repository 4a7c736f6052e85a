"""channel_outages: the claim of the message that probes a channel after its hold

When a channel's hold ended, every message waiting for it was tried at once (a herd on a provider that may still
be down, one refused message per worker and per order), and each executor worker could send a probe of its own.
Now one message at a time is the probe: it claims the channel's row until ``probe_until``, and the others wait for
its answer.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """channel_outages gets probe_until."""
    with op.batch_alter_table("channel_outages") as batch:
        batch.add_column(sa.Column("probe_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Without it, every message waiting for a channel is tried at its hold's end again."""
    with op.batch_alter_table("channel_outages") as batch:
        batch.drop_column("probe_until")
