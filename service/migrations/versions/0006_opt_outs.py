"""opt_outs: customers' opt-outs per merchant, address and channel

A customer's STOP reply names a phone number, not an order: before this revision an opt-out only patched the
stored requests of the customer's open orders, and the next failed order was messaged on the same channel again.
The table keeps a SHA-256 of the normalised address (never the address), one row per merchant, address and channel.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create opt_outs (primary key: merchant, address hash, channel)."""
    op.create_table(
        "opt_outs",
        sa.Column("merchant_id", sa.String(128), primary_key=True),
        sa.Column("address_sha256", sa.String(64), primary_key=True),
        sa.Column("channel", sa.String(16), primary_key=True),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    """Drop opt_outs."""
    op.drop_table("opt_outs")
