"""The swap benchmark's own parts: which requests count as near a move, their summary, the store it copies."""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from service.api.bench import Sample
from service.api.logging import JsonFormatter
from service.api.model_holder import ModelHolder
from service.api.swap_bench import (
    SwapLatency,
    _summary,
    copied_store,
    describe,
    during_loads,
    load_windows,
    overlapping,
    split_by_moves,
    swap_ratios,
)


def test_requests_are_near_a_move_away_from_all_or_neither() -> None:
    moves = [10.0, 20.0]
    samples = [
        Sample(9.5, 0.001, ok=True),  # just before a move: neither
        Sample(10.2, 0.002, ok=True),  # near
        Sample(14.9, 30.0, ok=False),  # near, and failed
        Sample(15.5, 0.003, ok=True),  # just past the near window: neither
        Sample(17.0, 0.004, ok=True),  # away
        Sample(21.0, 0.005, ok=True),  # near the second move
        Sample(30.0, 0.006, ok=True),  # away
    ]
    near, away = split_by_moves(samples, moves)
    assert near == [0.002, None, 0.005]
    assert away == [0.004, 0.006]


def test_the_summary_counts_failures_and_reads_the_answered() -> None:
    assert _summary([0.001, None, 0.003, 0.002]) == (4, 1, 3.0, 3.0)
    requests, failed, p99, slowest = _summary([None, None])
    assert (requests, failed) == (2, 2)
    assert math.isnan(p99)
    assert math.isnan(slowest)


def test_only_a_sqlite_file_store_is_copied(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match="needs a file-based SQLite tracking store to copy, not 'http://registry:5000'"
    ):
        copied_store("http://registry:5000", tmp_path)
    with pytest.raises(ValueError, match="file-based SQLite"):
        copied_store(f"sqlite:///{tmp_path / 'missing.db'}", tmp_path)
    original = tmp_path / "store" / "mlflow.db"
    original.parent.mkdir()
    original.write_bytes(b"a store")
    copy = tmp_path / "copy"
    copy.mkdir()
    assert copied_store(f"sqlite:///{original}", copy) == f"sqlite:///{copy / 'mlflow.db'}"
    assert (copy / "mlflow.db").read_bytes() == b"a store"


class _SlowSource:
    """A registry stand-in whose every load takes ``load_seconds``."""

    def __init__(self, load_seconds: float) -> None:
        self.version = "1"
        self.load_seconds = load_seconds

    def champion_version(self) -> str:
        return self.version

    def load(self, version: str) -> Any:
        time.sleep(self.load_seconds)
        return object()


def test_load_windows_are_read_from_the_holders_own_log_lines() -> None:
    """A real holder's swaps, logged by the servers' JSON formatter: each window ends when its line was written and
    lasts the load; a first load (from rules-only) and other lines are skipped."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("winback.api")
    logger.addHandler(handler)
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        started_at = time.time()
        source = _SlowSource(load_seconds=0.3)
        holder = ModelHolder(source)
        assert holder.refresh()  # rules-only -> 1: a first load, no swap
        for version in ("2", "3"):
            source.version = version
            assert holder.refresh()
        finished = time.time() - started_at
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
    log_text = "not json, serving model version 3\n" + stream.getvalue() + '{"message": "serving model version 4"}\n'
    assert log_text.count("serving model version") == 5
    windows = load_windows(log_text, started_at)
    assert len(windows) == 2
    (first_began, first_ended), (second_began, second_ended) = windows
    slack = 0.002  # the lines' times are whole milliseconds
    assert 0.3 - slack <= first_began < first_ended <= second_began + slack  # after the first load's 0.3 s
    assert second_began < second_ended <= finished + slack
    assert first_ended - first_began >= 0.3
    assert second_ended - second_began >= 0.3


def test_loads_at_the_same_moment_as_another_are_counted() -> None:
    """The two workers' loads of one move, side by side (both counted), then one after the other (neither)."""
    assert overlapping([(10.20, 10.37), (10.19, 10.38), (18.30, 18.40), (18.42, 18.49)]) == 2
    assert overlapping([(1.0, 2.0)]) == 0
    assert overlapping([]) == 0


def test_requests_in_flight_at_any_moment_of_a_load_count_as_during_it() -> None:
    windows = [(10.0, 10.2), (20.0, 20.1)]
    samples = [
        Sample(9.9, 0.05, ok=True),  # answered before the load began
        Sample(9.95, 0.06, ok=True),  # answered after it began: during
        Sample(10.1, 0.001, ok=True),  # sent and answered within it
        Sample(10.19, 0.02, ok=True),  # sent before it ended
        Sample(10.21, 0.001, ok=True),  # sent after it ended
        Sample(19.9, 0.15, ok=False),  # failed during the second, sent before it began
        Sample(19.8, 0.05, ok=False),  # failed before it began
        Sample(25.0, 0.01, ok=False),  # failed, away from both
    ]
    assert during_loads(samples, windows) == [0.06, 0.001, 0.02, None]


