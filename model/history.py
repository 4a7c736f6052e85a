"""The history files of CONTRACT.md section 3: one declared schema, readers, writers and order reconstruction.

``attempts`` has one row per payment attempt, ``nudges`` one row per retarget message. Both are read from
Parquet or CSV, coerced to the contract's types and validated as a whole: every bad row is reported with its
row number, column and reason, and nothing is returned when anything is wrong.

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
  sent before the attempt.

Extra columns are allowed and kept (from CSV they come back as strings).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd
import pandera.pandas as pa

from model.vocab import RETRY_STRATEGIES, AttemptStatus, AuthenticationType, Channel, Strategy

__all__ = [
    "ATTEMPT_COLUMNS",
    "DEFAULT_CAP",
    "NUDGE_COLUMNS",
    "ORDER_COLUMNS",
    "AttemptsSchema",
    "History",
    "HistoryError",
    "NudgesSchema",
    "Problem",
    "ValidationReport",
    "read_attempts",
    "read_history",
    "read_nudges",
    "reconstruct_orders",
    "write_attempts",
    "write_nudges",
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


def _frame_rule(
    needs: tuple[str, ...], error: str, ok: Callable[[pd.DataFrame], pd.Series]
) -> pa.Check:
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
        _frame_rule(
            ("sent_at", "clicked_at"), _CLICK_BEFORE_SEND, lambda df: ~(df["clicked_at"] < df["sent_at"])
        ),
    ],
    strict=False,
    name="nudges",
)
"""The ``nudges`` table: one row per retarget message (contract types; extra columns allowed)."""


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

    def __init__(self, cap: int, column_order: Sequence[str]) -> None:
        self.cap = cap
        self.total = 0
        self._kept: list[Problem] = []
        self._files: dict[str, int] = {}
        self._columns = {c: i for i, c in enumerate(column_order)}

    def add(self, file: str, row: int | None, column: str | None, reason: str) -> None:
        self._files.setdefault(file, len(self._files))
        self.total += 1
        self._kept.append(Problem(file, row, column, reason))

    def add_rows(
        self, file: str, column: str | None, positions: np.ndarray[Any, Any], reason: Callable[[int], str]
    ) -> None:
        """Report the rows at 0-based ``positions``; ``reason(position)`` is only called for those kept."""
        positions = np.sort(np.asarray(positions, dtype=np.int64))
        for pos in positions[: self.cap]:
            self.add(file, int(pos) + 1, column, reason(int(pos)))
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


# ---------------------------------------------------------------------------------------------------------
# Reading and coercion


def _read_raw(path: Path, label: str) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        _fail(label, f"unsupported file extension {path.suffix or '(none)'!r}: use .parquet or .csv")
    try:
        if suffix == ".csv":
            # Everything as text: types are parsed per column so a bad value is reported, not guessed.
            return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
        return pd.read_parquet(path)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        _fail(label, f"cannot read the file: {exc}")


def _fail(label: str, reason: str) -> Any:
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


def _bad_text_rows(
    label: str, column: str, text: pd.Series, bad: pd.Series, what: str, out: _Collector
) -> None:
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
    bad = ~missing & ~(np.isfinite(num) & (num == np.floor(num))).fillna(False).astype(bool)
    _bad_text_rows(label, column, text, bad, "not an integer", out)
    out.add_rows(label, column, np.flatnonzero(missing.to_numpy()), lambda _: _MISSING_VALUE)
    return num.where(~(bad | missing), 0).astype("int64")


_TRUE: Final = frozenset({"true", "1"})
_FALSE: Final = frozenset({"false", "0"})


def _coerce_bool(s: pd.Series, label: str, column: str, out: _Collector) -> pd.Series | None:
    if pd.api.types.is_bool_dtype(s.dtype) and not s.isna().any():
        return s.astype("bool")
    if not (pd.api.types.is_bool_dtype(s.dtype) or _is_textual(s)):
        out.add(label, None, column, f"expected booleans (true/false), found dtype {_dtype_name(s)}")
        return None
    text = s.astype("string")
    lower = text.str.strip().str.lower()
    is_true = lower.isin(_TRUE).fillna(False).astype(bool)
    is_false = lower.isin(_FALSE).fillna(False).astype(bool)
    missing = text.isna()
    _bad_text_rows(label, column, text, ~missing & ~is_true & ~is_false, "not a boolean (true or false)", out)
    out.add_rows(label, column, np.flatnonzero(missing.to_numpy()), lambda _: _MISSING_VALUE)
    return is_true


_TZ_SUFFIX: Final = r"(?:Z|[+-]\d{2}(?::?\d{2})?)$"


def _coerce_timestamp(s: pd.Series, label: str, column: str, out: _Collector) -> pd.Series | None:
    if isinstance(s.dtype, pd.DatetimeTZDtype):
        return s.dt.tz_convert("UTC").astype(_TS)
    if pd.api.types.is_datetime64_dtype(s.dtype):
        out.add(label, None, column, "timestamps without timezone (naive datetime): store them as UTC")
        return None
    if not _is_textual(s):
        out.add(label, None, column, f"expected timestamps, found dtype {_dtype_name(s)}")
        return None
    text = s.astype("string").str.strip()
    present = text.notna()
    has_tz = text.str.contains(_TZ_SUFFIX, case=False, regex=True).fillna(False).astype(bool)
    naive = present & ~has_tz
    parsed = pd.Series(pd.NaT, index=s.index, dtype=_TS)
    ok = present & has_tz
    if ok.any():
        parsed[ok] = pd.to_datetime(text[ok].str.upper(), utc=True, format="ISO8601", errors="coerce")
    unparsed = ok & parsed.isna()
    _bad_text_rows(label, column, text, naive, "timestamp without timezone (add Z or an offset)", out)
    _bad_text_rows(label, column, text, unparsed, "not an ISO-8601 timestamp", out)
    return parsed


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
        coerced = _COERCERS[str(col.dtype)](s, label, name, out)
        if coerced is None:
            unchecked.append(name)
            continue
        if out.total > before:
            kept_rows &= _coerced_ok(s, coerced, str(col.dtype))
        columns[name] = coerced
    for name, values in columns.items():
        frame[name] = values
    order = [c for c in schema.columns if c in frame.columns]
    frame = frame[order + [c for c in frame.columns if c not in schema.columns]]
    if out.total > bad_rows_before and not kept_rows.all():
        # Rows that failed to parse are already reported; the schema checks look at the others only.
        frame = frame[kept_rows]
    return frame, unchecked


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
        return good.fillna(False).astype(bool).to_numpy()
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
        column = None if pd.isna(column) else str(column)
        check = str(check)
        index = group["index"]
        if index.isna().all():
            if check.startswith("dtype("):
                out.add(label, None, column, f"expected dtype {check[6:-1]}, found {group['failure_case'].iloc[0]}")
            else:
                out.add(label, None, column, f"{check}: {group['failure_case'].iloc[0]}")
            continue
        rows = index.dropna().astype("int64").to_numpy()
        values = dict(zip(rows, group.loc[index.notna(), "failure_case"], strict=True))
        if check == "multiple_fields_uniqueness" or check in _FRAME_CHECK_COLUMN:
            continue  # reported once per row below
        if check == "not_nullable":
            out.add_rows(label, column, rows, lambda _: _MISSING_VALUE)
        elif check == "field_uniqueness":
            assert column is not None
            where = _rows_by_value(frame[column], rows)
            out.add_rows(label, column, rows, lambda i, c=column: _duplicate(c, values[i], where[values[i]]))
        else:
            out.add_rows(label, column, rows, lambda i, why=check: f"{why}, got {values[i]!r}")
    frame_level = cases[cases["check"].isin([*_FRAME_CHECK_COLUMN, "multiple_fields_uniqueness"])]
    for check, group in frame_level.groupby("check", sort=False):
        rows = np.unique(group["index"].dropna().astype("int64").to_numpy())
        if check == "multiple_fields_uniqueness":
            keys = frame.loc[rows, ["order_id", "attempt_number"]]
            pair = dict(zip(rows, zip(keys["order_id"], keys["attempt_number"], strict=True), strict=True))
            where_pairs: dict[tuple[Any, Any], list[int]] = {}
            for r in rows:
                where_pairs.setdefault(pair[r], []).append(int(r))
            out.add_rows(
                label,
                "attempt_number",
                rows,
                lambda i: f"duplicate attempt_number {pair[i][1]} in order {pair[i][0]!r} "
                f"(rows {_row_list(where_pairs[pair[i]])})",
            )
        else:
            out.add_rows(label, _FRAME_CHECK_COLUMN[str(check)], rows, lambda _, why=str(check): why)


def _rows_by_value(s: pd.Series, rows: np.ndarray[Any, Any]) -> dict[Any, list[int]]:
    where: dict[Any, list[int]] = {}
    for r, v in zip(rows, s.loc[rows], strict=True):
        where.setdefault(v, []).append(int(r))
    return where


def _row_list(rows: list[int], limit: int = 5) -> str:
    shown = ", ".join(str(r + 1) for r in sorted(rows)[:limit])
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def _duplicate(column: str, value: Any, rows: list[int]) -> str:
    return f"duplicate {column} {value!r} (rows {_row_list(rows)})"


def _read_table(
    path: str | Path, schema: pa.DataFrameSchema, columns: tuple[str, ...], out: _Collector
) -> pd.DataFrame:
    label = str(path)
    raw = _read_raw(Path(path), label)
    frame, unchecked = _coerce(raw, schema, label, out)
    _validate(frame, schema, label, unchecked, out)
    return frame


def read_attempts(path: str | Path, *, cap: int = DEFAULT_CAP) -> pd.DataFrame:
    """Read and validate an ``attempts`` file (.parquet or .csv); raises ``HistoryError`` listing every bad row.

    CSV timestamps are ISO-8601 strings with ``Z`` or an offset; booleans are true/false; empty fields are null.
    """
    out = _Collector(cap, ATTEMPT_COLUMNS)
    frame = _read_table(path, AttemptsSchema, ATTEMPT_COLUMNS, out)
    out.raise_if_any()
    return frame.reset_index(drop=True)


def read_nudges(path: str | Path, *, cap: int = DEFAULT_CAP) -> pd.DataFrame:
    """Read and validate a ``nudges`` file (.parquet or .csv); raises ``HistoryError`` listing every bad row."""
    out = _Collector(cap, NUDGE_COLUMNS)
    frame = _read_table(path, NudgesSchema, NUDGE_COLUMNS, out)
    out.raise_if_any()
    return frame.reset_index(drop=True)
