"""A real PostgreSQL outage under the decision writer: the backlog goes to the spool on disk, shutdown spools the
rest at once, and the next start stores every decision, each once."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from service.api.store import DecisionWriter, Store, decision_spool, make_engine
from service.migrations import upgrade
from tests.unit.test_decision_writer import _spooled_rows, _stored_ids, _stored_row, _wait_for


def _allow_connections(admin: sa.Engine, database: str, allowed: bool) -> None:
    with admin.connect() as conn:
        conn.execute(sa.text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {str(allowed).lower()}'))
        if not allowed:  # and end the sessions already open: the database is gone for this process
            conn.execute(
                sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
                {"name": database},
            )


def test_a_postgresql_outage_loses_no_decision(
    postgres_url: str, postgres_admin_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    database = sa.make_url(postgres_url).database
    assert database is not None
    admin = sa.create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    engine = make_engine(postgres_url)
    upgrade(engine)
    spool_dir = tmp_path / "spool"
    rows = [_stored_row(f"dec_{i:03d}") for i in range(60)]
    writer = DecisionWriter(
        Store(engine), interval=0.02, max_backoff=0.2, spool=decision_spool(spool_dir), max_queued=10
    )
    try:
        for row in rows[:5]:
            writer.put(row)
        writer.flush()
        assert _stored_ids(engine) == [row["decision_id"] for row in rows[:5]]

        _allow_connections(admin, database, allowed=False)
        for row in rows[5:]:
            writer.put(row)
            time.sleep(0.002)
        _wait_for(lambda: len(_spooled_rows(spool_dir)) >= 30)  # the writer does not replay while it is down
        with caplog.at_level(logging.ERROR, logger="winback.api"):
            writer.close()
        assert not [record for record in caplog.records if "lost" in record.getMessage()]
        assert {row["decision_id"] for row in _spooled_rows(spool_dir)} == {row["decision_id"] for row in rows[5:]}
    finally:
        _allow_connections(admin, database, allowed=True)
        engine.dispose()

    engine = make_engine(postgres_url)
    restarted = DecisionWriter(Store(engine), interval=0.02, spool=decision_spool(spool_dir))
    try:
        _wait_for(lambda: _stored_ids(engine) == [row["decision_id"] for row in rows], timeout=30)
    finally:
        restarted.close()
        engine.dispose()
        admin.dispose()
    assert list(spool_dir.iterdir()) == []
