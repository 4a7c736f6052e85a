"""A connector's decline text (an attempt's, an outcome's) and an action's error are stored with the customer's
e-mail address and phone number masked (``service.executor.store.MaskedText``, ``service.api.store.masked_outcome``),
on every path that writes them, on SQLite and PostgreSQL.

Connectors echo the customer's ("card holder jane.doe@example.com declined", "OTP sent to +91 98765 43210 failed"),
and ``transactions.error_message`` is shown by ``GET /v1/orders/{id}`` and the console and written to the history
files the model trains on; ``actions.last_error`` is shown by both too. Before, both were stored as they came.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx
import sqlalchemy as sa

from service.api.export import all_history_frames
from service.api.store import Store, decisions, make_engine, outcomes
from service.executor.connectors import ChargeRequest, ChargeResult, PermanentError
from service.executor.store import actions, transactions, webhook_deliveries
from service.migrations import upgrade
from tests.factories import make_request
from tests.integration.test_executor import (  # noqa: F401 - make_harness is a fixture
    FakeConnector,
    _order_row,
    event,
    make_harness,
)

#: A decline text quoting the customer of ``event()`` (+919800000001, a@example.com) and a reference, a decline
#: code and an amount that must stay as they are.
DECLINE = (
    "card holder a@example.com (+91 98000 00001) declined: insufficient_funds (51), amount 1499.00 INR, ref QF8HXSKGK82"
)
KEPT = ("card holder ", "declined: insufficient_funds (51), amount 1499.00 INR, ref QF8HXSKGK82")
HIDDEN = ("a@example.com", "98000 0")


def _assert_masked(text: str | None) -> None:
    assert text is not None
    assert [part for part in HIDDEN if part in text] == [], text
    assert [part for part in KEPT if part not in text] == [], text


def _assert_attempt_masked(h: Any, shown: str | None) -> None:
    """The attempt's decline text as the order view shows it and as the database holds it are masked."""
    _assert_masked(shown)
    (stored,) = _stored(h, transactions.c.error_message)
    _assert_masked(stored)


def _retried_through(build: Any, database_url: str, connector: FakeConnector) -> Any:
    """A harness (``build``: the make_harness fixture) whose order was retried once through ``connector``."""
    h = build(
        {"action": "retry", "strategy": "cascade", "connector": "adyen"}, connector=connector, database_url=database_url
    )
    h.executor.payment_failed("m_demo", event())
    h.drain()
    return h


def _stored(h: Any, column: sa.Column[Any]) -> list[str]:
    """The column's values as the database holds them (read as plain text, not through the column's type)."""
    with h.executor.engine.connect() as conn:
        rows = conn.execute(sa.select(sa.cast(column, sa.Text)).where(column.is_not(None)))
        return [str(value) for (value,) in rows]


@dataclass
class DecliningConnector(FakeConnector):
    """Declines every charge with ``DECLINE``."""

    def charge(self, request: ChargeRequest) -> ChargeResult:
        self.calls.append(request.idempotency_key)
        return ChargeResult(
            status="failure", connector=request.connector, error_code="card_declined", error_message=DECLINE
        )


@dataclass
class RefusingConnector(FakeConnector):
    """Refuses every charge with an error quoting the customer's phone number."""

    def charge(self, request: ChargeRequest) -> ChargeResult:
        raise PermanentError(f"connector 'adyen' answered HTTP 422: {DECLINE}")


