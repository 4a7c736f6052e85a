"""The history files of CONTRACT.md section 3: one declared schema, readers, writers and order reconstruction.

``attempts`` has one row per payment attempt, ``nudges`` one row per retarget message. Both are read from
Parquet or CSV, coerced to the contract's types and validated as a whole: every bad row is reported with its
row number, column and reason, and nothing is returned when anything is wrong.

``stops`` (optional, an extra file the contract allows) has one row per logged ``stop`` decision: a stop leaves
no attempt or nudge behind, so without it the stop's propensity is lost and the off-policy evaluation cannot
count the decision point (``model.evaluation.logged_decisions``). Producers that write it: the simulator and
``winback history export``; a history without it still reads, and the evaluation says that stops are missing.

Row numbers in reports are 1-based data-row numbers as a person counts them: row 1 is the first data row,
for Parquet and CSV alike (in a CSV file, row N is on line N + 1, below the header).

Rules beyond the plain column types, decided here and checked on every read:

- strings are never empty (CSV cannot tell an empty string from a missing value; use null);
- a failed attempt carries at least one of ``error_code``, ``unified_code``, ``network_decline_code`` or
  ``error_message``, so it can be classified; a successful attempt may carry an error code (it is ignored);
- ``nudge_id`` is set exactly on ``retarget_link`` attempts;
- a nudge is not clicked before it is sent;
- across rows and files (``read_history``): attempts of an order are numbered 1..n without gaps in
  ``created_at`` order, attempt 1 and only attempt 1 has strategy ``initial``, nothing follows a successful
  attempt, ``merchant_id``/``currency``/``customer_id`` are constant per order, every nudge belongs to an order
  of the attempts file (same merchant), and a ``retarget_link`` attempt names a nudge of its own order that was
  sent before the attempt;
- a stop (``stops`` file) belongs to an order of the attempts file (same merchant); its ``attempt_number`` is a
  failed attempt of that order, decided at or after that attempt and not after the order's next attempt; its
  ``decision_id`` is unique in the stops file and not the decision of any attempt or nudge (a decision has one
  action).

Read, with a warning (``History.warnings``, shown by the commands), never refused: booleans written as 1 and 0
(once per column); a nudge clicked but marked undelivered (read as delivered: the click shows it arrived); an
amount that changes within an order (the contract does not fix it); two actions of one order (retry attempts and
nudges; payments through a link are not actions) carrying one ``decision_id`` (a decision has one action, but a
producer may log a cascade decided once, or a retry and a nudge, that way). Refused: a ``decision_id`` on rows of
two orders (a decision is made for one order), and a timestamp before 1970 (no decision request can carry it, so
training's replay of the history cannot).

Extra columns are allowed and kept (from CSV they come back as strings).
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Final, NoReturn

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pyarrow
import pyarrow.parquet as pq

from model.forked import map_in_order
from model.requests import EARLIEST_YEAR
from model.vocab import RETRY_STRATEGIES, AttemptStatus, AuthenticationType, Channel, Strategy

__all__ = [
    "ATTEMPT_COLUMNS",
    "DEFAULT_CAP",
    "DEFAULT_PARTITION_ROWS",
    "NUDGE_COLUMNS",
    "ORDER_COLUMNS",
    "STOP_COLUMNS",
    "AttemptsSchema",
    "History",
    "HistoryError",
    "HistoryWriter",
    "NudgesSchema",
    "PartitionedHistory",
    "Problem",
    "StopsSchema",
    "ValidationReport",
    "attempts_writer",
    "nudges_writer",
    "read_attempts",
    "read_history",
    "read_nudges",
    "read_stops",
    "reconstruct_orders",
    "split_history",
    "stops_beside",
    "stops_writer",
    "write_attempts",
    "write_nudges",
    "write_stops",
]

ATTEMPT_COLUMNS: Final[tuple[str, ...]] = (
    "merchant_id",
    "order_id",
    "txn_id",
    "attempt_number",
    "created_at",
    "amount",
    "currency",
    "customer_id",
    "phone_present",
    "email_present",
    "customer_country",
    "payment_method",
    "payment_method_type",
    "card_network",
    "issuer",
    "is_recurring",
    "is_network_token",
    "authentication_type",
    "connector",
    "strategy",
    "nudge_id",
    "status",
    "error_code",
    "error_message",
    "network_decline_code",
    "merchant_advice_code",
    "unified_code",
    "decision_id",
    "propensity",
)

NUDGE_COLUMNS: Final[tuple[str, ...]] = (
    "merchant_id",
    "order_id",
    "nudge_id",
    "sent_at",
    "channel",
    "template_id",
    "delivered",
    "clicked_at",
    "decision_id",
    "propensity",
)

#: The optional ``stops`` file: one row per logged stop decision (a stop leaves no attempt or nudge row).
STOP_COLUMNS: Final[tuple[str, ...]] = (
    "merchant_id",
    "order_id",
    "decision_id",  # the stop decision's id (unique; no attempt or nudge carries it)
    "decided_at",  # the decision point's time (the request's event_time), UTC
    "attempt_number",  # the order's last attempt then: the failure the stop answered
    "propensity",  # the logging policy's probability of stopping there; null when not a policy's choice
)

ORDER_COLUMNS: Final[tuple[str, ...]] = (
    "merchant_id",
    "order_id",
    "customer_id",
    "amount",
    "currency",
    "initially_succeeded",
    "first_failure_at",
    "n_attempts",
    "n_retries",
    "n_nudges",
    "recovered",
    "recovered_at",
    "time_to_recovery",
    "recovering_strategy",
    "strategies_used",
    "first_error_code",
    "first_connector",
)

DEFAULT_CAP: Final = 50
#: Every file's columns, in the order a report lists them.
_ALL_COLUMNS: Final = tuple(dict.fromkeys((*ATTEMPT_COLUMNS, *NUDGE_COLUMNS, *STOP_COLUMNS)))

_TS: Final = "datetime64[ns, UTC]"
_RETARGET: Final = Strategy.RETARGET_LINK.value
_FAILURE: Final = AttemptStatus.FAILURE.value
_SUCCESS: Final = AttemptStatus.SUCCESS.value
_FAILURE_REASON_COLUMNS: Final = ("error_code", "unified_code", "network_decline_code", "error_message")

# Reasons of the schema's checks; pandera reports them as the failing check's name.
_MISSING_VALUE: Final = "missing value (the column is not nullable)"
_EMPTY_STRING: Final = "empty string (leave the field null instead)"
_RETARGET_NEEDS_NUDGE: Final = "a retarget_link attempt needs the nudge_id of the nudge whose link was used"
_NUDGE_ONLY_ON_RETARGET: Final = "nudge_id is set but strategy is not retarget_link"
_FAILURE_NEEDS_REASON: Final = (
    "status is failure but error_code, unified_code, network_decline_code and error_message are all null"
)
_CLICK_BEFORE_SEND: Final = "clicked_at is before sent_at"
#: Column that a frame-wide check's failure is reported under.
_FRAME_CHECK_COLUMN: Final[dict[str, str]] = {
    _RETARGET_NEEDS_NUDGE: "nudge_id",
    _NUDGE_ONLY_ON_RETARGET: "nudge_id",
    _FAILURE_NEEDS_REASON: "error_code",
    _CLICK_BEFORE_SEND: "clicked_at",
}


def _one_of(values: Iterable[str]) -> str:
    return "must be one of " + ", ".join(values)


def _text(*checks: pa.Check, nullable: bool = False, unique: bool = False) -> pa.Column:
    return pa.Column(
        "string",
        checks=[*checks, pa.Check.str_length(min_value=1, error=_EMPTY_STRING)],
        nullable=nullable,
        unique=unique,
    )


def _enum(values: Iterable[str]) -> pa.Column:
    allowed = [str(v) for v in values]
    return _text(pa.Check.isin(allowed, error=_one_of(allowed)))


def _propensity() -> pa.Column:
    return pa.Column(
        "float64",
        pa.Check(lambda s: (s > 0) & (s <= 1), error="propensity must be in (0, 1]"),
        nullable=True,
    )


def _frame_rule(needs: tuple[str, ...], error: str, ok: Callable[[pd.DataFrame], pd.Series]) -> pa.Check:
    def check(df: pd.DataFrame) -> pd.Series:
        if not set(needs) <= set(df.columns):  # a missing column is reported on its own
            return pd.Series(True, index=df.index)
        return ok(df).fillna(True).astype(bool)

    return pa.Check(check, error=error)


def _is(s: pd.Series, value: str) -> pd.Series:
    return s.eq(value).fillna(False).astype(bool)


AttemptsSchema: Final = pa.DataFrameSchema(
    {
        "merchant_id": _text(),
        "order_id": _text(),
        "txn_id": _text(unique=True),
        "attempt_number": pa.Column("int64", pa.Check.ge(1, error="attempt_number must be >= 1")),
        "created_at": pa.Column(_TS),
        "amount": pa.Column(
            "float64",
            [
                pa.Check.ge(0, error="amount must be >= 0"),
                pa.Check(lambda s: np.isfinite(s), error="amount must be finite"),
            ],
        ),
        "currency": _text(pa.Check.str_matches(r"^[A-Z]{3}$", error="must be a 3-letter uppercase ISO-4217 code")),
        "customer_id": _text(),
        "phone_present": pa.Column("bool"),
        "email_present": pa.Column("bool"),
        "customer_country": _text(
            pa.Check.str_matches(r"^[A-Z]{2}$", error="must be a 2-letter uppercase ISO-3166 alpha-2 code")
        ),
        "payment_method": _text(),
        "payment_method_type": _text(),
        "card_network": _text(nullable=True),
        "issuer": _text(nullable=True),
        "is_recurring": pa.Column("bool"),
        "is_network_token": pa.Column("bool"),
        "authentication_type": _enum(AuthenticationType),
        "connector": _text(),
        "strategy": _enum(Strategy),
        "nudge_id": _text(nullable=True),
        "status": _enum(AttemptStatus),
        "error_code": _text(nullable=True),
        "error_message": _text(nullable=True),
        "network_decline_code": _text(nullable=True),
        "merchant_advice_code": _text(nullable=True),
        "unified_code": _text(nullable=True),
        "decision_id": _text(nullable=True),
        "propensity": _propensity(),
    },
    checks=[
        _frame_rule(
            ("strategy", "nudge_id"),
            _RETARGET_NEEDS_NUDGE,
            lambda df: ~_is(df["strategy"], _RETARGET) | df["nudge_id"].notna(),
        ),
        _frame_rule(
            ("strategy", "nudge_id"),
            _NUDGE_ONLY_ON_RETARGET,
            lambda df: _is(df["strategy"], _RETARGET) | df["nudge_id"].isna(),
        ),
        _frame_rule(
            ("status", *_FAILURE_REASON_COLUMNS),
            _FAILURE_NEEDS_REASON,
            lambda df: ~_is(df["status"], _FAILURE) | df[list(_FAILURE_REASON_COLUMNS)].notna().any(axis=1),
        ),
    ],
    unique=["order_id", "attempt_number"],
    strict=False,
    name="attempts",
)
"""The ``attempts`` table: one row per payment attempt (contract types; extra columns allowed)."""

NudgesSchema: Final = pa.DataFrameSchema(
    {
        "merchant_id": _text(),
        "order_id": _text(),
        "nudge_id": _text(unique=True),
        "sent_at": pa.Column(_TS),
        "channel": _enum(Channel),
        "template_id": _text(),
        "delivered": pa.Column("bool"),
        "clicked_at": pa.Column(_TS, nullable=True),
        "decision_id": _text(nullable=True),
        "propensity": _propensity(),
    },
    checks=[
        _frame_rule(("sent_at", "clicked_at"), _CLICK_BEFORE_SEND, lambda df: ~(df["clicked_at"] < df["sent_at"])),
    ],
    strict=False,
    name="nudges",
)
"""The ``nudges`` table: one row per retarget message (contract types; extra columns allowed)."""

StopsSchema: Final = pa.DataFrameSchema(
    {
        "merchant_id": _text(),
        "order_id": _text(),
        "decision_id": _text(unique=True),
        "decided_at": pa.Column(_TS),
        "attempt_number": pa.Column("int64", pa.Check.ge(1, error="attempt_number must be >= 1")),
        "propensity": _propensity(),
    },
    strict=False,
    name="stops",
)
"""The optional ``stops`` table: one row per logged stop decision (extra columns allowed)."""


# ---------------------------------------------------------------------------------------------------------
# Problems and the report


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a history file; ``row`` is the 1-based data row (None for a whole column/file)."""

    file: str
    row: int | None
    column: str | None
    reason: str

    def format(self) -> str:
        """Render as ``file:row N: column C: reason`` (parts that do not apply are left out)."""
        where = self.file if self.row is None else f"{self.file}:row {self.row}"
        if self.column is not None:
            where += f": column {self.column}"
        return f"{where}: {self.reason}"


