"""The executor's HTTP surface through the real app (create_app, lifespan, SQLite in tmp_path)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from model.history import read_attempts
from service.api.export import export_history
from service.executor.routes import ExecutorRuntime, build_executor_runtime
from service.executor.settings import ExecutorSettings
from tests.factories import make_request
from tests.integration.test_executor import Clock, FakeConnector, ScriptedDecider
from tests.unit.test_api import AUTH, OTHER_KEY, Api, start


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    harness = start(tmp_path)
    yield harness
    harness.close()


def failed_event(order_id: str = "ord_h1", key: str = "evt_h1", **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(
        make_request(order_id=order_id, customer={"phone": "+919800000001"}, **overrides).model_dump_json()
    )
    return body | {"idempotency_key": key}


def executor_of(api: Api, connector: FakeConnector) -> ExecutorRuntime:
    runtime = build_executor_runtime(api.runtime, ExecutorSettings(database_url=api.runtime.settings.database_url))
    runtime.effects.connectors.overrides = {"*": connector}
    api.app.state.executor = runtime
    return runtime


def test_events_answer_202_idempotently_and_409_on_a_changed_body(api: Api) -> None:
    first = api.post("/v1/events/payment-failed", failed_event())
    assert first.status_code == 202
    assert first.json()["order_id"] == "ord_h1"
    assert first.json()["state"] in {"PENDING", "FAILED"}
    again = api.post("/v1/events/payment-failed", failed_event())
    assert (again.status_code, again.json()) == (202, first.json())
    conflict = api.post("/v1/events/payment-failed", failed_event(amount=1.0))
    assert conflict.status_code == 409
    assert "evt_h1" in conflict.json()["detail"]
    assert api.post("/v1/events/payment-failed", failed_event(), key=OTHER_KEY).status_code == 403
    assert api.post("/v1/events/payment-failed", failed_event(), key=None).status_code == 401

    order = api.loop.run_until_complete(api.client.get("/v1/orders/ord_h1", headers=AUTH))
    assert order.status_code == 200
    body = order.json()
    assert [a["processor_payment_id"] for a in body["attempts"]] == ["ord_h1_1"]
    assert len(body["decisions"]) == 1
    missing = api.loop.run_until_complete(api.client.get("/v1/orders/nope", headers=AUTH))
    assert missing.status_code == 404

    succeeded = {"order_id": "ord_h1", "txn_id": "t9", "occurred_at": "2026-11-01T11:00:00Z", "idempotency_key": "s1"}
    if body["state"] == "PENDING":
        answer = api.post("/v1/events/payment-succeeded", succeeded)
        assert (answer.status_code, answer.json()["state"]) == (202, "SUCCEEDED")
    unknown = api.post("/v1/events/payment-succeeded", succeeded | {"order_id": "nope", "idempotency_key": "s2"})
    assert unknown.status_code == 404


def _issued_links(api: Api) -> tuple[ExecutorRuntime, str, str]:
    """(runtime, token, expired token) of order ord_h1, pending, whose link is on record; a payment succeeds."""
    runtime = executor_of(api, FakeConnector(results=["success"]))
    executor = runtime.executor
    later = {"action": "retry", "strategy": "cascade", "connector": "adyen", "delay": timedelta(days=1)}
    executor.decider = ScriptedDecider(Clock(), later)
    api.post("/v1/events/payment-failed", failed_event())
    now = executor.clock()
    token_id, token, _ = executor.new_link("m_demo", "ord_h1", "k1", now)
    _, expired_token, _ = executor.new_link("m_demo", "ord_h1", "k2", now - timedelta(hours=100))
    from service.executor.store import payment_links

    with executor.engine.begin() as conn:
        conn.execute(
            payment_links.insert(),
            [
                {
                    "token_id": token_id,
                    "merchant_id": "m_demo",
                    "order_id": "ord_h1",
                    "expires_at": now + timedelta(hours=48),
                    "created_at": now,
                },
            ],
        )
    assert executor.order_state("m_demo", "ord_h1") == "PENDING"
    return runtime, token, expired_token


def test_pay_pages_for_valid_tampered_reused_and_expired_links(api: Api) -> None:
    runtime, token, expired_token = _issued_links(api)
    executor = runtime.executor

    page = api.get(f"/pay/{token}")
    assert page.status_code == 200
    assert "499.00 INR" in page.text
    # The expiry as the message carrying the link says it: the merchant's local time (Asia/Kolkata), not UTC.
    local_expiry = (executor.clock() + timedelta(hours=48)).astimezone(ZoneInfo("Asia/Kolkata"))
    assert f"expires {local_expiry:%Y-%m-%d %H:%M} IST." in page.text
    assert 'action="/pay/' in page.text

    tampered = api.get(f"/pay/{token[:-4]}AAAA")
    assert tampered.status_code == 400
    assert "not valid" in tampered.text
    assert "Traceback" not in tampered.text
    assert api.get(f"/pay/{expired_token}").status_code == 410

    paid = api.loop.run_until_complete(api.client.post(f"/pay/{token}"))
    assert paid.status_code == 200
    assert "is paid" in paid.text
    assert executor.order_state("m_demo", "ord_h1") == "SUCCEEDED"
    reused = api.loop.run_until_complete(api.client.post(f"/pay/{token}"))
    assert reused.status_code == 409
    assert "already used" in reused.text


def test_pay_pages_are_never_cached_framed_or_named_in_a_referer(api: Api) -> None:
    """(Security review.) A payment link's URL is the customer's credential: whoever holds it pays, and sees the
    order and amount. Its pages went out with no header at all: a browser or a shared proxy could keep them (the
    back button on a shared phone), another site could frame the pay button, and a Referer could carry the URL."""
    _, token, _ = _issued_links(api)
    pages = [
        api.get(f"/pay/{token}"),
        api.get(f"/pay/{token[:-4]}AAAA"),
        api.loop.run_until_complete(api.client.post(f"/pay/{token}")),
        api.loop.run_until_complete(api.client.post(f"/pay/{token}")),
    ]
    assert [page.status_code for page in pages] == [200, 400, 200, 409]
    for page in pages:
        assert page.headers["cache-control"] == "no-store"
        assert page.headers["referrer-policy"] == "no-referrer"
        assert page.headers["x-frame-options"] == "DENY"
        policy = page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy
        assert "default-src 'none'" in policy
        assert "script-src" not in policy  # no script may run on a payment page


def _history_attempt(number: int, **extra: Any) -> dict[str, Any]:
    return {
        "attempt_number": number, "connector": "stripe", "strategy": "initial" if number == 1 else "retry_same",
        "status": "failure", "error_code": "card_declined", "created_at": f"2026-11-01T10:0{number}:00Z",
    } | extra  # fmt: skip


@pytest.mark.parametrize(
    ("attempts", "named"),
    [
        ([_history_attempt(1), _history_attempt(1)], "attempts[1].attempt_number: attempt 1 is listed twice"),
        ([_history_attempt(1, txn_id="t" * 65)], "attempts[0].txn_id: longer than 64 characters"),
        (
            [_history_attempt(1, txn_id="pi_1"), _history_attempt(2, txn_id="pi_1")],
            "attempts[1].txn_id: 'pi_1' is listed twice",
        ),
    ],
)
def test_a_failure_event_whose_history_cannot_be_stored_is_a_422_naming_the_attempt(
    api: Api, attempts: list[dict[str, Any]], named: str
) -> None:
    """(Hunt.) Two attempts under one number, or a caller's txn_id wider than the store's, raised a database error
    in the middle of the event (HTTP 500, after three tries of the transaction)."""
    executor_of(api, FakeConnector())
    answer = api.post("/v1/events/payment-failed", failed_event(history={"attempts": attempts, "nudges": []}))
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["field"] == "history"
    assert named in answer.json()["message"]
    assert api.loop.run_until_complete(api.client.get("/v1/orders/ord_h1", headers=AUTH)).status_code == 404


def test_a_history_txn_id_another_order_has_is_a_409_naming_it(api: Api) -> None:
    """(Review.) txn_ids are unique across the history files (CONTRACT.md section 3), and the store keys attempts
    by them: a second order's history reusing the first's ``pi_1`` raised the database's IntegrityError (a 500)."""
    executor_of(api, FakeConnector())
    first = failed_event(history={"attempts": [_history_attempt(1, txn_id="pi_1")], "nudges": []})
    assert api.post("/v1/events/payment-failed", first).status_code == 202
    second = failed_event(
        order_id="ord_h2", key="evt_h2", history={"attempts": [_history_attempt(1, txn_id="pi_1")], "nudges": []}
    )
    answer = api.post("/v1/events/payment-failed", second)
    assert answer.status_code == 409, answer.text
    assert "txn_id: 'pi_1' is already the txn_id of another order's attempt" in answer.text
    assert api.loop.run_until_complete(api.client.get("/v1/orders/ord_h2", headers=AUTH)).status_code == 404
    # The same event again (a retry of the caller's request) is the first order's answer, not a conflict.
    assert api.post("/v1/events/payment-failed", first).status_code == 202


