"""Durable storage of the decisions served and the outcomes reported (SQLAlchemy 2.0 Core; SQLite or PostgreSQL).

Decisions are written behind the request (a writer thread flushes them in batches, so a decision costs the
request no database round trip); outcomes are written before the answer, idempotently by ``decision_id``.
``export_history`` turns both into the history files of CONTRACT.md section 3 for the feedback loop.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import sqlalchemy as sa
from pydantic import BaseModel
from pydantic_core import PydanticSerializationError
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from model.requests import Decision, DecisionRequest, invalid_text_field
from model.rules import RuleInputError
from service.api.spool import DecisionSpool
from service.personal_data import mask_addresses_in

metadata = sa.MetaData()

decisions = sa.Table(
    "decisions",
    metadata,
    sa.Column("decision_id", sa.String(64), primary_key=True),
    sa.Column("merchant_id", sa.String(128), nullable=False),
    sa.Column("order_id", sa.String(256), nullable=False),
    sa.Column("event_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("model_version", sa.String(64), nullable=False),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("strategy", sa.String(32), nullable=True),
    sa.Column("connector", sa.String(128), nullable=True),
    sa.Column("channel", sa.String(16), nullable=True),
    sa.Column("execute_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("propensity", sa.Float, nullable=False),
    sa.Column("request_json", sa.Text, nullable=False),
    sa.Column("answer_json", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_decisions_merchant_order", "merchant_id", "order_id"),
)

# An outcome is a merchant's statement about its own decision: keyed per merchant, so an outcome that arrives before
# its decision is stored (the writer batches them) cannot take the place of the decision's own merchant's outcome.
outcomes = sa.Table(
    "outcomes",
    metadata,
    sa.Column("decision_id", sa.String(64), nullable=False),
    sa.Column("merchant_id", sa.String(128), nullable=False),
    sa.Column("order_id", sa.String(256), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("body_json", sa.Text, nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_outcomes_merchant_order", "merchant_id", "order_id"),
    sa.PrimaryKeyConstraint("merchant_id", "decision_id", name="pk_outcomes_merchant_id_decision_id"),  # as 0004
)

log = logging.getLogger("winback.api")

#: What a database that is away (down, unreachable, locked, or every pooled connection held) raises: an outage to
#: wait out or spool, never a row's own fault.
DATABASE_AWAY = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)

#: libpq connection parameters of every PostgreSQL engine: seconds to connect, TCP keepalives (idle, interval,
#: count) and milliseconds unacknowledged data may wait (tcp_user_timeout).
POSTGRES_CONNECT_ARGS = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 3,
    "keepalives_count": 3,
    "tcp_user_timeout": 20_000,
}


def decision_spool(directory: str | Path) -> DecisionSpool:
    """A spool in ``directory`` for ``decisions`` rows (their datetime columns read back as datetimes)."""
    columns = tuple(column.name for column in decisions.columns if isinstance(column.type, sa.DateTime))
    return DecisionSpool(directory, columns)


class DatabaseFileGoneError(RuntimeError):
    """The SQLite database file a process started with was deleted or replaced under it."""


def sqlite_file(url: str | sa.URL) -> Path | None:
    """The absolute path of a file-based SQLite database URL; None for another database or an in-memory one."""
    parsed = sa.make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:") or str(parsed.query.get("uri", "")).lower() in ("true", "1"):
        return None  # a URI filename (maybe a shared in-memory one): not a plain path
    return Path(database).absolute()


def _file_identity(path: Path) -> tuple[int, int] | None:
    """The file's (device, inode); None when there is none. A path that cannot be examined (permissions, a stale
    network handle) is the database being unavailable, as SQLite would report it: an outage, never a refusal."""
    try:
        found = path.stat()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise sa.exc.OperationalError(f"stat {path}", None, error) from error
    return found.st_dev, found.st_ino


class SqliteFileWatch:
    """Whether a file-based SQLite database's file is still the one this process started with.

    SQLite goes on writing into a file deleted (or replaced) under it, where every row is lost. :meth:`check`
    compares the path's device and inode with the file's when the watch began (or, when there was no file yet,
    when it first saw one); once they differ, the file is taken as gone for good, until the process restarts
    (connecting again would create an empty file in its place). A URL that is not a SQLite file is never gone.
    """

    def __init__(self, url: str | sa.URL) -> None:
        self.path = sqlite_file(url)
        self._identity = None if self.path is None else _file_identity(self.path)
        self.gone = False

    def check(self) -> bool:
        """Whether the file is gone (deleted or replaced); True from then on."""
        if self.path is None or self.gone:
            return self.gone
        now = _file_identity(self.path)
        if self._identity is None:
            self._identity = now  # created by the engine since the watch began
        elif now != self._identity:
            self.gone = True
        return self.gone

    def ensure_present(self) -> None:
        """DatabaseFileGoneError when :meth:`check` finds the file gone."""
        if self.check():
            raise DatabaseFileGoneError(
                f"the SQLite database file {self.path} was deleted or replaced while this process ran"
            )


class OutcomeConflictError(ValueError):
    """The decision already has an outcome with another order, status or instant."""


class ForeignDecisionError(PermissionError):
    """The decision belongs to another merchant."""


class OutcomeOrderMismatchError(ValueError):
    """The outcome names another order than the decision it reports on."""


class OutcomeBeforeFailureError(ValueError):
    """The outcome's occurred_at is before the failure its decision was made for."""


