"""One feature builder for training and serving, over a columnar "decision frame" of numpy arrays.

A decision frame is a ``Mapping[str, np.ndarray]`` with one row per (decision point, candidate action). Its *raw*
columns (``RAW_COLUMNS``) are what is known at the decision time: the failure, the payment, the order's history so
far, the catalog's verdict on the error, the text model's outputs, and the candidate action. Serving builds them for
one request with :func:`context_from_request` + :func:`expand_candidates` (no pandas on the request path); training
builds the same raw columns vectorised from history frames (``model.training``). Both then go through the same
:meth:`FeatureSpec.transform`, which derives every feature (local time, amounts in USD, delays, ...) with numpy and
encodes categoricals through vocabularies learned at training time.
"""

from __future__ import annotations

import bisect
import json
import math
import operator
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from functools import cache, lru_cache
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt

from model.catalog import NormalisedError, Normaliser, load_catalog, normalise_request
from model.money import load_economics
from model.requests import DecisionRequest
from model.rules import PAYDAY_DAYS, Candidate, payday_at, payday_zones
from model.vocab import NOT_SILENT_RETRY_STRATEGIES, RETRY_STRATEGIES, Action, ErrorClass, Strategy
from model.zones import timezone_of

FloatArray = npt.NDArray[np.float64]
ObjArray = npt.NDArray[np.object_]

#: Token for a missing categorical value (kept as its own category when frequent enough).
MISSING = "__missing__"
#: Code of the shared "other" category: rare values and values never seen in training.
OTHER_CODE = 0

#: Error classes whose probabilities the text model outputs, in a fixed order (feature ``text_p_<class>``).
TEXT_CLASSES: tuple[str, ...] = tuple(c.value for c in ErrorClass)
#: Names of the text model's output columns.
TEXT_COLUMNS: tuple[str, ...] = ("text_p_retry", *(f"text_p_{c}" for c in TEXT_CLASSES))

#: Raw string columns describing the decision point (context), repeated on every candidate row.
CONTEXT_STR: tuple[str, ...] = (
    "connector", "error_code", "error_message", "network_decline_code", "merchant_advice_code", "unified_code",
    "card_network", "payment_method", "payment_method_type", "issuer", "currency", "customer_country",
    "authentication_type", "last_channel", "error_class", "visa_category",
)  # fmt: skip
#: Raw numeric context columns (timestamps are UNIX seconds, UTC; NaN = unknown).
CONTEXT_NUM: tuple[str, ...] = (
    "amount", "event_ts", "first_failure_ts", "last_nudge_ts", "is_recurring", "is_network_token",
    "phone_present", "email_present", "n_attempts", "n_silent_retries",
    *(f"tried_{s.value}" for s in RETRY_STRATEGIES),
    "n_connectors_tried", "n_nudges", "last_nudge_clicked", "known_code", "mac_never_retry",
    *TEXT_COLUMNS,
)  # fmt: skip
#: Raw candidate columns.
CANDIDATE_STR: tuple[str, ...] = ("action", "strategy", "target_connector", "channel")
CANDIDATE_NUM: tuple[str, ...] = ("execute_ts",)
RAW_COLUMNS: tuple[str, ...] = CONTEXT_STR + CONTEXT_NUM + CANDIDATE_STR + CANDIDATE_NUM

#: Categorical features of the model (encoded through learned vocabularies).
CATEGORICAL_FEATURES: tuple[str, ...] = (
    "connector", "error_code", "error_class", "network_decline_code", "visa_category", "merchant_advice_code",
    "unified_code", "card_network", "payment_method", "payment_method_type", "issuer", "currency",
    "customer_country", "authentication_type", "last_channel", "action", "strategy", "target_connector", "channel",
)  # fmt: skip
#: Numeric features of the model (raw or derived in :func:`derive`).
NUMERIC_FEATURES: tuple[str, ...] = (
    "is_recurring", "is_network_token", "is_three_ds", "phone_present", "email_present", "known_code",
    "mac_never_retry", "amount_usd", "log_amount_usd",
    "local_hour", "local_weekday", "local_day", "days_to_next_payday", "is_month_end", "days_since_first_failure",
    "n_attempts", "n_silent_retries", *(f"tried_{s.value}" for s in RETRY_STRATEGIES), "n_connectors_tried",
    "n_nudges", "hours_since_last_nudge", "last_nudge_clicked",
    *TEXT_COLUMNS,
    "is_same_connector", "delay_hours", "log_delay_hours", "exec_local_hour", "exec_weekday", "exec_day",
    "exec_days_to_next_payday", "exec_is_month_end", "next_payday_before_exec",
)  # fmt: skip
#: Payday features of bundles trained before the payday features followed the rules' paydays: payday was the 1st
#: of the month alone, at local midnight in the customer's zone. Training no longer writes them, but a registered
#: champion trained with them keeps loading and scoring as it was trained: ``derive`` and ``transform_request``
#: build them (``_retired_payday_features``) only for a spec that lists them.
RETIRED_FEATURES: tuple[str, ...] = ("days_to_payday", "exec_days_to_payday", "payday_before_exec")

_SECONDS_PER_DAY = 86400.0
#: Raw numeric context columns that are only inputs of derived features, never features themselves.
_RAW_ONLY_NUMBERS = frozenset({"amount", "event_ts", "first_failure_ts", "last_nudge_ts"})
#: Numeric features of a candidate's execution time (the rest of NUMERIC_FEATURES is constant within a request,
#: but for is_same_connector).
_EXECUTION_TIME_FEATURES = frozenset({"delay_hours", "log_delay_hours", "exec_local_hour", "exec_weekday", "exec_day",
                                      "exec_days_to_next_payday", "exec_is_month_end",
                                      "next_payday_before_exec"})  # fmt: skip

