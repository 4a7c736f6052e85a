"""Export stored decisions, outcomes and the executor's records as history files (CONTRACT.md section 3).

Two sources feed the feedback loop. Orders the executor carried out are exported from its own tables: every
``transactions`` row is an attempt and every ``nudges`` row a nudge, each with the ``decision_id`` and
``propensity`` of the decision that caused it (attempts are renumbered 1..n per order, so a number reserved by
an action that never ran leaves no gap). Orders whose caller acted itself and reported back through
``/v1/outcomes`` are rebuilt from the decision store as below. An order the executor knows is taken from the
executor only. ``since`` keeps whole orders whose first attempt is at or after it, so every order stays complete.

Each order's failed attempts come from the requests of its stored decisions (``history.attempts``, or the failure
itself when it lists none, with the ``failure`` block filling the last one's error fields). A decided ``retry`` with
an outcome becomes one more attempt, created when the outcome occurred; a decided ``retarget`` becomes a nudge, plus
a ``retarget_link`` attempt when the customer paid through the link (a success) or a payment through it failed (a
failure with a ``txn_id``). Attempts the caller gave no ``txn_id`` get ``<order_id>_<n>``, never one used elsewhere
in the files. Decisions without an outcome are left out: their result is not known yet.

A ``stop`` leaves no attempt or nudge, and no outcome is reported for it: stops go to a third file, ``stops``
(``model.history.STOP_COLUMNS``), one row per stop decision with its ``decision_id``, ``propensity``, the decision
point's time and the order's last attempt then, so the off-policy evaluation counts the points where the policy
stopped. From the executor: every stop it carried out (an assisted merchant's stop once an agent approved it;
an agent's reject is a stop too, with a null propensity, since no policy chose it). From callers of the API: every
stop decision served, taken as followed; its request's history makes the order's attempts, so an order stopped at
its first failure is exported too (its result is known when the stop is decided).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import sqlalchemy as sa
from pydantic import ValidationError

from model.history import (
    ATTEMPT_COLUMNS,
    NUDGE_COLUMNS,
    STOP_COLUMNS,
    History,
    HistoryError,
    Problem,
    ValidationReport,
    move_into_place_together,
    read_history,
    stops_beside,
    write_attempts,
    write_nudges,
    write_stops,
)
from model.vocab import Action, Channel, Strategy
from service.api.schemas import OutcomeIn
from service.api.store import decisions, make_engine, outcomes, shown_url
from service.executor.store import agent_queue, orders, transactions
from service.executor.store import nudges as nudge_table
from service.personal_data import mask_addresses_in

#: Validation rounds of an export: each leaves out the orders the last one found at fault (at most the 50 problems
#: a report shows; a dropped order can only remove problems, so a second round normally passes).
_MAX_VALIDATION_ROUNDS = 50

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
    dropped_after_success: int = 0  # executor attempts after an order's success, left out (see executor_frames)
    #: Orders left out whole because the history files cannot carry their history (a strategy or channel outside
    #: the contract's lists, or rows that break a rule of the files), one line each ("merchant/order: why").
    left_out_orders: tuple[str, ...] = ()
    #: Orders whose order_id several merchants use, written as ``merchant/order``, one line each.
    renamed_orders: tuple[str, ...] = ()
    stops_path: Path | None = None
    stops: int = 0  # stop decisions written to the stops file
    #: Orders written from the earlier history (``with_history``), and those of it the store's copy replaced.
    earlier_orders: int = 0
    earlier_replaced: int = 0
    #: The earlier history's warnings (`History.warnings`): its values are written as read, so said only now.
    earlier_warnings: ValidationReport = field(default_factory=ValidationReport)
    #: The warnings of the files written (`History.warnings` of reading them back), naming them where they are now;
    #: without those ``earlier_warnings`` says (of the earlier history's orders written as read, or of a whole file).
    warnings: ValidationReport = field(default_factory=ValidationReport)


def _order_fields(request: dict[str, Any]) -> dict[str, Any]:
    customer, payment = request["customer"], request["payment"]
    return {
        "merchant_id": request["merchant_id"],
        "order_id": request["order_id"],
        "amount": float(request["amount"]),
        "currency": str(request["currency"]).upper(),  # ISO 4217; the request accepts any case, the files not
        "customer_id": customer["id"],
        "phone_present": bool(customer.get("phone_present", False)),
        "email_present": bool(customer.get("email_present", False)),
        "customer_country": customer["country"].upper() if customer.get("country") else None,
        "payment_method": payment["payment_method"],
        "payment_method_type": payment.get("payment_method_type"),
        "card_network": payment.get("card_network"),
        "issuer": payment.get("issuer"),
        "is_recurring": bool(payment.get("is_recurring", False)),
        "is_network_token": bool(payment.get("is_network_token", False)),
        "authentication_type": payment.get("authentication_type", "no_three_ds"),
    }


def _fresh_txn_id(order_id: str, number: int, taken: set[str]) -> str:
    """``<order_id>_<number>`` (the processor-side suffix convention), or with a further ``_k`` when a reported
    or another order's id already has it: txn_id is unique across the history files."""
    candidate, k = f"{order_id}_{number}", 1
    while candidate in taken:
        k += 1
        candidate = f"{order_id}_{number}_{k}"
    taken.add(candidate)
    return candidate


