"""console_submissions: each form an agent sent to the console, with its result

Without JavaScript, the console answered an action's form with the order's page: reloading that page sent the form
again (the action was tried again, and a refusal audited again), and so did a double click or an old page sent
again. Each rendered form now carries a one-time token; its first POST is noted here with its result, and a second
POST of it is answered with that result, doing nothing. A POST without JavaScript is answered with a redirect to
the order's page, which shows the result once (``flash_key``). Rows are kept for a session's lifetime at most.

Revision ID: 0019
Revises: 0017
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create the table of forms sent."""
    op.create_table(
        "console_submissions",
        sa.Column("submission_id", _BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("agent_id", _BIG_ID, nullable=False),
        sa.Column("order_id", sa.String(256), nullable=False),
        sa.Column("form_path", sa.String(1024), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("result", sa.String(16), nullable=True),
        sa.Column("message", sa.Text, nullable=True),
        sa.Column("rules", sa.Text, nullable=True),
        sa.Column("flash_key", sa.String(64), nullable=True),
    )
    op.create_index("ix_console_submissions_created", "console_submissions", ["created_at"])


def downgrade() -> None:
    """Back to acting on every POST of a form."""
    op.drop_table("console_submissions")