@dataclass
class ValidationReport:
    """The problems found in history files: the first ``cap`` of them (by file, row, column) and the total."""

    problems: list[Problem] = field(default_factory=list)
    total: int = 0
    cap: int = DEFAULT_CAP

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return self.total == 0

    def naming(self, files: Mapping[str, str]) -> ValidationReport:
        """This report with each file that is a key of ``files`` named by its value: files read under one name
        and kept under another (written beside their place, then moved in), whose rows stay as they are."""
        return replace(self, problems=[replace(p, file=files.get(p.file, p.file)) for p in self.problems])

    def leaving_out(self, said: Callable[[Problem], bool]) -> ValidationReport:
        """This report without the shown problems ``said`` picks (said elsewhere already), the total counting
        them out too, so ``... and K more`` still counts only the problems not shown."""
        kept = [problem for problem in self.problems if not said(problem)]
        return replace(self, problems=kept, total=self.total - (len(self.problems) - len(kept)))

    def format(self) -> str:
        """One line per shown problem, then ``... and K more`` for those past the cap."""
        shown = self.problems[: self.cap]
        lines = [p.format() for p in shown]
        if self.total > len(shown):
            lines.append(f"... and {self.total - len(shown)} more")
        return "\n".join(lines)


class HistoryError(ValueError):
    """A history file cannot be used; ``report`` lists why (row, column and reason for every bad row)."""

    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        noun = "problem" if report.total == 1 else "problems"
        super().__init__(f"invalid history: {report.total} {noun}\n{report.format()}")


class _Collector:
    """Gathers problems, keeping only what can be shown, but counting all of them."""

    def __init__(self, cap: int, column_order: Sequence[str], *, notes: bool = True) -> None:
        self.cap = cap
        self.total = 0
        self._kept: list[Problem] = []
        self._files: dict[str, int] = {}
        self._columns = {c: i for i, c in enumerate(column_order)}
        self._file_level: set[Problem] = set()
        #: Per file: the file row of each position of the frame being checked (a partition of the file).
        self.row_maps: dict[str, np.ndarray[Any, Any]] = {}
        #: Values read, but not as written or not as plausible as they look: said, never refused (``warnings``).
        self.notes: _Collector | None = _Collector(cap, column_order, notes=False) if notes else None

    def number(self, file: str, position: int) -> int:
        """The 1-based file row of a 0-based position in the frame being checked."""
        rows = self.row_maps.get(file)
        return int(position if rows is None else rows[position]) + 1

    def register(self, file: str) -> None:
        """Fix the place of ``file`` in the report (files are listed in the order they were registered)."""
        self._files.setdefault(file, len(self._files))
        if self.notes is not None:
            self.notes.register(file)

    def add(self, file: str, row: int | None, column: str | None, reason: str) -> None:
        self.register(file)
        problem = Problem(file, row, column, reason)
        if row is None:
            if problem in self._file_level:
                return  # a whole-file problem, seen again in another partition of the same file
            self._file_level.add(problem)
        self.total += 1
        self._kept.append(problem)

    def note_rows(
        self, file: str, column: str | None, positions: np.ndarray[Any, Any], reason: Callable[[int], str]
    ) -> None:
        """Like ``add_rows``, for a warning: the rows are read (as ``reason`` says), not refused."""
        assert self.notes is not None
        self.notes.row_maps = self.row_maps
        self.notes.add_rows(file, column, positions, reason)

    def warnings(self) -> ValidationReport:
        """The warnings of the files read (``note_rows``): what was read other than as written, or is worth a look."""
        return ValidationReport() if self.notes is None else self.notes.report()

    def add_rows(
        self, file: str, column: str | None, positions: np.ndarray[Any, Any], reason: Callable[[int], str]
    ) -> None:
        """Report the rows at 0-based ``positions``; ``reason(position)`` is only called for those kept."""
        positions = np.sort(np.asarray(positions, dtype=np.int64))
        for pos in positions[: self.cap]:
            self.add(file, self.number(file, int(pos)), column, reason(int(pos)))
        self.total += max(0, len(positions) - self.cap)

    def report(self) -> ValidationReport:
        big = len(self._columns)

        def key(p: Problem) -> tuple[int, int, int, str, str]:
            col = self._columns.get(p.column, big) if p.column is not None else -1
            return (self._files.get(p.file, 0), p.row or 0, col, p.column or "", p.reason)

        problems = sorted(self._kept, key=key)[: self.cap]
        return ValidationReport(problems=problems, total=self.total, cap=self.cap)

    def raise_if_any(self) -> None:
        if self.total:
            raise HistoryError(self.report())

    def absorb(self, other: _Collector) -> None:
        """Add what another collector (of another partition of the same files) found."""
        if self.notes is not None and other.notes is not None:
            self.notes.absorb(other.notes)
        for file in other._files:
            self.register(file)
        repeated = 0
        for problem in other._kept:
            if problem.row is None:
                if problem in self._file_level:
                    repeated += 1
                    continue
                self._file_level.add(problem)
            self._kept.append(problem)
        self.total += other.total - repeated


# ---------------------------------------------------------------------------------------------------------
# Reading and coercion


def _read_raw(path: Path, label: str) -> pd.DataFrame:
    # The same reader as ``split_history``: one file gives one report, whichever of the two reads it.
    frame: pd.DataFrame = _read_arrow(path, label).to_pandas()
    return frame


def _fail(label: str, reason: str) -> NoReturn:
    raise HistoryError(ValidationReport([Problem(label, None, None, reason)], total=1))


def _dtype_name(s: pd.Series) -> str:
    return str(s.dtype)


def _is_textual(s: pd.Series) -> bool:
    return s.dtype == object or isinstance(s.dtype, pd.StringDtype)


def _coerce_text(s: pd.Series, label: str, column: str, out: _Collector) -> pd.Series | None:
    if isinstance(s.dtype, pd.StringDtype):
        return s.astype("string")
    kind = pd.api.types.infer_dtype(s, skipna=True)
    if kind in ("string", "empty"):
        return s.astype("string")
    if s.dtype != object:
        out.add(label, None, column, f"expected strings, found dtype {_dtype_name(s)}")
        return None
    values = s.to_numpy()
    bad = np.flatnonzero(s.notna().to_numpy() & ~np.fromiter((isinstance(v, str) for v in values), bool, len(s)))
    out.add_rows(label, column, bad, lambda i: f"expected a string, got {type(values[i]).__name__} {values[i]!r}")
    return s.where(~s.index.isin(s.index[bad])).astype("string")


def _bad_text_rows(label: str, column: str, text: pd.Series, bad: pd.Series, what: str, out: _Collector) -> None:
    values = text.to_numpy()
    out.add_rows(label, column, np.flatnonzero(bad.to_numpy()), lambda i: f"{what}: {values[i]!r}")


def _coerce_float(s: pd.Series, label: str, column: str, out: _Collector) -> pd.Series | None:
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        return s.astype("float64")
    if not _is_textual(s):
        out.add(label, None, column, f"expected numbers, found dtype {_dtype_name(s)}")
        return None
    text = s.astype("string")
    num = pd.to_numeric(text, errors="coerce").astype("float64")
    _bad_text_rows(label, column, text, text.notna() & num.isna(), "not a number", out)
    return num


def _coerce_int(s: pd.Series, label: str, column: str, out: _Collector) -> pd.Series | None:
    if pd.api.types.is_integer_dtype(s.dtype) and not s.isna().any():
        return s.astype("int64")
    if pd.api.types.is_bool_dtype(s.dtype) or not (pd.api.types.is_numeric_dtype(s.dtype) or _is_textual(s)):
        out.add(label, None, column, f"expected integers, found dtype {_dtype_name(s)}")
        return None
    text = s.astype("string")
    num = pd.to_numeric(text, errors="coerce").astype("float64")
    missing = text.isna()
    integral = pd.Series(np.isfinite(num) & (num == np.floor(num)), index=num.index)
    bad = ~missing & ~integral
    _bad_text_rows(label, column, text, bad, "not an integer", out)
    out.add_rows(label, column, np.flatnonzero(missing.to_numpy()), lambda _: _MISSING_VALUE)
    return num.where(~(bad | missing), 0).astype("int64")


_TRUE: Final = frozenset({"true", "1"})
_FALSE: Final = frozenset({"false", "0"})


#: How a boolean written as a number is read: said once per file and column (a database's 0/1 flags are common).
_BOOL_DIGITS: Final = "booleans written as 1 and 0: read 1 as true and 0 as false"


def _coerce_bool(s: pd.Series, label: str, column: str, out: _Collector) -> pd.Series | None:
    if pd.api.types.is_bool_dtype(s.dtype) and not s.isna().any():
        return s.astype("bool")
    # A Parquet integer column of 0/1 is read like the CSV's 1/0: it was refused with its dtype alone, no row.
    integers = pd.api.types.is_integer_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype)
    if not (pd.api.types.is_bool_dtype(s.dtype) or integers or _is_textual(s)):
        out.add(label, None, column, f"expected booleans (true/false), found dtype {_dtype_name(s)}")
        return None
    text = s.astype("string")
    lower = text.str.strip().str.lower()
    is_true = lower.isin(_TRUE).fillna(False).astype(bool)
    is_false = lower.isin(_FALSE).fillna(False).astype(bool)
    missing = text.isna()
    _bad_text_rows(label, column, text, ~missing & ~is_true & ~is_false, "not a boolean (true or false)", out)
    out.add_rows(label, column, np.flatnonzero(missing.to_numpy()), lambda _: _MISSING_VALUE)
    if out.notes is not None and lower.isin(("1", "0")).fillna(False).astype(bool).any():
        out.notes.add(label, None, column, _BOOL_DIGITS)
    return is_true


