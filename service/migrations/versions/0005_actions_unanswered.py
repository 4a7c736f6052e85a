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
    """Add actions.unanswered_since (null: not sent, or answered), and mark the charges already out.

    Before this revision a charge whose answer was lost went back to ``scheduled`` (or stayed ``claimed``) with
    its try counted, and one dead-lettered after its tries ("gave up after ...") or on an answer that could not be
    read (a 409 on its key, a body that is not a payment) may have taken the money: those start marked (since
    their last change).
    """
    op.add_column("actions", sa.Column("unanswered_since", sa.DateTime(timezone=True), nullable=True))
    op.execute(
        "UPDATE actions SET unanswered_since = updated_at"
        " WHERE kind IN ('retry', 'link_payment') AND attempts > 0"
        " AND (state IN ('scheduled', 'claimed') OR (state = 'dead' AND ("
        "last_error LIKE 'gave up after%' OR last_error LIKE '%HTTP 409%' OR last_error LIKE '%answered a body%'"
        " OR last_error LIKE '%answered JSON%' OR last_error LIKE '%unknown status%')))"
    )


def downgrade() -> None:
    """Drop actions.unanswered_since."""
    with op.batch_alter_table("actions") as batch:
        batch.drop_column("unanswered_since")
