"""`winback train --engine dask`: the boosters fitted by lightgbm.dask on a two-worker LocalCluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from sklearn.metrics import roc_auc_score

from model import registry
from model.bundle import ModelBundle
from model.history import write_attempts, write_nudges
from model.training import TrainingResult, decision_points, request_at, train
from pipelines.train import TrainInputError, run_training
from tests.factories import make_history_frames

distributed = pytest.importorskip("distributed")

TRAIN_OPTIONS: dict[str, Any] = {"max_rounds": 200, "evaluate_unseen_codes": False}
# Two workers in two processes: LightGBM's network is per process, so processes=False cannot run two machines.
CLUSTER_OPTIONS: dict[str, Any] = {
    "n_workers": 2, "threads_per_worker": 1, "processes": True, "dashboard_address": ":0", "memory_limit": "1GiB",
}  # fmt: skip
# One cluster at a time: xdist keeps this module's tests on one worker (two clusters would race for ports).
pytestmark = pytest.mark.xdist_group("dask")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    with distributed.LocalCluster(**CLUSTER_OPTIONS) as local:
        yield local


@pytest.fixture(scope="module")
def history() -> tuple[pd.DataFrame, pd.DataFrame]:
    attempts, nudges = make_history_frames(800, seed=2)
    attempts["created_at"] = attempts["created_at"].dt.floor("us")
    for column in ("sent_at", "clicked_at"):
        nudges[column] = nudges[column].dt.floor("us")
    return attempts, nudges


def _machines(bundle: ModelBundle) -> str:
    # LightGBM writes its parameters into the model text: a distributed fit says how many machines took part.
    text = bundle.retry_booster.model_to_string()
    return next(line for line in text.splitlines() if line.startswith("[num_machines: "))


def _holdout_auc(result: TrainingResult, attempts: pd.DataFrame, nudges: pd.DataFrame) -> tuple[float, np.ndarray]:
    """Retry AUC of the bundle scoring decision requests rebuilt from the latest fifth of retry decision points."""
    points = decision_points(attempts, nudges)
    retries = points.loc[points["kind"] == "retry"].sort_values("decision_time", kind="mergesort")
    latest = retries.iloc[-len(retries) // 5 :]
    scores = []
    for _, point in latest.iterrows():
        request, candidate = request_at(attempts, nudges, {str(k): v for k, v in point.items()})
        scores.append(float(result.bundle.score(request, [candidate])[0]))
    p = np.asarray(scores)
    return float(roc_auc_score(latest["label"].to_numpy(dtype=bool), p)), p


def test_dask_bundle_scores_like_a_local_bundle(cluster: Any, history: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    from pipelines.dask_train import DaskBoosterFitter

    attempts, nudges = history
    local = train(attempts, nudges, seed=0, **TRAIN_OPTIONS)
    with distributed.Client(cluster, set_as_default=False) as client:
        dask = train(attempts, nudges, seed=0, fit_booster=DaskBoosterFitter(client), **TRAIN_OPTIONS)

    assert _machines(dask.bundle) == "[num_machines: 2]"
    assert _machines(local.bundle) == "[num_machines: 1]"
    assert dask.bundle.retarget_booster is not None
    # Early stopping was applied to the distributed fit: fewer trees than the rounds allowed.
    assert 0 < dask.bundle.retry_booster.num_trees() < TRAIN_OPTIONS["max_rounds"]
    auc_local, p_local = _holdout_auc(local, attempts, nudges)
    auc_dask, p_dask = _holdout_auc(dask, attempts, nudges)
    assert auc_dask > 0.8, auc_dask
    assert abs(auc_dask - auc_local) < 0.05, (auc_dask, auc_local)
    assert not np.allclose(p_dask, p_local)  # really another fit, not the local one
    assert np.all((p_dask >= 0) & (p_dask <= 1))


def test_run_training_on_dask_registers_a_bundle(
    cluster: Any, history: tuple[pd.DataFrame, pd.DataFrame], tmp_path: Path, mlflow_store: str
) -> None:
    import mlflow

    attempts, nudges = history
    # A partitioned Parquet history (a directory of part files) is read like one file.
    paths = tmp_path / "attempts.parquet", tmp_path / "nudges.parquet"
    for path in paths:
        path.mkdir()
    orders = attempts["order_id"].unique()
    first = attempts["order_id"].isin(orders[: len(orders) // 2])
    write_attempts(attempts.loc[first], paths[0] / "part-0.parquet")
    write_attempts(attempts.loc[~first], paths[0] / "part-1.parquet")
    write_nudges(nudges, paths[1] / "part-0.parquet")

    summary = run_training(
        *paths,
        tracking_uri=mlflow_store,
        seed=0,
        train_options=TRAIN_OPTIONS,
        evaluation_options={"simulated": False, "max_points": 300, "n_bootstrap": 20},
        console=Console(width=200, record=True),
        show_progress=False,
        engine="dask",
        scheduler=cluster.scheduler_address,
    )
    assert summary.version == "1"
    assert registry.get_alias_version(registry.CHALLENGER, tracking_uri=mlflow_store) == "1"
    bundle = registry.load_version("1", tracking_uri=mlflow_store)
    assert _machines(bundle) == "[num_machines: 2]"
    # Not mlflow.set_tracking_uri: it stays set for every later test of this process (and is exported to its children)
    params = mlflow.MlflowClient(tracking_uri=mlflow_store).get_run(summary.run_id).data.params
    assert (params["engine"], params["scheduler"]) == ("dask", cluster.scheduler_address)
    assert params["attempts_rows"] == str(len(attempts))


@pytest.mark.parametrize(
    ("engine", "scheduler", "message"),
    [
        ("dask", None, "--engine dask needs --scheduler, the address of a Dask scheduler (tcp://host:8786)"),
        ("spark", None, "unknown training engine 'spark': use one of local, dask"),
        ("local", "tcp://x:1", "--scheduler is only used with --engine dask"),
    ],
)
def test_engine_options_are_checked(engine: str, scheduler: str | None, message: str) -> None:
    with pytest.raises(TrainInputError) as caught:
        run_training("a.parquet", "n.parquet", engine=engine, scheduler=scheduler, show_progress=False)
    assert str(caught.value) == message


def test_cli_dask_engine_without_scheduler_exits_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipelines.cli import app

    store = tmp_path / "mlflow.db"
    # Files there (their content is never read): a missing one is named first, before the options are checked.
    attempts, nudges = tmp_path / "a.parquet", tmp_path / "n.parquet"
    attempts.write_bytes(b"")
    nudges.write_bytes(b"")
    result = CliRunner().invoke(
        app,
        ["train", "--attempts", str(attempts), "--nudges", str(nudges), "--engine", "dask",
         "--tracking-uri", f"sqlite:///{store}"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        "error: --engine dask needs --scheduler, the address of a Dask scheduler (tcp://host:8786)"
    )
    assert not store.exists()
