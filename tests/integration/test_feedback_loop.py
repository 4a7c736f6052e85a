"""The feedback loop end to end (issue 7's done-when): new error codes reach a running scorer, are counted as new,
get sensible answers, appear in history, and after `winback retrain` the scorer switches version by itself and
its retryability estimates for those codes move toward their observed outcomes.

Real server (uvicorn in a subprocess), real MLflow store in a temp dir, small histories and few boosting rounds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from model import registry
from model.history import write_attempts, write_nudges
from model.requests import DecisionRequest
from model.training import decision_points, request_at
from pipelines.cli import app
from pipelines.retrain import retrain
from pipelines.train import run_training
from tests.factories import NEW_CODES, make_new_code_history
from tests.integration.test_api_server import AUTH, Server

pytestmark = pytest.mark.slow

TRAIN_OPTIONS = {"max_rounds": 40, "evaluate_unseen_codes": False}
EVALUATION_OPTIONS = {"simulated": False, "max_points": 300, "n_bootstrap": 20}
# The factory's nudge outcomes are coin flips whatever the error, so comparing retarget models on them is noise;
# the gate judges what the new codes change: the retry model.
RETRY_GATE = ("retry_log_loss", "retry_auc")
KIND = dict(NEW_CODES.values())


def _write(folder: Path, attempts: pd.DataFrame, nudges: pd.DataFrame) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    write_attempts(attempts, folder / "attempts.parquet")
    write_nudges(nudges, folder / "nudges.parquet")
    return folder / "attempts.parquet", folder / "nudges.parquet"


def _new_code_points(attempts: pd.DataFrame, nudges: pd.DataFrame) -> list[tuple[DecisionRequest, object, bool]]:
    """(request, logged retry, succeeded) at every silent retry after a failure with a new code."""
    points = decision_points(attempts, nudges)
    chosen = points[(points["kind"] == "retry") & points["error_code"].isin(list(KIND))]
    out = []
    for _, point in chosen.iterrows():
        request, candidate = request_at(attempts, nudges, {str(k): v for k, v in point.items()})
        out.append((request, candidate, bool(point["label"])))
    return out


def _served_estimates(client: httpx.Client, requests: list[DecisionRequest]) -> dict[str, float]:
    """Mean retry_probability the server answers per new code; every answer must be sensible."""
    by_code: dict[str, list[float]] = {}
    for request in requests:
        response = client.post("/v1/decisions", content=request.model_dump_json())
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["action"] in {"retry", "retarget", "stop"}
        assert 0.0 < answer["propensity"] <= 1.0
        assert 0.0 <= answer["retry_probability"] <= 1.0
        assert (answer["connector"] is not None) == (answer["action"] == "retry")
        by_code.setdefault(str(request.failure.error_code), []).append(answer["retry_probability"])
    return {code: float(np.mean(values)) for code, values in by_code.items()}


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Servers a test starts, stopped at its end whatever happened."""
    started: list[Server] = []
    yield started
    for item in started:
        item.stop()