def _earlier_attempts(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The attempts the request's history reports, without txn_id (the caller's history does not carry one).

    A request whose history lists no attempt (CONTRACT.md section 2 allows it) still reports one: its ``failure``,
    the order's first attempt, made at the decision point (or by the first nudge, for a follow-up); without it the
    order's first row was the decided retry, and the files refuse an order that starts so.
    """
    base = _order_fields(request)
    history = request.get("history", {}).get("attempts", [])
    if not history:
        sent = [nudge["sent_at"] for nudge in request.get("history", {}).get("nudges", [])]
        history = [
            {
                "attempt_number": 1,
                "created_at": min([request["event_time"], *sent], key=datetime.fromisoformat),
                "connector": request["failure"]["connector"],
                "strategy": Strategy.INITIAL.value,
                "status": "failure",
            }
        ]
    rows = []
    for index, attempt in enumerate(history):
        last = index == len(history) - 1
        failure = request["failure"] if last else {}
        row = {
            **base,
            "txn_id": None,
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


def _stop_row(merchant_id: str, order_id: str, decision_id: str, decided_at: Any, propensity: Any) -> dict[str, Any]:
    """A stops row; its ``attempt_number`` is set once the order's attempts are known (``number_stops``)."""
    return {
        "merchant_id": merchant_id,
        "order_id": order_id,
        "decision_id": decision_id,
        "decided_at": decided_at,
        "attempt_number": 0,
        "propensity": propensity,
    }


def _stops_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(STOP_COLUMNS))
    frame["decided_at"] = pd.to_datetime(frame["decided_at"], utc=True, format="ISO8601")
    frame["propensity"] = frame["propensity"].astype("float64")
    return frame


def number_stops(stops: pd.DataFrame, attempts: pd.DataFrame) -> pd.DataFrame:
    """``stops`` with each one's ``attempt_number``: the order's last attempt created at or before the stop was
    decided (the failure it answered), from the exported attempts (so renumbered as they are). 0 when none was:
    the files' check names such a stop, and the export leaves its order out."""
    if stops.empty:
        return stops.assign(attempt_number=pd.Series(dtype="int64"))
    created = attempts.assign(created_at=pd.to_datetime(attempts["created_at"], utc=True))
    by_order = dict(list(created.groupby(["merchant_id", "order_id"], sort=False)))
    numbers = []
    for merchant_id, order_id, decided in stops[["merchant_id", "order_id", "decided_at"]].itertuples(index=False):
        group = by_order.get((merchant_id, order_id))
        seen = pd.Series(dtype="int64") if group is None else group["attempt_number"][group["created_at"] <= decided]
        numbers.append(int(seen.max()) if len(seen) else 0)
    return stops.assign(attempt_number=pd.Series(numbers, index=stops.index, dtype="int64"))


