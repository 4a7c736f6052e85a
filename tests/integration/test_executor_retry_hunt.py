"""Defect hunt of the autonomous executor's silent retries (real executor and worker on SQLite, scripted decide()).

Each test drives the executor through the harness of ``test_executor`` and checks what the next decision point
sees and what reached the connector.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
import sqlalchemy as sa

from model.catalog import load_catalog
from model.rules import build_context
from service.executor.connectors import ChargeRequest, ChargeResult
from service.executor.core import Delivered, NoEffect, Permanent, StaleClaimError
from service.executor.routes import _pay
from service.executor.store import actions, orders
from service.executor.worker import Worker
from tests.factories import insert_lost_charge
from tests.integration.test_executor import (  # noqa: F401 - make_harness is a fixture
    START,
    FakeConnector,
    Harness,
    LinkAnswersLost,
    OpenCircuit,
    _order_row,
    demo_merchant,
    event,
    make_harness,
    runtime,
    token_of,
)


def test_a_link_payment_taken_back_unsent_is_not_counted_as_a_retry(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
) -> None:
    """The customer pays a link while the connector's circuit is open: the payment is withdrawn (nothing was sent)
    but its attempt number stays used. The customer pays again later and is declined. The next decision point saw
    attempts 1 and 3 only, and the rules counted the missing 2 as a silent retry made: a merchant allowing one
    retry got none."""
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=OpenCircuit(results=["failure", "success"]),
        merchants={"m_demo": demo_merchant(retry={"max_retries": 1})},
    )
    h.executor.payment_failed("m_demo", event())
    h.connector.open = False
    h.drain()  # the SMS with the link
    h.connector.open = True
    assert _pay(runtime(h), token_of(h))[0] == 503  # withdrawn: never sent
    h.connector.open = False
    h.clock.advance(seconds=31)
    assert _pay(runtime(h), token_of(h))[0] == 402  # sent, declined
    h.drain()
    request = h.executor.decider.requests[-1]  # type: ignore[attr-defined]
    assert [(a.attempt_number, a.strategy) for a in request.history.attempts] == [
        (1, "initial"),
        (2, "retarget_link"),
    ]
    assert build_context(request, h.executor.merchant("m_demo"), load_catalog()).retries_used == 0
    for _ in range(3):
        h.clock.advance(seconds=5)
        h.drain()
    assert h.view().state == "SUCCEEDED"
    assert h.connector.calls[-1].endswith(":retry:dec_2_ord_1")


def test_a_retry_held_back_by_a_charge_of_unknown_outcome_is_not_counted_as_a_retry_made(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
) -> None:
    """A retry (payment 2) comes due while another charge of the order (payment 3) was sent and never answered: it
    is not sent. It was dead-lettered like a charge that may have gone out, so once the operator answered "not
    charged" and the order went on, every later decision counted payment 2 as a silent retry made (a gap in the
    history's attempt numbers is a retry the caller left out): one retry of the merchant's budget lost."""
    retry = {"action": "retry", "strategy": "cascade", "connector": "adyen"}
    h = make_harness(
        retry | {"delay": timedelta(hours=1)},
        dict(retry),
        dict(retry),
        connector=FakeConnector(results=["failure", "failure"]),
    )
    h.executor.payment_failed("m_demo", event())  # the retry, payment ord_1_2, is planned in an hour
    with h.executor.engine.begin() as conn:
        conn.execute(
            orders.update().where(orders.c.order_id == "ord_1").values(attempt_count=orders.c.attempt_count + 1)
        )
    lost = insert_lost_charge(h.executor.engine, "m_demo", "ord_1", START)
    with h.executor.engine.begin() as conn:  # the lost charge is payment ord_1_3
        conn.execute(
            actions.update()
            .where(actions.c.action_id == lost)
            .values(payload_json='{"strategy": "retry_same", "connector": "adyen", "attempt_number": 3}')
        )
    h.clock.advance(hours=1)
    h.drain()
    assert h.connector.calls == []  # held back: never sent
    h.executor.resolve_charge(lost, charged=False)  # decided again: a retry, payment ord_1_4, declined
    h.drain()
    assert h.connector.calls == ["m_demo:ord_1:retry:dec_2_ord_1"]
    request = h.executor.decider.requests[-1]  # type: ignore[attr-defined]
    context = build_context(request, h.executor.merchant("m_demo"), load_catalog())
    # ord_1_4 and the lost ord_1_3 (sent: it may have reached the issuer), not the ord_1_2 that never went out
    assert context.retries_used == 2, [(a.attempt_number, a.strategy) for a in request.history.attempts]


def test_a_link_payment_answered_not_charged_is_not_counted_as_a_silent_retry(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
) -> None:
    """The customer's link payment (payment 2) never got its answer; the operator learns it was not charged and
    the order goes on: a retry (payment 3) is declined. The next decision saw attempts 1 and 3, and the rules
    counted the missing 2, a payment the customer made on a link, as a silent retry made."""
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=LinkAnswersLost(results=["failure", "failure", "failure"]),
        max_attempts=2,
    )
    h.executor.payment_failed("m_demo", event())
    h.drain()  # the SMS with the link
    assert _pay(runtime(h), token_of(h))[0] == 202  # answer lost
    for _ in range(6):
        h.clock.advance(seconds=31)
        h.drain()
    link = next(a for a in h.view().actions if a.kind == "link_payment")
    assert link.state == "dead"
    h.executor.resolve_charge(link.action_id, charged=False)  # decided again: a retry, declined
    h.drain()
    assert [key for key in h.connector.calls if ":retry:" in key] == ["m_demo:ord_1:retry:dec_2_ord_1"]
    request = h.executor.decider.requests[-1]  # type: ignore[attr-defined]
    context = build_context(request, h.executor.merchant("m_demo"), load_catalog())
    assert context.retries_used == 1, [(a.attempt_number, a.strategy) for a in request.history.attempts]


def test_a_stop_waiting_for_a_link_does_not_fail_the_order_after_a_later_decision_plans_a_retry(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
) -> None:
    """A stop while the customer's link is live waits for the link to expire. The customer pays on the link and is
    declined: the order is decided again, and that decision plans a retry for later. The stop's close still fired
    at the link's expiry, failed the order (order.failed to the merchant) and cancelled the planned retry."""
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "stop"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen", "delay": timedelta(hours=30)},
        connector=FakeConnector(results=["failure", "success"]),
    )
    h.executor.payment_failed("m_demo", event())
    h.drain()  # the SMS with a 48 h link
    h.clock.advance(hours=24)
    h.drain()  # the follow-up decides stop: the order waits for the link to expire
    assert h.view().state == "PENDING"
    h.clock.advance(hours=1)
    assert _pay(runtime(h), token_of(h))[0] == 402  # declined: decided again, a retry in 30 h
    h.drain()
    assert [a.kind for a in h.view().actions if a.state == "scheduled"].count("retry") == 1
    for _ in range(8):  # past the link's expiry (in 23 h) and to the retry (in 30 h)
        h.clock.advance(hours=5)
        h.drain()
    view = h.view()
    assert view.state != "FAILED", [(a.kind, a.state, a.last_error) for a in view.actions]
    assert h.connector.calls[-1] == "m_demo:ord_1:retry:dec_3_ord_1"
    assert view.state == "SUCCEEDED"
    assert [json.loads(r.content)["event"] for r in h.receiver.received] == ["order.succeeded"]


