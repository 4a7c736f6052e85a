"""The history schema of CONTRACT.md section 3: reading, writing, validation reports, order reconstruction."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from model.history import (
    ATTEMPT_COLUMNS,
    NUDGE_COLUMNS,
    ORDER_COLUMNS,
    History,
    HistoryError,
    Problem,
    ValidationReport,
    read_attempts,
    read_history,
    read_nudges,
    reconstruct_orders,
    refuse_a_history_without_attempts,
    write_attempts,
    write_nudges,
    write_stops,
)
from tests.factories import (
    attempts_with_a_cascade_decided_once,
    history_with_retries_and_nudges_sharing_decisions,
    make_attempt,
    make_attempts_frame,
    make_nudge,
    make_nudges_frame,
    make_stops_frame,
)

FORMATS = ["parquet", "csv"]
ONE_ACTION = (
    "read as written, though a decision has one action (an attempt, or a nudge and the payments through its link); "
    "the off-policy evaluation counts each action as a decision of its own"
)
EARLY = (
    "timestamp before 1970, outside the range winback reads (1970-01-01 to 2262-04-11): no decision can be made "
    "at it (a placeholder for a missing date?)"
)
STRATEGIES = "initial, retry_same, cascade, step_up, clear_pan, alternate_network, retarget_link"


def _write_pair(tmp_path: Path, fmt: str, attempts: pd.DataFrame, nudges: pd.DataFrame) -> tuple[Path, Path]:
    a, n = tmp_path / f"attempts.{fmt}", tmp_path / f"nudges.{fmt}"
    write_attempts(attempts, a)
    write_nudges(nudges, n)
    return a, n


def _edited_csv(path: Path, edit: Callable[[pd.DataFrame], None]) -> Path:
    """Rewrite a CSV written by ``write_*`` after editing its raw text cells (to make bad files)."""
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    edit(raw)
    raw.to_csv(path, index=False)
    return path


def _set(index: int, column: str, value: str) -> Callable[[pd.DataFrame], None]:
    def edit(raw: pd.DataFrame) -> None:
        raw.loc[index, column] = value

    return edit


def _attempts_csv(tmp_path: Path, edit: Callable[[pd.DataFrame], None]) -> Path:
    path = tmp_path / "attempts.csv"
    write_attempts(make_attempts_frame(), path)
    return _edited_csv(path, edit)


def _raw_parquet(tmp_path: Path, frame: pd.DataFrame, name: str = "attempts.parquet") -> Path:
    """Write ``frame`` as is, bypassing validation, to make bad Parquet files."""
    path = tmp_path / name
    frame.to_parquet(path, index=False)
    return path


def _problems(exc: pytest.ExceptionInfo[HistoryError]) -> str:
    return str(exc.value)


# --- valid files --------------------------------------------------------------------------------------------


def test_column_lists_are_the_contracts() -> None:
    assert ATTEMPT_COLUMNS[:4] == ("merchant_id", "order_id", "txn_id", "attempt_number")
    assert len(ATTEMPT_COLUMNS) == 29
    assert ATTEMPT_COLUMNS[-1] == "propensity"
    assert NUDGE_COLUMNS == (
        "merchant_id", "order_id", "nudge_id", "sent_at", "channel", "template_id", "delivered", "clicked_at",
        "decision_id", "propensity",
    )  # fmt: skip


@pytest.mark.parametrize("fmt", FORMATS)
def test_valid_history_round_trips_exactly(tmp_path: Path, fmt: str) -> None:
    attempts, nudges = make_attempts_frame(), make_nudges_frame()
    history = read_history(*_write_pair(tmp_path, fmt, attempts, nudges))
    pd.testing.assert_frame_equal(history.attempts, attempts)
    pd.testing.assert_frame_equal(history.nudges, nudges)
    assert str(history.attempts["created_at"].dtype) == "datetime64[ns, UTC]"
    assert history.attempts.loc[3, "created_at"] == pd.Timestamp("2026-11-01T11:05:00.250Z")
    assert history.attempts.loc[5, "created_at"] == pd.Timestamp("2026-11-01T06:30:00Z")  # from +05:30


def test_csv_uses_iso_utc_timestamps_true_false_and_empty_nulls(tmp_path: Path) -> None:
    path = tmp_path / "nudges.csv"
    write_nudges(make_nudges_frame(), path)
    lines = path.read_text().splitlines()
    assert (
        lines[1]
        == "m_demo,ord_link,ndg_1,2026-11-02T04:30:00Z,whatsapp,tpl_pay_link,true,2026-11-02T04:40:00Z,dec_l3,0.5"
    )
    assert lines[3].endswith(",false,,,1.0")


def test_nanosecond_timestamps_survive_csv(tmp_path: Path) -> None:
    nudges = make_nudges_frame(make_nudge(sent_at="2026-11-02T04:30:00.123456789Z"))
    path = tmp_path / "nudges.csv"
    write_nudges(nudges, path)
    pd.testing.assert_frame_equal(read_nudges(path), nudges)


@pytest.mark.parametrize("fmt", FORMATS)
def test_extra_columns_are_kept(tmp_path: Path, fmt: str) -> None:
    attempts = make_attempts_frame()
    attempts["routing_rule"] = pd.array(["r1"] * len(attempts), dtype="string")
    path = tmp_path / f"attempts.{fmt}"
    write_attempts(attempts, path)
    got = read_attempts(path)
    assert list(got.columns) == [*ATTEMPT_COLUMNS, "routing_rule"]
    assert got["routing_rule"].tolist() == ["r1"] * 8


def test_columns_in_another_order_are_put_in_contract_order(tmp_path: Path) -> None:
    nudges = make_nudges_frame()
    path = _raw_parquet(tmp_path, nudges[list(reversed(NUDGE_COLUMNS))], "nudges.parquet")
    pd.testing.assert_frame_equal(read_nudges(path), nudges)


# --- bad files: one report names row, column and reason -------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_files_given_in_each_others_place_are_named_so_in_one_line_each(tmp_path: Path, fmt: str) -> None:
    """(Newcomer walk.) `--attempts nudges.parquet --nudges attempts.parquet` answered "452 problems": every column
    of each file reported missing, one line per column, and never the cause."""
    attempts, nudges = _write_pair(tmp_path, fmt, make_attempts_frame(), make_nudges_frame())
    with pytest.raises(HistoryError) as refused:
        read_history(nudges, attempts)
    report = _problems(refused)
    assert report.startswith("invalid history: 2 problems\n"), report
    assert (
        f"{nudges}: has the columns of a nudges file, not of an attempts file (no txn_id, attempt_number, "
        "created_at, ...): were two files given in each other's place?"
    ) in report
    assert f"{attempts}: has the columns of an attempts file, not of a nudges file (no sent_at, channel," in report
    stops = tmp_path / f"stops.{fmt}"
    write_stops(make_stops_frame(), stops)
    with pytest.raises(
        HistoryError, match=r"has the columns of an attempts file, not of a stops file \(no decided_at\)"
    ):
        read_history(attempts, nudges, stops_path=attempts)
    with pytest.raises(HistoryError, match="has the columns of a stops file, not of a nudges file"):
        read_history(attempts, stops)
    # A file of no kind, or one with only some columns missing, is still told column by column.
    with pytest.raises(HistoryError, match="column txn_id: missing column"):
        read_history(_raw_parquet(tmp_path, make_attempts_frame().drop(columns=["txn_id"])), nudges)


@pytest.mark.parametrize("separator", [";", "\t"])
def test_a_csv_separated_by_another_character_is_named_so_in_one_line(tmp_path: Path, separator: str) -> None:
    """(Newcomer walk.) A spreadsheet's export separated by semicolons (Excel's in much of Europe) answered "29
    problems", every column missing, though the header names each one."""
    path = tmp_path / "attempts.csv"
    make_attempts_frame().to_csv(path, index=False, sep=separator)
    with pytest.raises(HistoryError) as refused:
        read_attempts(path)
    shown = separator.join(["merchant_id", "order_id", "txn_id"]) + "..."
    assert _problems(refused) == (
        f"invalid history: 1 problem\n{path}: the header is one column, {shown!r}: a history CSV is separated by "
        f"commas, and this one seems to be by {separator!r}"
    )


