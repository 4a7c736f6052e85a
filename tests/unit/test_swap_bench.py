"""The swap benchmark's own parts: which requests count as near a move, their summary, the store it copies."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from service.api.swap_bench import _summary, copied_store, split_by_moves


def test_requests_are_near_a_move_away_from_all_or_neither() -> None:
    moves = [10.0, 20.0]
    samples: list[tuple[float, float | None]] = [
        (9.5, 0.001),  # just before a move: neither
        (10.2, 0.002),  # near
        (14.9, None),  # near, and failed
        (15.5, 0.003),  # just past the near window: neither
        (17.0, 0.004),  # away
        (21.0, 0.005),  # near the second move
        (30.0, 0.006),  # away
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
