"""Durable storage of the decisions served and the outcomes reported (SQLAlchemy 2.0 Core; SQLite or PostgreSQL).

Decisions are written behind the request (a writer thread flushes them in batches, so a decision costs the
request no database round trip); outcomes are written before the answer, idempotently by ``decision_id``.
``export_history`` turns both into the history files of CONTRACT.md section 3 for the feedback loop.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from model.requests import Decision, DecisionRequest

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


class OutcomeConflictError(ValueError):
    """The decision already has an outcome with a different body."""


class ForeignDecisionError(PermissionError):
    """The decision belongs to another merchant."""


class OutcomeOrderMismatchError(ValueError):
    """The outcome names another order than the decision it reports on."""


@dataclass(frozen=True)
class StoredOutcome:
    decision_id: str
    merchant_id: str
    order_id: str
    status: str
    occurred_at: datetime
    body: dict[str, Any]
    recorded_at: datetime


def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything stored is UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _canonical(body: Mapping[str, Any]) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and cross-thread use (the writer thread)."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


def decision_row(
    request: DecisionRequest, decision: Decision, created_at: datetime | None = None, answer_json: str | None = None
) -> dict[str, Any]:
    """The ``decisions`` row of one decision served; ``answer_json`` is the decision already serialised, if it is."""
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
        "request_json": request.model_dump_json(),
        "answer_json": decision.model_dump_json() if answer_json is None else answer_json,
        "created_at": created_at or datetime.now(UTC),
    }


class Store:
    """Repository over the ``decisions`` and ``outcomes`` tables."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def insert_decisions(self, rows: Iterable[dict[str, Any]]) -> int:
        """Insert decision rows; a row whose decision_id is already stored (or earlier in ``rows``) is skipped."""
        unique: dict[str, dict[str, Any]] = {}
        for row in rows:
            unique.setdefault(row["decision_id"], row)
        batch = list(unique.values())
        if not batch:
            return 0
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
                conn.execute(decisions.insert(), fresh)
        return len(fresh)

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
            body=orjson.loads(row["body_json"]),
            recorded_at=_utc(row["recorded_at"]),
        )

    def record_outcome(self, merchant_id: str, body: Mapping[str, Any]) -> StoredOutcome:
        """Store a merchant's outcome once per decision_id; the same body again returns the stored one unchanged.

        ``body`` is the outcome as JSON-ready values with at least decision_id, order_id, status and occurred_at
        (an ISO timestamp). Raises OutcomeConflictError for a different body under a stored decision_id, and
        ForeignDecisionError when the decision is stored as another merchant's, OutcomeOrderMismatchError when it was
        served for another order. An outcome for a decision not stored (yet) is kept under the merchant that sent
        it, and never stands in for another merchant's.
        """
        decision_id = str(body["decision_id"])
        with self.engine.connect() as conn:
            served = conn.execute(
                sa.select(decisions.c.merchant_id, decisions.c.order_id).where(decisions.c.decision_id == decision_id)
            ).first()
        if served is not None and served.merchant_id != merchant_id:
            raise ForeignDecisionError(f"decision {decision_id!r} was not served to merchant {merchant_id!r}")
        if served is not None and served.order_id != str(body["order_id"]):
            raise OutcomeOrderMismatchError(
                f"decision {decision_id!r} was served for order {served.order_id!r}, not {body['order_id']!r}"
            )
        row = {
            "decision_id": decision_id,
            "merchant_id": merchant_id,
            "order_id": str(body["order_id"]),
            "status": str(body["status"]),
            "occurred_at": _utc(datetime.fromisoformat(str(body["occurred_at"]))),
            "body_json": _canonical(body).decode(),
            "recorded_at": datetime.now(UTC),
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(outcomes.insert().values(**row))
        except IntegrityError:
            pass  # already stored (maybe by a concurrent request): compare below
        return self._same_or_conflict(merchant_id, body)

    def _same_or_conflict(self, merchant_id: str, body: Mapping[str, Any]) -> StoredOutcome:
        with self.engine.connect() as conn:
            stored = self._outcome(conn, merchant_id, str(body["decision_id"]))
        if stored is None:  # pragma: no cover - an insert failed for a reason other than the key
            raise RuntimeError(f"could not store the outcome of decision {body['decision_id']!r}")
        if _canonical(stored.body) != _canonical(body):
            raise OutcomeConflictError(
                f"decision {stored.decision_id!r} already has a different outcome "
                f"(status {stored.status!r} at {stored.occurred_at.isoformat()})"
            )
        return stored


class DecisionWriter:
    """Writes decision rows behind the requests: a daemon thread inserts whatever queued, every ``interval`` s.

    ``flush()`` blocks until everything queued so far is stored; ``close()`` flushes and stops the thread.
    """

    def __init__(self, store: Store, interval: float = 0.2, max_batch: int = 500, max_backoff: float = 5.0) -> None:
        self.store = store
        self.interval = interval
        self.max_batch = max_batch
        self.max_backoff = max_backoff
        self._in_hand = 0  # rows taken off the queue and not yet stored (for the shutdown report)
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="winback-decision-writer", daemon=True)
        self._thread.start()

    def put(self, row: dict[str, Any]) -> None:
        """Queue one decision row (never blocks)."""
        self._queue.put_nowait(row)

    def _take(self, first: dict[str, Any] | None) -> tuple[list[dict[str, Any]], int, bool]:
        """``first`` and whatever else is queued: (rows, items taken, stop requested)."""
        rows = [first] if first is not None else []
        taken, stop = 1, first is None
        while len(rows) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            taken += 1
            if item is None:
                stop = True
            else:
                rows.append(item)
        return rows, taken, stop

    def _run(self) -> None:
        stop = False
        while not stop:
            try:
                first = self._queue.get(timeout=self.interval)
            except queue.Empty:
                continue
            if first is not None:
                time.sleep(self.interval)  # let a batch gather: one transaction per interval, not per decision
            rows, taken, stop = self._take(first)
            try:
                self._store(rows)
            finally:
                for _ in range(taken):
                    self._queue.task_done()

    def _store(self, rows: list[dict[str, Any]]) -> None:
        """Insert ``rows`` in one transaction, waiting out database outages; if the database refuses the batch
        itself, row by row, so one bad row costs only itself. A row that cannot be stored is logged by id."""
        self._in_hand = len(rows)
        try:
            self._insert_through_outages(rows)
        except Exception as error:
            log.warning("could not store a batch of %d decisions (%s); storing them one by one",
                        len(rows), type(error).__name__)  # fmt: skip
            for row in rows:
                try:
                    self._insert_through_outages([row])
                except Exception:
                    log.exception("could not store decision %s; it is lost", row.get("decision_id"))
        finally:
            self._in_hand = 0

    def _insert_through_outages(self, rows: list[dict[str, Any]]) -> None:
        """Insert ``rows``; while the database is away (an OperationalError: down, unreachable, locked), wait and
        try again, doubling the wait up to ``max_backoff``. Any other error is the rows' own and is raised."""
        wait, outages = self.interval, 0
        while True:
            try:
                self.store.insert_decisions(rows)
            except (sa.exc.OperationalError, sa.exc.InterfaceError) as error:
                outages += 1
                if outages == 1 or outages % 20 == 0:
                    log.warning("database unavailable (%s); %d decisions wait, trying again every %.1f s at most",
                                type(error).__name__, len(rows) + self._queue.qsize(), self.max_backoff)  # fmt: skip
                time.sleep(wait)
                wait = min(wait * 2, self.max_backoff)
                continue
            if outages:
                log.warning("database back after %d failed tries; %d decisions stored", outages, len(rows))
            return

    def flush(self) -> None:
        """Block until every row queued before this call is stored."""
        self._queue.join()

    def close(self, timeout: float = 30.0) -> None:
        """Flush and stop the writer thread; what it could not store within ``timeout`` seconds is reported lost."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=timeout)
            if self._thread.is_alive():
                log.error("the database stayed unavailable: %d decisions not stored at shutdown are lost",
                          self._in_hand + max(self._queue.qsize() - 1, 0))  # fmt: skip