def test_a_stop_planned_again_for_the_same_link_expiry_closes_the_order_then(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
) -> None:
    """A stop's close replaced by a later decision, then a stop again waiting for the same live link: its close
    (same moment, same key) is planned again, not skipped as a duplicate."""
    h = make_harness({"action": "retarget", "channel": "sms"})
    h.executor.payment_failed("m_demo", event())
    when = START + timedelta(hours=30)
    with h.executor.engine.begin() as conn:
        order = h.executor.lock_order(conn, "m_demo", "ord_1")
        h.executor._close_later(conn, order, when, START, None)
        conn.execute(actions.update().where(actions.c.idempotency_key.like("%:close:2%")).values(state="cancelled"))
        h.executor._close_later(conn, order, when, START, None)
    closes = [(a.state, a.due_at) for a in h.view().actions if a.kind == "close" and a.state == "scheduled"]
    assert len(closes) == 2, closes  # the window's end and the link's expiry


@pytest.mark.postgres
def test_two_workers_on_postgresql_charge_each_order_once_and_tell_the_merchant_once(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    postgres_url: str,
) -> None:
    """Two workers draining the same PostgreSQL queue at once, with a slow connector: every order's retry reaches
    the connector once (one payment id, ``<order_id>_2``) and every order gets one signed order.succeeded."""

    class SlowConnector(FakeConnector):
        def charge(self, request: ChargeRequest) -> ChargeResult:
            time.sleep(0.05)
            return super().charge(request)

    steps = [{"action": "retry", "strategy": "cascade", "connector": "adyen"} for _ in range(12)]
    h = make_harness(*steps, connector=SlowConnector(results=["success"] * 12), database_url=postgres_url)
    for n in range(12):
        h.executor.payment_failed("m_demo", event(order_id=f"ord_{n}"))
    second = Worker(h.executor, h.effects, "w2", batch_size=3)
    h.worker.batch_size = 3
    errors: list[BaseException] = []

    def drain(worker: Worker) -> None:
        try:
            for _ in range(3):
                worker.run(until_idle=True)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=drain, args=(w,)) for w in (h.worker, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert sorted(h.connector.calls) == sorted(set(h.connector.calls))
    assert len(h.connector.calls) == 12
    bodies = [json.loads(r.content) for r in h.receiver.received]
    assert sorted(b["order_id"] for b in bodies) == sorted(f"ord_{n}" for n in range(12))
    assert {b["event"] for b in bodies} == {"order.succeeded"}
    for n in range(12):
        view = h.view(f"ord_{n}")
        assert [a.processor_payment_id for a in view.attempts] == [f"ord_{n}_1", f"ord_{n}_2"]


def test_a_stop_close_claimed_when_a_later_decision_plans_a_retry_does_not_fail_the_order(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
) -> None:
    """The stop's close is due (the link just expired) and a worker has claimed it when the order is decided again
    (a link payment made just before the expiry is answered 'declined'; an operator answers 'not charged'). That
    decision cancelled only a scheduled close: the claimed one ran next, failed the order (order.failed to the
    merchant) and cancelled the retry the new decision had planned."""
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "stop"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen", "delay": timedelta(hours=2)},
        connector=FakeConnector(results=["success"]),
    )
    h.executor.payment_failed("m_demo", event())
    h.drain()  # the SMS with a 48 h link
    h.clock.advance(hours=24)
    h.drain()  # the follow-up decides stop: a close at the link's expiry
    h.clock.advance(hours=24, minutes=1)  # the link has expired: the close is due
    claimed = h.executor.claim(10, 30, "w1", "claim-w1")
    (close,) = [a for a in claimed if a.kind == "close" and not a.idempotency_key.endswith(":close:window")]
    with h.executor.engine.begin() as conn:  # meanwhile the order is decided again: a retry in 2 h
        order = h.executor.lock_order(conn, "m_demo", "ord_1")
        assert order is not None
        h.executor._decision_point(conn, order, h.clock())
    with h.executor.engine.begin() as conn:  # the worker's close completes: replaced, it records nothing
        h.executor.complete(conn, close, NoEffect())
    assert h.view().state == "PENDING", [(a.kind, a.state, a.last_error) for a in h.view().actions]
    h.clock.advance(hours=3)
    h.drain()
    view = h.view()
    assert view.state == "SUCCEEDED", [(a.kind, a.state, a.last_error) for a in view.actions]
    assert [json.loads(r.content)["event"] for r in h.receiver.received] == ["order.succeeded"]