_TZ_SUFFIX: Final = r"(?:Z|[+-]\d{2}(?::?\d{2})?)$"


def _coerce_timestamp(s: pd.Series, label: str, column: str, out: _Collector) -> pd.Series | None:
    if isinstance(s.dtype, pd.DatetimeTZDtype):
        utc: pd.Series = s.dt.tz_convert("UTC").astype(_TS)
        return _refuse_early(utc, label, column, out)
    if pd.api.types.is_datetime64_dtype(s.dtype):
        out.add(label, None, column, "timestamps without timezone (naive datetime): store them as UTC")
        return None
    if not _is_textual(s):
        out.add(label, None, column, f"expected timestamps, found dtype {_dtype_name(s)}")
        return None
    text = s.astype("string").str.strip()
    present = text.notna()
    # A zone needs a time before it: a date's day ("2026-11-01") read as a UTC offset made it midnight UTC.
    has_time = text.str.contains(_TIME, regex=True).fillna(False).astype(bool)
    has_tz = has_time & text.str.contains(_TZ_SUFFIX, case=False, regex=True).fillna(False).astype(bool)
    without_tz = present & ~has_tz
    # Only a timestamp lacks a timezone: 'yesterday' was reported as one "without timezone (add Z or an offset)".
    naive = without_tz
    if without_tz.any():
        readable = pd.to_datetime(text.where(without_tz).str.upper(), format="ISO8601", errors="coerce").notna()
        naive = without_tz & readable
    parsed = pd.Series(pd.NaT, index=s.index, dtype=_TS)
    ok = present & has_tz
    if ok.any():
        parsed[ok] = pd.to_datetime(text[ok].str.upper(), utc=True, format="ISO8601", errors="coerce")
    unparsed = (ok & parsed.isna()) | (without_tz & ~naive)
    beyond = np.zeros(len(text), dtype=bool)
    values = text.to_numpy()
    for position in np.flatnonzero(unparsed.to_numpy(dtype=bool)):  # the bad rows only: a loop in Python
        beyond[position] = _beyond_pandas(values[position])
    out_of_range = pd.Series(beyond, index=s.index)
    _bad_text_rows(label, column, text, naive & has_time, "timestamp without timezone (add Z or an offset)", out)
    _bad_text_rows(label, column, text, naive & ~has_time, _DATE_ONLY, out)
    _bad_text_rows(label, column, text, out_of_range, _OUT_OF_RANGE, out)
    _bad_text_rows(label, column, text, unparsed & ~out_of_range, "not an ISO-8601 timestamp", out)
    return _refuse_early(parsed, label, column, out, text.to_numpy())


def _refuse_early(
    stamps: pd.Series, label: str, column: str, out: _Collector, written: np.ndarray[Any, Any] | None = None
) -> pd.Series:
    """``stamps`` with those before 1970 reported and made null (their rows then skip the schema checks).

    Every history timestamp becomes a decision request's time when training and evaluation replay the history
    (``model.history_request``), and a request takes none before 1970 (``model.requests.EARLIEST_YEAR``): a
    1900-01-01 ``created_at`` (SQL Server's and Excel's zero date, a placeholder for a missing one) was read, and
    ``winback train`` failed minutes later with a traceback of the evaluation's replay."""
    values = stamps.to_numpy(dtype="datetime64[ns]") if len(stamps) else np.array([], dtype="datetime64[ns]")
    early = ~np.isnat(values) & (values < _EARLIEST)
    if not early.any():
        return stamps
    out.add_rows(label, column, np.flatnonzero(early), partial(_early, values, written))
    return stamps.where(~early)


#: A time of day after the date ("T10", " 10"), which a timezone follows.
_TIME: Final = r"\d[Tt ]\d"
_DATE_ONLY: Final = "a date without a time and timezone (write e.g. 2026-11-01T10:15:00Z)"
#: What a pandas timestamp (nanoseconds since 1970 in 64 bits) holds, whole seconds inside it.
_FIRST_MOMENT: Final = datetime(1677, 9, 21, 0, 12, 44, tzinfo=UTC)
_LAST_MOMENT: Final = datetime(2262, 4, 11, 23, 47, 16, tzinfo=UTC)
_OUT_OF_RANGE: Final = f"timestamp outside the range winback reads ({EARLIEST_YEAR}-01-01 to 2262-04-11)"
#: The earliest time a decision request takes, so the earliest a history is read with (``_refuse_early``).
_EARLIEST: Final = np.datetime64(f"{EARLIEST_YEAR}-01-01T00:00:00", "ns")
_EARLY: Final = (
    f"timestamp before {EARLIEST_YEAR}, outside the range winback reads ({EARLIEST_YEAR}-01-01 to 2262-04-11): "
    "no decision can be made at it (a placeholder for a missing date?)"
)


def _beyond_pandas(value: str) -> bool:
    """Whether ``value`` is an ISO-8601 timestamp with a timezone that pandas cannot hold: out of its range."""
    try:
        moment = datetime.fromisoformat(value.upper()).astimezone(UTC)
    except (ValueError, OverflowError):
        return False
    return not _FIRST_MOMENT <= moment <= _LAST_MOMENT


def _kind(column: pa.Column) -> str:
    """The contract type of a schema column: string, float64, int64, bool or the UTC timestamp type."""
    name = str(column.dtype)
    return "string" if name.startswith("string") else name


_Coercer = Callable[[pd.Series, str, str, _Collector], "pd.Series | None"]
_COERCERS: Final[dict[str, _Coercer]] = {
    "string": _coerce_text,
    "float64": _coerce_float,
    "int64": _coerce_int,
    "bool": _coerce_bool,
    _TS: _coerce_timestamp,
}


def _coerce(
    raw: pd.DataFrame, schema: pa.DataFrameSchema, label: str, out: _Collector
) -> tuple[pd.DataFrame, list[str]]:
    """Bring the contract columns of ``raw`` to their types; returns the frame and the columns left unchecked."""
    frame = raw.reset_index(drop=True)
    bad_rows_before = out.total
    kept_rows = np.ones(len(frame), dtype=bool)
    unchecked: list[str] = []
    missing = [c for c in schema.columns if c not in frame.columns]
    if missing and (swapped := _another_kind_of_file(frame.columns, schema, missing)) is not None:
        # An attempts file given as the nudges file (or the other way round) was reported as every column of the
        # one missing and every row of the other wrong: hundreds of lines, none of them the cause.
        out.add(label, None, None, swapped)
        return frame, list(schema.columns)
    for name in missing:
        out.add(label, None, name, "missing column")
    unchecked.extend(missing)
    columns: dict[str, pd.Series] = {}
    for name, col in schema.columns.items():
        if name in missing:
            continue
        s = frame[name]
        if len(s) and s.isna().all():  # an all-null column has no type to go by
            s = pd.Series(pd.NA, index=frame.index, dtype="string")
        before = out.total
        coerced = _COERCERS[_kind(col)](s, label, name, out)
        if coerced is None:
            unchecked.append(name)
            continue
        if out.total > before:
            kept_rows &= _coerced_ok(s, coerced, _kind(col))
        columns[name] = coerced
    for name, values in columns.items():
        frame[name] = values
    order = [c for c in schema.columns if c in frame.columns]
    frame = frame[order + [c for c in frame.columns if c not in schema.columns]]
    if out.total > bad_rows_before and not kept_rows.all():
        # Rows that failed to parse are already reported; the schema checks look at the others only.
        frame = frame[kept_rows]
    return frame, unchecked


#: The history's kinds of file, by their columns (CONTRACT.md section 3).
_FILE_KINDS: Final = (("an attempts", ATTEMPT_COLUMNS), ("a nudges", NUDGE_COLUMNS), ("a stops", STOP_COLUMNS))


def _another_kind_of_file(columns: Iterable[object], schema: pa.DataFrameSchema, missing: list[str]) -> str | None:
    """What to say of a file that lacks ``missing`` of its own columns but has every column of another kind of
    history file (None when it has not): it was most likely given in that file's place."""
    present = {str(column) for column in columns}
    own = next(kind for kind, kind_columns in _FILE_KINDS if set(kind_columns) == set(schema.columns))
    for kind, kind_columns in _FILE_KINDS:
        if kind != own and set(kind_columns) <= present:
            lacks = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            return (
                f"has the columns of {kind} file, not of {own} file (no {lacks}): were two files given in each "
                "other's place?"
            )
    return None


def _coerced_ok(raw: pd.Series, coerced: pd.Series, dtype: str) -> np.ndarray[Any, Any]:
    """Rows whose value survived coercion (a present raw value did not turn into null or a placeholder)."""
    if dtype in ("int64", "bool"):
        text = raw.astype("string")
        if dtype == "int64":
            num = pd.to_numeric(text, errors="coerce")
            good = num.notna() & (num == np.floor(num))
        else:
            lower = text.str.strip().str.lower()
            good = lower.isin(_TRUE | _FALSE)
        result: np.ndarray[Any, Any] = good.fillna(False).astype(bool).to_numpy()
        return result
    return (raw.isna() | coerced.notna()).to_numpy()


def _validate(
    frame: pd.DataFrame, schema: pa.DataFrameSchema, label: str, unchecked: list[str], out: _Collector
) -> None:
    if unchecked:
        schema = copy.deepcopy(schema.remove_columns(unchecked))
        if schema.unique and set(schema.unique) & set(unchecked):
            schema.unique = None
    try:
        with warnings.catch_warnings():
            # pandera's own report builder trips a pandas FutureWarning; not ours to fix.
            warnings.simplefilter("ignore", FutureWarning)
            schema.validate(frame, lazy=True)
    except pa.errors.SchemaErrors as exc:
        _report_schema_errors(exc.failure_cases, frame, label, out)


def _report_schema_errors(cases: pd.DataFrame, frame: pd.DataFrame, label: str, out: _Collector) -> None:
    # ``frame`` keeps the raw 0-based row labels (bad rows are dropped, never renumbered): label + 1 is the row.
    for (column, check), group in cases.groupby(["column", "check"], dropna=False, sort=False):
        column = None if column is None or column != column else str(column)
        check = str(check)
        index = group["index"]
        if index.isna().all():
            if check.startswith("dtype("):
                out.add(label, None, column, f"expected dtype {check[6:-1]}, found {group['failure_case'].iloc[0]}")
            else:
                out.add(label, None, column, f"{check}: {group['failure_case'].iloc[0]}")
            continue
        rows = index.dropna().astype("int64").to_numpy()
        values: dict[int, Any] = dict(zip(rows.tolist(), group.loc[index.notna(), "failure_case"], strict=True))
        if check == "multiple_fields_uniqueness" or check in _FRAME_CHECK_COLUMN:
            continue  # reported once per row below
        if check == "not_nullable":
            out.add_rows(label, column, rows, lambda _: _MISSING_VALUE)
        elif check == "field_uniqueness":
            assert column is not None
            where = _rows_by_value(frame[column], rows)
            out.add_rows(label, column, rows, partial(_duplicate_at, column, values, where))
        else:
            out.add_rows(label, column, rows, partial(_failed_check, check, values))
    frame_level = cases[cases["check"].isin([*_FRAME_CHECK_COLUMN, "multiple_fields_uniqueness"])]
    for check, group in frame_level.groupby("check", sort=False):
        rows = np.unique(group["index"].dropna().astype("int64").to_numpy())
        if check == "multiple_fields_uniqueness":
            keys = frame.loc[rows, ["order_id", "attempt_number"]]
            pair: dict[int, tuple[Any, Any]] = dict(
                zip(rows.tolist(), zip(keys["order_id"], keys["attempt_number"], strict=True), strict=True)
            )
            where_pairs: dict[tuple[Any, Any], list[int]] = {}
            for r in rows.tolist():
                where_pairs.setdefault(pair[r], []).append(r)
            out.add_rows(
                label,
                "attempt_number",
                rows,
                partial(_duplicate_attempt, pair, where_pairs, partial(out.number, label)),
            )
        else:
            out.add_rows(label, _FRAME_CHECK_COLUMN[str(check)], rows, partial(_constant, str(check)))