def history_frames(
    engine: sa.Engine, taken: set[str] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, dict[tuple[str, str], str], pd.DataFrame]:
    """(attempts, nudges, unusable, stops) built from the stored decisions that have an outcome, and from the stop
    decisions (which need none: see the module docstring).

    ``taken``: txn_ids already used elsewhere in the export (the executor's); ids made up here avoid them.
    ``unusable``: orders with a stored outcome the feedback fields of which do not validate (stored before they
    were checked at the API), each with the reason; the caller leaves them out whole.
    """
    query = (
        sa.select(decisions.c.decision_id, decisions.c.request_json, decisions.c.answer_json, outcomes.c.body_json)
        .join(
            outcomes,
            (outcomes.c.decision_id == decisions.c.decision_id) & (outcomes.c.merchant_id == decisions.c.merchant_id),
        )
        .order_by(decisions.c.merchant_id, decisions.c.order_id, decisions.c.event_time, decisions.c.created_at)
    )
    stop_query = (
        sa.select(decisions.c.request_json, decisions.c.answer_json)
        .where(decisions.c.action == Action.STOP.value)
        .order_by(decisions.c.merchant_id, decisions.c.order_id, decisions.c.event_time, decisions.c.created_at)
    )
    with engine.connect() as conn:
        stored = [
            (
                orjson.loads(request_json),
                orjson.loads(answer_json),
                json.loads(body_json),  # not orjson: an extra may hold an integer beyond 64 bits
            )
            for _decision_id, request_json, answer_json, body_json in conn.execute(query)
        ]
        stopped = [(orjson.loads(request), orjson.loads(answer)) for request, answer in conn.execute(stop_query)]
    unusable: dict[tuple[str, str], str] = {}
    usable = []
    for request, answer, body in stored:
        try:
            OutcomeIn.model_validate(body)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(part) for part in error["loc"])
            order = (request["merchant_id"], request["order_id"])
            unusable.setdefault(order, f"outcome of {answer['decision_id']}: {field}: {error['msg']}")
            continue
        usable.append((request, answer, body))
    # Reported txn_ids first, so an id made up for an attempt the caller did not name never takes one of them.
    taken = set(taken or ()) | {str(body["txn_id"]) for _, _, body in usable if body.get("txn_id")}
    attempts: dict[tuple[str, str, int], dict[str, Any]] = {}
    nudges: list[dict[str, Any]] = []
    next_number: dict[tuple[str, str], int] = {}
    for request, answer, body in usable:
        order = (request["merchant_id"], request["order_id"])
        if order in unusable:
            continue
        for row in _earlier_attempts(request):  # a later decision's request may report attempts an earlier one did not
            key = (*order, row["attempt_number"])
            if key not in attempts:
                attempts[key] = row | {"txn_id": _fresh_txn_id(request["order_id"], row["attempt_number"], taken)}
            next_number[order] = max(next_number.get(order, 1), row["attempt_number"] + 1)
        number = next_number.get(order, 1)
        base = _order_fields(request)
        common = {"decision_id": answer["decision_id"], "propensity": answer["propensity"]}
        failure = {field: body.get(field) or None for field in _FAILURE_FIELDS}  # "" is no value in the files
        if body["status"] == "failure" and not any(failure.values()):
            failure["error_code"] = "unknown"
        if body["status"] == "success":
            failure = dict.fromkeys(_FAILURE_FIELDS)
        if answer["action"] == Action.RETRY:
            attempts[(*order, number)] = {
                **base,
                **common,
                **failure,
                "txn_id": body.get("txn_id") or _fresh_txn_id(request["order_id"], number, taken),
                "attempt_number": number,
                # When the outcome happened: the caller may have retried later than the decision's execute_at.
                "created_at": body["occurred_at"],
                "connector": body.get("connector") or answer["connector"],
                "strategy": answer["strategy"],
                "nudge_id": None,
                "status": body["status"],
            }
            next_number[order] = number + 1
        elif answer["action"] == Action.RETARGET:
            nudge_id = body.get("nudge_id") or f"nud_{answer['decision_id'].removeprefix('dec_')}"
            # The customer paid through the link (success), or a payment through it failed (a txn_id says so):
            # that payment is an attempt of the order, made after the message was sent and clicked.
            paid_through_link = body["status"] == "success" or bool(body.get("txn_id"))
            sent_at = body.get("sent_at")
            if not sent_at:  # not reported: when it was due, but never after the customer clicked or paid
                happened = [answer["execute_at"], body.get("clicked_at")]
                if paid_through_link:
                    happened.append(body["occurred_at"])
                sent_at = min((moment for moment in happened if moment), key=datetime.fromisoformat)
            nudges.append(
                {
                    **common,
                    "merchant_id": base["merchant_id"],
                    "order_id": base["order_id"],
                    "nudge_id": nudge_id,
                    "sent_at": sent_at,
                    "channel": answer["channel"],
                    "template_id": body.get("template_id") or "winback_payment_link",
                    "delivered": bool(body.get("delivered", True)),
                    "clicked_at": body.get("clicked_at") or (body["occurred_at"] if paid_through_link else None),
                }
            )
            if paid_through_link:
                attempts[(*order, number)] = {
                    **base,
                    **common,
                    **failure,
                    "txn_id": body.get("txn_id") or _fresh_txn_id(request["order_id"], number, taken),
                    "attempt_number": number,
                    "created_at": body["occurred_at"],
                    "connector": body.get("connector") or request["failure"]["connector"],
                    "strategy": Strategy.RETARGET_LINK.value,
                    "nudge_id": nudge_id,
                    "status": body["status"],
                }
                next_number[order] = number + 1
    stops: list[dict[str, Any]] = []
    for request, answer in stopped:
        order = (request["merchant_id"], request["order_id"])
        if order in unusable:
            continue
        for row in _earlier_attempts(request):  # an order stopped at its first failure has no other source
            key = (*order, row["attempt_number"])
            if key not in attempts:
                attempts[key] = row | {"txn_id": _fresh_txn_id(request["order_id"], row["attempt_number"], taken)}
        stops.append(_stop_row(*order, answer["decision_id"], request["event_time"], answer["propensity"]))
    attempts_frame = pd.DataFrame(list(attempts.values()), columns=list(ATTEMPT_COLUMNS))
    nudges_frame = pd.DataFrame(nudges, columns=list(NUDGE_COLUMNS))
    for frame, columns in ((attempts_frame, ("created_at",)), (nudges_frame, ("sent_at", "clicked_at"))):
        for column in columns:
            frame[column] = pd.to_datetime(frame[column], utc=True, format="ISO8601")
        # Numbers, as the executor's frames hold them: a column of None objects only (a stop's earlier attempts)
        # beside them made pandas warn on the export's terminal (FutureWarning, concatenating all-NA entries).
        frame["propensity"] = frame["propensity"].astype("float64")
    return attempts_frame, nudges_frame, unusable, _stops_frame(stops)