def _with_key_written_twice(body: dict[str, Any], where: str, first: str) -> bytes:
    """``body`` as JSON text, with ``first`` (``"key": value, ``) written again at the start of the object that
    begins with ``where`` in that text: the key then appears twice in that object, ``first`` before the original."""
    text = json.dumps(body)
    assert where in text
    return text.replace(where, where + first, 1).encode()


@pytest.mark.parametrize(
    ("where", "first", "field"),
    [
        ("{", '"amount": 1, ', "amount"),  # the body's own amount follows: 499.0 was charged, 1 was meant (or not)
        ('"customer": {', '"id": "cus_other", ', "customer.id"),
        ('"attempts": [{', '"connector": "adyen", ', "history.attempts[0].connector"),
    ],
)
def test_a_failure_event_writing_a_key_twice_is_a_422_naming_the_key_and_nothing_is_stored(
    api: Api, where: str, first: str, field: str
) -> None:
    """JSON keeps the last of two equal keys without a word: ``{"amount": 1, ..., "amount": 499.0}`` was taken as
    499.0, and the switch the merchant's code took it from may have read 1. Now the contract's 422 names the key."""
    executor_of(api, FakeConnector())
    headers = {"Content-Type": "application/json", **AUTH}
    answer = api.post_raw("/v1/events/payment-failed", _with_key_written_twice(failed_event(), where, first), headers)
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert body["message"] == (
        f"{field}: written twice in one object: one of its values would be dropped without a word; send the key once"
    )
    assert body["detail"][0]["field"] == field
    assert api.loop.run_until_complete(api.client.get("/v1/orders/ord_h1", headers=AUTH)).status_code == 404
    # Who sends it comes first: without the merchant's key the answer is the 401, not what the body holds.
    answer = api.post_raw(
        "/v1/events/payment-failed",
        _with_key_written_twice(failed_event(), where, first),
        {"Content-Type": "application/json"},
    )
    assert answer.status_code == 401


