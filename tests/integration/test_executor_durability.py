"""Exactly-once under concurrency and crashes: real worker processes on SQLite and on the machine's PostgreSQL.

The effect is a counting connector that appends each call's idempotency key to a file, so the file is the truth
of what was sent; the database must hold exactly one recorded attempt per due action.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from service.executor.bench import (
    calls_in,
    counting_connectors,
    seed_retry_actions,
    write_bench_config,
)
from service.executor.store import actions, make_executor_engine, orders, transactions
from service.executor.worker import run, worker_main
from service.migrations import upgrade

# One xdist worker runs these one after another: each already keeps both cores busy with worker processes.
pytestmark = pytest.mark.xdist_group("executor-durability")


def prepare(url: str, count: int) -> None:
    engine = make_executor_engine(url)
    try:
        upgrade(engine)
        seed_retry_actions(engine, count)
    finally:
        engine.dispose()


def recorded(url: str) -> tuple[dict[str, int], dict[str, int], int]:
    """(attempts per idempotency key, states of actions, orders SUCCEEDED)."""
    engine = make_executor_engine(url)
    try:
        with engine.connect() as conn:
            per_key = dict(
                conn.execute(
                    sa.select(transactions.c.idempotency_key, sa.func.count())
                    .where(transactions.c.idempotency_key.is_not(None))
                    .group_by(transactions.c.idempotency_key)
                ).all()
            )
            states = dict(conn.execute(sa.select(actions.c.state, sa.func.count()).group_by(actions.c.state)).all())
            succeeded = conn.scalar(sa.select(sa.func.count()).where(orders.c.state == "SUCCEEDED"))
    finally:
        engine.dispose()
    return per_key, states, int(succeeded or 0)


def four_workers_exactly_once(url: str, tmp_path: Path, count: int = 10_000) -> None:
    prepare(url, count)
    calls = tmp_path / "calls.txt"
    config = write_bench_config(tmp_path / "merchants.yaml")
    run(url, 4, config, None, until_idle=True, connectors_factory=functools.partial(counting_connectors, str(calls)))
    made = calls_in(calls)
    assert len(made) == count, "a due action was not sent"
    assert set(made.values()) == {1}, "a due action was sent twice"
    per_key, states, succeeded = recorded(url)
    assert set(per_key) == set(made)
    assert set(per_key.values()) == {1}
    assert states == {"done": count}
    assert succeeded == count


@pytest.mark.slow
def test_four_workers_over_10000_due_actions_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WINBACK_BATCH_SIZE", "100")
    four_workers_exactly_once(f"sqlite:///{tmp_path / 'exec.db'}", tmp_path)


@pytest.mark.slow
@pytest.mark.postgres
def test_four_workers_over_10000_due_actions_postgres(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WINBACK_BATCH_SIZE", "100")
    four_workers_exactly_once(postgres_url, tmp_path)


#: The victim's call after which its connector stops answering: the SIGKILL lands between that send and its record.
KILL_AFTER_CALLS = 450


def slow_counting_connectors(path: str) -> dict[str, object]:
    """Counting connectors taking 2 ms a call; the KILL_AFTER_CALLS-th call is made (and counted) and its answer
    never comes back before the process is killed, so the kill lands between a charge's send and its recording."""
    inner = counting_connectors(path)["*"]

    class Slow:
        calls = 0

        def charge(self, request: object) -> object:
            answer = inner.charge(request)  # type: ignore[arg-type]
            Slow.calls += 1
            time.sleep(60 if Slow.calls == KILL_AFTER_CALLS else 0.002)
            return answer

    return {"*": Slow()}


def sigkill_loses_and_repeats_nothing(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    count = 1500
    prepare(url, count)
    calls = tmp_path / "calls.txt"
    config = write_bench_config(tmp_path / "merchants.yaml")
    monkeypatch.setenv("WINBACK_LEASE_SECONDS", "1")
    monkeypatch.setenv("WINBACK_BATCH_SIZE", "100")
    context = multiprocessing.get_context("spawn")
    victim = context.Process(
        target=worker_main,
        args=(url, str(config), None, "victim", None, False, functools.partial(slow_counting_connectors, str(calls))),
    )
    victim.start()
    deadline = time.monotonic() + 30
    while len(calls_in(calls)) < KILL_AFTER_CALLS and time.monotonic() < deadline:
        time.sleep(0.01)
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()
    assert victim.exitcode == -signal.SIGKILL
    sent_before = calls_in(calls)
    per_key_before, _, _ = recorded(url)
    assert 0 < len(per_key_before) < count
    in_flight = set(sent_before) - set(per_key_before)
    assert in_flight, "the kill did not land between a send and its recording"

    time.sleep(1.1)  # the victim's lease runs out
    monkeypatch.setenv("WINBACK_LEASE_SECONDS", "30")
    run(url, 2, config, None, until_idle=True, connectors_factory=functools.partial(counting_connectors, str(calls)))

    made = calls_in(calls)
    per_key, states, succeeded = recorded(url)
    assert set(per_key) == set(made), "a sent action was not recorded"
    assert len(per_key) == count, "an action was lost"
    assert set(per_key.values()) == {1}, "an effect was recorded twice"
    assert states == {"done": count}
    assert succeeded == count
    repeated = {key for key, n in made.items() if n > 1}
    # Only what the victim sent and never recorded was sent again, with the same idempotency key.
    assert repeated <= in_flight
    assert len(repeated) <= 100
    assert all(n <= 2 for n in made.values())


@pytest.mark.slow
def test_sigkill_mid_batch_then_restart_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sigkill_loses_and_repeats_nothing(f"sqlite:///{tmp_path / 'exec.db'}", tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.postgres
def test_sigkill_mid_batch_then_restart_postgres(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sigkill_loses_and_repeats_nothing(postgres_url, tmp_path, monkeypatch)