def _utc(value: Any) -> Any:
    if value is None:
        return None
    stamp = pd.Timestamp(value)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def executor_frames(engine: sa.Engine) -> tuple[pd.DataFrame, pd.DataFrame, int, pd.DataFrame]:
    """(attempts, nudges, dropped, stops) from the executor's orders, transactions, nudges, decisions and agent
    queue.

    ``dropped`` counts attempts recorded after an order's first success (a late charge that needs a refund):
    the history contract allows nothing after a success, so they are left out and counted. ``stops``: the stop
    decisions the executor carried out (see the module docstring).
    """
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table("orders"):
            return (
                pd.DataFrame(columns=list(ATTEMPT_COLUMNS)),
                pd.DataFrame(columns=list(NUDGE_COLUMNS)),
                0,
                _stops_frame([]),
            )
        bases = {
            (row.merchant_id, row.order_id): _order_fields(orjson.loads(row.request_json))
            for row in conn.execute(sa.select(orders.c.merchant_id, orders.c.order_id, orders.c.request_json))
        }
        txns = conn.execute(
            sa.select(transactions).order_by(
                transactions.c.merchant_id, transactions.c.order_id, transactions.c.attempt_number
            )
        ).mappings()
        attempts: list[dict[str, Any]] = []
        number: dict[tuple[str, str], int] = {}
        succeeded: set[tuple[str, str]] = set()
        dropped = 0
        for txn in txns:
            order = (txn["merchant_id"], txn["order_id"])
            base = bases.get(order)
            if base is None:
                continue
            if order in succeeded:
                dropped += 1
                continue
            number[order] = number.get(order, 0) + 1
            failure = {field: txn[field] for field in _FAILURE_FIELDS}
            if txn["status"] == "failure" and not any(failure.values()):
                failure["error_code"] = "unknown"
            attempts.append(
                {
                    **base,
                    **failure,
                    "merchant_id": order[0],
                    "txn_id": txn["txn_id"],
                    "attempt_number": number[order],
                    "created_at": _utc(txn["created_at"]),
                    "connector": txn["connector"],
                    "strategy": txn["strategy"],
                    "nudge_id": txn["nudge_id"],
                    "status": txn["status"],
                    "decision_id": txn["decision_id"],
                    "propensity": txn["propensity"],
                }
            )
            if txn["status"] == "success":
                succeeded.add(order)
        sent = [
            {
                "merchant_id": row["merchant_id"],
                "order_id": row["order_id"],
                "nudge_id": row["nudge_id"],
                "sent_at": _utc(row["sent_at"]),
                "channel": row["channel"],
                "template_id": row["template_id"],
                "delivered": bool(row["delivered"]),
                "clicked_at": _utc(row["clicked_at"]),
                "decision_id": row["decision_id"],
                "propensity": row["propensity"],
            }
            for row in conn.execute(sa.select(nudge_table).order_by(nudge_table.c.sent_at)).mappings()
            if (row["merchant_id"], row["order_id"]) in bases
        ]
        stops = _executor_stops(conn, set(bases))
    attempts_frame = pd.DataFrame(attempts, columns=list(ATTEMPT_COLUMNS))
    nudges_frame = pd.DataFrame(sent, columns=list(NUDGE_COLUMNS))
    for frame, columns in ((attempts_frame, ("created_at",)), (nudges_frame, ("sent_at", "clicked_at"))):
        for column in columns:
            frame[column] = pd.to_datetime(frame[column], utc=True)
    return attempts_frame, nudges_frame, dropped, stops


