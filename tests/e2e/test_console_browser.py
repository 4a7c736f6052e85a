"""The agent console in a real browser: Debian's chromium driven by Playwright against the real server
(uvicorn in a subprocess, SQLite in a temp dir, rules-only decisions).

Skipped when /usr/bin/chromium or Playwright is missing on a developer's machine; in CI (``CI`` set) that fails.
Screenshots of every page land in the test's tmp dir (``console-*.png``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.executor.core import REFUND_SWITCH_SILENT
from tests.factories import (
    insert_lost_charge,
    insert_paid_twice,
    insert_refund_by_hand,
    insert_silent_uncharged,
    make_request,
    write_console_config,
)

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
AGENT, OTHER_AGENT, PASSWORD = "asha@m_a", "bo@m_b", "correct horse battery"


def _require_browser() -> Any:
    missing = None
    if not CHROMIUM.exists():
        missing = f"{CHROMIUM} is not installed (apt-get install -y chromium)"
    else:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            missing = "the playwright package is not installed (pip install playwright)"
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests must run in CI: {missing}")
        pytest.skip(missing)
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _event(merchant_id: str, order_id: str, days_ago: float, **overrides: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    first = now - timedelta(days=days_ago)
    nudges = overrides.pop("nudges", [])
    body: dict[str, Any] = json.loads(
        make_request(
            merchant_id=merchant_id,
            order_id=order_id,
            event_time=now.isoformat(),
            history={
                "attempts": [
                    {
                        "attempt_number": 1,
                        "connector": "stripe",
                        "strategy": "initial",
                        "status": "failure",
                        "error_code": overrides.get("failure", {}).get("error_code", "card_declined"),
                        "created_at": first.isoformat(),
                    }
                ],
                "nudges": nudges,
            },
            **overrides,
        ).model_dump_json()
    )
    return body | {"idempotency_key": f"evt_{order_id}"}


_FAILURES = [
    {},
    {
        "error_code": "processing_error",
        "error_message": "An error occurred while processing.",
        "network_decline_code": "96",
    },
    {"error_code": "stolen_card", "error_message": "The card was reported stolen.", "network_decline_code": "43"},
    {"error_code": "do_not_honor", "error_message": "The card was declined.", "network_decline_code": "05"},
    {"error_code": "expired_card", "error_message": "The card has expired.", "network_decline_code": "54"},
]


def seed(url: str) -> None:
    """Failed orders of m_a over the last week (some with clicked links, some recovered) and one of m_b."""
    with httpx.Client(base_url=url, timeout=20) as client:
        for index in range(24):
            days_ago = (index % 6) + 0.3
            sent = datetime.now(UTC) - timedelta(days=days_ago - 0.2, hours=index % 9)
            nudges = []
            if index % 3 == 0:
                clicked = (sent + timedelta(minutes=30)).isoformat() if index % 2 == 0 else None
                channel = ("whatsapp", "email", "sms")[index % 3 // 1 % 3] if index % 4 else "email"
                nudges = [{"channel": channel, "sent_at": sent.isoformat(), "delivered": True, "clicked_at": clicked}]
            body = _event(
                "m_a",
                f"ord_{1000 + index}",
                days_ago,
                amount=float(199 + 137 * (index % 7)),
                failure=_FAILURES[index % len(_FAILURES)],
                nudges=nudges,
            )
            answer = client.post(
                "/v1/events/payment-failed", json=body, headers={"Authorization": "Bearer wb_demo_m_a"}
            )
            assert answer.status_code == 202, answer.text
            if index % 4 == 1:
                done = {
                    "order_id": body["order_id"],
                    "txn_id": f"txn_ext_{index}",
                    "occurred_at": datetime.now(UTC).isoformat(),
                    "idempotency_key": f"ok_{index}",
                }
                ok = client.post(
                    "/v1/events/payment-succeeded", json=done, headers={"Authorization": "Bearer wb_demo_m_a"}
                )
                assert ok.status_code == 202, ok.text
        other = client.post(
            "/v1/events/payment-failed",
            json=_event("m_b", "ord_other_merchant", 1.0),
            headers={"Authorization": "Bearer wb_demo_m_b"},
        )
        assert other.status_code == 202, other.text


def _fail_order(url: str, order_id: str) -> None:
    """A payment of m_a that failed half a day ago, posted to the server at ``url``: an order waiting for an agent."""
    answer = httpx.post(
        f"{url}/v1/events/payment-failed",
        json=_event("m_a", order_id, 0.5),
        headers={"Authorization": "Bearer wb_demo_m_a"},
        timeout=20,
    )
    assert answer.status_code == 202, answer.text


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """The real API app with the console, on a free port, with two agents and seeded orders: its URL and its
    database's."""
    _require_browser()
    from service.console.admin import create_agent

    folder = tmp_path_factory.mktemp("console-e2e")
    config = write_console_config(folder / "merchants.yaml")
    database = f"sqlite:///{folder / 'winback.db'}"
    create_agent(database, "m_a", AGENT, PASSWORD, config)
    create_agent(database, "m_b", OTHER_AGENT, PASSWORD, config)
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("WINBACK_") and k != "MLFLOW_TRACKING_URI"},
        "WINBACK_CONFIG_PATH": str(config),
        "WINBACK_DATABASE_URL": database,
        "WINBACK_LOAD_MODEL": "false",
        "WINBACK_LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
    }
    log = (folder / "server.log").open("w+b")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "service.api.app:app_from_env",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise AssertionError(f"server did not start:\n{log.read().decode(errors='replace')[-3000:]}")
            time.sleep(0.1)
        seed(url)
        yield url, database
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - only if uvicorn hangs on shutdown
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def server(served: tuple[str, str]) -> str:
    """The served app's URL."""
    return served[0]