def test_unsupported_extension_is_named(tmp_path: Path) -> None:
    path = tmp_path / "attempts.json"
    path.write_text("[]")
    with pytest.raises(HistoryError, match=r"unsupported file extension '\.json': use \.parquet or \.csv"):
        read_attempts(path)


def test_a_missing_file_or_a_folder_is_named_as_such(tmp_path: Path) -> None:
    # It said "cannot read the file: [Errno 2] ..." (the newcomer walk-through's note).
    with pytest.raises(HistoryError, match=r"attempts\.parquet: no such file$"):
        read_attempts(tmp_path / "attempts.parquet")
    (tmp_path / "history.csv").mkdir()
    with pytest.raises(HistoryError, match=r"history\.csv: a folder, not a history file$"):
        read_attempts(tmp_path / "history.csv")
    # A .parquet folder is a dataset of parts (as Dask writes it): read, not refused.
    make_attempts_frame().to_parquet(tmp_path / "attempts.parquet", partition_cols=["merchant_id"])
    assert len(read_attempts(tmp_path / "attempts.parquet")) == len(make_attempts_frame())


def test_missing_columns_are_named_and_rows_still_checked(tmp_path: Path) -> None:
    def edit(raw: pd.DataFrame) -> None:
        raw.drop(columns=["card_network", "status"], inplace=True)
        raw.loc[2, "amount"] = "abc"

    path = _attempts_csv(tmp_path, edit)
    with pytest.raises(HistoryError) as exc:
        read_attempts(path)
    text = _problems(exc)
    assert f"{path}: column card_network: missing column" in text
    assert f"{path}: column status: missing column" in text
    assert f"{path}:row 3: column amount: not a number: 'abc'" in text
    assert exc.value.report.total == 3


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("amount", "abc", "not a number: 'abc'"),
        ("attempt_number", "1.5", "not an integer: '1.5'"),
        ("phone_present", "yes", "not a boolean (true or false): 'yes'"),
        ("phone_present", "", "missing value (the column is not nullable)"),
        ("created_at", "2026-11-01T11:00:00", "timestamp without timezone (add Z or an offset): '2026-11-01T11:00:00'"),
        ("created_at", "yesterday+01:00", "not an ISO-8601 timestamp: 'yesterday+01:00'"),
        ("created_at", "yesterday", "not an ISO-8601 timestamp: 'yesterday'"),  # not "without timezone"
        ("created_at", "2026-13-45", "not an ISO-8601 timestamp: '2026-13-45'"),
        # A date alone was read as midnight UTC: its day "-01" passed for a UTC offset.
        (
            "created_at",
            "2026-11-01",
            "a date without a time and timezone (write e.g. 2026-11-01T10:15:00Z): '2026-11-01'",
        ),
        ("created_at", "2026-11", "a date without a time and timezone (write e.g. 2026-11-01T10:15:00Z): '2026-11'"),
        # A well-formed timestamp past what a pandas timestamp holds was told it is no ISO-8601 timestamp.
        (
            "created_at",
            "2300-01-01T00:00:00Z",
            "timestamp outside the range winback reads (1970-01-01 to 2262-04-11): '2300-01-01T00:00:00Z'",
        ),
        # SQL Server's and Excel's zero date was read, and train failed minutes later in the evaluation's replay.
        ("created_at", "1900-01-01T00:00:00Z", f"{EARLY}: '1900-01-01T00:00:00Z'"),
        ("created_at", "", "missing value (the column is not nullable)"),
        ("amount", "-1", "amount must be >= 0, got -1.0"),
        ("amount", "inf", "amount must be finite, got inf"),
        ("strategy", "teleport", f"must be one of {STRATEGIES}, got 'teleport'"),
        ("status", "declined", "must be one of success, failure, got 'declined'"),
        ("authentication_type", "three_ds_challenge", "must be one of three_ds, no_three_ds, got 'three_ds_challenge'"),
        ("currency", "inr", "must be a 3-letter uppercase ISO-4217 code, got 'inr'"),
        ("customer_country", "IND", "must be a 2-letter uppercase ISO-3166 alpha-2 code, got 'IND'"),
        ("propensity", "0", "propensity must be in (0, 1], got 0.0"),
        ("propensity", "1.5", "propensity must be in (0, 1], got 1.5"),
        ("connector", "", "missing value (the column is not nullable)"),
        ("attempt_number", "0", "attempt_number must be >= 1, got 0"),
    ],
)
def test_bad_csv_value_is_reported_with_row_column_and_reason(
    tmp_path: Path, column: str, value: str, reason: str
) -> None:
    def edit(raw: pd.DataFrame) -> None:
        raw.loc[2, column] = value  # the third data row

    path = _attempts_csv(tmp_path, edit)
    with pytest.raises(HistoryError) as exc:
        read_attempts(path)
    assert exc.value.report.problems == [Problem(str(path), 3, column, reason)]
    assert _problems(exc) == f"invalid history: 1 problem\n{path}:row 3: column {column}: {reason}"