@pytest.mark.parametrize(
    "new_plan",
    [
        {"action": "retry", "strategy": "retry_same", "connector": "stripe"},
        {"action": "retarget", "channel": "sms"},
    ],
    ids=["retry", "message"],
)
def test_a_retry_claimed_and_not_sent_as_its_order_is_decided_again_is_replaced(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
    new_plan: dict[str, str],
) -> None:
    """Autonomous mode. A worker has claimed a retry, not sent it yet, when the order is decided again (a link
    payment declined, an operator's 'not charged'). The new decision replaced only scheduled actions, so the
    claimed retry went ahead beside the new plan: two silent retries from one decision point, or a retry charging
    the customer beside the payment link asking them to pay. A retry is sent only under its order's lock, which the
    re-decision holds: one not sent yet is replaced as a scheduled one is, and its worker finds its claim gone."""
    h = make_harness(
        {"action": "retry", "strategy": "cascade", "connector": "adyen", "delay": timedelta(hours=1)},
        new_plan,
        connector=FakeConnector(results=["failure", "failure"]),
        database_url=database_url,
    )
    h.executor.payment_failed("m_demo", event())
    h.clock.advance(hours=1)
    (retry,) = h.executor.claim(10, 30, "w1", "claim-w1")
    assert retry.kind == "retry"
    with h.executor.engine.begin() as conn:  # meanwhile the order is decided again
        order = h.executor.lock_order(conn, "m_demo", "ord_1")
        assert order is not None
        h.executor._decision_point(conn, order, h.clock(), "the customer's payment by link was declined")
    h.worker.record([(retry, h.effects.perform(retry, _order_row(h)))])  # the worker goes on with its claim
    h.drain()
    view = h.view()
    replaced = next(a for a in view.actions if a.action_id == retry.action_id)
    assert (replaced.state, replaced.last_error) == ("cancelled", "replaced by a later decision")
    assert retry.idempotency_key not in h.connector.calls
    assert len([key for key in h.connector.calls if ":retry:" in key]) == (new_plan["action"] == "retry")
    assert len(h.outbox) == (new_plan["action"] == "retarget")