def _constant(text: str, _position: int) -> str:
    return text


def _failed_check(check: str, values: dict[int, Any], position: int) -> str:
    return f"{check}, got {_show(values[position])}"


def _duplicate_at(column: str, values: dict[int, Any], where: dict[Any, list[int]], position: int) -> str:
    return _duplicate(column, values[position], where[values[position]])


def _duplicate_attempt(
    pair: dict[int, tuple[Any, Any]],
    where: dict[tuple[Any, Any], list[int]],
    row_number: Callable[[int], int],
    position: int,
) -> str:
    order_id, number = pair[position]
    rows = [row_number(r) - 1 for r in where[pair[position]]]
    return f"duplicate attempt_number {number} in order {order_id!r} (rows {_row_list(rows)})"


#: What follows "differs from ... on attempt 1 of the same order (row N)": refused, or read as written.
_MUST_BE_CONSTANT: Final = "; it must be constant per order"
_AMOUNT_AS_WRITTEN: Final = ": read as written; a decision point uses the amount of the failure it answers"


def _not_constant(
    values: np.ndarray[Any, Any],
    first_of: np.ndarray[Any, Any],
    row_number: Callable[[int], int],
    then: str,
    position: int,
) -> str:
    first = first_of[position]
    return (
        f"{_show(values[position])} differs from {_show(values[first])} on attempt 1 of the same order "
        f"(row {row_number(first)}){then}"
    )


