"""`split_history`: the same validation as `read_history`, one partition of whole orders at a time."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa_lib
import pyarrow.parquet as pq
import pytest

from model.history import HistoryError, Problem, read_history, split_history, write_attempts, write_nudges
from model.simulation import generate_history
from tests.factories import (
    attempts_with_a_cascade_decided_once,
    history_with_retries_and_nudges_sharing_decisions,
    make_attempt,
    make_attempts_frame,
    make_nudge,
    make_nudges_frame,
)

# Small hand-made files: 1 row per partition (every order alone), a few partitions, and one partition.
PARTITION_ROWS = (1, 3, 10**9)
# The simulated history (~600 attempts): 4 partitions, and one.
SIMULATED_ROWS = (150, 10**9)


@pytest.fixture(scope="module")
def simulated() -> tuple[pd.DataFrame, pd.DataFrame]:
    history = generate_history(300, seed=5)
    return history.attempts, history.nudges


def _write(folder: Path, fmt: str, attempts: pd.DataFrame, nudges: pd.DataFrame, raw: bool) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    a, n = folder / f"attempts.{fmt}", folder / f"nudges.{fmt}"
    if raw:  # as is, bypassing the writer's validation, to make bad files
        attempts.to_parquet(a, index=False) if fmt == "parquet" else attempts.to_csv(a, index=False)
        nudges.to_parquet(n, index=False) if fmt == "parquet" else nudges.to_csv(n, index=False)
    else:
        write_attempts(attempts, a)
        write_nudges(nudges, n)
    return a, n


def _report(read: Callable[[], object]) -> tuple[list[Problem], int]:
    with pytest.raises(HistoryError) as exc:
        read()
    return exc.value.report.problems, exc.value.report.total


def _same_report_as_read_history(
    tmp_path: Path,
    attempts: pd.DataFrame,
    nudges: pd.DataFrame,
    *,
    fmt: str = "parquet",
    raw: bool = False,
    partition_rows: tuple[int, ...] = PARTITION_ROWS,
) -> list[Problem]:
    a, n = _write(tmp_path / "files", fmt, attempts, nudges, raw)
    expected = _report(lambda: read_history(a, n))
    for rows in partition_rows:
        for workers in (1, 2):  # two processes check partitions side by side: the same report
            folder = tmp_path / f"parts-{rows}-{workers}"
            got = _report(lambda: split_history(a, n, folder, partition_rows=rows, workers=workers))  # noqa: B023
            assert got == expected, f"partition_rows={rows}, workers={workers}"
    return expected[0]


def test_a_valid_history_splits_into_whole_orders_with_every_row(
    tmp_path: Path, simulated: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    attempts, nudges = simulated
    a, n = _write(tmp_path, "parquet", attempts, nudges, raw=False)
    whole = read_history(a, n)
    parts = split_history(a, n, tmp_path / "parts", partition_rows=100, workers=2)
    assert parts.partitions == -(-len(attempts) // 100)
    assert (parts.attempt_rows, parts.nudge_rows) == (len(attempts), len(nudges))
    assert set(parts.merchant_ids) == set(attempts["merchant_id"])
    seen: set[str] = set()
    pieces = list(parts)
    for piece in pieces:
        orders = set(piece.attempts["order_id"])
        assert not orders & seen  # an order lives in one partition only
        assert set(piece.nudges["order_id"]) <= orders
        seen |= orders
    key = ["order_id", "attempt_number"]
    joined = pd.concat([p.attempts for p in pieces]).sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(joined, whole.attempts.sort_values(key).reset_index(drop=True))
    joined_nudges = pd.concat([p.nudges for p in pieces]).sort_values("nudge_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(joined_nudges, whole.nudges.sort_values("nudge_id").reset_index(drop=True))
    sample = sorted(seen)[:7]
    subset = parts.orders(sample)
    assert set(subset.attempts["order_id"]) == set(sample)
    assert len(subset.attempts) == int(whole.attempts["order_id"].isin(sample).sum())
    assert len(subset.nudges) == int(whole.nudges["order_id"].isin(sample).sum())


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_bad_values_get_the_same_rows_and_reasons(
    tmp_path: Path, simulated: tuple[pd.DataFrame, pd.DataFrame], fmt: str
) -> None:
    attempts, nudges = (frame.copy() for frame in simulated)
    attempts["amount"] = attempts["amount"].astype(str)  # numbers as text: Parquet cannot mix types
    attempts.loc[[3, 250, 400], "amount"] = "abc"
    nudges["channel"] = nudges["channel"].astype(object)
    nudges.loc[[7, 300], "channel"] = "fax"
    problems = _same_report_as_read_history(
        tmp_path, attempts, nudges, fmt=fmt, raw=True, partition_rows=SIMULATED_ROWS
    )
    assert {(Path(p.file).stem, p.row, p.column) for p in problems} >= {
        ("attempts", 4, "amount"), ("attempts", 251, "amount"), ("nudges", 8, "channel"), ("nudges", 301, "channel"),
    }  # fmt: skip


def test_ids_duplicated_across_partitions_are_found(
    tmp_path: Path, simulated: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    attempts, nudges = (frame.copy() for frame in simulated)
    attempts.loc[len(attempts) - 1, "txn_id"] = attempts.loc[0, "txn_id"]
    nudges.loc[len(nudges) - 1, "nudge_id"] = nudges.loc[0, "nudge_id"]
    problems = _same_report_as_read_history(tmp_path, attempts, nudges, raw=True, partition_rows=SIMULATED_ROWS)
    assert {(Path(p.file).stem, p.column) for p in problems} == {("attempts", "txn_id"), ("nudges", "nudge_id")}
    assert all("duplicate" in p.reason for p in problems)


def test_a_missing_column_is_reported_once(tmp_path: Path, simulated: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    attempts, nudges = simulated
    problems = _same_report_as_read_history(
        tmp_path, attempts.drop(columns=["currency"]), nudges, raw=True, partition_rows=SIMULATED_ROWS
    )
    assert [(p.row, p.column, p.reason) for p in problems if p.row is None] == [(None, "currency", "missing column")]


def test_the_cap_keeps_the_first_rows_and_counts_all(
    tmp_path: Path, simulated: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    attempts, nudges = (frame.copy() for frame in simulated)
    attempts["currency"] = attempts["currency"].astype(object)
    attempts.loc[np.arange(0, len(attempts), 4), "currency"] = ""
    _same_report_as_read_history(tmp_path, attempts, nudges, raw=True, partition_rows=SIMULATED_ROWS)


def test_rules_across_rows_name_file_rows(tmp_path: Path) -> None:
    attempts = make_attempts_frame()
    attempts.loc[1, "created_at"] = pd.Timestamp("2026-11-01T09:00:00Z")
    attempts.loc[5, "strategy"] = "cascade"
    attempts.loc[6, "strategy"] = "initial"
    _same_report_as_read_history(tmp_path / "order", attempts, make_nudges_frame(), raw=True)

    attempts = make_attempts_frame(
        make_attempt(),
        make_attempt(txn_id="t2", attempt_number=2, strategy="cascade", created_at="2026-11-01T10:01:00Z",
                     status="success", currency="USD", customer_id="cus_2", merchant_id="m_other"),
        make_attempt(txn_id="t3", attempt_number=3, strategy="cascade", created_at="2026-11-01T10:02:00Z"),
    )  # fmt: skip
    nudges = make_nudges_frame(make_nudge(sent_at="2026-11-01T10:00:30Z"))
    problems = _same_report_as_read_history(tmp_path / "constants", attempts, nudges, raw=True)
    assert "(row 1)" in problems[0].reason

    attempts = make_attempts_frame()
    attempts.loc[4, "attempt_number"] = 4
    _same_report_as_read_history(tmp_path / "gap", attempts, make_nudges_frame(), raw=True)


def test_links_across_partitions_name_the_other_order(tmp_path: Path) -> None:
    attempts = make_attempts_frame()
    attempts.loc[4, "nudge_id"] = "ndg_2"  # a nudge of another order, so (with 1 row each) another partition
    problems = _same_report_as_read_history(tmp_path / "other", attempts, make_nudges_frame())
    assert [p.reason for p in problems] == ["nudge 'ndg_2' belongs to order 'ord_lost', not to 'ord_link'"]

    attempts = make_attempts_frame()
    attempts.loc[4, "nudge_id"] = "ndg_9"
    nudges = make_nudges_frame()
    nudges.loc[1, "order_id"] = "ord_gone"
    _same_report_as_read_history(tmp_path / "gone", attempts, nudges)

    attempts = make_attempts_frame()
    attempts.loc[4, "created_at"] = pd.Timestamp("2026-11-02T04:00:00Z")
    nudges = make_nudges_frame()
    nudges.loc[0, "clicked_at"] = pd.NaT
    _same_report_as_read_history(tmp_path / "early", attempts, nudges, raw=True)


def test_unreadable_and_unsupported_files_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "attempts.parquet"
    bad.write_text("not parquet")
    with pytest.raises(HistoryError, match="cannot read the file"):
        split_history(bad, bad, tmp_path / "parts")
    with pytest.raises(HistoryError, match="unsupported file extension"):
        split_history(tmp_path / "attempts.json", bad, tmp_path / "parts")


def _flavoured(frame: pd.DataFrame, flavour: str) -> pa_lib.Table:
    """``frame`` as an Arrow table whose string columns are of another Arrow string type (as other writers use)."""
    table = pa_lib.Table.from_pandas(frame, preserve_index=False)
    columns = []
    for column in table.columns:
        if pa_lib.types.is_string(column.type):
            if flavour == "dictionary":
                column = column.dictionary_encode()
            else:
                column = column.cast(pa_lib.large_string() if flavour == "large_string" else pa_lib.string_view())
        columns.append(column)
    return pa_lib.Table.from_arrays(columns, names=table.column_names)


@pytest.mark.parametrize("flavour", ["large_string", "string_view", "dictionary"])
def test_string_columns_of_any_arrow_flavour_are_strings(tmp_path: Path, flavour: str) -> None:
    # Polars writes large_string, pandas categoricals are dictionary-encoded: the contract's strings all the same.
    # split_history (what `winback train` runs) used to skip the txn_id/nudge_id uniqueness of such files, so a
    # duplicate txn_id was trained on, and a duplicate nudge_id or a string_view column crashed it.
    attempts, nudges = make_attempts_frame(), make_nudges_frame()
    a, n = tmp_path / "attempts.parquet", tmp_path / "nudges.parquet"
    pq.write_table(_flavoured(attempts, flavour), a)
    pq.write_table(_flavoured(nudges, flavour), n)
    whole = read_history(a, n)
    plain = tmp_path / "plain"
    plain.mkdir()
    write_attempts(attempts, plain / "attempts.parquet")
    write_nudges(nudges, plain / "nudges.parquet")
    expected = read_history(plain / "attempts.parquet", plain / "nudges.parquet")
    pd.testing.assert_frame_equal(whole.attempts, expected.attempts)
    pd.testing.assert_frame_equal(whole.nudges, expected.nudges)
    parts = split_history(a, n, tmp_path / "parts", partition_rows=3)
    assert parts.attempt_rows == len(attempts)

    attempts.loc[7, "txn_id"] = attempts.loc[0, "txn_id"]  # another order's txn_id
    nudges.loc[2, "nudge_id"] = nudges.loc[1, "nudge_id"]
    pq.write_table(_flavoured(attempts, flavour), a)
    pq.write_table(_flavoured(nudges, flavour), n)
    expected_report = _report(lambda: read_history(a, n))
    for rows in PARTITION_ROWS:
        got = _report(lambda: split_history(a, n, tmp_path / f"dup-{rows}", partition_rows=rows))  # noqa: B023
        assert got == expected_report
    assert [(Path(p.file).stem, p.row, p.column) for p in expected_report[0]] == [
        ("attempts", 1, "txn_id"), ("attempts", 8, "txn_id"), ("nudges", 2, "nudge_id"), ("nudges", 3, "nudge_id"),
    ]  # fmt: skip


def test_a_csv_of_several_blocks_with_multi_line_messages_is_read(tmp_path: Path) -> None:
    # A connector's error message may span lines; pandas reads such a CSV, and split_history refused it once the
    # file was larger than one block of Arrow's parallel reader ("CSV parser got out of sync with chunker").
    attempts = make_attempts_frame()
    failed = attempts["status"] == "failure"
    attempts.loc[failed, "error_message"] = [
        f"Declined by issuer.\nDetail {i}: " + "x" * 400_000 for i in range(sum(failed))
    ]
    a, n = _write(tmp_path, "csv", attempts, make_nudges_frame(), raw=False)
    assert a.stat().st_size > 2_000_000
    parts = split_history(a, n, tmp_path / "parts", partition_rows=3)
    got = pd.concat([part.attempts for part in parts]).set_index("txn_id")["error_message"]
    assert got.loc[attempts["txn_id"]].tolist() == attempts["error_message"].tolist()


def test_a_decision_on_two_orders_is_refused_across_partitions(tmp_path: Path) -> None:
    attempts = make_attempts_frame()
    attempts.loc[6, "decision_id"] = "dec_c2"  # ord_lost's attempt 2 carries ord_cascade's decision
    problems = _same_report_as_read_history(tmp_path, attempts, make_nudges_frame())
    assert [(p.row, p.column) for p in problems] == [(7, "decision_id")]


@pytest.mark.parametrize("rows", PARTITION_ROWS)
def test_the_warnings_are_the_same_as_read_historys(tmp_path: Path, rows: int) -> None:
    attempts = make_attempts_frame().assign(phone_present=[1] * 7 + [0])
    attempts.loc[6, "amount"] = 450.0
    nudges = make_nudges_frame()
    nudges.loc[0, "delivered"] = False
    a, n = _write(tmp_path / "files", "parquet", attempts, nudges, raw=True)
    expected = read_history(a, n)
    assert len(expected.warnings.problems) == 3
    for workers in (1, 2):
        parts = split_history(a, n, tmp_path / f"parts-{workers}", partition_rows=rows, workers=workers)
        assert parts.warnings == expected.warnings, f"workers={workers}"
        assert pd.concat([part.nudges for part in parts])["delivered"].sum() == expected.nudges["delivered"].sum()


@pytest.mark.parametrize("rows", PARTITION_ROWS)
def test_two_attempts_of_one_decision_are_warned_of_with_file_rows_as_read_history_does(
    tmp_path: Path, rows: int
) -> None:
    # ord_lost's attempts 2 (row 7) and 3 (row 9) both carry dec_x2; with one order a partition the rows must still
    # be the file's.
    a, n = _write(tmp_path / "files", "parquet", attempts_with_a_cascade_decided_once(), make_nudges_frame(), raw=False)
    expected = read_history(a, n)
    assert [(p.row, p.column) for p in expected.warnings.problems] == [(9, "decision_id")]
    assert "(row 7)" in expected.warnings.problems[0].reason
    for workers in (1, 2):
        parts = split_history(a, n, tmp_path / f"parts-{workers}", partition_rows=rows, workers=workers)
        assert parts.warnings == expected.warnings, f"workers={workers}"


@pytest.mark.parametrize("rows", PARTITION_ROWS)
def test_a_retry_and_a_nudge_of_one_decision_are_warned_of_with_file_rows_as_read_history_does(
    tmp_path: Path, rows: int
) -> None:
    # ord_lost's dec_x2 is on attempts row 7 and nudges row 2, dec_x3 on nudges row 3 and attempts row 9: each
    # warning names the other file's row, as read_history's does, however the orders are partitioned.
    a, n = _write(tmp_path / "files", "parquet", *history_with_retries_and_nudges_sharing_decisions(), raw=False)
    expected = read_history(a, n)
    assert [(p.file, p.row) for p in expected.warnings.problems] == [(str(a), 9), (str(n), 2)]
    first, second = expected.warnings.problems
    assert f"({n} row 3)" in first.reason
    assert f"({a} row 7)" in second.reason
    for workers in (1, 2):
        parts = split_history(a, n, tmp_path / f"parts-{workers}", partition_rows=rows, workers=workers)
        assert parts.warnings == expected.warnings, f"workers={workers}"