#: Numeric features transform_request derives from the request's context (constant across its rows).
_REQUEST_DERIVED = frozenset({"is_three_ds", "amount_usd", "log_amount_usd", "local_hour", "local_weekday",
                              "local_day", "days_to_next_payday", "is_month_end", "days_since_first_failure",
                              "hours_since_last_nudge"})  # fmt: skip
_NO_CANDIDATE: Any = object()

_CODES_MEMO_SIZE = 4096

#: How each candidate column's value is read off a Candidate (as ``expand_candidates`` writes it).
_KIND_OF = operator.attrgetter("action", "strategy", "connector", "channel")
_CANDIDATE_VALUE: dict[str, Callable[[Candidate], str | None]] = {
    "action": lambda c: c.action.value,
    "strategy": lambda c: None if c.strategy is None else c.strategy.value,
    "target_connector": lambda c: c.connector,
    "channel": lambda c: None if c.channel is None else c.channel.value,
}


# ----------------------------------------------------------------------------------------------------------------
# Time and money, vectorised (shared by training and serving, so both compute bit-identical values)


@cache
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


@lru_cache(maxsize=65_536)
def _hour_offset(zone_name: str, utc_hour: float) -> float:
    """UTC offset in seconds of ``zone_name`` during the UTC hour ``utc_hour`` (hours since the epoch)."""
    offset = datetime.fromtimestamp(utc_hour * 3600.0, UTC).astimezone(_zone(zone_name)).utcoffset()
    return 0.0 if offset is None else offset.total_seconds()


def _utc_offsets(ts: FloatArray, countries: ObjArray) -> FloatArray:
    """Seconds to add to UTC ``ts`` to get each row's local wall-clock time (NaN where ``ts`` is NaN)."""
    offsets = np.zeros(len(ts), dtype=np.float64)
    zones = np.array([timezone_of(c if isinstance(c, str) else None) for c in countries], dtype=object)
    finite = np.isfinite(ts)
    for zone_name in set(zones.tolist()) - {"UTC"}:
        rows = np.flatnonzero((zones == zone_name) & finite)
        if len(rows) == 0:
            continue
        # Offsets change only at DST transitions, which fall on whole UTC hours: one lookup per distinct hour.
        hours = np.floor(ts[rows] / 3600.0)
        if len(rows) == 1 or (hours == hours[0]).all():  # a live request: one hour for every candidate row
            offsets[rows] = _hour_offset(zone_name, float(hours[0]))
            continue
        distinct, inverse = np.unique(hours, return_inverse=True)
        per_hour = np.array([_hour_offset(zone_name, float(h)) for h in distinct])
        offsets[rows] = per_hour[inverse]
    offsets[~finite] = np.nan
    return offsets


@dataclass(frozen=True)
class _LocalTime:
    hour: FloatArray
    weekday: FloatArray  # Monday = 0
    day: FloatArray  # day of month, 1-based
    days_in_month: FloatArray
    # The local month without the NaN mask: only the retired features read it (_months_since_epoch), so the
    # others do not pay for its conversion.
    month_stamp: npt.NDArray[np.datetime64]


def _local_time(ts: FloatArray, offsets: FloatArray) -> _LocalTime:
    local = ts + offsets
    finite = np.isfinite(local)
    safe = np.where(finite, local, 0.0)
    days = np.floor(safe / _SECONDS_PER_DAY)
    hour = np.floor((safe - days * _SECONDS_PER_DAY) / 3600.0)
    weekday = np.mod(days + 3.0, 7.0)  # 1970-01-01 was a Thursday
    day_stamp = days.astype("int64").astype("datetime64[D]")
    month_stamp = day_stamp.astype("datetime64[M]")
    day = (day_stamp - month_stamp.astype("datetime64[D]")).astype("int64").astype(np.float64) + 1.0
    next_month = (month_stamp + np.timedelta64(1, "M")).astype("datetime64[D]")
    days_in_month = (next_month - month_stamp.astype("datetime64[D]")).astype("int64").astype(np.float64)
    nan = np.where(finite, 0.0, np.nan)
    return _LocalTime(hour + nan, weekday + nan, day + nan, days_in_month + nan, month_stamp)


# Paydays are the rules' (model.rules.next_payday), in the customer's zones: the model learns "after payday" as the
# executor acts on it. The merchant's zone, which the rules also wait for, is not in the decision frame (history
# rows do not carry it). Both paths below look a moment's next payday up among the same memoised instants.


@lru_cache(maxsize=256)
def _payday_zones_of(country: str | None) -> tuple[ZoneInfo, ...]:
    return payday_zones(country, None)


_FIRST_YEAR, _LAST_YEAR = date.min.year, date.max.year


@lru_cache(maxsize=4096)
def _payday_epochs(zones: tuple[ZoneInfo, ...], utc_month_index: int) -> tuple[float, ...]:
    """UNIX seconds of the paydays (every one of ``PAYDAY_DAYS``, ``model.rules.payday_at``) of the UTC month
    ``utc_month_index`` (months since 1970-01) and the months either side, in order: a moment of that month has its
    next payday among them (a zone shifts a payday by less than a day). Months outside Python's calendar are left
    out, so a moment at its ends has none (NaN)."""
    epochs: list[float] = []
    for index in (utc_month_index - 1, utc_month_index, utc_month_index + 1):
        year, month = 1970 + index // 12, index % 12 + 1
        if _FIRST_YEAR <= year <= _LAST_YEAR:
            epochs.extend(payday_at(year, month, day, zones).timestamp() for day in PAYDAY_DAYS)
    return tuple(sorted(epochs))