def test_a_success_event_writing_a_key_twice_is_a_422_and_cancels_nothing(api: Api) -> None:
    executor_of(api, FakeConnector())
    assert api.post("/v1/events/payment-failed", failed_event()).status_code == 202
    succeeded = {"order_id": "ord_h1", "txn_id": "t9", "occurred_at": "2026-11-01T11:00:00Z", "idempotency_key": "s1"}
    twice = _with_key_written_twice(succeeded, "{", '"order_id": "ord_other", ')
    answer = api.post_raw("/v1/events/payment-succeeded", twice, {"Content-Type": "application/json", **AUTH})
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["field"] == "order_id"
    order = api.loop.run_until_complete(api.client.get("/v1/orders/ord_h1", headers=AUTH)).json()
    assert order["state"] != "SUCCEEDED"


def test_a_merchants_txn_ids_never_take_nor_reveal_another_merchants(tmp_path: Path, database_url: str) -> None:
    """(Security review.) Attempts were keyed by txn_id alone, across merchants: a failure event whose history
    named an id another merchant's attempt had was a 409 saying so (any merchant could probe for any id), and one
    naming an id before its merchant did (a switch's ``<order_id>_<n>``, or the ``txn_`` id winback derives from
    merchant, order and attempt) kept that merchant from ever handing the order over."""
    api = start(tmp_path, database_url=database_url)
    try:
        executor_of(api, FakeConnector())
        own = failed_event(order_id="ord_v1", key="v1")
        assert api.post("/v1/events/payment-failed", own).status_code == 202
        view = api.loop.run_until_complete(api.client.get("/v1/orders/ord_v1", headers=AUTH)).json()
        derived = view["attempts"][0]["txn_id"]
        squatted = {"attempts": [_history_attempt(1, txn_id="ord_v2_1")], "nudges": []}
        for order_id, history in [("ord_a1", {"attempts": [_history_attempt(1, txn_id=derived)], "nudges": []}),
                                  ("ord_a2", squatted)]:  # fmt: skip
            other = failed_event(order_id=order_id, key=order_id, merchant_id="m_other", history=history)
            answer = api.post("/v1/events/payment-failed", other, key=OTHER_KEY)
            assert answer.status_code == 202, answer.text
        victim = api.post("/v1/events/payment-failed", failed_event(order_id="ord_v2", key="v2", history=squatted))
        assert victim.status_code == 202, victim.text
        view = api.loop.run_until_complete(api.client.get("/v1/orders/ord_v2", headers=AUTH)).json()
        assert [attempt["txn_id"] for attempt in view["attempts"]] == ["ord_v2_1"]
        # The merchant's own ids stay unique: the same id on another of its orders is still refused.
        again = failed_event(order_id="ord_v3", key="v3", history=squatted)
        assert api.post("/v1/events/payment-failed", again).status_code == 409
        # The history files key attempts by txn_id: an id two merchants use is written per merchant.
        summary = export_history(database_url, tmp_path / "history")
        attempts = read_attempts(summary.attempts_path)
        assert attempts["txn_id"].is_unique
        assert {"m_demo/ord_v2_1", "m_other/ord_v2_1", f"m_demo/{derived}", f"m_other/{derived}"} <= set(
            attempts["txn_id"]
        )
    finally:
        api.close()
