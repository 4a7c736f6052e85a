"""Defect hunt of the assisted-mode console: two agents (or one double click) acting on the same order.

Drives the real executor (SQLite file or PostgreSQL database) and the console's ``AgentDesk`` that the
``POST /console/orders/{id}/actions`` route calls.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest
import sqlalchemy as sa

from model.catalog import load_catalog
from service.console.actions import ActionRequest, ActionResult, AgentDesk
from service.console.auth import add_agent, authenticate
from service.executor.store import actions, agent_queue, orders
from tests.integration.test_console import CSRF_RE, Console, console, flash  # noqa: F401 - console is a fixture
from tests.integration.test_executor import (  # noqa: F401 - make_harness is a fixture
    Harness,
    demo_merchant,
    event,
    make_harness,
)

PASSWORD = "correct horse battery"


def _race(h: Harness, first: ActionRequest, second: ActionRequest) -> tuple[ActionResult, ActionResult]:
    """Two agents act on ``ord_1`` at once: both have planned their action (their first transaction committed)
    before either is carried out; the one that planned first is carried out first."""
    desk = AgentDesk(h.executor, load_catalog())
    ana = add_agent(h.executor.engine, "m_demo", "ana@m_demo", PASSWORD)
    bo = add_agent(h.executor.engine, "m_demo", "bo@m_demo", PASSWORD)
    original = h.executor.act_on_queued
    arrived: list[str] = []
    lock = threading.Lock()
    second_planned, first_done = threading.Event(), threading.Event()

    def act_on_queued(*args: Any, **kwargs: Any) -> str:
        with lock:
            arrived.append(threading.current_thread().name)
            leading = len(arrived) == 1
        if leading:
            assert second_planned.wait(10)
            try:
                return original(*args, **kwargs)
            finally:
                first_done.set()
        second_planned.set()
        assert first_done.wait(10)
        return original(*args, **kwargs)

    h.executor.act_on_queued = act_on_queued  # type: ignore[method-assign]
    results: dict[str, ActionResult] = {}
    asks = {"ana": (ana, first), "bo": (bo, second)}

    def run(name: str) -> None:
        agent, ask = asks[name]
        results[name] = desk.perform(agent, "ord_1", ask)

    threads = [threading.Thread(target=run, args=(name,), name=name) for name in asks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    h.executor.act_on_queued = original  # type: ignore[method-assign]
    leading, trailing = arrived
    return results[leading], results[trailing]


def _nudge_channels(h: Harness) -> list[str]:
    with h.executor.engine.connect() as conn:
        payloads = conn.scalars(sa.select(actions.c.payload_json).where(actions.c.kind == "nudge"))
        return [json.loads(p)["channel"] for p in payloads]


def test_two_agents_sending_links_at_once_send_one_and_each_is_told_what_happened(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """Agent 1 asks for a WhatsApp link, agent 2 for an SMS link, at the same moment. The executor carried out the
    latest queued decision whoever asked: agent 1 was told "send a payment link by WhatsApp now: done" while the
    SMS link (agent 2's) was scheduled, and agent 2 was told the order changed meanwhile."""
    h = make_harness(
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        merchants={"m_demo": demo_merchant(mode="assisted")},
        database_url=database_url,
    )
    assert h.executor.payment_failed("m_demo", event()).state == "AWAITING_AGENT"
    first, second = _race(h, ActionRequest("send_link", channel="whatsapp"), ActionRequest("send_link", channel="sms"))
    sent = _nudge_channels(h)
    assert len(sent) == 1, sent
    done = [r for r in (first, second) if r.ok]
    assert len(done) == 1, (first, second)
    assert sent[0] in done[0].message.lower(), (sent, done[0].message)
    other = next(r for r in (first, second) if not r.ok)
    assert "the order changed meanwhile" in other.message, other


def test_a_double_approve_carries_out_the_recommendation_once_and_tells_the_second_click(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """Two approvals of the same recommendation at once: one retry, and one of the two agents is told the order
    changed meanwhile (not "done" twice)."""
    h = make_harness(
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        merchants={"m_demo": demo_merchant(mode="assisted")},
        database_url=database_url,
    )
    h.executor.payment_failed("m_demo", event())
    first, second = _race(h, ActionRequest("approve"), ActionRequest("approve"))
    with h.executor.engine.connect() as conn:
        retries = conn.scalar(sa.select(sa.func.count()).select_from(actions).where(actions.c.kind == "retry"))
    assert retries == 1
    assert [first.result, second.result] == ["done", "failed"], (first, second)
    # It was told "order 'ord_1' is PENDING: it does not wait for an agent", not who had acted, nor how.
    assert "already acted on order ord_1 (carry out the recommendation: Retry: cascade via adyen): it is PENDING" in (
        second.message
    )


# ---------------------------------------------------------------------------------- the console over HTTP

XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'


@pytest.mark.parametrize("alternative", ["\u00b2", "9" * 5000])
def test_an_alternative_that_is_not_a_plain_number_is_refused_not_a_server_error(
    console: Console,  # noqa: F811 - the fixture
    alternative: str,
) -> None:
    """``str.isdigit`` is true for a superscript two and for 5,000 nines, which ``int()`` refuses: the override
    form answered 500 instead of asking the agent to choose one of the listed alternatives."""
    console.fail_order("m_a", "ord_alt")
    console.sign_in("asha@m_a")
    answer = console.act(
        "/console/orders/ord_alt/actions",
        {"action": "override", "alternative": alternative, "reason": "test", "csrf_token": console.csrf()},
    )
    assert "choose one of the listed alternatives" in flash(answer)


def test_customer_and_connector_text_is_escaped_on_every_console_page(console: Console) -> None:  # noqa: F811
    """Text from callers and connectors (order id, error message, issuer, connector) and from agents (reasons)
    is shown escaped on the queue and the order page."""
    order_id = 'ord_"><svg onload=alert(1)>'
    console.fail_order(
        "m_a",
        order_id,
        payment={"issuer": XSS},
        failure={"connector": "stripe", "error_code": XSS, "error_message": XSS},
    )
    console.sign_in("asha@m_a")
    path = "/console/orders/" + quote(order_id, safe="")
    stopped = console.act(path + "/actions", {"action": "stop", "reason": XSS, "csrf_token": console.csrf()})
    assert flash(stopped) == "Stop recovering this order: done; the order is FAILED"  # its redirect found the order
    for page in (stopped, console.get("/console/queue?state=all"), console.get(path)):
        assert page.status_code == 200, page.text[:300]
        assert "<script>" not in page.text
        assert "<img" not in page.text
        assert "<svg" not in page.text
    assert "&lt;script&gt;" in console.get(path).text


def test_an_action_on_a_recommendation_that_changed_since_the_page_was_loaded_is_refused(
    console: Console,  # noqa: F811 - the fixture
) -> None:
    """The agent's page shows recommendation D1 and its alternatives; meanwhile the order is decided again (a
    follow-up) and D2 waits instead. The forms named no decision, so "override with alternative 0" or "carry it
    out" acted on D2, an action the agent never saw. Each form now carries the decision it shows."""
    console.fail_order("m_a", "ord_stale")
    console.sign_in("asha@m_a")
    page = console.get("/console/orders/ord_stale").text
    shown = re.search(r'name="decision_id" value="([^"]+)"', page)
    assert shown is not None, "the action forms name the recommendation they show"
    executor = console.api.app.state.executor.executor
    with executor.engine.begin() as conn:  # a follow-up decides the order again: D2 waits instead of D1
        order = executor.lock_order(conn, "m_a", "ord_stale")
        executor._decision_point(conn, order, datetime.now(UTC))
    csrf = CSRF_RE.search(page)
    assert csrf is not None
    answer = console.act(
        "/console/orders/ord_stale/actions",
        {"action": "approve", "decision_id": shown.group(1), "csrf_token": csrf.group(1)},
    )
    assert "the recommendation changed since this page was loaded" in flash(answer)
    with console.engine.connect() as conn:
        assert conn.scalar(sa.select(orders.c.state).where(orders.c.order_id == "ord_stale")) == "AWAITING_AGENT"
        pending = conn.scalars(sa.select(agent_queue.c.decision_id).where(agent_queue.c.state == "pending")).all()
    assert len(pending) == 1  # only D2 waits
    assert pending[0] != shown.group(1)


def test_a_recommendation_decided_over_does_not_wait_again_once_the_newer_one_is_acted_on(
    console: Console,  # noqa: F811 - the fixture
) -> None:
    """D1 waits; a follow-up decides the order again and D2 waits. D1 was left waiting too: once an agent
    acted on D2, D1 was still in the queue as waiting, and the queue (which shows the waiting recommendation
    before the order's latest decision) showed the order with a recommendation from before the follow-up."""
    console.fail_order("m_a", "ord_twice")
    console.sign_in("asha@m_a")
    first = re.search(r'name="decision_id" value="([^"]+)"', console.get("/console/orders/ord_twice").text)
    assert first is not None
    executor = console.api.app.state.executor.executor
    with executor.engine.begin() as conn:
        order = executor.lock_order(conn, "m_a", "ord_twice")
        executor._decision_point(conn, order, datetime.now(UTC))
    page = console.get("/console/orders/ord_twice").text
    second = re.search(r'name="decision_id" value="([^"]+)"', page)
    csrf = CSRF_RE.search(page)
    assert second is not None
    assert csrf is not None
    assert second.group(1) != first.group(1)
    answer = console.act(
        "/console/orders/ord_twice/actions",
        {"action": "approve", "decision_id": second.group(1), "csrf_token": csrf.group(1)},
    )
    assert flash(answer).startswith("Carry out the recommendation"), flash(answer)
    with console.engine.connect() as conn:
        waiting = conn.scalars(sa.select(agent_queue.c.decision_id).where(agent_queue.c.state == "pending")).all()
    assert waiting == []
    again = console.act(
        "/console/orders/ord_twice/actions",
        {"action": "approve", "decision_id": first.group(1), "csrf_token": csrf.group(1)},
    )
    assert "you already acted on order ord_twice" in flash(again)


def _page_form(console: Console, order_id: str) -> dict[str, str]:  # noqa: F811 - the fixture
    """The approve form's fields as the order page shows them now."""
    page = console.get(f"/console/orders/{order_id}").text
    shown, csrf = re.search(r'name="decision_id" value="([^"]+)"', page), CSRF_RE.search(page)
    assert shown is not None
    assert csrf is not None
    return {"action": "approve", "decision_id": shown.group(1), "csrf_token": csrf.group(1)}


def test_an_agent_acting_on_an_order_another_agent_or_the_customer_settled_is_told_what_happened(
    console: Console,  # noqa: F811 - the fixture
) -> None:
    """Two agents of an assisted merchant have the same order open; one sends a link, then the other clicks
    "Carry it out". The second was told "agents act only on orders waiting for them (assisted mode); winback runs
    this one by itself": of an assisted merchant's order, which an agent had just acted on. So was an agent whose
    order the customer had paid meanwhile."""
    add_agent(console.engine, "m_a", "cy@m_a", PASSWORD)
    asha = authenticate(console.engine, "asha@m_a", PASSWORD)
    assert asha is not None
    console.fail_order("m_a", "ord_shared")
    console.fail_order("m_a", "ord_paid")
    console.sign_in("cy@m_a")
    shared, paid = _page_form(console, "ord_shared"), _page_form(console, "ord_paid")

    desk = AgentDesk(console.api.app.state.executor.executor, load_catalog())
    assert desk.perform(asha, "ord_shared", ActionRequest("send_link", channel="email")).ok
    late = console.act("/console/orders/ord_shared/actions", shared)
    assert "asha@m_a already acted on order ord_shared (send a payment link by email now): it is PENDING" in flash(late)
    assert "runs this one by itself" not in late.text

    succeeded = {
        "order_id": "ord_paid",
        "txn_id": "txn_ext_paid",
        "occurred_at": datetime.now(UTC).isoformat(),
        "idempotency_key": "ok_paid",
    }
    assert console.api.post("/v1/events/payment-succeeded", succeeded, key="wb_demo_m_a").status_code == 202
    after_payment = console.act("/console/orders/ord_paid/actions", paid)
    assert flash(after_payment) == "order ord_paid is already recovered (SUCCEEDED): nothing is left to do"


def test_a_recommendation_the_hard_rules_forbid_by_now_is_not_offered_as_the_action_to_take(
    console: Console,  # noqa: F811 - the fixture
) -> None:
    """A one-off payment's soft decline: the recommendation is a retry, which may go only while the customer is in
    session. It waits for an agent for days; two hours on, the page still offered "Carry it out" (and "Schedule
    retry", and the retries among the alternatives), each refused at every click with one_off_out_of_session."""
    console.fail_order(
        "m_a",
        "ord_one_off",
        payment={"is_recurring": False},
        failure={"connector": "stripe", "error_code": "processing_error", "network_decline_code": "96"},
        # A US card payment: an Indian one-off card payment is retried only by a step-up (rbi_one_off_afa).
        customer={"country": "US"},
        currency="USD",
    )
    console.sign_in("asha@m_a")
    fresh = console.get("/console/orders/ord_one_off").text
    assert re.search(r'data-testid="recommendation">Retry: ', fresh), "the scenario needs a retry recommended"
    assert re.search(r'data-testid="approve">Carry it out', fresh)
    assert "No longer permitted" not in fresh

    executor = console.api.app.state.executor.executor
    later = datetime.now(UTC) + timedelta(hours=2)
    executor.clock = lambda: later
    page = console.get("/console/orders/ord_one_off").text
    assert re.search(r'data-testid="approve" disabled>Carry it out', page), page
    assert re.search(
        r'data-testid="approve-forbidden">No longer permitted: forbidden now by <code>one_off_out_of_session', page
    )
    assert re.search(r'data-testid="retry" disabled>Schedule retry', page)
    options = re.findall(r"<option value=\"\d+\"( disabled)?>([^<]+)</option>", page)
    retries = [(disabled, text) for disabled, text in options if text.startswith("Retry: ")]
    assert retries, options
    assert all(
        disabled and "(forbidden now: " in text and "one_off_out_of_session" in text for disabled, text in retries
    )
    links = [(disabled, text) for disabled, text in options if text.startswith("Payment link by ")]
    assert links, options
    assert not any(disabled for disabled, _ in links), options
    refused = console.act("/console/orders/ord_one_off/actions", {"action": "approve", "csrf_token": console.csrf()})
    assert "one_off_out_of_session" in flash(refused)  # what the disabled button would have been answered


def test_a_channel_the_hard_rules_forbid_now_is_not_offered_for_a_link(
    console: Console,  # noqa: F811 - the fixture
) -> None:
    """The customer opted out of WhatsApp: "Send the payment link now" still offered WhatsApp, refused at the click
    with channel_opted_out. Once no channel is permitted (opted out of e-mail too), the button was still there."""
    console.fail_order("m_a", "ord_opted_out", customer={"opted_out_channels": ["whatsapp"]})
    console.fail_order("m_a", "ord_no_channel", customer={"opted_out_channels": ["whatsapp", "email"]})
    console.sign_in("asha@m_a")
    page = console.get("/console/orders/ord_opted_out").text
    assert '<option value="whatsapp" disabled>WhatsApp (forbidden now: channel_opted_out)</option>' in page, page
    assert '<option value="email">email</option>' in page
    assert re.search(r'data-testid="send-link">Send link', page)
    closed = console.get("/console/orders/ord_no_channel").text
    assert re.search(r'data-testid="send-link" disabled>Send link', closed)
    assert "No channel is permitted now." in closed


def test_the_queue_says_which_recommendations_the_hard_rules_forbid_by_now(
    console: Console,  # noqa: F811 - the fixture
) -> None:
    """The order page disables a recommendation the rules forbid by now (a one-off payment's retry two hours after
    the customer left), but the queue listed it as if it could be carried out."""
    console.fail_order(
        "m_a",
        "ord_one_off",
        payment={"is_recurring": False},
        failure={"connector": "stripe", "error_code": "processing_error", "network_decline_code": "96"},
    )
    console.fail_order("m_a", "ord_recurring")
    console.sign_in("asha@m_a")

    def rows(page: str) -> dict[str, str]:
        return {
            found.group(1): found.group(0) for found in re.finditer(r'<tr data-order="([^"]+)".*?</tr>', page, re.S)
        }

    fresh = rows(console.get("/console/queue").text)
    assert set(fresh) == {"ord_one_off", "ord_recurring"}
    assert "Retry: " in fresh["ord_one_off"], "the scenario needs a retry recommended"
    assert not any("queue-forbidden" in row for row in fresh.values())

    executor = console.api.app.state.executor.executor
    later = datetime.now(UTC) + timedelta(hours=2)
    executor.clock = lambda: later
    for headers in ({}, {"HX-Request": "true", "HX-Target": "queue-results"}):
        page = rows(console.get("/console/queue", headers=headers).text)
        assert re.search(
            r'data-testid="queue-forbidden">No longer permitted: forbidden now by <code>one_off_out_of_session',
            page["ord_one_off"],
        ), page["ord_one_off"]
        assert "queue-forbidden" not in page["ord_recurring"]
    order = console.get("/console/orders/ord_one_off").text  # what the order page says of it
    assert re.search(r'data-testid="approve" disabled>Carry it out', order)
