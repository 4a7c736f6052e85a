"""The decision writer: batches behind the requests, outages waited out, and with a spool nothing lost and memory
bounded during a long one."""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from model.requests import Decision
from service.api.spool import DecisionSpool
from service.api.store import DecisionWriter, Store, decision_row, decision_spool, make_engine, sqlite_file
from service.migrations import upgrade
from tests.factories import make_request


def _stored_row(decision_id: str) -> dict[str, Any]:
    request = make_request()
    decision = Decision.model_validate(
        {
            "decision_id": decision_id, "model_version": "rules-only", "action": "stop",
            "execute_at": request.event_time, "retryable": False, "retry_probability": 0.0,
            "expected_success": 0.0, "propensity": 1.0, "alternatives": [], "reasons": [], "rules_applied": [],
        }
    )  # fmt: skip
    return decision_row(request, decision)


def _stored_ids(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.scalars(sa.text("SELECT decision_id FROM decisions")))


@pytest.fixture
def engine(tmp_path: Path) -> Any:
    engine = make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    upgrade(engine)
    yield engine
    engine.dispose()


def _unavailable() -> sa.exc.OperationalError:
    return sa.exc.OperationalError("INSERT", {}, Exception("could not connect to server"))


class _FlakyStore(Store):
    """Fails the first ``outages`` inserts (a database briefly away), and always refuses the row ``bad_id``."""

    def __init__(self, engine: sa.Engine, outages: int, bad_id: str) -> None:
        super().__init__(engine)
        self.outages = outages
        self.bad_id = bad_id

    def insert_decisions(self, rows: Any) -> int:
        rows = list(rows)
        if self.outages > 0:
            self.outages -= 1
            raise sa.exc.OperationalError("INSERT", {}, Exception("database is locked"))
        if any(row["decision_id"] == self.bad_id for row in rows):
            raise ValueError("row refused")
        return super().insert_decisions(rows)


class _SwitchedStore(Store):
    """A database that is away while ``down`` is set, raising what ``away`` makes."""

    def __init__(self, engine: sa.Engine, away: Any = _unavailable) -> None:
        super().__init__(engine)
        self.down = threading.Event()
        self.away = away

    def insert_decisions(self, rows: Any) -> int:
        if self.down.is_set():
            raise self.away()
        return super().insert_decisions(rows)


def _wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _spooled_rows(directory: Path, prefix: str = "pending") -> list[dict[str, Any]]:
    return [
        orjson.loads(line) for path in directory.glob(f"{prefix}-*.jsonl") for line in path.read_bytes().splitlines()
    ]


def test_a_duplicate_id_in_one_batch_is_stored_once_and_the_rest_of_the_batch_with_it(engine: sa.Engine) -> None:
    store = Store(engine)
    assert store.insert_decisions([_stored_row("dec_a"), _stored_row("dec_b"), _stored_row("dec_a")]) == 2
    assert _stored_ids(engine) == ["dec_a", "dec_b"]


