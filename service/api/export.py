"""Export stored decisions and outcomes as history files (CONTRACT.md section 3) for the feedback loop.

Each order's failed attempts come from the request of its first stored decision (``history.attempts``, with the
``failure`` block filling the last one's error fields). A decided ``retry`` with an outcome becomes one more
attempt; a decided ``retarget`` becomes a nudge, plus a ``retarget_link`` attempt when the outcome says the
customer paid (or failed to pay) through the link. Decisions without an outcome are left out: their result is
not known yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import sqlalchemy as sa

from model.history import ATTEMPT_COLUMNS, NUDGE_COLUMNS, write_attempts, write_nudges
from model.vocab import Action, Strategy
from service.api.store import decisions, make_engine, outcomes

_FAILURE_FIELDS = (
    "error_code",
    "error_message",
    "network_decline_code",
    "merchant_advice_code",
    "unified_code",
)


@dataclass(frozen=True)
class ExportSummary:
    attempts_path: Path
    nudges_path: Path
    attempts: int
    nudges: int
    orders: int


def _order_fields(request: dict[str, Any]) -> dict[str, Any]:
    customer, payment = request["customer"], request["payment"]
    return {
        "merchant_id": request["merchant_id"],
        "order_id": request["order_id"],
        "amount": float(request["amount"]),
        "currency": request["currency"],
        "customer_id": customer["id"],
        "phone_present": bool(customer.get("phone_present", False)),
        "email_present": bool(customer.get("email_present", False)),
        "customer_country": customer.get("country"),
        "payment_method": payment["payment_method"],
        "payment_method_type": payment.get("payment_method_type"),
        "card_network": payment.get("card_network"),
        "issuer": payment.get("issuer"),
        "is_recurring": bool(payment.get("is_recurring", False)),
        "is_network_token": bool(payment.get("is_network_token", False)),
        "authentication_type": payment.get("authentication_type", "no_three_ds"),
    }


def _earlier_attempts(request: dict[str, Any]) -> list[dict[str, Any]]:
    base = _order_fields(request)
    history = request.get("history", {}).get("attempts", [])
    rows = []
    for index, attempt in enumerate(history):
        last = index == len(history) - 1
        failure = request["failure"] if last else {}
        row = {
            **base,
            "txn_id": f"{request['order_id']}_{attempt['attempt_number']}",
            "attempt_number": int(attempt["attempt_number"]),
            "created_at": attempt["created_at"],
            "connector": attempt["connector"],
            "strategy": attempt["strategy"],
            "nudge_id": None,
            "status": attempt["status"],
            **{field: failure.get(field) for field in _FAILURE_FIELDS},
            "decision_id": None,
            "propensity": None,
        }
        if row["error_code"] is None and row["status"] == "failure":
            row["error_code"] = attempt.get("error_code")
        rows.append(row)
    return rows


def history_frames(engine: sa.Engine) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(attempts, nudges) frames built from the stored decisions that have an outcome."""
    query = (
        sa.select(decisions.c.decision_id, decisions.c.request_json, decisions.c.answer_json, outcomes.c.body_json)
        .join(outcomes, outcomes.c.decision_id == decisions.c.decision_id)
        .order_by(decisions.c.merchant_id, decisions.c.order_id, decisions.c.event_time, decisions.c.created_at)
    )
    attempts: dict[tuple[str, str, int], dict[str, Any]] = {}
    nudges: list[dict[str, Any]] = []
    next_number: dict[tuple[str, str], int] = {}
    with engine.connect() as conn:
        for _decision_id, request_json, answer_json, body_json in conn.execute(query):
            request, answer, body = (
                orjson.loads(request_json),
                orjson.loads(answer_json),
                orjson.loads(body_json),
            )
            order = (request["merchant_id"], request["order_id"])
            for row in _earlier_attempts(request):
                attempts.setdefault((*order, row["attempt_number"]), row)
                next_number[order] = max(next_number.get(order, 1), row["attempt_number"] + 1)
            number = next_number.get(order, 1)
            base = _order_fields(request)
            common = {"decision_id": answer["decision_id"], "propensity": answer["propensity"]}
            failure = {field: body.get(field) for field in _FAILURE_FIELDS}
            if body["status"] == "failure" and not any(failure.values()):
                failure["error_code"] = "unknown"
            if body["status"] == "success":
                failure = dict.fromkeys(_FAILURE_FIELDS)
            if answer["action"] == Action.RETRY:
                attempts[(*order, number)] = {
                    **base,
                    **common,
                    **failure,
                    "txn_id": body.get("txn_id") or f"{request['order_id']}_{number}",
                    "attempt_number": number,
                    "created_at": answer["execute_at"],
                    "connector": body.get("connector") or answer["connector"],
                    "strategy": answer["strategy"],
                    "nudge_id": None,
                    "status": body["status"],
                }
                next_number[order] = number + 1
            elif answer["action"] == Action.RETARGET:
                nudge_id = body.get("nudge_id") or f"nud_{answer['decision_id'].removeprefix('dec_')}"
                nudges.append(
                    {
                        **common,
                        "merchant_id": base["merchant_id"],
                        "order_id": base["order_id"],
                        "nudge_id": nudge_id,
                        "sent_at": body.get("sent_at") or answer["execute_at"],
                        "channel": answer["channel"],
                        "template_id": body.get("template_id") or "winback_payment_link",
                        "delivered": bool(body.get("delivered", True)),
                        "clicked_at": body.get("clicked_at") or (body["occurred_at"] if body.get("txn_id") else None),
                    }
                )
                if body.get("txn_id"):  # the customer used the link: that payment is an attempt of the order
                    attempts[(*order, number)] = {
                        **base,
                        **common,
                        **failure,
                        "txn_id": body["txn_id"],
                        "attempt_number": number,
                        "created_at": body["occurred_at"],
                        "connector": body.get("connector") or request["failure"]["connector"],
                        "strategy": Strategy.RETARGET_LINK.value,
                        "nudge_id": nudge_id,
                        "status": body["status"],
                    }
                    next_number[order] = number + 1
    attempts_frame = pd.DataFrame(list(attempts.values()), columns=list(ATTEMPT_COLUMNS))
    nudges_frame = pd.DataFrame(nudges, columns=list(NUDGE_COLUMNS))
    for frame, columns in ((attempts_frame, ("created_at",)), (nudges_frame, ("sent_at", "clicked_at"))):
        for column in columns:
            frame[column] = pd.to_datetime(frame[column], utc=True, format="ISO8601")
    return attempts_frame, nudges_frame


def export_history(database_url: str, out_dir: str | Path) -> ExportSummary:
    """Write ``out_dir/attempts.parquet`` and ``out_dir/nudges.parquet`` from the decision store.

    The files pass the history validation (``model.history``); call it from the feedback loop before retraining.
    """
    target = Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    engine = make_engine(database_url)
    try:
        attempts_frame, nudges_frame = history_frames(engine)
    finally:
        engine.dispose()
    attempts_path, nudges_path = target / "attempts.parquet", target / "nudges.parquet"
    write_attempts(attempts_frame, attempts_path)
    write_nudges(nudges_frame, nudges_path)
    return ExportSummary(
        attempts_path=attempts_path,
        nudges_path=nudges_path,
        attempts=len(attempts_frame),
        nudges=len(nudges_frame),
        orders=attempts_frame[["merchant_id", "order_id"]].drop_duplicates().shape[0],
    )