def _executor_stops(conn: sa.Connection, known: set[tuple[str, str]]) -> pd.DataFrame:
    """The stops the executor carried out for its ``known`` orders: its stop decisions (an assisted merchant's
    only once an agent approved them) and agents' rejects (a stop no policy chose: null propensity)."""
    queued = {
        row.decision_id: row.state for row in conn.execute(sa.select(agent_queue.c.decision_id, agent_queue.c.state))
    }
    rows = []
    query = sa.select(
        decisions.c.merchant_id,
        decisions.c.order_id,
        decisions.c.decision_id,
        decisions.c.event_time,
        decisions.c.action,
        decisions.c.propensity,
    ).order_by(decisions.c.merchant_id, decisions.c.order_id, decisions.c.event_time, decisions.c.created_at)
    for row in conn.execute(query):
        if (row.merchant_id, row.order_id) not in known:
            continue
        state = queued.get(row.decision_id)
        if state == "rejected":
            rows.append(_stop_row(row.merchant_id, row.order_id, row.decision_id, _utc(row.event_time), None))
        elif row.action == Action.STOP.value and state in (None, "approved"):
            rows.append(_stop_row(row.merchant_id, row.order_id, row.decision_id, _utc(row.event_time), row.propensity))
    return _stops_frame(rows)


def _orders_of(frame: pd.DataFrame) -> set[tuple[str, str]]:
    return set(zip(frame["merchant_id"], frame["order_id"], strict=True))


def _only(frame: pd.DataFrame, keep: set[tuple[str, str]]) -> pd.DataFrame:
    mask = [key in keep for key in zip(frame["merchant_id"], frame["order_id"], strict=True)]
    return frame.loc[mask]


def _unwritable_orders(attempts: pd.DataFrame, nudges: pd.DataFrame) -> dict[tuple[str, str], str]:
    """Orders whose history holds a strategy or channel outside the history contract's lists (a decision request
    may carry one: CONTRACT.md section 2), each with the first such value."""
    found: dict[tuple[str, str], str] = {}
    for frame, column, allowed in (
        (attempts, "strategy", {strategy.value for strategy in Strategy}),
        (nudges, "channel", {channel.value for channel in Channel}),
    ):
        for merchant_id, order_id, value in frame[["merchant_id", "order_id", column]].itertuples(index=False):
            if value not in allowed:
                found.setdefault((str(merchant_id), str(order_id)), f"{column} {value!r}")
    return found


def all_history_frames(
    engine: sa.Engine, since: datetime | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, int, dict[tuple[str, str], str], pd.DataFrame]:
    """(attempts, nudges, dropped, unusable, stops) from the executor and the decision store (see the module
    docstring and ``history_frames``); each stop numbered with the order's last attempt then."""
    exec_attempts, exec_nudges, dropped, exec_stops = executor_frames(engine)
    api_attempts, api_nudges, unusable, api_stops = history_frames(
        engine, taken=set(exec_attempts["txn_id"].astype(str))
    )
    executed = _orders_of(exec_attempts)
    api_orders = _orders_of(api_attempts) - executed
    # An order the executor carried out is exported from its own records: a bad outcome posted for it as well
    # does not take it out.
    unusable = {order: why for order, why in unusable.items() if order not in executed}
    attempts = pd.concat(
        [frame for frame in (exec_attempts, _only(api_attempts, api_orders)) if len(frame)] or [exec_attempts],
        ignore_index=True,
    )
    nudges = pd.concat(
        [frame for frame in (exec_nudges, _only(api_nudges, api_orders)) if len(frame)] or [exec_nudges],
        ignore_index=True,
    )
    stops = pd.concat(
        [frame for frame in (exec_stops, _only(api_stops, api_orders)) if len(frame)] or [exec_stops],
        ignore_index=True,
    )
    if since is not None and len(attempts):
        first = attempts.groupby(["merchant_id", "order_id"])["created_at"].min()
        recent = first[first >= pd.Timestamp(since)]
        keep = set(zip(recent.index.get_level_values(0), recent.index.get_level_values(1), strict=True))
        attempts, nudges, stops = _only(attempts, keep), _only(nudges, keep), _only(stops, keep)
    attempts = attempts.sort_values(["merchant_id", "order_id", "attempt_number"], kind="mergesort")
    # The failures of a caller's requests are stored as sent (a decision's request keeps the customer's contact):
    # their decline texts are masked here as the executor's and the outcomes' are at write (``MaskedText``,
    # ``masked_outcome``), so no e-mail address or phone number a connector echoed reaches the files.
    attempts["error_message"] = attempts["error_message"].map(_masked_text, na_action="ignore")
    nudges = nudges.sort_values(["merchant_id", "order_id", "sent_at"], kind="mergesort")
    stops = number_stops(stops.sort_values(["merchant_id", "order_id", "decided_at"], kind="mergesort"), attempts)
    return (
        attempts.reset_index(drop=True),
        nudges.reset_index(drop=True),
        dropped,
        unusable,
        stops.reset_index(drop=True),
    )


