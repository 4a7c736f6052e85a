"""The decision request a caller would have sent at a point of the history: one builder for training and evaluation.

Training (`model.training.request_at`, which replays history through the scorer and checks that training and
serving build the same features) and offline evaluation (`model.evaluation.logged_decisions`, whose requests the
evaluated policies decide on) both turn history rows (CONTRACT.md section 3) into a `DecisionRequest` (section 2)
here, so a model is judged on requests built the way it was trained and served.

A missing value (None, NaN, ``pd.NA``, ``NaT``) is read as the field left out of the request's JSON: the API's
default applies (a flag ``false``, ``delivered`` true, ``authentication_type`` ``no_three_ds``, an optional text
null), and a required field that is missing is refused with pydantic's message naming it, never sent as the text
"nan".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from model.requests import DecisionRequest

#: Request fields of the customer and the payment, and the attempts column each is read from.
_CUSTOMER_COLUMNS = {
    "id": "customer_id",
    "phone_present": "phone_present",
    "email_present": "email_present",
    "country": "customer_country",
}
_PAYMENT_COLUMNS = (
    "payment_method", "payment_method_type", "card_network", "issuer", "is_recurring", "authentication_type",
    "is_network_token",
)  # fmt: skip
_FAILURE_COLUMNS = (
    "connector", "error_code", "error_message", "network_decline_code", "merchant_advice_code", "unified_code",
)  # fmt: skip
_FLAGS = frozenset({"phone_present", "email_present", "is_recurring", "is_network_token", "delivered"})
_TIMESTAMPS = frozenset({"created_at", "sent_at", "clicked_at"})
_ATTEMPT_COLUMNS = ("attempt_number", "connector", "strategy", "status", "error_code", "created_at")
_NUDGE_COLUMNS = ("channel", "sent_at", "delivered", "clicked_at")


def is_missing(value: object) -> bool:
    """Whether a history cell holds no value: None, a NaN, ``pd.NA`` or a ``NaT``."""
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, float | np.floating):
        return bool(np.isnan(value))
    return isinstance(value, np.datetime64) and bool(np.isnat(value))


def floor_us(stamp: pd.Timestamp) -> pd.Timestamp:
    """``stamp.floor("us")``: the same timestamp when it has no nanoseconds to drop, without the ~0.3 ms pandas'
    rounding takes even then (every timestamp of every request a history replay builds goes through it)."""
    return stamp if stamp.nanosecond == 0 else stamp.floor("us")


def utc_datetime(value: Any) -> datetime:
    """A history timestamp as an aware UTC datetime, to the microsecond (a naive one is read as UTC)."""
    stamp = floor_us(pd.Timestamp(value))
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.to_pydatetime()


def _json_value(name: str, value: object) -> object:
    """A present cell as the JSON value the API reads for field ``name``."""
    if name in _FLAGS:
        return bool(value)
    if name == "attempt_number":
        return int(value)  # type: ignore[call-overload]
    if name == "amount":
        return float(value)  # type: ignore[arg-type]
    if name in _TIMESTAMPS:
        return utc_datetime(value)
    return str(value)


def _fields(row: Mapping[str, Any], columns: Mapping[str, str] | Sequence[str]) -> dict[str, object]:
    """The request fields of ``row`` that hold a value, each read from its column (``columns`` maps field names to
    columns, or lists names that are both); missing ones are left out."""
    pairs = columns.items() if isinstance(columns, Mapping) else ((name, name) for name in columns)
    return {
        name: _json_value(name, row[column]) for name, column in pairs if column in row and not is_missing(row[column])
    }


def history_request(
    event_time: Any,
    failure: Mapping[str, Any],
    attempts: Sequence[Mapping[str, Any]],
    nudges: Sequence[Mapping[str, Any]],
) -> DecisionRequest:
    """The request a caller would have sent at ``event_time`` about the order of ``failure`` (its last failed
    attempt, an attempts row).

    ``attempts`` and ``nudges`` are the order's rows known then, oldest first: the attempts up to ``failure`` and
    the nudges sent before the decision (never the nudge the decision itself sent). Rows are mappings of the
    history columns (``DataFrame.to_dict("records")``).
    """
    body: dict[str, Any] = {
        "event_time": utc_datetime(event_time),
        **_fields(failure, ("merchant_id", "order_id", "amount", "currency")),
        "customer": _fields(failure, _CUSTOMER_COLUMNS),
        "payment": _fields(failure, _PAYMENT_COLUMNS),
        "failure": _fields(failure, _FAILURE_COLUMNS),
        "history": {
            "attempts": [_fields(row, _ATTEMPT_COLUMNS) for row in attempts],
            "nudges": [_fields(row, _NUDGE_COLUMNS) for row in nudges],
        },
    }
    return DecisionRequest.model_validate(body)
