"""A charge whose answer never came is settled from its switch's status; a late success on a settled order is
refunded through its switch (never a second merchant webhook); a charge taken as never charged (an operator's "not
charged", the switch's "not found", which is asked once more later) that turns out charged settles its open order or
is refunded. Real executor and worker, scripted decide(), a switch behind ``HttpConnector`` (httpx MockTransport, or
the real sandbox switch over HTTP), on SQLite and PostgreSQL (``database_url``)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from pipelines.cli import app as cli
from service.api.app import create_app
from service.console.auth import add_agent
from service.console.routes import build_console_runtime
from service.console.settings import ConsoleSettings
from service.console.store import audit_log
from service.executor.connectors import CircuitBreaker, HttpConnector
from service.executor.core import (
    NOT_FOUND_RECHECK_DELAY,
    REFUND_WAIT_FOR_SWITCH,
    SWITCH_SILENCE_LIMIT,
    ChargeDispute,
    Permanent,
    charge_disputes,
    paid_twice,
    refunds_by_hand,
    txn_id_for,
)
from service.executor.links import LinkError
from service.executor.metrics import (
    ChargeDisputesCollector,
    ChecksAskedNoMoreCollector,
    PaidTwiceCollector,
    RefundsByHandCollector,
)
from service.executor.sandbox import start_sandbox
from service.executor.store import actions, orders
from tests.integration.test_console import PASSWORD, Console, _rows, flash, flash_kind
from tests.integration.test_executor import (  # noqa: F401 - make_harness is a fixture
    PAID_BY_MERCHANT,
    FakeConnector,
    Harness,
    _claim_due,
    _order_row,
    event,
    make_harness,
    webhook_events,
)
from tests.unit.test_api import Api, settings_for

RETRY = {"action": "retry", "strategy": "cascade", "connector": "adyen"}


def to_the_second(moment: datetime) -> str:
    """A moment as the operators' CLI lists write it: UTC, to the second, with a Z."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


MakeHarness = Callable[..., Harness]


