"""Alembic environment: runs the migrations on the connection (or URL) handed over by ``service.migrations.upgrade``."""

from __future__ import annotations

from alembic import context

from service.api.store import metadata

config = context.config
target_metadata = metadata


def _run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:  # pragma: no cover - only the programmatic upgrade() is supported
        raise RuntimeError("run the migrations through service.migrations.upgrade(database_url)")
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


_run_online()
