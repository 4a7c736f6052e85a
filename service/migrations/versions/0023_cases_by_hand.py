"""cases_by_hand: the refunds by hand and possible double payments kept one row each, to mark dealt with and count

A refund of a duplicate charge given to an operator (``refund_by_hand`` on the refund action's payload) and an
order the customer may have paid twice (``merchant_paid_too`` on the charge that paid it, one entry per merchant
txn id) were kept only on their action's payload: nobody could mark one dealt with, so ``winback executor
refunds-by-hand`` listed each for ever, and /metrics counted them at every scrape with a ``LIKE '%…%'`` over the
payload of every refund, retry and link payment. ``cases_by_hand`` keeps a row per case, written with the flag,
with who marked it dealt with, when and their note; /metrics counts its rows.

The flags set before are copied here, each as it was flagged (when, why, the merchant's txn id), open: read once,
in batches of ``BATCH`` actions in key order (keyset), only those whose payload carries a flag decoded. The flags
stay on the payloads. A downgrade drops the table, and with it who dealt with which case.

Revision ID: 0023
Revises: 0022
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0023"
down_revision = "0022"
branch_labels = None
depends_on = None

#: Actions read per statement.
BATCH = 1000
#: The payload keys of the two flags and the kinds of action that carry them, as this revision found them.
REFUND_BY_HAND = "refund_by_hand"
MERCHANT_PAID_TOO = "merchant_paid_too"
FLAGGED_KINDS = {"refund": REFUND_BY_HAND, "retry": MERCHANT_PAID_TOO, "link_payment": MERCHANT_PAID_TOO}

_actions = sa.table(
    "actions",
    sa.column("action_id", sa.BigInteger),
    sa.column("merchant_id", sa.String),
    sa.column("order_id", sa.String),
    sa.column("kind", sa.String),
    sa.column("payload_json", sa.Text),
)


def _create() -> sa.Table:
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    table = op.create_table(
        "cases_by_hand",
        sa.Column("case_id", big_id, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("merchant_id", sa.String(128), nullable=False),
        sa.Column("order_id", sa.String(256), nullable=False),
        sa.Column("action_id", big_id, nullable=False),
        sa.Column("ref", sa.String(256), nullable=False, server_default=""),
        sa.Column("why", sa.String(16), nullable=True),
        sa.Column("flagged_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("done_by", sa.String(256), nullable=True),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("done_note", sa.Text, nullable=True),
        sa.UniqueConstraint("kind", "action_id", "ref", name="uq_cases_by_hand_case"),
    )
    op.create_index("ix_cases_by_hand_order", "cases_by_hand", ["merchant_id", "order_id"])
    assert table is not None
    return table


def _when(value: object) -> datetime:
    """A flag's ``at`` (ISO 8601, UTC), as a UTC datetime."""
    at = datetime.fromisoformat(str(value))
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _cases(row: Any) -> list[dict[str, Any]]:
    """The cases flagged on one action's payload (none when it is not JSON or carries no flag as a dict)."""
    key = FLAGGED_KINDS[row.kind]
    try:
        payload = json.loads(row.payload_json or "{}")
    except ValueError:
        return []
    flag = payload.get(key) if isinstance(payload, dict) else None
    if not isinstance(flag, dict):
        return []
    of = {"merchant_id": row.merchant_id, "order_id": row.order_id, "action_id": row.action_id}
    if key == REFUND_BY_HAND:
        why = flag.get("why")
        return [
            of
            | {"kind": "refund", "ref": "", "why": None if why is None else str(why), "flagged_at": _when(flag["at"])}
        ]
    return [
        of | {"kind": "paid_twice", "ref": str(txn_id), "why": None, "flagged_at": _when(report["at"])}
        for txn_id, report in flag.items()
        if isinstance(report, dict)
    ]


def upgrade() -> None:
    """Create the table and copy the flags set before into it."""
    table = _create()
    conn = op.get_bind()
    after = 0
    while True:
        rows = conn.execute(
            sa.select(_actions)
            .where(
                _actions.c.action_id > after,
                sa.or_(
                    *(
                        sa.and_(_actions.c.kind == kind, _actions.c.payload_json.contains(key))
                        for kind, key in FLAGGED_KINDS.items()
                    )
                ),
            )
            .order_by(_actions.c.action_id)
            .limit(BATCH)
        ).all()
        if not rows:
            return
        cases = [case for row in rows for case in _cases(row)]
        if cases:
            conn.execute(table.insert(), cases)
        after = rows[-1].action_id


def downgrade() -> None:
    """Drop it: the flags stay on the payloads, who dealt with which case is lost."""
    op.drop_index("ix_cases_by_hand_order", table_name="cases_by_hand")
    op.drop_table("cases_by_hand")