def test_bad_nudge_values_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "nudges.csv"
    write_nudges(make_nudges_frame(), path)

    def edit(raw: pd.DataFrame) -> None:
        raw.loc[0, "channel"] = "pigeon"
        raw.loc[1, "clicked_at"] = "2026-11-02T04:00:00Z"  # before sent_at 04:30
        raw.loc[2, "nudge_id"] = "ndg_1"

    _edited_csv(path, edit)
    with pytest.raises(HistoryError) as exc:
        read_nudges(path)
    assert _problems(exc).splitlines()[1:] == [
        f"{path}:row 1: column nudge_id: duplicate nudge_id 'ndg_1' (rows 1, 3)",
        f"{path}:row 1: column channel: must be one of sms, whatsapp, email, push, got 'pigeon'",
        f"{path}:row 2: column clicked_at: clicked_at is before sent_at",
        f"{path}:row 3: column nudge_id: duplicate nudge_id 'ndg_1' (rows 1, 3)",
    ]


def test_duplicate_txn_ids_name_all_rows(tmp_path: Path) -> None:
    frame = make_attempts_frame()
    frame.loc[[1, 4], "txn_id"] = "t_c1"
    with pytest.raises(HistoryError) as exc:
        read_attempts(_raw_parquet(tmp_path, frame))
    lines = _problems(exc).splitlines()[1:]
    assert [line.split(": ", 1)[1] for line in lines] == ["column txn_id: duplicate txn_id 't_c1' (rows 1, 2, 5)"] * 3
    assert [p.row for p in exc.value.report.problems] == [1, 2, 5]


def test_duplicate_attempt_number_within_an_order(tmp_path: Path) -> None:
    frame = make_attempts_frame()
    frame.loc[4, "attempt_number"] = 2
    with pytest.raises(HistoryError) as exc:
        read_attempts(_raw_parquet(tmp_path, frame))
    assert [(p.row, p.column, p.reason) for p in exc.value.report.problems] == [
        (4, "attempt_number", "duplicate attempt_number 2 in order 'ord_link' (rows 4, 5)"),
        (5, "attempt_number", "duplicate attempt_number 2 in order 'ord_link' (rows 4, 5)"),
    ]


@pytest.mark.parametrize(
    ("row", "edits", "column", "reason"),
    [
        (
            5,
            {"nudge_id": None},
            "nudge_id",
            "a retarget_link attempt needs the nudge_id of the nudge whose link was used",
        ),
        (2, {"nudge_id": "ndg_1"}, "nudge_id", "nudge_id is set but strategy is not retarget_link"),
        (
            7,
            {"error_code": None, "unified_code": None},
            "error_code",
            "status is failure but error_code, unified_code, network_decline_code and error_message are all null",
        ),
        (3, {"issuer": ""}, "issuer", "empty string (leave the field null instead), got ''"),
    ],
)
def test_row_rules(tmp_path: Path, row: int, edits: dict[str, object], column: str, reason: str) -> None:
    frame = make_attempts_frame()
    for name, value in edits.items():
        frame.loc[row - 1, name] = value
    with pytest.raises(HistoryError) as exc:
        read_attempts(_raw_parquet(tmp_path, frame))
    assert exc.value.report.problems == [Problem(str(tmp_path / "attempts.parquet"), row, column, reason)]


def test_a_success_row_may_carry_an_error_code(tmp_path: Path) -> None:
    frame = make_attempts_frame()
    assert frame.loc[7, "status"] == "success"
    assert frame.loc[7, "error_code"] == "stale_code_kept_on_success"
    pd.testing.assert_frame_equal(read_attempts(_raw_parquet(tmp_path, frame)), frame)


def test_parquet_column_types_are_checked(tmp_path: Path) -> None:
    frame = make_attempts_frame()
    frame["created_at"] = frame["created_at"].dt.tz_localize(None)
    frame["customer_id"] = np.arange(8)
    frame["amount"] = pd.Series(["1.0", "abc", *["2.0"] * 6], dtype=object)
    path = _raw_parquet(tmp_path, frame)
    with pytest.raises(HistoryError) as exc:
        read_attempts(path)
    assert _problems(exc).splitlines()[1:] == [
        f"{path}: column created_at: timestamps without timezone (naive datetime): store them as UTC",
        f"{path}: column customer_id: expected strings, found dtype int64",
        f"{path}:row 2: column amount: not a number: 'abc'",
    ]


