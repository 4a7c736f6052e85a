"""customer_pacing: an index on next_turn_at for the clean-up of idle customers, and last_sent_at

Every WhatsApp message makes or updates its customer's row (``pacing.pair_turn``), and the worker deletes, every
hour and at each pair rate limit, the rows whose hold and turns are long over (``pacing.forget_idle_customers``).
That delete filtered on ``next_turn_at`` with no index: it read the whole table, one row per customer messaged
recently. ``ix_customer_pacing_next_turn`` lets it read the idle rows only (the filter is written for it: a turn
before the cutoff or none, on PostgreSQL and SQLite alike; the ``coalesce(next_turn_at, held_until)`` it compared
before could use no index on the column).

``last_sent_at`` is when the customer's last message went. Turns are planned 6 seconds apart (Meta's pair rate),
but a message may go a few seconds after its turn: the next one, planned 6 seconds after that turn, then went less
than 6 seconds after it. The next message now waits until 6 seconds after ``last_sent_at``.

Revision ID: 0018
Revises: 0017
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the column (empty: a row stored before keeps its planned turns) and the index."""
    with op.batch_alter_table("customer_pacing") as batch:
        batch.add_column(sa.Column("last_sent_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_customer_pacing_next_turn", "customer_pacing", ["next_turn_at"])


def downgrade() -> None:
    """Drop both: the clean-up reads the whole table again, and messages go at their planned turns."""
    op.drop_index("ix_customer_pacing_next_turn", table_name="customer_pacing")
    with op.batch_alter_table("customer_pacing") as batch:
        batch.drop_column("last_sent_at")
