"""The console's durable state: agents (each bound to one merchant), their sessions, the audit log, the failed
sign-ins the throttle counts and the forms agents sent (with their results, for re-posts and the result's flash).

The tables live in the API's ``metadata``; ``service/migrations/versions/0003_console.py`` creates the first three,
``0011_sign_in_failures.py`` the failed sign-ins, ``0019_console_submissions.py`` the forms sent.
"""

from __future__ import annotations

import sqlalchemy as sa

from service.api.store import metadata
from service.executor.store import BigId

agents = sa.Table(
    "console_agents",
    metadata,
    sa.Column("agent_id", BigId, primary_key=True, autoincrement=True),
    # Sign-in names are unique across merchants, so the sign-in form needs no merchant field.
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("merchant_id", sa.String(128), nullable=False),
    sa.Column("password_hash", sa.String(512), nullable=False),
    sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("password_changed_at", sa.DateTime(timezone=True), nullable=False),
)

sessions = sa.Table(
    "console_sessions",
    metadata,
    # Only a hash of the session token is stored: a leaked table cannot be replayed as cookies.
    sa.Column("token_sha256", sa.String(64), primary_key=True),
    sa.Column("agent_id", BigId, nullable=False),
    sa.Column("merchant_id", sa.String(128), nullable=False),
    sa.Column("csrf_token", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    sa.Index("ix_console_sessions_agent", "agent_id"),
)

audit_log = sa.Table(
    "console_audit",
    metadata,
    sa.Column("audit_id", BigId, primary_key=True, autoincrement=True),
    sa.Column("merchant_id", sa.String(128), nullable=False),
    sa.Column("order_id", sa.String(256), nullable=False),
    sa.Column("agent_id", BigId, nullable=False),
    sa.Column("agent_name", sa.String(128), nullable=False),
    # send_link | approve | retry | stop | override | resolve_charge
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("detail", sa.Text, nullable=False),  # what was asked, in words
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("result", sa.String(16), nullable=False),  # requested | done | refused | failed | unchanged
    sa.Column("rules", sa.Text, nullable=True),  # names of the hard rules that refused it, comma-separated
    sa.Column("message", sa.Text, nullable=True),
    sa.Column("decision_id", sa.String(64), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_console_audit_order", "merchant_id", "order_id"),
)

sign_in_failures = sa.Table(
    "console_sign_in_failures",
    metadata,
    sa.Column("failure_id", BigId, primary_key=True, autoincrement=True),
    # SHA-256 of "name:<agent name>" or "ip:<client address>": what an attacker typed is not kept, nor addresses.
    sa.Column("key_sha256", sa.String(64), nullable=False),
    sa.Column("failed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_console_sign_in_failures_key", "key_sha256", "failed_at"),
    sa.Index("ix_console_sign_in_failures_at", "failed_at"),
)

submissions = sa.Table(
    "console_submissions",
    metadata,
    sa.Column("submission_id", BigId, primary_key=True, autoincrement=True),
    # SHA-256 of the one-time key the POST carried (its form's token, or a script's Idempotency-Key with its agent):
    # a second POST of the same form finds the first one's row here, and is answered with its result instead of
    # acting again.
    sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("agent_id", BigId, nullable=False),
    sa.Column("order_id", sa.String(256), nullable=False),
    sa.Column("form_path", sa.String(1024), nullable=False),  # the address the form was posted to
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("result", sa.String(16), nullable=True),  # done | refused | failed; null while being carried out
    sa.Column("message", sa.Text, nullable=True),
    sa.Column("rules", sa.Text, nullable=True),  # comma-separated, as in the audit log
    # The one-time key of the result's flash, until the order's page shows it (null: shown, or none waits).
    sa.Column("flash_key", sa.String(64), nullable=True),
    # SHA-256 of the first POST's fields but its CSRF token and key (null before 0021): a key re-sent with other
    # fields (another action, channel or reason) is refused rather than answered with the first one's result.
    sa.Column("fields_sha256", sa.String(64), nullable=True),
    sa.Index("ix_console_submissions_created", "created_at"),
)