def test_a_number_among_strings_is_reported(tmp_path: Path) -> None:
    frame = make_attempts_frame().astype({"error_message": object})
    frame.loc[0, "error_message"] = 51
    with pytest.raises(HistoryError, match=r"row 1: column error_message: expected a string, got int 51"):
        write_attempts(frame, tmp_path / "out.parquet")


def test_problems_come_from_both_files_at_once(tmp_path: Path) -> None:
    a, n = _write_pair(tmp_path, "csv", make_attempts_frame(), make_nudges_frame())
    _edited_csv(a, _set(0, "amount", "-5"))
    _edited_csv(n, _set(1, "sent_at", "2026-11-02 04:30"))
    with pytest.raises(HistoryError) as exc:
        read_history(a, n)
    assert _problems(exc).splitlines() == [
        "invalid history: 2 problems",
        f"{a}:row 1: column amount: amount must be >= 0, got -5.0",
        f"{n}:row 2: column sent_at: timestamp without timezone (add Z or an offset): '2026-11-02 04:30'",
    ]


def test_report_is_capped_with_a_count_of_the_rest(tmp_path: Path) -> None:
    rows = [make_attempt(order_id=f"o{i}", txn_id=f"t{i}", amount=-1.0) for i in range(60)]
    path = _raw_parquet(tmp_path, make_attempts_frame(*rows))
    with pytest.raises(HistoryError) as exc:
        read_attempts(path)
    lines = _problems(exc).splitlines()
    assert lines[0] == "invalid history: 60 problems"
    assert lines[1] == f"{path}:row 1: column amount: amount must be >= 0, got -1.0"
    assert lines[50] == f"{path}:row 50: column amount: amount must be >= 0, got -1.0"
    assert lines[51:] == ["... and 10 more"]
    assert exc.value.report.total == 60
    assert len(exc.value.report.problems) == 50
    with pytest.raises(HistoryError) as small:
        read_attempts(path, cap=3)
    assert small.value.report.format().splitlines()[3:] == ["... and 57 more"]


def test_report_format_without_row_or_column() -> None:
    report = ValidationReport([Problem("a.csv", None, None, "cannot read"), Problem("a.csv", 2, None, "odd")], 2)
    assert report.format() == "a.csv: cannot read\na.csv:row 2: odd"
    assert not report.ok


def test_invalid_frame_is_not_written(tmp_path: Path) -> None:
    frame = make_attempts_frame()
    frame.loc[0, "currency"] = "RUPEES"
    path = tmp_path / "attempts.csv"
    with pytest.raises(HistoryError, match=r"attempts\.csv \(writing\):row 1: column currency: must be a 3-letter"):
        write_attempts(frame, path)
    assert not path.exists()


# --- rules across rows and files (read_history) ----------------------------------------------------------


def _history_problems(
    tmp_path: Path, attempts: pd.DataFrame, nudges: pd.DataFrame
) -> list[tuple[str, int | None, str | None, str]]:
    a, n = _write_pair(tmp_path, "parquet", attempts, nudges)
    with pytest.raises(HistoryError) as exc:
        read_history(a, n)
    return [(Path(p.file).stem, p.row, p.column, p.reason) for p in exc.value.report.problems]


def test_attempt_number_gap(tmp_path: Path) -> None:
    attempts = make_attempts_frame()
    attempts.loc[4, "attempt_number"] = 4
    assert _history_problems(tmp_path, attempts, make_nudges_frame()) == [
        ("attempts", 5, "attempt_number",
         "attempt_number 4 breaks the sequence: order 'ord_link' has 3 attempts, numbered 1..3 without gaps"),
    ]  # fmt: skip


def test_attempts_out_of_time_order_and_first_not_initial(tmp_path: Path) -> None:
    attempts = make_attempts_frame()
    attempts.loc[1, "created_at"] = pd.Timestamp("2026-11-01T09:00:00Z")
    attempts.loc[5, "strategy"] = "cascade"
    attempts.loc[6, "strategy"] = "initial"
    assert _history_problems(tmp_path, attempts, make_nudges_frame()) == [
        ("attempts", 2, "created_at", "created_at 2026-11-01T09:00:00+00:00 is earlier than that of attempt 1 "
         "of order 'ord_cascade' (row 1)"),
        ("attempts", 6, "strategy", "attempt 1 of an order must have strategy 'initial', got 'cascade'"),
        ("attempts", 7, "strategy", "strategy 'initial' is only for attempt 1 (this is attempt 2)"),
    ]  # fmt: skip


def test_order_constants_and_nothing_after_success(tmp_path: Path) -> None:
    attempts = make_attempts_frame(
        make_attempt(),
        make_attempt(txn_id="t2", attempt_number=2, strategy="cascade", created_at="2026-11-01T10:01:00Z",
                     status="success", currency="USD", customer_id="cus_2", merchant_id="m_other"),
        make_attempt(txn_id="t3", attempt_number=3, strategy="cascade", created_at="2026-11-01T10:02:00Z"),
    )  # fmt: skip
    assert _history_problems(tmp_path, attempts, make_nudges_frame(make_nudge(sent_at="2026-11-01T10:00:30Z"))) == [
        ("attempts", 2, "merchant_id", "'m_other' differs from 'm_demo' on attempt 1 of the same order (row 1); "
         "it must be constant per order"),
        ("attempts", 2, "currency", "'USD' differs from 'INR' on attempt 1 of the same order (row 1); "
         "it must be constant per order"),
        ("attempts", 2, "customer_id", "'cus_2' differs from 'cus_1' on attempt 1 of the same order (row 1); "
         "it must be constant per order"),
        ("attempts", 3, "attempt_number", "attempt 3 comes after a successful attempt of order 'ord_1'; "
         "nothing may follow a success"),
    ]  # fmt: skip


