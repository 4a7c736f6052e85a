"""actions: unanswered_since, when a charge was sent and not yet answered

Whether a charge may have taken the money cannot be told from the action's claim count: a claim may end in a
wait that sends nothing, and a re-claim after a lease looks like a re-send. The executor marks a charge just
before it goes to the connector and clears the mark with the answer; one charge per order at a time, re-sends
and the close's wait all read this mark.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add actions.unanswered_since (null: not sent, or answered)."""
    op.add_column("actions", sa.Column("unanswered_since", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Drop actions.unanswered_since."""
    with op.batch_alter_table("actions") as batch:
        batch.drop_column("unanswered_since")