class _ServedDecision(NamedTuple):
    """What an outcome is checked against: the decision's merchant, order and failure time."""

    merchant_id: str
    order_id: str
    event_time: datetime


@dataclass(frozen=True)
class StoredOutcome:
    decision_id: str
    merchant_id: str
    order_id: str
    status: str
    occurred_at: datetime
    body: dict[str, Any]
    recorded_at: datetime
    #: Whether the decision was found among the decisions served (stored, or on its way): an outcome of one never
    #: found is kept, but cannot reach the exported history (its request is not known).
    decision_found: bool = True


def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything stored is UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _body_json(body: Mapping[str, Any]) -> str:
    # The standard library's encoder, not orjson: an extra may hold an integer beyond 64 bits.
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def masked_outcome(body: Mapping[str, Any]) -> dict[str, Any]:
    """An outcome as it is stored: its ``error_message`` (the connector's decline text, which the history export
    writes for the model to train on) with e-mail addresses and phone numbers masked (``mask_addresses_in``), as
    an executor's attempt's is (``service.executor.store.MaskedText``): connectors echo the customer's."""
    message = body.get("error_message")
    if not isinstance(message, str):
        return dict(body)
    return {**body, "error_message": mask_addresses_in(message)}


_SECRET_QUERY_KEYS = frozenset({"password", "passwd", "sslpassword"})


def shown_url(url: str | sa.URL) -> str:
    """A database URL fit for a message or a log line: its password hidden, in ``user:pw@`` and in the query."""
    parsed = sa.make_url(url)
    query = {key: ("***" if key.lower() in _SECRET_QUERY_KEYS else value) for key, value in parsed.query.items()}
    return parsed.set(query=query).render_as_string(hide_password=True).replace("%2A%2A%2A", "***")  # unquoted


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and cross-thread use (the writer thread)."""
    if url.startswith("sqlite"):
        database = sa.make_url(url).database
        sqlite_folder_ready(database, url)
        _create_private(database)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    # The writer treats a database that fails within libpq's bounds as an outage (spool), an outcome as a 503.
    return sa.create_engine(url, pool_pre_ping=True, connect_args=server_connect_args(url))


def sqlite_folder_ready(database: str | None, url: str) -> None:
    """Create the folder of the SQLite file ``database`` (of ``url``) when it does not exist, saying so in a log
    line: `sqlite:///./state/winback.db` in a new checkout was refused ("its folder ... does not exist") where a
    newcomer expects the embedded default to make its place, as the MLflow store's folder is made. A new folder
    holds a new, empty database, hence a warning: a mistyped path is seen at once. UnusableDatabaseError, in one
    line naming the folder, when it cannot be created (no permission, a file in the way)."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return  # in memory, or a URI filename SQLite resolves itself
    folder = Path(database).absolute().parent
    if folder.is_dir():
        return
    try:
        folder.mkdir(parents=True)
    except FileExistsError:
        if not folder.is_dir():  # another process made it meanwhile, or a file holds its name
            raise _folder_not_created(url, folder, "a file holds its name") from None
        return
    except OSError as error:
        raise _folder_not_created(url, folder, error.strerror or str(error)) from None
    log.warning("created the folder %s for the SQLite database %s, which starts empty", folder, shown_url(url))


def _folder_not_created(url: str, folder: Path, why: str) -> Exception:
    from service.migrations import UnusableDatabaseError

    return UnusableDatabaseError(
        f"the SQLite database {shown_url(url)} cannot be created: its folder {folder} cannot be created ({why}); "
        "create the folder or name another path"
    )


def _create_private(database: str | None) -> None:
    """Create a SQLite database file that does not exist yet readable by its owner only (its -wal and -shm files
    take the same mode): it holds the customers' requests, phone numbers and e-mail addresses included, which a
    default umask leaves readable by every local user."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    try:
        os.close(os.open(database, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass  # an existing database keeps the mode its operator gave it
    except OSError:
        pass  # a file SQLite cannot create either: its own error names it when the engine connects


def server_connect_args(url: str) -> dict[str, Any]:
    """Driver arguments for a database server's ``url``: libpq's own bounds for PostgreSQL through psycopg (which
    passes them on), so a server that does not answer the connect, or a link that dies under an open connection
    (a partition: the kernel would retry for ~15 minutes), fails within seconds as an OperationalError; none
    for another driver."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() == "psycopg":
        return dict(POSTGRES_CONNECT_ARGS)
    return {}


def stored_json(body: BaseModel) -> str:
    """A request or outcome as JSON, as it is stored; RuleInputError naming the field when a string in it is not
    valid Unicode (a lone surrogate: JSON can escape one, UTF-8 cannot hold it), so it is a 422 before anything is
    decided or stored."""
    try:
        return body.model_dump_json()
    except PydanticSerializationError as error:
        field = invalid_text_field(body) or "body"
        raise RuleInputError(f"{field} is not valid Unicode (it holds a lone UTF-16 surrogate)", field) from error


