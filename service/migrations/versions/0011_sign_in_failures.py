"""console_sign_in_failures: the failed sign-ins the console's throttle counts, shared by every worker

The throttle counted failures in each process: with ``--workers N`` it let N times as many guesses through, and a
restart forgot them. Only SHA-256 digests of the name or address are kept, and only for the throttle's window.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create the table of failed sign-ins."""
    op.create_table(
        "console_sign_in_failures",
        sa.Column("failure_id", _BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("key_sha256", sa.String(64), nullable=False),
        sa.Column("failed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_console_sign_in_failures_key", "console_sign_in_failures", ["key_sha256", "failed_at"])
    op.create_index("ix_console_sign_in_failures_at", "console_sign_in_failures", ["failed_at"])


def downgrade() -> None:
    """Back to counting in each process."""
    op.drop_table("console_sign_in_failures")