def test_links_between_attempts_and_nudges(tmp_path: Path) -> None:
    attempts = make_attempts_frame()
    attempts.loc[4, "nudge_id"] = "ndg_9"
    nudges = make_nudges_frame()
    nudges.loc[1, "order_id"] = "ord_gone"
    assert _history_problems(tmp_path, attempts, nudges) == [
        ("attempts", 5, "nudge_id", "nudge_id 'ndg_9' is not in the nudges file"),
        ("nudges", 2, "order_id", "order 'ord_gone' has no attempts in the attempts file"),
    ]


def test_retarget_link_must_use_a_nudge_of_its_order_sent_before(tmp_path: Path) -> None:
    attempts = make_attempts_frame()
    attempts.loc[4, "created_at"] = pd.Timestamp("2026-11-02T04:00:00Z")  # ndg_1 is sent at 04:30
    nudges = make_nudges_frame()
    nudges.loc[0, "clicked_at"] = pd.NaT
    assert _history_problems(tmp_path, attempts, nudges) == [
        ("attempts", 5, "created_at", "retarget_link attempt is earlier than its nudge 'ndg_1' was sent "
         "(2026-11-02T04:30:00+00:00)"),
    ]  # fmt: skip
    attempts = make_attempts_frame()
    attempts.loc[4, "nudge_id"] = "ndg_2"
    assert _history_problems(tmp_path, attempts, make_nudges_frame()) == [
        ("attempts", 5, "nudge_id", "nudge 'ndg_2' belongs to order 'ord_lost', not to 'ord_link'"),
    ]


# --- reconstruct_orders --------------------------------------------------------------------------------------


def test_reconstruct_orders_exact_values() -> None:
    orders = reconstruct_orders(make_attempts_frame(), make_nudges_frame())
    assert tuple(orders.columns) == ORDER_COLUMNS
    utc = pd.Timestamp
    expected = pd.DataFrame(
        {
            "merchant_id": pd.array(["m_demo"] * 4, dtype="string"),
            "order_id": pd.array(["ord_cascade", "ord_link", "ord_lost", "ord_ok"], dtype="string"),
            "customer_id": pd.array(["cus_c", "cus_l", "cus_x", "cus_o"], dtype="string"),
            "amount": [499.0, 1250.5, 499.0, 499.0],
            "currency": pd.array(["INR", "INR", "USD", "INR"], dtype="string"),
            "initially_succeeded": [False, False, False, True],
            "first_failure_at": pd.Series(
                [utc("2026-11-01T10:00Z"), utc("2026-11-01T11:00Z"), utc("2026-11-01T06:30Z"), pd.NaT],
                dtype="datetime64[ns, UTC]",
            ),
            "n_attempts": [2, 3, 2, 1],
            "n_retries": [1, 1, 1, 0],
            "n_nudges": [0, 1, 2, 0],
            "recovered": [True, True, False, False],
            "recovered_at": pd.Series(
                [utc("2026-11-01T10:00:02Z"), utc("2026-11-02T04:41Z"), pd.NaT, pd.NaT], dtype="datetime64[ns, UTC]"
            ),
            "time_to_recovery": pd.to_timedelta(["2s", "17h41min", None, None]),
            "recovering_strategy": pd.array(["cascade", "retarget_link", None, None], dtype="string"),
            "strategies_used": [
                ("initial", "cascade"),
                ("initial", "retry_same", "retarget_link"),
                ("initial", "step_up"),
                ("initial",),
            ],
            "first_error_code": pd.array(
                ["processing_error", "insufficient_funds", "do_not_honor", None], dtype="string"
            ),
            "first_connector": pd.array(["stripe"] * 4, dtype="string"),
        }
    )
    pd.testing.assert_frame_equal(orders, expected)


def test_reconstruct_orders_does_not_depend_on_row_order_and_nudges_are_optional() -> None:
    attempts = make_attempts_frame()
    shuffled = attempts.iloc[[7, 4, 0, 6, 2, 1, 5, 3]].reset_index(drop=True)
    orders = reconstruct_orders(shuffled).set_index("order_id").sort_index()
    assert orders["n_nudges"].tolist() == [0, 0, 0, 0]
    assert orders.loc["ord_link", "strategies_used"] == ("initial", "retry_same", "retarget_link")
    assert orders.loc["ord_link", "time_to_recovery"] == pd.Timedelta(hours=17, minutes=41)
    assert orders["recovered"].tolist() == [True, True, False, False]


def test_reconstruct_orders_of_an_empty_history() -> None:
    empty = make_attempts_frame().iloc[0:0]
    orders = reconstruct_orders(empty, make_nudges_frame().iloc[0:0])
    assert tuple(orders.columns) == ORDER_COLUMNS
    assert len(orders) == 0


def test_csv_rows_with_too_few_or_too_many_fields_are_reported_by_row(tmp_path: Path) -> None:
    # read_history used to fill a short row's last columns with nulls (pandas), so a row that lost its propensity
    # was read as one without; split_history refused the file without naming the row.
    from model.history import split_history

    a, n = _write_pair(tmp_path, "csv", make_attempts_frame(), make_nudges_frame())
    lines = a.read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0]  # data row 2: one field short
    lines[5] += ",extra"  # data row 5: one field too many
    a.write_text("\n".join(lines) + "\n")
    for read in (lambda: read_history(a, n), lambda: split_history(a, n, tmp_path / "parts")):
        with pytest.raises(HistoryError) as exc:
            read()
        assert exc.value.report.problems == [
            Problem(str(a), 2, None, "28 fields where the header has 29"),
            Problem(str(a), 5, None, "30 fields where the header has 29"),
        ]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_column_named_twice_is_reported_by_name(tmp_path: Path, fmt: str) -> None:
    # An export joining two tables can carry a column twice: split_history (train) crashed with "The truth value
    # of a Series is ambiguous" (CSV) or Arrow's "Multiple matches for FieldRef" with the whole schema (Parquet);
    # read_history read a CSV's second copy as "propensity.1" and ignored it.
    import pyarrow as pa_lib
    import pyarrow.parquet as pq

    from model.history import split_history

    a, n = _write_pair(tmp_path, fmt, make_attempts_frame(), make_nudges_frame())
    if fmt == "csv":
        lines = a.read_text().splitlines()
        a.write_text("\n".join(f"{line},{line.rsplit(',', 1)[1]}" for line in lines) + "\n")
    else:
        table = pq.read_table(a)
        pq.write_table(pa_lib.Table.from_arrays([*table.columns, table["propensity"]],
                                                names=[*table.column_names, "propensity"]), a)  # fmt: skip
    for read in (lambda: read_history(a, n), lambda: split_history(a, n, tmp_path / "parts")):
        with pytest.raises(HistoryError) as exc:
            read()
        assert exc.value.report.problems == [
            Problem(str(a), None, "propensity", "the file has 2 columns of this name (keep one)")
        ]


