"""`python -m pipelines.gate_check`: the gate's policy-value check against the simulator's truth, run end to end on
two models trained into a real MLflow store."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pipelines.gate_check import gate_check
from pipelines.ope_check import VersionPairCheck
from pipelines.simulate import simulate
from pipelines.train import run_training

TRAIN_OPTIONS = {"max_rounds": 20, "evaluate_unseen_codes": False}
EVALUATION_OPTIONS = {"simulated": False, "max_points": 200, "n_bootstrap": 10}


def test_each_version_is_judged_as_challenger_and_as_champion_beside_its_truth(
    tmp_path: Path, mlflow_store: str
) -> None:
    orders, seed = 1_500, 4
    judged = tmp_path / "judged"
    simulate(judged, orders, seed, progress=False)
    simulate(tmp_path / "other", 600, seed + 1, progress=False)
    for history in (judged, tmp_path / "other"):
        run_training(
            history / "attempts.parquet",
            history / "nudges.parquet",
            tracking_uri=mlflow_store,
            train_options=TRAIN_OPTIONS,
            evaluation_options=EVALUATION_OPTIONS,
            show_progress=False,
            refit=False,
        )

    table = gate_check(VersionPairCheck(judged, orders, seed, mlflow_store, ("1", "2"), max_points=150, draws=2))

    assert list(zip(table["challenger"], table["champion"], strict=True)) == [("1", "2"), ("2", "1")]
    first, second = table.to_dict("records")
    # Each pairing reads the same replay the other way round: one model's values are the same in both rows.
    assert first["challenger_dr"] == second["champion_dr@champion"]
    assert first["champion_dr"] == second["challenger_dr@champion"]
    assert first["challenger_truth"] == second["champion_truth"]
    # The gate values both models under the holdout's reward model: the same value whichever role it plays.
    assert first["challenger_gate_value"] == pytest.approx(second["champion_gate_value"])
    assert first["champion_gate_value"] == pytest.approx(second["challenger_gate_value"])
    for row in (first, second):
        assert all(
            math.isfinite(row[column])
            for column in table.columns
            if column.endswith(("_truth", "_dr", "_dr@champion", "_gate_value"))
        )
        assert row["gate_noise"] > 0
        # The training run's noise: the reward model's fit on resamples of the orders is in it, as a share.
        assert 0 < row["gate_fit_noise"] < row["gate_noise"]
        assert isinstance(row["promoted_by_other_views"], bool)
        assert row["verdict"].startswith("promoted version" if row["promoted"] else "kept champion version")