def _show(value: Any) -> str:
    """``repr`` of a value as a person wrote it (no numpy wrapper)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _rows_by_value(s: pd.Series, rows: np.ndarray[Any, Any]) -> dict[Any, list[int]]:
    where: dict[Any, list[int]] = {}
    for r, v in zip(rows, s.loc[rows], strict=True):
        where.setdefault(v, []).append(int(r))
    return where


def _row_list(rows: list[int], limit: int = 5) -> str:
    shown = ", ".join(str(r + 1) for r in sorted(rows)[:limit])
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def _duplicate(column: str, value: Any, rows: list[int]) -> str:
    return f"duplicate {column} {_show(value)} (rows {_row_list(rows)})"


def _read_table(path: str | Path, schema: pa.DataFrameSchema, out: _Collector) -> pd.DataFrame:
    label = str(path)
    out.register(label)
    raw = _read_raw(Path(path), label)
    frame, unchecked = _coerce(raw, schema, label, out)
    _validate(frame, schema, label, unchecked, out)
    return _settle(frame, schema, label, out)


def _settle(frame: pd.DataFrame, schema: pa.DataFrameSchema, label: str, out: _Collector) -> pd.DataFrame:
    """Values the contract allows but that are read other than as written: warned of per row
    (``_Collector.note_rows``), never refused. Runs on a frame whose rows passed the schema (the rows of ``frame``
    are its 0-based positions in the file or partition)."""
    if out.total or out.notes is None:
        return frame  # a refused file: its warnings would only lengthen the report
    positions = np.arange(len(frame))
    if schema.name == "nudges" and {"delivered", "clicked_at"} <= set(frame.columns):
        # A click shows the message reached the customer; a provider's delivery receipt can be lost or wrong (the
        # executor itself records a nudge whose link was opened as delivered).
        clicked = frame["clicked_at"].notna().to_numpy() & ~frame["delivered"].to_numpy(dtype=bool)
        clicks = _utc_ns(frame["clicked_at"])
        out.note_rows(label, "delivered", positions[clicked], partial(_clicked_undelivered, clicks))
        if clicked.any():
            frame = frame.assign(delivered=frame["delivered"].to_numpy(dtype=bool) | clicked)
    return frame


def _clicked_undelivered(clicks: np.ndarray[Any, Any], position: int) -> str:
    return (
        f"delivered is false but the nudge was clicked at {_iso(clicks[position])}: read as delivered (the click "
        "shows it arrived; its delivery receipt was lost or wrong)"
    )


def _early(values: np.ndarray[Any, Any], written: np.ndarray[Any, Any] | None, position: int) -> str:
    # A CSV's value as written (its other reports quote it so), a typed one in ISO-8601.
    return f"{_EARLY}: {_iso(values[position]) if written is None else repr(written[position])}"


def _iso(stamp: Any) -> str:
    return str(pd.Timestamp(stamp, tz="UTC").isoformat())


def read_attempts(path: str | Path, *, cap: int = DEFAULT_CAP) -> pd.DataFrame:
    """Read and validate an ``attempts`` file (.parquet or .csv); raises ``HistoryError`` listing every bad row.

    CSV timestamps are ISO-8601 strings with ``Z`` or an offset; booleans are true/false (1/0 read with a warning);
    empty fields are null.
    """
    out = _Collector(cap, ATTEMPT_COLUMNS)
    frame = _read_table(path, AttemptsSchema, out)
    out.raise_if_any()
    return frame.reset_index(drop=True)


def read_nudges(path: str | Path, *, cap: int = DEFAULT_CAP) -> pd.DataFrame:
    """Read and validate a ``nudges`` file (.parquet or .csv); raises ``HistoryError`` listing every bad row."""
    out = _Collector(cap, NUDGE_COLUMNS)
    frame = _read_table(path, NudgesSchema, out)
    out.raise_if_any()
    return frame.reset_index(drop=True)


def read_stops(path: str | Path, *, cap: int = DEFAULT_CAP) -> pd.DataFrame:
    """Read and validate a ``stops`` file (.parquet or .csv) on its own; raises ``HistoryError`` listing every bad
    row. The rules against the attempts and nudges are checked by ``read_history``."""
    out = _Collector(cap, STOP_COLUMNS)
    frame = _read_table(path, StopsSchema, out)
    out.raise_if_any()
    return frame.reset_index(drop=True)


def stops_beside(attempts_path: str | Path) -> Path | None:
    """The ``stops`` file beside an attempts file (``stops.parquet`` or ``stops.csv``, the attempts file's format
    first), as the simulator and ``winback history export`` write it; None when there is none."""
    folder, suffix = Path(attempts_path).parent, Path(attempts_path).suffix.lower()
    for name in dict.fromkeys((f"stops{suffix}", "stops.parquet", "stops.csv")):
        if (folder / name).is_file():
            return folder / name
    return None


# ---------------------------------------------------------------------------------------------------------
# Cross-row and cross-file rules


@dataclass(frozen=True, eq=False)
class History:
    """Validated history tables: attempts and nudges, and the logged stops when the history has a stops file
    (None: the history does not say where its logging policy stopped)."""

    attempts: pd.DataFrame
    nudges: pd.DataFrame
    stops: pd.DataFrame | None = None
    #: What was read other than as written (a click on an undelivered nudge, 1/0 booleans) or as written but
    #: worth a look (an amount changing within an order): for the command to show.
    warnings: ValidationReport = field(default_factory=ValidationReport)


def _utc_ns(s: pd.Series) -> np.ndarray[Any, Any]:
    """A UTC timestamp column as plain ``datetime64[ns]`` values (NaT for null)."""
    values: np.ndarray[Any, Any] = s.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy(dtype="datetime64[ns]")
    return values


def _check_orders(a: pd.DataFrame, label: str, out: _Collector) -> None:
    n = len(a)
    if n == 0:
        return
    codes, uniques = pd.factorize(a["order_id"])
    num = a["attempt_number"].to_numpy()
    order = np.lexsort((num, codes))
    sorted_codes = codes[order]
    is_start = np.r_[True, sorted_codes[1:] != sorted_codes[:-1]]
    start = np.maximum.accumulate(np.where(is_start, np.arange(n), 0))
    sizes = np.bincount(codes)

    def oid(i: int) -> str:
        return repr(uniques[codes[i]])

    gap = num[order] != np.arange(n) - start + 1
    out.add_rows(
        label,
        "attempt_number",
        order[gap],
        lambda i: (
            f"attempt_number {num[i]} breaks the sequence: order {oid(i)} has {sizes[codes[i]]} "
            f"attempts, numbered 1..{sizes[codes[i]]} without gaps"
        ),
    )

    created = _utc_ns(a["created_at"])
    sorted_created = created[order]
    prev = np.full(n, -1, dtype=np.int64)
    prev[order[1:]] = order[:-1]
    earlier = ~is_start & np.r_[False, sorted_created[1:] < sorted_created[:-1]]
    out.add_rows(
        label,
        "created_at",
        order[earlier],
        lambda i: (
            f"created_at {pd.Timestamp(created[i], tz='UTC').isoformat()} is earlier than that of "
            f"attempt {num[prev[i]]} of order {oid(i)} (row {out.number(label, prev[i])})"
        ),
    )

    strategy = a["strategy"].to_numpy(dtype=object)
    first = num == 1
    initial = strategy == Strategy.INITIAL.value
    out.add_rows(
        label,
        "strategy",
        np.flatnonzero(first & ~initial),
        lambda i: f"attempt 1 of an order must have strategy 'initial', got {strategy[i]!r}",
    )
    out.add_rows(
        label,
        "strategy",
        np.flatnonzero(~first & initial),
        lambda i: f"strategy 'initial' is only for attempt 1 (this is attempt {num[i]})",
    )

    first_row = order[start]  # per sorted position: the row of its order's first attempt
    first_of = np.empty(n, dtype=np.int64)
    first_of[order] = first_row
    for column in ("merchant_id", "currency", "customer_id"):
        values = a[column].to_numpy(dtype=object)
        differs = values != values[first_of]
        out.add_rows(
            label,
            column,
            np.flatnonzero(differs),
            partial(_not_constant, values, first_of, partial(out.number, label), _MUST_BE_CONSTANT),
        )

    if out.notes is not None:
        # The contract does not fix an order's amount (a retry for a corrected amount, a fee added, a partial
        # payment): read as written, and said, since a decision point then uses the amount of the failure it
        # answers while the order summaries use attempt 1's.
        amount = a["amount"].to_numpy(dtype=np.float64)
        out.note_rows(
            label,
            "amount",
            np.flatnonzero(amount != amount[first_of]),
            partial(_not_constant, amount, first_of, partial(out.number, label), _AMOUNT_AS_WRITTEN),
        )

    success = (a["status"].to_numpy(dtype=object) == _SUCCESS)[order].astype(np.int64)
    before = np.cumsum(success) - success
    after_success = (before - before[start]) > 0
    out.add_rows(
        label,
        "attempt_number",
        order[after_success],
        lambda i: f"attempt {num[i]} comes after a successful attempt of order {oid(i)}; nothing may follow a success",
    )


def _check_decision_orders(files: Sequence[tuple[str, pd.Series, pd.Series]], out: _Collector) -> None:
    """A decision is made for one order (the decision API's request names it): a ``decision_id`` on rows of two
    orders, in the attempts or the nudges, is refused on every row of the second order, naming the first. One
    decision on a nudge and on the attempt made through its link (the same order) is fine. ``files``: (label,
    decision_id, order_id) per file, each in file row order."""
    ids = pd.concat([d.astype(object) for _, d, _ in files], ignore_index=True)
    orders = pd.concat([o.astype(object) for _, _, o in files], ignore_index=True)
    present = ids.notna().to_numpy()
    if not present.any():
        return
    at = np.flatnonzero(present)
    rows = pd.DataFrame({"id": ids.to_numpy()[at], "order": orders.to_numpy()[at], "at": at})
    first = rows.groupby("id", sort=False)[["order", "at"]].transform("first")
    bad = rows["order"].to_numpy() != first["order"].to_numpy()
    if not bad.any():
        return
    sizes = np.cumsum([0] + [len(d) for _, d, _ in files])
    where = {int(k): int(f) for k, f in zip(rows["at"].to_numpy()[bad], first["at"].to_numpy()[bad], strict=True)}

    def place(k: int) -> tuple[str, int]:
        index = int(np.searchsorted(sizes, k, side="right")) - 1
        return files[index][0], k - int(sizes[index])

    def reason(offset: int, position: int) -> str:
        label, row = place(where[offset + position])
        return (
            f"decision {ids[offset + position]!r} is also the decision of order {orders[where[offset + position]]!r}"
            f" ({label} row {out.number(label, row)}): a decision is made for one order"
        )

    for index, (label, _, _) in enumerate(files):
        start, end = int(sizes[index]), int(sizes[index + 1])
        mine = np.array([k - start for k in where if start <= k < end], dtype=np.int64)
        out.add_rows(label, "decision_id", mine, partial(reason, start))


def _check_one_action_per_decision(
    a: pd.DataFrame, nudges: pd.DataFrame, a_label: str, n_label: str, out: _Collector
) -> None:
    """A decision has one action: one retry attempt, or one nudge and the payments made through its link (its
    ``retarget_link`` attempts may carry the nudge's decision, and are no action of winback's). Two actions of one
    order (attempts other than ``retarget_link``, and nudges) carrying one ``decision_id`` are read as written, with
    a warning on each after the first (in time) naming the first: winback writes none (the executor, the export and
    the simulator give every retry and every nudge its own decision), but a producer may log a cascade decided once
    and carried out as two attempts, or a retry and a nudge sent beside it. Refusing would fail a history whose rows
    each make sense; unsaid, the off-policy evaluation would count each of them as a decision of its own."""
    if out.notes is None:
        return
    in_a = np.flatnonzero(a["decision_id"].notna().to_numpy() & (a["strategy"].to_numpy(dtype=object) != _RETARGET))
    in_n = np.flatnonzero(nudges["decision_id"].notna().to_numpy())
    ids = {a_label: a["decision_id"].to_numpy(dtype=object), n_label: nudges["decision_id"].to_numpy(dtype=object)}
    # Only actions whose decision_id is carried by another action can be warned of: almost none in a real history,
    # so the sort and grouping below run on those alone, not on every action of the history.
    shared = pd.Series(np.concatenate([ids[a_label][in_a], ids[n_label][in_n]])).duplicated(keep=False).to_numpy()
    in_a, in_n = in_a[shared[: len(in_a)]], in_n[shared[len(in_a) :]]
    if len(in_a) + len(in_n) < 2:
        return
    num = a["attempt_number"].to_numpy()
    nudge_id = nudges["nudge_id"].to_numpy(dtype=object)
    rows = pd.DataFrame(
        {
            "order": np.concatenate(
                [a["order_id"].to_numpy(dtype=object)[in_a], nudges["order_id"].to_numpy(dtype=object)[in_n]]
            ),
            "id": np.concatenate([ids[a_label][in_a], ids[n_label][in_n]]),
            "time": np.concatenate([_utc_ns(a["created_at"])[in_a], _utc_ns(nudges["sent_at"])[in_n]]),
            # Ties in time: attempts before nudges, each file's rows in attempt_number (file) order.
            "nudge": np.concatenate([np.zeros(len(in_a), dtype=bool), np.ones(len(in_n), dtype=bool)]),
            "seq": np.concatenate([num[in_a], in_n]),
            "at": np.concatenate([in_a, len(a) + in_n]),  # attempts, then nudges after them
        }
    )
    rows = rows.sort_values(["time", "nudge", "seq"], kind="stable")
    first = rows.groupby(["order", "id"], sort=False)["at"].transform("first").to_numpy()
    later = rows["at"].to_numpy() != first
    first_of = dict(zip(rows["at"].to_numpy()[later].tolist(), first[later].tolist(), strict=True))

    def place(k: int) -> tuple[str, int]:
        return (a_label, k) if k < len(a) else (n_label, k - len(a))

    def reason(offset: int, position: int) -> str:
        label = place(offset + position)[0]
        other, earlier = place(first_of[offset + position])
        what = f"attempt {num[earlier]}" if other == a_label else f"nudge {nudge_id[earlier]!r}"
        row = f"row {out.number(other, earlier)}"
        return (
            f"decision {ids[label][position]!r} is also the decision of {what} of this order "
            f"({row if other == label else f'{other} {row}'}): read as written, though a decision has one action (an "
            "attempt, or a nudge and the payments through its link); the off-policy evaluation counts each action "
            "as a decision of its own"
        )

    for label, offset, end in ((a_label, 0, len(a)), (n_label, len(a), len(a) + len(nudges))):
        mine = np.array([k - offset for k in first_of if offset <= k < end], dtype=np.int64)
        out.note_rows(label, "decision_id", mine, partial(reason, offset))


def _check_links(
    a: pd.DataFrame,
    nudges: pd.DataFrame,
    a_label: str,
    n_label: str,
    out: _Collector,
    elsewhere: Callable[[np.ndarray[Any, Any]], list[Any]] | None = None,
) -> None:
    _check_orders_known(a, nudges, n_label, out)
    n_order = nudges["order_id"].to_numpy(dtype=object)

    links = np.flatnonzero((a["strategy"].to_numpy(dtype=object) == _RETARGET) & a["nudge_id"].notna().to_numpy())
    if len(links) == 0:
        return
    a_nudge = a["nudge_id"].to_numpy(dtype=object)
    a_order = a["order_id"].to_numpy(dtype=object)
    at = pd.Index(nudges["nudge_id"]).get_indexer(a_nudge[links])
    missing = links[at < 0]
    nudge_order: dict[int, Any] = {}
    if elsewhere is not None and len(missing):
        # Checking one partition of a file: the nudge may be in another partition (so of another order).
        owner = elsewhere(a_nudge[missing])
        in_other = np.array([o is not None for o in owner], dtype=bool)
        nudge_order.update(zip(missing[in_other].tolist(), np.asarray(owner, dtype=object)[in_other], strict=True))
        out.add_rows(
            a_label,
            "nudge_id",
            missing[in_other],
            lambda i: f"nudge {a_nudge[i]!r} belongs to order {nudge_order[i]!r}, not to {a_order[i]!r}",
        )
        missing = missing[~in_other]
    out.add_rows(a_label, "nudge_id", missing, lambda i: f"nudge_id {a_nudge[i]!r} is not in the nudges file")
    found, at = links[at >= 0], at[at >= 0]
    other = n_order[at] != a_order[found]
    nudge_order.update(zip(found.tolist(), n_order[at], strict=True))
    out.add_rows(
        a_label,
        "nudge_id",
        found[other],
        lambda i: f"nudge {a_nudge[i]!r} belongs to order {nudge_order[i]!r}, not to {a_order[i]!r}",
    )
    sent = _utc_ns(nudges["sent_at"])[at]
    created = _utc_ns(a["created_at"])[found]
    sent_at = dict(zip(found, sent, strict=True))
    out.add_rows(
        a_label,
        "created_at",
        found[~other & (created < sent)],
        lambda i: (
            f"retarget_link attempt is earlier than its nudge {a_nudge[i]!r} was sent "
            f"({pd.Timestamp(sent_at[i], tz='UTC').isoformat()})"
        ),
    )


def _check_orders_known(a: pd.DataFrame, rows: pd.DataFrame, label: str, out: _Collector) -> np.ndarray[Any, Any]:
    """Each of ``rows`` (nudges, stops) names an order of the attempts, of the same merchant; the mask of those
    whose order is known."""
    orders = a.drop_duplicates("order_id").set_index("order_id")["merchant_id"]
    order_id = rows["order_id"].to_numpy(dtype=object)
    known: np.ndarray[Any, Any] = rows["order_id"].isin(orders.index).to_numpy()
    out.add_rows(
        label,
        "order_id",
        np.flatnonzero(~known),
        lambda i: f"order {order_id[i]!r} has no attempts in the attempts file",
    )
    order_merchant = rows["order_id"].map(orders).astype(object).where(lambda s: s.notna(), None).to_numpy()
    merchant = rows["merchant_id"].to_numpy(dtype=object)
    out.add_rows(
        label,
        "merchant_id",
        np.flatnonzero(known & (merchant != order_merchant)),
        lambda i: (
            f"{merchant[i]!r} differs from the merchant of order {order_id[i]!r} in the attempts file "
            f"({order_merchant[i]!r})"
        ),
    )
    return known


def _check_stops(a: pd.DataFrame, stops: pd.DataFrame, label: str, out: _Collector) -> None:
    """A stop belongs to an order of the attempts (same merchant) and answers one of its failed attempts: decided at
    or after that attempt, and not after the order's next attempt (which the stop would then have seen)."""
    if len(stops) == 0:
        return
    known = _check_orders_known(a, stops, label, out)
    if len(a) == 0:  # every stop's order was reported unknown; indexing no attempts raised IndexError
        return
    s_order = stops["order_id"].to_numpy(dtype=object)
    keys = pd.MultiIndex.from_arrays([a["order_id"].astype(object), a["attempt_number"].astype(np.int64)])
    number = stops["attempt_number"].to_numpy(dtype=np.int64)
    at = keys.get_indexer(pd.MultiIndex.from_arrays([stops["order_id"].astype(object), number]))
    after = keys.get_indexer(pd.MultiIndex.from_arrays([stops["order_id"].astype(object), number + 1]))
    sizes = a.groupby("order_id", sort=False).size()
    out.add_rows(
        label,
        "attempt_number",
        np.flatnonzero(known & (at < 0)),
        lambda i: f"order {s_order[i]!r} has no attempt {number[i]} (it has {int(sizes[s_order[i]])})",
    )
    found = at >= 0
    status = a["status"].to_numpy(dtype=object)[np.maximum(at, 0)]
    out.add_rows(
        label,
        "attempt_number",
        np.flatnonzero(found & (status == _SUCCESS)),
        lambda i: f"attempt {number[i]} of order {s_order[i]!r} succeeded: a stop answers a failed attempt",
    )
    created = _utc_ns(a["created_at"])
    decided = _utc_ns(stops["decided_at"])
    before = found & (decided < created[np.maximum(at, 0)])
    out.add_rows(
        label,
        "decided_at",
        np.flatnonzero(before),
        lambda i: (
            f"decided_at {pd.Timestamp(decided[i], tz='UTC').isoformat()} is before attempt {number[i]} of "
            f"order {s_order[i]!r} ({pd.Timestamp(created[at[i]], tz='UTC').isoformat()}), the failure it answers"
        ),
    )
    later = (after >= 0) & ~before & (decided > created[np.maximum(after, 0)])
    out.add_rows(
        label,
        "decided_at",
        np.flatnonzero(later),
        lambda i: (
            f"decided_at {pd.Timestamp(decided[i], tz='UTC').isoformat()} is after attempt {number[i] + 1} of "
            f"order {s_order[i]!r} ({pd.Timestamp(created[after[i]], tz='UTC').isoformat()}): a stop answers the "
            "order's last attempt"
        ),
    )


def _shared_decision(ids: np.ndarray[Any, Any], what: str, position: int) -> str:
    return f"decision {ids[position]!r} is also the decision of {what}: a decision has one action"


def _check_stop_decisions(
    stop_ids: pd.Series, action_ids: Iterable[tuple[str, pd.Series]], label: str, out: _Collector
) -> None:
    """No stop's decision_id is also the decision of an attempt or a nudge (one decision, one action)."""
    ids = stop_ids.astype(object).to_numpy()
    for what, other in action_ids:
        taken = set(other.dropna().astype(str))
        if not taken:
            continue
        clash = np.flatnonzero(np.fromiter((str(v) in taken for v in ids), bool, len(ids)))
        out.add_rows(label, "decision_id", clash, partial(_shared_decision, ids, what))


def read_history(
    attempts_path: str | Path,
    nudges_path: str | Path,
    *,
    stops_path: str | Path | None = None,
    cap: int = DEFAULT_CAP,
) -> History:
    """Read and validate the history files (attempts, nudges and, when given, stops), then check the rules across
    rows and files.

    Row-level problems of all files are reported together; the cross-row and cross-file rules run once every
    file is clean on its own (a dropped bad row would otherwise show up as spurious gaps and dangling links), and
    their problems are again reported all together.
    """
    out = _Collector(cap, _ALL_COLUMNS)
    attempts = _read_table(attempts_path, AttemptsSchema, out).reset_index(drop=True)
    nudges = _read_table(nudges_path, NudgesSchema, out).reset_index(drop=True)
    stops = None if stops_path is None else _read_table(stops_path, StopsSchema, out).reset_index(drop=True)
    out.raise_if_any()
    _check_orders(attempts, str(attempts_path), out)
    _check_links(attempts, nudges, str(attempts_path), str(nudges_path), out)
    _check_one_action_per_decision(attempts, nudges, str(attempts_path), str(nudges_path), out)
    _check_decision_orders(
        [
            (str(attempts_path), attempts["decision_id"], attempts["order_id"]),
            (str(nudges_path), nudges["decision_id"], nudges["order_id"]),
        ],
        out,
    )
    if stops is not None:
        _check_stops(attempts, stops, str(stops_path), out)
        actions = (("an attempt", attempts["decision_id"]), ("a nudge", nudges["decision_id"]))
        _check_stop_decisions(stops["decision_id"], actions, str(stops_path), out)
    out.raise_if_any()
    return History(attempts=attempts, nudges=nudges, stops=stops, warnings=out.warnings())


# ---------------------------------------------------------------------------------------------------------
# Histories larger than one pandas frame

#: Attempts per partition when a history is split into parts of whole orders (a few GB of pandas each).
DEFAULT_PARTITION_ROWS: Final = 500_000
_UNIQUE_IDS: Final = (("txn_id", "attempts"), ("nudge_id", "nudges"), ("decision_id", "stops"))


@dataclass(frozen=True)
class PartitionedHistory:
    """A validated history stored as typed Parquet partitions of whole orders (see :func:`split_history`).

    Every order's attempts and nudges are in the same partition, so anything computed per order (decision
    points, features) can run one partition at a time; iterating yields each partition as a `History`.
    """

    folder: Path
    partitions: int
    attempt_rows: int
    nudge_rows: int
    merchant_ids: tuple[str, ...]
    #: Rows of the stops file; None when the history has none (its parts then have ``stops`` None).
    stop_rows: int | None = None
    #: What was read other than as written, or worth a look (see `History.warnings`).
    warnings: ValidationReport = field(default_factory=ValidationReport)

    def _files(self, index: int) -> tuple[Path, Path]:
        return self.folder / f"attempts-{index:05d}.parquet", self.folder / f"nudges-{index:05d}.parquet"

    def _stops_file(self, index: int) -> Path:
        return self.folder / f"stops-{index:05d}.parquet"

    def part(self, index: int) -> History:
        """Partition ``index`` (0-based) as validated frames."""
        attempts, nudges = self._files(index)
        stops = None if self.stop_rows is None else pd.read_parquet(self._stops_file(index))
        return History(attempts=pd.read_parquet(attempts), nudges=pd.read_parquet(nudges), stops=stops)

    def __iter__(self) -> Iterator[History]:
        return (self.part(index) for index in range(self.partitions))

    def __len__(self) -> int:
        return self.partitions

    def __getitem__(self, index: int) -> History:
        return self.part(index)

    def columns(
        self, index: int, attempt_columns: Sequence[str], nudge_columns: Sequence[str]
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Some columns of partition ``index`` (cheaper than :meth:`part` when only a few are needed)."""
        attempts, nudges = self._files(index)
        return pd.read_parquet(attempts, columns=list(attempt_columns)), pd.read_parquet(
            nudges, columns=list(nudge_columns)
        )

    def orders_count(self) -> int:
        """Distinct orders of the history (an order lies in one partition)."""
        return sum(
            int(self.columns(index, ("order_id",), ("order_id",))[0]["order_id"].nunique())
            for index in range(self.partitions)
        )

    def orders(self, order_ids: Iterable[str]) -> History:
        """The attempts and nudges of ``order_ids`` only (e.g. a sample for an evaluation)."""
        wanted = sorted(set(order_ids))
        filters = [("order_id", "in", wanted)]
        parts = [self._files(index) for index in range(self.partitions)]
        attempts = [pd.read_parquet(a, filters=filters) for a, _ in parts]
        nudges = [pd.read_parquet(n, filters=filters) for _, n in parts]
        stops = None
        if self.stop_rows is not None:
            frames = [pd.read_parquet(self._stops_file(index), filters=filters) for index in range(self.partitions)]
            stops = pd.concat(frames, ignore_index=True)
        return History(
            attempts=pd.concat(attempts, ignore_index=True), nudges=pd.concat(nudges, ignore_index=True), stops=stops
        )


def _read_arrow(path: Path, label: str) -> pyarrow.Table:
    """A history file as an Arrow table: CSV with every column as text and empty fields null; string columns of
    any Arrow flavour as plain ``string`` (``_plain_types``). A CSV row with more or fewer fields than the header is
    reported with its row rather than read some way, and a column named twice is reported by name."""
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        _fail(label, f"unsupported file extension {path.suffix or '(none)'!r}: use .parquet or .csv")
    if not path.exists():
        _fail(label, "no such file")
    if path.is_dir() and suffix == ".csv":  # a .parquet folder is a dataset of parts (Dask writes those)
        _fail(label, "a folder, not a history file")
    try:
        if suffix == ".csv":
            table = _read_csv_text(path, label)
        else:
            if path.is_file():  # Arrow's own error for a repeated name prints the whole schema
                _refuse_repeated_columns(pq.read_schema(path).names, label)
            table = pq.read_table(path)
    except HistoryError:
        raise
    except (OSError, ValueError, pyarrow.ArrowException) as exc:
        _fail(label, f"cannot read the file: {exc}")
    return _plain_types(table)


def refuse_a_history_without_attempts(
    attempts_path: str | Path, nudges_path: str | Path, stops_path: str | Path | None = None
) -> None:
    """HistoryError when the attempts file holds no rows, only a header (a Parquet file: only a schema), naming it
    and each other file of the history that has no rows either. Cheap (a CSV is read to its first row, a Parquet
    file's row count is in its footer), so commands call it before any work or state: a header-only history made
    an empty MLflow store, and an evaluation's folder, before failing for want of decision points. A file that
    cannot be read, or is not there, is left to the reader's own report."""
    if not _holds_no_rows(Path(attempts_path)):
        return
    problems = [Problem(str(attempts_path), None, None, "no rows, only a header: a history needs at least one attempt")]
    for other in (nudges_path, stops_path):
        if other is not None and _holds_no_rows(Path(other)):
            problems.append(Problem(str(other), None, None, "no rows either, only a header"))
    raise HistoryError(ValidationReport(problems, total=len(problems)))


def _holds_no_rows(path: Path) -> bool:
    """Whether the history file at ``path`` certainly holds no rows (False when it cannot be read)."""
    import csv

    import pyarrow.dataset

    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as handle:
                rows = csv.reader(handle)
                next(rows, None)  # the header
                return not any(row for row in rows)  # an empty line is no row (Arrow's reader skips it too)
        if path.suffix.lower() == ".parquet":  # a file, or a folder of parts
            return bool(pyarrow.dataset.dataset(path, format="parquet").count_rows() == 0)
    except (OSError, ValueError, csv.Error, pyarrow.ArrowException):
        pass
    return False


def _read_csv_text(path: Path, label: str) -> pyarrow.Table:
    import csv

    import pyarrow.csv as pacsv

    with path.open(newline="", encoding="utf-8-sig") as handle:
        header = next(csv.reader(handle), [])
    _refuse_repeated_columns(header, label)
    if len(header) == 1 and (others := [mark for mark in _OTHER_SEPARATORS if mark in header[0]]):
        # Every column was reported missing, one line each, though the header names them all.
        _fail(
            label,
            f"the header is one column, {others[0].join(header[0].split(others[0])[:3]) + '...'!r}: a history CSV "
            f"is separated by commas, and this one seems to be by {others[0]!r}",
        )
    ragged: list[Any] = []

    def skip(row: Any) -> str:
        ragged.append(row)
        return "skip"

    options = pacsv.ConvertOptions(
        column_types={name: pyarrow.string() for name in header},
        null_values=[""],
        strings_can_be_null=True,
        quoted_strings_can_be_null=True,
    )
    # Connectors' error messages may span lines (quoted in CSV): without this, the parallel reader cuts a file of
    # more than one block (1 MB) inside such a value and refuses the whole file.
    parse = pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=skip)
    table = pacsv.read_csv(path, parse_options=parse, convert_options=options)
    if ragged:
        _report_ragged_rows(path, label, len(header), len(ragged))
    return table


#: What a spreadsheet may separate a CSV export's fields by instead of commas (Excel's ";" where a comma is the
#: decimal mark, a tab, a pipe).
_OTHER_SEPARATORS: Final = (";", "\t", "|")


def _report_ragged_rows(path: Path, label: str, width: int, count: int) -> NoReturn:
    """Fail naming the data rows whose number of fields is not the header's (found again with Python's reader, which
    counts rows the way the report does; the Arrow reader only knows them when it reads on one thread)."""
    import csv

    out = _Collector(DEFAULT_CAP, ())
    out.register(label)
    with path.open(newline="", encoding="utf-8-sig") as handle:
        records = (record for record in csv.reader(handle) if record)
        next(records, None)
        for row, record in enumerate(records, start=1):
            if len(record) == width:
                continue
            if out.total < out.cap:
                out.add(label, row, None, f"{len(record)} fields where the header has {width}")
            else:
                out.total += 1  # counted, not kept (as ``_Collector.add_rows`` does past the cap)
    if out.total == 0:  # the two readers disagree on where: still name the problem
        out.add(label, None, None, f"{count} rows with a number of fields other than the header's {width}")
    raise HistoryError(out.report())


def _refuse_repeated_columns(names: Sequence[str], label: str) -> None:
    """Fail when a file names a column more than once: pandas would read it as ``name.1``, Arrow not at all."""
    counts = Counter(names)
    problems = [
        Problem(label, None, name, f"the file has {count} columns of this name (keep one)")
        for name, count in counts.items()
        if count > 1
    ]
    if problems:
        raise HistoryError(ValidationReport(problems, total=len(problems)))


def _plain_types(table: pyarrow.Table) -> pyarrow.Table:
    """``table`` with dictionary columns decoded and large or view strings as plain strings (the same values).

    Polars writes ``large_string``, pandas categoricals arrive dictionary-encoded, newer writers may use
    ``string_view``: all are strings of the contract. Checks that look at the Arrow type (ids unique over the whole
    file) would otherwise pass over them, and Arrow has no kernels for some (``take`` of ``string_view``).
    """
    columns = []
    changed = False
    for column in table.columns:
        kind = column.type
        if pyarrow.types.is_dictionary(kind):
            kind = kind.value_type
        if pyarrow.types.is_large_string(kind) or pyarrow.types.is_string_view(kind):
            kind = pyarrow.string()
        if kind != column.type:
            column = column.cast(kind)
            changed = True
        columns.append(column)
    if not changed:
        return table
    return pyarrow.Table.from_arrays(columns, names=table.column_names, metadata=table.schema.metadata)


def _partition_of(attempts: pyarrow.Table, others: Sequence[pyarrow.Table], partitions: int) -> list[Any]:
    """Partition number of every row of the attempts and of each other table (nudges, stops): all rows of an order
    share one (by order_id)."""
    if "order_id" not in attempts.column_names:
        return [np.zeros(table.num_rows, dtype=np.int64) for table in (attempts, *others)]
    import pyarrow.compute as pc

    encoded = pc.dictionary_encode(attempts.column("order_id").cast(pyarrow.string())).combine_chunks()
    parts = [encoded.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64) % partitions]
    for table in others:
        if "order_id" not in table.column_names:
            parts.append(np.zeros(table.num_rows, dtype=np.int64))
            continue
        at = pc.index_in(table.column("order_id").cast(pyarrow.string()), value_set=encoded.dictionary)
        parts.append(at.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64) % partitions)
    return parts


