"""The training benchmark's histories: one simulation, the smaller sizes its first whole orders."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from model.history import read_history
from pipelines.bench import training_histories


def test_smaller_histories_are_the_first_whole_orders_of_the_largest(tmp_path: Path) -> None:
    histories = training_histories(tmp_path, [300, 1_000])
    (small, small_attempts, small_orders), (large, large_attempts, large_orders) = histories[300], histories[1_000]
    assert 300 <= small_attempts < 300 + 20
    assert large_attempts >= 1_000
    assert small_orders < large_orders
    part = read_history(small / "attempts.parquet", small / "nudges.parquet")  # still a valid history
    whole = read_history(large / "attempts.parquet", large / "nudges.parquet")
    assert (len(part.attempts), part.attempts["order_id"].nunique()) == (small_attempts, small_orders)
    first = whole.attempts["order_id"].drop_duplicates().head(small_orders)
    for name in ("attempts", "nudges"):
        mine = getattr(part, name).reset_index(drop=True)
        theirs = getattr(whole, name)
        pd.testing.assert_frame_equal(mine, theirs[theirs["order_id"].isin(first)].reset_index(drop=True))
    again = training_histories(tmp_path, [300, 1_000])  # reused, not simulated again
    assert again == histories