# --- the optional stops file --------------------------------------------------------------------------------


def _stops_problems(
    tmp_path: Path, stops: pd.DataFrame, *, split: bool = False
) -> list[tuple[str, int | None, str | None, str]]:
    from model.history import split_history

    a, n = _write_pair(tmp_path, "parquet", make_attempts_frame(), make_nudges_frame())
    s = _raw_parquet(tmp_path, stops, "stops.parquet")

    def read() -> object:
        if split:
            return split_history(a, n, tmp_path / "parts", partition_rows=2, stops_path=s)
        return read_history(a, n, stops_path=s)

    with pytest.raises(HistoryError) as exc:
        read()
    return [(Path(p.file).stem, p.row, p.column, p.reason) for p in exc.value.report.problems]


def test_a_history_reads_with_or_without_its_stops_file(tmp_path: Path) -> None:
    from model.history import write_stops

    a, n = _write_pair(tmp_path, "csv", make_attempts_frame(), make_nudges_frame())
    assert read_history(a, n).stops is None
    stops = make_stops_frame({"order_id": "ord_lost", "decided_at": "2026-11-05T04:30:00Z", "attempt_number": 2},
                             {"order_id": "ord_link", "decision_id": "dec_s2", "decided_at": "2026-11-01T11:00:00Z",
                              "propensity": None})  # fmt: skip
    write_stops(stops, tmp_path / "stops.csv")
    read = read_history(a, n, stops_path=tmp_path / "stops.csv").stops
    assert read is not None
    pd.testing.assert_frame_equal(read, stops)


def test_bad_stop_rows_are_reported_with_row_column_and_reason(tmp_path: Path) -> None:
    stops = make_stops_frame(
        {"order_id": "ord_lost", "decided_at": "2026-11-05T04:30:00Z", "attempt_number": 2},
        {"order_id": "ord_lost", "decision_id": "dec_stop_1", "attempt_number": 2, "propensity": 1.5},
    )
    stops["decided_at"] = stops["decided_at"].astype(object)
    stops.loc[1, "decided_at"] = None
    assert _stops_problems(tmp_path, stops) == [
        ("stops", 1, "decision_id", "duplicate decision_id 'dec_stop_1' (rows 1, 2)"),
        ("stops", 2, "decision_id", "duplicate decision_id 'dec_stop_1' (rows 1, 2)"),
        ("stops", 2, "propensity", "propensity must be in (0, 1], got 1.5"),
        ("stops", 2, "decided_at", "missing value (the column is not nullable)"),
    ]
    assert _stops_problems(tmp_path, stops.drop(columns=["attempt_number"])) == [
        ("stops", None, "attempt_number", "missing column"),
        ("stops", 1, "decision_id", "duplicate decision_id 'dec_stop_1' (rows 1, 2)"),
        ("stops", 2, "decision_id", "duplicate decision_id 'dec_stop_1' (rows 1, 2)"),
        ("stops", 2, "propensity", "propensity must be in (0, 1], got 1.5"),
        ("stops", 2, "decided_at", "missing value (the column is not nullable)"),
    ]


@pytest.mark.parametrize("split", [False, True], ids=["read_history", "split_history"])
def test_a_stop_must_answer_a_failed_attempt_of_its_order_and_not_be_another_actions_decision(
    tmp_path: Path, split: bool
) -> None:
    stops = make_stops_frame(
        {"order_id": "ord_lost", "decision_id": "dec_ok", "decided_at": "2026-11-05T04:30:00Z", "attempt_number": 2},
        {"order_id": "ord_gone", "decision_id": "dec_2"},
        {"order_id": "ord_lost", "merchant_id": "m_other", "decision_id": "dec_3", "decided_at": "2026-11-01T07:30:00Z",
         "attempt_number": 2},
        {"order_id": "ord_lost", "decision_id": "dec_4", "attempt_number": 3},
        {"order_id": "ord_cascade", "decision_id": "dec_5", "decided_at": "2026-11-01T10:00:03Z", "attempt_number": 2},
        {"order_id": "ord_link", "decision_id": "dec_6", "decided_at": "2026-11-01T11:00:00Z", "attempt_number": 2},
        {"order_id": "ord_link", "decision_id": "dec_7", "decided_at": "2026-11-01T12:00:00Z", "attempt_number": 1},
        {"order_id": "ord_lost", "decision_id": "dec_c2", "decided_at": "2026-11-01T08:00:00Z", "attempt_number": 2},
    )  # fmt: skip
    assert _stops_problems(tmp_path, stops, split=split) == [
        ("stops", 2, "order_id", "order 'ord_gone' has no attempts in the attempts file"),
        ("stops", 3, "merchant_id", "'m_other' differs from the merchant of order 'ord_lost' in the attempts file "
         "('m_demo')"),
        ("stops", 4, "attempt_number", "order 'ord_lost' has no attempt 3 (it has 2)"),
        ("stops", 5, "attempt_number", "attempt 2 of order 'ord_cascade' succeeded: a stop answers a failed attempt"),
        ("stops", 6, "decided_at", "decided_at 2026-11-01T11:00:00+00:00 is before attempt 2 of order 'ord_link' "
         "(2026-11-01T11:05:00.250000+00:00), the failure it answers"),
        ("stops", 7, "decided_at", "decided_at 2026-11-01T12:00:00+00:00 is after attempt 2 of order 'ord_link' "
         "(2026-11-01T11:05:00.250000+00:00): a stop answers the order's last attempt"),
        ("stops", 8, "decision_id", "decision 'dec_c2' is also the decision of an attempt: a decision has one action"),
    ]  # fmt: skip