def _check_unique(table: pyarrow.Table, column: str, label: str, out: _Collector) -> None:
    """``column`` unique over the whole file (partitions cannot see duplicates in other partitions)."""
    if column not in table.column_names or not pyarrow.types.is_string(table.schema.field(column).type):
        return  # a missing or mistyped column is reported by the type checks
    values = table.column(column).to_pandas()
    rows = np.flatnonzero((values.duplicated(keep=False) & values.notna()).to_numpy())
    where = _rows_by_value(values, rows)
    out.add_rows(label, column, rows, lambda i: _duplicate(column, values[i], where[values[i]]))


#: What the partition checks of :func:`split_history` work on (forked worker processes inherit it).
_SPLIT: dict[str, Any] = {}


def _partition_collector() -> _Collector:
    out = _Collector(_SPLIT["cap"], list(_SPLIT["columns"]))
    for name in _SPLIT["labels"]:
        out.register(_SPLIT["labels"][name])
    return out


def _check_types(index: int) -> _Collector:
    """Coerce and check one partition's rows (types and per-row rules); write it when clean."""
    out = _partition_collector()
    files = _SPLIT["files"]
    for name in _SPLIT["labels"]:
        label, rows, schema = _SPLIT["labels"][name], _SPLIT["rows_of"][name][index], _SPLIT["schemas"][name]
        out.row_maps[label] = rows
        frame, unchecked = _coerce(_SPLIT["tables"][name].take(rows).to_pandas(), schema, label, out)
        _validate(frame, schema, label, unchecked, out)
        frame = _settle(frame, schema, label, out)
        if not out.total:
            path = files._stops_file(index) if name == "stops" else files._files(index)[name == "nudges"]
            frame.to_parquet(path, index=False)
    out.row_maps.clear()
    return out