def _masked_text(text: object) -> object:
    """``text`` with e-mail addresses and phone numbers masked when it is text (a frame's cell may be anything)."""
    return mask_addresses_in(text) if isinstance(text, str) else text


def _shared_ids(column: str, *frames: pd.DataFrame) -> set[str]:
    """Values of ``column`` (order_id, txn_id) that more than one merchant uses: the stores key orders and
    attempts per merchant, the history files by the id alone."""
    pairs = pd.concat([frame[["merchant_id", column]] for frame in frames]).drop_duplicates()
    counts = pairs[column].value_counts()
    return set(counts[counts > 1].index.astype(str))


def _qualify(frame: pd.DataFrame, shared: set[str], column: str = "order_id") -> pd.DataFrame:
    """``frame`` with each shared id of ``column`` written as ``<merchant_id>/<id>``."""
    if not shared or not len(frame):
        return frame
    frame = frame.copy()
    mask = frame[column].isin(shared)
    frame.loc[mask, column] = frame.loc[mask, "merchant_id"] + "/" + frame.loc[mask, column]
    return frame


def _orders_at_fault(
    error: HistoryError, frames: tuple[pd.DataFrame, ...], files: tuple[Path, ...]
) -> dict[tuple[str, str], str] | None:
    """The orders the shown problems of ``error`` are in, each with its first problem; None when one is not in a
    row of any file. Problems come from writing a file (labelled ``<path> (writing)``, rows of the frame) or
    from reading them back (labelled ``<path>``, rows of the file, written in the frame's order). ``frames`` and
    ``files`` line up: attempts, nudges, stops."""
    found: dict[tuple[str, str], str] = {}
    by_label = {str(path): frame for path, frame in zip(files, frames, strict=True)}
    for problem in error.report.problems:
        order = _order_in_row(by_label, problem.file.removesuffix(" (writing)"), problem.row)
        if order is None:
            return None
        where = "" if problem.column is None else f"{problem.column}: "
        found.setdefault(order, f"{where}{problem.reason}")
    return found or None


def _order_in_row(by_label: dict[str, pd.DataFrame], label: str, row: int | None) -> tuple[str, str] | None:
    """(merchant_id, order_id) of the 1-based ``row`` of the file ``label`` names, whose rows are those of its
    frame in ``by_label`` (written in the frame's order); None for a file-level problem or one in no such row."""
    frame = by_label.get(label)
    if frame is None or row is None or not 1 <= row <= len(frame):
        return None
    merchant_id, order_id = frame.iloc[row - 1][["merchant_id", "order_id"]]
    return str(merchant_id), str(order_id)


def _warnings_not_said(
    written: ValidationReport,
    files: tuple[Path, ...],
    frames: tuple[pd.DataFrame, ...],
    earlier: ValidationReport,
    earlier_files: tuple[Path, Path, Path | None],
    carried: set[tuple[str, str]],
) -> ValidationReport:
    """The warnings of the written ``files`` (rows of ``frames``: attempts, nudges, stops) less those the earlier
    history's own already say: one about a row of an order ``carried`` from it as written there, or a file-level
    one said of the same kind of file. The earlier history's name their rows in its files, where its producer
    fixes them; said again of the written files, each came twice."""
    by_label = {str(path): frame for path, frame in zip(files, frames, strict=True)}
    kind = {str(path): index for index, path in enumerate(files)}
    earlier_kind = {str(path): index for index, path in enumerate(earlier_files) if path is not None}
    said_of_a_file = {(earlier_kind.get(p.file), p.column, p.reason) for p in earlier.problems if p.row is None}

    def said(problem: Problem) -> bool:
        if problem.row is None:
            return (kind.get(problem.file), problem.column, problem.reason) in said_of_a_file
        return _order_in_row(by_label, problem.file, problem.row) in carried

    return written.leaving_out(said)