def test_the_stops_file_beside_an_attempts_file_is_found_in_either_format(tmp_path: Path) -> None:
    from model.history import stops_beside
    from pipelines.train import resolve_stops

    attempts = tmp_path / "attempts.csv"
    assert stops_beside(attempts) is None
    assert resolve_stops(attempts, None) is None
    (tmp_path / "stops.parquet").touch()
    assert stops_beside(attempts) == tmp_path / "stops.parquet"
    (tmp_path / "stops.csv").touch()
    assert stops_beside(attempts) == tmp_path / "stops.csv"  # the attempts file's own format first
    assert resolve_stops(attempts, tmp_path / "other.parquet") == tmp_path / "other.parquet"  # given: used as is


# --- a history without rows -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_history_whose_attempts_hold_only_a_header_is_refused_naming_each_file_without_rows(
    tmp_path: Path, fmt: str
) -> None:
    a, n = _write_pair(tmp_path, fmt, make_attempts_frame().iloc[:0], make_nudges_frame().iloc[:0])
    if fmt == "csv":
        a.write_text(a.read_text() + "\n\n")  # blank lines are no rows (the reader skips them)
    with pytest.raises(HistoryError) as exc:
        refuse_a_history_without_attempts(a, n)
    assert exc.value.report.problems == [
        Problem(str(a), None, None, "no rows, only a header: a history needs at least one attempt"),
        Problem(str(n), None, None, "no rows either, only a header"),
    ]
    # Nudges without rows beside attempts with some: a history of silent retries alone, which the readers judge.
    a, n = _write_pair(tmp_path, fmt, make_attempts_frame(), make_nudges_frame().iloc[:0])
    refuse_a_history_without_attempts(a, n)
    # A file the readers cannot read is theirs to report.
    refuse_a_history_without_attempts(tmp_path / f"absent.{fmt}", n)
    (tmp_path / "latin1.csv").write_bytes(b"merchant_id\n\xe9\n")
    refuse_a_history_without_attempts(tmp_path / "latin1.csv", n)


def test_stops_beside_attempts_without_rows_are_reported_not_an_index_error(tmp_path: Path) -> None:
    a, n = _write_pair(tmp_path, "parquet", make_attempts_frame().iloc[:0], make_nudges_frame().iloc[:0])
    s = _raw_parquet(tmp_path, make_stops_frame({"order_id": "ord_lost"}), "stops.parquet")
    with pytest.raises(HistoryError) as exc:
        read_history(a, n, stops_path=s)
    assert [(p.row, p.column) for p in exc.value.report.problems] == [(1, "order_id")], str(exc.value)


# --- values read with a warning, or refused (stop 48) --------------------------------------------------------


def _warnings(history: History) -> list[tuple[str, int | None, str | None, str]]:
    return [(Path(p.file).stem, p.row, p.column, p.reason) for p in history.warnings.problems]


def test_a_decision_id_on_two_orders_is_refused_naming_both_rows(tmp_path: Path) -> None:
    # A decision is made for one order: dec_c2 (ord_cascade, row 2) again on ord_lost's attempt and on its nudge.
    attempts = make_attempts_frame()
    attempts.loc[6, "decision_id"] = "dec_c2"
    nudges = make_nudges_frame()
    nudges.loc[2, "decision_id"] = "dec_c2"
    assert _history_problems(tmp_path, attempts, nudges) == [
        ("attempts", 7, "decision_id", "decision 'dec_c2' is also the decision of order 'ord_cascade' "
         f"({tmp_path}/attempts.parquet row 2): a decision is made for one order"),
        ("nudges", 3, "decision_id", "decision 'dec_c2' is also the decision of order 'ord_cascade' "
         f"({tmp_path}/attempts.parquet row 2): a decision is made for one order"),
    ]  # fmt: skip


def test_one_decision_on_a_nudge_and_the_attempt_through_its_link_is_fine(tmp_path: Path) -> None:
    attempts = make_attempts_frame()
    attempts.loc[4, "decision_id"] = "dec_l3"  # ndg_1's decision, the same order
    a, n = _write_pair(tmp_path, "parquet", attempts, make_nudges_frame())
    assert _warnings(read_history(a, n)) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_two_attempts_of_one_order_carrying_one_decision_are_read_with_a_warning_naming_both(
    tmp_path: Path, fmt: str
) -> None:
    # Read without a word: each attempt is a decision point's action, so the evaluation counted dec_x2 twice.
    # Winback writes none (one retry per decision); another producer's cascade decided once is not malformed.
    attempts = attempts_with_a_cascade_decided_once()
    a, n = _write_pair(tmp_path, fmt, attempts, make_nudges_frame())
    history = read_history(a, n)
    assert history.attempts["decision_id"].iloc[[6, 8]].tolist() == ["dec_x2", "dec_x2"]  # read as written
    assert _warnings(history) == [
        ("attempts", 9, "decision_id", f"decision 'dec_x2' is also the decision of attempt 2 of this order (row 7): "
         f"{ONE_ACTION}"),
    ]  # fmt: skip


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_retry_and_a_nudge_of_one_order_carrying_one_decision_are_read_with_a_warning_naming_both(
    tmp_path: Path, fmt: str
) -> None:
    # Read without a word, as two attempts were: the evaluation counted each as a decision. The warning is on the
    # later action (a nudge after the retry, a retry after the nudge) and names the earlier one's file and row.
    attempts, nudges = history_with_retries_and_nudges_sharing_decisions()
    a, n = _write_pair(tmp_path, fmt, attempts, nudges)
    history = read_history(a, n)
    assert history.nudges["decision_id"].tolist() == ["dec_l3", "dec_x2", "dec_x3"]  # read as written
    assert _warnings(history) == [
        ("attempts", 9, "decision_id", f"decision 'dec_x3' is also the decision of nudge 'ndg_3' of this order ({n} "
         f"row 3): {ONE_ACTION}"),
        ("nudges", 2, "decision_id", f"decision 'dec_x2' is also the decision of attempt 2 of this order ({a} row 7): "
         f"{ONE_ACTION}"),
    ]  # fmt: skip


