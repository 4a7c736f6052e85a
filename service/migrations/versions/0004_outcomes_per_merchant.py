"""outcomes: keyed by (merchant_id, decision_id)

An outcome is a merchant's statement about one of its own decisions. Keyed by decision_id alone, an outcome that
arrived before its decision was stored (decisions are written in batches behind the answers) was stored under
whichever merchant sent it, and the decision's own merchant was then refused. Keyed per merchant, no merchant's
outcome can occupy another's; the export joins on both columns.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_COLUMNS = "decision_id, merchant_id, order_id, status, occurred_at, body_json, recorded_at"


def _outcomes_table(name: str, key: list[str]) -> None:
    op.create_table(
        name,
        sa.Column("decision_id", sa.String(64), nullable=False),
        sa.Column("merchant_id", sa.String(128), nullable=False),
        sa.Column("order_id", sa.String(256), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("body_json", sa.Text, nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        # Named after its columns: a renamed table keeps its constraint's name, and PostgreSQL wants them unique.
        sa.PrimaryKeyConstraint(*key, name="pk_outcomes_" + "_".join(key)),
    )


def _rebuild(key: list[str]) -> None:
    """Copy ``outcomes`` into a new table with primary key ``key`` and put it in its place (any backend)."""
    _outcomes_table("outcomes_rebuilt", key)
    op.execute(f"INSERT INTO outcomes_rebuilt ({_COLUMNS}) SELECT {_COLUMNS} FROM outcomes")
    op.drop_index("ix_outcomes_merchant_order", table_name="outcomes")
    op.drop_table("outcomes")
    op.rename_table("outcomes_rebuilt", "outcomes")
    op.create_index("ix_outcomes_merchant_order", "outcomes", ["merchant_id", "order_id"])


def upgrade() -> None:
    """Key outcomes by (merchant_id, decision_id)."""
    _rebuild(["merchant_id", "decision_id"])


def downgrade() -> None:
    """Key outcomes by decision_id again (fails if two merchants reported the same decision_id)."""
    _rebuild(["decision_id"])
