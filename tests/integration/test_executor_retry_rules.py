"""The silent-retry flow against the hard rules at execution time (defect hunt of the retry executor).

Each test drives the real executor (the state machine, the effects and a worker) on SQLite, with a scripted or
the real rules-only decide(), and checks what reached the connector.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from model.catalog import load_catalog
from model.rules import CARD_REATTEMPTS_FIELD
from service.executor.worker import make_decider
from tests.integration.test_executor import (  # noqa: F401 - make_harness is a fixture
    FakeConnector,
    Harness,
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
    """A card the caller reports at 14 re-attempts (of Visa's 15 in 30 days) may get one more. The rules took the
    larger of the reported figure and the order's own history, and the executor replayed the figure as it was at
    the failure event: its own retries were never added to it, so the plan (three retries within max_retries)
    went out in full: the card's 15th, 16th and 17th re-attempts."""
    retry = {"action": "retry", "strategy": "retry_same", "connector": "stripe", "delay": timedelta(minutes=15)}
    h = make_harness(dict(retry), dict(retry), dict(retry), connector=FakeConnector(results=["failure"] * 3))
    h.executor.payment_failed("m_demo", _visa_event(14))
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
    15 of 15 and plans no further silent retry."""
    decider, stop = make_decider(load_catalog(), None, seed=1)
    try:
        h = make_harness(decider=decider, connector=FakeConnector(results=["failure"] * 5))
        body = _visa_event(14)
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
    assert "visa_reattempts:15/15" in later[0]["rules_applied"]


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
