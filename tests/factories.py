"""Shared test factories: plain functions returning valid objects; pass overrides to make them invalid."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from model.gsm import OverlayEntry
from model.merchant_config import MerchantConfig
from model.requests import DecisionRequest
from model.vocab import ErrorClass

# --- history tables (CONTRACT.md section 3) -----------------------------------------------------------------

_ATTEMPT_DEFAULTS: dict[str, Any] = {
    "merchant_id": "m_demo",
    "order_id": "ord_1",
    "txn_id": "ord_1_1",
    "attempt_number": 1,
    "created_at": "2026-11-01T10:00:00Z",
    "amount": 499.0,
    "currency": "INR",
    "customer_id": "cus_1",
    "phone_present": True,
    "email_present": True,
    "customer_country": "IN",
    "payment_method": "card",
    "payment_method_type": "credit",
    "card_network": "visa",
    "issuer": "HDFC",
    "is_recurring": False,
    "is_network_token": False,
    "authentication_type": "no_three_ds",
    "connector": "stripe",
    "strategy": "initial",
    "nudge_id": None,
    "status": "failure",
    "error_code": "card_declined",
    "error_message": "Your card was declined.",
    "network_decline_code": "05",
    "merchant_advice_code": None,
    "unified_code": None,
    "decision_id": None,
    "propensity": None,
}

_NUDGE_DEFAULTS: dict[str, Any] = {
    "merchant_id": "m_demo",
    "order_id": "ord_1",
    "nudge_id": "ndg_1",
    "sent_at": "2026-11-02T04:30:00Z",
    "channel": "whatsapp",
    "template_id": "tpl_pay_link",
    "delivered": True,
    "clicked_at": None,
    "decision_id": None,
    "propensity": None,
}

_SUCCESS = {"status": "success", "error_code": None, "error_message": None, "network_decline_code": None}


def _typed(rows: list[dict[str, Any]], defaults: dict[str, Any], timestamps: tuple[str, ...]) -> pd.DataFrame:
    frame = pd.DataFrame([{**defaults, **row} for row in rows], columns=list(defaults))
    for name, value in defaults.items():
        if name in timestamps:
            frame[name] = pd.to_datetime(frame[name], utc=True, format="ISO8601").astype("datetime64[ns, UTC]")
        elif isinstance(value, bool):
            frame[name] = frame[name].astype("bool")
        elif isinstance(value, int):
            frame[name] = frame[name].astype("int64")
        elif isinstance(value, float) or name == "propensity":
            frame[name] = frame[name].astype("float64")
        else:
            frame[name] = frame[name].astype("string")
    return frame


def make_attempt(**overrides: Any) -> dict[str, Any]:
    """One valid attempts row as a dict: attempt 1 of ``ord_1``, a failed card payment on stripe."""
    return {**_ATTEMPT_DEFAULTS, **overrides}


def make_attempts_frame(*rows: dict[str, Any]) -> pd.DataFrame:
    """A valid attempts table with the contract's dtypes; each row dict overrides ``make_attempt()``.

    Without rows: four orders (rows 1-8 in this order):
    ``ord_cascade`` fails on stripe and is recovered by a cascade to adyen 2 s later (rows 1-2);
    ``ord_link`` fails, fails a retry_same, and is recovered by retarget_link after nudge ``ndg_1`` (rows 3-5);
    ``ord_lost`` fails and fails a step_up, never recovered (rows 6-7);
    ``ord_ok`` succeeds on attempt 1 (row 8).
    """
    if not rows:
        rows = (
            {
                "order_id": "ord_cascade",
                "txn_id": "t_c1",
                "customer_id": "cus_c",
                "error_code": "processing_error",
                "network_decline_code": "91",
            },
            {
                "order_id": "ord_cascade",
                "txn_id": "t_c2",
                "customer_id": "cus_c",
                "attempt_number": 2,
                "created_at": "2026-11-01T10:00:02Z",
                "connector": "adyen",
                "strategy": "cascade",
                "decision_id": "dec_c2",
                "propensity": 0.9,
                **_SUCCESS,
            },
            {
                "order_id": "ord_link",
                "txn_id": "t_l1",
                "customer_id": "cus_l",
                "amount": 1250.5,
                "created_at": "2026-11-01T11:00:00Z",
                "error_code": "insufficient_funds",
                "network_decline_code": "51",
            },
            {
                "order_id": "ord_link",
                "txn_id": "t_l2",
                "customer_id": "cus_l",
                "amount": 1250.5,
                "attempt_number": 2,
                "created_at": "2026-11-01T11:05:00.250Z",
                "strategy": "retry_same",
                "error_code": "insufficient_funds",
                "network_decline_code": "51",
                "decision_id": "dec_l2",
                "propensity": 0.25,
            },
            {
                "order_id": "ord_link",
                "txn_id": "t_l3",
                "customer_id": "cus_l",
                "amount": 1250.5,
                "attempt_number": 3,
                "created_at": "2026-11-02T04:41:00Z",
                "payment_method": "upi",
                "payment_method_type": "collect",
                "card_network": None,
                "issuer": None,
                "strategy": "retarget_link",
                "nudge_id": "ndg_1",
                **_SUCCESS,
            },
            {
                "order_id": "ord_lost",
                "txn_id": "t_x1",
                "customer_id": "cus_x",
                "currency": "USD",
                "customer_country": "US",
                "created_at": "2026-11-01T12:00:00+05:30",
                "card_network": "mastercard",
                "issuer": None,
                "merchant_advice_code": "01",
                "error_code": "do_not_honor",
            },
            {
                "order_id": "ord_lost",
                "txn_id": "t_x2",
                "customer_id": "cus_x",
                "currency": "USD",
                "customer_country": "US",
                "attempt_number": 2,
                "created_at": "2026-11-01T07:00:00Z",
                "card_network": "mastercard",
                "issuer": None,
                "strategy": "step_up",
                "authentication_type": "three_ds",
                "error_code": "authentication_failed",
                "error_message": None,
                "network_decline_code": None,
                "unified_code": "UE_9000",
            },
            {
                "order_id": "ord_ok",
                "txn_id": "t_o1",
                "customer_id": "cus_o",
                "phone_present": False,
                "created_at": "2026-11-01T13:00:00Z",
                "is_recurring": True,
                "is_network_token": True,
                "error_code": "stale_code_kept_on_success",
                "error_message": None,
                "network_decline_code": None,
                "status": "success",
            },
        )
    return _typed(list(rows), _ATTEMPT_DEFAULTS, ("created_at",))


def _attempts_with_ord_lost_cascading(created_at: str, decision_id: str) -> pd.DataFrame:
    """``make_attempts_frame()`` with ord_lost's step_up (row 7) carrying decision ``dec_x2`` (propensity 0.4), and a
    third attempt of ord_lost (row 9), a cascade at ``created_at`` carrying ``decision_id``."""
    attempts = make_attempts_frame()
    attempts.loc[6, ["decision_id", "propensity"]] = ["dec_x2", 0.4]
    third = make_attempts_frame(
        make_attempt(order_id="ord_lost", txn_id="t_x3", customer_id="cus_x", currency="USD", customer_country="US",
                     attempt_number=3, created_at=created_at, strategy="cascade", connector="adyen",
                     decision_id=decision_id, propensity=0.4)
    )  # fmt: skip
    return pd.concat([attempts, third], ignore_index=True)


def attempts_with_a_cascade_decided_once() -> pd.DataFrame:
    """``make_attempts_frame()`` with ord_lost's step_up (row 7) and a third attempt (row 9), a cascade, both
    carrying decision ``dec_x2`` (propensity 0.4): a producer logging a cascade decided once as two attempts."""
    return _attempts_with_ord_lost_cascading("2026-11-01T07:00:03Z", "dec_x2")


def history_with_retries_and_nudges_sharing_decisions() -> tuple[pd.DataFrame, pd.DataFrame]:
    """``make_attempts_frame()`` and ``make_nudges_frame()`` with two decisions of ord_lost each carried by a retry and
    a nudge: ``dec_x2`` by its step_up (attempts row 7) and, later, ndg_2 (nudges row 2); ``dec_x3`` by ndg_3 (nudges
    row 3) and, later, a third attempt (attempts row 9, a cascade). A producer logging one decision as two actions."""
    nudges = make_nudges_frame()
    nudges.loc[[1, 2], "decision_id"] = ["dec_x2", "dec_x3"]
    return _attempts_with_ord_lost_cascading("2026-11-04T05:00:00Z", "dec_x3"), nudges


_STOP_DEFAULTS: dict[str, Any] = {
    "merchant_id": "m_demo",
    "order_id": "ord_1",
    "decision_id": "dec_stop_1",
    "decided_at": "2026-11-01T10:00:00Z",
    "attempt_number": 1,
    "propensity": 0.8,
}


def make_stops_frame(*rows: dict[str, Any]) -> pd.DataFrame:
    """A stops table (``model.history.STOP_COLUMNS``) with its dtypes; each row dict overrides the defaults: the stop
    decided at the failure of attempt 1 of ``ord_1`` with propensity 0.8."""
    return _typed(list(rows), _STOP_DEFAULTS, ("decided_at",))


def make_nudge(**overrides: Any) -> dict[str, Any]:
    """One valid nudges row as a dict: a delivered, unclicked whatsapp link for ``ord_1``."""
    return {**_NUDGE_DEFAULTS, **overrides}


def make_nudges_frame(*rows: dict[str, Any]) -> pd.DataFrame:
    """A valid nudges table with the contract's dtypes; each row dict overrides ``make_nudge()``.

    Without rows: the nudges of ``make_attempts_frame()``'s default history: ``ndg_1`` for ``ord_link``
    (clicked, then paid), and ``ndg_2`` (whatsapp, unclicked) and ``ndg_3`` (sms, undelivered) for ``ord_lost``.
    """
    if not rows:
        rows = (
            {
                "order_id": "ord_link",
                "nudge_id": "ndg_1",
                "clicked_at": "2026-11-02T04:40:00Z",
                "decision_id": "dec_l3",
                "propensity": 0.5,
            },
            {"order_id": "ord_lost", "nudge_id": "ndg_2", "sent_at": "2026-11-02T04:30:00Z"},
            {
                "order_id": "ord_lost",
                "nudge_id": "ndg_3",
                "sent_at": "2026-11-04T04:30:00Z",
                "channel": "sms",
                "template_id": "tpl_sms",
                "delivered": False,
                "propensity": 1.0,
            },
        )
    return _typed(list(rows), _NUDGE_DEFAULTS, ("sent_at", "clicked_at"))


# --- decision requests and merchant configs (CONTRACT.md sections 2 and 4) -----------------------------------

_NESTED_REQUEST_FIELDS = ("customer", "payment", "failure", "history")
_NESTED_MERCHANT_FIELDS = ("retry", "retarget")


def _merged(defaults: dict[str, Any], overrides: dict[str, Any], nested: tuple[str, ...]) -> dict[str, Any]:
    data = dict(defaults)
    for key, value in overrides.items():
        if key in nested and isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def make_request(**overrides: Any) -> DecisionRequest:
    """The CONTRACT.md section 2 example request (a Visa credit card declined on stripe, code 51).

    Overrides replace top-level fields; a dict for ``customer``, ``payment``, ``failure`` or ``history`` is merged
    into the default one, e.g. ``make_request(payment={"card_network": "mastercard"})``. Extra fields (such as
    ``card_reattempts_30d``) are passed through.
    """
    defaults: dict[str, Any] = {
        "merchant_id": "m_demo",
        "order_id": "ord_8KQ2",
        "event_time": "2026-11-01T10:15:00Z",
        "amount": 499.0,
        "currency": "INR",
        "customer": {
            "id": "cus_71",
            "phone_present": True,
            "email_present": True,
            "app_present": False,
            "country": "IN",
            "opted_out_channels": [],
        },
        "payment": {
            "payment_method": "card",
            "payment_method_type": "credit",
            "card_network": "visa",
            "issuer": "HDFC",
            "is_recurring": True,
            "authentication_type": "no_three_ds",
            "is_network_token": False,
        },
        "failure": {
            "connector": "stripe",
            "error_code": "card_declined",
            "error_message": "Your card has insufficient funds.",
            "network_decline_code": "51",
            "merchant_advice_code": None,
            "unified_code": None,
        },
        "history": {
            "attempts": [
                {
                    "attempt_number": 1,
                    "connector": "stripe",
                    "strategy": "initial",
                    "status": "failure",
                    "error_code": "card_declined",
                    "created_at": "2026-11-01T10:15:00Z",
                }
            ],
            "nudges": [],
        },
        "available_connectors": ["stripe", "adyen", "cybersource"],
    }
    return DecisionRequest.model_validate(_merged(defaults, overrides, _NESTED_REQUEST_FIELDS))


def make_merchant(**overrides: Any) -> MerchantConfig:
    """The CONTRACT.md section 4 demo merchant (without providers, webhook and connector endpoints).

    Overrides replace top-level fields; a dict for ``retry`` or ``retarget`` is merged into the default one,
    e.g. ``make_merchant(retarget={"skip_days": 0})``.
    """
    defaults: dict[str, Any] = {
        "api_key_sha256": "0" * 64,
        "mode": "autonomous",
        "connectors": ["stripe", "adyen", "cybersource"],
        "retry": {
            "flows": ["retry_same", "cascade", "step_up", "clear_pan", "alternate_network"],
            "max_retries": 3,
        },
        "retarget": {
            "enabled": True,
            "channels": ["whatsapp", "sms", "email"],
            "skip_days": 1,
            "retry_window_days": 7,
            "max_nudges": 4,
            "quiet_hours": {"start": "21:00", "end": "09:00", "timezone": "Asia/Kolkata"},
            "link_ttl_hours": 48,
        },
    }
    return MerchantConfig.model_validate(_merged(defaults, overrides, _NESTED_MERCHANT_FIELDS))


# --- synthetic histories for the learning core (model/training.py) -------------------------------------------

#: Errors of the synthetic world: (connector, code, message, network code, P(retry now), P(retry after payday),
#: P(cascade)). Several codes per kind and connector, so a split grouped by code still has every kind on both sides.
_SYNTH_ERRORS: tuple[tuple[str, str, str, str, float, float, float], ...] = (
    ("stripe", "insufficient_funds", "Your card has insufficient funds.", "51", 0.04, 0.55, 0.04),
    ("adyen", "Not enough balance", "Not enough balance", "51", 0.04, 0.55, 0.04),
    ("cybersource", "INSUFFICIENT_FUND", "Insufficient funds in the account.", "51", 0.04, 0.55, 0.04),
    ("stripe", "stolen_card", "The card was reported stolen.", "43", 0.01, 0.01, 0.01),
    ("adyen", "Stolen Card", "Stolen Card", "43", 0.01, 0.01, 0.01),
    ("cybersource", "STOLEN_LOST_CARD", "Lost or stolen card.", "41", 0.01, 0.01, 0.01),
    ("stripe", "processing_error", "An error occurred while processing your card.", "96", 0.35, 0.35, 0.75),
    ("adyen", "Acquirer Error", "Acquirer Error", "91", 0.35, 0.35, 0.75),
    ("cybersource", "PROCESSOR_UNAVAILABLE", "The processor is temporarily unavailable.", "91", 0.35, 0.35, 0.75),
    ("stripe", "do_not_honor", "The card was declined.", "05", 0.12, 0.2, 0.15),
    ("adyen", "Refused", "Refused", "05", 0.12, 0.2, 0.15),
)
_SYNTH_CONNECTORS = ("stripe", "adyen", "cybersource")
_SYNTH_DELAYS_H = (0.0, 2.0, 24.0, 72.0, 168.0, 336.0)


def make_history_frames(
    n_orders: int = 1500, seed: int = 0, *, start: str = "2026-01-01", days: int = 150, propensity: bool = True
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A small synthetic (attempts, nudges) history in the contract's schema, with learnable structure.

    Every order fails its first attempt with one of ``_SYNTH_ERRORS``; up to two silent retries follow (retry_same
    or cascade, delays from ``_SYNTH_DELAYS_H``, logged propensity 1/12 when ``propensity``); an insufficient-funds
    retry succeeds far more often once a 1st of the month has passed, a stolen card almost never. Unrecovered orders
    may get a nudge 20 h after the last failure, whose link is sometimes used and paid; an unanswered nudge is
    sometimes followed by one more silent retry.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    t0 = pd.Timestamp(start, tz="UTC")
    attempts: list[dict[str, Any]] = []
    nudges: list[dict[str, Any]] = []
    for i in range(n_orders):
        order = f"ord_{seed}_{i}"
        connector, code, message, network, p_now, p_payday, p_cascade = _SYNTH_ERRORS[
            int(rng.integers(len(_SYNTH_ERRORS)))
        ]
        india = bool(rng.random() < 0.7)
        base = {
            "merchant_id": "m_demo",
            "order_id": order,
            "customer_id": f"cus_{seed}_{i}",
            "amount": float(round(rng.lognormal(6.0 if india else 3.5, 0.8), 2)),
            "currency": "INR" if india else "USD",
            "customer_country": "IN" if india else "US",
            "card_network": "visa" if rng.random() < 0.6 else "mastercard",
            "issuer": ("HDFC", "ICICI", "SBI", "CHASE")[int(rng.integers(4))],
            "is_recurring": bool(rng.random() < 0.3),
        }
        when = t0 + pd.Timedelta(minutes=float(rng.uniform(0, days * 24 * 60)))
        failure = {"error_code": code, "error_message": message, "network_decline_code": network}
        number = 1
        attempts.append(
            {**base, **failure, "txn_id": f"{order}_1", "attempt_number": 1, "created_at": when,
             "connector": connector, "strategy": "initial"}
        )  # fmt: skip
        last_failure, recovered = when, False
        for _ in range(int(rng.integers(0, 3))):
            strategy = "cascade" if rng.random() < 0.5 else "retry_same"
            target = connector
            if strategy == "cascade":
                target = str(rng.choice([c for c in _SYNTH_CONNECTORS if c != connector]))
            delay = _SYNTH_DELAYS_H[int(rng.integers(len(_SYNTH_DELAYS_H)))]
            at = last_failure + pd.Timedelta(hours=delay, seconds=2)
            paid_day = at.month != last_failure.month or at.year != last_failure.year
            p = p_cascade if strategy == "cascade" else (p_payday if paid_day else p_now)
            success = bool(rng.random() < p)
            number += 1
            attempts.append(
                {**base, **({"error_code": None, "error_message": None, "network_decline_code": None} if success
                            else failure),
                 "txn_id": f"{order}_{number}", "attempt_number": number, "created_at": at, "connector": target,
                 "strategy": strategy, "status": "success" if success else "failure",
                 "decision_id": f"dec_{order}_{number}", "propensity": 1 / 12 if propensity else None}
            )  # fmt: skip
            last_failure = at
            if success:
                recovered = True
                break
        if recovered or rng.random() < 0.4:
            continue
        nudge_id = f"ndg_{order}"
        sent = last_failure + pd.Timedelta(hours=20)
        clicked = bool(rng.random() < 0.35)
        click_at = sent + pd.Timedelta(minutes=30) if clicked else None
        nudges.append(
            {"merchant_id": "m_demo", "order_id": order, "nudge_id": nudge_id, "sent_at": sent,
             "channel": ("whatsapp", "sms", "email")[int(rng.integers(3))], "clicked_at": click_at,
             "decision_id": f"dec_{nudge_id}", "propensity": 0.5 if propensity else None}
        )  # fmt: skip
        if not clicked and rng.random() < 0.5:
            # The follow-up decision after an unanswered nudge: one more silent retry.
            at = sent + pd.Timedelta(hours=24 + _SYNTH_DELAYS_H[int(rng.integers(len(_SYNTH_DELAYS_H)))])
            paid_day = at.month != last_failure.month or at.year != last_failure.year
            success = bool(rng.random() < (p_payday if paid_day else p_now))
            number += 1
            attempts.append(
                {**base, **({"error_code": None, "error_message": None, "network_decline_code": None} if success
                            else failure),
                 "txn_id": f"{order}_{number}", "attempt_number": number, "created_at": at, "connector": connector,
                 "strategy": "retry_same", "status": "success" if success else "failure",
                 "decision_id": f"dec_{order}_{number}", "propensity": 1 / 12 if propensity else None}
            )  # fmt: skip
        if clicked:
            number += 1
            paid = bool(rng.random() < 0.6)
            attempts.append(
                {**base, **({"error_code": None, "error_message": None, "network_decline_code": None} if paid
                            else failure),
                 "txn_id": f"{order}_{number}", "attempt_number": number,
                 "created_at": click_at + pd.Timedelta(minutes=1), "connector": connector,
                 "strategy": "retarget_link", "nudge_id": nudge_id, "status": "success" if paid else "failure"}
            )  # fmt: skip
    for row in attempts:
        row["created_at"] = row["created_at"].isoformat()
    for row in nudges:
        row["sent_at"] = row["sent_at"].isoformat()
        row["clicked_at"] = None if row["clicked_at"] is None else row["clicked_at"].isoformat()
    return (
        _typed(attempts, _ATTEMPT_DEFAULTS, ("created_at",)),
        _typed(nudges, _NUDGE_DEFAULTS, ("sent_at", "clicked_at")),
    )


def write_history_frames(folder: Path, n_orders: int, seed: int) -> Path:
    """``folder`` holding ``attempts.parquet`` and ``nudges.parquet`` of `make_history_frames` (n_orders, seed)."""
    from model.history import write_attempts, write_nudges

    attempts, nudges = make_history_frames(n_orders, seed=seed)
    write_attempts(attempts, folder / "attempts.parquet")
    write_nudges(nudges, folder / "nudges.parquet")
    return folder


def write_merchant_config(path: Path, merchant_ids: list[str]) -> Path:
    """Write a merchant config YAML with the demo merchant's settings for each id; the API key of merchant
    ``m`` is ``"wb_demo_<m>"`` (the demo config's convention). Returns ``path``."""
    import hashlib

    import yaml

    base = make_merchant().model_dump(mode="json", exclude_defaults=False, exclude={"providers", "connector_endpoints"})
    base.pop("webhook", None)
    merchants = {
        merchant_id: base | {"api_key_sha256": hashlib.sha256(f"wb_demo_{merchant_id}".encode()).hexdigest()}
        for merchant_id in merchant_ids
    }
    path.write_text(yaml.safe_dump({"merchants": merchants}, sort_keys=False), encoding="utf-8")
    return path


def write_console_config(path: Path) -> Path:
    """A merchant config for the agent console's tests: assisted merchants ``m_a`` (links by WhatsApp and email
    only) and ``m_b``, and autonomous ``m_auto``; no quiet hours and links from Day 0, so what an agent may do
    does not depend on the hour the tests run. API key of merchant ``m``: ``"wb_demo_<m>"``. Returns ``path``."""
    import hashlib

    import yaml

    base = make_merchant(
        mode="assisted",
        retarget={"skip_days": 0, "quiet_hours": {"start": "00:00", "end": "00:00", "timezone": "Asia/Kolkata"}},
    ).model_dump(mode="json", exclude={"providers", "connector_endpoints", "webhook"})
    merchants = {
        merchant_id: base
        | {"mode": mode, "api_key_sha256": hashlib.sha256(f"wb_demo_{merchant_id}".encode()).hexdigest()}
        for merchant_id, mode in (("m_a", "assisted"), ("m_b", "assisted"), ("m_auto", "autonomous"))
    }
    merchants["m_a"]["retarget"] = merchants["m_a"]["retarget"] | {"channels": ["whatsapp", "email"]}
    path.write_text(yaml.safe_dump({"merchants": merchants}, sort_keys=False), encoding="utf-8")
    return path


#: New error codes of ``make_new_code_history``: (connector, old code) -> (new code, "retryable" or "final").
NEW_CODES: dict[tuple[str, str], tuple[str, str]] = {
    ("adyen", "Acquirer Error"): ("ADY_NEW_T1", "retryable"),
    ("cybersource", "PROCESSOR_UNAVAILABLE"): ("CYB_NEW_T2", "retryable"),
    ("adyen", "Stolen Card"): ("ADY_NEW_H1", "final"),
    ("cybersource", "STOLEN_LOST_CARD"): ("CYB_NEW_H2", "final"),
}
NEW_CODE_MESSAGE = "Transaction declined"


def make_new_code_history(n_orders: int = 1500, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``make_history_frames`` where two connectors changed vocabulary: the codes of ``NEW_CODES`` are renamed to
    codes no catalog knows, all with the same bland message and no network code, so only their outcomes tell a
    retryable new code (a technical error underneath) from a final one (a stolen card underneath)."""
    attempts, nudges = make_history_frames(n_orders, seed=seed)
    for (_connector, old), (new, _kind) in NEW_CODES.items():
        # Cascades keep the failing attempt's code in the factory, so rename by code, whatever the connector.
        mask = attempts["error_code"] == old
        attempts.loc[mask, "error_code"] = new
        attempts.loc[mask, "error_message"] = NEW_CODE_MESSAGE
        attempts.loc[mask, "network_decline_code"] = None
    attempts["created_at"] = attempts["created_at"].dt.floor("us")
    for column in ("sent_at", "clicked_at"):
        nudges[column] = nudges[column].dt.floor("us")
    return attempts, nudges


def _insert_action(
    conn: Any,
    merchant_id: str,
    order_id: str,
    kind: str,
    state: str,
    at: datetime,
    key: str,
    payload: dict[str, Any],
    *,
    attempts: int = 1,
    last_error: str | None = None,
    unanswered_since: datetime | None = None,
) -> int:
    """An executor action of ``merchant_id``'s order, planned, due, made and last changed ``at``: its id."""
    import json

    from service.executor.store import actions

    inserted = conn.execute(
        actions.insert().values(
            merchant_id=merchant_id,
            order_id=order_id,
            kind=kind,
            state=state,
            due_at=at,
            planned_at=at,
            attempts=attempts,
            idempotency_key=key,
            payload_json=json.dumps(payload),
            last_error=last_error,
            created_at=at,
            updated_at=at,
            unanswered_since=unanswered_since,
        )
    )
    action_key = inserted.inserted_primary_key
    assert action_key is not None
    return int(action_key[0])


#: The retry the executor's cases below charged: payment ``<order_id>_2`` via adyen.
_RETRY_PAYLOAD = {"strategy": "retry_same", "connector": "adyen", "attempt_number": 2}


def insert_lost_charge(engine: Any, merchant_id: str, order_id: str, sent_at: datetime) -> int:
    """What the executor leaves when a retry (payment ``<order_id>_2`` via adyen) was sent to its connector and no
    answer ever came back: a dead-lettered charge still marked sent (``actions.unanswered_since``). Its action id."""
    with engine.begin() as conn:
        return _insert_action(
            conn,
            merchant_id,
            order_id,
            "retry",
            "dead",
            sent_at,
            f"{merchant_id}:{order_id}:retry:lost",
            _RETRY_PAYLOAD,
            attempts=8,
            last_error="timeout calling connector 'adyen': ReadTimeout (the payment may have been charged)",
            unanswered_since=sent_at,
        )


def _case_id(conn: Any) -> int:
    """The id of the case just kept in ``cases_by_hand``."""
    import sqlalchemy as sa

    return int(conn.scalar(sa.text("SELECT max(case_id) FROM cases_by_hand")))


def insert_paid_twice(engine: Any, merchant_id: str, order_id: str, reported_at: datetime) -> int:
    """What the executor leaves when winback's retry (payment ``<order_id>_2`` via adyen) paid the order and its
    merchant then reported it paid by a payment of its own (txn_id ``txn_merchant_own``): the order SUCCEEDED on
    the retry, the flag on the retry's payload and its case in ``cases_by_hand``. The case's id."""
    from service.executor.by_hand import PAID_TWICE_CASE, note_case
    from service.executor.core import txn_id_for
    from service.executor.store import orders

    key = f"{merchant_id}:{order_id}:retry:paid"
    flag = {"merchant_paid_too": {"txn_merchant_own": {"at": reported_at.isoformat()}}}
    with engine.begin() as conn:
        action_id = _insert_action(
            conn, merchant_id, order_id, "retry", "done", reported_at, key, _RETRY_PAYLOAD | flag
        )
        conn.execute(
            orders.update()
            .where(orders.c.merchant_id == merchant_id, orders.c.order_id == order_id)
            .values(state="SUCCEEDED", success_txn_id=txn_id_for(key))
        )
        note_case(conn, PAID_TWICE_CASE, merchant_id, order_id, action_id, reported_at, ref="txn_merchant_own")
        return _case_id(conn)


def insert_silent_uncharged(engine: Any, merchant_id: str, order_id: str, given_up_at: datetime) -> int:
    """What the executor leaves when a retry (payment ``<order_id>_2`` via adyen) was taken as never charged (an
    operator's "not charged") and its switch then answered no status check for a day: the retry dead-lettered as
    not charged, its status check planned SWITCH_SILENCE_LIMIT before ``given_up_at`` and asked no more then, and
    the check's case in ``cases_by_hand``. The case's id."""
    from service.executor.by_hand import SILENT_NOT_CHARGED_CASE, note_case
    from service.executor.core import SWITCH_SILENCE_LIMIT, SWITCH_SILENT, TAKEN_AS_NOT_CHARGED

    planned_at = given_up_at - SWITCH_SILENCE_LIMIT
    with engine.begin() as conn:
        charge_id = _insert_action(
            conn,
            merchant_id,
            order_id,
            "retry",
            "dead",
            planned_at,
            f"{merchant_id}:{order_id}:retry:not_charged",
            _RETRY_PAYLOAD | {TAKEN_AS_NOT_CHARGED: planned_at.isoformat()},
            attempts=2,
        )
        check_payload = {
            "charge_action_id": charge_id,
            "connector": "adyen",
            "attempt_number": 2,
            "payment_id": f"{order_id}_2",
            SWITCH_SILENT: {"at": given_up_at.isoformat(), "charge": "taken_as_not_charged"},
        }
        check_id = _insert_action(
            conn,
            merchant_id,
            order_id,
            "charge_status",
            "dead",
            planned_at,
            f"{merchant_id}:{order_id}:charge_status:silent",
            check_payload,
            attempts=3,
            last_error="no longer asked: switch 'adyen' answered no status check",
        )
        note_case(conn, SILENT_NOT_CHARGED_CASE, merchant_id, order_id, check_id, given_up_at)
        return _case_id(conn)


def insert_refund_by_hand(engine: Any, merchant_id: str, order_id: str, handed_at: datetime, why: str) -> int:
    """What the executor leaves when the refund of a duplicate charge (winback's retry, payment ``<order_id>_2``
    via adyen, charged after the order was settled) went to an operator to make by hand for ``why`` (one of
    REFUND_BY_HAND_REASONS): the retry done, its refund dead-lettered with the order's amount and currency, flagged,
    and its case in ``cases_by_hand``. The case's id."""
    import sqlalchemy as sa

    from service.executor.by_hand import REFUND_CASE, note_case
    from service.executor.core import REFUND_BY_HAND, txn_id_for
    from service.executor.store import orders

    charge_key = f"{merchant_id}:{order_id}:retry:duplicate"
    with engine.begin() as conn:
        order = conn.execute(
            sa.select(orders.c.amount, orders.c.currency).where(
                orders.c.merchant_id == merchant_id, orders.c.order_id == order_id
            )
        ).one()
        charge_id = _insert_action(conn, merchant_id, order_id, "retry", "done", handed_at, charge_key, _RETRY_PAYLOAD)
        refund_payload = {
            "charge_action_id": charge_id,
            "connector": "adyen",
            "attempt_number": 2,
            "payment_id": f"{order_id}_2",
            "txn_id": txn_id_for(charge_key),
            "amount": order.amount,
            "currency": order.currency,
            "reason": "duplicate",
            REFUND_BY_HAND: {"at": handed_at.isoformat(), "why": why},
        }
        refund_id = _insert_action(
            conn,
            merchant_id,
            order_id,
            "refund",
            "dead",
            handed_at,
            f"{charge_key}:refund",
            refund_payload,
            attempts=8,
            last_error="connector 'adyen' refused the refund: charge_not_refundable",
        )
        note_case(conn, REFUND_CASE, merchant_id, order_id, refund_id, handed_at, why=why)
        return _case_id(conn)


# --- the `winback` command as its own process --------------------------------------------------------------


@dataclass(frozen=True)
class Printed:
    """What one `winback` command printed, and how it ended."""

    stdout: str
    stderr: str
    exit_code: int


def run_winback(
    *arguments: str, cwd: Path, columns: int = 250, env: dict[str, str] | None = None, timeout: float = 600
) -> Printed:
    """``winback ARGUMENTS`` in a process of its own, as a newcomer's terminal runs it: MLflow imported fresh, no
    MLflow logging level of the developer's own, and a terminal ``columns`` wide (wide by default, so rich never
    wraps a line a test reads); ``env`` adds variables."""
    environment = {name: value for name, value in os.environ.items() if name != "MLFLOW_LOGGING_LEVEL"}
    environment |= {"COLUMNS": str(columns), **(env or {})}
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *arguments],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Printed(done.stdout, done.stderr, done.returncode)


#: A gateway status map overlay entry for a code the shipped catalog does not know (stripe's ``gsm_only_code``): a
#: request with ``failure={"error_code": "gsm_only_code"}`` is known to a catalog overlaid with it, and to no other.
GSM_ONLY_CODE = OverlayEntry(
    connector="stripe", code="gsm_only_code", message="Gateway down", error_class=ErrorClass.PROCESSOR_TECHNICAL,
    class_from="error_category", decision="retry", retryable_prior=True, step_up_possible=False,
    clear_pan_possible=False, alternate_network_possible=False,
)  # fmt: skip


def fail_the_nth_move_onto(folder: Path, names: Iterable[str], n: int, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the ``n``-th ``os.replace`` onto one of the files ``names`` of ``folder`` raise OSError (ENOSPC), as a
    full disk would; later ones go through (a roll-back's). Returns the names moved onto, in order."""
    real_replace = os.replace
    targets = {folder / name for name in names}
    onto: list[str] = []

    def replace_or_fail(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
        if Path(target) in targets:
            onto.append(Path(target).name)
            if len(onto) == n:
                raise OSError(28, "No space left on device (made to fail by the test)")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace_or_fail)
    return onto