def test_a_run_without_a_swap_or_an_answer_says_so_without_nan() -> None:
    figures = {"moves": 4, "swaps_logged": 2, "near_requests": 6000, "near_errors": 6000, "near_p99_ms": math.nan,
               "near_max_ms": math.nan, "away_requests": 3600, "away_errors": 0, "away_p99_ms": 4.0,
               "away_max_ms": 12.0, "rate": 300.0, "poll_seconds": 2.0, "away_p90_ms": 2.0}  # fmt: skip
    no_swap = SwapLatency(**figures)  # type: ignore[arg-type]
    assert "no swap logged by the workers during the run" in describe(no_swap)
    assert swap_ratios(no_swap) == "-"
    swapped = SwapLatency(**figures, during_requests=190, during_p90_ms=5.0, during_max_ms=9.0, loads_in_run=8,  # type: ignore[arg-type]
                          load_ms_range=(60.0, 120.0))  # fmt: skip
    assert (
        "8 swaps in the run (60-120 ms of loading each, 0 at the same moment as another) 190 requests, 0 failed, "
        "p90 5.0 ms" in describe(swapped)
    )
    assert swap_ratios(swapped) == "2.5x p90 during a load"  # nothing near a move answered: no slowest to compare
    assert "within 5 s after a move 6000 requests, 6000 failed, p99 none answered, slowest none answered" in (
        describe(swapped)
    )
    none_in_flight = SwapLatency(**figures, during_requests=3, during_errors=3, loads_in_run=8,  # type: ignore[arg-type]
                                 load_ms_range=(60.0, 120.0))  # fmt: skip
    assert "3 requests, 3 failed, p90 none answered, slowest none answered" in describe(none_in_flight)
    assert "nan" not in describe(swapped) + describe(none_in_flight) + describe(no_swap)


def test_the_swap_probe_splits_its_requests_by_phase_and_reads_their_quantiles() -> None:
    from service.api.swap_probe import Phase, ProbeResult, _Sample, describe_probe, phase_figures, probe_ratio

    # Away: waits of 0.1 ms, decisions of 1.0 ms; during: waits of 0.5-1.4 ms, decisions of 2.0 ms; beside a move:
    # 9 ms waits, in neither figure.
    away = [_Sample(Phase.AWAY, 0.0001, 0.001) for _ in range(10)]
    during = [_Sample(Phase.LOAD, 0.0005 + index * 0.0001, 0.002) for index in range(10)]
    moving = [_Sample(Phase.MOVE, 0.009, 0.001) for _ in range(3)]
    samples = [sample for pair in zip(away, during, strict=True) for sample in pair] + moving
    loaded, quiet = phase_figures(samples, Phase.LOAD), phase_figures(samples, Phase.AWAY)
    assert (loaded.requests, quiet.requests) == (10, 10)
    assert (loaded.wait_p50_ms, loaded.wait_p90_ms) == (1.0, 1.4)
    assert (quiet.wait_p50_ms, quiet.wait_p90_ms, quiet.decide_p90_ms, quiet.total_p90_ms) == (0.1, 0.1, 1.0, 1.1)
    assert loaded.total_p90_ms == 3.4
    result = ProbeResult(swaps=2, load_ms=(80.0, 95.5), during=loaded, away=quiet, moving=3, switch_interval_ms=0.02)
    assert probe_ratio(result) == pytest.approx(3.4 / 1.1)
    text = describe_probe(result)
    assert "2 swaps in one process (80-95.5 ms each, switch interval 0.02 ms while loading)" in text
    assert "3 beside the alias moves, in neither" in text
    assert "p90 ratio 3.09x" in text
    # Requests woken over 1 ms late, counted per phase and said per swap: a count the loads' length does not move.
    late = phase_figures([_Sample(Phase.LOAD, wait, 0.001) for wait in (0.0009, 0.0011, 0.0031)], Phase.LOAD)
    assert late.late == 2
    assert (loaded.late, quiet.late) == (sum(1 for sample in during if sample.wait > 0.001), 0)
    assert "1 ms late per swap" in describe_probe(replace(result, during=late))
    assert describe_probe(replace(result, during=late)).endswith("; 1.0 requests woke over 1 ms late per swap")
    # No request during a load (a load faster than any gap): said as such, not a NaN.
    nothing = phase_figures(away, Phase.LOAD)
    assert nothing.requests == 0
    assert math.isnan(nothing.total_p90_ms)
    empty = ProbeResult(1, (1.0,), nothing, quiet, 0, 0.02)
    assert math.isnan(probe_ratio(empty))
    assert "during the loads no request" in describe_probe(empty)
    assert "nan" not in describe_probe(empty).lower()