def decision_row(
    request: DecisionRequest,
    decision: Decision,
    created_at: datetime | None = None,
    answer_json: str | None = None,
    request_json: str | None = None,
) -> dict[str, Any]:
    """The ``decisions`` row of one decision served; ``answer_json`` and ``request_json`` are the decision and the
    request already serialised, if they are."""
    return {
        "decision_id": decision.decision_id,
        "merchant_id": request.merchant_id,
        "order_id": request.order_id,
        "event_time": request.event_time,
        "model_version": decision.model_version,
        "action": decision.action.value,
        "strategy": decision.strategy.value if decision.strategy else None,
        "connector": decision.connector,
        "channel": decision.channel.value if decision.channel else None,
        "execute_at": decision.execute_at,
        "propensity": decision.propensity,
        "request_json": stored_json(request) if request_json is None else request_json,
        "answer_json": decision.model_dump_json() if answer_json is None else answer_json,
        "created_at": created_at or datetime.now(UTC),
    }


class _DecisionInsert(NamedTuple):
    """The ``decisions`` INSERT compiled once for a dialect, and how a row becomes its DBAPI parameters."""

    sql: str
    #: (column name, the dialect's own bind processor or None), in the order the statement takes them.
    columns: tuple[tuple[str, Callable[[Any], Any] | None], ...]
    positional: bool
    #: Whether the statement itself skips a decision_id already stored (``ON CONFLICT (decision_id) DO NOTHING``).
    skips_stored: bool

    @classmethod
    def for_dialect(cls, dialect: sa.Dialect) -> _DecisionInsert:
        names = [column.key for column in decisions.columns]
        statement = _insert_skipping_stored(dialect)
        skips_stored = statement is not None
        compiled = (statement if statement is not None else decisions.insert()).compile(
            dialect=dialect, column_keys=names
        )
        order = compiled.positiontup if dialect.positional and compiled.positiontup else names
        processors: dict[str, Callable[[Any], Any] | None] = {}
        for column in decisions.c:
            process: Callable[[Any], Any] | None = column.type.dialect_impl(dialect).bind_processor(dialect)
            if isinstance(column.type, sa.DateTime) and process is not None:
                process = _as_datetime_text(process)
            processors[column.key] = process
        return cls(str(compiled), tuple((name, processors[name]) for name in order), dialect.positional, skips_stored)

    def parameters(self, row: Mapping[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        """``row`` as the DBAPI takes it: each value through its column's bind processor (SQLite's DATETIME
        formatting), as ``conn.execute(decisions.insert(), rows)`` would pass it; a column missing is NULL."""
        get = row.get
        if self.positional:
            return tuple([get(name) if process is None else process(get(name)) for name, process in self.columns])
        return {name: get(name) if process is None else process(get(name)) for name, process in self.columns}


def _insert_skipping_stored(dialect: sa.Dialect) -> sa.Insert | None:
    """``INSERT ... ON CONFLICT (decision_id) DO NOTHING`` on PostgreSQL and SQLite (3.24 and later); None on another
    database. Only a stored decision_id is skipped: a row any other constraint refuses (a NULL) still fails the
    batch, so it is stored row by row and the refused row kept in the spool, never dropped without a word (which
    SQLite's ``INSERT OR IGNORE`` would do)."""
    if dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(decisions).on_conflict_do_nothing(index_elements=[decisions.c.decision_id])
    if dialect.name == "sqlite" and sqlite3.sqlite_version_info >= (3, 24):
        from sqlalchemy.dialects import sqlite

        return sqlite.insert(decisions).on_conflict_do_nothing(index_elements=[decisions.c.decision_id])
    return None


#: Two and three digits, zero-padded, by their number: a datetime's fields put together from these cost ~3.6k
#: instructions, where %-formatting them costs ~13k and ``isoformat`` ~14k (callgrind, Python 3.11).
_TWO_DIGITS = tuple(f"{number:02d}" for number in range(100))
_THREE_DIGITS = tuple(f"{number:03d}" for number in range(1000))


def _datetime_text(value: datetime) -> str:
    """``value``'s wall-clock time as ``YYYY-MM-DD HH:MM:SS.ffffff`` (its offset left out)."""
    two, year, microsecond = _TWO_DIGITS, value.year, value.microsecond
    return (
        f"{two[year // 100]}{two[year % 100]}-{two[value.month]}-{two[value.day]} "
        f"{two[value.hour]}:{two[value.minute]}:{two[value.second]}."
        f"{_THREE_DIGITS[microsecond // 1000]}{_THREE_DIGITS[microsecond % 1000]}"
    )


#: Instants ``_as_datetime_text`` checks a dialect's processor against: the smallest year, a year of three digits,
#: no microsecond, an offset other than UTC.
_DATETIME_PROBES = (
    datetime(1, 1, 1),
    datetime(999, 12, 31, 23, 59, 59, 999_999),
    datetime(2026, 3, 29, 1, 30, tzinfo=UTC),
    datetime.fromisoformat("2026-11-01T23:59:59.000001+05:30"),
)


def _as_datetime_text(process: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The dialect's bind processor of a DateTime column ``process``, or, when it writes a datetime as
    ``_datetime_text`` does (SQLite's DATETIME in its default storage format), one that writes a datetime with
    ``_datetime_text`` and hands anything else to ``process``: SQLite's builds a dict of the seven fields and
    %-formats it, ~17k instructions a value (callgrind), a third of storing a decision row. The text stored is
    the same (old and new rows read alike)."""
    if any(process(probe) != _datetime_text(probe) for probe in _DATETIME_PROBES):
        return process  # another storage format

    def datetime_text(value: Any) -> Any:
        # The exact type only: a subclass (pandas' Timestamp) may format itself otherwise.
        return _datetime_text(value) if type(value) is datetime else process(value)

    return datetime_text


class Store:
    """Repository over the ``decisions`` and ``outcomes`` tables."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.file_watch = SqliteFileWatch(engine.url)
        self._decision_insert = _DecisionInsert.for_dialect(engine.dialect)

    def insert_decisions(self, rows: Iterable[dict[str, Any]]) -> int:
        """Insert decision rows; a row whose decision_id is already stored (or earlier in ``rows``) is skipped."""
        unique: dict[str, dict[str, Any]] = {}
        for row in rows:
            unique.setdefault(row["decision_id"], row)
        batch = list(unique.values())
        if not batch:
            return 0
        insert = self._decision_insert
        if insert.skips_stored:
            # One statement: a SELECT of the ids already stored, built anew for every batch, cost ~20k instructions
            # a row at 95 rows a batch and ~130k at 5, half of storing the row (callgrind).
            with self.engine.begin() as conn:
                stored = conn.exec_driver_sql(insert.sql, [insert.parameters(row) for row in batch]).rowcount
            return int(stored)
        with self.engine.begin() as conn:
            existing = set(
                conn.scalars(
                    sa.select(decisions.c.decision_id).where(
                        decisions.c.decision_id.in_([row["decision_id"] for row in batch])
                    )
                )
            )
            fresh = [row for row in batch if row["decision_id"] not in existing]
            if fresh:
                # The statement compiled once and each row's parameters built here, passed to the DBAPI's
                # executemany as they are: SQLAlchemy's own per-row parameter processing cost ~40k instructions a
                # row (callgrind, 95 rows a batch), more than SQLite's insert of the row.
                conn.exec_driver_sql(insert.sql, [insert.parameters(row) for row in fresh])
        return len(fresh)

    def ping(self) -> bool:
        """Whether the database answers a trivial query now."""
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except DATABASE_AWAY:
            return False
        return True

    def get_decision(self, decision_id: str) -> dict[str, Any] | None:
        """The stored decision row (request and answer as parsed JSON), or None."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(decisions).where(decisions.c.decision_id == decision_id)).mappings().first()
        if row is None:
            return None
        result = dict(row)
        result["request"] = orjson.loads(result.pop("request_json"))
        result["answer"] = orjson.loads(result.pop("answer_json"))
        return result

    def decisions_for_order(self, merchant_id: str, order_id: str) -> list[dict[str, Any]]:
        """The answers served for one order, oldest first (for the executor and the console)."""
        query = (
            sa.select(decisions.c.answer_json)
            .where(decisions.c.merchant_id == merchant_id, decisions.c.order_id == order_id)
            .order_by(decisions.c.created_at)
        )
        with self.engine.connect() as conn:
            return [orjson.loads(text) for text in conn.scalars(query)]

    def _outcome(self, conn: sa.Connection, merchant_id: str, decision_id: str) -> StoredOutcome | None:
        row = (
            conn.execute(
                sa.select(outcomes).where(outcomes.c.merchant_id == merchant_id, outcomes.c.decision_id == decision_id)
            )
            .mappings()
            .first()
        )
        if row is None:
            return None
        return StoredOutcome(
            decision_id=row["decision_id"],
            merchant_id=row["merchant_id"],
            order_id=row["order_id"],
            status=row["status"],
            occurred_at=_utc(row["occurred_at"]),
            body=json.loads(row["body_json"]),
            recorded_at=_utc(row["recorded_at"]),
        )

    def record_outcome(
        self,
        merchant_id: str,
        body: Mapping[str, Any],
        decision_grace: float = 0.0,
        in_flight: Callable[[str], Mapping[str, Any] | None] | None = None,
    ) -> StoredOutcome:
        """Store a merchant's outcome once per decision_id; the same outcome again (order_id, status, occurred_at;
        extras may differ) returns the stored one unchanged.

        ``body`` is the outcome as JSON-ready values with at least decision_id, order_id, status and occurred_at
        (an ISO timestamp). Raises OutcomeConflictError for another status or instant under a stored decision_id, and
        ForeignDecisionError when the decision is stored as another merchant's, OutcomeOrderMismatchError when it was
        served for another order, OutcomeBeforeFailureError when it occurred before that decision's failure. Decisions
        are stored a moment behind their answers: a decision not stored yet is
        waited for up to ``decision_grace`` seconds, so an outcome posted right after it is checked all the same.
        One still not stored is looked up among the rows still on their way (``in_flight``: this process's decision
        writer, which may be waiting out a database blip); one found nowhere (a decision_id never served, or one
        another process holds) is kept under the merchant that sent it, and never stands in for another merchant's.
        """
        self.check_file()  # before connecting: that would create an empty file in its place
        decision_id = str(body["decision_id"])
        query = sa.select(decisions.c.merchant_id, decisions.c.order_id, decisions.c.event_time).where(
            decisions.c.decision_id == decision_id
        )
        deadline = time.monotonic() + decision_grace
        served: _ServedDecision | None
        while True:
            with self.engine.connect() as conn:
                found = conn.execute(query).first()
            served = None if found is None else _ServedDecision(found.merchant_id, found.order_id, found.event_time)
            if served is not None or time.monotonic() >= deadline:
                break
            time.sleep(min(0.05, max(deadline - time.monotonic(), 0.0)))
        if served is None and in_flight is not None:
            row = in_flight(decision_id)
            if row is not None:
                served = _ServedDecision(str(row["merchant_id"]), str(row["order_id"]), row["event_time"])
        if served is not None and served.merchant_id != merchant_id:
            raise ForeignDecisionError(f"decision {decision_id!r} was not served to merchant {merchant_id!r}")
        if served is not None and served.order_id != str(body["order_id"]):
            raise OutcomeOrderMismatchError(
                f"decision {decision_id!r} was served for order {served.order_id!r}, not {body['order_id']!r}"
            )
        occurred_at = _utc(datetime.fromisoformat(str(body["occurred_at"])))
        if served is not None and occurred_at < _utc(served.event_time):
            with self.engine.connect() as conn:
                if self._outcome(conn, merchant_id, decision_id) is not None:
                    # Stored while its decision was on its way (unchecked then): the same outcome again answers it.
                    return self._same_or_conflict(merchant_id, body)
            raise OutcomeBeforeFailureError(
                f"occurred_at {occurred_at.isoformat()} is before the failure decision {decision_id!r} was made for "
                f"({_utc(served.event_time).isoformat()})"
            )
        row = {
            "decision_id": decision_id,
            "merchant_id": merchant_id,
            "order_id": str(body["order_id"]),
            "status": str(body["status"]),
            "occurred_at": occurred_at,
            "body_json": _body_json(masked_outcome(body)),
            "recorded_at": datetime.now(UTC),
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(outcomes.insert().values(**row))
        except IntegrityError:
            pass  # already stored (maybe by a concurrent request): compare below
        self.check_file()  # gone before the commit: the outcome went with it, the caller must send it again
        return replace(self._same_or_conflict(merchant_id, body), decision_found=served is not None)

    def check_file(self) -> None:
        """DatabaseFileGoneError when the SQLite file this store started with was deleted or replaced."""
        self.file_watch.ensure_present()

    def _same_or_conflict(self, merchant_id: str, body: Mapping[str, Any]) -> StoredOutcome:
        with self.engine.connect() as conn:
            stored = self._outcome(conn, merchant_id, str(body["decision_id"]))
        if stored is None:  # pragma: no cover - an insert failed for a reason other than the key
            raise RuntimeError(f"could not store the outcome of decision {body['decision_id']!r}")
        # The same outcome is the same order, status and instant; extras (txn_id, amounts, ...) may differ between
        # a client's retries, and the first post's are the ones kept.
        differing = [name for name in ("order_id", "status") if str(body[name]) != str(stored.body.get(name))]
        if _utc(datetime.fromisoformat(str(body["occurred_at"]))) != stored.occurred_at:
            differing.append("occurred_at")
        if differing:
            raise OutcomeConflictError(
                f"decision {stored.decision_id!r} already has an outcome with another {' and '.join(differing)} "
                f"(status {stored.status!r} at {stored.occurred_at.isoformat()})"
            )
        return stored


class DecisionWriter:
    """Writes decision rows behind the requests: a daemon thread inserts whatever queued, every ``interval`` s.

    While the database is away the writer waits, doubling the wait up to ``max_backoff``. With a ``spool``, rows
    never pile up in memory beyond ``max_queued`` and are never lost: past that backlog, or at shutdown during an
    outage, they move to the spool on disk and are stored when the database is back (or at the next start); rows
    the database refuses are kept in the spool's rejected file. Without one, they wait in memory and whatever is
    unstored at shutdown is reported lost.

    A database that hangs instead of refusing (a network partition, a table locked for maintenance) holds the
    writer inside one insert, where it cannot act: once an insert has not returned for ``stall_seconds``, the
    backlog past ``max_queued`` is spooled beside it by the thread that queues, and ``close`` spools whatever the
    writer still holds. Spooled rows may be stored twice over (a hung insert can still commit): storing skips a
    decision_id already stored. A long spool replay yields to new decisions after every batch and stops at
    shutdown (the rest of the file stays for the next start).

    A file-based SQLite database whose file is deleted or replaced while the writer runs would go on taking rows
    into the unlinked file, where they are lost: the writer looks at the path after every insert, and once it
    names another file (or none) it logs so, stores nothing more until the process restarts (it neither writes
    to the old file nor creates an empty one) and moves every row since, the batch that found it included, to the
    spool (without one, they wait in memory).

    ``flush()`` blocks until everything queued so far is stored (or spooled); ``close()`` flushes and stops the
    thread.
    """

    def __init__(
        self,
        store: Store,
        interval: float = 0.2,
        max_batch: int = 500,
        max_backoff: float = 5.0,
        *,
        spool: DecisionSpool | None = None,
        max_queued: int = 10_000,
        stall_seconds: float = 10.0,
    ) -> None:
        self.store = store
        self.interval = interval
        self.max_batch = max_batch
        self.max_backoff = max_backoff
        self.spool = spool
        self.max_queued = max_queued
        self.stall_seconds = stall_seconds
        self._in_hand: list[dict[str, Any]] = []  # rows taken off the queue and not yet stored or spooled
        self._busy_since: float | None = None  # when the insert in progress started (None: none is)
        self._spilling_aside = threading.Lock()  # one spill beside a hung writer at a time
        self._next_aside = 0.0  # after a spool that could not be written, no spill beside the writer before this
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._closing = threading.Event()
        self._wake = threading.Event()  # ends an outage wait early: the backlog passed the bound, or closing
        self._stop = False
        self._next_probe = 0.0  # when an idle writer holding spooled rows may next ask whether the database is back
        self._file_gone_reported = False  # the SQLite file gone (store.file_watch) is logged once
        self._thread = threading.Thread(target=self._run, name="winback-decision-writer", daemon=True)
        self._thread.start()

    def put(self, row: dict[str, Any]) -> None:
        """Queue one decision row (never blocks)."""
        self._queue.put_nowait(row)
        if self.spool is not None and self._queue.qsize() >= self.max_queued:
            self._wake.set()
            if self._stalled() and not self._spilling_aside.locked() and time.monotonic() >= self._next_aside:
                # The writer is stuck inside an insert and cannot spill: a helper thread does (disk, not here).
                threading.Thread(target=self._spill_aside, name="winback-decision-spill", daemon=True).start()

    def _stalled(self) -> bool:
        """Whether the insert in progress has not returned for ``stall_seconds``."""
        since = self._busy_since
        return since is not None and time.monotonic() - since >= self.stall_seconds

    def _spill_aside(self) -> None:
        """Move the backlog to the spool while the writer is held by a hung insert (its own rows stay in hand)."""
        if self.spool is None or not self._spilling_aside.acquire(blocking=False):
            return
        try:
            # Until the backlog is under the bound: rows queued while this one spilled would wait for the next put.
            while self._queue.qsize() >= self.max_queued and self._stalled():
                if not self._spill_backlog_aside():
                    break
        finally:
            self._spilling_aside.release()

    def _spill_backlog_aside(self) -> bool:
        rows, taken, stop_requested = self._queued()
        moved = False
        try:
            assert self.spool is not None  # for mypy: only called with one
            self.spool.append(rows)
            moved = True
        except OSError:
            self._next_aside = time.monotonic() + self.max_backoff  # not again on every put: once per backoff
            log.exception("could not write the decision spool; %d decisions keep waiting in memory", len(rows))
            for row in rows:
                self._queue.put_nowait(row)
        else:
            since = self._busy_since
            waited = 0.0 if since is None else time.monotonic() - since
            log.warning("the database has not answered for %.1f s: %d decisions moved to the spool %s",
                        waited, len(rows), self.spool.pending_path)  # fmt: skip
        if stop_requested:  # behind the rows queued again: the writer stores them before it stops
            self._queue.put_nowait(None)
        self._finish(taken)
        return moved

    def _queued(self, limit: int | None = None) -> tuple[list[dict[str, Any]], int, bool]:
        """Up to ``limit`` (default: all) queued rows: (rows, items taken, whether the stop request was among
        them). Any thread may take them; the writer's stop flag is left to the caller."""
        rows: list[dict[str, Any]] = []
        taken, stop_requested = 0, False
        while limit is None or len(rows) < limit:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            taken += 1
            if item is None:
                stop_requested = True
            else:
                rows.append(item)
        return rows, taken, stop_requested

    def in_flight(self, decision_id: str) -> dict[str, Any] | None:
        """The row of ``decision_id`` if it is queued or in hand here, not stored yet (None otherwise)."""
        for row in list(self._in_hand):
            if row["decision_id"] == decision_id:
                return row
        with self._queue.mutex:  # a consistent view of the queue's deque (put and get take the same lock)
            queued = list(self._queue.queue)
        return next((row for row in queued if row is not None and row["decision_id"] == decision_id), None)

    def _take(self, first: dict[str, Any] | None) -> tuple[list[dict[str, Any]], int]:
        """``first`` (taken off the queue; None is the stop request) and whatever else is queued, up to
        ``max_batch`` rows: (rows, items taken)."""
        self._stop |= first is None
        rows, taken = self._drain(self.max_batch - (first is not None))
        return ([first, *rows] if first is not None else rows), taken + 1

    def _drain(self, limit: int | None = None) -> tuple[list[dict[str, Any]], int]:
        """Up to ``limit`` (default: all) queued rows, and how many items were taken; taking the stop request
        sets ``_stop`` (the writer thread only)."""
        rows, taken, stop_requested = self._queued(limit)
        if stop_requested:
            self._stop = True
        return rows, taken

    def _run(self) -> None:
        self._replay_spool()
        while not self._stop:
            try:
                first = self._queue.get(timeout=self.interval)
            except queue.Empty:
                if self.spool is not None and self.spool.holds_rows and self._database_back():
                    self._replay_spool()  # idle, and the database is back for what was spooled
                continue
            if first is not None:
                self._in_hand = [first]  # in hand while the batch gathers (close() spools what is in hand)
                time.sleep(self.interval)  # let a batch gather: one transaction per interval, not per decision
            rows, taken = self._take(first)
            try:
                stored = self._store(rows)
            finally:
                self._finish(taken)
            if stored and self.spool is not None and self.spool.holds_rows:
                self._replay_spool()  # the database took this batch: it is back for what was spooled too

    def _database_back(self) -> bool:
        """Whether the database answers (asked at most every ``max_backoff`` seconds)."""
        if self.store.file_watch.gone:
            return False  # not asked: connecting would create an empty file in its place
        now = time.monotonic()
        if now < self._next_probe:
            return False
        self._next_probe = now + self.max_backoff
        return self.store.ping()

    def _replay_spool(self) -> None:
        """Store the rows waiting in the spool (this process's and any left by a process that is gone)."""
        if self.spool is None or self._closing.is_set():  # at shutdown the spool waits for the next start
            return
        try:
            claimed = self.spool.claim()
            for index, path in enumerate(claimed):
                count, all_stored = 0, True
                for rows in self.spool.read(path, self.max_batch):
                    if self._closing.is_set():
                        # Shutting down: this file and the ones not started go back to waiting, so the next start
                        # on this folder stores them; the rows already stored are skipped then.
                        for waiting in claimed[index:]:
                            self.spool.unclaim(waiting)
                        log.warning("shutting down: %d decisions of the spool file %s stored; it and %d more spool "
                                    "files wait for the next start", count, path.name,
                                    len(claimed) - index - 1)  # fmt: skip
                        return
                    count += len(rows)
                    all_stored &= self._store(rows)
                    all_stored &= self._store_queued()  # new decisions do not wait for the whole file
                self.spool.release(path)
                if all_stored:
                    log.warning("stored %d decisions kept in the spool file %s", count, path.name)
                else:
                    log.warning("the database went away again while storing the spool file %s; its %d decisions "
                                "are back in the spool", path.name, count)  # fmt: skip
        except OSError:
            log.exception("could not read the decision spool in %s; its files stay for the next try",
                          self.spool.directory)  # fmt: skip

    def _store_queued(self) -> bool:
        """Store up to ``max_batch`` rows queued now (between two batches of a spool replay); as ``_store``."""
        rows, taken = self._drain(self.max_batch)
        try:
            return self._store(rows) if rows else True
        finally:
            self._finish(taken)

    def _store(self, rows: list[dict[str, Any]], *, nested: bool = False) -> bool:
        """Insert ``rows`` in one transaction, waiting out database outages; if the database refuses the batch
        itself, row by row, so one bad row costs only itself. A row that cannot be stored is kept in the spool's
        rejected file, or without a spool logged as lost, by id. False when rows went to the spool instead.
        ``nested``: one row of a batch being stored one by one (the batch stays in hand)."""
        if not nested:
            self._in_hand = rows
        try:
            return self._insert_through_outages(rows)
        except Exception as error:
            log.warning("could not store a batch of %d decisions (%s); storing them one by one",
                        len(rows), type(error).__name__)  # fmt: skip
            all_stored = True
            for row in list(rows):  # as it was: rows spilled meanwhile join ``rows`` only while in memory
                single = [row]
                try:
                    all_stored &= self._insert_through_outages(single)
                except Exception as row_error:
                    if len(single) == 1:
                        self._refused(row, row_error)
                    else:  # the backlog joined it during an outage the spool could not take
                        all_stored &= self._store(single, nested=True)
            return all_stored
        finally:
            if not nested:
                self._in_hand = []

    def _refused(self, row: dict[str, Any], error: Exception) -> None:
        decision_id = row.get("decision_id")
        if self.spool is None:
            log.error("could not store decision %s; it is lost", decision_id, exc_info=error)
            return
        try:
            kept = self.spool.reject(row, f"{type(error).__name__}: {error}")
        except OSError:
            log.exception("could not store decision %s nor keep it in the spool; it is lost", decision_id)
            return
        log.error("the database refused decision %s; kept in %s", decision_id, kept, exc_info=error)

    def _insert_through_outages(self, rows: list[dict[str, Any]]) -> bool:
        """Insert ``rows``; while the database is away (an OperationalError: down, unreachable, locked), wait and
        try again, doubling the wait up to ``max_backoff``, or move the rows to the spool (``_spill``: False).
        Any other error is the rows' own and is raised."""
        wait, outages = self.interval, 0
        while True:
            self._busy_since = time.monotonic()
            try:
                self._check_database_file()
                self.store.insert_decisions(rows)
                self._check_database_file()  # gone before this commit: the rows went with it
            except (*DATABASE_AWAY, DatabaseFileGoneError) as error:
                outages += 1
                # Pooled connections opened during the outage may stay unusable after it (seen: SQLite connections
                # opened while the file was read-only kept failing every other insert): start afresh.
                self.store.engine.dispose()
                if outages == 1 or outages % 20 == 0:
                    log.warning("database unavailable (%s); %d decisions wait, trying again every %.1f s at most",
                                type(error).__name__, len(rows) + self._queue.qsize(), self.max_backoff)  # fmt: skip
                self._busy_since = None
                if self._spill(rows):
                    return False
                self._wake.wait(wait)
                self._wake.clear()
                wait = min(wait * 2, self.max_backoff)
                continue
            finally:
                self._busy_since = None
            if outages:
                log.warning("database back after %d failed tries; %d decisions stored", outages, len(rows))
            return True

    def _check_database_file(self) -> None:
        """``Store.check_file``; the first time the file is found gone, logged and the engine disposed (it is never
        connected again: that would create an empty file there)."""
        try:
            self.store.check_file()
        except DatabaseFileGoneError:
            if not self._file_gone_reported:
                self._file_gone_reported = True
                self.store.engine.dispose()
                where = "to the spool " + str(self.spool.directory) if self.spool is not None else "in memory"
                log.error("the SQLite database file %s was deleted or replaced while this process ran: nothing more "
                          "is written to it, decisions since go %s; restore the database there (or migrate a new "
                          "one) and restart, the next start stores them", self.store.file_watch.path,
                          where)  # fmt: skip
            raise

    def _spill(self, rows: list[dict[str, Any]]) -> bool:
        """During an outage, once the backlog passed ``max_queued`` or the writer is closing, move ``rows`` and
        the whole backlog to the spool; whether they moved. The backlog joins ``rows`` (in place: the caller
        stores what it holds), so a spool that cannot be written leaves every row waiting in hand."""
        if self.spool is None:
            return False
        if not (self._closing.is_set() or self.store.file_watch.gone or self._queue.qsize() >= self.max_queued):
            return False
        backlog, taken = self._drain()
        rows.extend(backlog)
        self._finish(taken)
        try:
            self.spool.append(rows)
        except OSError:
            if rows is not self._in_hand:  # one row of a refused batch: the backlog waits in hand with it
                self._in_hand.extend(backlog)
            log.exception("could not write the decision spool; %d decisions keep waiting in memory", len(rows))
            return False
        log.warning("database unavailable: %d decisions moved to the spool %s", len(rows), self.spool.pending_path)
        return True

    def _finish(self, taken: int) -> None:
        for _ in range(taken):
            self._queue.task_done()

    def flush(self) -> None:
        """Block until every row queued before this call is stored (or spooled)."""
        self._queue.join()

    def close(self, timeout: float = 30.0) -> None:
        """Flush and stop the writer thread. With a spool, what the database cannot take now is spooled at
        once, and what the writer still holds after ``stall_seconds`` (an insert that hangs) is spooled from
        here; without one, what could not be stored within ``timeout`` seconds is reported lost. Then the spool
        gives up its files (:meth:`DecisionSpool.close`): whatever this process left there is any scorer's to
        store."""
        try:
            self._shut_down(timeout)
        finally:
            if self.spool is not None:
                self.spool.close()

    def _shut_down(self, timeout: float) -> None:
        if not self._thread.is_alive():
            return
        self._queue.put(None)
        if self.spool is None:
            self._thread.join(timeout=timeout)
            if self._thread.is_alive():
                log.error("the database did not take them within %.0f s: %d decisions not stored at shutdown are "
                          "lost", timeout, len(self._in_hand) + max(self._queue.qsize() - 1, 0))  # fmt: skip
            return
        self._closing.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and not self._stalled() and time.monotonic() < deadline:
            self._thread.join(timeout=min(0.2, max(deadline - time.monotonic(), 0.0)))
        if not self._thread.is_alive():
            return
        # Held by an insert that hangs (or, failing that, not done within ``timeout``): what it holds and what
        # waits behind it go to the spool from here; should the insert still commit, storing skips those ids.
        stalled = self._stalled()
        with self._spilling_aside:
            queued, taken, _ = self._queued()
            self._queue.put_nowait(None)  # the writer's stop request stays queued for it
            self._finish(taken)
            rows = [*self._in_hand, *queued]
            try:
                self.spool.append(rows)
            except OSError:
                log.exception("the decision writer did not finish at shutdown and the spool cannot be written: %d "
                              "decisions not stored are lost", len(rows))  # fmt: skip
                return
        cause = "the database did not answer" if stalled else "the decision writer did not finish"
        log.warning("%s within %.1f s at shutdown: %d decisions moved to the spool %s",
                    cause, self.stall_seconds if stalled else timeout, len(rows), self.spool.pending_path)  # fmt: skip