def test_a_retry_without_an_attempt_number_is_dead_lettered_unsent_and_its_claim_locks_no_order(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """Review: a claim reserved the attempt number of a retry planned without one, updating its order's row in the
    claim's transaction after the action rows: the reverse of the order-then-actions lock order of a re-decision
    and a charge's send, a deadlock on PostgreSQL. No such retry is written (``_carry_out``, the one place a retry
    is planned, numbers it), so the claim no longer numbers any, and one found unnumbered is refused unsent."""
    h = make_harness(
        {"action": "retry", "strategy": "cascade", "connector": "adyen", "delay": timedelta(hours=1)},
        database_url=database_url,
    )
    h.executor.payment_failed("m_demo", event())
    with h.executor.engine.begin() as conn:  # a retry as no code writes it: without its attempt number
        conn.execute(
            actions.update()
            .where(actions.c.kind == "retry")
            .values(payload_json=json.dumps({"strategy": "cascade", "connector": "adyen", "propensity": 0.9}))
        )
    h.clock.advance(hours=1)
    counted = _order_row(h)["attempt_count"]
    (retry,) = h.executor.claim(10, 30, "w1", "claim-w1")
    assert _order_row(h)["attempt_count"] == counted  # the claim left the order's row alone
    h.worker.record([(retry, h.effects.perform(retry, _order_row(h)))])
    dead = next(a for a in h.view().actions if a.action_id == retry.action_id)
    assert dead.state == "dead"
    assert "has no attempt number" in (dead.last_error or "")
    assert h.connector.calls == []


def _waits_for_a_lock(engine: sa.Engine, pid: int, patience: float = 30.0) -> None:
    """Return once PostgreSQL backend ``pid`` waits for a lock (fail after ``patience`` seconds)."""
    deadline = time.monotonic() + patience
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            waiting = conn.scalar(
                sa.text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
            )
            if waiting == "Lock":
                return
            conn.rollback()  # a fresh snapshot of pg_stat_activity
    raise AssertionError(f"backend {pid} never waited for a lock")


@pytest.mark.postgres
def test_recording_a_refused_retry_while_its_order_is_decided_again_does_not_deadlock_on_postgresql(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    postgres_url: str,
) -> None:
    """A worker records a claimed retry its switch refused outright (nothing charged: its connector is taken out and
    the order decided again) while the order is decided again elsewhere (a link payment declined). Recording
    updated the action's row and then waited for the order's lock; the re-decision, holding that lock, waited for
    the action's row (it replaces a claimed retry not sent): a deadlock, one of the two aborted. Recording an
    answer now takes the order's lock first, as a re-decision and a send do: the re-decision goes first, and the
    worker finds its claim gone. The worker is made to wait for the lock before the re-decision reads the row."""
    h = make_harness(
        {"action": "retry", "strategy": "cascade", "connector": "adyen", "delay": timedelta(hours=1)},
        {"action": "retry", "strategy": "retry_same", "connector": "stripe", "delay": timedelta(hours=1)},
        database_url=postgres_url,
    )
    h.executor.payment_failed("m_demo", event())
    h.clock.advance(hours=1)
    (retry,) = h.executor.claim(10, 30, "w1", "claim-w1")
    engine = h.executor.engine
    worker_pid: list[int] = []
    pid_known = threading.Event()
    errors: list[BaseException] = []

    def worker_records_the_refusal() -> None:
        try:
            with engine.begin() as conn:
                worker_pid.append(int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()))
                pid_known.set()
                h.executor.complete(conn, retry, Permanent("adyen refused the charge", nothing_charged=True))
        except StaleClaimError:
            pass  # replaced by the re-decision: nothing to record
        except BaseException as exc:
            errors.append(exc)
        finally:
            pid_known.set()

    worker = threading.Thread(target=worker_records_the_refusal)
    try:
        with engine.begin() as conn:  # the re-decision: the order's lock first
            order = h.executor.lock_order(conn, "m_demo", "ord_1")
            assert order is not None
            worker.start()
            assert pid_known.wait(30)
            assert worker_pid, errors
            _waits_for_a_lock(engine, worker_pid[0])
            h.executor._decision_point(conn, order, h.clock(), "the customer's payment by link was declined")
    except sa.exc.OperationalError as exc:
        errors.append(exc)
    worker.join(60)
    assert not worker.is_alive()
    assert errors == []
    replaced = next(a for a in h.view().actions if a.action_id == retry.action_id)
    assert (replaced.state, replaced.last_error) == ("cancelled", "replaced by a later decision")


