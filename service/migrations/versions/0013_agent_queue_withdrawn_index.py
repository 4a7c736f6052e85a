"""agent_queue: a partial index on the approvals withdrawn, per merchant and order

The console's queue badges the orders whose withdrawn approval no agent has acted on since
(``service.console.views.withdrawn_approvals``): every load of a merchant's queue asks for that merchant's rows with
``withdrawn_at IS NOT NULL``. Without an index that read every queue item the merchant ever had (the
``ix_agent_queue_order`` index leads with merchant_id, so it narrows to the merchant, never to the withdrawn few).
Withdrawn approvals are a small share of the rows, so the index holds only them (a partial index, on PostgreSQL
and SQLite alike): small, and a write to any other row never touches it.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

WITHDRAWN = sa.text("withdrawn_at IS NOT NULL")


def upgrade() -> None:
    """Create the partial index."""
    op.create_index(
        "ix_agent_queue_withdrawn",
        "agent_queue",
        ["merchant_id", "order_id", "withdrawn_at"],
        postgresql_where=WITHDRAWN,
        sqlite_where=WITHDRAWN,
    )


def downgrade() -> None:
    """Drop it (the console's query reads the merchant's queue items again)."""
    op.drop_index("ix_agent_queue_withdrawn", table_name="agent_queue")
