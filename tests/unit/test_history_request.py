"""Training and offline evaluation build the decision request of a history point the same way, and as the API
builds it from the same JSON (`DecisionRequest.model_validate_json`, what `service/api/fastpath.py` calls)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pytest

from model.evaluation import logged_decisions
from model.money import load_economics
from model.requests import DecisionRequest
from model.training import decision_points, request_at
from tests.factories import make_attempt, make_attempts_frame, make_nudge, make_nudges_frame

T0 = "2026-11-01T10:00:00Z"
T1 = "2026-11-01T10:30:00Z"  # the retry fails, and the nudge goes out that instant
DUE = "2026-11-02T10:30:00Z"  # the nudge's follow-up (24 h), answered by a last retry a second later

_ATTEMPTS = (
    make_attempt(order_id="ord_h", txn_id="ord_h_1", created_at=T0),
    make_attempt(order_id="ord_h", txn_id="ord_h_2", attempt_number=2, created_at=T1, strategy="retry_same"),
    make_attempt(
        order_id="ord_h", txn_id="ord_h_3", attempt_number=3, created_at="2026-11-02T10:30:01Z", strategy="cascade"
    ),
)
_NUDGE = make_nudge(order_id="ord_h", nudge_id="ndg_h", sent_at=T1, delivered=True, clicked_at=None)
_PAYMENT_FIELDS = (
    "payment_method", "payment_method_type", "card_network", "issuer", "is_recurring", "authentication_type",
    "is_network_token",
)  # fmt: skip
_FAILURE_FIELDS = (
    "connector", "error_code", "error_message", "network_decline_code", "merchant_advice_code", "unified_code",
)  # fmt: skip
_PAYMENT_FIELDS = (
    "payment_method", "payment_method_type", "card_network", "issuer", "is_recurring", "authentication_type",
    "is_network_token",
)  # fmt: skip
_FAILURE_FIELDS = (
    "connector", "error_code", "error_message", "network_decline_code", "merchant_advice_code", "unified_code",
)  # fmt: skip


def _json_attempt(row: dict[str, Any]) -> dict[str, Any]:
    fields = ("attempt_number", "connector", "strategy", "status", "error_code", "created_at")
    return {name: row[name] for name in fields}


def _api_request(event_time: str, attempts: int, nudges: int, absent: tuple[str, str] | None) -> DecisionRequest:
    """The JSON a caller sends at that point, with the field ``absent`` (section, name) left out, as the API reads
    it."""
    failure = _ATTEMPTS[attempts - 1]
    body: dict[str, Any] = {
        "merchant_id": failure["merchant_id"],
        "order_id": failure["order_id"],
        "event_time": event_time,
        "amount": failure["amount"],
        "currency": failure["currency"],
        "customer": {
            "id": failure["customer_id"],
            "phone_present": failure["phone_present"],
            "email_present": failure["email_present"],
            "country": failure["customer_country"],
        },
        "payment": {name: failure[name] for name in _PAYMENT_FIELDS},
        "failure": {name: failure[name] for name in _FAILURE_FIELDS},
        "history": {
            "attempts": [_json_attempt(row) for row in _ATTEMPTS[:attempts]],
            "nudges": [{name: _NUDGE[name] for name in ("channel", "sent_at", "delivered", "clicked_at")}][:nudges],
        },
    }
    if absent is not None:
        section, name = absent
        places = {
            "attempts": [body["history"]["attempts"]],
            "nudges": [body["history"]["nudges"]],
        }.get(section)
        if places is None:
            body[section].pop(name)
            if section == "failure" and name == "error_code":
                for row in body["history"]["attempts"]:
                    row.pop(name)
        else:
            for row in places[0]:
                row.pop(name)
    return DecisionRequest.model_validate_json(json.dumps(body))


def _requests_both_ways(attempts: pd.DataFrame, nudges: pd.DataFrame) -> dict[tuple[str, str], DecisionRequest]:
    """The request of each decision point of the history, by (path, event time): training's and evaluation's
    (evaluation's stop at the end has no training counterpart: it is not compared)."""
    built: dict[tuple[str, str], DecisionRequest] = {}
    points = decision_points(attempts, nudges)
    for position in range(len(points)):
        point = {str(k): v for k, v in points.iloc[position].items()}
        request, _ = request_at(attempts, nudges, point)
        built["training", request.event_time.isoformat()] = request
    for request in logged_decisions(attempts, nudges, load_economics())["request"]:
        built["evaluation", request.event_time.isoformat()] = request
    return built


def _at(when: str) -> str:
    return pd.Timestamp(when).isoformat()


#: (history table, column, the request's section and field that carries it)
_ABSENT_FIELDS = [
    ("attempts", "card_network", ("payment", "card_network")),
    ("attempts", "issuer", ("payment", "issuer")),
    ("attempts", "error_code", ("failure", "error_code")),
    ("attempts", "error_message", ("failure", "error_message")),
    ("attempts", "network_decline_code", ("failure", "network_decline_code")),
    ("attempts", "merchant_advice_code", ("failure", "merchant_advice_code")),
    ("attempts", "unified_code", ("failure", "unified_code")),
    ("attempts", "customer_country", ("customer", "country")),
    ("attempts", "payment_method_type", ("payment", "payment_method_type")),
    ("attempts", "authentication_type", ("payment", "authentication_type")),
    ("attempts", "phone_present", ("customer", "phone_present")),
    ("attempts", "email_present", ("customer", "email_present")),
    ("attempts", "is_recurring", ("payment", "is_recurring")),
    ("attempts", "is_network_token", ("payment", "is_network_token")),
    ("nudges", "clicked_at", ("nudges", "clicked_at")),
    ("nudges", "delivered", ("nudges", "delivered")),
]
_MISSING = {"None": None, "NaN": np.nan, "pd.NA": pd.NA}


@pytest.mark.parametrize("missing", list(_MISSING), ids=list(_MISSING))
@pytest.mark.parametrize(("table", "column", "field"), _ABSENT_FIELDS, ids=[c for _, c, _ in _ABSENT_FIELDS])
def test_a_missing_history_value_builds_the_request_the_api_builds_without_the_field(
    table: str, column: str, field: tuple[str, str], missing: str
) -> None:
    attempts = make_attempts_frame(*_ATTEMPTS)
    nudges = make_nudges_frame(_NUDGE)
    frame = attempts if table == "attempts" else nudges
    frame[column] = pd.Series([_MISSING[missing]] * len(frame), dtype=object)
    if column == "error_code":  # the failures still say why, by their message
        assert attempts["error_message"].notna().all()

    built = _requests_both_ways(attempts, nudges)

    # The first failure (answered by the retry) and the follow-up (answered by the last retry): both paths, and
    # the API given the same facts without the field, build one request.
    for when, known_attempts, known_nudges in ((T0, 1, 0), (DUE, 2, 1)):
        expected = _api_request(when, known_attempts, known_nudges, field)
        assert built["training", _at(when)] == expected, f"training at {when}"
        assert built["evaluation", _at(when)] == expected, f"evaluation at {when}"


def test_the_request_of_a_point_leaves_out_the_nudge_its_own_decision_sent() -> None:
    """The nudge sent the instant the retry failed answers that failure: at that decision it has not been sent,
    so neither path (nor a caller) lists it in the request's history."""
    attempts = make_attempts_frame(*_ATTEMPTS)
    nudges = make_nudges_frame(_NUDGE)

    built = _requests_both_ways(attempts, nudges)

    expected = _api_request(T1, 2, 0, None)
    assert built["training", _at(T1)] == expected
    assert built["evaluation", _at(T1)] == expected
    assert built["evaluation", _at(T1)].history.nudges == []


def test_evaluation_credits_the_retry_to_the_failure_before_it_and_the_nudge_sent_with_its_failure_to_it() -> None:
    """The retry fails at T1 and a nudge goes out at T1: the retry answered the first failure (as in training's
    decision points), the nudge the retry's failure; neither is credited twice."""
    attempts = make_attempts_frame(*_ATTEMPTS)
    nudges = make_nudges_frame(_NUDGE)

    logged = logged_decisions(attempts, nudges, load_economics())
    trained = decision_points(attempts, nudges)

    first, second = (logged[logged["event_time"] == pd.Timestamp(when)].iloc[0] for when in (T0, T1))
    assert (first["action"], first["strategy"], first["execute_at"]) == ("retry", "retry_same", pd.Timestamp(T1))
    assert (second["action"], second["channel"], second["execute_at"]) == ("retarget", "whatsapp", pd.Timestamp(T1))
    by_decision = {
        (str(row["kind"]), pd.Timestamp(row["decision_time"])) for _, row in trained.iterrows()
    }  # training's view of the same two actions
    assert {("retry", pd.Timestamp(T0)), ("retarget", pd.Timestamp(T1))} <= by_decision


def _request_read_per_order(attempts: pd.DataFrame, nudges: pd.DataFrame, point: dict[str, Any]) -> DecisionRequest:
    """The request of ``point`` from its order's rows alone, sorted here: its attempts by number, its nudges by time
    then nudge id (as training's decision points count them)."""
    from model.history_request import history_request

    order = point["order_id"]
    known = attempts[attempts["order_id"] == order].sort_values("attempt_number", kind="mergesort")
    known = known.iloc[: int(point["attempt_prefix"])]
    sent = nudges[nudges["order_id"] == order].assign(_ts=lambda n: pd.to_datetime(n["sent_at"], utc=True))
    sent = sent.sort_values(["_ts", "nudge_id"], kind="mergesort").iloc[: int(point["nudge_prefix"])]
    rows = known.to_dict("records")
    return history_request(point["decision_time"], rows[-1], rows, sent.to_dict("records"))


def test_order_rows_build_each_point_s_request_from_its_order_s_rows_in_order() -> None:
    """`OrderRows` reads a history's frames once for many points (request_at, the retryable threshold's replay):
    each point's request holds its order's attempts by number and nudges by time, then nudge id, however the
    frames are ordered; here shuffled, with two nudges of one order sent at the same instant by two channels."""
    from model.simulation.generate import generate_history
    from model.training import OrderRows

    history = generate_history(60, 6)
    attempts, nudges = history.attempts.copy(), history.nudges.copy()
    tied = nudges.index[nudges["order_id"] == nudges.loc[nudges["order_id"].duplicated(), "order_id"].iloc[0]][:2]
    nudges.loc[tied, "sent_at"] = nudges.loc[tied, "sent_at"].min()
    nudges.loc[tied, "channel"] = ["sms", "email"]
    nudges.loc[tied, "nudge_id"] = ["n_tied_b", "n_tied_a"]
    attempts = attempts.sample(frac=1.0, random_state=1).reset_index(drop=True)
    nudges = nudges.sample(frac=1.0, random_state=2)
    nudges = pd.concat([nudges[nudges["nudge_id"] == "n_tied_b"], nudges[nudges["nudge_id"] != "n_tied_b"]])
    nudges = nudges.reset_index(drop=True)  # the tied nudge with the later id first
    frame = decision_points(attempts, nudges)
    # The tied nudges' order and a few others: each point's request is built twice here, at ~10 ms apiece.
    checked = {*frame["order_id"].drop_duplicates().head(8), nudges.loc[0, "order_id"]}
    frame = frame[frame["order_id"].isin(checked)]
    points = [{str(k): v for k, v in row.items()} for row in frame.to_dict("records")]
    assert any(point["nudge_prefix"] > 1 and point["order_id"] == nudges.loc[0, "order_id"] for point in points)
    rows = OrderRows(attempts, nudges)
    for point in points:
        expected = _request_read_per_order(attempts, nudges, point)
        assert rows.request_at(point)[0] == expected, point
        assert request_at(attempts, nudges, point)[0] == expected, point


def test_floor_us_drops_nanoseconds_only() -> None:
    from model.history_request import floor_us, utc_datetime

    stamp = pd.Timestamp("2026-03-01 10:00:00.123456789", tz="Europe/Paris")
    assert floor_us(stamp) == pd.Timestamp("2026-03-01 10:00:00.123456", tz="Europe/Paris")
    assert floor_us(stamp).tzinfo == stamp.tzinfo
    whole = pd.Timestamp("2026-03-01 10:00:00.123456", tz="UTC")
    assert floor_us(whole) is whole
    assert floor_us(pd.NaT) is pd.NaT
    assert utc_datetime(stamp).isoformat() == "2026-03-01T09:00:00.123456+00:00"