def test_two_nudges_of_one_order_carrying_one_decision_are_read_with_a_warning_naming_both(tmp_path: Path) -> None:
    nudges = make_nudges_frame()
    nudges.loc[[1, 2], "decision_id"] = "dec_n2"  # ord_lost's whatsapp and, two days later, its sms
    a, n = _write_pair(tmp_path, "csv", make_attempts_frame(), nudges)
    assert _warnings(read_history(a, n)) == [
        ("nudges", 3, "decision_id", f"decision 'dec_n2' is also the decision of nudge 'ndg_2' of this order (row 2): "
         f"{ONE_ACTION}"),
    ]  # fmt: skip


def test_payments_through_one_link_may_carry_its_nudges_decision_without_a_warning(tmp_path: Path) -> None:
    # A customer paying twice through one link (the first declined): both payments carry the nudge's decision,
    # and neither is an action of winback's. The warning is for the actions (retries) only.
    attempts = make_attempts_frame()
    attempts.loc[4, ["decision_id", "status", "error_code"]] = ["dec_l3", "failure", "card_declined"]
    again = make_attempts_frame(
        make_attempt(order_id="ord_link", txn_id="t_l4", customer_id="cus_l", amount=1250.5, attempt_number=4,
                     created_at="2026-11-02T04:45:00Z", strategy="retarget_link", nudge_id="ndg_1",
                     decision_id="dec_l3")
    )  # fmt: skip
    a, n = _write_pair(tmp_path, "parquet", pd.concat([attempts, again], ignore_index=True), make_nudges_frame())
    assert _warnings(read_history(a, n)) == []


def test_a_clicked_nudge_marked_undelivered_is_read_as_delivered_with_a_warning(tmp_path: Path) -> None:
    nudges = make_nudges_frame()
    nudges.loc[0, "delivered"] = False  # its receipt said not delivered; the customer clicked at 04:40
    a, n = _write_pair(tmp_path, "csv", make_attempts_frame(), nudges)
    history = read_history(a, n)
    assert history.nudges["delivered"].tolist() == [True, True, False]
    assert _warnings(history) == [
        ("nudges", 1, "delivered", "delivered is false but the nudge was clicked at 2026-11-02T04:40:00+00:00: "
         "read as delivered (the click shows it arrived; its delivery receipt was lost or wrong)"),
    ]  # fmt: skip


@pytest.mark.parametrize("fmt", FORMATS)
def test_booleans_written_as_1_and_0_are_read_with_one_warning_per_column(tmp_path: Path, fmt: str) -> None:
    attempts = make_attempts_frame()
    if fmt == "csv":
        a = _attempts_csv(tmp_path, lambda raw: raw.__setitem__("phone_present", ["1"] * 7 + ["0"]))
    else:  # a database's 0/1 flag column as Parquet integers
        a = _raw_parquet(tmp_path, attempts.assign(phone_present=[1] * 7 + [0]))
    n = tmp_path / "nudges.parquet"
    write_nudges(make_nudges_frame(), n)
    history = read_history(a, n)
    assert history.attempts["phone_present"].tolist() == [True] * 7 + [False]
    assert _warnings(history) == [
        ("attempts", None, "phone_present", "booleans written as 1 and 0: read 1 as true and 0 as false"),
    ]


def test_a_flag_of_2_is_refused_with_its_row_and_value(tmp_path: Path) -> None:
    a = _raw_parquet(tmp_path, make_attempts_frame().assign(phone_present=[1] * 6 + [2, 0]))
    with pytest.raises(HistoryError) as exc:
        read_attempts(a)
    assert [p.format() for p in exc.value.report.problems] == [
        f"{a}:row 7: column phone_present: not a boolean (true or false): '2'"
    ]


def test_an_amount_changing_within_an_order_is_read_as_written_with_a_warning(tmp_path: Path) -> None:
    attempts = make_attempts_frame()
    attempts.loc[1, "amount"] = 450.0  # ord_cascade's retry for a corrected amount
    a, n = _write_pair(tmp_path, "parquet", attempts, make_nudges_frame())
    history = read_history(a, n)
    assert history.attempts["amount"].tolist()[:2] == [499.0, 450.0]
    assert _warnings(history) == [
        ("attempts", 2, "amount", "450.0 differs from 499.0 on attempt 1 of the same order (row 1): read as "
         "written; a decision point uses the amount of the failure it answers"),
    ]  # fmt: skip


def test_a_typed_timestamp_before_1970_is_refused_with_its_row_and_value(tmp_path: Path) -> None:
    # No decision request takes a time before 1970, so training's replay of the history cannot either.
    attempts = make_attempts_frame()
    attempts.loc[7, "created_at"] = pd.Timestamp("1900-01-01T00:00:00Z")
    nudges = make_nudges_frame()
    nudges.loc[2, "sent_at"] = pd.Timestamp("1969-12-31T23:59:59Z")
    a, n = _raw_parquet(tmp_path, attempts), _raw_parquet(tmp_path, nudges, "nudges.parquet")
    with pytest.raises(HistoryError) as exc:
        read_history(a, n)
    assert _problems(exc).splitlines()[1:] == [
        f"{a}:row 8: column created_at: {EARLY}: 1900-01-01T00:00:00+00:00",
        f"{n}:row 3: column sent_at: {EARLY}: 1969-12-31T23:59:59+00:00",
    ]
