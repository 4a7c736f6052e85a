"""agent_queue: withdrawn_at, withdrawn_by, withdrawn_reason: an approval taken back before it was carried out

In assisted mode an agent may approve an action planned for later (a retry after payday). When the order is
decided again before that (the customer's payment by link was declined, they opted out of the approved message's
channel) and the new decision plans something else, the approved action is cancelled and the new recommendation
waits for an agent. The approval keeps its state (an agent did approve it); these columns say when it was
withdrawn, by which decision, and why, so the console can show it.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the three nullable columns (null: the approval was carried out, or still waits to be)."""
    with op.batch_alter_table("agent_queue") as batch:
        batch.add_column(sa.Column("withdrawn_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("withdrawn_by", sa.String(64), nullable=True))
        batch.add_column(sa.Column("withdrawn_reason", sa.Text, nullable=True))


def downgrade() -> None:
    """Drop them (an approval withdrawn before reads as approved again; its action stays cancelled)."""
    with op.batch_alter_table("agent_queue") as batch:
        batch.drop_column("withdrawn_reason")
        batch.drop_column("withdrawn_by")
        batch.drop_column("withdrawn_at")
