"""transactions: an attempt's codes as text, whatever their length

A connector's answer, or a failure event, may carry a code longer than the columns held (``network_decline_code``
and ``merchant_advice_code`` 32, ``unified_code`` 64, ``error_code`` 256 characters: "05 - Do Not Honor (issuer
declined)" is 35). SQLite stored it; PostgreSQL refused the row: a failure event was answered 500, and a
connector's decline could not be recorded, so the charge was re-sent until dead-lettered as one whose outcome
is unknown, and its order waited for an operator. The codes are text now, as ``error_message`` is.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

#: The columns widened, with their width before this revision.
WIDTHS = {"error_code": 256, "network_decline_code": 32, "merchant_advice_code": 32, "unified_code": 64}


def upgrade() -> None:
    """transactions' code columns become TEXT."""
    with op.batch_alter_table("transactions") as batch:
        for name, width in WIDTHS.items():
            batch.alter_column(name, existing_type=sa.String(width), type_=sa.Text(), existing_nullable=True)


def downgrade() -> None:
    """Back to the widths of 0006; a longer code is cut to the width (the old schema cannot hold it)."""
    for name, width in WIDTHS.items():
        op.execute(f"UPDATE transactions SET {name} = substr({name}, 1, {width}) WHERE length({name}) > {width}")
    with op.batch_alter_table("transactions") as batch:
        for name, width in WIDTHS.items():
            batch.alter_column(name, existing_type=sa.Text(), type_=sa.String(width), existing_nullable=True)