@pytest.fixture
def browser_page(server: str) -> Iterator[Any]:
    sync_playwright = _require_browser()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=server)
        page = context.new_page()
        page.set_default_timeout(10_000)
        try:
            yield page
        finally:
            context.close()
            browser.close()


def _sign_in(page: Any, name: str, password: str = PASSWORD) -> None:
    page.goto("/console/login")
    page.get_by_label("Agent name").fill(name)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()


#: Screenshots are kept as test artefacts here (ignored by git; CI can collect the folder).
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "e2e"


def _open_new_order(page: Any, url: str, order_id: str) -> None:
    """Post a failed payment of m_a as ``order_id``, sign in as its agent and open the order's page."""
    _fail_order(url, order_id)
    _sign_in(page, AGENT)
    page.wait_for_url("**/console/queue")
    page.goto(f"/console/orders/{order_id}")


def _shot(page: Any, folder: Path, name: str, full_page: bool = True) -> Path:
    path = folder / f"console-{name}.png"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / path.name), full_page=full_page)
    page.screenshot(path=str(path), full_page=full_page)
    return path


def test_agent_works_the_queue_acts_on_an_order_and_reads_the_charts(browser_page: Any, tmp_path: Path) -> None:
    page = browser_page
    _sign_in(page, AGENT)
    page.wait_for_url("**/console/queue")
    table = page.get_by_test_id("queue-table")
    assert table.locator("tbody tr").count() >= 10
    assert "ord_other_merchant" not in page.content()
    _shot(page, tmp_path, "queue")

    # Filter by an error class through htmx: the table updates in place and the URL follows.
    page.get_by_test_id("filter-error-class").select_option("hard_decline")
    page.wait_for_url("**error_class=hard_decline**")
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=queue-table] tbody tr[data-order]')]"
        ".every(r => r.dataset.errorClass === 'hard_decline')"
    )
    rows = table.locator("tbody tr[data-order]")
    assert rows.count() >= 1
    page.get_by_test_id("filter-error-class").select_option("")
    page.get_by_test_id("filter-state").select_option("AWAITING_AGENT")
    page.wait_for_url("**state=AWAITING_AGENT**")

    # Open the first order waiting for an agent and send it a payment link by email now.
    first = table.locator("tbody tr[data-state=AWAITING_AGENT] a.order-link").first
    order_id = first.inner_text()
    first.click()
    page.wait_for_url(f"**/console/orders/{order_id}")
    assert page.get_by_test_id("order-state").inner_text() == "Waiting for agent"
    _shot(page, tmp_path, "order")
    page.get_by_test_id("link-channel").select_option("email")
    page.get_by_test_id("send-link").click()
    result = page.get_by_test_id("result")
    result.wait_for()
    assert "done" in result.inner_text()
    assert page.get_by_test_id("order-state").inner_text() == "Automatic"
    audit = page.get_by_test_id("audit")
    assert AGENT in audit.inner_text()
    assert "send a payment link by email now" in audit.inner_text()
    assert "Decision: Payment link by email" in page.get_by_test_id("timeline").inner_text()
    _shot(page, tmp_path, "order-after-action")

    # The performance page's four pictures load.
    page.get_by_role("link", name="Performance").click()
    page.wait_for_url("**/console/performance")
    for name in ("funnel", "recovery", "retryability", "heatmap"):
        image = page.get_by_test_id(f"chart-{name}")
        image.scroll_into_view_if_needed()
        page.wait_for_function(
            "(el) => el.complete && el.naturalWidth > 300", arg=image.element_handle(), timeout=15_000
        )
    _shot(page, tmp_path, "performance")

    # Another merchant's order does not open, and the phone layout still works.
    missing = page.goto("/console/orders/ord_other_merchant")
    assert missing is not None
    assert missing.status == 404
    assert "There is no order ord_other_merchant for your merchant." in page.get_by_test_id("message").inner_text()
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto("/console/queue")
    assert page.get_by_test_id("queue-table").locator("tbody tr").count() >= 1
    _shot(page, tmp_path, "queue-phone", full_page=False)
    print(f"console screenshots in {tmp_path}")