def _next_payday_epoch(t: float, zones: tuple[ZoneInfo, ...]) -> float:
    """UNIX seconds of the first payday strictly after ``t`` (NaN when ``t`` is or the payday would be unknown)."""
    if not math.isfinite(t):
        return math.nan
    days = math.floor(t / _SECONDS_PER_DAY)
    if not _FIRST_DAY <= days <= _LAST_DAY:
        return math.nan
    stamp = date.fromordinal(_EPOCH_ORDINAL + days)
    epochs = _payday_epochs(zones, (stamp.year - 1970) * 12 + stamp.month - 1)
    position = bisect.bisect_right(epochs, t)
    return epochs[position] if position < len(epochs) else math.nan


def _next_payday_epochs(ts: FloatArray, countries: ObjArray) -> FloatArray:
    """``_next_payday_epoch`` of each row, vectorised over the rows of each (country zones, UTC month)."""
    out = np.full(len(ts), np.nan, dtype=np.float64)
    days = np.floor(np.where(np.isfinite(ts), ts, np.nan) / _SECONDS_PER_DAY)
    known = np.isfinite(days) & (days >= _FIRST_DAY) & (days <= _LAST_DAY)
    months = np.zeros(len(ts), dtype=np.int64)
    months[known] = days[known].astype("int64").astype("datetime64[D]").astype("datetime64[M]").astype("int64")
    names = [c if isinstance(c, str) else None for c in countries]
    distinct = {name: k for k, name in enumerate(dict.fromkeys(names))}
    group = np.fromiter(map(distinct.__getitem__, names), dtype=np.intp, count=len(names))
    for name, k in distinct.items():
        rows = np.flatnonzero(known & (group == k))
        zone_set = _payday_zones_of(name)
        for month in np.unique(months[rows]).tolist():
            in_month = rows[months[rows] == month]
            epochs = np.array([*_payday_epochs(zone_set, int(month)), np.nan], dtype=np.float64)
            out[in_month] = epochs[np.searchsorted(epochs[:-1], ts[in_month], side="right")]
    return out


def _is_month_end(local: _LocalTime) -> FloatArray:
    # The last three days of the month; NaN where the time is unknown.
    return np.asarray(
        (local.day > local.days_in_month - 3.0).astype(np.float64) + np.where(np.isfinite(local.day), 0.0, np.nan),
        dtype=np.float64,
    )


# The retired payday features (RETIRED_FEATURES), as the bundles trained with them saw them: payday was the 1st of
# the month, at local midnight in the customer's zone (_local_time's). The same numpy operations as when they were
# current, so the same values; both paths call _retired_payday_features.


def _days_to_first_of_month(local: _LocalTime) -> FloatArray:
    """Retired ``days_to_payday`` (and ``exec_days_to_payday`` at the action's time): whole local days to the next
    1st; on the 1st itself it is today (0)."""
    return np.where(local.day == 1.0, 0.0, local.days_in_month - local.day + 1.0)


def _months_since_epoch(local: _LocalTime) -> FloatArray:
    # NaN where the time is unknown, so that an unknown time never has a month boundary before it.
    return local.month_stamp.astype("int64").astype(np.float64) + np.where(np.isfinite(local.day), 0.0, np.nan)


def _first_of_month_between(now: _LocalTime, later: _LocalTime) -> FloatArray:
    """Retired ``payday_before_exec``: 1.0 when a local 1st of the month falls after ``now`` and by ``later``."""
    return (_months_since_epoch(later) > _months_since_epoch(now)).astype(np.float64)


def _retired_payday_features(now: _LocalTime, later: _LocalTime) -> dict[str, FloatArray]:
    """The RETIRED_FEATURES of rows decided at ``now`` and acted on at ``later`` (row-aligned local times)."""
    return {
        "days_to_payday": _days_to_first_of_month(now),
        "exec_days_to_payday": _days_to_first_of_month(later),
        "payday_before_exec": _first_of_month_between(now, later),
    }


#: The execution-time features of a moment, in the order _local_moments and transform_request lay them out.
_MOMENT_FEATURES: tuple[str, ...] = (
    "delay_hours", "log_delay_hours", "exec_local_hour", "exec_weekday", "exec_day", "exec_days_to_next_payday",
    "exec_is_month_end", "next_payday_before_exec",
)  # fmt: skip
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
#: Days since the epoch that Python's dates can hold (years 1 to 9999).
_FIRST_DAY, _LAST_DAY = date.min.toordinal() - _EPOCH_ORDINAL, date.max.toordinal() - _EPOCH_ORDINAL
_LocalMoment = tuple[float, float, float, float]
_MONTH_DAYS = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _days_in_month(year: int, month: int) -> int:
    # calendar.monthrange's answer without the weekday it also works out (in Python, on every call).
    if month == 2 and year % 4 == 0 and (year % 100 != 0 or year % 400 == 0):
        return 29
    return _MONTH_DAYS[month]