def history_files_in(folder: str | Path) -> tuple[Path, Path, Path | None]:
    """(attempts, nudges, stops or None) of a history folder as ``winback simulate`` and this export write it:
    ``attempts`` and ``nudges`` as .parquet or .csv, and ``stops`` beside them when there is one."""
    where = Path(folder)
    for suffix in (".parquet", ".csv"):
        attempts, nudges = where / f"attempts{suffix}", where / f"nudges{suffix}"
        if attempts.is_file() and nudges.is_file():
            return attempts, nudges, stops_beside(attempts)
    raise FileNotFoundError(
        f"no history in {where}: it needs attempts.parquet and nudges.parquet (or attempts.csv and nudges.csv)"
    )


def _with_earlier(
    earlier: History, attempts: pd.DataFrame, nudges: pd.DataFrame, stops: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, set[tuple[str, str]], int]:
    """The store's frames with every order of an earlier history the store does not hold, the orders taken from
    it (merchant_id, order_id as in the frames) and the number replaced by the store's copy (the store's is the
    later, fuller record). An earlier export's ``<merchant_id>/<order_id>`` is the same order as the store's
    ``order_id`` of that merchant."""

    def keys(frame: pd.DataFrame) -> list[tuple[str, str]]:
        return [
            (str(m), str(o).removeprefix(f"{m}/")) for m, o in zip(frame["merchant_id"], frame["order_id"], strict=True)
        ]

    held = _orders_of(attempts) | _orders_of(nudges)
    frames = []
    for old, new in ((earlier.attempts, attempts), (earlier.nudges, nudges), (earlier.stops, stops)):
        if old is None or not len(old):
            frames.append(new)
            continue
        old = old.assign(order_id=[o for _, o in keys(old)])
        old = old.loc[[key not in held for key in keys(old)]]
        if not len(new):
            frames.append(old.reset_index(drop=True))
            continue
        # As objects: the writer types every column, and a column all null in one frame keeps no dtype of its own.
        frames.append(pd.concat([old.astype(object), new.astype(object)], ignore_index=True))
    earlier_orders = set(keys(earlier.attempts)) | set(keys(earlier.nudges))
    return frames[0], frames[1], frames[2], earlier_orders - held, len(earlier_orders & held)