def test_wrong_password_is_refused_and_sign_out_ends_the_session(browser_page: Any, tmp_path: Path) -> None:
    page = browser_page
    _sign_in(page, AGENT, "not the password")
    assert page.get_by_test_id("login-error").inner_text() == "Wrong name or password."
    _shot(page, tmp_path, "login-error")
    _sign_in(page, OTHER_AGENT)
    page.wait_for_url("**/console/queue")
    assert "ord_other_merchant" in page.content()
    assert "ord_1000" not in page.content()
    page.get_by_test_id("logout").click()
    page.wait_for_url("**/console/login")
    page.goto("/console/queue")
    page.wait_for_url("**/console/login?next=/console/queue")


def test_agent_answers_for_a_charge_that_was_never_answered(
    browser_page: Any, served: tuple[str, str], tmp_path: Path
) -> None:
    import sqlalchemy as sa

    url, database = served
    page = browser_page
    _fail_order(url, "ord_lost_e2e")
    engine = sa.create_engine(database)
    try:
        insert_lost_charge(engine, "m_a", "ord_lost_e2e", datetime.now(UTC) - timedelta(hours=2))
    finally:
        engine.dispose()
    _sign_in(page, AGENT)
    page.wait_for_url("**/console/queue")
    first = page.get_by_test_id("queue-table").locator("tbody tr[data-order]").first
    assert first.get_attribute("data-order") == "ord_lost_e2e"
    assert first.get_by_test_id("charge-unknown").is_visible()
    first.locator("a.order-link").click()
    page.wait_for_url("**/console/orders/ord_lost_e2e")
    card = page.get_by_test_id("unanswered-charge")
    assert "ord_lost_e2e_2" in card.inner_text()
    _shot(page, tmp_path, "charge-unknown")
    page.get_by_test_id("charge-charged").click()  # no reason given: the browser does not send it
    assert page.get_by_test_id("result").count() == 0
    page.get_by_test_id("charge-reason-charged").fill("adyen support, psp ref 8816")
    page.get_by_test_id("charge-charged").click()
    result = page.get_by_test_id("result")
    result.wait_for()
    assert "the connector says charged; the order is SUCCEEDED" in result.inner_text()
    assert page.get_by_test_id("order-state").inner_text() == "Recovered"
    assert page.get_by_test_id("unanswered-charge").count() == 0
    assert "adyen support, psp ref 8816" in page.get_by_test_id("audit").inner_text()
    _shot(page, tmp_path, "charge-answered")


