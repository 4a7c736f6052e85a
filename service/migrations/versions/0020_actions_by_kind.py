"""actions: an index by kind and merchant, for the few status checks the disputes are read from

An operator's "charged" that its switch then contradicts is flagged on the charge's status check
(``core.charge_disputes``). Those flags are read at every ``/metrics`` scrape (at most once a minute per server
process) and for every page of a merchant's console queue; with no index but the order's, each read went through
all of the merchant's actions (or all actions), one row per retry, message and follow-up ever planned.
``ix_actions_kind`` leads with the kind, so a read of the status checks finds them alone (a charge sent and never
answered has one or two).

Revision ID: 0020
Revises: 0019
"""

from __future__ import annotations

from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the index (kind, then merchant: the console reads one merchant's, /metrics every merchant's)."""
    op.create_index("ix_actions_kind", "actions", ["kind", "merchant_id"])


def downgrade() -> None:
    """Drop it: the disputes are read from every action again."""
    op.drop_index("ix_actions_kind", table_name="actions")
