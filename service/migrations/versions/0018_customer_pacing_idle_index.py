"""customer_pacing: an index on next_turn_at for the clean-up of idle customers

Every WhatsApp message makes or updates its customer's row (``pacing.pair_turn``), and the worker deletes, every
hour and at each pair rate limit, the rows whose hold and turns are long over (``pacing.forget_idle_customers``).
That delete filtered on ``next_turn_at`` with no index: it read the whole table, one row per customer messaged
recently. ``ix_customer_pacing_next_turn`` lets it read the idle rows only (the filter is written for it: a turn
before the cutoff or none, on PostgreSQL and SQLite alike; the ``coalesce(next_turn_at, held_until)`` it compared
before could use no index on the column).

Revision ID: 0018
Revises: 0017
"""

from __future__ import annotations

from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the index."""
    op.create_index("ix_customer_pacing_next_turn", "customer_pacing", ["next_turn_at"])


def downgrade() -> None:
    """Drop it: the clean-up reads the whole table again."""
    op.drop_index("ix_customer_pacing_next_turn", table_name="customer_pacing")
