"""A code that appeared only recently is in the history and not learned by the version trained on it (its retries
all fall in the time holdout): `winback train` names it instead of leaving the operator to believe it is learned."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from model.history import write_attempts, write_nudges
from pipelines.train import run_training
from tests.factories import NEW_CODES, make_new_code_history

pytestmark = pytest.mark.slow

NEW = [new for new, _kind in NEW_CODES.values()]


def test_train_names_the_codes_whose_retries_all_fall_in_the_holdout(tmp_path: Path, mlflow_store: str) -> None:
    attempts, nudges = make_new_code_history(900, seed=5)
    with_new = sorted(set(attempts.loc[attempts["error_code"].isin(NEW), "order_id"]))
    late = set(with_new[:80])  # ~10% of the orders: all inside the newest 20% of decision points once moved there
    gone = set(with_new) - late
    attempts = attempts[~attempts["order_id"].isin(gone)].reset_index(drop=True)
    nudges = nudges[~nudges["order_id"].isin(gone)].reset_index(drop=True)
    # The new codes appear only after everything else: a code the connectors started sending last week.
    shift = attempts["created_at"].max() - attempts["created_at"].min() + pd.Timedelta(days=1)
    attempts.loc[attempts["order_id"].isin(late), "created_at"] += shift
    for column in ("sent_at", "clicked_at"):
        nudges.loc[nudges["order_id"].isin(late), column] += shift
    write_attempts(attempts, tmp_path / "attempts.parquet")
    write_nudges(nudges, tmp_path / "nudges.parquet")
    console = Console(width=400, record=True)
    summary = run_training(
        tmp_path / "attempts.parquet",
        tmp_path / "nudges.parquet",
        tracking_uri=mlflow_store,
        train_options={"max_rounds": 30, "evaluate_unseen_codes": False},
        evaluation_options={"simulated": False, "max_points": 200, "n_bootstrap": 10},
        console=console,
        show_progress=False,
    )
    named = set(summary.codes_not_learned)
    # The factory's most frequent pairs of new codes; every code the early history retried after is learned.
    assert {"adyen/ADY_NEW_H1", "cybersource/CYB_NEW_H2"} <= named, named
    early = attempts[~attempts["order_id"].isin(late)]
    assert not named & {f"{c}/{k}" for c, k in zip(early["connector"], early["error_code"], strict=True)}
    assert summary.metrics["codes_not_learned"] == len(named)
    assert "not learned yet:" in console.export_text()