@dataclass
class FullSwitch:
    """A payment switch: charges once per idempotency key (``statuses`` in turn, then ``succeeded``; ``failed`` is
    declined ``do_not_honor``, ``failed:<code>`` with that code), answers a
    payment's status by its id, refunds a succeeded payment once per key.

    ``lose_answers``: a charge is made and its answer times out; ``drop_charges``: a charge times out before the
    switch records it (``hold_charges``: and reaches it later, at ``deliver_held()``); ``status_mode``: ``answer``,
    ``timeout`` or ``no_route`` (a plain 404, no such endpoint); ``refund_answers``: HTTP statuses answered to refund
    calls in turn before the refund is made (then 200)."""

    statuses: list[str] = field(default_factory=list)
    lose_answers: bool = False
    drop_charges: bool = False
    hold_charges: bool = False
    held: list[httpx.Request] = field(default_factory=list)
    status_mode: str = "answer"
    refund_answers: list[int] = field(default_factory=list)
    payments: dict[str, dict[str, Any]] = field(default_factory=dict)
    refunds: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.calls.append((request.method, path))
        if request.method == "POST" and path == "/v1/payments":
            return self._charge(request)
        if request.method == "GET" and path.startswith("/v1/payments/"):
            return self._status(request, path.rsplit("/", 1)[1])
        if request.method == "POST" and path.endswith("/refunds"):
            return self._refund(request, path.split("/")[3])
        return httpx.Response(404, text="no such route")

    def _charge(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if self.drop_charges:
            if self.hold_charges:
                self.held.append(request)
            raise httpx.ReadTimeout("read timed out", request=request)
        key = request.headers["Idempotency-Key"]
        if key not in self.keys:
            status, _, code = (self.statuses.pop(0) if self.statuses else "succeeded").partition(":")
            answer: dict[str, Any] = {"status": status, "connector": body["connector"]}
            if status == "failed":
                answer |= {"error_code": code or "do_not_honor", "network_decline_code": "05"}
            self.keys[key] = body["payment_id"]
            self.payments[body["payment_id"]] = answer
        if self.lose_answers:
            raise httpx.ReadTimeout("read timed out", request=request)
        return httpx.Response(200, json=self.payments[self.keys[key]])

    def _status(self, request: httpx.Request, payment_id: str) -> httpx.Response:
        if self.status_mode == "timeout":
            raise httpx.ReadTimeout("read timed out", request=request)
        if self.status_mode == "no_route":
            return httpx.Response(404, text="Not Found")
        if payment_id not in self.payments:
            return httpx.Response(404, json={"error": {"code": "payment_not_found", "message": "no such payment"}})
        return httpx.Response(200, json=self.payments[payment_id])

    def _refund(self, request: httpx.Request, payment_id: str) -> httpx.Response:
        if self.refund_answers:
            return httpx.Response(self.refund_answers.pop(0), json={"error": {"code": "refused"}})
        if payment_id not in self.payments:  # as the sandbox switch: nothing to give back
            return httpx.Response(404, json={"error": {"code": "payment_not_found"}})
        if self.payments[payment_id]["status"] != "succeeded":
            return httpx.Response(422, json={"error": {"code": "payment_not_succeeded"}})
        key = request.headers["Idempotency-Key"]
        if key not in self.refunds:
            body = json.loads(request.content)
            self.refunds[key] = {
                "refund_id": f"rf_{len(self.refunds) + 1}",
                "payment_id": payment_id,
                "status": "succeeded",
                "amount": body["amount"],
            }
        return httpx.Response(200, json=self.refunds[key])

    def deliver_held(self) -> None:
        """The sends that timed out on the way reach the switch now: the first charges, the re-sends repeat it."""
        held, self.held, self.drop_charges = self.held, [], False
        for request in held:
            self._charge(request)

    def refunded(self) -> list[str]:
        return [answer["payment_id"] for answer in self.refunds.values()]


def through(switch: FullSwitch) -> HttpConnector:
    # A breaker that never opens: the tests' timeouts would open the default one for 30 s of real time.
    return HttpConnector(
        "adyen",
        "http://switch.test",
        None,
        breaker=CircuitBreaker("adyen", threshold=10_000),
        client=httpx.Client(transport=httpx.MockTransport(switch)),
        sleep=lambda _s: None,
    )


def charged_after_the_merchant_was_paid(h: Harness) -> Any:
    """The order's retry is charged as the merchant reports the order paid (``PAID_BY_MERCHANT``), and its
    success recorded after that; the retry action."""
    retry = _claim_due(h, "retry")
    outcome = h.effects.perform(retry, _order_row(h))  # the switch charges ord_1_2 ...
    assert h.executor.payment_succeeded("m_demo", PAID_BY_MERCHANT).state == "SUCCEEDED"  # ... as the merchant's
    h.worker.record([(retry, outcome)])
    return retry


def run_for(h: Harness, seconds: int, step: int = 31) -> None:
    for _ in range(seconds // step + 1):
        h.drain()
        h.clock.advance(seconds=step)
    h.drain()


def of_kind(h: Harness, kind: str) -> list[Any]:
    return [a for a in h.view().actions if a.kind == kind]


def lost_charge(
    build: MakeHarness, database_url: str, switch: FullSwitch, *steps: dict[str, Any], **failed: Any
) -> Harness:
    """An order whose retry (payment ord_1_2) went to ``switch`` and whose every answer was lost: dead-lettered
    unanswered after its 2 tries. ``failed``: the payment-failed event's overrides."""
    h = build(RETRY, *steps, connector=through(switch), max_attempts=2, database_url=database_url)
    h.executor.payment_failed("m_demo", event(**failed))
    switch.lose_answers = switch.lose_answers or not switch.drop_charges
    h.drain()
    h.clock.advance(seconds=5)
    h.drain()  # the re-send, answer lost again: dead-lettered, the charge unknown
    retry = of_kind(h, "retry")[0]
    assert (retry.state, retry.unanswered_since is not None) == ("dead", True), retry
    switch.lose_answers = switch.drop_charges = False
    return h


# ------------------------------------------------------------------------------- 1. the status check


def test_a_charge_whose_answer_was_lost_is_settled_from_the_switchs_status(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    switch = FullSwitch(statuses=["succeeded"])
    h = lost_charge(make_harness, database_url, switch)
    assert h.view().state == "PENDING"
    run_for(h, 90)  # the switch is asked a minute after the dead-letter
    view = h.view()
    assert view.state == "SUCCEEDED", [(a.kind, a.state, a.last_error) for a in view.actions]
    assert [(a.attempt_number, a.status) for a in view.attempts] == [(1, "failure"), (2, "success")]
    retry = of_kind(h, "retry")[0]
    assert (retry.state, retry.unanswered_since) == ("done", None)
    assert "resolved by the switch: charged" in (retry.last_error or "")
    assert ("GET", "/v1/payments/ord_1_2") in switch.calls
    run_for(h, 3600 * 3, step=600)
    assert webhook_events(h) == ["order.succeeded"]  # exactly once
    assert switch.refunds == {}


def test_a_lost_charge_the_switch_declined_is_carried_on_as_a_decline(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    switch = FullSwitch(statuses=["failed"])
    h = lost_charge(make_harness, database_url, switch, {"action": "stop"})
    assert len(h.view().decisions) == 1
    run_for(h, 120)  # the switch says declined: the decline is recorded and the order decided again (a stop)
    view = h.view()
    assert [(a.attempt_number, a.status, a.error_code) for a in view.attempts] == [
        (1, "failure", "processing_error"),
        (2, "failure", "do_not_honor"),
    ]
    assert [d["action"] for d in view.decisions] == ["retry", "stop"]
    assert view.state == "FAILED"
    retry = of_kind(h, "retry")[0]
    assert (retry.state, retry.unanswered_since) == ("done", None)
    assert "resolved by the switch: declined (do_not_honor)" in (retry.last_error or "")
    h.drain()
    assert webhook_events(h) == ["order.failed"]


def test_a_lost_charge_the_switch_never_got_is_sent_again_as_the_same_charge(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """404 payment_not_found: nothing was taken; the charge goes again at once under its own key and payment id,
    not as a new attempt (the scripted second retry is never asked for)."""
    switch = FullSwitch(drop_charges=True)
    h = lost_charge(make_harness, database_url, switch, RETRY)
    assert switch.payments == {}  # the timeouts came before the switch recorded anything
    run_for(h, 120)
    view = h.view()
    [retry] = of_kind(h, "retry")
    assert (retry.state, retry.unanswered_since) == ("done", None)
    assert "sent again as the same charge (same idempotency key and payment id)" in (
        of_kind(h, "charge_status")[0].last_error or ""
    )
    assert view.state == "SUCCEEDED"
    assert [(a.attempt_number, a.status) for a in view.attempts] == [(1, "failure"), (2, "success")]
    assert list(switch.payments) == ["ord_1_2"]  # one charge, under the first send's payment id
    assert len(switch.keys) == 1
    h.drain()
    assert webhook_events(h) == ["order.succeeded"]


def test_a_send_again_after_not_found_that_the_rules_now_forbid_is_not_sent_and_the_order_decided_again(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """A one-off payment's retry may go only within 10 minutes of its customer's checkout (hard_rules.yaml,
    silent_retry_in_session_minutes). Its sends never reach the switch, whose status answers time out for an hour,
    then say "not found". It was sent again then as the same charge, charging the customer an hour after they left
    the checkout. Now the rules are checked again first: it is not sent, it is taken as never charged, and the order
    is decided again (the script's stop: failed), as a first send the rules refuse is."""
    switch = FullSwitch(drop_charges=True)
    h = lost_charge(make_harness, database_url, switch, {"action": "stop"}, payment={"is_recurring": False})
    switch.status_mode = "timeout"
    run_for(h, 600)  # the check's tries time out: asked again in an hour
    switch.status_mode = "answer"
    run_for(h, 3600, step=600)  # "not found", out of the checkout window
    assert switch.payments == {}, switch.payments  # never charged
    [retry] = of_kind(h, "retry")
    assert (retry.state, retry.unanswered_since) == ("dead", None), retry
    note = of_kind(h, "charge_status")[0].last_error or ""
    assert "not sent again: not allowed now: one_off_out_of_session" in note, note
    assert h.view().state == "FAILED"
    assert webhook_events(h) == ["order.failed"]


def test_a_switch_that_does_not_answer_leaves_the_charge_unknown_and_is_asked_again_hourly(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    switch = FullSwitch(statuses=["succeeded"])
    h = lost_charge(make_harness, database_url, switch, {"action": "stop"})
    switch.status_mode = "timeout"
    run_for(h, 600)  # the check's 2 tries time out: asked again in an hour, the charge stays unknown
    check = of_kind(h, "charge_status")[0]
    assert check.state == "scheduled", check
    assert "ReadTimeout" in (check.last_error or "")
    assert check.due_at >= h.clock.now + timedelta(minutes=45)
    asked = switch.calls.count(("GET", "/v1/payments/ord_1_2"))
    run_for(h, 3600 * 2, step=600)  # still no answer: asked again each hour
    assert switch.calls.count(("GET", "/v1/payments/ord_1_2")) > asked
    assert h.view().state == "PENDING"
    assert webhook_events(h) == []
    switch.status_mode = "answer"
    run_for(h, 3600, step=600)
    assert h.view().state == "SUCCEEDED"
    h.drain()
    assert webhook_events(h) == ["order.succeeded"]


def test_a_switch_without_a_status_endpoint_is_not_taken_for_payment_not_found(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """A plain 404 (no such route) must not read as "never charged": the next retry would charge a second time."""
    switch = FullSwitch(statuses=["succeeded"])
    h = lost_charge(make_harness, database_url, switch, RETRY)
    switch.status_mode = "no_route"
    run_for(h, 120)
    check = of_kind(h, "charge_status")[0]
    assert check.state == "dead"
    assert "payment_not_found" in (check.last_error or "")
    assert h.view().state == "PENDING"
    assert list(switch.payments) == ["ord_1_2"]  # no second charge
    retry_id = of_kind(h, "retry")[0].action_id
    assert h.executor.resolve_charge(retry_id, charged=True) == "SUCCEEDED"  # the operator's answer stays


# ------------------------------------------------------------------------------- 2. refunds of duplicates


def test_a_late_success_on_an_order_paid_since_is_refunded_once_without_a_second_webhook(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    switch = FullSwitch(statuses=["succeeded"], refund_answers=[503, 503, 503])
    h = make_harness(RETRY, connector=through(switch), database_url=database_url)
    h.executor.payment_failed("m_demo", event())
    with caplog.at_level(logging.WARNING, logger="winback.executor"):
        retry = charged_after_the_merchant_was_paid(h)
        run_for(h, 120, step=10)  # the refund's first send gets 503 three times: tried again, same key
    view = h.view()
    assert view.success_txn_id == "txn_ext"
    refund = of_kind(h, "refund")
    assert [(a.state, a.attempts) for a in refund] == [("done", 2)], refund
    assert "refunded through connector 'adyen': succeeded (refund rf_1)" in (refund[0].last_error or "")
    assert switch.refunded() == ["ord_1_2"]
    refund_calls = [c for c in switch.calls if c == ("POST", "/v1/payments/ord_1_2/refunds")]
    assert len(refund_calls) == 4  # 3 x 503 on the first send, then the same key again
    with h.executor.engine.connect() as conn:
        keys = list(conn.scalars(sa.select(actions.c.idempotency_key).where(actions.c.kind == "refund")))
    assert keys == [f"{retry.idempotency_key}:refund"]
    assert any("a refund may be needed" in r.getMessage() for r in caplog.records)
    run_for(h, 3600, step=600)
    assert webhook_events(h) == ["order.succeeded"]  # one webhook, for the merchant's payment
    assert [a.status for a in view.attempts if a.attempt_number == 2] == ["success"]  # the money taken is on record


def test_an_unknown_charge_on_an_order_the_merchant_reports_paid_is_checked_and_refunded(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    switch = FullSwitch(statuses=["succeeded"])
    h = lost_charge(make_harness, database_url, switch)
    assert h.executor.payment_succeeded("m_demo", PAID_BY_MERCHANT).state == "SUCCEEDED"
    run_for(h, 120)  # settling does not cancel the check; the switch says ord_1_2 succeeded: a duplicate
    assert of_kind(h, "charge_status")[0].state == "done"
    assert [a.state for a in of_kind(h, "refund")] == ["done"]
    assert switch.refunded() == ["ord_1_2"]
    assert h.view().success_txn_id == "txn_ext"
    assert webhook_events(h) == ["order.succeeded"]


@pytest.mark.parametrize("named_by", ["processor payment id", "winback's txn id"])
def test_a_merchants_payment_succeeded_naming_winbacks_own_charge_is_not_refunded(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    named_by: str,
) -> None:
    """The answer to winback's charge is lost, the merchant hears of its success from its switch first and reports
    the order paid with that payment as its txn_id (``ord_1_2``, the processor payment id CONTRACT.md section 5
    gives attempt 2, or winback's own txn id of it). The status check then finds ord_1_2 succeeded: it is the
    order's one payment, recorded, and not refunded as a duplicate (it was: the customer got the money back for an
    order the merchant had been told was paid)."""
    switch = FullSwitch(statuses=["succeeded"])
    h = lost_charge(make_harness, database_url, switch)
    with h.executor.engine.connect() as conn:
        key = conn.scalar(sa.select(actions.c.idempotency_key).where(actions.c.kind == "retry"))
    txn_id = "ord_1_2" if named_by == "processor payment id" else txn_id_for(key)
    reported = PAID_BY_MERCHANT | {"txn_id": txn_id, "idempotency_key": "paid-by-winbacks-own-charge"}
    assert h.executor.payment_succeeded("m_demo", reported).state == "SUCCEEDED"
    run_for(h, 3600 * 2, step=120)  # the check: ord_1_2 succeeded
    view = h.view()
    assert of_kind(h, "refund") == []
    assert switch.refunds == {}
    assert (view.state, view.success_txn_id) == ("SUCCEEDED", txn_id)
    assert [(a.attempt_number, a.status) for a in view.attempts] == [(1, "failure"), (2, "success")]
    assert webhook_events(h) == ["order.succeeded"]


def reported_paid_by_winbacks_charge(h: Harness, named_by: str, key: str = "paid-by-winbacks-own-charge") -> str:
    """The merchant's ``payment-succeeded`` naming winback's retry (payment ord_1_2) as the order's payment, by its
    processor payment id or by winback's txn id of it; the txn_id it named."""
    with h.executor.engine.connect() as conn:
        charge_key = conn.scalar(sa.select(actions.c.idempotency_key).where(actions.c.kind == "retry"))
    txn_id = "ord_1_2" if named_by == "processor payment id" else txn_id_for(charge_key)
    reported = PAID_BY_MERCHANT | {"txn_id": txn_id, "idempotency_key": key}
    assert h.executor.payment_succeeded("m_demo", reported).state == "SUCCEEDED"
    return txn_id


def assert_disputed_on_the_merchants_word(
    h: Harness, switch: FullSwitch, txn_id: str, said: str, logged: list[str], *, operator_too: bool = False
) -> None:
    """The switch's ``said`` contradicts the merchant's report of ord_1_2 (and an operator's "charged"): a charge
    dispute, flagged once, logged, counted as the merchant's; the order keeps its one success and webhook, nothing
    is refunded, and no log line asks for a refund."""
    [dispute] = disputes_of(h)
    assert (dispute.payment_id, dispute.switch_said, dispute.said_by, dispute.merchant_txn_id) == (
        "ord_1_2",
        said,
        "merchant",
        txn_id,
    )
    assert (dispute.order_state, dispute.settled_by_it, dispute.open) == ("SUCCEEDED", True, True)
    assert dispute.operator_said_charged is operator_too
    label = "not_found" if said.startswith("not found") else "declined"
    assert disputes_counted(h, switch_said=label, said_by="merchant") == 1
    assert open_disputes_counted(h, switch_said=label, said_by="merchant") == 1
    assert disputes_counted(h, switch_said=label, said_by="operator") == 0
    [flagged] = [m for m in logged if "charge disputed" in m]
    assert f"the merchant reported it paid (txn_id {txn_id!r})" in flagged
    assert f"the switch says {said}" in flagged
    assert "nothing is refunded" in flagged
    assert not [m for m in logged if "refund may be needed" in m or "refund it by hand" in m], logged
    assert f"disputed: the merchant reported it paid (txn_id {txn_id!r})" in (
        of_kind(h, "charge_status")[-1].last_error or ""
    )
    run_for(h, 3600 * 3, step=600)  # nothing more: no refund, no second webhook, flagged once
    view = h.view()
    assert (view.state, view.success_txn_id) == ("SUCCEEDED", txn_id)
    assert webhook_events(h) == ["order.succeeded"]
    assert of_kind(h, "refund") == []
    assert refund_calls(switch) == []
    assert len(disputes_of(h)) == 1


@pytest.mark.parametrize("operator_too", [False, True])
@pytest.mark.parametrize("named_by", ["processor payment id", "winback's txn id"])
def test_a_decline_of_winbacks_charge_the_merchant_reported_paid_is_a_dispute_not_a_refund(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    caplog: pytest.LogCaptureFixture,
    named_by: str,
    operator_too: bool,
) -> None:
    """The answer to winback's retry is lost; the merchant reports the order paid by that very payment (ord_1_2);
    the switch then says it declined. Nothing of the customer's was taken twice, so "a refund may be needed" was
    wrong, and the merchant, told its order succeeded (its own report, its one webhook), may ship without the
    money: that is a charge dispute, flagged, logged and counted as the merchant's word against the switch's. It
    was recorded as a plain decline, unseen. An operator's "charged" after the merchant's report changes nothing."""
    switch = FullSwitch(statuses=["failed"])
    h = lost_charge(make_harness, database_url, switch)
    with caplog.at_level(logging.WARNING, logger="winback.executor"):
        txn_id = reported_paid_by_winbacks_charge(h, named_by)
        settled = [r.getMessage() for r in caplog.records]
        assert not [m for m in settled if "refund may be needed" in m], settled
        assert [m for m in settled if "it is not refunded; its switch is asked to confirm" in m], settled
        if operator_too:
            assert h.executor.resolve_charge(of_kind(h, "retry")[0].action_id, charged=True) == "SUCCEEDED"
            assert of_kind(h, "refund") == []
        run_for(h, 120)  # the status check: ord_1_2 declined
    # The decline is on record; an operator's "charged" stays the recorded answer, as for any dispute of theirs.
    second = "success" if operator_too else "failure"
    assert [(a.attempt_number, a.status) for a in h.view().attempts] == [(1, "failure"), (2, second)]
    logged = [r.getMessage() for r in caplog.records]
    assert_disputed_on_the_merchants_word(
        h, switch, txn_id, "declined (do_not_honor)", logged, operator_too=operator_too
    )
    assert payment_status_calls(switch) == 1


def test_a_charge_the_merchant_reported_paid_that_the_switch_does_not_find_twice_is_a_dispute(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The switch never got winback's retry, though the merchant reported the order paid by it: "not found", then
    "not found" again at the one more ask, contradicts the merchant as a decline does."""
    switch = FullSwitch(drop_charges=True)
    h = lost_charge(make_harness, database_url, switch)
    with caplog.at_level(logging.WARNING, logger="winback.executor"):
        txn_id = reported_paid_by_winbacks_charge(h, "processor payment id")
        run_for(h, 120)
        assert disputes_of(h) == []  # one "not found" is asked about once more
        run_for(h, int(NOT_FOUND_RECHECK_DELAY.total_seconds()) + 300, step=60)
    assert payment_status_calls(switch) == 2
    assert switch.payments == {}  # never sent again on the settled order
    logged = [r.getMessage() for r in caplog.records]
    assert_disputed_on_the_merchants_word(h, switch, txn_id, "not found (asked twice)", logged)


def test_a_charge_declined_as_the_merchant_reported_it_paid_is_a_dispute_without_asking_the_switch(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The merchant reports the order paid by winback's retry while it is with the switch, whose answer is a
    decline: a dispute at once, flagged on a status check recorded as not asked (the switch answered)."""
    switch = FullSwitch(statuses=["failed"])
    h = make_harness(RETRY, connector=through(switch), database_url=database_url)
    h.executor.payment_failed("m_demo", event())
    retry = _claim_due(h, "retry")
    outcome = h.effects.perform(retry, _order_row(h))  # the switch declines ord_1_2 ...
    with caplog.at_level(logging.WARNING, logger="winback.executor"):
        txn_id = reported_paid_by_winbacks_charge(h, "processor payment id")  # ... as the merchant reports it paid
        h.worker.record([(retry, outcome)])
    [check] = of_kind(h, "charge_status")
    assert (check.state, check.attempts) == ("done", 0)
    assert "not asked: the switch answered the charge itself" in (check.last_error or "")
    logged = [r.getMessage() for r in caplog.records]
    assert_disputed_on_the_merchants_word(h, switch, txn_id, "declined (do_not_honor)", logged)
    assert payment_status_calls(switch) == 0


def test_a_merchant_reporting_paid_a_charge_the_switch_had_declined_is_a_dispute_at_once(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    """Winback's retry was declined (the order goes on with a message); the merchant then reports the order paid by
    that payment: flagged as the report settles the order, and the console's card says whose word it was."""
    switch = FullSwitch(statuses=["failed"])
    h = make_harness(RETRY, RETARGET, connector=through(switch), database_url=database_url)
    h.executor.payment_failed("m_demo", event())
    h.drain()
    assert [(a.attempt_number, a.status) for a in h.view().attempts] == [(1, "failure"), (2, "failure")]
    assert h.view().state == "PENDING"
    with caplog.at_level(logging.WARNING, logger="winback.executor"):
        txn_id = reported_paid_by_winbacks_charge(h, "winback's txn id")
    logged = [r.getMessage() for r in caplog.records]
    assert_disputed_on_the_merchants_word(h, switch, txn_id, "declined (do_not_honor)", logged)
    api = Api(create_app(settings_for(tmp_path, database_url=database_url)))
    try:
        page = signed_in_console(api).get("/console/orders/ord_1").text
        assert "Paid by the merchant's report, the switch says not</h2>" in page, page
        assert f"<code>{txn_id}</code>" in page
        assert "nothing is refunded" in page
        assert "an operator answered" not in page
    finally:
        api.close()


def double_payments_counted(h: Harness) -> float:
    """The Prometheus counter of orders possibly paid twice as a scrape of ``/metrics`` reads it from the database."""
    registry = CollectorRegistry()
    registry.register(PaidTwiceCollector(h.executor.engine, read_every_seconds=0))
    value = registry.get_sample_value("winback_executor_possible_double_payments_total", {"merchant_id": "m_demo"})
    return value or 0.0


def test_a_merchants_own_payment_reported_on_an_order_winbacks_charge_paid_is_flagged_not_refunded(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    """Winback's retry (payment ord_1_2) paid the order; the merchant then reports it paid by a payment of its own
    (txn_ext, none of winback's). The customer may have paid twice: it was ignored without a word. Now a warning
    names the order, winback's charge and the merchant's txn id, /metrics counts it and ``refunds-by-hand`` lists
    it, once, however often the report comes; nothing is refunded, the order keeps winback's success and its one
    webhook. The merchant naming winback's own payment is no such report."""
    switch = FullSwitch(statuses=["succeeded"])
    h = make_harness(RETRY, connector=through(switch), database_url=database_url)
    h.executor.payment_failed("m_demo", event())
    h.drain()
    winbacks = h.view().success_txn_id
    assert (h.view().state, [a.status for a in h.view().attempts]) == ("SUCCEEDED", ["failure", "success"])
    with caplog.at_level(logging.WARNING, logger="winback.executor"):
        named_winbacks = PAID_BY_MERCHANT | {"txn_id": "ord_1_2", "idempotency_key": "names-winbacks"}
        assert h.executor.payment_succeeded("m_demo", named_winbacks).state == "SUCCEEDED"
        assert double_payments_counted(h) == 0
        assert h.executor.payment_succeeded("m_demo", PAID_BY_MERCHANT).state == "SUCCEEDED"
        assert h.executor.payment_succeeded("m_demo", PAID_BY_MERCHANT).state == "SUCCEEDED"  # delivered again
        again = PAID_BY_MERCHANT | {"idempotency_key": "s1-resent-under-a-new-key"}
        assert h.executor.payment_succeeded("m_demo", again).state == "SUCCEEDED"
        run_for(h, 3600, step=600)
    warned = [r for r in caplog.records if "may have paid twice" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]
    [line] = warned
    assert line.levelno == logging.WARNING
    message = line.getMessage()
    assert "order ord_1 " in message
    assert "payment ord_1_2 via adyen" in message
    assert f"txn_id {winbacks}" in message
    assert "txn_id 'txn_ext'" in message
    assert "winback refunds nothing on its own" in message
    assert double_payments_counted(h) == 1
    with h.executor.engine.connect() as conn:
        [found] = paid_twice(conn, "m_demo")
    assert (found.order_id, found.payment_id, found.winback_txn_id, found.merchant_txn_id) == (
        "ord_1",
        "ord_1_2",
        winbacks,
        "txn_ext",
    )
    listed = CliRunner().invoke(cli, ["executor", "refunds-by-hand", "--database-url", database_url])
    assert listed.exit_code == 0, listed.output
    assert listed.output.splitlines() == [
        f"m_demo ord_1 (SUCCEEDED): possibly paid twice: winback's payment ord_1_2 via adyen (txn_id {winbacks}) "
        f"paid it, $499.00, and the merchant reported its own txn_id txn_ext at {to_the_second(found.reported_at)}: "
        "nothing refunded, check with the merchant"
    ]
    view = h.view()
    assert (view.state, view.success_txn_id) == ("SUCCEEDED", winbacks)
    assert webhook_events(h) == ["order.succeeded"]
    assert of_kind(h, "refund") == []
    assert refund_calls(switch) == []
    api = Api(create_app(settings_for(tmp_path, database_url=database_url)))
    try:
        assert 'winback_executor_possible_double_payments_total{merchant_id="m_demo"} 1.0' in api.get("/metrics").text
        page = signed_in_console(api).get("/console/orders/ord_1").text
        assert page.count('data-testid="paid-twice"') == 1, page
        assert "The customer may have paid twice</h2>" in page
        assert "<code>ord_1_2</code>" in page
        assert "txn_id <code>txn_ext</code>" in page
        assert "Winback refunds neither on its own" in page
    finally:
        api.close()


def test_a_refund_the_switch_refuses_is_dead_lettered_with_a_clear_log(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    switch = FullSwitch(statuses=["succeeded"], refund_answers=[422])
    h = make_harness(RETRY, connector=through(switch), database_url=database_url)
    h.executor.payment_failed("m_demo", event())
    charged_after_the_merchant_was_paid(h)
    with caplog.at_level(logging.ERROR, logger="winback.executor"):
        run_for(h, 60)
    refund = of_kind(h, "refund")
    assert [a.state for a in refund] == ["dead"]
    assert "refused the refund of payment 'ord_1_2' with HTTP 422" in (refund[0].last_error or "")
    assert "must be refunded by hand" in (refund[0].last_error or "")
    logged = [r.getMessage() for r in caplog.records if "refund it by hand" in r.getMessage()]
    assert logged, [r.getMessage() for r in caplog.records]
    assert "ord_1_2" in logged[0]
    assert webhook_events(h) == ["order.succeeded"]


def test_a_connector_that_cannot_refund_says_so_on_the_order(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    h = make_harness(RETRY, connector=FakeConnector(results=["success"]), database_url=database_url)
    h.executor.payment_failed("m_demo", event())
    charged_after_the_merchant_was_paid(h)
    h.drain()
    refund = of_kind(h, "refund")
    assert [a.state for a in refund] == ["dead"]
    assert refund[0].last_error == "connector 'adyen' cannot refund; payment ord_1_2 was charged twice and must be " + (
        "refunded by hand"
    )
    assert webhook_events(h) == ["order.succeeded"]


# ------------------------------------------------------------------------------- 3. charged after all

RETARGET = {"action": "retarget", "channel": "whatsapp"}


def link_token(h: Harness) -> str:
    return str(h.outbox[-1].variables["link_url"]).rsplit("/pay/", 1)[1]


def payment_status_calls(switch: FullSwitch, payment_id: str = "ord_1_2") -> int:
    return switch.calls.count(("GET", f"/v1/payments/{payment_id}"))


def assert_settled_by_the_late_success(h: Harness, switch: FullSwitch, token: str) -> None:
    """The order succeeded on payment ord_1_2, found charged after it was taken as never charged: one webhook, its
    payment link and follow-up stopped, nothing refunded."""
    view = h.view()
    assert view.state == "SUCCEEDED", [(a.kind, a.state, a.last_error) for a in view.actions]
    assert [(a.attempt_number, a.status) for a in view.attempts] == [(1, "failure"), (2, "success")]
    assert view.success_txn_id == view.attempts[-1].txn_id
    retry = of_kind(h, "retry")[0]
    assert retry.state == "done"
    assert "the switch answered later: charged" in (retry.last_error or "")
    with pytest.raises(LinkError) as paid:
        h.executor.open_link(token)
    assert paid.value.status_code == 409
    assert [a.state for a in of_kind(h, "follow_up")] == ["cancelled"]
    run_for(h, 3600 * 2, step=600)
    assert webhook_events(h) == ["order.succeeded"]  # exactly once
    assert of_kind(h, "refund") == []
    assert switch.refunds == {}
    assert list(switch.payments) == ["ord_1_2"]  # no second charge


def test_a_success_found_after_an_operators_not_charged_settles_the_order_still_open(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """The operator answers "not charged" before the status check planned at the dead-letter has asked; the order
    is decided again (a payment link), and the check then finds the charge succeeded after all."""
    switch = FullSwitch(statuses=["succeeded"])
    h = lost_charge(make_harness, database_url, switch, RETARGET)
    retry_id = of_kind(h, "retry")[0].action_id
    assert h.executor.resolve_charge(retry_id, charged=False) == "PENDING"
    h.drain()  # decided again: a payment link goes out
    assert len(h.outbox) == 1
    token = link_token(h)
    run_for(h, 120)  # the check asks: ord_1_2 succeeded
    assert payment_status_calls(switch) == 1
    assert_settled_by_the_late_success(h, switch, token)


@pytest.mark.parametrize("then", ["charged_again", "failed"])
def test_a_success_found_after_an_operators_not_charged_on_an_order_settled_since_is_refunded_once(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    then: str,
) -> None:
    """Decided again after the operator's "not charged", the order is paid by its next retry (ord_1_3), or fails
    (a stop); the status check still planned finds ord_1_2 succeeded: a duplicate, refunded once, no second
    webhook."""
    switch = FullSwitch(statuses=["succeeded", "succeeded"])
    h = lost_charge(make_harness, database_url, switch, RETRY if then == "charged_again" else {"action": "stop"})
    retry_id = of_kind(h, "retry")[0].action_id
    h.executor.resolve_charge(retry_id, charged=False)
    h.drain()
    settled = h.view()
    assert settled.state == ("SUCCEEDED" if then == "charged_again" else "FAILED")
    run_for(h, 3600 * 3, step=60)
    view = h.view()
    assert (view.state, view.success_txn_id) == (settled.state, settled.success_txn_id)
    assert [(a.attempt_number, a.status) for a in view.attempts if a.attempt_number == 2] == [(2, "success")]
    refunds = of_kind(h, "refund")
    assert [a.state for a in refunds] == ["done"], refunds
    assert switch.refunded() == ["ord_1_2"]
    with h.executor.engine.connect() as conn:
        keys = list(conn.scalars(sa.select(actions.c.idempotency_key).where(actions.c.kind == "refund")))
        charge_key = conn.scalar(sa.select(actions.c.idempotency_key).where(actions.c.action_id == retry_id))
    assert keys == [f"{charge_key}:refund"]  # the switch refunds once however often it is asked
    assert webhook_events(h) == ["order.succeeded" if then == "charged_again" else "order.failed"]
    charged = ["ord_1_2", "ord_1_3"] if then == "charged_again" else ["ord_1_2"]
    assert list(switch.payments) == charged  # no charge made because of the late answer


def test_a_check_still_planned_that_finds_nothing_after_an_operators_not_charged_is_asked_once_more(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """The operator answers "not charged" and the check still planned gets "not found" (the sends are on the way):
    that "not found" is asked about once more too, and the send that reached the switch since settles the order."""
    switch = FullSwitch(statuses=["succeeded"], drop_charges=True, hold_charges=True)
    h = lost_charge(make_harness, database_url, switch, RETARGET)
    h.executor.resolve_charge(of_kind(h, "retry")[0].action_id, charged=False)
    h.drain()
    token = link_token(h)
    run_for(h, 120)
    first = of_kind(h, "charge_status")[0]
    assert "not found; asked once more in 0:30:00" in (first.last_error or ""), first
    switch.deliver_held()
    run_for(h, int(NOT_FOUND_RECHECK_DELAY.total_seconds()) + 300, step=60)
    assert payment_status_calls(switch) == 2
    assert_settled_by_the_late_success(h, switch, token)


# ------------------------------------------------------------------------------- 4. asked once more after "not found"


@pytest.mark.parametrize("decided_again", ["retry", "retarget"])
def test_a_first_send_that_reaches_the_switch_after_its_not_found_is_the_one_payment_of_the_send_again(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    decided_again: str,
) -> None:
    """The switch answers "not found" (the sends timed out on the way) and the held sends reach it after the
    charge went again. Decided again as a new attempt, a retry charged ord_1_3 and the late ord_1_2 charged the
    customer twice until the one more ask refunded it; a link went out and the order waited for the one more ask.
    Sent again under its own key, the charge recovers the order at once, and the late sends are that one payment:
    no second charge, no refund, no link, one webhook."""
    switch = FullSwitch(statuses=["succeeded", "succeeded"], drop_charges=True, hold_charges=True)
    h = lost_charge(make_harness, database_url, switch, RETRY if decided_again == "retry" else RETARGET)
    run_for(h, 120)  # 404 payment_not_found: ord_1_2 sent again under its key, charged
    view = h.view()
    assert view.state == "SUCCEEDED"
    assert [(a.attempt_number, a.status) for a in view.attempts] == [(1, "failure"), (2, "success")]
    switch.deliver_held()  # the timed-out first sends reach the switch now: the same key, so the same payment
    run_for(h, 3600 * 3, step=120)
    view = h.view()
    assert [(a.attempt_number, a.status) for a in view.attempts] == [(1, "failure"), (2, "success")]
    assert list(switch.payments) == ["ord_1_2"]
    assert len(switch.keys) == 1
    assert of_kind(h, "refund") == []
    assert switch.refunds == {}
    assert h.outbox == []
    assert payment_status_calls(switch) == 1  # the check; no one more ask: the send again was answered
    assert webhook_events(h) == ["order.succeeded"]


def test_a_charge_still_not_found_when_asked_once_more_stays_never_charged(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """ "Not found", sent again, and that send is lost on the way too: asked once more NOT_FOUND_RECHECK_DELAY
    later; still not found, it was never charged, and the order is decided again (a new attempt, ord_1_3)."""
    switch = FullSwitch(drop_charges=True)
    h = lost_charge(make_harness, database_url, switch, RETRY)
    switch.drop_charges = True
    run_for(h, 120)  # not found: sent again, and lost again
    assert [(a.state, a.unanswered_since is not None) for a in of_kind(h, "retry")] == [("dead", True)]
    switch.drop_charges = False
    run_for(h, int(NOT_FOUND_RECHECK_DELAY.total_seconds()) - 300, step=60)
    assert payment_status_calls(switch) == 1  # not before its delay
    run_for(h, 3600 * 3, step=120)
    checks = of_kind(h, "charge_status")
    assert [a.state for a in checks] == ["done", "done"]
    assert "sent again as the same charge" in (checks[0].last_error or "")
    assert "answered again: payment ord_1_2 not found; it was never charged" in (checks[1].last_error or "")
    assert payment_status_calls(switch) == 2
    assert h.view().state == "SUCCEEDED"
    assert of_kind(h, "retry")[0].state == "dead"
    assert of_kind(h, "refund") == []
    assert webhook_events(h) == ["order.succeeded"]
    assert list(switch.payments) == ["ord_1_3"]


@pytest.mark.parametrize("operator_said", [None, "not charged", "charged"])
def test_a_switch_silent_for_a_day_is_asked_no_more_and_the_charge_is_left_to_an_operator(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    caplog: pytest.LogCaptureFixture,
    operator_said: str | None,
) -> None:
    """A status check whose switch answers none of its asks (timeouts) was asked hourly for ever. Now, a day
    (SWITCH_SILENCE_LIMIT) after it was planned, it is asked no more: dead, noted with why and who takes the charge
    over, logged once. An unknown charge's order stays open (the customer may have paid) for an operator's
    resolve-charge; one an operator answered for stays as they said."""
    switch = FullSwitch(statuses=["succeeded"])
    h = lost_charge(make_harness, database_url, switch, {"action": "stop"})
    retry_id = of_kind(h, "retry")[0].action_id
    if operator_said is not None:
        h.executor.resolve_charge(retry_id, charged=operator_said == "charged")
    switch.status_mode = "timeout"
    with caplog.at_level(logging.ERROR, logger="winback.executor"):
        run_for(h, int(SWITCH_SILENCE_LIMIT.total_seconds()) + 2 * 3600, step=600)
        asked = switch.calls.count(("GET", "/v1/payments/ord_1_2"))
        run_for(h, 4 * 3600, step=600)
    assert switch.calls.count(("GET", "/v1/payments/ord_1_2")) == asked  # asked no more
    [check] = of_kind(h, "charge_status")
    assert check.state == "dead", check
    note = check.last_error or ""
    assert "no longer asked: switch 'adyen' answered no status check of payment ord_1_2 since 2026-" in note, note
    given_up = [r.getMessage() for r in caplog.records if r.getMessage().startswith("status checks given up")]
    assert len(given_up) == 1, given_up
    standing = {
        None: f"`winback executor resolve-charge {retry_id} --charged|--not-charged`",
        "not charged": "stays taken as never charged; if 'adyen' took payment ord_1_2 after all",
        "charged": "stays charged on an operator's word, unconfirmed",
    }[operator_said]
    assert standing in note, note
    assert standing in given_up[0], given_up
    ended = {None: "PENDING", "not charged": "FAILED", "charged": "SUCCEEDED"}[operator_said]
    assert h.view().state == ended
    registry = CollectorRegistry()
    registry.register(ChecksAskedNoMoreCollector(h.executor.engine, read_every_seconds=0))
    charge = {None: "unknown", "not charged": "taken_as_not_charged", "charged": "charged_by_operator"}[operator_said]
    counted = registry.get_sample_value(
        "winback_executor_status_checks_asked_no_more_total", {"merchant_id": "m_demo", "charge": charge}
    )
    assert counted == 1.0
    if operator_said is None:  # the operator's answer still settles it
        assert h.executor.resolve_charge(retry_id, charged=False) == "FAILED"


@pytest.mark.parametrize("order", ["paid_by_the_merchant", "open"])
def test_the_one_more_ask_that_gets_no_answer_is_asked_again_hourly(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    order: str,
) -> None:
    """The one more ask after "not found" gets no answer: asked again hourly, and its late "succeeded" is recorded:
    refunded on an order the merchant paid meanwhile (taken as never charged at the "not found"), the order's
    recovery on one still open (sent again at the "not found", and lost on the way again)."""
    switch = FullSwitch(statuses=["succeeded"], drop_charges=True, hold_charges=True)
    h = lost_charge(make_harness, database_url, switch, {"action": "stop"})
    if order == "open":
        switch.drop_charges = True  # the send again is held on the way too
    else:
        assert h.executor.payment_succeeded("m_demo", PAID_BY_MERCHANT).state == "SUCCEEDED"
    run_for(h, 120)  # 404: sent again (open), or taken as never charged (paid)
    switch.deliver_held()  # every send reaches the switch: one key, one payment
    switch.status_mode = "timeout"
    run_for(h, int(NOT_FOUND_RECHECK_DELAY.total_seconds()) + 600, step=60)
    again = of_kind(h, "charge_status")[1]
    assert again.state == "scheduled", again
    assert "ReadTimeout" in (again.last_error or "")
    switch.status_mode = "answer"
    run_for(h, 3600 * 2, step=600)
    assert list(switch.payments) == ["ord_1_2"]
    assert webhook_events(h) == ["order.succeeded"]
    if order == "open":
        assert (h.view().state, of_kind(h, "refund")) == ("SUCCEEDED", [])
        assert h.view().success_txn_id == h.view().attempts[-1].txn_id
    else:
        assert [a.state for a in of_kind(h, "refund")] == ["done"]
        assert switch.refunded() == ["ord_1_2"]


class HeldOnTheWay(httpx.BaseTransport):
    """The network between the executor and a real switch: while ``holding``, a charge's send times out before it
    reaches the switch and is kept; ``deliver()`` lets the kept sends reach it late, as they were sent."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.holding = True
        self.held: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.holding and request.method == "POST" and request.url.path == "/v1/payments":
            request.read()
            self.held.append(request)
            raise httpx.ReadTimeout("read timed out", request=request)
        return self.inner.handle_request(request)

    def deliver(self) -> None:
        self.holding = False
        for request in self.held:
            self.inner.handle_request(request).close()
        self.held = []

    def close(self) -> None:
        self.inner.close()


def test_the_sandbox_switch_takes_a_late_send_after_its_not_found_as_the_one_payment_of_the_send_again(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """Against the real sandbox switch over HTTP: both sends of the retry time out on the way, the status check
    gets 404 payment_not_found, and the charge goes again under its own key, which the sandbox answers. Then the
    first sends reach the sandbox: the same key, so no second charge and nothing to refund
    (decided again as a new attempt, ord_1_3 and the late ord_1_2 were both charged, one refunded later)."""
    sandbox = start_sandbox(seed=3)
    network = HeldOnTheWay()
    connector = HttpConnector(
        "adyen",
        sandbox.url,
        None,
        send_context=True,
        breaker=CircuitBreaker("adyen", threshold=10_000),
        client=httpx.Client(transport=network),
        sleep=lambda _s: None,
    )
    state = sandbox.server.config.app.state.sandbox
    try:
        h = make_harness(RETRY, RETRY, connector=connector, max_attempts=2, database_url=database_url)
        h.executor.payment_failed("m_demo", event())
        h.drain()
        h.clock.advance(seconds=5)
        h.drain()
        assert [a.state for a in of_kind(h, "retry")] == ["dead"]
        assert state.payments == {}
        network.holding = False  # what is sent from now on reaches the sandbox; the first sends stay held
        run_for(h, 120)  # 404 payment_not_found from the sandbox: sent again, and it reaches the sandbox
        assert "ord_1_2" in state.payments
        before = httpx.get(f"{sandbox.url}/v1/stats").json()
        late = len(network.held)
        network.deliver()  # the first sends arrive late: same key and body as the one charged
        after = httpx.get(f"{sandbox.url}/v1/stats").json()
        assert late >= 2
        assert (after["calls"], after["charges"]) == (before["calls"] + late, before["charges"])
        run_for(h, 3600 * 2, step=120)
        view = h.view()
        charged = state.payments["ord_1_2"][0]["status"]
        assert [(a.attempt_number, a.status) for a in view.attempts][:2] == [
            (1, "failure"),
            (2, "success" if charged == "succeeded" else "failure"),
        ]
        assert httpx.get(f"{sandbox.url}/v1/stats").json()["refunds"] == 0
        assert of_kind(h, "refund") == []
    finally:
        connector.close()
        sandbox.stop()


# ------------------------------------------------------------------------------- 5. the switch contradicts an operator


def disputes_counted(h: Harness, switch_said: str = "declined", said_by: str = "operator") -> float:
    """The Prometheus counter of charge disputes as a scrape of ``/metrics`` reads it from the database."""
    registry = CollectorRegistry()
    registry.register(ChargeDisputesCollector(h.executor.engine, read_every_seconds=0))
    value = registry.get_sample_value(
        "winback_executor_charge_disputes_total",
        {"merchant_id": "m_demo", "switch_said": switch_said, "said_by": said_by},
    )
    return value or 0.0


def open_disputes_counted(h: Harness, switch_said: str = "declined", said_by: str = "operator") -> float | None:
    """The Prometheus gauge of charge disputes nobody has marked as dealt with, as a scrape reads it."""
    registry = CollectorRegistry()
    registry.register(ChargeDisputesCollector(h.executor.engine, read_every_seconds=0))
    return registry.get_sample_value(
        "winback_executor_charge_disputes_open",
        {"merchant_id": "m_demo", "switch_said": switch_said, "said_by": said_by},
    )


def disputes_of(h: Harness) -> list[ChargeDispute]:
    with h.executor.engine.connect() as conn:
        return charge_disputes(conn, "m_demo")


def disputed(build: MakeHarness, database_url: str) -> Harness:
    """An operator answered "charged" for ord_1_2 (the order succeeded on it), and the switch says declined."""
    switch = FullSwitch(statuses=["failed"])
    h = lost_charge(build, database_url, switch, {"action": "stop"})
    h.executor.resolve_charge(of_kind(h, "retry")[0].action_id, charged=True)
    run_for(h, 120)
    assert [d.open for d in disputes_of(h)] == [True]
    return h


def charge_disputes_command(database_url: str, *args: str) -> Any:
    return CliRunner().invoke(cli, ["executor", "charge-disputes", *args, "--database-url", database_url])


def signed_in_console(api: Api) -> Console:
    """The console of ``api``, signed in as an agent of m_demo."""
    console = Console(api, build_console_runtime(ConsoleSettings()))
    add_agent(console.engine, "m_demo", "asha@m_demo", PASSWORD)
    console.sign_in("asha@m_demo")
    return console


def test_a_decline_found_after_an_operators_charged_is_flagged_logged_and_counted(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The operator answers "charged" (the order succeeds, its webhook goes); the check still planned finds the
    payment declined: the order keeps its state and its one webhook, and the dispute is flagged, logged, counted."""
    switch = FullSwitch(statuses=["failed"])
    h = lost_charge(make_harness, database_url, switch, {"action": "stop"})
    retry_id = of_kind(h, "retry")[0].action_id
    assert h.executor.resolve_charge(retry_id, charged=True) == "SUCCEEDED"
    h.drain()
    assert webhook_events(h) == ["order.succeeded"]
    before = disputes_counted(h)
    with caplog.at_level(logging.ERROR, logger="winback.executor"):
        run_for(h, 120)  # the check asks: ord_1_2 declined
    check = of_kind(h, "charge_status")[0]
    assert "disputed: an operator answered charged, the switch says payment ord_1_2 declined (do_not_honor)" in (
        check.last_error or ""
    ), check
    logged = [r.getMessage() for r in caplog.records if "charge disputed" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in caplog.records]
    for named in ("m_demo", "ord_1", "ord_1_2", "an operator answered charged", "declined (do_not_honor)"):
        assert named in logged[0]
    assert disputes_counted(h) == before + 1
    [dispute] = disputes_of(h)
    assert (dispute.order_id, dispute.order_state, dispute.payment_id, dispute.switch_said) == (
        "ord_1",
        "SUCCEEDED",
        "ord_1_2",
        "declined (do_not_honor)",
    )
    assert dispute.charge_action_id == retry_id
    assert dispute.settled_by_it  # the merchant was told the order succeeded on this charge
    run_for(h, 3600 * 3, step=600)  # nothing more: no second webhook, no charge, no refund, flagged once
    assert h.view().state == "SUCCEEDED"
    assert webhook_events(h) == ["order.succeeded"]
    assert list(switch.payments) == ["ord_1_2"]
    assert of_kind(h, "refund") == []
    assert disputes_counted(h) == before + 1
    assert payment_status_calls(switch) == 1


@pytest.mark.parametrize("late_send", [False, True])
def test_a_charge_an_operator_answered_charged_that_the_switch_does_not_find_twice_is_flagged(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    late_send: bool,
) -> None:
    """The switch does not find the payment an operator answered for as charged: asked once more, as for any "not
    found"; still not found, the dispute is flagged. A send that reached the switch meanwhile agrees: no flag."""
    switch = FullSwitch(statuses=["succeeded"], drop_charges=True, hold_charges=True)
    h = lost_charge(make_harness, database_url, switch, {"action": "stop"})
    assert h.executor.resolve_charge(of_kind(h, "retry")[0].action_id, charged=True) == "SUCCEEDED"
    before = disputes_counted(h, switch_said="not_found")
    run_for(h, 120)
    first = of_kind(h, "charge_status")[0]
    assert "not found, though an operator answered charged; asked once more in 0:30:00" in (first.last_error or "")
    assert disputes_of(h) == []
    if late_send:
        switch.deliver_held()
    run_for(h, int(NOT_FOUND_RECHECK_DELAY.total_seconds()) + 300, step=60)
    assert payment_status_calls(switch) == 2
    again = of_kind(h, "charge_status")[1]
    if late_send:
        assert "succeeded, as an operator answered" in (again.last_error or ""), again
        assert disputes_of(h) == []
        assert disputes_counted(h, switch_said="not_found") == before
    else:
        assert "the switch says payment ord_1_2 not found (asked twice)" in (again.last_error or ""), again
        assert [d.switch_said for d in disputes_of(h)] == ["not found (asked twice)"]
        assert disputes_counted(h, switch_said="not_found") == before + 1
    run_for(h, 3600 * 2, step=600)
    assert payment_status_calls(switch) == 2
    assert h.view().state == "SUCCEEDED"
    assert webhook_events(h) == ["order.succeeded"]
    assert of_kind(h, "refund") == []


def charged_by_an_operator_on_an_order_paid_before(
    build: MakeHarness, database_url: str, switch: FullSwitch, **failed: Any
) -> Harness:
    """The merchant reports the order paid while its retry's charge (ord_1_2) is unknown; an operator then answers
    "charged": a duplicate, whose refund is planned, before the status check planned at the dead-letter has asked.
    ``failed``: the payment-failed event's overrides."""
    h = lost_charge(build, database_url, switch, **failed)
    assert h.executor.payment_succeeded("m_demo", PAID_BY_MERCHANT).state == "SUCCEEDED"
    assert h.executor.resolve_charge(of_kind(h, "retry")[0].action_id, charged=True) == "SUCCEEDED"
    assert [a.state for a in of_kind(h, "refund")] == ["scheduled"]
    return h


def refund_calls(switch: FullSwitch) -> list[tuple[str, str]]:
    return [call for call in switch.calls if call[1].endswith("/refunds")]


@pytest.mark.parametrize("switch_says", ["declined", "not_found"])
def test_the_refund_of_a_charge_the_switch_disputes_is_never_sent_and_says_why(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    caplog: pytest.LogCaptureFixture,
    switch_says: str,
    tmp_path: Path,
) -> None:
    """The refund planned on the operator's "charged" waits for the status check; the switch then says the payment
    was declined, or does not find it twice: the refund is never sent (nothing was taken) and ends cancelled saying
    why, and no operator is told to refund by hand money nobody took."""
    switch = FullSwitch(statuses=["failed"]) if switch_says == "declined" else FullSwitch(drop_charges=True)
    h = charged_by_an_operator_on_an_order_paid_before(make_harness, database_url, switch)
    wait = 120 if switch_says == "declined" else int(NOT_FOUND_RECHECK_DELAY.total_seconds()) + 300
    with caplog.at_level(logging.WARNING, logger="winback.executor"):
        run_for(h, wait, step=60)
        run_for(h, 3600 * 2, step=600)
    said = "declined (do_not_honor)" if switch_says == "declined" else "not found (asked twice)"
    assert [(d.switch_said, d.settled_by_it) for d in disputes_of(h)] == [(said, False)]
    [refund] = of_kind(h, "refund")
    assert refund.state == "cancelled", refund
    assert f"not sent: the switch says payment ord_1_2 was never charged ({said})" in (refund.last_error or "")
    assert refund_calls(switch) == []
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "refund it by hand" in m], messages
    [flagged] = [m for m in messages if "charge disputed" in m]
    assert "the refund planned for this payment is not sent" in flagged
    assert (h.view().state, h.view().success_txn_id) == ("SUCCEEDED", "txn_ext")
    assert webhook_events(h) == ["order.succeeded"]
    api = Api(create_app(settings_for(tmp_path, database_url=database_url)))
    try:
        page = signed_in_console(api).get("/console/orders/ord_1").text
        assert "that refund is not sent, as there is nothing to give back" in page
        assert "may have shipped it without the money" not in page  # the merchant's own payment settled it
    finally:
        api.close()


def test_the_refund_of_a_charge_an_operator_answered_for_goes_once_the_switch_confirms_it(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """The switch confirms the operator's "charged": the refund that waited for its answer is sent then, once."""
    switch = FullSwitch(statuses=["succeeded"])
    h = charged_by_an_operator_on_an_order_paid_before(make_harness, database_url, switch)
    h.drain()
    [waiting] = of_kind(h, "refund")
    assert (waiting.state, waiting.attempts) == ("scheduled", 0), waiting
    assert "waits for the switch's status of payment ord_1_2" in (waiting.last_error or "")
    assert refund_calls(switch) == []
    run_for(h, 300, step=30)
    assert "succeeded, as an operator answered" in (of_kind(h, "charge_status")[0].last_error or "")
    assert [a.state for a in of_kind(h, "refund")] == ["done"]
    assert switch.calls.index(("GET", "/v1/payments/ord_1_2")) < switch.calls.index(refund_calls(switch)[0])
    assert switch.refunded() == ["ord_1_2"]
    assert disputes_of(h) == []


def test_a_refund_refused_as_its_charge_is_found_disputed_is_cancelled_not_left_for_a_refund_by_hand(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker had the refund out when the check found the dispute (it had found no check still to ask): the
    switch's refusal, recorded after the dispute, cancels the refund with both reasons instead of a refund by hand.
    """
    switch = FullSwitch(statuses=["failed"])
    h = charged_by_an_operator_on_an_order_paid_before(make_harness, database_url, switch)
    claimed = h.executor.claim(10, 600, "w1", "out-with-the-switch")  # the refund is due at once; a long lease
    refund = next(action for action in claimed if action.kind == "refund")
    run_for(h, 120)  # the check asks: ord_1_2 declined, disputed, while the refund is out
    assert [a.state for a in of_kind(h, "refund")] == ["claimed"]
    refused = Permanent("connector 'adyen' refused the refund of payment 'ord_1_2' with HTTP 422")
    with caplog.at_level(logging.WARNING, logger="winback.executor"):
        h.worker.record([(refund, refused)])
    [after] = of_kind(h, "refund")
    assert after.state == "cancelled", after
    assert "refused the refund of payment 'ord_1_2' with HTTP 422; not sent: the switch says payment ord_1_2 " + (
        "was never charged (declined (do_not_honor))"
    ) in (after.last_error or "")
    assert not [r for r in caplog.records if "refund it by hand" in r.getMessage()]


def test_a_check_after_an_operators_charged_that_gets_no_answer_is_asked_again_hourly(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """The check still planned when the operator answered "charged" gets no answer within its tries: it is asked
    again hourly, not dropped (the switch may yet contradict the operator), and its later "declined" is flagged."""
    switch = FullSwitch(statuses=["failed"])
    h = lost_charge(make_harness, database_url, switch, {"action": "stop"})
    h.executor.resolve_charge(of_kind(h, "retry")[0].action_id, charged=True)
    switch.status_mode = "timeout"
    run_for(h, 600)
    check = of_kind(h, "charge_status")[0]
    assert check.state == "scheduled", check
    assert check.due_at >= h.clock.now + timedelta(minutes=45)
    switch.status_mode = "answer"
    run_for(h, 3600, step=600)
    assert [d.switch_said for d in disputes_of(h)] == ["declined (do_not_honor)"]
    assert webhook_events(h) == ["order.succeeded"]


def refunds_by_hand_counted(h: Harness, why: str = "switch_silent") -> float:
    """The Prometheus counter of refunds given to an operator, as a scrape of ``/metrics`` reads it."""
    registry = CollectorRegistry()
    registry.register(RefundsByHandCollector(h.executor.engine, read_every_seconds=0))
    value = registry.get_sample_value("winback_executor_refunds_by_hand_total", {"merchant_id": "m_demo", "why": why})
    return value or 0.0


def handed_over_after_the_switchs_silence(
    build: MakeHarness, database_url: str, switch: FullSwitch, **failed: Any
) -> Harness:
    """The refund planned on an operator's "charged" (order paid before) waits for the status check, whose switch
    answers none (timeouts, asked hourly): at REFUND_WAIT_FOR_SWITCH, not before, it goes to an operator.
    ``failed``: the payment-failed event's overrides."""
    h = charged_by_an_operator_on_an_order_paid_before(build, database_url, switch, **failed)
    switch.status_mode = "timeout"
    wait = int(REFUND_WAIT_FOR_SWITCH.total_seconds())
    run_for(h, wait - 3600, step=600)
    [waiting] = of_kind(h, "refund")
    assert waiting.state == "scheduled", waiting
    assert refunds_by_hand_counted(h) == 0
    run_for(h, 3600 + 600, step=600)
    return h


def test_a_refund_whose_switch_answers_no_status_check_goes_to_an_operator_after_a_day(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    """It was put off hourly without limit. Now, a day after it was planned, the refund is dead-lettered for an
    operator, never sent by winback, saying the switch never answered, since when, and what is known of the charge;
    it is listed by ``winback executor refunds-by-hand``, counted on /metrics and shown in GET /v1/orders."""
    switch = FullSwitch(statuses=["succeeded"])
    with caplog.at_level(logging.ERROR, logger="winback.executor"):
        h = handed_over_after_the_switchs_silence(make_harness, database_url, switch)
    [refund] = of_kind(h, "refund")
    assert refund.state == "dead", refund
    note = refund.last_error or ""
    for said in (
        "waited 1 day (since 2026-",
        "for switch 'adyen' to confirm payment ord_1_2, and it has answered no status check of it since 2026-",
        "(last: gave up after ",
        "what is known: $499.00 recorded as charged on an operator's word at 2026-",  # it said 499.0 USD
        f"(charge action {of_kind(h, 'retry')[0].action_id}) on an order settled otherwise",
        "refund it by hand if 'adyen' took it",
    ):
        assert said in note, note
    assert "+00:00" not in note, note  # times to the second with a Z, as the CLI's lists write them
    assert "0:00:00" not in note, note  # lengths of time in words, not Python's timedelta text
    assert "499.0 USD" not in note, note
    assert refund_calls(switch) == []
    logged = [r.getMessage() for r in caplog.records if "refunds-by-hand" in r.getMessage()]
    assert len(logged) == 1, logged
    assert "refund it by hand through connector 'adyen'" in logged[0]
    assert refunds_by_hand_counted(h) == 1
    with h.executor.engine.connect() as conn:
        [listed] = refunds_by_hand(conn, "m_demo")
    assert (listed.payment_id, listed.why, listed.state, listed.note) == ("ord_1_2", "switch_silent", "dead", note)
    command = CliRunner().invoke(cli, ["executor", "refunds-by-hand", "--database-url", database_url])
    assert command.exit_code == 0, command.output
    assert command.output.startswith(  # the amount and why as the console's card writes them (it said 499.0 USD)
        f"m_demo ord_1 (SUCCEEDED): refund action {refund.action_id} of payment ord_1_2 via adyen, $499.00: dead, "
        f"given to an operator at {to_the_second(listed.handed_at)} (its switch answered no status check of the "
        f"charge): {note}"
    ), command.output
    api = Api(create_app(settings_for(tmp_path, database_url=database_url)))
    try:
        metrics = api.get("/metrics").text
        assert 'winback_executor_refunds_by_hand_total{merchant_id="m_demo",why="switch_silent"} 1.0' in metrics
    finally:
        api.close()


def test_a_refund_whose_charges_check_is_asked_no_more_goes_to_an_operator_not_to_the_switch(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """The operator answers "charged" three hours into the switch's silence, on an order the merchant paid: its
    refund waits for the check, which is asked no more a day after it was planned, before the refund's own day is
    up. The refund then goes to an operator at once (nothing will confirm the charge), never to the switch on the
    operator's word alone."""
    switch = FullSwitch(statuses=["succeeded"])
    h = lost_charge(make_harness, database_url, switch)
    switch.status_mode = "timeout"
    run_for(h, 3 * 3600, step=600)
    assert h.executor.payment_succeeded("m_demo", PAID_BY_MERCHANT).state == "SUCCEEDED"
    assert h.executor.resolve_charge(of_kind(h, "retry")[0].action_id, charged=True) == "SUCCEEDED"
    run_for(
        h, int(SWITCH_SILENCE_LIMIT.total_seconds()) - 3600, step=600
    )  # the check stops; the refund's day is not up
    assert of_kind(h, "charge_status")[0].state == "dead"
    [refund] = of_kind(h, "refund")
    assert refund.state == "dead", refund
    assert refund_calls(switch) == []
    assert refunds_by_hand_counted(h) == 1


@pytest.mark.parametrize("switch_says", ["succeeded", "declined"])
def test_a_switch_answering_after_the_refund_went_to_an_operator_never_refunds_twice(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    switch_says: str,
) -> None:
    """The switch answers at last (it is still asked hourly). "Succeeded": the refund stays the operator's, noted
    as needed, and winback never sends it (they may have made it by hand). "Declined": a charge dispute; the refund
    is cancelled, saying that one made by hand meanwhile gave back money never taken."""
    switch = FullSwitch(statuses=["succeeded" if switch_says == "succeeded" else "failed"])
    h = handed_over_after_the_switchs_silence(make_harness, database_url, switch)
    assert [a.state for a in of_kind(h, "refund")] == ["dead"]
    switch.status_mode = "answer"
    run_for(h, 3600 * 3, step=600)
    [refund] = of_kind(h, "refund")
    assert refund_calls(switch) == []
    if switch_says == "succeeded":
        assert refund.state == "dead", refund
        assert "the switch confirmed at 2026-" in (refund.last_error or "")
        assert "payment ord_1_2 succeeded: the customer did pay twice, so the refund by hand is needed" in (
            refund.last_error or ""
        )
        assert disputes_of(h) == []
    else:
        assert refund.state == "cancelled", refund
        assert "not sent: the switch says payment ord_1_2 was never charged (declined (do_not_honor))" in (
            refund.last_error or ""
        )
        assert "if it was refunded, the customer got back money that was never taken" in (refund.last_error or "")
        handed = re.search(r"refund by hand at (\S+): if it was refunded", refund.last_error or "")
        assert handed is not None, refund.last_error
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", handed[1]), handed[1]  # not stored isoformat()
        assert [d.switch_said for d in disputes_of(h)] == ["declined (do_not_honor)"]
    assert refunds_by_hand_counted(h) == 1  # handed over once, whatever came after
    assert webhook_events(h) == ["order.succeeded"]


# ------------------------------------------------------------------------------- 6. a decline found late


def test_a_decline_found_after_an_operators_not_charged_is_recorded_as_that_attempt(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """The operator answers "not charged" and the order is decided again (a payment link); the check still planned
    finds the payment declined: the decline goes into the history as attempt 2, dated when it was sent, and the
    order is not decided again."""
    switch = FullSwitch(statuses=["failed"])
    h = lost_charge(make_harness, database_url, switch, RETARGET, {"action": "stop"})
    retry = of_kind(h, "retry")[0]
    sent_at = retry.unanswered_since
    h.executor.resolve_charge(retry.action_id, charged=False)
    h.drain()
    assert len(h.outbox) == 1
    decided = len(h.view().decisions)
    run_for(h, 120)  # the check asks: ord_1_2 declined
    view = h.view()
    assert [(a.attempt_number, a.status, a.error_code) for a in view.attempts] == [
        (1, "failure", "processing_error"),
        (2, "failure", "do_not_honor"),
    ]
    assert view.attempts[1].created_at == sent_at
    assert last_failure_code(h) == "do_not_honor"  # the order's last failure, as its next decision reads it
    assert len(view.decisions) == decided  # not decided again: its payment link is out
    assert view.state == "PENDING"
    assert len(h.outbox) == 1
    assert of_kind(h, "retry")[0].state == "done"
    assert "the decline is recorded as that attempt" in (of_kind(h, "charge_status")[0].last_error or "")
    run_for(h, 3600 * 2, step=600)
    assert len(h.view().attempts) == 2  # recorded once
    assert list(switch.payments) == ["ord_1_2"]
    assert of_kind(h, "refund") == []


def last_failure_code(h: Harness) -> str | None:
    """The error code of the order's last failure (``orders.failure_json``: its decision requests' failure)."""
    with h.executor.engine.connect() as conn:
        stored = conn.scalar(sa.select(orders.c.failure_json).where(orders.c.order_id == "ord_1"))
    return json.loads(stored)["error_code"]


def test_a_decline_found_late_is_not_the_last_failure_when_a_charge_made_since_failed_later(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """After the operator's "not charged" the order's next retry (ord_1_3) is declined insufficient_funds; the check
    then finds ord_1_2 declined: recorded as attempt 2, dated when it was sent, and the later decline stays the
    order's last failure."""
    switch = FullSwitch(statuses=["failed", "failed:insufficient_funds"])
    h = lost_charge(make_harness, database_url, switch, RETRY, {"action": "stop"})
    h.executor.resolve_charge(of_kind(h, "retry")[0].action_id, charged=False)
    h.drain()  # decided again: ord_1_3 is declined, then a stop
    assert last_failure_code(h) == "insufficient_funds"
    run_for(h, 120)  # the check asks: ord_1_2 declined
    view = h.view()
    assert [(a.attempt_number, a.error_code) for a in view.attempts] == [
        (1, "processing_error"),
        (2, "do_not_honor"),
        (3, "insufficient_funds"),
    ]
    assert last_failure_code(h) == "insufficient_funds"


# ------------------------------------------------------------------------------- 7. a check that cannot be asked


@pytest.mark.parametrize("taken_by", ["the switch", "an operator"])
def test_a_check_that_cannot_be_asked_about_a_charge_taken_as_never_charged_says_so(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    taken_by: str,
) -> None:
    """The check of a charge taken as never charged (the one more ask after "not found" on an order the merchant
    paid meanwhile, or a check still planned when an operator answered "not charged") meets a switch that cannot be
    asked: the charge does not stay unknown, and the note says what stands."""
    switch = FullSwitch(drop_charges=True)
    h = lost_charge(make_harness, database_url, switch, {"action": "stop"})
    if taken_by == "the switch":
        assert h.executor.payment_succeeded("m_demo", PAID_BY_MERCHANT).state == "SUCCEEDED"
        run_for(h, 120)  # not found: taken as never charged (no charge again on a paid order), asked once more
        switch.status_mode = "no_route"
        run_for(h, int(NOT_FOUND_RECHECK_DELAY.total_seconds()) + 300, step=60)
        check = of_kind(h, "charge_status")[1]
        why = "its switch did not find it"
    else:
        h.executor.resolve_charge(of_kind(h, "retry")[0].action_id, charged=False)
        switch.status_mode = "no_route"
        run_for(h, 120)
        check = of_kind(h, "charge_status")[0]
        why = "as an operator answered"
    assert check.state == "dead", check
    assert "stays unknown" not in (check.last_error or "")
    assert f"the charge stays taken as never charged ({why})" in (check.last_error or ""), check
    assert "ask connector 'adyen' about payment ord_1_2" in (check.last_error or "")
    ended = "succeeded" if taken_by == "the switch" else "failed"
    assert h.view().state == ended.upper()
    assert webhook_events(h) == [f"order.{ended}"]


def test_a_disputed_charge_shows_in_the_consoles_queue_and_order_and_in_metrics(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    tmp_path: Path,
) -> None:
    """The dispute, on the real API and console over the executor's database: the settled order comes first in the
    queue, marked "Charge disputed"; its page says what each side said; ``/metrics`` counts it."""
    disputed(make_harness, database_url)
    api = Api(create_app(settings_for(tmp_path, database_url=database_url)))
    try:
        console = signed_in_console(api)
        queue = console.get("/console/queue").text
        assert queue.count('data-testid="charge-disputed"') == 1, queue
        assert [row[:2] for row in _rows(queue)] == [("ord_1", "SUCCEEDED")]
        page = console.get("/console/orders/ord_1").text
        assert 'data-testid="disputed-charge"' in page
        assert "the switch says not</h2>" in page
        assert "<code>ord_1_2</code>" in page
        assert "<strong>declined (do_not_honor)</strong>" in page
        metrics = api.get("/metrics").text
        assert (
            'winback_executor_charge_disputes_total{merchant_id="m_demo",said_by="operator",switch_said="declined"} 1.0'
            in metrics
        )
    finally:
        api.close()


def test_winback_executor_charge_disputes_lists_them(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """The command lists each disputed charge with what each side said, and only the merchant asked for."""
    switch = FullSwitch(statuses=["failed"])
    h = lost_charge(make_harness, database_url, switch, {"action": "stop"})
    retry_id = of_kind(h, "retry")[0].action_id
    none_yet = CliRunner().invoke(cli, ["executor", "charge-disputes", "--database-url", database_url])
    assert none_yet.exit_code == 0, none_yet.output
    assert (
        none_yet.output.strip() == "no charge disputed by its switch after an operator's answer or a merchant's report"
    )
    h.executor.resolve_charge(retry_id, charged=True)
    run_for(h, 120)
    listed = CliRunner().invoke(cli, ["executor", "charge-disputes", "--database-url", database_url])
    assert listed.exit_code == 0, listed.output
    [dispute] = disputes_of(h)
    assert listed.output.splitlines() == [
        "m_demo ord_1 (SUCCEEDED): payment ord_1_2 via adyen: an operator answered charged (charge action "
        f"{retry_id}), the switch says declined (do_not_honor); flagged {to_the_second(dispute.flagged_at)}"
    ], listed.output
    other = CliRunner().invoke(
        cli, ["executor", "charge-disputes", "--merchant", "m_other", "--database-url", database_url]
    )
    assert other.output.strip() == "no charge disputed by its switch after an operator's answer or a merchant's report"


# ------------------------------------------------------------------------------- 8. a dispute marked as dealt with


def test_an_operator_marks_a_dispute_dealt_with_and_it_leaves_the_open_list_and_count(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """``charge-disputes --resolve ORDER_ID --note TEXT``: the note is required; the dispute leaves the list and the
    open gauge (the counter of disputes raised keeps it), stays on the order with who, when and the note, and a
    resolution of an order without a dispute is refused naming why; a second one changes nothing and says so."""
    switch = FullSwitch(statuses=["failed"])
    h = lost_charge(make_harness, database_url, switch, {"action": "stop"})
    undisputed = charge_disputes_command(database_url, "--resolve", "ord_1", "--note", "checked")
    assert undisputed.exit_code == 2
    assert "order ord_1 of merchant m_demo has no charge dispute" in undisputed.output
    h.executor.resolve_charge(of_kind(h, "retry")[0].action_id, charged=True)
    run_for(h, 120)
    assert (disputes_counted(h), open_disputes_counted(h)) == (1.0, 1.0)

    no_note = charge_disputes_command(database_url, "--resolve", "ord_1")
    assert (no_note.exit_code, "--resolve needs --note" in no_note.output) == (2, True), no_note.output
    blank = charge_disputes_command(database_url, "--resolve", "ord_1", "--note", "   ")
    assert (blank.exit_code, "a note is required" in blank.output) == (2, True), blank.output
    unknown = charge_disputes_command(database_url, "--resolve", "ord_9", "--note", "x")
    mixed = charge_disputes_command(database_url, "--resolve", "ord_1", "--note", "x", "--all")
    assert (mixed.exit_code, "--all lists the disputes" in mixed.output) == (2, True), mixed.output
    assert (unknown.exit_code, "no order 'ord_9'" in unknown.output) == (2, True), unknown.output
    assert [d.open for d in disputes_of(h)] == [True]  # refusals write nothing

    note = "fulfilment held, customer charged by hand"
    done = charge_disputes_command(database_url, "--resolve", "ord_1", "--note", note, "--by", "alice")
    assert done.exit_code == 0, done.output
    assert done.output.strip() == (
        "m_demo ord_1: the dispute of payment ord_1_2 (declined (do_not_honor)) is marked dealt with by operator "
        f"alice: {note}"
    )
    [dispute] = disputes_of(h)
    assert (dispute.open, dispute.resolved_by, dispute.resolution_note) == (False, "operator alice", note)
    assert (disputes_counted(h), open_disputes_counted(h)) == (1.0, 0.0)  # raised once; none open
    check = of_kind(h, "charge_status")[0]
    assert "dispute dealt with by operator alice at " in (check.last_error or "")  # GET /v1/orders shows it
    assert (check.last_error or "").endswith(note)

    listed = charge_disputes_command(database_url)
    assert listed.output.strip() == "no charge dispute open (1 dispute dealt with: --all lists them)", listed.output
    everything = charge_disputes_command(database_url, "--all")
    assert dispute.resolved_at is not None
    assert everything.output.strip().endswith(
        f"; dealt with by operator alice at {to_the_second(dispute.resolved_at)}: {note}"
    ), everything.output
    # Marked again: nothing changes, and it exits 0 as ``refunds-by-hand --resolve`` does (it exited 2).
    again = charge_disputes_command(database_url, "--resolve", "ord_1", "--note", "again", "--by", "bob")
    assert again.exit_code == 0, again.output
    assert again.output.startswith(
        "order ord_1: already marked dealt with (the charge dispute of payment ord_1_2 by operator alice at "
        f"{to_the_second(dispute.resolved_at)}: "
    ), again.output
    assert again.output.rstrip().endswith(f"{note}); nothing changed"), again.output
    assert [d.resolved_by for d in disputes_of(h)] == ["operator alice"]
    assert [d.resolution_note for d in disputes_of(h)] == [note]


def test_an_agent_marks_a_dispute_dealt_with_in_the_console(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    tmp_path: Path,
) -> None:
    """On the order's page, with the form's CSRF token and a note: the order leaves the queue, its page keeps the
    dispute with who, when and what was done (card and timeline), the audit log has the agent's action, and the
    open gauge on /metrics reads 0. A missing note or another check's id are refused; a second resolution changes
    nothing and says so as information."""
    h = disputed(make_harness, database_url)
    check_id = disputes_of(h)[0].check_action_id
    api = Api(create_app(settings_for(tmp_path, database_url=database_url)))
    try:
        console = signed_in_console(api)
        page = console.get("/console/orders/ord_1").text
        assert 'data-testid="resolve-dispute"' in page
        address = f"/console/orders/ord_1/disputes/{check_id}"
        assert console.post(address, {"note": "no token"}).status_code == 403
        csrf = console.csrf()
        assert flash(console.act(address, {"note": " ", "csrf_token": csrf})).startswith(
            "say what was done about the disputed charge (a note is required"
        )
        elsewhere = console.act(f"/console/orders/ord_1/disputes/{check_id + 100}", {"note": "x", "csrf_token": csrf})
        assert f"has no charge dispute on status check {check_id + 100}" in flash(elsewhere)
        assert [d.open for d in disputes_of(h)] == [True]

        note = "merchant held the parcel; customer paid by bank transfer"
        dealt = console.act(address, {"note": note, "csrf_token": csrf})
        assert flash(dealt) == "Marked as dealt with: the dispute of payment ord_1_2 is no longer open"
        assert 'data-testid="resolve-dispute"' not in dealt.text
        assert 'data-testid="dispute-dealt-with"' in dealt.text
        assert "agent asha@m_demo marked it as dealt with" in dealt.text
        assert "Charge dispute of payment ord_1_2 dealt with by agent asha@m_demo" in dealt.text  # the timeline
        assert note in dealt.text
        queue = console.get("/console/queue").text
        assert 'data-testid="charge-disputed"' not in queue
        assert [row[:2] for row in _rows(queue)] == []  # settled, nothing open: it leaves the queue
        twice = console.act(address, {"note": "again", "csrf_token": csrf})
        assert flash(twice).startswith(
            "order ord_1: already marked dealt with (the charge dispute of payment ord_1_2 by agent asha@m_demo at "
        ), flash(twice)
        assert flash(twice).endswith(f"{note}); nothing changed"), flash(twice)
        assert flash_kind(twice) == "unchanged"  # information, not the warning of a refusal
        with console.engine.connect() as conn:
            audit = conn.execute(
                sa.select(audit_log.c.action, audit_log.c.result, audit_log.c.reason)
                .where(audit_log.c.order_id == "ord_1")
                .order_by(audit_log.c.audit_id)
            ).all()
        assert [(a.action, a.result) for a in audit] == [
            ("resolve_dispute", "refused"),
            ("resolve_dispute", "refused"),
            ("resolve_dispute", "done"),
            ("resolve_dispute", "unchanged"),
        ]
        assert audit[2].reason == note
        metrics = api.get("/metrics").text
        assert (
            'winback_executor_charge_disputes_total{merchant_id="m_demo",said_by="operator",switch_said="declined"} 1.0'
            in metrics
        )
        assert (
            'winback_executor_charge_disputes_open{merchant_id="m_demo",said_by="operator",switch_said="declined"} 0.0'
            in metrics
        )
    finally:
        api.close()
