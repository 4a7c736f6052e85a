"""Pure parts of the agent console: number formatting, queue filter parsing, the performance charts' data."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from model.catalog import load_catalog
from service.console.charts import (
    PerformanceData,
    clicks_by_channel_hour,
    draw_funnel,
    draw_heatmap,
    draw_recovery,
    draw_retryability,
    funnel_by_nudge,
    recovery_by_day,
    retryability_by_class,
)
from service.console.views import QueueFilter, age

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
KOLKATA = ZoneInfo("Asia/Kolkata")


def test_age_reads_like_a_person_would_say_it() -> None:
    assert age(NOW - timedelta(minutes=7), NOW) == "7m"
    assert age(NOW - timedelta(hours=3, minutes=12), NOW) == "3h 12m"
    assert age(NOW - timedelta(days=2, hours=4), NOW) == "2d 4h"


def test_queue_filter_falls_back_to_safe_defaults() -> None:
    chosen = QueueFilter.parse({"state": "AWAITING_AGENT", "sort": "amount", "dir": "asc", "action": "retry"})
    assert (chosen.state, chosen.sort, chosen.descending, chosen.action) == ("AWAITING_AGENT", "amount", False, "retry")
    junk = QueueFilter.parse({"state": "DROP TABLE", "sort": "evil", "action": "nuke"})
    assert (junk.state, junk.sort, junk.descending, junk.action) == ("", "age", True, "")


def _order(order_id: str, state: str, days_ago: float, amount: float = 100.0) -> dict[str, Any]:
    return {
        "order_id": order_id,
        "state": state,
        "amount": amount,
        "currency": "INR",
        "first_failed_at": NOW - timedelta(days=days_ago),
        "closed_at": None,
        "request_json": '{"payment": {"payment_method": "card", "card_network": "visa"}}',
    }


def _attempt(order_id: str, number: int, status: str, strategy: str, **extra: Any) -> dict[str, Any]:
    return {
        "order_id": order_id,
        "attempt_number": number,
        "status": status,
        "strategy": strategy,
        "connector": "stripe",
        "error_code": None if status == "success" else "card_declined",
        "error_message": None,
        "network_decline_code": None if status == "success" else "51",
        "merchant_advice_code": None,
        "unified_code": None,
        "nudge_id": None,
    } | extra


def _nudge(order_id: str, nudge_id: str, hours_ago: float, clicked: bool, channel: str = "whatsapp") -> dict[str, Any]:
    sent = NOW - timedelta(hours=hours_ago)
    return {
        "order_id": order_id,
        "nudge_id": nudge_id,
        "channel": channel,
        "sent_at": sent,
        "status": "accepted",
        "delivered": True,
        "clicked_at": sent + timedelta(minutes=5) if clicked else None,
    }


def sample() -> PerformanceData:
    orders = [
        _order("o1", "SUCCEEDED", 1),  # paid through the link of its 2nd nudge
        _order("o2", "SUCCEEDED", 1, amount=50.0),  # a silent retry won
        _order("o3", "SUCCEEDED", 2),  # paid outside winback
        _order("o4", "FAILED", 2),
        _order("o5", "AWAITING_AGENT", 0.5),
    ]
    attempts = [_attempt(o["order_id"], 1, "failure", "initial") for o in orders] + [
        _attempt("o1", 2, "success", "retarget_link", nudge_id="n1b"),
        _attempt("o2", 2, "success", "cascade"),
    ]
    nudges = [
        _nudge("o1", "n1a", 30, clicked=False),
        _nudge("o1", "n1b", 5, clicked=True),
        _nudge("o4", "n4", 6, False),
    ]
    return PerformanceData(orders, attempts, nudges, {"o1": [True], "o4": [False]}, KOLKATA, NOW - timedelta(days=7), 7)


def test_funnel_counts_links_by_nudge_number_and_the_ones_that_paid() -> None:
    assert funnel_by_nudge(sample()) == [(1, 2, 2, 0, 0), (2, 1, 1, 1, 1)]


def test_a_message_whatsapp_held_back_takes_no_nudge_number_in_the_funnel() -> None:
    """o1's first message was held back by WhatsApp (131049) and did not count; the next one reached the customer,
    who paid through it. Before, the funnel called that one nudge 2 (and o1 had "a second nudge" its merchant set
    at one); now it is nudge 1, with the held-back one sent and not delivered beside it."""
    data = sample()
    held = {"delivered": False, "error": "try_later: 131049 held back"}
    data.nudges[:] = [_nudge("o1", "n1a", 30, clicked=False) | held, _nudge("o1", "n1b", 5, clicked=True)]
    assert funnel_by_nudge(data) == [(1, 2, 1, 1, 1)]


def test_recovery_by_day_counts_closed_orders_and_recovered_gmv() -> None:
    days, rates, gmv, currency = recovery_by_day(sample())
    assert currency == "INR"
    assert sum(gmv) == pytest.approx(250.0)
    known = [rate for rate in rates if rate is not None]
    assert sorted(known) == [0.5, 1.0]  # day -2: one of two recovered; day -1: both
    assert len(days) == 8


def test_retryability_splits_each_error_class_by_how_orders_ended() -> None:
    rows = retryability_by_class(sample(), load_catalog())
    assert len(rows) == 1
    error_class, total, retry, link, elsewhere, failed, still_open, judged = rows[0]
    assert (error_class, total) == ("insufficient_funds", 5)
    assert (retry, link, elsewhere, failed, still_open) == (0.2, 0.2, 0.2, 0.2, 0.2)
    assert judged == 0.5


def test_clicks_by_channel_and_local_hour() -> None:
    channels, sent, clicked = clicks_by_channel_hour(sample())
    assert channels == ["whatsapp"]
    assert sum(sent[0]) == 3
    assert sum(clicked[0]) == 1
    hour = (NOW - timedelta(hours=5)).astimezone(KOLKATA).hour
    assert (sent[0][hour], clicked[0][hour]) == (1, 1)


def test_charts_are_pngs_with_or_without_data() -> None:
    empty = PerformanceData([], [], [], {}, KOLKATA, NOW - timedelta(days=7), 7)
    catalog = load_catalog()
    for data in (sample(), empty):
        for png in (draw_funnel(data), draw_recovery(data), draw_retryability(data, catalog), draw_heatmap(data)):
            assert png.startswith(b"\x89PNG")
