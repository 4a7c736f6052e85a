"""The silent-retry flow against the hard rules at execution time (defect hunt of the retry executor).

Each test drives the real executor (the state machine, the effects and a worker) on SQLite, with a scripted or
the real rules-only decide(), and checks what reached the connector.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest

from model.catalog import load_catalog
from model.policy import decide
from model.rules import CARD_REATTEMPTS_FIELD, build_context
from service.executor.connectors import (
    ChargeRequest,
    ChargeResult,
    PermanentError,
    RefusedError,
    TransientError,
    UnreachedError,
)
from service.executor.sandbox import start_sandbox
from service.executor.store import actions
from service.executor.worker import make_decider
from tests.integration.test_executor import (  # noqa: F401 - make_harness is a fixture
    START,
    FakeConnector,
    Harness,
    _order_row,
    demo_merchant,
    event,
    make_harness,
)


def _visa_event(reported: int) -> dict[str, Any]:
    """A Visa decline of category 2 (51, insufficient funds) on a card the caller reports ``reported`` silent
    re-attempts for in the last 30 days, over all its orders."""
    body = event(
        payment={"card_network": "visa"}, failure={"error_code": "card_declined", "network_decline_code": "51"}
    )
    body[CARD_REATTEMPTS_FIELD] = reported
    return body


def _retries_made(h: Harness) -> int:
    return sum(1 for a in h.view().attempts if a.strategy not in ("initial", "retarget_link"))


def test_the_executors_own_retries_count_against_the_visa_cap_the_caller_reported(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
) -> None:
    """A card the caller reports at 19 re-attempts (of Visa's 20 in 30 days) may get one more. The rules took the
    larger of the reported figure and the order's own history, and the executor replayed the figure as it was at
    the failure event: its own retries were never added to it, so the plan (three retries within max_retries)
    went out in full: the card's 20th, 21st and 22nd re-attempts."""
    retry = {"action": "retry", "strategy": "retry_same", "connector": "stripe", "delay": timedelta(minutes=15)}
    h = make_harness(dict(retry), dict(retry), dict(retry), connector=FakeConnector(results=["failure"] * 3))
    h.executor.payment_failed("m_demo", _visa_event(19))
    for _ in range(6):
        h.drain()
        h.clock.advance(minutes=16)
    assert len(h.connector.calls) == 1, "re-attempts past Visa's cap reached the connector"
    assert _retries_made(h) == 1
    refused = [a.last_error for a in h.view().actions if a.kind == "retry" and a.last_error]
    assert refused
    assert all("visa_reattempt_cap" in error for error in refused), refused


def test_decide_sees_the_card_at_its_visa_cap_after_the_executors_retry(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
) -> None:
    """The real rules-only decide(): after the one retry the cap allowed, the next decision point sees the card at
    20 of 20 and plans no further silent retry."""
    decider, stop = make_decider(load_catalog(), None, seed=1)
    try:
        h = make_harness(decider=decider, connector=FakeConnector(results=["failure"] * 5))
        body = _visa_event(19)
        body["failure"] = {**body["failure"], "error_code": "processing_error", "network_decline_code": "91"}
        h.executor.payment_failed("m_demo", body)
        for _ in range(60):
            h.drain()
            h.clock.advance(hours=1)
    finally:
        stop()
    view = h.view()
    assert _retries_made(h) <= 1, [(a.strategy, a.created_at) for a in view.attempts]
    later = view.decisions[1:]
    assert later
    assert all(d["action"] != "retry" for d in later), [d["action"] for d in later]
    assert "visa_reattempts:20/20" in later[0]["rules_applied"]


def test_an_order_without_a_reported_figure_counts_its_own_history_alone(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
) -> None:
    """No ``card_reattempts_30d``: the order's history is the count (three retries of a category-2 decline go)."""
    retry = {"action": "retry", "strategy": "retry_same", "connector": "stripe", "delay": timedelta(minutes=15)}
    h = make_harness(dict(retry), dict(retry), dict(retry), connector=FakeConnector(results=["failure"] * 3))
    body = _visa_event(0)
    del body[CARD_REATTEMPTS_FIELD]
    h.executor.payment_failed("m_demo", body)
    for _ in range(6):
        h.drain()
        h.clock.advance(minutes=16)
    assert len(h.connector.calls) == 3


class BrokenConnector:
    """A connector every charge through which fails with ``error`` (counted in ``calls``)."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls: list[str] = []

    def charge(self, request: ChargeRequest) -> ChargeResult:
        self.calls.append(request.payment_id)
        raise self.error


CASCADE_TO_ADYEN = {"action": "retry", "strategy": "cascade", "connector": "adyen"}
CASCADE_TO_CYBERSOURCE = {"action": "retry", "strategy": "cascade", "connector": "cybersource"}


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(None, id="no-endpoint-configured"),
        pytest.param(RefusedError("connector 'adyen' refused the request with HTTP 400: unknown account"), id="4xx"),
        pytest.param(UnreachedError("cannot reach connector 'adyen'"), id="unreachable-on-every-try"),
    ],
)
def test_a_retry_that_cannot_go_out_through_its_connector_leaves_the_order_to_another_decision(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    broken: Exception | None,
) -> None:
    """A retry planned on a connector the merchant has no endpoint for (a caller's ``available_connectors`` may
    name any), or that the switch refuses outright, or that no try reaches, was dead-lettered and nothing
    followed: no other connector, no payment link, the order failed at the window's end a week later. Nothing
    was charged, so the order is decided again at once, without that connector."""
    h = make_harness(
        dict(CASCADE_TO_ADYEN),
        dict(CASCADE_TO_CYBERSOURCE),
        connector=FakeConnector(results=["success"]),
        max_attempts=3,
    )
    good = h.connector
    h.effects.connectors.sandbox_url = None
    h.effects.connectors.overrides = {"stripe": good, "cybersource": good}
    if broken is not None:
        h.effects.connectors.overrides["adyen"] = BrokenConnector(broken)
    h.executor.payment_failed("m_demo", event(available_connectors=["stripe", "adyen", "cybersource"]))
    for _ in range(10):
        h.drain()
        h.clock.advance(minutes=5)

    view = h.view()
    dead = [a for a in view.actions if a.kind == "retry" and a.state == "dead"]
    assert len(dead) == 1  # dead-lettered all the same, for an operator to see
    assert [(a.strategy, a.connector, a.status) for a in view.attempts[1:]] == [("cascade", "cybersource", "success")]
    assert view.state == "SUCCEEDED"
    second = h.executor.decider.requests[1]  # type: ignore[attr-defined]
    assert second.available_connectors == ["stripe", "cybersource"]
    # the refused charge is no retry made: it is not in the history and its number is not counted as one
    assert [a.strategy for a in second.history.attempts] == ["initial"]


def test_a_retry_refused_by_the_connector_on_the_merchants_own_order_is_not_offered_again(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
) -> None:
    """Without ``available_connectors`` (the merchant's pecking order applies), the connector that could not take
    the retry is left out of the next decision's connectors, and a retry already planned on it is refused at its
    send by the rules (connector_unavailable), never sent."""
    h = make_harness(
        dict(CASCADE_TO_ADYEN),
        {**CASCADE_TO_ADYEN, "delay": timedelta(hours=1)},  # the scripted decider insists on adyen
        dict(CASCADE_TO_CYBERSOURCE),
        connector=FakeConnector(results=["success"]),
    )
    broken = BrokenConnector(RefusedError("connector 'adyen' refused the request with HTTP 403"))
    h.effects.connectors.overrides = {"adyen": broken, "*": h.connector}
    h.executor.payment_failed("m_demo", event())
    for _ in range(4):
        h.drain()
        h.clock.advance(minutes=61)
    view = h.view()
    assert broken.calls == ["ord_1_2"]
    assert view.state == "SUCCEEDED"
    assert [(a.connector, a.status) for a in view.attempts[1:]] == [("cybersource", "success")]
    assert "adyen" not in (h.executor.decider.requests[1].available_connectors or [])  # type: ignore[attr-defined]
    replanned = [a.last_error for a in view.actions if a.kind == "retry" and a.state == "done" and a.last_error]
    assert replanned == ["not allowed now: connector_unavailable"]


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(TransientError("connector 'adyen' answered HTTP 503"), id="5xx-may-have-charged"),
        pytest.param(PermanentError("connector 'adyen' answered a body that is not JSON"), id="unreadable-answer"),
    ],
)
def test_a_retry_that_may_have_charged_is_still_left_to_an_operator(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    error: Exception,
) -> None:
    """A charge that may have reached the switch is not a connector that failed: the order is not decided again
    (no second charge on top of one that may have been taken) until an operator answers for it."""
    h = make_harness(dict(CASCADE_TO_ADYEN), dict(CASCADE_TO_CYBERSOURCE), max_attempts=2)
    h.effects.connectors.overrides = {"adyen": BrokenConnector(error), "*": h.connector}
    h.executor.payment_failed("m_demo", event())
    for _ in range(6):
        h.drain()
        h.clock.advance(minutes=5)
    assert len(h.executor.decider.requests) == 1  # type: ignore[attr-defined]
    assert h.connector.calls == []
    with h.executor.engine.connect() as conn:
        retry = conn.execute(actions.select().where(actions.c.kind == "retry")).mappings().one()
    assert retry["state"] == "dead"
    assert retry["unanswered_since"] is not None
    assert h.view().state == "PENDING"


def test_a_retry_reaches_the_configured_endpoint_of_its_connector_however_the_caller_spells_it(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
) -> None:
    """The rules read connector names trimmed and in any case, and a decision spells its connector as the caller's
    ``available_connectors`` do ("Adyen"); the connectors' endpoints were looked up by the exact name, so a
    merchant's ``adyen`` endpoint was not found: the retry went to the sandbox when one was set, or was refused as
    a connector without an endpoint."""
    switch = start_sandbox(seed=3)
    try:
        merchant = demo_merchant(
            connectors=["stripe", "adyen"],
            connector_endpoints={"adyen": {"kind": "sandbox", "base_url": switch.url}},
        )
        h = make_harness(dict(CASCADE_TO_ADYEN) | {"connector": "Adyen"}, merchants={"m_demo": merchant})
        h.effects.connectors.overrides = {}
        h.effects.connectors.sandbox_url = None
        h.executor.payment_failed(
            "m_demo", event(available_connectors=["Stripe", "Adyen"], failure={"connector": "Stripe"})
        )
        for _ in range(3):
            h.drain()
            h.clock.advance(minutes=1)
        stats = httpx.get(f"{switch.url}/v1/stats").json()
    finally:
        switch.stop()
    view = h.view()
    assert stats == {"calls": 1, "charges": 1, "refunds": 0}
    assert [(a.strategy, a.connector) for a in view.attempts[1:]] == [("cascade", "Adyen")]
    assert all(a.state != "dead" for a in view.actions)


#: A decline code as some switches spell it: longer than the 32 characters the code columns held before 0008.
LONG_CODE = "05 - Do Not Honor (issuer declined)"


class LongCodeConnector:
    """Declines every charge with ``LONG_CODE`` as its network decline code."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def charge(self, request: ChargeRequest) -> ChargeResult:
        self.calls.append(request.payment_id)
        return ChargeResult(
            status="failure", connector=request.connector, error_code="card_declined", network_decline_code=LONG_CODE
        )


def test_a_decline_with_a_long_code_is_recorded_and_its_order_decided_again(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """On PostgreSQL a connector's decline whose code did not fit its column could not be recorded: the charge was
    re-sent until dead-lettered as one whose outcome is unknown, and its order waited for an operator."""
    connector = LongCodeConnector()
    h = make_harness(
        dict(CASCADE_TO_ADYEN), dict(CASCADE_TO_CYBERSOURCE), connector=connector, database_url=database_url
    )
    h.executor.payment_failed("m_demo", event())
    for _ in range(6):
        h.drain()
        h.clock.advance(minutes=5)
    view = h.view()
    assert connector.calls == ["ord_1_2", "ord_1_3"]
    assert [(a.connector, a.network_decline_code) for a in view.attempts[1:]] == [
        ("adyen", LONG_CODE),
        ("cybersource", LONG_CODE),
    ]
    assert all(a.state != "dead" for a in view.actions)
    assert view.state == "FAILED"


def test_a_failure_event_with_a_long_code_is_taken(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """A never-seen code is valid input (CONTRACT.md section 2); on PostgreSQL a long one failed the event."""
    h = make_harness(dict(CASCADE_TO_ADYEN), database_url=database_url)
    answer = h.executor.payment_failed("m_demo", event(failure={"network_decline_code": LONG_CODE}))
    assert answer.state == "PENDING"
    assert h.view().attempts[0].network_decline_code == LONG_CODE


def test_a_mastercard_card_gets_no_more_than_ten_declines_a_day_whatever_max_retries_allows(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
) -> None:
    """A merchant allowing 15 retries per order, and a policy retrying every few seconds: the card got fifteen
    declined re-attempts in about a minute. The cap is ten declines in 24 hours, the original attempt's included
    (review: the first form allowed ten re-attempts after it, an 11th decline), checked again at each send."""
    retry = {"action": "retry", "strategy": "retry_same", "connector": "stripe", "delay": timedelta(seconds=2)}
    h = make_harness(
        *[dict(retry) for _ in range(15)],
        connector=FakeConnector(results=["failure"] * 15),
        merchants={"m_demo": demo_merchant(retry={"max_retries": 15})},
    )
    h.executor.payment_failed(
        "m_demo",
        event(
            payment={"card_network": "mastercard"},
            failure={"error_code": "processing_error", "network_decline_code": "96"},
        ),
    )
    for _ in range(40):
        h.drain()
        h.clock.advance(seconds=5)
    assert len(h.connector.calls) == 9  # with the original attempt's, ten declines
    assert _retries_made(h) == 9
    refused = [a.last_error for a in h.view().actions if a.kind == "retry" and a.last_error]
    assert refused
    assert all("mastercard_reattempt_cap" in error for error in refused), refused


def test_a_upi_autopay_re_send_waits_out_npcis_peak_hours(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
) -> None:
    """A UPI AutoPay retry sent at 16:59:59 IST whose answer was lost (a 503 that may come after the charge) is
    sent again 1 s later, at 17:00:00, in NPCI's peak hours. A re-send skipped the rules (it is the same charge,
    asked again), so if the first send never arrived the switch executed the mandate in peak hours (hunt 31, from
    reading). It now waits for 21:30 IST, the end of the peak window, keeping its mark."""
    off_peak_edge = timedelta(hours=5, minutes=29, seconds=59)  # START is 11:30 IST: this is 16:59:59 IST
    retry = {"action": "retry", "strategy": "retry_same", "connector": "stripe", "delay": off_peak_edge}
    h = make_harness(retry, connector=FakeConnector(results=["failure"], transient_first=1))
    # In rupees, as every UPI payment is: 499 USD would be above the e-mandate AFA-free limit (no silent retry at all).
    upi_autopay = {"payment_method": "upi_autopay", "payment_method_type": "mandate", "card_network": None}
    body = event(currency="INR", payment=upi_autopay)
    h.executor.payment_failed("m_demo", body)
    h.clock.advance(seconds=off_peak_edge.total_seconds())
    h.drain()
    assert len(h.connector.calls) == 1  # sent off-peak; its answer was lost
    h.clock.advance(seconds=1)
    h.drain()
    assert len(h.connector.calls) == 1, "a UPI AutoPay charge was re-sent in NPCI's peak hours"
    waiting = next(a for a in h.view().actions if a.kind == "retry")
    assert waiting.due_at == START + timedelta(hours=10)  # 21:30 IST
    assert "peak hours" in (waiting.last_error or "")
    h.clock.advance(hours=4, minutes=30)
    h.drain()
    assert len(h.connector.calls) == 2  # asked again once the window opened
    assert _retries_made(h) == 1


def test_a_re_send_after_a_lost_answer_that_the_rules_now_forbid_is_not_sent(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
) -> None:
    """A one-off payment's retry may go only within 10 minutes of its customer's checkout (hard_rules.yaml). Sent
    in time, its answer is lost (a 503 that may come after the charge); the re-send comes 11 minutes later. It
    skipped the rules (the same charge, asked again), so if the first send never arrived the switch charged the
    customer out of the window. Now it is not sent: it stays a charge that may have gone out (dead, its mark kept)
    and its switch is asked what became of the first send."""
    retry = {"action": "retry", "strategy": "cascade", "connector": "adyen"}
    h = make_harness(retry, connector=FakeConnector(results=["success"], transient_first=1))
    h.executor.payment_failed("m_demo", event(payment={"is_recurring": False}))
    h.drain()
    assert len(h.connector.calls) == 1  # sent at once; its answer was lost
    h.clock.advance(minutes=11)
    h.drain()
    assert len(h.connector.calls) == 1, "a retry was re-sent out of its one-off checkout window"
    waiting = next(a for a in h.view().actions if a.kind == "retry")
    assert (waiting.state, waiting.unanswered_since is not None) == ("dead", True), waiting
    assert "not sent again: not allowed now: one_off_out_of_session" in (waiting.last_error or ""), waiting
    assert [a.kind for a in h.view().actions if a.kind == "charge_status"] == ["charge_status"]


class UnreachableAtFirst:
    """No try reaches the connector for its first ``down`` calls (an outage, a rate limit), then it charges."""

    def __init__(self, down: int, result: str = "success") -> None:
        self.down = down
        self.result = result
        self.calls: list[str] = []

    def charge(self, request: ChargeRequest) -> ChargeResult:
        self.calls.append(request.payment_id)
        if len(self.calls) <= self.down:
            raise UnreachedError("cannot reach connector 'stripe' (connection refused)")
        return ChargeResult(status="success" if self.result == "success" else "failure", connector=request.connector)


def test_a_connector_no_try_reached_during_a_short_outage_is_offered_to_the_order_again_later(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
) -> None:
    """(Review of 5b919bf.) A retry dead-lettered because no try reached its connector (a few minutes' outage, or
    a rate limit) took the connector out of the order for good: a one-connector merchant never got another silent
    retry, and the retry planned for the next day on the same connector was refused at its send
    (connector_unavailable). The connector is left out only for a while."""
    retry = {"action": "retry", "strategy": "retry_same", "connector": "stripe"}
    next_day = {"action": "retry", "strategy": "retry_same", "connector": "stripe", "delay": timedelta(days=1)}
    switch = UnreachableAtFirst(down=8)
    h = make_harness(dict(retry), dict(next_day), merchants={"m_demo": demo_merchant(connectors=["stripe"])})
    h.effects.connectors.overrides = {"*": switch}
    h.executor.payment_failed("m_demo", event(available_connectors=None))
    for _ in range(30):  # eight tries over about four minutes, then the retry is dead-lettered
        h.drain()
        h.clock.advance(seconds=30)
    assert switch.calls == ["ord_1_2"] * 8
    requests = h.executor.decider.requests  # type: ignore[attr-defined]
    assert requests[1].available_connectors == []  # right after the outage: not offered
    h.clock.advance(days=1)
    for _ in range(3):
        h.drain()
        h.clock.advance(minutes=5)
    view = h.view()
    assert len(switch.calls) == 9, [(a.kind, a.state, a.last_error) for a in view.actions]
    assert [(a.connector, a.status) for a in view.attempts[1:]] == [("stripe", "success")]
    assert view.state == "SUCCEEDED"


# (payment, failure of the card on file, the silent retries of it still allowed, the rule that refuses the others)
CARD_ON_FILE_BANS = [
    pytest.param(
        {"card_network": "visa"},
        {"error_code": "card_declined", "network_decline_code": "14"},
        (),
        "visa_category_1",
        id="visa-category-1",
    ),
    pytest.param(
        {"card_network": "mastercard"},
        {"error_code": "card_declined", "network_decline_code": "05", "merchant_advice_code": "03"},
        (),
        "mastercard_mac_never_retry",
        id="mastercard-mac-03",
    ),
    # A security decline (83) with MAC 01: the advice is to authenticate the cardholder, so the card on file is
    # re-presented only through a 3DS step-up (the suspected_fraud rule), never as it was.
    pytest.param(
        {"card_network": "mastercard"},
        {"error_code": "card_declined", "network_decline_code": "83", "merchant_advice_code": "01"},
        ("step_up",),
        "suspected_fraud",
        id="mastercard-83-mac-01",
    ),
    # A Visa category-3 decline (54, expired card): re-attempted only with revalidated details (clear PAN) or the
    # cardholder's authentication (step-up), never as it was.
    pytest.param(
        {"card_network": "visa"},
        {"error_code": "card_declined", "network_decline_code": "54"},
        ("step_up", "clear_pan"),
        "visa_category_3_same_details",
        id="visa-category-3",
    ),
]


def _card_declined_then_link_declined(h: Harness, payment: dict[str, Any], failure: dict[str, Any]) -> None:
    """The card on file declined with ``failure``; a payment link is sent and paid, and its payment is declined
    as issuer unavailable (91): the order's last failure is the link's."""
    h.executor.payment_failed("m_demo", event(payment=payment, failure=failure))
    h.drain()
    token = h.outbox[0].variables["link_url"].rsplit("/pay/", 1)[1]
    h.executor.open_link(token)
    link = h.executor.start_link_payment(token, 30, "api", "claim-link")
    h.worker.record([(link.action, h.effects.perform(link.action, _order_row(h)))])


@pytest.mark.parametrize(("payment", "failure", "still_allowed", "ban"), CARD_ON_FILE_BANS)
def test_a_declined_link_payment_does_not_lift_the_card_on_files_ban_on_re_attempts(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    payment: dict[str, Any],
    failure: dict[str, Any],
    still_allowed: tuple[str, ...],
    ban: str,
) -> None:
    """Found in review: a Visa category-1 decline (or a Mastercard MAC 03) of the card on file was forgotten once a
    payment through a link was declined otherwise: the order's failure became the link's 91, and a silent retry of
    the card on file went out, at the decision and at its send. The card is never re-attempted as it was (an 83 with
    MAC 01, whose advice is to authenticate the cardholder, was open to a retry_same that way too)."""
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retry", "strategy": "retry_same", "connector": "stripe"},
        connector=FakeConnector(results=["failure", "failure"]),
    )
    _card_declined_then_link_declined(h, payment, failure)
    for _ in range(5):
        h.drain()
        h.clock.advance(hours=1)
    assert [call.split(":")[2] for call in h.connector.calls] == ["link"], "the card on file was re-attempted"
    refused = [a.last_error or "" for a in h.view().actions if a.kind == "retry"]
    assert refused
    assert all(ban in e for e in refused), refused


@pytest.mark.parametrize(("payment", "failure", "still_allowed", "ban"), CARD_ON_FILE_BANS)
def test_decide_plans_no_retry_of_the_card_on_file_after_a_declined_link_payment(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    payment: dict[str, Any],
    failure: dict[str, Any],
    still_allowed: tuple[str, ...],
    ban: str,
) -> None:
    """The request the executor decides on after the link's decline is about the card on file's decline, so the real
    decide() plans no silent retry the card on file's decline forbids (it planned one on the link's 91)."""
    h = make_harness({"action": "retarget", "channel": "sms"}, connector=FakeConnector(results=["failure"]))
    _card_declined_then_link_declined(h, payment, failure)
    with h.executor.engine.connect() as conn:
        request = h.executor.request_for(conn, _order_row(h), h.clock.now)
    assert request.failure.network_decline_code == failure["network_decline_code"]
    assert request.history.attempts[-1].strategy == "retarget_link"  # the link's decline stays in the history
    for _ in range(5):
        decision = decide(request, demo_merchant(), None, catalog=load_catalog())
        planned = [decision, *decision.alternatives]
        assert all(d.strategy in still_allowed for d in planned if d.action == "retry"), (ban, planned)


def test_the_executor_counts_a_declined_link_payment_against_mastercards_decline_cap(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
) -> None:
    """The executor judges a planned retry on the order's stored attempts: a payment through a link declined on the
    card's Mastercard network counts as a decline of the card, like the original attempt's (Mastercard counts every
    declined authorization of the card number; the link may have been paid with the card on file)."""
    h = make_harness({"action": "retarget", "channel": "sms"}, connector=FakeConnector(results=["failure"]))
    _card_declined_then_link_declined(h, {"card_network": "mastercard"}, {"network_decline_code": "51"})
    with h.executor.engine.connect() as conn:
        request = h.executor.request_for(conn, _order_row(h), h.clock.now)
    assert request.history.attempts[-1].strategy == "retarget_link"
    context = build_context(request, demo_merchant(), load_catalog())
    assert "mastercard_declines:2/10" in context.rules_applied