def _local_moments(ts: Sequence[float], offsets: Sequence[float]) -> list[_LocalMoment]:
    """Per moment (hour, weekday, day, is month end) of ``_local_time`` and ``_is_month_end``, computed on plain
    floats.

    The same IEEE operations in the same order as the numpy versions (calendar fields are whole numbers), so the
    same values; a moment outside Python's calendar goes through the numpy versions.
    """
    out: list[_LocalMoment] = []
    for t, offset in zip(ts, offsets, strict=True):
        local = t + offset
        if not math.isfinite(local):
            out.append((math.nan, math.nan, math.nan, math.nan))
            continue
        days = math.floor(local / _SECONDS_PER_DAY)
        if not _FIRST_DAY <= days <= _LAST_DAY:
            numpy_time = _local_time(np.array([t]), np.array([offset]))
            out.append(
                (
                    float(numpy_time.hour[0]),
                    float(numpy_time.weekday[0]),
                    float(numpy_time.day[0]),
                    float(_is_month_end(numpy_time)[0]),
                )
            )
            continue
        # + 0.0 as the numpy version adds its NaN mask: it turns a -0.0 into 0.0.
        hour = math.floor((local - days * _SECONDS_PER_DAY) / 3600.0) + 0.0
        weekday = (days + 3.0) % 7.0 + 0.0
        day, month_end = _calendar_day(days)
        out.append((float(hour), weekday, day, month_end))
    return out


@lru_cache(maxsize=4096)
def _calendar_day(days: int) -> tuple[float, float]:
    """(day of month, is month end) of the day ``days`` after the epoch.

    Memoised: a request's dozen moments fall on a few days, and every live request's on the same few weeks from
    today. Worked out per moment before: on mixed traffic (14 moments a request) _local_moments took 12.9 us a
    request, 7.3 us with this (both in one process on a loaded box).
    """
    stamp = date.fromordinal(_EPOCH_ORDINAL + days)
    day = float(stamp.day)
    days_in_month = float(_days_in_month(stamp.year, stamp.month))
    return day, float(day > days_in_month - 3.0)


def _log1p_nonnegative(values: FloatArray) -> FloatArray:
    # A negative amount is bad data, not a number to take the log of.
    with np.errstate(invalid="ignore"):
        return np.asarray(np.log1p(np.where(values >= 0.0, values, np.nan)), dtype=np.float64)


def _float_or_nan(value: Any) -> float:
    return math.nan if value is None else float(value)


def _str_or_none(values: ObjArray) -> list[str | None]:
    return [v if isinstance(v, str) else None for v in values]


def amount_in_usd(amounts: FloatArray, currencies: ObjArray, fx_to_usd: Mapping[str, float]) -> FloatArray:
    """Amounts converted to USD with a fixed rate table (NaN for a currency not in the table)."""
    rates = np.array(
        [fx_to_usd.get(c.upper(), math.nan) if isinstance(c, str) else math.nan for c in currencies],
        dtype=np.float64,
    )
    return np.asarray(amounts, dtype=np.float64) * rates


