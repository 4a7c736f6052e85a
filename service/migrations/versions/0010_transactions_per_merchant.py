"""transactions: keyed by (merchant_id, txn_id)

An attempt's txn_id is the merchant's own (its switch's id, given in a failure event's history) or one winback
derives from the merchant, order and attempt. Keyed by txn_id alone, one merchant could take another's: a failure
event whose history named an id another merchant uses was refused 409 ("already the txn_id of another order's
attempt"), which told any merchant whether an id existed anywhere, and an event naming the id winback derives
for another merchant's order (``txn_`` + a hash of merchant, order and attempt: predictable) kept that merchant
from ever handing the order over. Keyed per merchant, no merchant's attempt can occupy another's; the export
writes an id that several merchants use as ``<merchant_id>/<txn_id>``.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

#: PostgreSQL's name for the key 0002 made (SQLite's primary keys have no name).
_OLD_KEY = "transactions_pkey"
_NEW_KEY = "pk_transactions_merchant_id_txn_id"


def _table(key_name: str, key: list[str]) -> sa.Table:
    """``transactions`` as of 0009, with primary key ``key``: what SQLite's copy of the table is made from."""
    return sa.Table(
        "transactions",
        sa.MetaData(),
        sa.Column("txn_id", sa.String(64), nullable=False),
        sa.Column("merchant_id", sa.String(128), nullable=False),
        sa.Column("order_id", sa.String(256), nullable=False),
        sa.Column("attempt_number", sa.Integer, nullable=False),
        sa.Column("processor_payment_id", sa.String(300), nullable=False),
        sa.Column("strategy", sa.String(32), nullable=False),
        sa.Column("connector", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error_code", sa.Text, nullable=True),
        sa.Column("error_message", sa.Text, nullable=True),
        sa.Column("network_decline_code", sa.Text, nullable=True),
        sa.Column("merchant_advice_code", sa.Text, nullable=True),
        sa.Column("unified_code", sa.Text, nullable=True),
        sa.Column("decision_id", sa.String(64), nullable=True),
        sa.Column("propensity", sa.Float, nullable=True),
        sa.Column("nudge_id", sa.String(64), nullable=True),
        sa.Column("idempotency_key", sa.String(400), nullable=True, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("merchant_id", "order_id", "attempt_number", name="uq_transactions_attempt"),
        sa.PrimaryKeyConstraint(*key, name=key_name),
    )


def _rekey(old: str, new: str, key: list[str]) -> None:
    """Give ``transactions`` the primary key ``key`` (named ``new``; ``old``: the key's name now)."""
    if op.get_bind().dialect.name == "sqlite":  # no ALTER of a primary key: the table is copied into a new one
        with op.batch_alter_table("transactions", recreate="always", copy_from=_table(new, key)):
            pass
        return
    op.drop_constraint(old, "transactions", type_="primary")
    op.create_primary_key(new, "transactions", key)


def upgrade() -> None:
    """Key transactions by (merchant_id, txn_id)."""
    _rekey(_OLD_KEY, _NEW_KEY, ["merchant_id", "txn_id"])


def downgrade() -> None:
    """Key transactions by txn_id again (fails if two merchants have an attempt with the same txn_id)."""
    _rekey(_NEW_KEY, _OLD_KEY, ["txn_id"])
