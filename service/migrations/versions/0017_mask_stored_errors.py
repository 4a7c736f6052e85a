"""mask_stored_errors: the e-mail addresses and phone numbers in attempts' decline texts, actions' and merchant
webhooks' errors and outcomes' decline texts stored before they were masked at write are masked too

``transactions.error_message``, ``actions.last_error`` and ``webhook_deliveries.last_error`` are masked at every
write since ``MaskedText`` (service.executor.store), and the ``error_message`` of an outcome's body since
``masked_outcome`` (service.api.store): connectors echo the customer's address or number in their decline texts,
which the order view, the console and the history export (the model's training data) show or write, and a webhook's
error is its action's. Rows written before keep them raw; this masks them with the same recogniser
(``service.personal_data.mask_addresses_in``). The webhooks' errors joined this migration before it was released.

Read in batches of ``BATCH`` rows in key order (keyset: each batch starts after the last key of the one before), so
memory stays flat whatever the table's size; only a row whose text changes is written. Masking what is masked
changes nothing, so the migration may be run again (and a row written meanwhile through ``MaskedText`` is left as
it is). Every upgrade runs in one transaction (``service.migrations.upgrade``), so the batches do not shorten how
long the changed rows stay locked: on PostgreSQL those rows (only they) until the upgrade commits, on SQLite the
whole database's writes, as for any migration. Nothing is locked for rows without personal data in them, which are
read and left alone.

Revision ID: 0017
Revises: 0016
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from alembic import op

from service.personal_data import mask_addresses_in

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

#: Rows read (and at most written) per statement.
BATCH = 1000


def _masked_body_json(text: str) -> str:
    """An outcome's stored body with its ``error_message`` masked, written as ``service.api.store`` writes it (the
    same text when nothing in it changes, or when it is not a JSON object: a start must not fail on one row)."""
    try:
        body = json.loads(text)  # not orjson: an extra may hold an integer beyond 64 bits
    except ValueError:
        return text
    if not isinstance(body, dict) or not isinstance(body.get("error_message"), str):
        return text
    # What ``service.api.store.masked_outcome`` did when this migration was written, kept here: a later change to
    # how outcomes are stored must not change what this migration did to the rows of before.
    masked = {**body, "error_message": mask_addresses_in(body["error_message"])}
    if masked == body:
        return text
    return json.dumps(masked, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


#: The tables and text columns masked, each with its primary key (the batches' order) and how it is masked.
MASKED_COLUMNS: tuple[tuple[str, tuple[str, ...], str, Callable[[str], str]], ...] = (
    ("transactions", ("merchant_id", "txn_id"), "error_message", mask_addresses_in),
    ("actions", ("action_id",), "last_error", mask_addresses_in),
    ("webhook_deliveries", ("merchant_id", "order_id"), "last_error", mask_addresses_in),
    ("outcomes", ("merchant_id", "decision_id"), "body_json", _masked_body_json),
)


def upgrade() -> None:
    """Mask the personal data in every stored decline text, action error and webhook error."""
    conn = op.get_bind()
    for table_name, key, column, mask in MASKED_COLUMNS:
        mask_column(conn, table_name, key, column, mask)


def mask_column(
    conn: sa.Connection, table_name: str, key: tuple[str, ...], column: str, mask: Callable[[str], str]
) -> int:
    """Mask ``column`` of every row of ``table_name`` with ``mask``, in batches in ``key`` order; the number of rows
    changed."""
    table = sa.table(table_name, *(sa.column(name) for name in key), sa.column(column, sa.Text))
    key_columns = [table.c[name] for name in key]
    text = table.c[column]
    update = (
        table.update()
        .where(*(table.c[name] == sa.bindparam(f"key_{name}") for name in key))
        .values({column: sa.bindparam("masked")})
    )
    changed = 0
    last: tuple[Any, ...] | None = None
    while True:
        query = sa.select(*key_columns, text).where(text.is_not(None)).order_by(*key_columns).limit(BATCH)
        if last is not None:
            query = query.where(_after(key_columns, last))
        rows = conn.execute(query).all()
        if not rows:
            return changed
        masked = [
            {**{f"key_{name}": value for name, value in zip(key, row[:-1], strict=True)}, "masked": new}
            for row in rows
            if (new := mask(row[-1])) != row[-1]
        ]
        if masked:
            conn.execute(update, masked)
            changed += len(masked)
        last = tuple(rows[-1][:-1])


def _after(key_columns: list[sa.ColumnClause[Any]], last: tuple[Any, ...]) -> sa.ColumnElement[bool]:
    """The rows after ``last`` in key order (a row value comparison, as PostgreSQL and SQLite 3.15+ both read it)."""
    if len(key_columns) == 1:
        single: sa.ColumnElement[bool] = key_columns[0] > last[0]
        return single
    return sa.tuple_(*key_columns) > sa.tuple_(*(sa.literal(value) for value in last))


def downgrade() -> None:
    """Nothing to undo: what was masked is not kept anywhere (the columns stay masked, as the older code reads them
    all the same)."""