def test_new_codes_are_noticed_answered_learned_and_the_scorer_switches(
    tmp_path: Path, mlflow_store: str, servers: list[Server]
) -> None:
    console = Console(width=200, record=True)
    attempts, nudges = make_new_code_history(1500, seed=3)
    new_orders = set(attempts.loc[attempts["error_code"].isin(list(KIND)), "order_id"])
    assert new_orders, "the factory must produce orders with new codes"
    old_history = _write(
        tmp_path / "old",
        attempts[~attempts["order_id"].isin(new_orders)],
        nudges[~nudges["order_id"].isin(new_orders)],
    )
    full_history = _write(tmp_path / "full", attempts, nudges)

    first = run_training(
        *old_history,
        tracking_uri=mlflow_store,
        promote=True,
        train_options=TRAIN_OPTIONS,
        evaluation_options=EVALUATION_OPTIONS,
        console=console,
        show_progress=False,
    )
    assert first.champion_version == first.version == "1"

    # The new-code watch names them: never trained on, counted, estimated, with their nearest known codes.
    result = CliRunner().invoke(
        app,
        ["codes", "report", "--attempts", str(full_history[0]), "--nudges", str(full_history[1]),
         "--tracking-uri", mlflow_store, "--csv", str(tmp_path / "codes.csv")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = pd.read_csv(tmp_path / "codes.csv")
    listed = report[report["error_code"].isin(list(KIND))]
    assert set(listed["error_code"]) == set(KIND)
    assert (listed["training_support"] == 0).all()
    assert (listed["failures"] > 0).all()
    assert listed["retry_probability"].between(0, 1).all()
    assert listed["nearest"].str.contains("/").all()

    # Fresh traffic with the new codes, from another stretch of the same world.
    test_attempts, test_nudges = make_new_code_history(800, seed=103)
    points = _new_code_points(test_attempts, test_nudges)
    sample: list[DecisionRequest] = []
    for code in KIND:
        sample += [request for request, _, _ in points if request.failure.error_code == code][:6]

    srv = Server(tmp_path, mlflow_store, workers=1)
    servers.append(srv)
    srv.wait_healthy()
    with httpx.Client(base_url=srv.url, headers={**AUTH, "Content-Type": "application/json"}, timeout=20) as client:
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.get("/readyz").json()["model_version"] == "1"
        before = _served_estimates(client, sample)
        metrics = client.get("/metrics").text
        # Counted as new: the champion never trained on them (the catalog knows none of them either).
        assert _metric(metrics, "winback_new_error_codes_total") == len(sample)
        pairs = {(r.failure.connector, r.failure.error_code) for r in sample}
        assert _metric(metrics, "winback_new_error_code_pairs") == len(pairs)

        result = retrain(
            *full_history,
            tracking_uri=mlflow_store,
            train_options=TRAIN_OPTIONS,
            evaluation_options=EVALUATION_OPTIONS,
            console=console,
            show_progress=False,
            gate=RETRY_GATE,
        )
        assert result.promoted, result.verdict
        assert result.summary.champion_version == "2"

        # Nobody tells the scorer: it follows the champion alias by itself.
        deadline = time.monotonic() + 30
        while client.get("/readyz").json()["model_version"] != "2" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.get("/readyz").json()["model_version"] == "2"
        after = _served_estimates(client, sample)
        metrics = client.get("/metrics").text
        assert 'winback_model_info{version="2"} 1.0' in metrics

    # Observed outcomes of retries after each new code, in the history the challenger learned from.
    train_points = decision_points(attempts, nudges)
    retried = train_points[(train_points["kind"] == "retry") & train_points["error_code"].isin(list(KIND))]
    observed = retried.groupby("error_code")["label"].mean().to_dict()
    for code, kind in KIND.items():
        gap_before, gap_after = abs(before[code] - observed[code]), abs(after[code] - observed[code])
        assert gap_after < gap_before, (code, kind, before[code], after[code], observed[code])
    retryable = [c for c, k in KIND.items() if k == "retryable"]
    final = [c for c, k in KIND.items() if k == "final"]
    assert min(after[c] for c in retryable) > max(after[c] for c in final)

    # AUC of the retry model on those codes, before and after, on the fresh traffic's logged retries.
    champion_then = registry.load_version("1", tracking_uri=mlflow_store)
    champion_now = registry.load_version("2", tracking_uri=mlflow_store)
    labels = [label for _, _, label in points]
    scores = {
        name: [float(bundle.score(request, [candidate])[0]) for request, candidate, _ in points]  # type: ignore[list-item]
        for name, bundle in (("before", champion_then), ("after", champion_now))
    }
    auc = {name: roc_auc_score(labels, values) for name, values in scores.items()}
    print(f"\nnew-code retry AUC on {len(labels)} retries: before {auc['before']:.3f}, after {auc['after']:.3f}")
    print("served retry_probability by code (before -> after, observed):")
    for code in KIND:
        print(f"  {code:12s} {before[code]:.3f} -> {after[code]:.3f} (observed {observed[code]:.3f})")
    assert auc["after"] > 0.8
    assert auc["after"] > auc["before"] + 0.2
