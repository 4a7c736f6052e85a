"""Executor throughput: due actions per second, with a cheap counting connector as the only effect.

``seed_retry_actions`` fills a database with orders whose silent retry is due now; workers then claim, perform
(append the idempotency key to a file: the connector "charges") and record them (a transaction row, the order
SUCCEEDED). The same machinery backs the exactly-once tests.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
import yaml
from rich.console import Console
from rich.table import Table

from service.executor.connectors import ChargeRequest, ChargeResult, Connector
from service.executor.store import (
    ActionKind,
    ActionState,
    OrderState,
    actions,
    make_executor_engine,
    orders,
    transactions,
)

BENCH_MERCHANT = "m_bench"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
_BENCH_PAYLOAD = '{"strategy": "cascade", "connector": "adyen", "propensity": 1.0, "attempt_number": 2}'


class CountingConnector:
    """A connector that always succeeds and appends each call's idempotency key to a file (one line per call).

    Appending a short line is atomic across processes, so the file is the ground truth of calls made.
    """

    def __init__(self, path: str | Path, fail_first: int = 0) -> None:
        self.path = Path(path)
        self.fail_first = fail_first

    def charge(self, request: ChargeRequest) -> ChargeResult:
        """Record the call and answer success."""
        with self.path.open("a", encoding="utf-8") as file:
            file.write(request.idempotency_key + "\n")
        return ChargeResult(status="success", connector=request.connector, reference=request.payment_id)


def counting_connectors(path: str) -> Mapping[str, Connector]:
    """A ``connectors_factory`` for ``worker.run``: every connector is a CountingConnector on ``path``."""
    return {"*": CountingConnector(path)}


def calls_in(path: str | Path) -> Counter[str]:
    """How often each idempotency key was sent (from a CountingConnector's file)."""
    file = Path(path)
    if not file.exists():
        return Counter()
    return Counter(line for line in file.read_text(encoding="utf-8").splitlines() if line)


def write_bench_config(path: Path) -> Path:
    """A one-merchant config for the benchmark (no webhook, no providers)."""
    merchant = {
        "api_key_sha256": hashlib.sha256(b"wb_bench").hexdigest(),
        "mode": "autonomous",
        "connectors": ["stripe", "adyen"],
    }
    path.write_text(yaml.safe_dump({"merchants": {BENCH_MERCHANT: merchant}}), encoding="utf-8")
    return path


def seed_retry_actions(engine: sa.Engine, count: int, merchant_id: str = BENCH_MERCHANT, prefix: str = "ord") -> None:
    """Insert ``count`` open orders, each with one failed first attempt and a silent retry due now."""
    now = datetime.now(UTC)
    request = {
        "merchant_id": merchant_id,
        "order_id": "x",
        "event_time": now.isoformat(),
        "amount": 10.0,
        "currency": "USD",
        "customer": {"id": "cus_1", "country": "US"},
        "payment": {"payment_method": "card", "payment_method_type": "credit", "card_network": "visa"},
        "failure": {"connector": "stripe", "error_code": "processing_error"},
        "available_connectors": ["stripe", "adyen"],
    }
    import orjson

    for start in range(0, count, 2000):
        ids = [f"{prefix}_{index:06d}" for index in range(start, min(start + 2000, count))]
        with engine.begin() as conn:
            conn.execute(
                orders.insert(),
                [
                    {
                        "merchant_id": merchant_id,
                        "order_id": order_id,
                        "state": OrderState.PENDING.value,
                        "mode": "autonomous",
                        "amount": 10.0,
                        "currency": "USD",
                        "customer_id": "cus_1",
                        "request_json": orjson.dumps(request | {"order_id": order_id}).decode(),
                        "failure_json": orjson.dumps(request["failure"]).decode(),
                        "attempt_count": 1,
                        "nudge_count": 0,
                        "first_failed_at": now,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for order_id in ids
                ],
            )
            conn.execute(
                transactions.insert(),
                [
                    {
                        "txn_id": f"txn_{order_id}_1",
                        "merchant_id": merchant_id,
                        "order_id": order_id,
                        "attempt_number": 1,
                        "processor_payment_id": f"{order_id}_1",
                        "strategy": "initial",
                        "connector": "stripe",
                        "status": "failure",
                        "error_code": "processing_error",
                        "created_at": now - timedelta(seconds=1),
                    }
                    for order_id in ids
                ],
            )
            conn.execute(
                actions.insert(),
                [
                    {
                        "merchant_id": merchant_id,
                        "order_id": order_id,
                        "kind": ActionKind.RETRY.value,
                        "state": ActionState.SCHEDULED.value,
                        "due_at": now - timedelta(seconds=1),
                        "planned_at": now - timedelta(seconds=1),
                        "attempts": 0,
                        "idempotency_key": f"{merchant_id}:{order_id}:retry:bench",
                        "payload_json": _BENCH_PAYLOAD,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for order_id in ids
                ],
            )


def fresh_postgres(admin_url: str) -> tuple[str, sa.Engine]:
    """Create a throw-away database next to ``admin_url``'s; returns (its URL, an admin engine to drop it)."""
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"winback_exec_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    return url, admin


def drop_postgres(admin: sa.Engine, url: str) -> None:
    """Drop a database made by ``fresh_postgres``."""
    name = sa.make_url(url).database
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def measure(database_url: str, workers: int, count: int, folder: Path) -> float:
    """Seed ``count`` due retries, run ``workers`` processes until idle; due actions per second."""
    from service.executor.worker import run
    from service.migrations import upgrade

    engine = make_executor_engine(database_url)
    try:
        upgrade(engine)
        seed_retry_actions(engine, count)
    finally:
        engine.dispose()
    calls = folder / f"calls-{uuid.uuid4().hex[:8]}.txt"
    config = write_bench_config(folder / "bench-merchants.yaml")
    started = time.perf_counter()
    run(
        database_url,
        workers,
        config,
        None,
        until_idle=True,
        connectors_factory=functools.partial(counting_connectors, str(calls)),
    )
    elapsed = time.perf_counter() - started
    made = calls_in(calls)
    if len(made) != count or max(made.values()) != 1:
        raise RuntimeError(f"benchmark broke exactly-once: {len(made)} keys for {count} actions")
    return count / elapsed


def run_bench(count: int = 5000, postgres_url: str | None = None, console: Console | None = None) -> dict[str, float]:
    """Print (and return) due actions/s: SQLite with 1 worker, PostgreSQL with 1 and 4 workers.

    Figures include worker start-up (about half a second per process), as an operator would see them.
    PostgreSQL is skipped with a note when the server is unreachable.
    """
    console = console or Console()
    results: dict[str, float] = {}
    os.environ.setdefault("WINBACK_BATCH_SIZE", "100")
    with tempfile.TemporaryDirectory(prefix="winback-bench-") as tmp:
        folder = Path(tmp)
        results["sqlite, 1 worker"] = measure(f"sqlite:///{folder / 'bench.db'}", 1, count, folder)
        admin_url = postgres_url or os.environ.get("WINBACK_BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL)
        for workers in (1, 4):
            try:
                url, admin = fresh_postgres(admin_url)
            except sa.exc.OperationalError as exc:
                console.print(f"PostgreSQL at {admin_url} unreachable, skipped: {exc.orig}")
                break
            try:
                results[f"postgresql, {workers} worker{'s' if workers > 1 else ''}"] = measure(
                    url, workers, count, folder
                )
            finally:
                drop_postgres(admin, url)
    table = Table(title=f"executor throughput ({count} due retries, counting connector)")
    table.add_column("database, workers")
    table.add_column("due actions/s", justify="right")
    for name, rate in results.items():
        table.add_row(name, f"{rate:,.0f}")
    console.print(table)
    return results