@pytest.mark.postgres
def test_recording_a_webhooks_answer_does_not_wait_for_its_orders_lock_on_postgresql(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    postgres_url: str,
) -> None:
    """Every path that locks an order and one of its rows takes the order first; a webhook's answer locked its
    action's row and then waited for its order's lock, the one path the other way round (a deadlock waiting for any
    path that holds the order and reaches that row). It changes only its own rows and takes no order lock now: it is
    recorded while another transaction holds the order's lock (a lock timeout makes the old wait an error)."""
    h = make_harness({"action": "stop"}, database_url=postgres_url)
    h.executor.payment_failed("m_demo", event())
    assert h.executor.order_state("m_demo", "ord_1") == "FAILED"
    (webhook,) = h.executor.claim(10, 30, "w1", "claim-w1")
    assert webhook.kind == "webhook"
    outcome = h.effects.perform(webhook, None)
    assert outcome == Delivered(200)
    engine = h.executor.engine
    with engine.begin() as holder:
        assert h.executor.lock_order(holder, "m_demo", "ord_1") is not None
        with engine.begin() as conn:
            conn.exec_driver_sql("SET LOCAL lock_timeout = '2s'")
            h.executor.complete(conn, webhook, outcome)
    delivery = h.view().webhook
    assert delivery is not None
    assert (delivery.status, delivery.attempts) == ("delivered", 1)
    assert len(h.receiver.received) == 1