def _open_case(page: Any, served: tuple[str, str], order_id: str, insert: Callable[..., int]) -> None:
    """A failed order ``order_id`` of m_a given a case by hand an hour ago (``insert``, a factory of
    tests/factories.py, writes it into the served database), its page open for m_a's agent."""
    import sqlalchemy as sa

    url, database = served
    _fail_order(url, order_id)
    engine = sa.create_engine(database)
    try:
        insert(engine, "m_a", order_id, datetime.now(UTC) - timedelta(hours=1))
    finally:
        engine.dispose()
    _sign_in(page, AGENT)
    page.wait_for_url("**/console/queue")
    page.goto(f"/console/orders/{order_id}")


def _mark_case_dealt_with(page: Any, folder: Path, card_id: str, note: str) -> str:
    """Click the case card ``card_id``'s "Mark as dealt with" without a note (the browser sends nothing), then with
    ``note``: the card gives way to its dealt-with card (``<card_id>-dealt-with``) naming the agent, the note, as
    the audit does, and the amount, as the open card did (it left it out); both shot. The result shown."""
    card = page.get_by_test_id(card_id)
    card.get_by_test_id("resolve-case").click()
    assert page.get_by_test_id("result").count() == 0
    card.get_by_test_id("case-note").fill(note)
    card.get_by_test_id("resolve-case").click()
    result = page.get_by_test_id("result")
    result.wait_for()
    assert page.get_by_test_id(card_id).count() == 0
    done = page.get_by_test_id(f"{card_id}-dealt-with").inner_text()
    assert "agent asha@m_a marked it as dealt with" in done
    assert note in done
    assert "via adyen, ₹499.00" in done  # the order's amount, as the open card wrote it
    assert note in page.get_by_test_id("audit").inner_text()
    _shot(page, folder, f"{card_id}-dealt-with")
    return str(result.inner_text())


def test_agent_marks_a_possible_double_payment_as_dealt_with(
    browser_page: Any, served: tuple[str, str], tmp_path: Path
) -> None:
    page = browser_page
    _open_case(page, served, "ord_twice_e2e", insert_paid_twice)
    said = page.get_by_test_id("paid-twice").inner_text()
    assert "txn_merchant_own" in said
    assert "via adyen, ₹499.00, paid this order" in said  # as the order's facts panel writes it
    _shot(page, tmp_path, "paid-twice")
    result = _mark_case_dealt_with(page, tmp_path, "paid-twice", "merchant refunded its own payment, ref R-77")
    assert "Marked as dealt with: the possible double payment" in result


def test_agent_marks_a_charge_taken_as_never_charged_whose_switch_went_silent_as_dealt_with(
    browser_page: Any, served: tuple[str, str], tmp_path: Path
) -> None:
    page = browser_page
    _open_case(page, served, "ord_silent_e2e", insert_silent_uncharged)
    card = page.get_by_test_id("silent-not-charged")
    said = card.inner_text()
    assert "The customer may have been charged after all" in said
    assert "Payment ord_silent_e2e_2 via adyen, ₹499.00 (charge action" in said  # as the facts panel writes it
    assert card.get_by_test_id("case-note").get_attribute("placeholder") == "adyen has no payment ord_silent_e2e_2"
    _shot(page, tmp_path, "silent-not-charged")
    result = _mark_case_dealt_with(page, tmp_path, "silent-not-charged", "adyen support: no such payment, ref 4471")
    assert "Marked as dealt with: the charge taken as never charged, its switch silent" in result


def test_agent_marks_a_refund_by_hand_as_dealt_with(browser_page: Any, served: tuple[str, str], tmp_path: Path) -> None:
    page = browser_page
    _open_case(page, served, "ord_refund_e2e", partial(insert_refund_by_hand, why=REFUND_SWITCH_SILENT))
    said = page.get_by_test_id("refund-by-hand").inner_text()
    # The amount as the order's facts panel writes it, and why in words (it said "499.0 INR" and "switch_silent").
    assert "The refund of payment ord_refund_e2e_2 via adyen, ₹499.00 (refund action" in said
    assert "(its switch answered no status check of the charge): winback does not send it" in said
    _shot(page, tmp_path, "refund-by-hand")
    result = _mark_case_dealt_with(page, tmp_path, "refund-by-hand", "refunded by hand on adyen's dashboard")
    assert "Marked as dealt with: the refund by hand" in result


