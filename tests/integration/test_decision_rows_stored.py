"""The decision writer's insert stores every column exactly as SQLAlchemy's own ``decisions.insert()`` does, on
SQLite and on PostgreSQL: ``Store.insert_decisions`` passes each row to the DBAPI's executemany in the form the
dialect's bind processors give it, instead of letting SQLAlchemy process every row's parameters (which cost more
than the insert itself)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.dialects import sqlite

from model.requests import Decision
from service.api import store as store_module
from service.api.store import Store, _as_datetime_text, decision_row, decision_spool, decisions, make_engine
from service.executor.bench import drop_postgres, fresh_postgres
from service.migrations import upgrade
from tests.factories import make_request

_IST = timezone(timedelta(hours=5, minutes=30))
_WEST = timezone(timedelta(hours=-7))


def _rows() -> list[dict[str, Any]]:
    """Decisions of every shape: each action, strategies, connectors and channels present or null, instants in
    UTC and in other offsets, with and without microseconds, text beyond ASCII, a propensity of 1 and a tiny one."""
    shapes: list[dict[str, Any]] = [
        {"action": "retry", "strategy": "retry_same", "connector": "stripe", "propensity": 0.8125},
        {"action": "retry", "strategy": "cascade", "connector": "razorpay", "propensity": 1e-9},
        {"action": "retarget", "channel": "whatsapp", "propensity": 1.0},
        {"action": "retarget", "channel": "email", "propensity": 0.3333333333333333},
        {"action": "stop", "propensity": 1},
    ]
    instants = [
        datetime(2026, 11, 1, 10, 15, tzinfo=UTC),
        datetime(2026, 11, 1, 23, 59, 59, 999999, tzinfo=_IST),
        datetime(2027, 2, 28, 0, 0, 0, 1, tzinfo=_WEST),
    ]
    rows = []
    for index in range(40):
        shape, instant = shapes[index % len(shapes)], instants[index % len(instants)]
        request = make_request(
            order_id=f"ord_ü{index}_注文",
            event_time=instant.isoformat(),
            customer={"id": f"cus_{index}", "country": "IN"},
        )
        decision = Decision.model_validate(
            {
                "decision_id": f"dec_{index:03d}", "model_version": "m-7 (café)", "execute_at": instant
                + timedelta(minutes=index, microseconds=index), "retryable": shape["action"] == "retry",
                "retry_probability": 0.5, "expected_success": 0.25, "alternatives": [],
                "reasons": ["fonds insuffisants — réessai"], "rules_applied": [], **shape,
            }
        )  # fmt: skip
        created_at = instants[(index + 1) % len(instants)] + timedelta(seconds=index)
        rows.append(decision_row(request, decision, created_at=created_at if index % 4 else None))
    return rows


def _stored_by_sqlalchemy(engine: sa.Engine, rows: list[dict[str, Any]]) -> None:
    """The reference: the rows through SQLAlchemy's own INSERT of the ``decisions`` table."""
    with engine.begin() as conn:
        conn.execute(decisions.insert(), rows)


def _columns_as_stored(engine: sa.Engine) -> list[tuple[Any, ...]]:
    """Every column of every row as the DBAPI reads it back, with its Python type; on SQLite each value's storage
    class, on PostgreSQL each value's text as the server renders it, too."""
    names = [column.name for column in decisions.columns]
    if engine.dialect.name == "sqlite":
        shown = ", ".join(f"typeof({name})" for name in names)
    else:
        shown = ", ".join(f"{name}::text" for name in names)
    with engine.connect() as conn:
        result = conn.exec_driver_sql(f"SELECT {', '.join(names)}, {shown} FROM decisions ORDER BY 1")
        return [tuple((value, type(value).__name__) for value in row) for row in result]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def two_databases(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[sa.Engine, sa.Engine]]:
    """Two fresh, migrated databases of one kind: SQLite files, then PostgreSQL databases."""
    created: list[tuple[str, sa.Engine]] = []
    if request.param == "sqlite":
        urls = [f"sqlite:///{tmp_path / 'reference.db'}", f"sqlite:///{tmp_path / 'stored.db'}"]
    else:
        admin_url: str = request.getfixturevalue("postgres_admin_url")
        created = [fresh_postgres(admin_url) for _ in range(2)]
        urls = [url for url, _ in created]
    engines = [make_engine(url) for url in urls]
    try:
        for engine in engines:
            upgrade(engine)
        yield engines[0], engines[1]
    finally:
        for engine in engines:
            engine.dispose()
        for url, admin in created:
            drop_postgres(admin, url)


@pytest.mark.parametrize("batch", [1, 7, 40])
def test_a_decision_row_is_stored_exactly_as_sqlalchemys_own_insert_stores_it(
    two_databases: tuple[sa.Engine, sa.Engine], batch: int
) -> None:
    reference, stored = two_databases
    rows = _rows()
    _stored_by_sqlalchemy(reference, rows)
    store = Store(stored)
    for start in range(0, len(rows), batch):
        assert store.insert_decisions(rows[start : start + batch]) == len(rows[start : start + batch])
    expected = _columns_as_stored(reference)
    assert len(expected) == len(rows)
    assert _columns_as_stored(stored) == expected


def test_a_decision_row_read_back_from_the_spool_is_stored_as_before(
    two_databases: tuple[sa.Engine, sa.Engine], tmp_path: Path
) -> None:
    spool = decision_spool(tmp_path / "spool")
    try:
        spool.append(_rows())
        (path,) = spool.claim()
        rows = [row for batch in spool.read(path, 500) for row in batch]
    finally:
        spool.close()
    reference, stored = two_databases
    _stored_by_sqlalchemy(reference, rows)
    assert Store(stored).insert_decisions(rows) == len(rows)
    assert _columns_as_stored(stored) == _columns_as_stored(reference)