def test_the_decision_writer_waits_out_an_outage_and_loses_only_a_row_the_database_refuses(
    engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    writer = DecisionWriter(_FlakyStore(engine, outages=12, bad_id="dec_bad"), interval=0.01, max_backoff=0.02)
    with caplog.at_level(logging.WARNING, logger="winback.api"):
        for decision_id in ("dec_1", "dec_bad", "dec_2"):
            writer.put(_stored_row(decision_id))
        writer.close()
    assert _stored_ids(engine) == ["dec_1", "dec_2"]
    lost = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert lost == ["could not store decision dec_bad; it is lost"]


def test_with_a_spool_a_row_the_database_refuses_is_kept_with_its_reason(
    engine: sa.Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = decision_spool(tmp_path / "spool")
    writer = DecisionWriter(_FlakyStore(engine, outages=2, bad_id="dec_bad"), interval=0.01, spool=spool)
    with caplog.at_level(logging.WARNING, logger="winback.api"):
        for decision_id in ("dec_1", "dec_bad", "dec_2"):
            writer.put(_stored_row(decision_id))
        writer.flush()
        writer.close()
    assert _stored_ids(engine) == ["dec_1", "dec_2"]
    (kept,) = _spooled_rows(tmp_path / "spool", "rejected")
    assert kept["row"]["decision_id"] == "dec_bad"
    assert kept["reason"] == "ValueError: row refused"
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == [f"the database refused decision dec_bad; kept in {spool.rejected_path}"]


def test_a_long_outage_moves_the_backlog_to_disk_and_stores_it_when_the_database_is_back(
    engine: sa.Engine, tmp_path: Path
) -> None:
    store = _SwitchedStore(engine)
    store.down.set()
    spool_dir = tmp_path / "spool"
    spool = decision_spool(spool_dir)
    writer = DecisionWriter(store, interval=0.01, max_backoff=0.05, max_batch=5, spool=spool, max_queued=5)
    rows = {decision_id: _stored_row(decision_id) for decision_id in (f"dec_{i:03d}" for i in range(60))}
    ids = list(rows)
    for row in rows.values():
        writer.put(row)
        time.sleep(0.001)

    # Memory holds at most one batch in hand and the bound in the queue; the rest is on disk.
    def spooled() -> bool:
        on_disk = {
            row["decision_id"] for prefix in ("pending", "replaying") for row in _spooled_rows(spool_dir, prefix)
        }
        return len(on_disk) >= len(ids) - 10 and writer._queue.qsize() <= 5

    _wait_for(spooled)
    assert _stored_ids(engine) == []

    store.down.clear()
    writer.flush()
    _wait_for(lambda: _stored_ids(engine) == ids)
    writer.close()
    assert list((tmp_path / "spool").iterdir()) == []
    # The rows came back from disk as they went in: the same timestamps, request and answer.
    stored, expected = store.get_decision("dec_000"), rows["dec_000"]
    assert stored is not None
    for column in ("event_time", "execute_at", "created_at"):  # SQLite hands datetimes back naive (UTC)
        assert stored[column] == expected[column].replace(tzinfo=None)
    assert stored["request"] == orjson.loads(expected["request_json"])
    assert stored["answer"] == orjson.loads(expected["answer_json"])


def test_shutdown_during_an_outage_spools_at_once_and_the_next_start_stores_the_rows(
    engine: sa.Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = _SwitchedStore(engine)
    store.down.set()
    writer = DecisionWriter(store, interval=0.01, max_backoff=0.05, spool=decision_spool(tmp_path / "spool"))
    for decision_id in ("dec_1", "dec_2", "dec_3"):
        writer.put(_stored_row(decision_id))
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="winback.api"):
        writer.close(timeout=30.0)
    assert time.monotonic() - started < 5.0  # no waiting out the outage: the rows are safe on disk
    assert not [record for record in caplog.records if "lost" in record.getMessage()]
    assert sorted(row["decision_id"] for row in _spooled_rows(tmp_path / "spool")) == ["dec_1", "dec_2", "dec_3"]

    store.down.clear()
    restarted = DecisionWriter(store, interval=0.01, spool=decision_spool(tmp_path / "spool"))
    _wait_for(lambda: _stored_ids(engine) == ["dec_1", "dec_2", "dec_3"])
    restarted.close()
    assert list((tmp_path / "spool").iterdir()) == []


class _HungStore(Store):
    """A database that hangs while ``hung`` is set (a network partition, a locked table): inserts neither return
    nor fail until it is cleared."""

    def __init__(self, engine: sa.Engine) -> None:
        super().__init__(engine)
        self.hung = threading.Event()
        self.released = threading.Event()

    def insert_decisions(self, rows: Any) -> int:
        if self.hung.is_set():
            self.released.wait()
        return super().insert_decisions(rows)


def test_a_hung_database_moves_the_backlog_and_at_shutdown_everything_held_to_the_spool(
    engine: sa.Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = _HungStore(engine)
    store.hung.set()
    spool_dir = tmp_path / "spool"
    writer = DecisionWriter(
        store, interval=0.01, max_batch=5, spool=decision_spool(spool_dir), max_queued=10, stall_seconds=0.2
    )
    ids = [f"dec_{i:03d}" for i in range(40)]
    with caplog.at_level(logging.WARNING, logger="winback.api"):
        for decision_id in ids[:5]:
            writer.put(_stored_row(decision_id))
        _wait_for(lambda: writer._busy_since is not None)  # the writer is inside its insert, held there
        time.sleep(0.3)
        for decision_id in ids[5:30]:
            writer.put(_stored_row(decision_id))
        # The writer cannot act; the backlog past the bound went to disk all the same.
        _wait_for(lambda: len(_spooled_rows(spool_dir)) >= 10 and writer._queue.qsize() < 10)
        for decision_id in ids[30:]:
            writer.put(_stored_row(decision_id))
        started = time.monotonic()
        writer.close(timeout=30.0)
        assert time.monotonic() - started < 5.0
    assert not [record for record in caplog.records if "lost" in record.getMessage()]
    assert {row["decision_id"] for row in _spooled_rows(spool_dir)} == set(ids)

    # The hung insert finally commits its rows, and the next start stores the spool: each decision once.
    store.released.set()
    _wait_for(lambda: not writer._thread.is_alive())
    store.hung.clear()
    restarted = DecisionWriter(store, interval=0.01, spool=decision_spool(spool_dir))
    _wait_for(lambda: _stored_ids(engine) == ids)
    restarted.close()


class _SlowStore(Store):
    """A healthy database taking ``delay`` seconds per insert."""

    def __init__(self, engine: sa.Engine, delay: float) -> None:
        super().__init__(engine)
        self.delay = delay

    def insert_decisions(self, rows: Any) -> int:
        time.sleep(self.delay)
        return super().insert_decisions(rows)


def test_new_decisions_are_stored_during_a_long_spool_replay_and_shutdown_leaves_its_rest_for_the_next_start(
    engine: sa.Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool_dir = tmp_path / "spool"
    old_ids = [f"dec_old_{i:04d}" for i in range(1000)]
    left = decision_spool(spool_dir)
    left.append([_stored_row(decision_id) for decision_id in old_ids])
    left.close()  # left by a spool that is gone
    writer = DecisionWriter(_SlowStore(engine, 0.02), interval=0.01, max_batch=5, spool=decision_spool(spool_dir))
    _wait_for(lambda: len(_stored_ids(engine)) >= 5)
    writer.put(_stored_row("dec_new"))
    _wait_for(lambda: "dec_new" in _stored_ids(engine), timeout=2.0)  # a batch of the file, not the whole file
    with caplog.at_level(logging.WARNING, logger="winback.api"):
        writer.close()
    assert not [record for record in caplog.records if "lost" in record.getMessage()]
    assert len(_stored_ids(engine)) < len(old_ids) + 1  # the replay stopped at shutdown

    restarted = DecisionWriter(Store(engine), interval=0.01, max_batch=500, spool=decision_spool(spool_dir))
    _wait_for(lambda: _stored_ids(engine) == sorted([*old_ids, "dec_new"]))
    restarted.close()
    assert list(spool_dir.iterdir()) == []


def _pool_ran_dry() -> sa.exc.TimeoutError:
    # Every pooled connection held elsewhere: SQLAlchemy's pool timeout, not a row's fault.
    return sa.exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached, connection timed out")


def test_a_pool_that_ran_dry_is_an_outage_not_a_refusal(engine: sa.Engine, tmp_path: Path) -> None:
    store = _SwitchedStore(engine, away=_pool_ran_dry)
    store.down.set()
    writer = DecisionWriter(store, interval=0.01, max_backoff=0.05, spool=decision_spool(tmp_path / "spool"))
    writer.put(_stored_row("dec_1"))
    time.sleep(0.2)
    store.down.clear()
    writer.flush()
    writer.close()
    assert _stored_ids(engine) == ["dec_1"]
    assert not list((tmp_path / "spool").glob("rejected-*"))


def test_shutdown_mid_replay_puts_every_claimed_file_back(engine: sa.Engine, tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    for name in ("a", "b", "c"):
        left = decision_spool(spool_dir)
        left.append([_stored_row(f"dec_{name}{i}") for i in range(20)])
        left.close()  # left by spools that are gone
    writer = DecisionWriter(_SlowStore(engine, 0.05), interval=0.01, max_batch=5, spool=decision_spool(spool_dir))
    _wait_for(lambda: len(_stored_ids(engine)) >= 5)
    writer.close()
    waiting = sorted(path.name.split("-")[0] for path in spool_dir.iterdir())
    assert waiting == ["pending", "pending", "pending"]  # none left as this live process's "replaying" file
    restarted = DecisionWriter(Store(engine), interval=0.01, spool=decision_spool(spool_dir))
    _wait_for(lambda: len(_stored_ids(engine)) == 60)
    restarted.close()


def test_shutdown_spools_the_row_a_batch_is_gathering_around_when_the_writer_does_not_finish(
    engine: sa.Engine, tmp_path: Path
) -> None:
    # A long gather interval stands for a writer that is busy but not inside an insert at shutdown.
    spool_dir = tmp_path / "spool"
    writer = DecisionWriter(_HungStore(engine), interval=1.5, spool=decision_spool(spool_dir), stall_seconds=5.0)
    writer.put(_stored_row("dec_first"))
    _wait_for(lambda: writer._in_hand != [])
    writer.put(_stored_row("dec_second"))
    writer.close(timeout=0.3)
    assert sorted(row["decision_id"] for row in _spooled_rows(spool_dir)) == ["dec_first", "dec_second"]
    _wait_for(lambda: not writer._thread.is_alive())  # it then stores them too: storing skips ids stored twice


def test_a_spool_file_is_claimed_once_and_another_live_spool_s_files_are_left_alone(tmp_path: Path) -> None:
    columns = ("created_at",)
    first, second = DecisionSpool(tmp_path, columns), DecisionSpool(tmp_path, columns)
    first.append([{"decision_id": "dec_1", "created_at": "2026-12-03T10:00:00+00:00"}])
    gone = DecisionSpool(tmp_path, columns)
    gone.append([{"decision_id": "dec_0"}])
    gone.close()  # its owner is gone: its file is anyone's
    # Files without an owner lock file (written before owner locks existed): their owner is taken to be gone.
    (tmp_path / "replaying-999999999-dead-0.jsonl").write_bytes(b'{"decision_id": "dec_2"}\n')
    (tmp_path / "pending-999999999-dead.jsonl").write_bytes(b'{"decision_id": "dec_4"}\n')
    claimed = second.claim()
    assert second.claim() == []
    rows = [row for path in claimed for batch in second.read(path, 10) for row in batch]
    assert sorted(row["decision_id"] for row in rows) == ["dec_0", "dec_2", "dec_4"]
    # The first spool's file stayed its own, though it is in the same process; and the second's are left to it.
    (mine,) = first.claim()
    ((first_row,),) = first.read(mine, 10)
    assert first_row["decision_id"] == "dec_1"
    assert first_row["created_at"].isoformat() == "2026-12-03T10:00:00+00:00"
    for path in [*claimed, mine]:
        DecisionSpool.release(path)
    first.close()
    second.close()
    assert list(tmp_path.iterdir()) == []


def test_a_line_cut_short_by_a_crash_is_kept_aside_and_the_rest_is_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = DecisionSpool(tmp_path, ())
    spool.append([{"decision_id": "dec_1"}])
    with spool.pending_path.open("ab") as handle:
        handle.write(b'{"decision_id": "dec_2", "answ')
    (path,) = spool.claim()
    with caplog.at_level(logging.ERROR, logger="winback.api"):
        rows = [row for batch in spool.read(path, 10) for row in batch]
    assert rows == [{"decision_id": "dec_1"}]
    (kept,) = _spooled_rows(tmp_path, "rejected")
    assert kept["row"] == {"line": '{"decision_id": "dec_2", "answ'}
    assert "is not a decision row" in caplog.records[0].getMessage()


@pytest.mark.parametrize("fate", ["deleted", "replaced"])
def test_a_sqlite_file_deleted_or_replaced_under_the_writer_sends_every_decision_since_to_the_spool(
    fate: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, spool_dir = tmp_path / "w.db", tmp_path / "spool"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    writer = DecisionWriter(Store(engine), interval=0.01, max_backoff=0.05, spool=decision_spool(spool_dir))
    writer.put(_stored_row("dec_1"))
    writer.flush()
    if fate == "deleted":
        path.unlink()  # SQLite would go on writing into the unlinked file
    else:
        other = make_engine(f"sqlite:///{tmp_path / 'other.db'}")
        upgrade(other)
        other.dispose()
        os.replace(tmp_path / "other.db", path)
    with caplog.at_level(logging.ERROR, logger="winback.api"):
        for decision_id in ("dec_2", "dec_3"):
            writer.put(_stored_row(decision_id))
            writer.flush()
        writer.close()
    assert sorted(row["decision_id"] for row in _spooled_rows(spool_dir)) == ["dec_2", "dec_3"]
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert f"the SQLite database file {path} was deleted or replaced" in errors[0]
    if fate == "deleted":
        assert not path.exists()  # no empty database made in its place
    else:
        replacement = make_engine(f"sqlite:///{path}")
        assert not {"dec_2", "dec_3"} & set(_stored_ids(replacement))  # nor rows put into another one
        replacement.dispose()

    # The database restored (here: a new one migrated) and the scorer restarted: the spooled decisions are stored.
    restored = make_engine(f"sqlite:///{path}")
    upgrade(restored)
    restarted = DecisionWriter(Store(restored), interval=0.01, spool=decision_spool(spool_dir))
    # (A file replaced beside the old one's -wal file takes that log's pages with it, dec_1 here: SQLite's hazard.)
    _wait_for(lambda: {"dec_2", "dec_3"} <= set(_stored_ids(restored)))
    restarted.close()
    restored.dispose()
    assert list(spool_dir.iterdir()) == []


def test_the_writer_watches_only_a_file_based_sqlite_database(tmp_path: Path) -> None:
    assert sqlite_file(f"sqlite:///{tmp_path / 'w.db'}") == tmp_path / "w.db"
    assert sqlite_file("sqlite:///relative.db") == Path.cwd() / "relative.db"
    for url in ("sqlite://", "sqlite:///:memory:", "sqlite:///file:shared?mode=memory&uri=true",
                "postgresql+psycopg://u:p@db/winback"):  # fmt: skip
        assert sqlite_file(url) is None


def test_a_database_file_that_cannot_be_examined_is_an_outage_not_a_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # stat() failing otherwise than "no such file" (permissions, a stale handle) sent every row to rejected-*.jsonl,
    # which is never retried: the rows are kept for a replay like any outage's.
    path, spool_dir = tmp_path / "w.db", tmp_path / "spool"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    writer = DecisionWriter(Store(engine), interval=0.01, max_backoff=0.05, spool=decision_spool(spool_dir))
    real_stat = Path.stat
    looked = threading.Event()

    def stat(self: Path, *args: Any, **kwargs: Any) -> os.stat_result:
        if self == path:
            looked.set()
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    with caplog.at_level(logging.WARNING, logger="winback.api"):
        writer.put(_stored_row("dec_1"))
        writer.put(_stored_row("dec_2"))
        assert looked.wait(10)
        _wait_for(lambda: any("database unavailable" in record.getMessage() for record in caplog.records))
    monkeypatch.undo()  # the path can be examined again: the outage is over
    writer.flush()
    assert {"dec_1", "dec_2"} <= set(_stored_ids(engine))
    assert _spooled_rows(spool_dir, prefix="rejected") == []
    writer.close()
    engine.dispose()


def test_a_new_sqlite_database_and_its_wal_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    # It holds the customers' requests (phone numbers, e-mail addresses): a default umask made it world-readable.
    database = tmp_path / "winback.db"
    engine = make_engine(f"sqlite:///{database}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))
        conn.execute(sa.text("INSERT INTO t VALUES (1)"))
    modes = {path.name: stat.S_IMODE(os.stat(path).st_mode) for path in tmp_path.iterdir()}
    engine.dispose()
    assert modes["winback.db"] == 0o600
    assert modes["winback.db-wal"] == 0o600
    existing = tmp_path / "operator.db"
    existing.touch(mode=0o640)
    make_engine(f"sqlite:///{existing}").dispose()
    assert stat.S_IMODE(os.stat(existing).st_mode) == 0o640  # an operator's own choice is kept