def test_an_action_clicked_after_the_session_ended_comes_back_to_the_order_after_sign_in(
    browser_page: Any, server: str
) -> None:
    # The session ended (idle, or signed out in another tab) while the order page stayed open: the click led to
    # sign-in, and sign-in to the form's address, which showed {"detail":"Method Not Allowed"}.
    page = browser_page
    _open_new_order(page, server, "ord_idle_e2e")
    page.context.clear_cookies()
    page.get_by_test_id("approve").click()
    page.wait_for_url("**/console/login?next=/console/orders/ord_idle_e2e")
    page.get_by_label("Agent name").fill(AGENT)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/console/orders/ord_idle_e2e")
    assert page.get_by_test_id("order-state").inner_text() == "Waiting for agent"
    assert page.get_by_test_id("approve").is_visible()


def test_after_an_action_taken_by_keyboard_the_focus_is_on_its_result(browser_page: Any, server: str) -> None:
    # htmx swaps the whole order body, the pressed button with it: focus fell back to the page, and a keyboard
    # or screen-reader user started again from the top to find out how the action went.
    page = browser_page
    _open_new_order(page, server, "ord_keyboard_e2e")
    page.get_by_label("Reason (optional)").fill("customer asked by phone")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.dataset.testid") == "stop"
    page.keyboard.press("Enter")
    page.get_by_test_id("result").wait_for()
    page.wait_for_function("() => document.activeElement.dataset.testid === 'result'")
    assert "Stop recovering this order: done" in page.get_by_test_id("result").inner_text()


def test_a_click_on_a_page_from_before_the_last_sign_in_says_nothing_was_done_and_the_next_one_works(
    browser_page: Any, server: str
) -> None:
    # An order page stayed open in one tab while the agent signed out and in again in another: its forms carried
    # the old session's CSRF token, the server answered 403, and htmx swapped nothing: "Carry it out" did nothing
    # visible, every time.
    page = browser_page
    _open_new_order(page, server, "ord_stale_tab_e2e")
    other_tab = page.context.new_page()
    other_tab.goto("/console/queue")
    other_tab.get_by_test_id("logout").click()
    other_tab.wait_for_url("**/console/login")
    _sign_in(other_tab, AGENT)
    other_tab.wait_for_url("**/console/queue")
    other_tab.close()

    page.get_by_test_id("approve").click()
    result = page.get_by_test_id("result")
    result.wait_for()
    assert "Nothing was done: this page was loaded before you last signed in" in result.inner_text()
    assert page.get_by_test_id("order-state").inner_text() == "Waiting for agent"
    page.get_by_test_id("approve").click()
    page.wait_for_function(
        "() => document.querySelector('[data-testid=result]').innerText.includes('Carry out the recommendation')"
    )
    assert "done" in page.get_by_test_id("result").inner_text()


def test_an_action_whose_request_fails_says_so_instead_of_doing_nothing_visible(browser_page: Any, server: str) -> None:
    # htmx swaps no error answer: "Carry it out" answered 500 (or not at all: the server restarting) did nothing
    # visible, and the agent clicked again without knowing whether the first click was carried out.
    page = browser_page
    _open_new_order(page, server, "ord_error_e2e")
    error = page.get_by_test_id("request-error")
    assert not error.is_visible()

    page.route("**/actions", lambda route: route.fulfill(status=500, body='{"detail":"internal error"}'))
    page.get_by_test_id("stop").click()
    error.wait_for()
    assert "The server could not do this (HTTP 500" in error.inner_text()
    assert page.evaluate("() => document.activeElement.dataset.testid") == "request-error"

    page.unroute("**/actions")
    page.route("**/actions", lambda route: route.abort())
    page.get_by_test_id("stop").click()
    page.wait_for_function(
        "() => document.querySelector('[data-testid=request-error]').innerText.startsWith('No answer came')"
    )
    page.unroute("**/actions")
    page.get_by_test_id("stop").click()
    page.get_by_test_id("result").wait_for()
    assert not error.is_visible()  # cleared by the next request
    assert page.get_by_test_id("order-state").inner_text() == "Closed unrecovered"