def test_a_failure_events_decline_text_is_stored_masked(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    h = make_harness(database_url=database_url)
    h.executor.payment_failed("m_demo", event(failure={"error_message": DECLINE}))
    (attempt,) = h.view().attempts
    _assert_attempt_masked(h, attempt.error_message)


def test_a_retrys_decline_text_is_stored_masked(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    h = _retried_through(make_harness, database_url, DecliningConnector())
    view = h.view()
    assert [a.strategy for a in view.attempts] == ["initial", "cascade"]
    _assert_attempt_masked(h, view.attempts[-1].error_message)


def test_a_link_payments_decline_text_is_stored_masked(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    h = make_harness(
        {"action": "retarget", "channel": "email"}, connector=DecliningConnector(), database_url=database_url
    )
    h.executor.payment_failed("m_demo", event())
    h.drain()
    token = h.outbox[0].variables["link_url"].rsplit("/pay/", 1)[1]
    payment = h.executor.start_link_payment(token, 30, "api", "claim-1")
    outcome = h.effects.perform(payment.action, _order_row(h))
    with h.executor.engine.begin() as conn:
        h.executor.complete(conn, payment.action, outcome)
    attempt = h.view().attempts[-1]
    assert attempt.strategy == "retarget_link"
    _assert_attempt_masked(h, attempt.error_message)


def test_a_connectors_refusal_kept_with_its_action_is_stored_masked(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    h = _retried_through(make_harness, database_url, RefusingConnector())
    (refused,) = [action for action in h.view().actions if action.kind == "retry"]
    _assert_masked(refused.last_error)
    assert refused.last_error is not None
    assert refused.last_error.startswith("connector 'adyen' answered HTTP 422: ")
    (stored,) = [text for text in _stored(h, actions.c.last_error) if "HTTP 422" in text]
    _assert_masked(stored)


def test_any_other_write_of_an_actions_error_is_stored_masked(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """Every other write of ``last_error`` (an approval's withdrawal, an operator's resolution of a charge, one
    added later) goes through the column as well: a plain update is masked."""
    h = make_harness({"action": "retry", "strategy": "cascade", "connector": "adyen"}, database_url=database_url)
    h.executor.payment_failed("m_demo", event())
    with h.executor.engine.begin() as conn:
        conn.execute(actions.update().values(last_error=f"approval withdrawn: customer called, {DECLINE}"))
    for stored in _stored(h, actions.c.last_error):
        _assert_masked(stored)


def test_a_merchant_webhooks_error_is_stored_masked(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """``webhook_deliveries.last_error`` keeps what the merchant's endpoint or the transport answered (shown by the
    order view): it was stored raw while its webhook action's copy of the same text was masked. A failed post, a
    plain update (any other write) and the order view are masked."""

    def refusing(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"proxy refused: {DECLINE}", request=request)

    h = make_harness({"action": "stop"}, receiver=refusing, database_url=database_url)
    h.executor.payment_failed("m_demo", event())
    h.drain()
    assert h.view().webhook.status == "pending"
    _assert_masked(h.view().webhook.last_error)
    (stored,) = _stored(h, webhook_deliveries.c.last_error)
    assert "proxy refused" in stored
    _assert_masked(stored)
    with h.executor.engine.begin() as conn:
        conn.execute(webhook_deliveries.update().values(status="dead", last_error=f"given up: {DECLINE}"))
    (stored,) = _stored(h, webhook_deliveries.c.last_error)
    assert stored.startswith("given up: ")
    _assert_masked(stored)


def test_an_outcomes_decline_text_is_stored_masked(database_url: str) -> None:
    """``POST /v1/outcomes``: a failure's ``error_message`` is kept in the outcome's body, which the history export
    writes as the attempt's; the rest of the body is kept as it came."""
    engine = make_engine(database_url)
    try:
        upgrade(engine)
        body = {
            "decision_id": "dec_1", "order_id": "ord_1", "status": "failure", "occurred_at": "2026-11-02T10:15:05Z",
            "txn_id": "ord_1_2", "error_code": "card_declined", "error_message": DECLINE,
        }  # fmt: skip
        stored = Store(engine).record_outcome("m_demo", body)
        _assert_masked(stored.body["error_message"])
        with engine.connect() as conn:
            (raw,) = conn.execute(sa.select(outcomes.c.body_json)).scalars()
        kept = json.loads(raw)
        _assert_masked(kept.pop("error_message"))
        assert kept == {name: value for name, value in body.items() if name != "error_message"}
    finally:
        engine.dispose()


def test_a_callers_decline_text_is_exported_masked(database_url: str) -> None:
    """A decision's request is stored as the caller sent it (it holds the customer's contact), and its failure's
    decline text became the order's first attempt in the history files: it is masked on the way out."""
    engine = make_engine(database_url)
    try:
        upgrade(engine)
        request = make_request(order_id="ord_1", failure={"error_message": DECLINE})
        answer = {
            "decision_id": "dec_1", "action": "retry", "strategy": "retry_same", "connector": "stripe",
            "channel": None, "propensity": 0.5, "execute_at": request.event_time.isoformat(),
        }  # fmt: skip
        with engine.begin() as conn:
            conn.execute(
                decisions.insert().values(
                    decision_id="dec_1", merchant_id=request.merchant_id, order_id="ord_1",
                    event_time=request.event_time, model_version="rules-only", action="retry",
                    strategy="retry_same", connector="stripe", execute_at=request.event_time, propensity=0.5,
                    request_json=request.model_dump_json(), answer_json=json.dumps(answer),
                    created_at=request.event_time,
                )
            )  # fmt: skip
        Store(engine).record_outcome(
            request.merchant_id,
            {"decision_id": "dec_1", "order_id": "ord_1", "status": "success", "occurred_at": "2026-11-03T10:00:00Z"},
        )
        attempts = all_history_frames(engine)[0]
        (first,) = attempts.loc[attempts["attempt_number"] == 1, "error_message"]
        _assert_masked(first)
    finally:
        engine.dispose()