def _owner_of(nudge_ids: np.ndarray[Any, Any]) -> list[Any]:
    """The order of each nudge id anywhere in the nudges file (None when it is in none)."""
    import pyarrow.compute as pc

    owners = _SPLIT["owners"]
    wanted = pyarrow.array([str(v) for v in nudge_ids], type=pyarrow.string())
    found = owners.filter(pc.is_in(owners.column("nudge_id"), value_set=wanted)).to_pandas()
    owner = dict(zip(found["nudge_id"], found["order_id"], strict=True))
    return [owner.get(str(v)) for v in nudge_ids]


def _check_across_rows(index: int) -> _Collector:
    """The rules across rows and files, within one partition (an order's rows are all in one)."""
    out = _partition_collector()
    labels = _SPLIT["labels"]
    a_label, n_label = labels["attempts"], labels["nudges"]
    part = _SPLIT["files"].part(index)
    out.row_maps.update({labels[name]: _SPLIT["rows_of"][name][index] for name in labels})
    several = _SPLIT["files"].partitions > 1
    _check_orders(part.attempts, a_label, out)
    _check_links(part.attempts, part.nudges, a_label, n_label, out, elsewhere=_owner_of if several else None)
    _check_one_action_per_decision(part.attempts, part.nudges, a_label, n_label, out)
    if part.stops is not None:
        _check_stops(part.attempts, part.stops, labels["stops"], out)
    out.row_maps.clear()
    return out