def test_an_action_sent_with_javascript_off_is_carried_out_once_whatever_the_reloads(served: tuple[str, str]) -> None:
    # Without JavaScript the form's POST was answered with the order's page: a reload sent the form again (the
    # link was refused then, the order having moved on, and the refusal audited), and the address shown was the
    # form's. The POST is now answered with a redirect to the order's page, which says once how it went.
    import sqlalchemy as sa

    from service.console.store import audit_log
    from service.executor.store import actions

    url, database = served
    _fail_order(url, "ord_no_js_e2e")
    sync_playwright = _require_browser()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(java_script_enabled=False, base_url=url)
        page = context.new_page()
        page.set_default_timeout(10_000)
        try:
            _sign_in(page, AGENT)
            page.wait_for_url("**/console/queue")
            page.goto("/console/orders/ord_no_js_e2e")
            page.get_by_test_id("link-channel").select_option("email")
            with page.expect_navigation():
                page.get_by_test_id("send-link").click()
            after_post = page.url
            shown = page.get_by_test_id("result").inner_text()
            reloaded = page.reload()
            assert reloaded is not None
            reload_method = reloaded.request.method
            reloaded_results = page.get_by_test_id("result").count()
            page.go_back()  # the order's page as it was before the click: loaded again (no-store), not sent
            assert page.url == f"{url}/console/orders/ord_no_js_e2e"
            audit_rows = page.get_by_test_id("audit").locator("tbody tr").count()
        finally:
            context.close()
            browser.close()
    engine = sa.create_engine(database)
    try:
        with engine.connect() as conn:
            audited = conn.execute(
                sa.select(audit_log.c.action, audit_log.c.result).where(audit_log.c.order_id == "ord_no_js_e2e")
            ).all()
            links = conn.scalar(
                sa.select(sa.func.count())
                .select_from(actions)
                .where(actions.c.order_id == "ord_no_js_e2e", actions.c.kind == "nudge")
            )
    finally:
        engine.dispose()
    assert [tuple(row) for row in audited] == [("send_link", "done")]
    assert links == 1
    assert audit_rows == 1
    assert reload_method == "GET"  # the form is not sent again
    assert after_post.startswith(f"{url}/console/orders/ord_no_js_e2e?flash=result.")  # this POST's own result
    assert shown == "Send a payment link by email now: done; the order is PENDING"
    assert reloaded_results == 0  # shown once


def test_two_tabs_acting_at_once_without_javascript_each_show_their_own_result(served: tuple[str, str]) -> None:
    # Two tabs of one browser acted within moments: the second POST's answer replaced the first's flash cookie
    # before the first tab followed its redirect, so that tab showed nothing (or, on the same order, the other
    # tab's result). Each redirect now names its own POST's result.
    url, _ = served
    for order_id in ("ord_tab_a_e2e", "ord_tab_b_e2e"):
        _fail_order(url, order_id)
    sync_playwright = _require_browser()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(java_script_enabled=False, base_url=url)
        tab_a, tab_b = context.new_page(), context.new_page()
        try:
            for tab in (tab_a, tab_b):
                tab.set_default_timeout(10_000)
            _sign_in(tab_a, AGENT)
            tab_a.wait_for_url("**/console/queue")
            posted = []
            for tab, order_id, action in ((tab_a, "ord_tab_a_e2e", "stop"), (tab_b, "ord_tab_b_e2e", "send_link")):
                tab.goto(f"/console/orders/{order_id}")
                form = tab.locator(f"form:has(input[name=action][value={action}])")
                fields = {
                    name: form.locator(f"input[name={name}]").get_attribute("value")
                    for name in ("csrf_token", "submission", "action", "decision_id")
                }
                # Both POSTs answered before either tab follows its redirect (the browser's cookies, shared).
                answer = context.request.post(
                    f"/console/orders/{order_id}/actions", form=fields | {"channel": "email"}, max_redirects=0
                )
                assert answer.status == 303
                posted.append((tab, answer.headers["location"]))
            shown = []
            for tab, location in reversed(posted):
                tab.goto(location)
                shown.append(tab.get_by_test_id("result").all_inner_texts())  # [] when none is shown
        finally:
            context.close()
            browser.close()
    assert shown == [
        ["Send a payment link by email now: done; the order is PENDING"],
        ["Stop recovering this order: done; the order is FAILED"],
    ]
