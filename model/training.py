"""Learning from history: decision points, features, the text model, LightGBM outcome models, calibration.

Every action the history shows after a failure is an example (:func:`decision_points`): a silent retry (label: it
succeeded) or a nudge (label: its link was used and the payment succeeded). Its context is the order's state at
the *decision time*, the previous event: the last failed attempt, or the follow-up of an unanswered nudge sent
after it (``sent_at + NUDGE_FOLLOW_UP_HOURS``). Examples are split by decision time into train / early-stopping /
calibration / holdout; the boosters are fitted with inverse logged propensity weights, the calibrators without (the
chance of success of decisions as the history took them); all are scored on the holdout (:func:`train`).
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.model_selection import GroupShuffleSplit

from model.bundle import Calibrator, ModelBundle, bundle_version
from model.catalog import ErrorCatalog, Normaliser, load_catalog, normalise_request, published_retryable
from model.cellsupport import ARM_INDEX, CELL_SUPPORT_KEY, SLOTS_PER_ARM, cell_keys, cell_rows, timing_offsets
from model.codelevel import CodeLevelsOverTime, code_level_rows
from model.codewatch import KNOWN_CODES_KEY, code_inventory, code_key
from model.features import (
    CANDIDATE_NUM,
    CANDIDATE_STR,
    CONTEXT_NUM,
    CONTEXT_STR,
    TEXT_COLUMNS,
    FeatureSpec,
    catalog_columns,
)
from model.forked import map_in_order
from model.history_request import floor_us, history_request
from model.merchant_config import MerchantConfig
from model.policy import DEFAULT_RETRYABLE_THRESHOLD, verdict_probability
from model.requests import DecisionRequest
from model.rules import Candidate
from model.textmodel import ErrorTexts, TextModel, out_of_fold
from model.vocab import NUDGE_FOLLOW_UP_HOURS, RETRY_STRATEGIES, Action, Channel, Strategy

FloatArray = npt.NDArray[np.float64]
Progress = Callable[[str, float], None]


class BoosterFitter(Protocol):
    """Fits one outcome booster; :func:`train` calls it for the retry and the retarget model.

    The default is the in-process LightGBM fit; ``pipelines.dask_train`` provides one on a Dask cluster. The
    validation arrays (all three, or all None) are for early stopping: 50 rounds without a better weighted
    log loss.
    """

    def __call__(
        self,
        x: npt.NDArray[np.float32],
        y: FloatArray,
        w: FloatArray,
        x_valid: npt.NDArray[np.float32] | None,
        y_valid: FloatArray | None,
        w_valid: FloatArray | None,
        *,
        categorical: list[int],
        names: list[str],
        seed: int,
        max_rounds: int,
        num_threads: int = 1,
    ) -> lgb.Booster: ...


#: Inverse-propensity weights are clipped here (1/propensity <= MAX_IPS_WEIGHT) to bound their variance.
MAX_IPS_WEIGHT = 20.0
#: Below this many calibration examples, Platt scaling replaces isotonic regression.
MIN_ISOTONIC = 1000
#: The never-seen-code check refits on at most this many silent retries (a seeded sample beyond it).
UNSEEN_CODE_MAX_ROWS = 300_000
#: Fewest examples (and of each outcome) a model needs; with fewer the retarget model is left out.
MIN_EXAMPLES = 30
#: Where the retryability threshold may lie, and the decision points it is chosen on: the newest fifth before the
#: holdout (about the calibration slice), at most this many (each costs a decide() call, ~7 ms), and at least
#: ``MIN_EXAMPLES`` the catalog calls retryable and as many it does not (else the default stays).
RETRYABLE_THRESHOLD_RANGE = (0.02, 0.5)
RETRYABLE_THRESHOLD_POINTS = 2000


class InsufficientHistoryError(ValueError):
    """The history is valid but too small to learn from (too few silent retries, or only one outcome)."""


#: Columns of :func:`decision_points` beyond the raw feature columns.
POINT_COLUMNS: tuple[str, ...] = (
    "kind", "merchant_id", "order_id", "customer_id", "decision_time", "action_time", "label", "propensity",
    "attempt_prefix", "nudge_prefix", "txn_id", "nudge_id",
)  # fmt: skip

_EPOCH = pd.Timestamp("1970-01-01", tz="UTC")
_SILENT = tuple(s.value for s in RETRY_STRATEGIES)
_FOLLOW_UP_S = NUDGE_FOLLOW_UP_HOURS * 3600.0
_CATALOG_INPUTS = (
    "connector", "error_code", "error_message", "network_decline_code", "merchant_advice_code", "unified_code",
    "card_network", "payment_method",
)  # fmt: skip
LGB_BASE_PARAMS: dict[str, Any] = {
    "objective": "binary",
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_data_in_leaf": 40,
    "min_sum_hessian_in_leaf": 1.0,
    "feature_fraction": 0.9,
    "lambda_l2": 1.0,
    "max_cat_to_onehot": 8,
    "min_data_per_group": 30,
    "cat_smooth": 10.0,
    "cat_l2": 10.0,
    "max_bin": 255,
    "deterministic": True,
    "force_row_wise": True,
    "verbose": -1,
}


# ----------------------------------------------------------------------------------------------------------------
# History frames -> decision points


def _epoch_seconds(values: pd.Series) -> FloatArray:
    # Microseconds, like the datetimes of a decision request: serving and training then see the same floats.
    stamps = pd.to_datetime(values, utc=True).dt.floor("us")
    return np.asarray((stamps - _EPOCH) / pd.Timedelta(seconds=1), dtype=np.float64)


def _stamps(seconds: FloatArray) -> pd.DatetimeIndex:
    micros = np.round(np.asarray(seconds, dtype=np.float64) * 1e6).astype(np.int64)
    return pd.to_datetime(micros, unit="us", utc=True)


def _pydatetime(value: Any) -> datetime:
    return floor_us(pd.Timestamp(value).tz_convert("UTC")).to_pydatetime()


def _text(values: pd.Series) -> npt.NDArray[np.object_]:
    out = values.astype(object).to_numpy(dtype=object, copy=True)
    out[pd.isna(out)] = None
    return out


def _flag(values: pd.Series) -> FloatArray:
    return np.asarray(pd.to_numeric(values.astype(object), errors="coerce"), dtype=np.float64)


def _require(frame: pd.DataFrame, columns: tuple[str, ...], label: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{label} lacks column(s) needed for training: {', '.join(missing)}")


_ATTEMPT_NEEDS = (
    "merchant_id", "order_id", "attempt_number", "created_at", "amount", "currency", "customer_id",
    "phone_present", "email_present", "customer_country", "payment_method", "payment_method_type", "card_network",
    "issuer", "is_recurring", "is_network_token", "authentication_type", "connector", "strategy", "nudge_id",
    "status", "error_code", "error_message", "network_decline_code", "merchant_advice_code", "unified_code",
    "propensity",
)  # fmt: skip
_NUDGE_NEEDS = ("merchant_id", "order_id", "nudge_id", "sent_at", "channel", "delivered", "clicked_at", "propensity")


@dataclass(frozen=True)
class _Tables:
    attempts: pd.DataFrame  # sorted by order, attempt number; nothing after an order's first success
    nudges: pd.DataFrame  # sorted by order, sent_at; only orders of ``attempts``, nothing after their success
    dropped: dict[str, int]


def _prepare(attempts: pd.DataFrame, nudges: pd.DataFrame) -> _Tables:
    _require(attempts, _ATTEMPT_NEEDS, "attempts")
    _require(nudges, _NUDGE_NEEDS, "nudges")
    a = attempts.loc[:, list(_ATTEMPT_NEEDS) + [c for c in ("txn_id",) if c in attempts.columns]].copy()
    a["ts"] = _epoch_seconds(a["created_at"])
    for name in ("order_id", "strategy", "status", "nudge_id", "connector"):
        a[name] = _text(a[name])
    a = a.sort_values(["order_id", "attempt_number", "ts"], kind="mergesort").reset_index(drop=True)
    pos = a.groupby("order_id", sort=False).cumcount().to_numpy()
    is_success = (a["status"].astype(object) == "success").to_numpy()
    success_pos = pd.Series(np.where(is_success, pos, np.iinfo(np.int64).max)).groupby(a["order_id"].to_numpy())
    first_success = success_pos.transform("min").to_numpy()
    keep = pos <= first_success
    dropped = {"attempts_after_success": int((~keep).sum())}
    a = a.loc[keep].reset_index(drop=True)
    a["pos"] = a.groupby("order_id", sort=False).cumcount().to_numpy()
    a["start"] = np.arange(len(a)) - a["pos"].to_numpy()

    strategy = a["strategy"].astype(object).to_numpy()
    a["cum_silent"] = pd.Series(np.isin(strategy, _SILENT).astype(np.float64)).groupby(a["order_id"]).cumsum()
    for s in _SILENT:
        a[f"cum_tried_{s}"] = pd.Series((strategy == s).astype(np.float64)).groupby(a["order_id"]).cummax()
    first_use = (~a.duplicated(["order_id", "connector"])).astype(np.float64)
    a["cum_connectors"] = first_use.groupby(a["order_id"]).cumsum()
    failed_ts = pd.Series(np.where(a["status"].astype(object) != "success", a["ts"], np.nan))
    a["first_failure_ts"] = failed_ts.groupby(a["order_id"]).cummin()
    a["is_failure"] = (a["status"].astype(object) != "success").to_numpy()

    n = nudges.loc[:, list(_NUDGE_NEEDS)].copy()
    n["ts"] = _epoch_seconds(n["sent_at"])
    for name in ("order_id", "nudge_id", "channel"):
        n[name] = _text(n[name])
    n["clicked_ts"] = _epoch_seconds(n["clicked_at"])
    success_ts = a.loc[a["status"].astype(object) == "success"].set_index("order_id")["ts"]
    known = n["order_id"].isin(a["order_id"]).to_numpy()
    after = n["ts"].to_numpy() > n["order_id"].map(success_ts).to_numpy(dtype=np.float64, na_value=np.inf)
    dropped["nudges_without_order"] = int((~known).sum())
    dropped["nudges_after_success"] = int((known & after).sum())
    n = n.loc[known & ~after].sort_values(["order_id", "ts", "nudge_id"], kind="mergesort").reset_index(drop=True)
    n["pos"] = n.groupby("order_id", sort=False).cumcount().to_numpy()
    n["start"] = np.arange(len(n)) - n["pos"].to_numpy()
    linked = a.loc[a["strategy"].astype(object) == Strategy.RETARGET_LINK.value, ["nudge_id", "status", "ts"]]
    # Answered by its follow-up time, not ever: the follow-up decision happens at sent + NUDGE_FOLLOW_UP_HOURS
    # whatever the customer does with the link afterwards (links outlive it).
    first_answer = linked.groupby("nudge_id", sort=False)["ts"].min()
    answered_ts = n["nudge_id"].map(first_answer).to_numpy(dtype=np.float64, na_value=np.inf)
    n["answered"] = answered_ts <= n["ts"].to_numpy(dtype=np.float64) + _FOLLOW_UP_S
    n["paid"] = n["nudge_id"].isin(linked.loc[linked["status"].astype(object) == "success", "nudge_id"]).to_numpy()
    return _Tables(a, n, dropped)


def _asof(left: pd.DataFrame, on: str, right: pd.DataFrame, right_on: str, columns: list[str]) -> pd.DataFrame:
    """For each row of ``left``: ``columns`` of the last ``right`` row of the same order with right_on <= on."""
    lhs = left[["order_id", on]].copy()
    lhs["_row"] = np.arange(len(lhs))
    lhs = lhs.sort_values(on, kind="mergesort")
    rhs = right[["order_id", right_on, *[c for c in columns if c != right_on]]].sort_values(right_on, kind="mergesort")
    rhs = rhs.rename(columns={right_on: "_key"})
    if right_on in columns:
        rhs[right_on] = rhs["_key"]
    merged = pd.merge_asof(
        lhs, rhs, left_on=on, right_on="_key", by="order_id", direction="backward", allow_exact_matches=True
    )
    return merged.sort_values("_row").reset_index(drop=True)[columns]


def decision_points(attempts: pd.DataFrame, nudges: pd.DataFrame) -> pd.DataFrame:
    """One row per action taken after a failure: silent retries (``kind == "retry"``) and nudges ("retarget").

    Columns: ``POINT_COLUMNS`` (label, propensity, decision time, prefixes of the order's history known then) and
    the raw feature columns of ``model.features`` except the catalog's and the text model's (see
    :func:`raw_columns`). Attempts after an order's first success and nudges after it are not decision points;
    their counts are in ``frame.attrs["dropped"]``, together with nudges sent before any failure.
    """
    tables = _prepare(attempts, nudges)
    a, n = tables.attempts, tables.nudges
    follow = n.loc[~n["answered"].to_numpy(), ["order_id", "ts"]].rename(columns={"ts": "fu_sent"})
    follow["fu_time"] = follow["fu_sent"] + _FOLLOW_UP_S

    # Silent retries: the failure before is the previous attempt of the order.
    retry_rows = np.flatnonzero(np.isin(a["strategy"].astype(object).to_numpy(), _SILENT) & (a["pos"] >= 1))
    retries = pd.DataFrame(
        {
            "order_id": a["order_id"].to_numpy()[retry_rows],
            "action_ts": a["ts"].to_numpy()[retry_rows],
            "fail_ts": a["ts"].to_numpy()[retry_rows - 1],
            "attempt_prefix": a["pos"].to_numpy()[retry_rows],
        }
    )
    # Nudges: the failure before is the order's last failed attempt sent at or before it.
    failures = a.loc[a["is_failure"].to_numpy(), ["order_id", "ts", "pos"]]
    nudge_view = pd.DataFrame({"order_id": n["order_id"].to_numpy(), "action_ts": n["ts"].to_numpy()})
    before = _asof(nudge_view, "action_ts", failures, "ts", ["ts", "pos"])
    has_failure = before["ts"].notna().to_numpy()
    tables.dropped["nudges_before_any_failure"] = int((~has_failure).sum())
    nudge_rows = np.flatnonzero(has_failure)
    nudge_points = pd.DataFrame(
        {
            "order_id": n["order_id"].to_numpy()[nudge_rows],
            "action_ts": n["ts"].to_numpy()[nudge_rows],
            "fail_ts": before["ts"].to_numpy()[nudge_rows],
            "attempt_prefix": before["pos"].to_numpy()[nudge_rows].astype(np.int64) + 1,
        }
    )

    frames = []
    for kind, points in (("retry", retries), ("retarget", nudge_points)):
        fu = _asof(points, "action_ts", follow, "fu_time", ["fu_time", "fu_sent"])
        use_fu = fu["fu_time"].notna().to_numpy() & (fu["fu_sent"].to_numpy() >= points["fail_ts"].to_numpy())
        decision_ts = np.where(use_fu, fu["fu_time"].to_numpy(), points["fail_ts"].to_numpy())
        points = points.assign(decision_ts=decision_ts, kind=kind)
        sent = _asof(points, "decision_ts", n.assign(count=n["pos"] + 1), "ts", ["count"])
        prefix = sent["count"].fillna(0).to_numpy().astype(np.int64)
        if kind == "retarget":
            prefix = np.minimum(prefix, n["pos"].to_numpy()[nudge_rows])  # never the nudge itself
        frames.append(points.assign(nudge_prefix=prefix))
    retries, nudge_points = frames

    def gather(points: pd.DataFrame, action_rows: npt.NDArray[np.intp], kind: str) -> pd.DataFrame:
        order_start = a.groupby("order_id", sort=False)["start"].first()
        context_rows = order_start.reindex(points["order_id"]).to_numpy().astype(np.int64)
        context_rows = context_rows + points["attempt_prefix"].to_numpy().astype(np.int64) - 1
        c = a.iloc[context_rows]
        m = points["nudge_prefix"].to_numpy().astype(np.int64)
        nudge_start = n.groupby("order_id", sort=False)["start"].first().reindex(points["order_id"]).to_numpy()
        has_last = m > 0
        last_rows = np.where(has_last, np.nan_to_num(nudge_start, nan=0).astype(np.int64) + m - 1, 0)
        last = n.iloc[last_rows] if len(n) else None
        decision_ts = points["decision_ts"].to_numpy()

        def last_col(values: np.ndarray, fill: Any) -> np.ndarray:
            out = np.asarray(values, dtype=object if fill is None else np.float64).copy()
            out[~has_last] = fill
            return out

        frame: dict[str, Any] = {
            "kind": kind,
            "merchant_id": _text(c["merchant_id"]),
            "order_id": points["order_id"].to_numpy(),
            "customer_id": _text(c["customer_id"]),
            "decision_time": _stamps(decision_ts),
            "action_time": _stamps(points["action_ts"].to_numpy()),
            "attempt_prefix": points["attempt_prefix"].to_numpy().astype(np.int64),
            "nudge_prefix": m,
        }
        for name in (
            "connector", "error_code", "error_message", "network_decline_code", "merchant_advice_code",
            "unified_code", "card_network", "payment_method", "payment_method_type", "issuer", "currency",
            "customer_country", "authentication_type",
        ):  # fmt: skip
            frame[name] = _text(c[name])
        if last is None:
            frame["last_channel"] = np.full(len(points), None, dtype=object)
            frame["last_nudge_ts"] = np.full(len(points), np.nan)
            frame["last_nudge_clicked"] = np.full(len(points), np.nan)
        else:
            frame["last_channel"] = last_col(_text(last["channel"]), None)
            frame["last_nudge_ts"] = last_col(last["ts"].to_numpy(), np.nan)
            clicked = last["clicked_ts"].to_numpy() <= decision_ts  # NaN compares False
            frame["last_nudge_clicked"] = last_col(clicked.astype(np.float64), np.nan)
        frame["amount"] = c["amount"].to_numpy(dtype=np.float64)
        frame["event_ts"] = decision_ts
        frame["first_failure_ts"] = c["first_failure_ts"].to_numpy()
        for name in ("is_recurring", "is_network_token", "phone_present", "email_present"):
            frame[name] = _flag(c[name])
        frame["n_attempts"] = frame["attempt_prefix"].astype(np.float64)
        frame["n_silent_retries"] = c["cum_silent"].to_numpy()
        for s in _SILENT:
            frame[f"tried_{s}"] = c[f"cum_tried_{s}"].to_numpy()
        frame["n_connectors_tried"] = c["cum_connectors"].to_numpy()
        frame["n_nudges"] = m.astype(np.float64)
        if kind == "retry":
            r = a.iloc[action_rows]
            frame["action"] = Action.RETRY.value
            frame["strategy"] = _text(r["strategy"])
            frame["target_connector"] = _text(r["connector"])
            frame["channel"] = None
            frame["label"] = (r["status"].astype(object) == "success").to_numpy()
            frame["propensity"] = _flag(r["propensity"])
            frame["txn_id"] = _text(r["txn_id"]) if "txn_id" in r.columns else None
            frame["nudge_id"] = None
        else:
            r = n.iloc[action_rows]
            frame["action"] = Action.RETARGET.value
            frame["strategy"] = None
            frame["target_connector"] = None
            frame["channel"] = _text(r["channel"])
            frame["label"] = r["paid"].to_numpy()
            frame["propensity"] = _flag(r["propensity"])
            frame["txn_id"] = None
            frame["nudge_id"] = _text(r["nudge_id"])
        frame["execute_ts"] = points["action_ts"].to_numpy()
        out = pd.DataFrame(frame, index=pd.RangeIndex(len(points)))
        return out

    result = pd.concat(
        [gather(retries, retry_rows, "retry"), gather(nudge_points, nudge_rows, "retarget")], ignore_index=True
    )
    result = result.sort_values(["decision_time", "order_id", "execute_ts"], kind="mergesort").reset_index(drop=True)
    result.attrs["dropped"] = dict(tables.dropped)
    return result


def raw_columns(points: pd.DataFrame, catalog: Normaliser) -> dict[str, np.ndarray]:
    """The decision frame of :func:`decision_points`: raw columns, with the catalog's verdict per distinct error.

    The text model's columns are NaN here; training fills them out-of-fold.
    """
    cols: dict[str, np.ndarray] = {}
    for name in CONTEXT_STR + CANDIDATE_STR:
        if name in points.columns:
            cols[name] = _text(points[name])
    for name in CONTEXT_NUM + CANDIDATE_NUM:
        if name in points.columns:
            cols[name] = points[name].to_numpy(dtype=np.float64)
    inputs = [cols[name] if name in cols else _text(points[name]) for name in _CATALOG_INPUTS]
    verdicts: dict[tuple[Any, ...], dict[str, Any]] = {}
    rows = []
    for key in zip(*inputs, strict=True):
        verdict = verdicts.get(key)
        if verdict is None:
            normalised = catalog.normalise(*key)
            verdict = catalog_columns(normalised, key[4])
            verdicts[key] = verdict
        rows.append(verdict)
    n = len(points)
    cols["error_class"] = np.array([r["error_class"] for r in rows], dtype=object)
    cols["visa_category"] = np.array([r["visa_category"] for r in rows], dtype=object)
    cols["known_code"] = np.array([r["known_code"] for r in rows], dtype=np.float64).reshape(n)
    cols["mac_never_retry"] = np.array([r["mac_never_retry"] for r in rows], dtype=np.float64).reshape(n)
    for name in TEXT_COLUMNS:
        cols[name] = np.full(n, np.nan)
    return cols


def request_at(
    attempts: pd.DataFrame, nudges: pd.DataFrame, point: Mapping[str, Any]
) -> tuple[DecisionRequest, Candidate]:
    """The decision request a caller would have sent at a decision point, and the action the history shows.

    ``point`` is a row of :func:`decision_points` (e.g. ``points.iloc[i]``); used to replay history through the
    scorer and to prove that training and serving build the same features. For many points of one history,
    `OrderRows` reads the frames once.
    """
    order = point["order_id"]
    rows = OrderRows(attempts.loc[attempts["order_id"] == order], nudges.loc[nudges["order_id"] == order])
    return rows.request_at(point)


class OrderRows:
    """The rows of each order of a history as `request_at` reads them: its attempts by attempt number, its nudges
    by time (then nudge id), each row a ``to_dict("records")`` mapping. Read once, so that replaying many decision
    points does not filter, sort and convert the frames again for each (a pandas round of ~10 ms a point)."""

    def __init__(self, attempts: pd.DataFrame, nudges: pd.DataFrame) -> None:
        # A stable sort of the whole frame keeps each order's rows in the order a stable sort of its own rows gives.
        ordered = attempts.sort_values("attempt_number", kind="mergesort")
        sent = nudges.assign(_ts=pd.to_datetime(nudges["sent_at"], utc=True))
        sent = sent.sort_values(["_ts", "nudge_id"], kind="mergesort")
        self.attempts = _rows_by_order(ordered)
        self.nudges = _rows_by_order(sent)

    def request_at(self, point: Mapping[str, Any]) -> tuple[DecisionRequest, Candidate]:
        """`request_at` of ``point``, a decision point of one of the orders."""
        order = str(point["order_id"])
        rows = self.attempts.get(order, [])[: int(point["attempt_prefix"])]
        sent = self.nudges.get(order, [])[: int(point["nudge_prefix"])]
        request = history_request(point["decision_time"], rows[-1], rows, sent)
        execute_at = _pydatetime(point["action_time"])
        if point["kind"] == "retry":
            candidate = Candidate(
                Action.RETRY,
                execute_at,
                strategy=Strategy(str(point["strategy"])),
                connector=str(point["target_connector"]),
            )
        else:
            candidate = Candidate(Action.RETARGET, execute_at, channel=Channel(str(point["channel"])))
        return request, candidate


def _rows_by_order(frame: pd.DataFrame) -> dict[str, list[dict[str, Any]]]:
    """The rows of ``frame`` as records, by order, in the frame's order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for record in frame.to_dict("records"):
        out.setdefault(str(record["order_id"]), []).append({str(k): v for k, v in record.items()})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Weights, metrics


def ips_weights(propensity: npt.ArrayLike, *, max_weight: float = MAX_IPS_WEIGHT) -> FloatArray:
    """Inverse-propensity weights, clipped at ``max_weight`` and normalised to mean 1.

    A missing (or non-positive) propensity means the logging policy is unknown: that example gets weight 1
    before normalisation, i.e. it counts as if the action had been certain.
    """
    p = np.asarray(propensity, dtype=np.float64)
    known = np.isfinite(p) & (p > 0.0)
    raw: FloatArray = np.ones(len(p), dtype=np.float64)
    raw[known] = np.minimum(1.0 / np.minimum(p[known], 1.0), max_weight)
    if len(raw) == 0:
        return raw
    normalised: FloatArray = raw / raw.mean()
    return normalised


def expected_calibration_error(labels: npt.ArrayLike, probabilities: npt.ArrayLike, *, bins: int = 10) -> float:
    """ECE over ``bins`` equal-width probability bins: sum of |mean label - mean prediction| x bin share."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    if len(y) == 0:
        return math.nan
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.mean() * abs(y[mask].mean() - p[mask].mean())
    return float(total)


def binary_metrics(labels: npt.ArrayLike, probabilities: npt.ArrayLike) -> dict[str, float]:
    """AUC (NaN with a single outcome), log loss, ECE (10 bins), count, base rate and mean prediction."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-6, 1 - 1e-6)
    both = len(np.unique(y)) == 2
    return {
        "n": float(len(y)),
        "base_rate": float(y.mean()) if len(y) else math.nan,
        "mean_prediction": float(p.mean()) if len(p) else math.nan,
        "auc": float(roc_auc_score(y, p)) if both else math.nan,
        "log_loss": float(log_loss(y, p, labels=[0.0, 1.0])) if len(y) else math.nan,
        "ece": expected_calibration_error(y, p),
    }


# ----------------------------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class TrainingResult:
    """A trained bundle, its holdout metrics (flat, JSON-able) and tables (per error class, per split)."""

    bundle: ModelBundle
    metrics: dict[str, float]
    tables: dict[str, pd.DataFrame]


def _error_texts(
    cols: Mapping[str, np.ndarray], labels: npt.NDArray[np.bool_], rows: npt.NDArray[np.intp]
) -> tuple[ErrorTexts, npt.NDArray[np.intp]]:
    """Distinct (connector, code, message) among ``rows`` with retry outcomes, and each row's index into it."""
    texts, table = _merge_error_texts([_error_text_counts(cols, labels, rows)])
    at = {key: i for i, key in enumerate(_table_keys(table))}
    index = np.fromiter((at[key] for key in _text_keys(cols, rows)), dtype=np.intp, count=len(rows))
    return texts, index


def _set_text(cols: dict[str, np.ndarray], rows: npt.NDArray[np.intp], values: Mapping[str, FloatArray]) -> None:
    for name in TEXT_COLUMNS:
        cols[name][rows] = values[name]


def _fit_booster(
    x: npt.NDArray[np.float32],
    y: FloatArray,
    w: FloatArray,
    x_valid: npt.NDArray[np.float32] | None,
    y_valid: FloatArray | None,
    w_valid: FloatArray | None,
    *,
    categorical: list[int],
    names: list[str],
    seed: int,
    max_rounds: int,
    num_threads: int = 1,
) -> lgb.Booster:
    params = {**LGB_BASE_PARAMS, "seed": seed, "num_threads": num_threads}
    train_set = lgb.Dataset(
        x, label=y, weight=w, categorical_feature=categorical, feature_name=names, free_raw_data=False
    )
    valid_sets = []
    callbacks: list[Callable[..., Any]] = []
    if x_valid is not None and y_valid is not None and len(np.unique(y_valid)) == 2:
        valid_sets.append(lgb.Dataset(x_valid, label=y_valid, weight=w_valid, reference=train_set))
        callbacks.append(lgb.early_stopping(stopping_rounds=50, verbose=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # lightgbm warns about categorical_feature overrides
        booster = lgb.train(params, train_set, num_boost_round=max_rounds, valid_sets=valid_sets, callbacks=callbacks)
    if valid_sets and booster.best_iteration > 0:
        booster.model_from_string(booster.model_to_string(num_iteration=booster.best_iteration))
    return booster


def _per_class_table(kind: str, classes: np.ndarray, y: FloatArray, p: FloatArray) -> pd.DataFrame:
    rows = []
    for name in sorted({str(c) for c in classes}):
        mask = classes == name
        rows.append({"model": kind, "error_class": name, **binary_metrics(y[mask], p[mask])})
    return pd.DataFrame(rows)


def _split_masks(decision_ts: FloatArray, holdout: float) -> dict[str, npt.NDArray[np.bool_]]:
    """Train / early-stopping / calibration / holdout by decision time (quantile cut points over all points).
    ``holdout`` 0: no holdout, the calibration slice runs to the newest point (a final fit on the whole history)."""
    rest = 1.0 - holdout
    cuts = np.quantile(decision_ts, [rest * 0.75, rest * 0.875, rest]) if len(decision_ts) else [0.0, 0.0, 0.0]
    newest = decision_ts >= cuts[2] if holdout > 0.0 else np.zeros(len(decision_ts), dtype=bool)
    return {
        "train": decision_ts < cuts[0],
        "valid": (decision_ts >= cuts[0]) & (decision_ts < cuts[1]),
        "calibration": (decision_ts >= cuts[1]) & ~newest,
        "holdout": newest,
    }


def grouped_code_split(
    codes: np.ndarray, *, seed: int, test_size: float = 0.25
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]] | None:
    """Row positions (train, test) such that no error code appears on both sides, on any connector; None if < 4.

    Grouped by the code alone: the boosters' ``error_code`` feature does not depend on the connector, so a code
    the training side saw on another connector (the same made-up code reaches every connector) is not never-seen.
    """
    groups = pd.factorize(pd.Series(codes, dtype=object))[0]
    if len(set(groups.tolist())) < 4:
        return None
    splitter = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
    train_part, test_part = next(splitter.split(np.zeros(len(groups)), groups=groups))
    return train_part.astype(np.intp), test_part.astype(np.intp)


def unseen_code_auc(
    cols: Mapping[str, np.ndarray],
    labels: npt.NDArray[np.bool_],
    retry_rows: npt.NDArray[np.intp],
    *,
    seed: int,
    test_size: float = 0.25,
    rounds: int = 150,
    num_threads: int = 1,
) -> dict[str, float]:
    """Retry AUC on error codes never seen in training, with and without the text model's features.

    Splits retry examples grouped by error code (:func:`grouped_code_split`) so test codes are absent from
    training on every connector, refits the vocabularies and the text model on the training codes only, and trains
    a fixed number of boosting rounds.
    """
    split = grouped_code_split(cols["error_code"][retry_rows], seed=seed, test_size=test_size)
    if split is None:
        return {"unseen_code_auc_with_text": math.nan, "unseen_code_auc_without_text": math.nan}
    train_part, test_part = split
    train_rows, test_rows = retry_rows[train_part], retry_rows[test_part]
    local = {k: v.copy() for k, v in cols.items()}
    texts, index = _error_texts(local, labels, train_rows)
    _set_text(local, train_rows, {k: v[index] for k, v in out_of_fold(texts, seed=seed).items()})
    model = TextModel.fit(texts, seed=seed)
    _set_text(
        local,
        test_rows,
        model.predict(list(local["connector"][test_rows]), list(local["error_code"][test_rows]),
                      list(local["error_message"][test_rows])),
    )  # fmt: skip
    out: dict[str, float] = {"unseen_code_test_rows": float(len(test_rows))}
    y = labels.astype(np.float64)
    for suffix, exclude in (("with_text", ()), ("without_text", TEXT_COLUMNS)):
        train_cols = {k: v[train_rows] for k, v in local.items()}
        spec = FeatureSpec.fit(train_cols, exclude=exclude)
        x = spec.transform(train_cols)
        booster = _fit_booster(
            x, y[train_rows], np.ones(len(train_rows)), None, None, None,
            categorical=spec.categorical_indices, names=spec.columns, seed=seed, max_rounds=rounds,
            num_threads=num_threads,
        )  # fmt: skip
        p = booster.predict(spec.transform({k: v[test_rows] for k, v in local.items()}), num_threads=num_threads)
        ys = y[test_rows]
        out[f"unseen_code_auc_{suffix}"] = float(roc_auc_score(ys, p)) if len(np.unique(ys)) == 2 else math.nan
    return out


class _RawColumns:
    """The raw decision columns of each partition: kept in memory for one, else in Parquet files in a folder."""

    def __init__(self, folder: Path | None) -> None:
        self._folder = folder
        self._memory: list[dict[str, np.ndarray]] = []
        self._files: list[Path] = []

    @staticmethod
    def write(folder: Path, index: int, cols: Mapping[str, np.ndarray]) -> Path:
        """Write one partition's columns to ``folder`` (also from a worker process); returns the file."""
        path = folder / f"columns-{index:05d}.parquet"
        arrays = {name: pa.array(values, from_pandas=values.dtype == object) for name, values in cols.items()}
        pq.write_table(pa.table(arrays), path)
        return path

    def add(self, cols: dict[str, np.ndarray]) -> None:
        if self._folder is None:
            self._memory.append(cols)
        else:
            self._files.append(self.write(self._folder, len(self), cols))

    def adopt(self, path: Path) -> None:
        """Take a file :meth:`write` made as the next partition."""
        self._files.append(path)

    def __len__(self) -> int:
        return len(self._memory) + len(self._files)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if self._folder is None:
            return self._memory[index]
        table = pq.read_table(self._files[index])
        out: dict[str, np.ndarray] = {}
        for name, column in zip(table.column_names, table.columns, strict=True):
            values = column.to_numpy(zero_copy_only=False)
            out[name] = values.astype(object) if not pa.types.is_floating(column.type) else values.astype(np.float64)
        return out


def _error_text_counts(
    cols: Mapping[str, np.ndarray], labels: npt.NDArray[np.bool_], rows: npt.NDArray[np.intp]
) -> pd.DataFrame:
    """Per distinct (connector, code, message) among ``rows``: the catalog class, retry successes and trials."""
    frame = pd.DataFrame(
        {
            "connector": cols["connector"][rows],
            "code": cols["error_code"][rows],
            "message": cols["error_message"][rows],
            "cls": cols["error_class"][rows],
            "retry": (cols["action"][rows] == Action.RETRY.value).astype(np.float64),
            "points": np.ones(len(rows)),
        }
    )
    frame["success"] = labels[rows].astype(np.float64) * frame["retry"]
    # Per class too: the same error text can be classed differently (network codes, card network); the table
    # keeps its most frequent class, whatever the order or partitioning of the rows.
    return (
        frame.groupby(["connector", "code", "message", "cls"], dropna=False, sort=True)
        .agg(success=("success", "sum"), trials=("retry", "sum"), points=("points", "sum"))
        .reset_index()
    )


def _merge_error_texts(parts: list[pd.DataFrame]) -> tuple[ErrorTexts, pd.DataFrame]:
    """The text model's table from per-partition counts, and that table as a frame (row i = ErrorTexts row i)."""
    keys = ["connector", "code", "message"]
    by_class = (
        pd.concat(parts, ignore_index=True)
        .groupby([*keys, "cls"], dropna=False, sort=True)[["success", "trials", "points"]]
        .sum()
        .reset_index()
    )
    most = by_class.sort_values("points", ascending=False, kind="mergesort").drop_duplicates(keys)
    table = (
        by_class.groupby(keys, dropna=False, sort=True)[["success", "trials", "points"]]
        .sum()
        .reset_index()
        .merge(most[[*keys, "cls"]], on=keys, how="left")
    )

    def opt(values: pd.Series) -> list[str | None]:
        return [v if isinstance(v, str) else None for v in values.astype(object)]

    texts = ErrorTexts(
        opt(table["connector"]),
        opt(table["code"]),
        opt(table["message"]),
        table["success"].to_numpy(dtype=np.float64),
        table["trials"].to_numpy(dtype=np.float64),
        [None if k == "unknown" else k for k in opt(table["cls"])],
    )
    return texts, table


_TEXT_KEY_COLUMNS = {"connector": "connector", "error_code": "code", "error_message": "message"}


def _text_keys(cols: Mapping[str, np.ndarray], rows: npt.NDArray[np.intp]) -> list[tuple[Any, Any, Any]]:
    def key(value: Any) -> Any:
        return value if isinstance(value, str) else None

    return [
        (key(c), key(k), key(m))
        for c, k, m in zip(cols["connector"][rows], cols["error_code"][rows], cols["error_message"][rows], strict=True)
    ]


def _table_keys(table: pd.DataFrame) -> list[tuple[Any, Any, Any]]:
    """The (connector, code, message) of each row of a :func:`_merge_error_texts` frame."""
    cols = {name: table[column].to_numpy(dtype=object) for name, column in _TEXT_KEY_COLUMNS.items()}
    return _text_keys(cols, np.arange(len(table)))


def _predict_text(model: TextModel, keys: list[tuple[Any, Any, Any]]) -> dict[str, FloatArray]:
    """``model.predict`` for rows given by their (connector, code, message), each distinct error predicted once."""
    distinct = list(dict.fromkeys(keys))
    at = {k: i for i, k in enumerate(distinct)}
    index = np.fromiter((at[k] for k in keys), dtype=np.intp, count=len(keys))
    values = model.predict([k[0] for k in distinct], [k[1] for k in distinct], [k[2] for k in distinct])
    return {name: column[index] for name, column in values.items()}


def _inventory(table: pd.DataFrame) -> list[list[Any]]:
    """``code_inventory`` of the fitted rows, from the merged per-error counts (one row per distinct error)."""
    return code_inventory(
        table["connector"].astype(object).to_numpy(),
        table["code"].astype(object).to_numpy(),
        table["message"].astype(object).to_numpy(),
        np.ones(len(table), dtype=bool),
        np.zeros(len(table), dtype=bool),
        weights=(table["trials"].to_numpy(), table["success"].to_numpy(), table["points"].to_numpy()),
    )


def code_levels(
    bundle: ModelBundle,
    partitions: Partitions | Sequence[HistoryFrames],
    catalog: Normaliser | None = None,
    *,
    prior_strength: float = 30.0,
    before: datetime | None = None,
) -> list[list[Any]]:
    """``bundle``'s code levels over every silent retry of the history (model.codelevel): per (connector, error
    code) of the failure, the retries, their successes and the sum of the P(success) decide() serves for them:
    scored as the bundle scores a request (its feature spec, its text model's features of the error, its retry
    booster and calibrator), then weighed against the rules-only prior of its cell by the bundle's cell support
    with ``prior_strength`` (``PolicyConfig.prior_strength``; 0: not at all), as decide() does before it applies
    the code levels. For the version ``train`` registers (judged boosters, text model refitted on the whole
    history) these are the predictions it serves. With ``before``, only the retries decided before it count (the
    fit the promotion gate judges on a holdout from ``before`` on: its levels must not have seen the holdout)."""
    evidence = _retry_evidence(bundle, partitions, catalog, prior_strength)
    if evidence is None:
        return []
    return evidence.rows(np.ones(len(evidence.labels), dtype=bool) if before is None else evidence.before(before))


def judged_code_levels(
    bundle: ModelBundle,
    partitions: Partitions | Sequence[HistoryFrames],
    catalog: Normaliser | None = None,
    *,
    before: datetime,
    prior_strength: float = 30.0,
) -> tuple[list[list[Any]], CodeLevelsOverTime]:
    """What the promotion gate judges ``bundle`` with, from one scoring of the history's silent retries: its code
    levels (``code_levels``) over the retries decided before ``before`` (the holdout's start), which it carries, and
    the same as they stood at any moment (`model.codelevel.CodeLevelsOverTime`: the retries carried out before it,
    whose outcomes were known then), which the gate judges it with on the holdout (pipelines.train.ForwardLevelsScorer):
    a code whose retries all fall in the holdout counts for the retrain that learned it, at each point with what was
    known of the code before it, never with that point's outcome or a later one."""
    evidence = _retry_evidence(bundle, partitions, catalog, prior_strength)
    if evidence is None:
        return [], CodeLevelsOverTime([], np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0))
    keys = [code_key(connector, code) for connector, code in zip(evidence.connectors, evidence.codes, strict=True)]
    over_time = CodeLevelsOverTime(keys, evidence.known_ns, evidence.labels, evidence.predicted)
    return evidence.rows(evidence.before(before)), over_time


@dataclass(frozen=True)
class _RetryEvidence:
    """Every silent retry of a history: its failure's connector and code, its outcome, the P(success) served for it
    (before code levels), when it was decided and when it was carried out (its outcome known; ns since the epoch)."""

    connectors: np.ndarray
    codes: np.ndarray
    labels: FloatArray
    predicted: FloatArray
    decided: pd.Series
    known_ns: npt.NDArray[np.int64]

    def before(self, moment: datetime) -> npt.NDArray[np.bool_]:
        """Which retries were decided before ``moment``."""
        return (self.decided < pd.Timestamp(moment)).to_numpy(dtype=bool)

    def rows(self, keep: npt.NDArray[np.bool_]) -> list[list[Any]]:
        """The code levels (``code_level_rows``) of the retries ``keep`` selects."""
        if not keep.any():
            return []
        return code_level_rows(self.connectors[keep], self.codes[keep], self.labels[keep], self.predicted[keep])


def _retry_evidence(
    bundle: ModelBundle,
    partitions: Partitions | Sequence[HistoryFrames],
    catalog: Normaliser | None,
    prior_strength: float,
) -> _RetryEvidence | None:
    """The silent retries of the history, scored as ``code_levels`` says; None when it has none."""
    from model.policy import load_priors

    normaliser: Normaliser = load_catalog() if catalog is None else catalog
    connectors: list[np.ndarray] = []
    codes: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    predicted: list[FloatArray] = []
    decided: list[pd.Series] = []
    known: list[npt.NDArray[np.int64]] = []
    for frames in partitions:
        points = decision_points(frames.attempts, frames.nudges)
        retry = (points["kind"] == "retry").to_numpy(dtype=bool) if len(points) else np.zeros(0, dtype=bool)
        if not retry.any():
            continue
        points = points[retry].reset_index(drop=True)
        cols = raw_columns(points, normaliser)
        rows = np.arange(len(points))
        _set_text(cols, rows, _predict_text(bundle.text_model, _text_keys(cols, rows)))
        raw = np.asarray(bundle.retry_booster.predict(bundle.spec.transform(cols)), dtype=np.float64)
        p = np.clip(bundle.retry_calibrator(raw), 0.0, 1.0)
        if prior_strength > 0.0:
            p = _served_retry_level(bundle, cols, p, prior_strength, load_priors())
        connectors.append(cols["connector"])
        codes.append(cols["error_code"])
        labels.append(points["label"].to_numpy(dtype=np.float64))
        predicted.append(p)
        decided.append(points["decision_time"])
        known.append(_epoch_ns(points["action_time"]))
    if not labels:
        return None
    return _RetryEvidence(
        np.concatenate(connectors),
        np.concatenate(codes),
        np.concatenate(labels),
        np.concatenate(predicted),
        pd.concat(decided, ignore_index=True),
        np.concatenate(known),
    )


def _epoch_ns(stamps: pd.Series) -> npt.NDArray[np.int64]:
    """Timestamps (naive ones read as UTC) as nanoseconds since the epoch."""
    moments = pd.to_datetime(stamps, utc=True)
    return np.asarray(moments.astype("int64"), dtype=np.int64)


def _served_retry_level(
    bundle: ModelBundle, cols: Mapping[str, np.ndarray], p: FloatArray, strength: float, priors: Any
) -> FloatArray:
    """The model's P(success) ``p`` of silent retries (rows of ``cols``) as decide() serves it before the code
    levels: weighed against its cell's rules-only prior by the bundle's cell support (``shrink_to_prior``). The
    prior's timing counts from the decision point, the cell's from the order's first failure, as in decide()."""
    from model.policy import cell_factors, shrink_to_prior

    delay = np.nan_to_num(cols["execute_ts"] - cols["event_ts"], nan=0.0)
    since = np.maximum(np.nan_to_num(cols["event_ts"] - cols["first_failure_ts"], nan=0.0), 0.0)
    arm = np.array([ARM_INDEX.get(s, -1) if isinstance(s, str) else -1 for s in cols["strategy"]], dtype=np.intp)
    nudges = np.nan_to_num(np.asarray(cols["n_nudges"], dtype=np.float64), nan=0.0).astype(np.int64)
    classes = np.array([c if isinstance(c, str) else "unknown" for c in cols["error_class"]], dtype=object)
    out = p.copy()
    for cls in np.unique(classes).tolist():
        table = bundle.cell_table(cls)
        if table is None:
            return out  # a bundle without cells: decide() serves the model as it is
        for count in np.unique(nudges[classes == cls]).tolist():
            rows = np.flatnonzero((classes == cls) & (nudges == count) & (arm >= 0))
            if not len(rows):
                continue
            slots = priors.prior_slots(cls, int(count))
            ratio, weight = cell_factors(table, slots, strength)
            base = SLOTS_PER_ARM * arm[rows]
            prior = slots[base + timing_offsets(delay[rows])]
            cells = base + timing_offsets(delay[rows] + since[rows])
            out[rows] = np.clip(shrink_to_prior(p[rows], prior, ratio[cells], weight[cells]), 0.0, 1.0)
    return out


def choose_retryable_threshold(probabilities: npt.ArrayLike, retryable: npt.ArrayLike) -> tuple[float, float] | None:
    """The threshold on decide()'s verdict P(success) (``verdict_probability``) whose verdicts agree best, by
    balanced accuracy, with the catalog's published retryability ``retryable`` of the same failures
    (``model.catalog.published_retryable``), within ``RETRYABLE_THRESHOLD_RANGE``. Returns (threshold, its
    balanced accuracy), None without ``MIN_EXAMPLES`` failures on each side.

    Of the thresholds within one standard error of the best agreement, which the points cannot tell apart, the
    lowest: a verdict that wrongly says "not retryable" costs a recovery, one that wrongly says "retryable" a
    retry's fee. (The argmax alone sat on a narrow peak: on the seed-2 history it chose 0.18, where the holdout's
    agreement was no better than 0.10's and 0.20 fell off.) Why not the outcome of each retry (Youden's J on
    per-attempt success, as before): the verdict says whether an *error* is worth any silent retry, and a code
    whose retries recover 10-30% is; README, "How a decision is made", has the measurement."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(retryable, dtype=bool)
    n_yes, n_no = int(y.sum()), int((~y).sum())
    if min(n_yes, n_no) < MIN_EXAMPLES:
        return None
    low, high = RETRYABLE_THRESHOLD_RANGE
    candidates = np.unique(np.clip(p, low, high))
    called = 1.0 - np.searchsorted(np.sort(p[y]), candidates, side="left") / n_yes
    refused = np.searchsorted(np.sort(p[~y]), candidates, side="left") / n_no
    balanced = 0.5 * (called + refused)
    best = int(np.argmax(balanced))
    error = 0.5 * math.sqrt(called[best] * (1.0 - called[best]) / n_yes + refused[best] * (1.0 - refused[best]) / n_no)
    chosen = int(np.flatnonzero(balanced >= balanced[best] - error)[0])
    # Any threshold above the candidate below gives the same verdicts: the middle, so where the catalog's two
    # sides separate cleanly the cut lies between them.
    below = candidates[chosen - 1] if chosen > 0 else candidates[chosen]
    return float((below + candidates[chosen]) / 2), float(balanced[chosen])


def fit_retryable_threshold(
    bundle: ModelBundle,
    partitions: Partitions | Sequence[HistoryFrames],
    merchants: Mapping[str, MerchantConfig],
    *,
    before: datetime | None = None,
    catalog: ErrorCatalog | None = None,
    max_points: int = RETRYABLE_THRESHOLD_POINTS,
    seed: int = 0,
) -> dict[str, float]:
    """Set ``bundle.retryable_threshold`` by :func:`choose_retryable_threshold` over decision points of the first
    partition decided before ``before`` (the holdout's start), each replayed through decide() with the bundle as
    served (its code levels included), and return what was measured: the threshold, its balanced accuracy, that
    of ``DEFAULT_RETRYABLE_THRESHOLD`` and the points used. Without enough points it keeps the default. The
    caller gives the bundle the version that goes with its threshold."""
    errors = load_catalog() if catalog is None else catalog
    frames = partitions[0]
    points = decision_points(frames.attempts, frames.nudges)
    if before is not None and len(points):
        points = points[(points["decision_time"] < pd.Timestamp(before)).to_numpy(dtype=bool)]
    points = points[points["merchant_id"].astype(str).isin(list(merchants))]
    if len(points):
        points = points[(points["decision_time"] >= points["decision_time"].quantile(0.8)).to_numpy(dtype=bool)]
        chosen = np.random.default_rng(seed).permutation(len(points))[:max_points]
        points = points.iloc[np.sort(chosen)]
    orders = set(points["order_id"])
    rows = OrderRows(
        frames.attempts.loc[frames.attempts["order_id"].isin(orders)],
        frames.nudges.loc[frames.nudges["order_id"].isin(orders)],
    )
    scores: list[float] = []
    labels: list[bool] = []
    for record in points.to_dict("records"):
        point = {str(key): value for key, value in record.items()}
        request, _ = rows.request_at(point)
        published = published_retryable(normalise_request(errors, request))
        if published is not None:
            labels.append(published)
            scores.append(verdict_probability(request, merchants[request.merchant_id], bundle, catalog=errors))
    chosen_threshold = choose_retryable_threshold(scores, labels)
    bundle.retryable_threshold = DEFAULT_RETRYABLE_THRESHOLD if chosen_threshold is None else chosen_threshold[0]
    y, p = np.asarray(labels, dtype=bool), np.asarray(scores, dtype=np.float64)
    measured = {
        "retryable_threshold": bundle.retryable_threshold,
        "retryable_threshold_points": float(len(labels)),
        "retryable_threshold_balanced_accuracy": math.nan if chosen_threshold is None else chosen_threshold[1],
        # The same points judged at the rules-only default, for comparison.
        "retryable_threshold_balanced_accuracy_default": float(
            0.5 * ((p[y] >= DEFAULT_RETRYABLE_THRESHOLD).mean() + (p[~y] < DEFAULT_RETRYABLE_THRESHOLD).mean())
        )
        if y.any() and (~y).any()
        else math.nan,
    }
    bundle.metrics.update(measured)
    return measured


@dataclass(frozen=True)
class _PartitionPoints:
    """What training keeps in memory of one partition's decision points (the raw columns go to a file)."""

    labels: npt.NDArray[np.bool_]
    propensity: FloatArray
    is_retry: npt.NDArray[np.bool_]
    event_ts: FloatArray
    order_ids: pa.Array
    execute_ts: FloatArray
    dropped: dict[str, int]


def _points_of(frames: HistoryFrames, normaliser: Normaliser) -> tuple[_PartitionPoints, dict[str, np.ndarray] | None]:
    points = decision_points(frames.attempts, frames.nudges)
    dropped = {str(k): int(v) for k, v in points.attrs["dropped"].items()}
    if len(points) == 0:
        empty = np.zeros(0)
        return _PartitionPoints(empty.astype(bool), empty, empty.astype(bool), empty, pa.array([], pa.string()),
                                empty, dropped), None  # fmt: skip
    cols = raw_columns(points, normaliser)
    summary = _PartitionPoints(
        labels=points["label"].to_numpy(dtype=bool),
        propensity=points["propensity"].to_numpy(dtype=np.float64),
        is_retry=(points["kind"] == "retry").to_numpy(),
        event_ts=cols["event_ts"],
        order_ids=pa.array(points["order_id"].to_numpy(dtype=object), type=pa.string()),
        execute_ts=points["execute_ts"].to_numpy(dtype=np.float64),
        dropped=dropped,
    )
    return summary, cols


#: What forked workers of :func:`_decision_points_of` inherit (partitions, catalog, spill folder).
_FORKED: dict[str, Any] = {}


def _points_in_worker(index: int) -> tuple[_PartitionPoints, Path | None]:
    summary, cols = _points_of(_FORKED["partitions"][index], _FORKED["normaliser"])
    return summary, None if cols is None else _RawColumns.write(_FORKED["folder"], index, cols)


def _decision_points_of(
    partitions: Partitions | Sequence[HistoryFrames],
    normaliser: Normaliser,
    folder: Path,
    workers: int,
) -> Iterator[tuple[_PartitionPoints, dict[str, np.ndarray] | Path | None]]:
    """Each partition's decision points and raw columns, in partition order; ``workers`` processes build them
    side by side when there are several partitions (each writes its columns to ``folder`` itself)."""
    if workers <= 1 or len(partitions) <= 1:
        for frames in partitions:
            yield _points_of(frames, normaliser)
        return
    _FORKED.update(partitions=partitions, normaliser=normaliser, folder=folder)
    try:
        yield from map_in_order(_points_in_worker, len(partitions), workers)
    finally:
        _FORKED.clear()


def _partition_rows(index: int) -> tuple[dict[str, np.ndarray], slice]:
    start = int(_FORKED["offsets"][index])
    return _FORKED["store"][index], slice(start, int(_FORKED["offsets"][index + 1]))


def _text_and_tokens(index: int) -> tuple[pd.DataFrame, dict[str, Counter[str]]]:
    """One partition's share of the text model's table (fitted rows) and of the vocabularies (training rows)."""
    cols, local = _partition_rows(index)
    counts = _error_text_counts(cols, _FORKED["labels"][local], np.flatnonzero(_FORKED["fitted"][local]))
    train_rows = _FORKED["masks"]["train"][local]
    return counts, FeatureSpec.count_tokens({name: values[train_rows] for name, values in cols.items()})


@dataclass
class _PartitionFeatures:
    """One partition's model matrix, cut by (kind, split), and what the metrics and the unseen-code check need."""

    pieces: dict[tuple[str, str], npt.NDArray[np.float32]]
    cells: dict[tuple[str, str], npt.NDArray[np.object_]]  # each row's cell (model.cellsupport), as ``pieces``
    holdout_classes: dict[str, np.ndarray]
    unseen_cols: dict[str, np.ndarray]
    unseen_labels: npt.NDArray[np.bool_]
    unseen_rank: npt.NDArray[np.int64]


def _features_of(index: int) -> _PartitionFeatures:
    state = _FORKED
    cols, local = _partition_rows(index)
    masks, is_retry = state["masks"], state["is_retry"]
    fit_rows = np.flatnonzero(state["fitted"][local])
    text_row = state["text_row"]
    index_of = np.fromiter((text_row[k] for k in _text_keys(cols, fit_rows)), dtype=np.intp, count=len(fit_rows))
    _set_text(cols, fit_rows, {name: values[index_of] for name, values in state["oof"].items()})
    holdout_rows = np.flatnonzero(masks["holdout"][local])
    _set_text(cols, holdout_rows, _predict_text(state["text_model"], _text_keys(cols, holdout_rows)))
    matrix = state["spec"].transform(cols)
    pieces = {key: matrix[mask[local]] for key, mask in state["groups"].items()}
    # The timing of a cell counts from the order's first failure (model.cellsupport).
    first = np.where(np.isfinite(cols["first_failure_ts"]), cols["first_failure_ts"], cols["event_ts"])
    keys = cell_keys(
        cols["error_class"], cols["action"], cols["strategy"], cols["channel"], (cols["execute_ts"] - first) / 3600.0
    )
    cells = {key: keys[mask[local]] for key, mask in state["groups"].items()}
    holdout_classes = {
        kind: cols["error_class"][(kind_mask & masks["holdout"])[local]]
        for kind, kind_mask in (("retry", is_retry), ("retarget", ~is_retry))
    }
    retry_here = np.flatnonzero(is_retry[local])
    rate = state["sample_rate"]
    if rate < 1.0:  # a seeded sample per partition (none when the check is off)
        retry_here = retry_here[np.random.default_rng([state["seed"], index]).random(len(retry_here)) < rate]
    rank = state["rank"]
    return _PartitionFeatures(
        pieces=pieces,
        cells=cells,
        holdout_classes=holdout_classes,
        unseen_cols={name: values[retry_here] for name, values in cols.items()},
        unseen_labels=state["labels"][local][retry_here],
        unseen_rank=rank[local][retry_here] if len(rank) else retry_here.astype(np.int64),
    )


def train(
    attempts: pd.DataFrame,
    nudges: pd.DataFrame,
    **options: Any,
) -> TrainingResult:
    """Train the retry and retarget outcome models on a history (CONTRACT.md section 3 frames).

    The whole history as one partition; see :func:`train_partitions` for the steps and ``options``.
    """
    return train_partitions([_Frames(attempts, nudges)], **options)


@dataclass(frozen=True)
class _Frames:
    attempts: pd.DataFrame
    nudges: pd.DataFrame


class HistoryFrames(Protocol):
    """A history's two tables (e.g. `model.history.History`)."""

    @property
    def attempts(self) -> pd.DataFrame: ...

    @property
    def nudges(self) -> pd.DataFrame: ...


class Partitions(Protocol):
    """Partitions of whole orders, each a `HistoryFrames`, read in turn (e.g. `model.history.PartitionedHistory`)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[HistoryFrames]: ...

    def __getitem__(self, index: int) -> HistoryFrames: ...


def train_partitions(
    partitions: Partitions | Sequence[HistoryFrames],
    *,
    seed: int,
    time_holdout_fraction: float = 0.2,
    progress: Progress | None = None,
    catalog: Normaliser | None = None,
    max_rounds: int = 1000,
    evaluate_unseen_codes: bool = True,
    num_threads: int = 1,
    fit_booster: BoosterFitter | None = None,
    unseen_code_rows: int = UNSEEN_CODE_MAX_ROWS,
    workers: int = 1,
) -> TrainingResult:
    """Train the retry and retarget outcome models on a history given as partitions of whole orders.

    ``partitions`` yields each partition's (attempts, nudges) frames; every order lies in one partition (e.g. a
    ``model.history.PartitionedHistory``), so memory holds one partition's frames at a time, the raw columns of
    the others waiting in Parquet files, plus the float32 model matrix. The result does not depend on how the
    orders were partitioned, except for the never-seen-code check, which uses a seeded sample of at most
    ``unseen_code_rows`` retries.

    Steps: decision points -> raw columns (catalog verdicts) -> out-of-fold text features -> feature spec ->
    IPS-weighted LightGBM with early stopping on a later time slice -> unweighted calibration on the next slice ->
    metrics on the latest ``time_holdout_fraction`` of decision points (0: none, a final fit on every decision point,
    whose metrics then have no holdout figures). ``progress(stage, fraction_done)`` is called
    between stages. LightGBM runs deterministic with ``num_threads`` pinned (1 by default: on a shared 2-core box
    OpenMP threads competing with other processes were ~15x slower than one thread). ``fit_booster`` replaces
    the in-process fit of the retry and retarget boosters (e.g. on a Dask cluster); everything else is the same.
    ``workers`` processes build the partitions' decision points side by side (same result as one).
    """
    fit = _fit_booster if fit_booster is None else fit_booster
    if not 0.0 <= time_holdout_fraction < 0.9:
        raise ValueError(f"time_holdout_fraction must be in [0, 0.9), got {time_holdout_fraction}")
    started = time.perf_counter()

    def report(stage: str, done: float) -> None:
        if progress is not None:
            progress(stage, done)

    report("decision points", 0.0)
    normaliser: Normaliser = load_catalog() if catalog is None else catalog
    with tempfile.TemporaryDirectory(prefix="winback-columns-") as spill:
        store = _RawColumns(None if len(partitions) <= 1 else Path(spill))
        labels_of, propensity_of, ts_of, retry_of, orders_of, execute_of = [], [], [], [], [], []
        dropped: Counter[str] = Counter()
        for summary, cols_or_file in _decision_points_of(partitions, normaliser, Path(spill), workers):
            dropped.update(summary.dropped)
            if cols_or_file is None:
                continue
            if isinstance(cols_or_file, Path):
                store.adopt(cols_or_file)
            else:
                store.add(cols_or_file)
            labels_of.append(summary.labels)
            propensity_of.append(summary.propensity)
            retry_of.append(summary.is_retry)
            ts_of.append(summary.event_ts)
            orders_of.append(summary.order_ids)
            execute_of.append(summary.execute_ts)
            del cols_or_file
        # Rows in the order one partition would have them (decision_points' sort): the fit does not depend on
        # how the orders were partitioned.
        rank = np.zeros(0, dtype=np.int64)
        if len(store) > 1:
            sort_keys = pa.table(
                {
                    "ts": np.concatenate(ts_of),
                    "order": pa.chunked_array(orders_of),
                    "execute": np.concatenate(execute_of),
                }
            )
            in_order = pc.sort_indices(
                sort_keys, [("ts", "ascending"), ("order", "ascending"), ("execute", "ascending")]
            )
            rank = np.empty(len(sort_keys), dtype=np.int64)
            rank[in_order.to_numpy()] = np.arange(len(sort_keys))
            del sort_keys, in_order
        del orders_of, execute_of
        return _train_on_columns(
            store,
            sizes=[len(part) for part in labels_of],
            workers=workers,
            rank=rank,
            labels=np.concatenate(labels_of) if labels_of else np.zeros(0, dtype=bool),
            propensity=np.concatenate(propensity_of) if propensity_of else np.zeros(0),
            decision_ts=np.concatenate(ts_of) if ts_of else np.zeros(0),
            is_retry=np.concatenate(retry_of) if retry_of else np.zeros(0, dtype=bool),
            dropped={key: int(value) for key, value in dropped.items()},
            normaliser=normaliser,
            seed=seed,
            time_holdout_fraction=time_holdout_fraction,
            report=report,
            fit=fit,
            max_rounds=max_rounds,
            evaluate_unseen_codes=evaluate_unseen_codes,
            num_threads=num_threads,
            unseen_code_rows=unseen_code_rows,
            started=started,
        )


def _train_on_columns(
    store: _RawColumns,
    *,
    sizes: list[int],
    workers: int,
    rank: npt.NDArray[np.int64],
    labels: npt.NDArray[np.bool_],
    propensity: FloatArray,
    decision_ts: FloatArray,
    is_retry: npt.NDArray[np.bool_],
    dropped: dict[str, int],
    normaliser: Normaliser,
    seed: int,
    time_holdout_fraction: float,
    report: Progress,
    fit: BoosterFitter,
    max_rounds: int,
    evaluate_unseen_codes: bool,
    num_threads: int,
    unseen_code_rows: int,
    started: float,
) -> TrainingResult:
    retry_rows, retarget_rows = np.flatnonzero(is_retry), np.flatnonzero(~is_retry)
    if len(retry_rows) < MIN_EXAMPLES or len(np.unique(labels[retry_rows])) < 2:
        raise InsufficientHistoryError(
            f"history has {len(retry_rows)} silent retries after a failure (of which "
            f"{int(labels[retry_rows].sum())} succeeded): need at least {MIN_EXAMPLES} with "
            "both outcomes to learn retryability"
        )
    masks = _split_masks(decision_ts, time_holdout_fraction)
    fitted = masks["train"] | masks["valid"] | masks["calibration"]

    report("text model", 0.2)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    _FORKED.update(store=store, offsets=offsets, labels=labels, masks=masks, fitted=fitted)
    try:
        # Pass over the partitions: the text model's table (fitted rows) and the vocabularies (training rows).
        text_parts: list[pd.DataFrame] = []
        token_counts = FeatureSpec.count_tokens({})
        for counts, tokens in map_in_order(_text_and_tokens, len(sizes), workers):
            text_parts.append(counts)
            for name, counter in tokens.items():
                token_counts[name].update(counter)
        texts, text_table = _merge_error_texts(text_parts)
        oof = out_of_fold(texts, seed=seed)
        text_model = TextModel.fit(texts, seed=seed)
        spec = FeatureSpec.from_counts(token_counts)

        report("features", 0.3)
        groups = {
            (kind, split): (kind_mask & mask)
            for kind, kind_mask in (("retry", is_retry), ("retarget", ~is_retry))
            for split, mask in masks.items()
        }
        _FORKED.update(
            text_row={key: i for i, key in enumerate(_table_keys(text_table))}, oof=oof, text_model=text_model,
            spec=spec, groups=groups, is_retry=is_retry, rank=rank, seed=seed,
            sample_rate=min(1.0, unseen_code_rows / max(len(retry_rows), 1)) if evaluate_unseen_codes else 0.0,
        )  # fmt: skip
        pieces: dict[tuple[str, str], list[npt.NDArray[np.float32]]] = {key: [] for key in groups}
        cell_pieces: dict[tuple[str, str], list[npt.NDArray[np.object_]]] = {key: [] for key in groups}
        holdout_classes: dict[str, list[np.ndarray]] = {"retry": [], "retarget": []}
        unseen_cols: list[dict[str, np.ndarray]] = []
        unseen_labels: list[npt.NDArray[np.bool_]] = []
        unseen_rank: list[npt.NDArray[np.int64]] = []
        for features in map_in_order(_features_of, len(sizes), workers):
            for key, piece in features.pieces.items():
                pieces[key].append(piece)
            for key, cell_piece in features.cells.items():
                cell_pieces[key].append(cell_piece)
            for kind, classes in features.holdout_classes.items():
                holdout_classes[kind].append(classes)
            if evaluate_unseen_codes:
                unseen_cols.append(features.unseen_cols)
                unseen_labels.append(features.unseen_labels)
                unseen_rank.append(features.unseen_rank)
            del features
    finally:
        _FORKED.clear()

    metrics: dict[str, float] = {
        "n_points": float(len(labels)),
        "n_retry_points": float(len(retry_rows)),
        "n_retarget_points": float(len(retarget_rows)),
        "share_unknown_propensity": float(np.mean(~np.isfinite(propensity))) if len(labels) else math.nan,
        "n_partitions": float(len(sizes)),
        **{f"dropped_{k}": float(v) for k, v in dropped.items()},
    }
    y_all = labels.astype(np.float64)
    tables: dict[str, pd.DataFrame] = {}
    boosters: dict[str, lgb.Booster | None] = {}
    calibrators: dict[str, Calibrator] = {}
    class_tables = []
    # Per fitted decision point of each model: its cell, outcome and calibrated prediction (model.cellsupport).
    fitted_cells: list[tuple[npt.NDArray[np.object_], FloatArray, FloatArray]] = []

    def matrix(key: tuple[str, str]) -> npt.NDArray[np.float32]:
        parts = pieces.pop(key)
        out = np.concatenate(parts) if parts else np.zeros((0, len(spec.columns)), dtype=np.float32)
        parts.clear()
        return out

    def by_time(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.intp] | None:
        """Rows of several partitions into one partition's order (``rank``); one partition's already are."""
        return np.argsort(rank[mask]) if len(rank) else None

    for stage, kind in enumerate(("retry", "retarget")):
        report(f"{kind} model", 0.4 + 0.25 * stage)
        part = {split: groups[(kind, split)] for split in masks}
        order = {split: by_time(mask) for split, mask in part.items()}
        x = {split: matrix((kind, split)) for split in masks}
        y = {split: y_all[mask] for split, mask in part.items()}
        cell_of = {
            split: np.concatenate(cell_pieces.pop((kind, split))) if cell_pieces[(kind, split)] else np.zeros(0, object)
            for split in masks
        }
        logged = {split: propensity[mask] for split, mask in part.items()}
        holdout_class = np.concatenate(holdout_classes[kind])
        for split, permutation in order.items():
            if permutation is not None:
                x[split], y[split] = x[split][permutation], y[split][permutation]
                cell_of[split] = cell_of[split][permutation]
                logged[split] = logged[split][permutation]
                if split == "holdout":
                    holdout_class = holdout_class[permutation]
        w = {split: ips_weights(values) for split, values in logged.items()}
        n_train = len(y["train"])
        if n_train < MIN_EXAMPLES or len(np.unique(y["train"])) < 2:
            if kind == "retry":
                raise ValueError(
                    f"only {n_train} silent retries fall in the training time slice: the history is too short "
                    "to learn retryability"
                )
            boosters[kind] = None
            metrics["retarget_model_trained"] = 0.0
            continue

        booster = fit(
            x["train"], y["train"], w["train"], x["valid"], y["valid"], w["valid"],
            categorical=spec.categorical_indices, names=spec.columns, seed=seed, max_rounds=max_rounds,
            num_threads=num_threads,
        )  # fmt: skip
        boosters[kind] = booster
        metrics[f"{kind}_rounds"] = float(booster.num_trees())
        calibration = "calibration" if len(y["calibration"]) >= MIN_EXAMPLES else "valid"
        raw_cal = np.asarray(booster.predict(x[calibration], num_threads=num_threads), dtype=np.float64)
        # Unweighted: the calibrated P(success) is the chance of success of decisions as the history took them,
        # what the holdout and the cell support compare it with. The weights are for the booster's fit and the
        # policy's value; on the calibration slice they made it under-predict (stop 48, five 20,000-order
        # simulations: holdout mean 0.150 against an observed 0.214 on seed 3, 0.203 unweighted).
        calibrator = Calibrator.fit(raw_cal, y[calibration], min_isotonic=MIN_ISOTONIC)
        calibrators[kind] = calibrator
        metrics[f"{kind}_calibration"] = 1.0 if calibrator.kind == "isotonic" else 0.0
        for split in ("train", "valid", "calibration"):
            if len(y[split]):
                p_fitted = calibrator(np.asarray(booster.predict(x[split], num_threads=num_threads), dtype=np.float64))
                fitted_cells.append((cell_of[split], y[split], p_fitted))
        if len(y["holdout"]):
            p = calibrator(np.asarray(booster.predict(x["holdout"], num_threads=num_threads), dtype=np.float64))
            for name, value in binary_metrics(y["holdout"], p).items():
                metrics[f"{kind}_holdout_{name}"] = value
            class_tables.append(_per_class_table(kind, holdout_class, y["holdout"], p))
        if kind == "retarget":
            metrics["retarget_model_trained"] = 1.0
        del x
    if class_tables:
        tables["per_error_class"] = pd.concat(class_tables, ignore_index=True)
    tables["splits"] = pd.DataFrame(
        [
            {"split": name, "retry": int((mask & is_retry).sum()), "retarget": int((mask & ~is_retry).sum()),
             "from": pd.to_datetime(decision_ts[mask].min(), unit="s", utc=True) if mask.any() else pd.NaT,
             "to": pd.to_datetime(decision_ts[mask].max(), unit="s", utc=True) if mask.any() else pd.NaT}
            for name, mask in masks.items()
        ]
    )  # fmt: skip

    if evaluate_unseen_codes:
        report("never-seen codes", 0.9)
        in_time = np.argsort(np.concatenate(unseen_rank), kind="stable")
        sample = {name: np.concatenate([part[name] for part in unseen_cols])[in_time] for name in unseen_cols[0]}
        sample_labels = np.concatenate(unseen_labels)[in_time]
        metrics.update(
            unseen_code_auc(
                sample, sample_labels, np.arange(len(sample_labels)), seed=seed, rounds=min(150, max_rounds),
                num_threads=num_threads,
            )
        )  # fmt: skip

    metrics["train_seconds"] = time.perf_counter() - started
    retry_booster = boosters["retry"]
    assert retry_booster is not None  # raised above otherwise
    catalog_version = str(getattr(normaliser, "version", "unknown"))
    metadata = {
        "seed": seed,
        "time_holdout_fraction": time_holdout_fraction,
        "trained_from": str(pd.to_datetime(decision_ts.min(), unit="s", utc=True)),
        # The newest decision point the models were fitted on (the holdout's are newer).
        "trained_to": str(pd.to_datetime(decision_ts[fitted].max(), unit="s", utc=True)),
        "lightgbm": lgb.__version__,
        "dropped": dropped,
        # Per-code evidence of the fitted rows: decide() explores more where it is thin (model.codewatch).
        KNOWN_CODES_KEY: _inventory(text_table),
        # Per (error class, strategy or channel, timing) evidence of the fitted rows and the models' predictions
        # there: decide() leans on the rules-only priors where it is thin (model.cellsupport).
        CELL_SUPPORT_KEY: cell_rows(
            np.concatenate([part[0] for part in fitted_cells]) if fitted_cells else np.zeros(0, object),
            np.concatenate([part[1] for part in fitted_cells]) if fitted_cells else np.zeros(0),
            np.concatenate([part[2] for part in fitted_cells]) if fitted_cells else np.zeros(0),
        ),
    }
    bundle = ModelBundle(
        spec=spec,
        text_model=text_model,
        retry_booster=retry_booster,
        retarget_booster=boosters.get("retarget"),
        retry_calibrator=calibrators["retry"],
        retarget_calibrator=calibrators.get("retarget"),
        # The documented default until the training job chooses it (choose_retryable_threshold): the choice runs
        # decide() over decision points, with the code levels the job adds after this.
        retryable_threshold=DEFAULT_RETRYABLE_THRESHOLD,
        metrics=metrics,
        catalog_version=catalog_version,
        metadata=metadata,
        version="",
        # Scoring in this process (the threshold's and code levels' replays, an evaluation) reads the catalog the
        # features were built with; a saved bundle is loaded with the catalog its server's rules read.
        catalog=normaliser if isinstance(normaliser, ErrorCatalog) else None,
    )
    bundle.version = bundle_version(bundle)
    report("done", 1.0)
    return TrainingResult(bundle, metrics, tables)
