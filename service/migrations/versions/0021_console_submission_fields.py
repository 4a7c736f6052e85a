"""console_submissions.fields_sha256: what a form's first POST asked, so a key re-sent asking otherwise is refused

A one-time key (a form's token, or a script's ``Idempotency-Key``) sent again for the same order and form address
was answered with how its first POST went, whatever it asked this time: a script that re-used its key for another
action of the order (a stop after an approval, say) was told "sent before", with the approval's result, as if its
stop had been seen. The SHA-256 of the first POST's fields (all but its CSRF token and its key) is kept, and a key
re-sent with other fields is refused, acting on nothing. Rows from before this revision have none and are
compared as before.

Revision ID: 0021
Revises: 0020
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the column (null for the forms already sent)."""
    with op.batch_alter_table("console_submissions") as batch:
        batch.add_column(sa.Column("fields_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    """Drop it: a key re-sent is answered with its first POST's result whatever it asks."""
    with op.batch_alter_table("console_submissions") as batch:
        batch.drop_column("fields_sha256")
