"""How counts read in what winback prints."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from model.wording import count_noun, first_line, span_words, utc_second


@pytest.mark.parametrize(
    ("count", "noun", "plural", "expected"),
    [
        (1, "stop", None, "1 stop"),
        (0, "stop", None, "0 stops"),
        (2, "failed order", None, "2 failed orders"),
        (13005, "nudge", None, "13,005 nudges"),
        (1, "retry", "retries", "1 retry"),
        (3, "retry", "retries", "3 retries"),
    ],
)
def test_count_noun_is_singular_for_exactly_one(count: int, noun: str, plural: str | None, expected: str) -> None:
    assert count_noun(count, noun, plural) == expected


def test_labelled_lines_keep_a_long_value_whole_on_a_line_of_its_own() -> None:
    from model.wording import labelled_lines

    assert labelled_lines("API docs", "http://127.0.0.1:8000/docs") == ["  API docs        http://127.0.0.1:8000/docs"]
    assert labelled_lines("webhooks", "http://127.0.0.1:34561/_webhooks", "what the merchants received", width=60) == [
        "  webhooks        http://127.0.0.1:34561/_webhooks",
        "                  (what the merchants received)",
    ]
    path = "/home/newcomer/winback/demo/mlruns/artifacts/ea64075e353c49a38a6f8dff64df23ca/evaluation.md"
    assert labelled_lines("evaluation", path) == ["  evaluation", f"    {path}"]
    assert labelled_lines("", path, "of the champion") == ["    (of the champion)", f"    {path}"]
    assert labelled_lines("", path) == [f"    {path}"]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            RuntimeError("(psycopg.OperationalError) connection refused\n[SQL: SELECT 1]"),
            "(psycopg.OperationalError) connection refused",
        ),
        (ValueError("\n   \n  port is not a number  \nmore"), "port is not a number"),
        (ImportError(""), "ImportError"),
    ],
)
def test_an_errors_first_line_is_its_first_non_blank_line_or_its_type(error: BaseException, expected: str) -> None:
    assert first_line(error) == expected


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 11, 2, 6, 0, 5, 123456, tzinfo=UTC),
        datetime(2026, 11, 2, 6, 0, 5, 999999),  # naive, as SQLite hands it back: UTC, cut (not rounded) to the second
        datetime(2026, 11, 2, 11, 30, 5, 1, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    ],
)
def test_a_moment_is_written_in_utc_to_the_second_with_a_z(moment: datetime) -> None:
    assert utc_second(moment) == "2026-11-02T06:00:05Z"


def test_a_length_of_time_reads_in_words_not_as_pythons_timedelta() -> None:
    # The refund's note said "waited 1 day, 0:00:00" and "asked hourly until 1 day, 0:00:00".
    assert span_words(timedelta(days=1)) == "1 day"
    assert span_words(timedelta(hours=2, minutes=30)) == "2 hours 30 minutes"
    assert span_words(timedelta(days=2, seconds=45.4)) == "2 days 45 seconds"
    assert span_words(timedelta(0)) == "0 seconds"
    assert span_words(-timedelta(minutes=1)) == "1 minute"