def export_history(
    database_url: str, out_dir: str | Path, since: datetime | None = None, with_history: str | Path | None = None
) -> ExportSummary:
    """Write ``out_dir/attempts.parquet``, ``out_dir/nudges.parquet`` and ``out_dir/stops.parquet`` (the stop
    decisions, see the module docstring) from the executor and decision store.

    The files are validated on the way out (row schema on write, then the cross-row and cross-file rules by
    reading them back with ``model.history.read_history``). One order the files cannot carry must not block every
    other order's feedback: an order with a value outside the contract's lists, or whose rows break a rule of
    the files, is left out whole and named in the summary (``left_out_orders``); nothing is left out silently. An
    order_id that several merchants use is written ``<merchant_id>/<order_id>`` (the files key orders by
    order_id) and named too; a txn_id that several merchants' attempts have is written ``<merchant_id>/<txn_id>``
    the same way. The files are written beside the targets and moved into place only once valid, so a failed
    export leaves an earlier export as it was; what reading them back found worth a look (`History.warnings`) is
    the summary's ``warnings``, naming the files where they are then (less what ``earlier_warnings`` already
    says: each warning is said once, of the file its producer fixes). ``since`` (aware) keeps orders whose first
    attempt is at or after it.

    ``with_history``: a folder holding an earlier history (the one the first model was trained on, or an earlier
    export; it may be ``out_dir`` itself). Its every order is written too, read and validated first (a
    ``HistoryError`` names its problems), except those the store holds, which the store's copy replaces: a
    retraining history is then the earlier one plus what the store learned since, not the store's orders alone.
    """
    if since is not None and since.tzinfo is None:
        raise ValueError(f"since must carry a timezone (e.g. 2026-11-01T00:00:00Z), got {since.isoformat()}")
    url = sa.make_url(database_url)  # ArgumentError names a URL it cannot read
    database = url.database if url.get_backend_name() == "sqlite" else None
    if database not in (None, "", ":memory:") and not Path(str(database)).is_file():
        # Connecting would create an empty database file.
        raise FileNotFoundError(f"no winback database at {database} (from {shown_url(url)})")
    earlier = None
    if with_history is not None:
        earlier_files = history_files_in(with_history)
        earlier = read_history(earlier_files[0], earlier_files[1], stops_path=earlier_files[2])
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(decisions.name):
                raise FileNotFoundError(
                    f"{shown_url(url)} holds no winback tables: a scorer or executor started on it creates them"
                )
        attempts_frame, nudges_frame, dropped, unusable, stops_frame = all_history_frames(engine, since)
    finally:
        engine.dispose()
    left_out = unusable | _unwritable_orders(attempts_frame, nudges_frame)
    carried: set[tuple[str, str]] = set()
    replaced = 0
    if earlier is not None:
        attempts_frame, nudges_frame, stops_frame, carried, replaced = _with_earlier(
            earlier, attempts_frame, nudges_frame, stops_frame
        )
    shared = _shared_ids("order_id", attempts_frame, nudges_frame)
    shared_txns = _shared_ids("txn_id", attempts_frame)
    target = Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    attempts_path, nudges_path = target / "attempts.parquet", target / "nudges.parquet"
    stops_path = target / "stops.parquet"
    staged = (
        target / ".partial-attempts.parquet",
        target / ".partial-nudges.parquet",
        target / ".partial-stops.parquet",
    )
    try:
        for _ in range(_MAX_VALIDATION_ROUNDS):
            keep = (_orders_of(attempts_frame) | _orders_of(nudges_frame)) - set(left_out)
            attempts_frame = _only(attempts_frame, keep).reset_index(drop=True)
            nudges_frame = _only(nudges_frame, keep).reset_index(drop=True)
            stops_frame = _only(stops_frame, keep).reset_index(drop=True)
            try:
                write_attempts(_qualify(_qualify(attempts_frame, shared_txns, "txn_id"), shared), staged[0])
                write_nudges(_qualify(nudges_frame, shared), staged[1])
                write_stops(_qualify(stops_frame, shared), staged[2])
                rows = len(attempts_frame) + len(nudges_frame) + len(stops_frame)
                written = read_history(staged[0], staged[1], stops_path=staged[2], cap=rows + 1)
                break
            except HistoryError as exc:
                at_fault = _orders_at_fault(exc, (attempts_frame, nudges_frame, stops_frame), staged)
                if not at_fault:
                    raise
                left_out.update(at_fault)
        else:
            raise RuntimeError(f"history export did not validate after {_MAX_VALIDATION_ROUNDS} rounds")
        # Together: one after another, a failure between two moves left new files beside the earlier export's.
        moves = list(zip(staged, (attempts_path, nudges_path, stops_path), strict=True))
        move_into_place_together(moves)
        new_warnings = written.warnings
        if earlier is not None:
            frames = (attempts_frame, nudges_frame, stops_frame)
            new_warnings = _warnings_not_said(new_warnings, staged, frames, earlier.warnings, earlier_files, carried)
    finally:
        for path in staged:
            path.unlink(missing_ok=True)
    renamed = sorted(
        f"{m}/{o}: order_id {o!r} is used by several merchants, written as {m + '/' + o!r}"
        for m, o in _orders_of(attempts_frame) | _orders_of(nudges_frame)
        if o in shared
    )
    return ExportSummary(
        attempts_path=attempts_path,
        nudges_path=nudges_path,
        attempts=len(attempts_frame),
        nudges=len(nudges_frame),
        orders=attempts_frame[["merchant_id", "order_id"]].drop_duplicates().shape[0],
        dropped_after_success=dropped,
        left_out_orders=tuple(f"{m}/{o}: {why}" for (m, o), why in sorted(left_out.items())),
        renamed_orders=tuple(renamed),
        stops_path=stops_path,
        stops=len(stops_frame),
        earlier_orders=len(carried),
        earlier_replaced=replaced,
        earlier_warnings=earlier.warnings if earlier is not None else ValidationReport(),
        # Read from the hidden files before they were moved in: the rows are the same, the names are not.
        warnings=new_warnings.naming({str(hidden): str(final) for hidden, final in moves}),
    )