def split_history(
    attempts_path: str | Path,
    nudges_path: str | Path,
    folder: str | Path,
    *,
    partition_rows: int = DEFAULT_PARTITION_ROWS,
    cap: int = DEFAULT_CAP,
    workers: int = 1,
    stops_path: str | Path | None = None,
) -> PartitionedHistory:
    """Validate a history like :func:`read_history` and store it in ``folder`` as partitions of whole orders.

    For histories larger than memory allows as one pandas frame: the files are read as Arrow tables (a few
    times smaller than pandas), cut into ``ceil(attempts / partition_rows)`` partitions by order, and each
    partition is coerced and checked with the same rules; ids that must be unique are checked over the whole
    file. Raises ``HistoryError`` with the same report ``read_history`` gives (file row numbers, all problems
    counted); then nothing usable is left in ``folder``. ``workers`` processes check partitions side by side.
    ``stops_path``: the history's stops file, partitioned with its orders (the parts' ``stops``).
    """
    if partition_rows < 1:
        raise ValueError(f"partition_rows must be at least 1, got {partition_rows}")
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    labels = {"attempts": str(attempts_path), "nudges": str(nudges_path)}
    if stops_path is not None:
        labels["stops"] = str(stops_path)
    out = _Collector(cap, _ALL_COLUMNS)
    for label in labels.values():
        out.register(label)
    tables = {name: _read_arrow(Path(label), label) for name, label in labels.items()}
    count = max(1, -(-tables["attempts"].num_rows // partition_rows))
    names = list(labels)
    partition = dict(zip(names, _partition_of(tables["attempts"], [tables[n] for n in names[1:]], count), strict=True))
    rows_of = {name: [np.flatnonzero(partition[name] == index) for index in range(count)] for name in names}
    # Uniqueness over the whole file replaces the per-frame check (a partition sees only its own rows).
    schemas = {
        "attempts": AttemptsSchema.update_column("txn_id", unique=False),
        "nudges": NudgesSchema.update_column("nudge_id", unique=False),
        "stops": StopsSchema.update_column("decision_id", unique=False),
    }
    files = PartitionedHistory(target, count, 0, 0, (), stop_rows=None if stops_path is None else 0)
    _SPLIT.update(tables=tables, rows_of=rows_of, labels=labels, schemas=schemas, files=files, cap=cap,
                  columns=out._columns)  # fmt: skip
    try:
        for found in map_in_order(_check_types, count, workers):
            out.absorb(found)
        for column, name in _UNIQUE_IDS:
            if name in tables:
                _check_unique(tables[name], column, labels[name], out)
        out.raise_if_any()
        _check_decision_orders(
            [
                (labels[name], *(tables[name].column(c).to_pandas() for c in ("decision_id", "order_id")))
                for name in ("attempts", "nudges")
            ],
            out,
        )
        if "stops" in tables:
            actions = (
                (what, tables[name].column("decision_id").to_pandas())
                for what, name in (("an attempt", "attempts"), ("a nudge", "nudges"))
            )
            _check_stop_decisions(tables["stops"].column("decision_id").to_pandas(), actions, labels["stops"], out)
        _SPLIT["owners"] = tables["nudges"].select(["nudge_id", "order_id"])
        merchants = sorted({str(m) for m in tables["attempts"].column("merchant_id").unique().to_pylist()})
        attempt_rows, nudge_rows = tables["attempts"].num_rows, tables["nudges"].num_rows
        stop_rows = tables["stops"].num_rows if "stops" in tables else None
        del tables
        _SPLIT.pop("tables")
        for found in map_in_order(_check_across_rows, count, workers):
            out.absorb(found)
    finally:
        _SPLIT.clear()
    out.raise_if_any()
    return PartitionedHistory(
        target, count, attempt_rows, nudge_rows, tuple(merchants), stop_rows=stop_rows, warnings=out.warnings()
    )


# ---------------------------------------------------------------------------------------------------------
# Writing


def _format_timestamps(s: pd.Series) -> pd.Series:
    """ISO-8601 in UTC with a ``Z``, at the coarsest precision that loses nothing; null as None."""
    values = _utc_ns(s)
    nat = np.isnat(values)
    sub = values[~nat].view("int64") % 1_000_000_000
    unit = "s"
    for step, finer in ((1_000_000_000, "ms"), (1_000_000, "us"), (1_000, "ns")):
        if (sub % step != 0).any():
            unit = finer
    text = np.datetime_as_string(values, unit=unit, timezone="UTC").astype(object)  # type: ignore[call-overload]
    text[nat] = None
    return pd.Series(text, index=s.index, dtype=object)


_ARROW_TYPES: Final[dict[str, Any]] = {
    "string": pyarrow.string(),
    "float64": pyarrow.float64(),
    "int64": pyarrow.int64(),
    "bool": pyarrow.bool_(),
    _TS: pyarrow.timestamp("ns", tz="UTC"),
}


class HistoryWriter:
    """Writes one history table in parts, so a history larger than memory can be written as it is produced.

    Every part is coerced and validated like a whole file (``write_attempts``) before anything of it is
    written; Parquet gets one row group per part, CSV one block of lines. The file appears at ``path`` only
    when :meth:`close` succeeds (it is written beside it and renamed), so a failed run never leaves a
    half-written history behind. Rules across parts (ids unique over the whole file) are the producer's to
    keep; ``read_history`` checks them on read.
    """

    def __init__(self, path: str | Path, schema: pa.DataFrameSchema, columns: tuple[str, ...]) -> None:
        self.path = Path(path)
        self._schema = schema
        self._columns = columns
        self._label = f"{path} (writing)"
        self._suffix = self.path.suffix.lower()
        if self._suffix not in (".parquet", ".csv"):
            _fail(self._label, f"unsupported file extension {self.path.suffix or '(none)'!r}: use .parquet or .csv")
        self._partial = self.path.with_name(f".{self.path.name}.partial")
        self._parquet: pq.ParquetWriter | None = None
        self._arrow_schema: pyarrow.Schema | None = None
        self._csv_started = False
        self.rows = 0

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def write(self, df: pd.DataFrame) -> None:
        """Validate ``df`` and append it; raises ``HistoryError`` (and writes nothing of it) when it is bad."""
        out = _Collector(DEFAULT_CAP, self._columns)
        frame, unchecked = _coerce(df, self._schema, self._label, out)
        _validate(frame, self._schema, self._label, unchecked, out)
        out.raise_if_any()
        if self._suffix == ".parquet":
            self._write_parquet(frame)
        else:
            self._write_csv(frame)
        self.rows += len(frame)

    def _write_parquet(self, frame: pd.DataFrame) -> None:
        table = pyarrow.Table.from_pandas(frame, preserve_index=False)
        if self._arrow_schema is None:
            # Contract columns get their declared type, so a part where one is all null still fits the next.
            fields = [
                pyarrow.field(f.name, _ARROW_TYPES[_kind(self._schema.columns[f.name])])
                if f.name in self._schema.columns
                else (pyarrow.field(f.name, pyarrow.string()) if pyarrow.types.is_null(f.type) else f)
                for f in table.schema
            ]
            self._arrow_schema = pyarrow.schema(fields, metadata=table.schema.metadata)
            self._parquet = pq.ParquetWriter(self._partial, self._arrow_schema)
        assert self._parquet is not None
        self._parquet.write_table(table.select(self._arrow_schema.names).cast(self._arrow_schema))

    def _write_csv(self, frame: pd.DataFrame) -> None:
        text = frame.copy()
        for name, col in self._schema.columns.items():
            if _kind(col) == _TS:
                text[name] = _format_timestamps(frame[name])
            elif _kind(col) == "bool":
                text[name] = np.where(frame[name].to_numpy(), "true", "false")
        text.to_csv(self._partial, index=False, na_rep="", mode="a" if self._csv_started else "w",
                    header=not self._csv_started)  # fmt: skip
        self._csv_started = True

    def close(self) -> None:
        """Finish the file and move it into place (an empty table when nothing was written)."""
        if self._suffix == ".parquet":
            if self._parquet is None:
                self._write_parquet(pd.DataFrame({c: pd.Series(dtype=object) for c in self._columns}))
            assert self._parquet is not None
            self._parquet.close()
        elif not self._csv_started:
            pd.DataFrame(columns=list(self._columns)).to_csv(self._partial, index=False)
        self._partial.replace(self.path)

    def abort(self) -> None:
        """Drop what was written so far."""
        if self._parquet is not None:
            self._parquet.close()
        self._partial.unlink(missing_ok=True)


def move_into_place_together(moves: Sequence[tuple[Path, Path]]) -> None:
    """Move every ``(source, target)`` file of ``moves`` into place, all of them or none: when a move fails, the
    targets moved so far get their earlier files back (or are removed, when they had none) and the error is raised.
    Sources and targets must be on one file system (``os.replace``).

    Each target is replaced atomically: a reader finds the whole earlier file or the whole new one, never none. The
    set is not atomic: a reader between two moves finds new files beside earlier ones, and a process killed between
    them (SIGKILL, a power cut), or a roll-back that fails too, leaves that mix. The earlier files are kept as hard
    links (a copy where the file system has none) beside their targets, ``.<name>.earlier``, until the end."""
    import os
    import shutil

    earlier: dict[Path, Path] = {}
    moved: list[Path] = []
    try:
        for _, target in moves:  # first, so a file system that cannot keep them fails before any move
            if target.exists():
                kept = earlier[target] = target.with_name(f".{target.name}.earlier")
                kept.unlink(missing_ok=True)
                try:
                    os.link(target, kept)
                except OSError:
                    shutil.copy2(target, kept)
        try:
            for source, target in moves:
                os.replace(source, target)
                moved.append(target)
        except BaseException:
            for target in reversed(moved):
                if target in earlier:
                    os.replace(earlier.pop(target), target)
                else:
                    target.unlink()
            raise
    finally:
        for kept in earlier.values():
            kept.unlink(missing_ok=True)


def attempts_writer(path: str | Path) -> HistoryWriter:
    """A :class:`HistoryWriter` for an attempts file."""
    return HistoryWriter(path, AttemptsSchema, ATTEMPT_COLUMNS)


def nudges_writer(path: str | Path) -> HistoryWriter:
    """A :class:`HistoryWriter` for a nudges file."""
    return HistoryWriter(path, NudgesSchema, NUDGE_COLUMNS)


def stops_writer(path: str | Path) -> HistoryWriter:
    """A :class:`HistoryWriter` for a stops file."""
    return HistoryWriter(path, StopsSchema, STOP_COLUMNS)


def write_stops(df: pd.DataFrame, path: str | Path) -> None:
    """Validate ``df`` as stops and write it to .parquet or .csv so that ``read_stops`` gives it back."""
    with stops_writer(path) as writer:
        writer.write(df)


def write_attempts(df: pd.DataFrame, path: str | Path) -> None:
    """Validate ``df`` as attempts and write it to .parquet or .csv so that ``read_attempts`` gives it back."""
    with attempts_writer(path) as writer:
        writer.write(df)


def write_nudges(df: pd.DataFrame, path: str | Path) -> None:
    """Validate ``df`` as nudges and write it to .parquet or .csv so that ``read_nudges`` gives it back."""
    with nudges_writer(path) as writer:
        writer.write(df)


# ---------------------------------------------------------------------------------------------------------
# Orders


def reconstruct_orders(attempts: pd.DataFrame, nudges: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per order (columns ``ORDER_COLUMNS``), in order of first appearance in ``attempts``.

    Expects validated tables (as ``read_history`` returns them). An order is recovered when an attempt after a
    failed first attempt succeeds; ``time_to_recovery`` runs from that first failure to the first success.
    Orders whose first attempt succeeded have ``initially_succeeded=True``, ``recovered=False`` and null
    failure/recovery fields. ``n_retries`` counts silent retries (``RETRY_STRATEGIES``), ``n_nudges`` the
    order's rows in ``nudges``.
    """
    n = len(attempts)
    codes, uniques = pd.factorize(attempts["order_id"])
    order = np.lexsort((attempts["attempt_number"].to_numpy(), codes))
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]]) if n else np.array([], int)
    first = order[starts]
    sizes = np.diff(np.r_[starts, n])

    status = attempts["status"].to_numpy(dtype=object)[order]
    strategy = attempts["strategy"].to_numpy(dtype=object)[order]
    created = attempts["created_at"]
    first_failed = status[starts] == _FAILURE

    is_retry = np.isin(strategy, [s.value for s in RETRY_STRATEGIES]).astype(np.int64)
    n_retries = np.add.reduceat(is_retry, starts) if n else np.array([], np.int64)

    position = np.arange(n)
    later_success = (status == _SUCCESS) & ~np.r_[True, sorted_codes[1:] != sorted_codes[:-1]]
    candidate = np.where(later_success, position, n)
    first_success = np.minimum.reduceat(candidate, starts) if n else np.array([], np.int64)
    recovered = first_failed & (first_success < n)
    success_row = order[np.where(recovered, first_success, 0)] if n else np.array([], np.int64)

    first_failure_at = created.iloc[first].where(first_failed).reset_index(drop=True)
    recovered_at = created.iloc[success_row].where(recovered).reset_index(drop=True)

    out = pd.DataFrame(
        {
            "merchant_id": attempts["merchant_id"].iloc[first].to_numpy(),
            "order_id": pd.Series(uniques, dtype="string"),
            "customer_id": attempts["customer_id"].iloc[first].to_numpy(),
            "amount": attempts["amount"].iloc[first].to_numpy(dtype="float64"),
            "currency": attempts["currency"].iloc[first].to_numpy(),
            "initially_succeeded": ~first_failed,
            "first_failure_at": first_failure_at,
            "n_attempts": sizes.astype(np.int64),
            "n_retries": n_retries.astype(np.int64),
            "n_nudges": _count_nudges(uniques, nudges),
            "recovered": recovered,
            "recovered_at": recovered_at,
            "time_to_recovery": recovered_at - first_failure_at,
            "recovering_strategy": pd.Series(attempts["strategy"].iloc[success_row].to_numpy(), dtype="string").where(
                recovered
            ),
            "strategies_used": _sequences(strategy, starts),
            "first_error_code": pd.Series(attempts["error_code"].iloc[first].to_numpy(), dtype="string").where(
                first_failed
            ),
            "first_connector": attempts["connector"].iloc[first].to_numpy(),
        }
    )
    for name in ("merchant_id", "customer_id", "currency", "first_connector"):
        out[name] = out[name].astype("string")
    return out


def _count_nudges(order_ids: Any, nudges: pd.DataFrame | None) -> np.ndarray[Any, Any]:
    counts = np.zeros(len(order_ids), dtype=np.int64)
    if nudges is None or len(nudges) == 0:
        return counts
    at = pd.Index(order_ids).get_indexer(nudges["order_id"])
    return np.bincount(at[at >= 0], minlength=len(order_ids)).astype(np.int64)


def _sequences(values: np.ndarray[Any, Any], starts: np.ndarray[Any, Any]) -> pd.Series:
    """Per group (consecutive runs beginning at ``starts``), the tuple of its values in order."""
    if len(values) == 0:
        return pd.Series([], dtype=object)
    # Spell each group as a string of one character per distinct value: concatenation runs in C, and the
    # few distinct spellings are turned into tuples once each.
    codes, distinct = pd.factorize(values)
    letters = np.array([chr(0x100 + i) for i in range(len(distinct))], dtype=object)
    spelled = np.add.reduceat(letters[codes], starts)
    lookup = {s: tuple(str(distinct[ord(ch) - 0x100]) for ch in s) for s in pd.unique(spelled)}
    return pd.Series(spelled, dtype=object).map(lookup)