def derive(
    columns: Mapping[str, np.ndarray], fx_to_usd: Mapping[str, float], *, retired_paydays: bool = False
) -> dict[str, np.ndarray]:
    """All model features (numeric ones as float64, categorical ones as object arrays) from raw columns.

    ``fx_to_usd`` is the fixed rate table (USD per unit of each currency) frozen into the feature spec.
    ``retired_paydays`` adds the RETIRED_FEATURES, for a bundle trained with them.
    """
    missing = [name for name in RAW_COLUMNS if name not in columns]
    if missing:
        raise KeyError(f"decision frame lacks raw columns: {', '.join(missing)}")
    num = {name: np.asarray(columns[name], dtype=np.float64) for name in CONTEXT_NUM + CANDIDATE_NUM}
    out: dict[str, np.ndarray] = {name: np.asarray(columns[name], dtype=object) for name in CATEGORICAL_FEATURES
                                  if name in columns}  # fmt: skip
    for name in CONTEXT_NUM:
        if name not in _RAW_ONLY_NUMBERS:
            out[name] = num[name]

    auth = np.asarray(columns["authentication_type"], dtype=object)
    out["is_three_ds"] = np.array([isinstance(a, str) and a.startswith("three_ds") for a in auth], dtype=np.float64)
    usd = amount_in_usd(num["amount"], np.asarray(columns["currency"], dtype=object), fx_to_usd)
    out["amount_usd"] = usd
    out["log_amount_usd"] = _log1p_nonnegative(usd)

    event = num["event_ts"]
    countries = np.asarray(columns["customer_country"], dtype=object)
    offsets = _utc_offsets(event, countries)
    now = _local_time(event, offsets)
    out["local_hour"] = now.hour
    out["local_weekday"] = now.weekday
    out["local_day"] = now.day
    payday = _next_payday_epochs(event, countries)
    out["days_to_next_payday"] = (payday - event) / _SECONDS_PER_DAY
    out["is_month_end"] = _is_month_end(now)
    out["days_since_first_failure"] = (event - num["first_failure_ts"]) / _SECONDS_PER_DAY
    out["hours_since_last_nudge"] = (event - num["last_nudge_ts"]) / 3600.0

    execute = num["execute_ts"]
    delay = np.maximum(execute - event, 0.0) / 3600.0
    out["delay_hours"] = delay
    out["log_delay_hours"] = np.log1p(delay)
    # The execution time's own offset: a DST change may fall between the decision and the action.
    later = _local_time(execute, _utc_offsets(execute, countries))
    out["exec_local_hour"] = later.hour
    out["exec_weekday"] = later.weekday
    out["exec_day"] = later.day
    out["exec_days_to_next_payday"] = (_next_payday_epochs(execute, countries) - execute) / _SECONDS_PER_DAY
    out["exec_is_month_end"] = _is_month_end(later)
    # The rules' "after payday" retry goes at the payday instant itself: it counts as after.
    out["next_payday_before_exec"] = (execute >= payday).astype(np.float64)
    if retired_paydays:
        out.update(_retired_payday_features(now, later))

    target = _str_or_none(np.asarray(columns["target_connector"], dtype=object))
    connector = _str_or_none(np.asarray(columns["connector"], dtype=object))
    out["is_same_connector"] = np.array(
        [math.nan if t is None else float(t == c) for t, c in zip(target, connector, strict=True)],
        dtype=np.float64,
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# The feature spec: column order + vocabularies, learned once, serialisable


@dataclass(frozen=True)
class _RequestPlan:
    """Column positions for FeatureSpec.transform_request, grouped by where their values come from."""

    width: int
    context_numbers: tuple[tuple[int, str], ...]  # raw numeric context values copied as they are
    derived_numbers: tuple[tuple[int, str], ...]  # numeric features derived from the context (_REQUEST_DERIVED)
    categories: tuple[tuple[int, str, dict[str | None, int]], ...]  # context categoricals and their codes
    # Where the per-moment and per-kind tables go: (first column, end column, first source, end source) runs of
    # adjacent columns fed by adjacent table columns, each one a plain slice assignment (a standard spec has
    # one run of moment features and two of kind codes).
    moment_runs: tuple[tuple[int, int, int, int], ...]
    kind_runs: tuple[tuple[int, int, int, int], ...]
    retired: tuple[tuple[int, str], ...]  # RETIRED_FEATURES the spec lists: empty but for a bundle trained with them


def _column_runs(pairs: Iterable[tuple[int, int]]) -> tuple[tuple[int, int, int, int], ...]:
    """(column, source) pairs merged into runs where both go up by one at a time."""
    runs: list[list[int]] = []
    for column, source in sorted(pairs):
        if runs and runs[-1][1] == column and runs[-1][3] == source:
            runs[-1][1] += 1
            runs[-1][3] += 1
        else:
            runs.append([column, column + 1, source, source + 1])
    return tuple((a, b, c, d) for a, b, c, d in runs)


@dataclass
class FeatureSpec:
    """Column order and categorical vocabularies of the model matrix (learned at training time, JSON-serialisable).

    Categorical codes: ``OTHER_CODE`` (0) for rare and never-seen values, ``1..k`` for the vocabulary's values in
    order. Missing values are the token ``MISSING`` and get their own code when they were frequent in training.
    """

    numeric: list[str]
    vocabularies: dict[str, list[str]]
    fx_to_usd: dict[str, float]
    min_count: int = 20
    _index: dict[str, dict[str | None, int]] = field(default_factory=dict, repr=False, compare=False)
    _plan: _RequestPlan | None = field(default=None, repr=False, compare=False)
    _codes_memo: dict[tuple[Any, ...], tuple[float, ...]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def columns(self) -> list[str]:
        """Matrix column order: numeric features, then categorical ones."""
        return [*self.numeric, *self.vocabularies]

    @property
    def retired_features(self) -> list[str]:
        """The RETIRED_FEATURES this spec lists (a bundle trained before they were retired), in column order."""
        return [name for name in self.numeric if name in RETIRED_FEATURES]

    @property
    def categorical_indices(self) -> list[int]:
        """Positions of the categorical columns in the matrix (LightGBM's ``categorical_feature``)."""
        return list(range(len(self.numeric), len(self.numeric) + len(self.vocabularies)))

    @classmethod
    def fit(
        cls,
        columns: Mapping[str, np.ndarray],
        *,
        min_count: int = 20,
        exclude: Iterable[str] = (),
        fx_to_usd: Mapping[str, float] | None = None,
    ) -> FeatureSpec:
        """Learn vocabularies from training raw columns: values seen at least ``min_count`` times get a code.

        ``exclude`` leaves features out; ``fx_to_usd`` defaults to the shipped table (``model.money``), frozen
        into the spec so later edits of that table cannot shift a trained model's inputs.
        """
        fx = dict(load_economics().fx_to_usd if fx_to_usd is None else fx_to_usd)
        derive(columns, fx)  # the raw columns must be complete, as for transform
        return cls.from_counts(cls.count_tokens(columns), min_count=min_count, exclude=exclude, fx_to_usd=fx)

    @staticmethod
    def count_tokens(
        columns: Mapping[str, np.ndarray], counts: dict[str, Counter[str]] | None = None
    ) -> dict[str, Counter[str]]:
        """Occurrences of each categorical feature's values in raw columns (added to ``counts`` when given).

        Counting part by part and then :meth:`from_counts` gives the spec :meth:`fit` gives on all parts at once.
        """
        out = {name: Counter() for name in CATEGORICAL_FEATURES} if counts is None else counts
        for name in CATEGORICAL_FEATURES:
            if name in columns:
                out[name].update(_tokens(np.asarray(columns[name], dtype=object)))
        return out

    @classmethod
    def from_counts(
        cls,
        counts: Mapping[str, Counter[str]],
        *,
        min_count: int = 20,
        exclude: Iterable[str] = (),
        fx_to_usd: Mapping[str, float] | None = None,
    ) -> FeatureSpec:
        """The spec whose vocabularies keep the values counted at least ``min_count`` times."""
        fx = dict(load_economics().fx_to_usd if fx_to_usd is None else fx_to_usd)
        dropped = set(exclude)
        vocabularies = {
            name: sorted(str(value) for value, n in counts[name].items() if n >= min_count)
            for name in CATEGORICAL_FEATURES
            if name not in dropped
        }
        numeric = [name for name in NUMERIC_FEATURES if name not in dropped]
        return cls(numeric=numeric, vocabularies=vocabularies, fx_to_usd=fx, min_count=min_count)

    def _lookup(self, name: str) -> dict[str | None, int]:
        index = self._index.get(name)
        if index is None:
            index = {value: code for code, value in enumerate(self.vocabularies[name], start=1)}
            if MISSING in index:
                index[None] = index[MISSING]
            self._index[name] = index
        return index

    def encode(self, name: str, values: np.ndarray) -> FloatArray:
        """Integer codes (as float) of one categorical column; unseen or rare values get ``OTHER_CODE``."""
        index = self._lookup(name)
        get = index.get
        items = values.tolist() if isinstance(values, np.ndarray) else list(values)
        # Columns repeat few distinct values (a request's context is constant across its candidates; a history
        # has a small vocabulary): look each distinct value up once, then map in C.
        codes = {v: float(get(v if isinstance(v, str) else None, OTHER_CODE)) for v in set(items)}
        return np.fromiter(map(codes.__getitem__, items), dtype=np.float64, count=len(items))

    def transform(self, columns: Mapping[str, np.ndarray]) -> npt.NDArray[np.float32]:
        """The float32 model matrix (rows x ``self.columns``) of a decision frame's raw columns."""
        derived = derive(columns, self.fx_to_usd, retired_paydays=bool(self.retired_features))
        n_rows = len(np.asarray(columns["event_ts"]))
        matrix = np.empty((n_rows, len(self.numeric) + len(self.vocabularies)), dtype=np.float32)
        for j, name in enumerate(self.numeric):
            matrix[:, j] = derived[name]
        offset = len(self.numeric)
        for j, name in enumerate(self.vocabularies):
            matrix[:, offset + j] = self.encode(name, derived[name])
        return matrix

    def transform_request(self, context: Mapping[str, Any], candidates: Sequence[Candidate]) -> npt.NDArray[np.float32]:
        """``transform(expand_candidates(context, candidates))`` for one live request, without the decision frame.

        The request path's form of :meth:`transform`: a request's rows share one context, so its features are
        derived once (as scalars, with numpy's own functions wherever rounding could differ) and broadcast. The
        candidate columns are derived once per distinct execution moment (a grid shares each moment between its
        kinds) and once per run of same-kind candidates. Byte-identical to :meth:`transform` (tested on random
        requests), at a fraction of its cost: :func:`derive` pays numpy's per-call overhead ~60 times per frame.
        """
        plan = self._request_plan()
        n = len(candidates)
        event = _float_or_nan(context.get("event_ts"))
        country = context.get("customer_country")
        zone_name = timezone_of(country if isinstance(country, str) else None)
        connector = context.get("connector")
        failed = connector if isinstance(connector, str) else None
        # One pass over the candidates. The event time first, then each distinct execution moment; ``slots`` maps
        # a row to its moment. Keyed by identity: the candidates keep their datetimes alive, so no id is reused
        # during the loop. A grid lists each kind's candidates together and repeats the same few (action,
        # strategy, connector, channel) kinds across requests: a kind is looked up once per run, and encoded once
        # per process; ``run_lengths`` counts the rows of each run.
        moments = [event]
        slot_of: dict[int, int] = {}
        slots: list[int] = []
        kind_codes: list[float] = []  # per run of one kind: is_same_connector, then the codes
        run_lengths: list[int] = []
        memo = self._codes_memo
        action: Any = _NO_CANDIDATE
        strategy: Any = _NO_CANDIDATE
        target: Any = _NO_CANDIDATE
        channel: Any = _NO_CANDIDATE
        for candidate in candidates:
            at = candidate.execute_at
            slot = slot_of.get(id(at))
            if slot is None:
                slot = slot_of[id(at)] = len(moments)
                moments.append(at.timestamp())
            slots.append(slot)
            if not (
                candidate.action is action
                and candidate.strategy is strategy
                and candidate.connector is target
                and candidate.channel is channel
            ):
                action, strategy, target, channel = key = _KIND_OF(candidate)
                encoded = memo.get(key)
                if encoded is None:
                    encoded = self._kind_codes(candidate)
                    if len(memo) >= _CODES_MEMO_SIZE:
                        memo.clear()
                    memo[key] = encoded
                kind_codes += (math.nan if target is None else float(target == failed), *encoded)
                run_lengths.append(1)
            else:
                run_lengths[-1] += 1
        if zone_name == "UTC":
            offsets = [0.0 if math.isfinite(t) else math.nan for t in moments]
        else:
            offsets = [
                math.nan if not math.isfinite(t) else _hour_offset(zone_name, math.floor(t / 3600.0)) for t in moments
            ]
        # A request has a dozen distinct moments: their calendar fields are worked out on plain floats, where
        # numpy would pay its per-call overhead some fifty times (_local_moments matches _local_time exactly).
        local = _local_moments(moments, offsets)
        now = local[0]
        zones = _payday_zones_of(country if isinstance(country, str) else None)
        payday = _next_payday_epoch(event, zones)

        auth = context.get("authentication_type")
        currency = context.get("currency")
        rate = self.fx_to_usd.get(currency.upper(), math.nan) if isinstance(currency, str) else math.nan
        usd = _float_or_nan(context.get("amount")) * rate
        derived = {
            "is_three_ds": float(isinstance(auth, str) and auth.startswith("three_ds")),
            "amount_usd": usd,
            # A negative amount is bad data, not a number to take the log of (as _log1p_nonnegative).
            "log_amount_usd": float(np.log1p(usd)) if usd >= 0.0 else math.nan,
            "local_hour": now[0],
            "local_weekday": now[1],
            "local_day": now[2],
            "days_to_next_payday": (payday - event) / _SECONDS_PER_DAY,
            "is_month_end": now[3],
            "days_since_first_failure": (event - _float_or_nan(context.get("first_failure_ts"))) / _SECONDS_PER_DAY,
            "hours_since_last_nudge": (event - _float_or_nan(context.get("last_nudge_ts"))) / 3600.0,
        }
        row = [math.nan] * plan.width
        for j, name in plan.context_numbers:
            value = context.get(name)
            row[j] = math.nan if value is None else float(value)
        for j, name in plan.derived_numbers:
            row[j] = derived[name]
        for j, name, codes in plan.categories:
            value = context.get(name)
            row[j] = codes.get(value if isinstance(value, str) else None, OTHER_CODE)
        matrix = np.array(row, dtype=np.float32).reshape(1, plan.width).repeat(n, axis=0)

        if plan.moment_runs:
            # np.maximum's answer (NaN stays NaN); log1p stays numpy's, whose rounding may differ from math's.
            delays = [
                (delay if delay >= 0.0 or delay != delay else 0.0) / 3600.0 for delay in (t - event for t in moments)
            ]
            log_delays = np.log1p(np.array(delays, dtype=np.float64)).tolist()
            by_moment: list[float] = []
            for t, delay, log_delay, (hour, weekday, day, month_end) in zip(
                moments, delays, log_delays, local, strict=True
            ):
                to_payday = (_next_payday_epoch(t, zones) - t) / _SECONDS_PER_DAY
                by_moment += (delay, log_delay, hour, weekday, day, to_payday, month_end, float(t >= payday))
            table = np.array(by_moment, dtype=np.float64).reshape(len(moments), len(_MOMENT_FEATURES))
            per_row = table[np.array(slots, dtype=np.intp)]
            for first_column, end_column, first_source, end_source in plan.moment_runs:
                matrix[:, first_column:end_column] = per_row[:, first_source:end_source]
        if plan.kind_runs and n:
            per_row = (
                np.array(kind_codes, dtype=np.float64)
                .reshape(len(run_lengths), 1 + len(_CANDIDATE_VALUE))
                .repeat(run_lengths, axis=0)
            )
            for first_column, end_column, first_source, end_source in plan.kind_runs:
                matrix[:, first_column:end_column] = per_row[:, first_source:end_source]
        if plan.retired:
            # A bundle trained with the retired payday features: derive's numpy functions on the request's moments,
            # each row decided at the event. A spec without them never comes here (its plan has none).
            times = np.array(moments, dtype=np.float64)
            time_offsets = np.array(offsets, dtype=np.float64)
            retired = _retired_payday_features(
                _local_time(np.full_like(times, event), np.full_like(time_offsets, time_offsets[0])),
                _local_time(times, time_offsets),
            )
            rows = np.array(slots, dtype=np.intp)
            for j, name in plan.retired:
                matrix[:, j] = retired[name][rows]
        return matrix

    def _kind_codes(self, candidate: Candidate) -> tuple[float, ...]:
        """The codes of a candidate's columns (``_CANDIDATE_VALUE`` order; NaN for a column the spec lacks)."""
        return tuple(
            float(self._lookup(name).get(value_of(candidate), OTHER_CODE)) if name in self.vocabularies else math.nan
            for name, value_of in _CANDIDATE_VALUE.items()
        )

    def _request_plan(self) -> _RequestPlan:
        """Where each feature goes in the matrix, split by what transform_request derives it from (made once)."""
        if self._plan is None:
            positions = {name: j for j, name in enumerate(self.columns)}
            context_numbers = frozenset(CONTEXT_NUM) - _RAW_ONLY_NUMBERS - _REQUEST_DERIVED
            kinds = [(positions[name], k + 1) for k, name in enumerate(_CANDIDATE_VALUE) if name in positions]
            if "is_same_connector" in positions:
                kinds.append((positions["is_same_connector"], 0))
            self._plan = _RequestPlan(
                width=len(positions),
                context_numbers=tuple((positions[name], name) for name in self.numeric if name in context_numbers),
                derived_numbers=tuple((positions[name], name) for name in self.numeric if name in _REQUEST_DERIVED),
                categories=tuple(
                    (positions[name], name, self._lookup(name))
                    for name in self.vocabularies
                    if name not in _CANDIDATE_VALUE
                ),
                moment_runs=_column_runs(
                    (positions[name], k) for k, name in enumerate(_MOMENT_FEATURES) if name in positions
                ),
                kind_runs=_column_runs(kinds),
                retired=tuple((positions[name], name) for name in self.retired_features),
            )
        return self._plan

    def decode(self, name: str, code: float) -> str:
        """The category a code stands for (``"other"`` for the shared code)."""
        if not math.isfinite(code) or int(code) == OTHER_CODE:
            return "other"
        vocabulary = self.vocabularies[name]
        position = int(code) - 1
        return vocabulary[position] if 0 <= position < len(vocabulary) else "other"

    def to_json(self) -> str:
        """Serialise (column order and vocabularies)."""
        return json.dumps(
            {
                "numeric": self.numeric,
                "vocabularies": self.vocabularies,
                "fx_to_usd": self.fx_to_usd,
                "min_count": self.min_count,
            },
            sort_keys=False,
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> FeatureSpec:
        """Inverse of :meth:`to_json`."""
        data = json.loads(text)
        try:
            spec = cls(
                numeric=list(data["numeric"]),
                vocabularies={k: list(v) for k, v in data["vocabularies"].items()},
                fx_to_usd={str(k): float(v) for k, v in data["fx_to_usd"].items()},
                min_count=int(data["min_count"]),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"feature spec JSON is malformed: {exc!r}") from exc
        # A feature this code does not build would reach the model as NaN on the request path: refuse instead.
        # The retired payday features are still built, for the bundles trained with them.
        unknown = [name for name in spec.numeric if name not in NUMERIC_FEATURES and name not in RETIRED_FEATURES]
        unknown += [name for name in spec.vocabularies if name not in CATEGORICAL_FEATURES]
        if unknown:
            raise ValueError(
                f"feature spec lists features this code does not build: {', '.join(unknown)} "
                "(not a feature of this version); retrain the model with this version"
            )
        return spec


def _tokens(values: np.ndarray) -> list[str]:
    return [v if isinstance(v, str) else MISSING for v in values]


# ----------------------------------------------------------------------------------------------------------------
# Serving: one request -> context -> one row per candidate


def catalog_columns(normalised: NormalisedError, merchant_advice_code: str | None) -> dict[str, Any]:
    """The raw context columns that come from the error catalog's verdict."""
    advice = normalised.merchant_advice
    return {
        "error_class": normalised.error_class.value,
        "visa_category": None if normalised.visa_category is None else str(normalised.visa_category),
        "known_code": float(normalised.known_code),
        "mac_never_retry": math.nan
        if merchant_advice_code is None and advice is None
        else float(advice is not None and advice.never_retry),
    }


def _ts(value: datetime) -> float:
    return value.timestamp()


def _clicked_by(clicked_at: datetime | None, when: datetime) -> float:
    return float(clicked_at is not None and clicked_at <= when)


#: (strategy, its ``tried_`` column): read once, as ``Enum.value`` is a Python-level property.
_TRIED_COLUMNS: tuple[tuple[Strategy, str], ...] = tuple((s, f"tried_{s.value}") for s in RETRY_STRATEGIES)


def context_from_request(request: DecisionRequest, catalog: Normaliser | None = None) -> dict[str, Any]:
    """The raw context columns (one scalar each) of a live decision request, except the text model's outputs.

    History semantics match ``model.training.decision_points``: ``history.attempts`` are the order's attempts up to
    the decision time (the failure itself included); when it is empty, the failure is taken as the only attempt.
    """
    failure, payment, customer = request.failure, request.payment, request.customer
    event_ts = _ts(request.event_time)
    attempts = sorted(request.history.attempts, key=lambda a: a.attempt_number)
    nudges = sorted((n for n in request.history.nudges if n.sent_at <= request.event_time), key=lambda n: n.sent_at)
    failed = [a for a in attempts if a.status != "success"]
    strategies = {a.strategy for a in attempts}
    context: dict[str, Any] = {
        "connector": failure.connector,
        "error_code": failure.error_code,
        "error_message": failure.error_message,
        "network_decline_code": failure.network_decline_code,
        "merchant_advice_code": failure.merchant_advice_code,
        "unified_code": failure.unified_code,
        "card_network": payment.card_network,
        "payment_method": payment.payment_method,
        "payment_method_type": payment.payment_method_type,
        "issuer": payment.issuer,
        "currency": request.currency,
        "customer_country": customer.country,
        "authentication_type": payment.authentication_type,
        "last_channel": str(nudges[-1].channel) if nudges else None,
        "amount": float(request.amount),
        "event_ts": event_ts,
        "first_failure_ts": _ts(failed[0].created_at) if failed else event_ts,
        "last_nudge_ts": _ts(nudges[-1].sent_at) if nudges else math.nan,
        "is_recurring": float(payment.is_recurring),
        "is_network_token": float(payment.is_network_token),
        "phone_present": float(customer.phone_present),
        "email_present": float(customer.email_present),
        "n_attempts": float(max(len(attempts), 1)),
        # Every re-attempt, one with a strategy winback does not know included (as the hard rules count them).
        "n_silent_retries": float(sum(a.strategy not in NOT_SILENT_RETRY_STRATEGIES for a in attempts)),
        **{name: float(strategy in strategies) for strategy, name in _TRIED_COLUMNS},
        "n_connectors_tried": float(len({a.connector for a in attempts}) or 1),
        "n_nudges": float(len(nudges)),
        "last_nudge_clicked": _clicked_by(nudges[-1].clicked_at, request.event_time) if nudges else math.nan,
    }
    normalised = normalise_request(load_catalog() if catalog is None else catalog, request)
    context.update(catalog_columns(normalised, failure.merchant_advice_code))
    return context


def expand_candidates(context: Mapping[str, Any], candidates: Sequence[Candidate]) -> dict[str, np.ndarray]:
    """The decision frame of one request: context columns repeated, one row per candidate."""
    n = len(candidates)
    frame: dict[str, np.ndarray] = {}
    for name in CONTEXT_STR:
        column = np.empty(n, dtype=object)
        column[:] = context.get(name)
        frame[name] = column
    for name in CONTEXT_NUM:
        value = context.get(name, math.nan)
        frame[name] = np.full(n, math.nan if value is None else float(value), dtype=np.float64)
    for name, value_of in _CANDIDATE_VALUE.items():
        column = np.empty(n, dtype=object)
        column[:] = [value_of(c) for c in candidates]
        frame[name] = column
    frame["execute_ts"] = np.array([_ts(c.execute_at) for c in candidates], dtype=np.float64)
    return frame


def is_retry(actions: np.ndarray) -> npt.NDArray[np.bool_]:
    """Rows whose candidate is a silent retry."""
    return np.asarray(np.asarray(actions, dtype=object) == Action.RETRY.value, dtype=np.bool_)