def test_a_batch_of_decisions_is_one_executemany_of_a_statement_sqlalchemy_does_not_process_row_by_row(
    tmp_path: Path,
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    upgrade(engine)
    inserts: list[tuple[bool, bool, int]] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _seen(_conn: Any, _cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if statement.startswith("INSERT INTO decisions"):
            inserts.append((executemany, context.compiled is None, len(parameters)))

    try:
        assert Store(engine).insert_decisions(_rows()) == 40
    finally:
        engine.dispose()
    # (executemany, no compiled statement whose bind processors SQLAlchemy runs per row, rows)
    assert inserts == [(True, True, 40)]


def _statements_of(engine: sa.Engine) -> list[tuple[str, bool]]:
    """(the statement's first word, executemany) of each statement ``engine`` runs from now on."""
    seen: list[tuple[str, bool]] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _seen(_conn: Any, _cursor: Any, statement: str, _params: Any, _context: Any, executemany: bool) -> None:
        seen.append((statement.split(None, 1)[0].upper(), executemany))

    return seen


def test_a_decision_already_stored_is_kept_once_as_first_stored_by_one_insert_statement(
    two_databases: tuple[sa.Engine, sa.Engine],
) -> None:
    """A decision_id stored before (a spooled row stored twice over: a hung insert can still commit) is skipped
    by the INSERT itself (ON CONFLICT (decision_id) DO NOTHING), not by a SELECT of the ids first, which cost
    ~20% of storing a row at 95 rows a batch and half of it at 5 (callgrind)."""
    engine, _ = two_databases
    rows = _rows()
    store = Store(engine)
    assert store.insert_decisions(rows[:20]) == 20
    first = _columns_as_stored(engine)
    again = [{**row, "answer_json": '{"stored": "again"}', "propensity": 0.5} for row in rows[10:20]]
    statements = _statements_of(engine)
    assert store.insert_decisions([*again, *rows[20:], rows[25]]) == 20
    assert statements == [("INSERT", True)]
    stored = _columns_as_stored(engine)
    assert len(stored) == 40
    assert [row for row in stored if row in first] == first  # the ten stored before are as first stored


def test_on_a_sqlite_without_on_conflict_the_ids_stored_are_looked_up_first_and_skipped_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite before 3.24 has no ON CONFLICT clause (nor does every other database): a SELECT finds the ids."""
    monkeypatch.setattr(store_module.sqlite3, "sqlite_version_info", (3, 23, 1))
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        upgrade(engine)
        rows = _rows()
        store = Store(engine)
        assert "ON CONFLICT" not in store._decision_insert.sql
        assert store.insert_decisions(rows[:20]) == 20
        statements = _statements_of(engine)
        assert store.insert_decisions([*rows[10:], rows[25]]) == 20
        assert statements == [("SELECT", False), ("INSERT", True)]
        assert len(_columns_as_stored(engine)) == 40
    finally:
        engine.dispose()


def test_a_row_a_column_constraint_refuses_fails_its_batch_and_nothing_of_it_is_stored(
    two_databases: tuple[sa.Engine, sa.Engine],
) -> None:
    """Only a stored decision_id is skipped: SQLite's INSERT OR IGNORE would drop a row with a NULL in a NOT NULL
    column without a word; the batch must fail, so the writer stores it row by row and keeps the refused one."""
    engine, _ = two_databases
    rows = _rows()
    store = Store(engine)
    assert store.insert_decisions(rows[:5]) == 5
    with pytest.raises(sa.exc.IntegrityError):
        store.insert_decisions([*rows[3:10], {**rows[10], "merchant_id": None}, *rows[11:15]])
    assert len(_columns_as_stored(engine)) == 5


_SQLITE_DATETIME = sqlite.DATETIME().bind_processor(sqlite.dialect())
_OFFSETS = st.builds(timezone, st.timedeltas(min_value=timedelta(hours=-23, minutes=-59),
                                             max_value=timedelta(hours=23, minutes=59)))  # fmt: skip


@given(st.one_of(st.datetimes(), st.datetimes(timezones=_OFFSETS), st.dates(), st.none()))
def test_a_datetime_is_written_as_sqlalchemys_sqlite_datetime_writes_it(value: datetime | date | None) -> None:
    assert _SQLITE_DATETIME is not None
    assert _as_datetime_text(_SQLITE_DATETIME)(value) == _SQLITE_DATETIME(value)


def test_a_value_sqlites_datetime_refuses_is_refused_the_same() -> None:
    assert _SQLITE_DATETIME is not None
    with pytest.raises(TypeError, match="SQLite DateTime type only accepts"):
        _as_datetime_text(_SQLITE_DATETIME)("2026-11-01 10:15:00")


def test_the_datetime_columns_on_sqlite_are_not_formatted_by_sqlalchemys_processor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's DATETIME processor %-formats a dict of the seven fields: ~17k instructions a value, a third of storing
    a row (callgrind). The store writes the same text (the tests above) without it."""
    formatted: list[object] = []
    own = sqlite.DATETIME.bind_processor

    def counting(self: sqlite.DATETIME, dialect: sa.Dialect) -> Any:
        process = own(self, dialect)
        assert process is not None
        return lambda value: formatted.append(value) or process(value)

    monkeypatch.setattr(sqlite.DATETIME, "bind_processor", counting)
    engine = make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    try:
        upgrade(engine)
        store = Store(engine)
        formatted.clear()  # the store checks the processor's text once, as it starts
        assert store.insert_decisions(_rows()) == 40
    finally:
        engine.dispose()
    assert formatted == []
