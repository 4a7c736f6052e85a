"""Retargeting flow hunt: defects found by driving the executor, its worker and the real adapters.

Each test says what happened before its fix.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from model.history import read_history
from service.api.export import export_history
from service.executor.routes import pay
from service.executor.worker import Worker
from tests.integration.test_executor import (  # noqa: F401 - make_harness is a fixture
    HookConnector,
    demo_merchant,
    event,
    make_harness,
    runtime,
    token_of,
)

LATER = {"action": "retarget", "channel": "sms", "delay": timedelta(hours=6)}
CASCADE = {"action": "retry", "strategy": "cascade", "connector": "adyen"}


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """None (the harness's SQLite file) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("postgres_url"))


def test_an_acknowledged_webhook_is_not_sent_again_when_the_rest_of_its_batch_outlasts_the_lease(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str | None,
) -> None:
    """Before: a webhook's answer was recorded only once its whole batch had run. When the batch's later actions
    (a slow connector, a provider timing out) took longer than the lease, another worker claimed the webhook,
    found its delivery still pending and POSTed it again: the merchant got order.succeeded twice, the first one
    already acknowledged with a 2xx. Now a webhook's answer is recorded as soon as it comes, as a charge's is."""
    h = make_harness(LATER, CASCADE, connector=HookConnector(results=["failure"]), database_url=database_url)
    h.executor.payment_failed("m_demo", event("ord_w"))
    succeeded = {"order_id": "ord_w", "txn_id": "txn_elsewhere", "occurred_at": h.clock.now.isoformat()}
    h.executor.payment_succeeded("m_demo", succeeded | {"idempotency_key": "ok_w"})
    h.clock.advance(seconds=1)
    h.executor.payment_failed("m_demo", event("ord_c"))  # its retry is planned after the webhook
    other = Worker(h.executor, h.effects, "w2", lease_seconds=30)

    def slow_connector() -> None:  # the charge outlasts the first worker's lease; the second worker polls
        h.clock.advance(seconds=31)
        other.run_once()

    h.connector.during["ord_c"] = slow_connector
    h.worker.lease_seconds = 30
    h.worker.run_once()  # one batch: the webhook of ord_w, then the retry of ord_c
    h.drain()
    sent = [json.loads(r.content) for r in h.receiver.received]
    assert [body["event"] for body in sent if body["order_id"] == "ord_w"] == ["order.succeeded"]


def test_a_webhook_whose_lease_ran_out_in_its_batch_is_left_to_the_worker_that_took_it_over(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str | None,
) -> None:
    """Before: a worker reaching a webhook late in a slow batch POSTed it whether or not its claim still held, so
    with another worker that had taken it over after the lease (and was about to post it), the merchant got it
    twice. Now only the claim's holder posts it, its claim kept for the POST."""
    h = make_harness(CASCADE, LATER, connector=HookConnector(results=["failure"]), database_url=database_url)
    h.executor.payment_failed("m_demo", event("ord_c"))  # its retry is planned before the webhook
    h.clock.advance(seconds=1)
    h.executor.payment_failed("m_demo", event("ord_w"))
    succeeded = {"order_id": "ord_w", "txn_id": "txn_elsewhere", "occurred_at": h.clock.now.isoformat()}
    h.executor.payment_succeeded("m_demo", succeeded | {"idempotency_key": "ok_w"})
    taken_over: list[Any] = []

    def slow_connector() -> None:  # the charge outlasts the first worker's lease; a second worker claims
        h.clock.advance(seconds=31)
        taken_over.extend(h.executor.claim(50, 30, "w2", "token-w2"))

    h.connector.during["ord_c"] = slow_connector
    h.worker.lease_seconds = 30
    h.worker.run_once()  # one batch: the retry of ord_c, then the webhook of ord_w
    (webhook,) = [action for action in taken_over if action.kind == "webhook"]
    other = Worker(h.executor, h.effects, "w2")
    other.record([(webhook, h.effects.perform(webhook, None))])
    h.drain()
    sent = [json.loads(r.content) for r in h.receiver.received]
    assert [body["event"] for body in sent if body["order_id"] == "ord_w"] == ["order.succeeded"]


def test_messages_and_the_pay_page_name_the_merchant_as_its_customers_know_it(
    make_harness: Any,  # noqa: F811 - the fixture
) -> None:
    """Before: a message's ``merchant_name`` (the default templates' "Your payment to {{ merchant_name }} did
    not go through") and the pay page were filled with the merchant's config id, so a customer read "Your
    payment to m_demo did not go through": an internal key, in a message asking them to pay through a link. Now
    the merchant config's optional ``display_name`` names the merchant (its id when it has none)."""
    branded = demo_merchant(display_name="Acme & Sons")
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retarget", "channel": "sms"},
        merchants={"m_demo": branded, "m_plain": demo_merchant(api_key_sha256="1" * 64)},
    )
    h.executor.payment_failed("m_demo", event())
    h.executor.payment_failed("m_plain", event("ord_2", merchant_id="m_plain"))
    h.drain()
    names = {m.merchant_id: m.variables["merchant_name"] for m in h.outbox}
    assert names == {"m_demo": "Acme & Sons", "m_plain": "m_plain"}
    page = pay_page_html(h, next(m for m in h.outbox if m.merchant_id == "m_demo"))
    assert "Acme &amp; Sons" in page
    assert "m_demo" not in page


def pay_page_html(h: Any, message: Any) -> str:
    import asyncio

    from service.executor.routes import pay_page

    token = message.variables["link_url"].rsplit("/pay/", 1)[1]
    response = asyncio.run(pay_page(token, runtime(h)))
    assert response.status_code == 200
    return bytes(response.body).decode()


def test_a_payment_through_a_nudges_link_is_exported_with_that_nudges_decision(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str | None,
    tmp_path: Path,
) -> None:
    """Before: the executor stored a payment through the link of its message with no decision_id (nor propensity),
    so its history export wrote the recovered payment tied to no decision, while the export of an order the API's
    caller carried out gives that attempt its nudge's decision: the off-policy evaluation and retraining could not
    credit the executor's recoveries to the decision that sent the link. Now the attempt carries its nudge's
    decision and propensity, and reading the export back warns of nothing (a nudge and the payments through its
    link are one decision's)."""
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        connector=HookConnector(results=["success"]),
        database_url=database_url,
    )
    h.executor.payment_failed("m_demo", event(customer={"country": "IN"}))  # the files need the customer's country
    h.drain()
    paid = asyncio.run(pay(token_of(h), runtime(h)))  # the customer pays on the link page
    assert paid.status_code == 200, bytes(paid.body).decode()[:300]
    url = database_url or h.executor.engine.url.render_as_string(hide_password=False)
    summary = export_history(url, tmp_path / "history")
    assert summary.left_out_orders == ()
    assert (summary.orders, summary.warnings.total) == (1, 0)
    history = read_history(summary.attempts_path, summary.nudges_path, stops_path=summary.stops_path)
    assert history.warnings.total == 0
    (nudge,) = history.nudges.to_dict("records")
    assert (nudge["decision_id"], nudge["propensity"]) == ("dec_1_ord_1", 0.9)
    attempts = history.attempts.sort_values("attempt_number").to_dict("records")
    assert [(a["strategy"], a["status"]) for a in attempts] == [("initial", "failure"), ("retarget_link", "success")]
    assert attempts[1]["nudge_id"] == nudge["nudge_id"]
    assert (attempts[1]["decision_id"], attempts[1]["propensity"]) == ("dec_1_ord_1", 0.9)
