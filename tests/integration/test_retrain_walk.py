"""The feedback loop as an operator walks it from the README, with an error code no history has shown.

`winback simulate`, a first model promoted, `winback serve` (a real server subprocess on a real MLflow store in a
temp dir), decisions for a new PSP's never-seen code sent over HTTP and what came of them posted to
`/v1/outcomes`, `winback history export --with-history` (the simulated history the champion learned from, plus
what the store learned since), `winback codes report`, `retrain` and its gate, and the running server deciding
the new code anew once it follows the champion alias. Small data and few boosting rounds keep it short.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from model.history import read_attempts
from pipelines.cli import app
from pipelines.retrain import retrain
from pipelines.simulate import simulate
from pipelines.train import run_training
from tests.factories import make_request
from tests.integration.test_api_server import AUTH, Server
from tests.integration.test_feedback_loop import EVALUATION_OPTIONS, TRAIN_OPTIONS

pytestmark = pytest.mark.slow

CONNECTOR, CODE = "novapay", "card_velocity_exceeded"  # a PSP the simulator and the catalog do not know
MESSAGE = "The card has exceeded its velocity limit for this period; retry later."
ORDERS = 100


@pytest.fixture
def server(tmp_path: Path, mlflow_store: str) -> Iterator[Server]:
    started = Server(tmp_path, mlflow_store, workers=1)
    yield started
    started.stop()


def _decide(client: httpx.Client, start: pd.Timestamp, label: str) -> list[dict[str, object]]:
    """The server's answers for ORDERS first failures with the new code, one order each."""
    answers = []
    for number in range(ORDERS):
        at = (start + timedelta(minutes=97 * number)).strftime("%Y-%m-%dT%H:%M:%SZ")
        order_id = f"{label}_{number:04d}"
        request = make_request(
            order_id=order_id,
            event_time=at,
            amount=49.0,
            currency="USD",
            failure={"connector": CONNECTOR, "error_code": CODE, "error_message": MESSAGE,
                     "network_decline_code": None},
            history={"attempts": [{"attempt_number": 1, "connector": CONNECTOR, "strategy": "initial",
                                   "status": "failure", "error_code": CODE, "created_at": at}], "nudges": []},
            available_connectors=[CONNECTOR, "stripe", "adyen"],
        )  # fmt: skip
        response = client.post("/v1/decisions", content=request.model_dump_json())
        assert response.status_code == 200, response.text
        answers.append({"order_id": order_id, **response.json()})
    return answers


def _post_outcomes(client: httpx.Client, answers: list[dict[str, object]]) -> int:
    """What came of each retry and payment link: a retry of the new code never recovers the order (a velocity
    limit holds for the day), a payment link one order in three. Returns the number of orders recovered."""
    draw = random.Random(7)
    recovered = 0
    for answer in answers:
        if answer["action"] == "stop":
            continue  # a stop has no outcome: the export writes it to the stops file
        when = pd.Timestamp(str(answer["execute_at"])) + timedelta(minutes=1)
        outcome: dict[str, object] = {
            "decision_id": answer["decision_id"],
            "order_id": answer["order_id"],
            "occurred_at": when.isoformat(),
        }
        if answer["action"] == "retry":
            outcome |= {"status": "failure", "connector": answer["connector"], "error_code": CODE,
                        "error_message": MESSAGE}  # fmt: skip
        else:
            paid = draw.random() < 1 / 3
            recovered += paid
            outcome |= {"status": "success" if paid else "failure", "nudge_id": f"n_{answer['order_id']}",
                        "sent_at": answer["execute_at"], "delivered": True}  # fmt: skip
            if paid:
                outcome |= {"clicked_at": (when - timedelta(seconds=30)).isoformat(), "connector": "stripe"}
        response = client.post("/v1/outcomes", json=outcome)
        assert response.status_code == 200, response.text
        assert response.json()["decision_found"] is True
    return recovered


def _codes_report(folder: Path, mlflow_store: str, csv: Path) -> pd.DataFrame:
    result = CliRunner().invoke(
        app,
        ["codes", "report", "--attempts", str(folder / "attempts.parquet"), "--nudges",
         str(folder / "nudges.parquet"), "--tracking-uri", mlflow_store, "--csv", str(csv)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = pd.read_csv(csv)
    return report[(report["connector"] == CONNECTOR) & (report["error_code"] == CODE)]


def test_an_operator_retrains_on_a_never_seen_code_and_the_server_decides_it_anew(
    tmp_path: Path, mlflow_store: str, server: Server
) -> None:
    console = Console(width=120, record=True)
    quick = {"tracking_uri": mlflow_store, "train_options": TRAIN_OPTIONS, "evaluation_options": EVALUATION_OPTIONS,
             "console": console, "show_progress": False}  # fmt: skip
    simulated = tmp_path / "history"
    simulate(simulated, orders=1000, seed=1, progress=False)
    files = ("attempts.parquet", "nudges.parquet")
    first = run_training(*(simulated / f for f in files), stops=simulated / "stops.parquet", promote=True, **quick)
    assert first.champion_version == "1"
    # The new traffic comes after the history the champion learned from.
    start = read_attempts(simulated / "attempts.parquet")["created_at"].max().ceil("D")

    server.wait_healthy()
    with httpx.Client(base_url=server.url, headers={**AUTH, "Content-Type": "application/json"}, timeout=20) as client:
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.get("/readyz").json()["model_version"] == "1"
        before = _decide(client, start, "velo")
        assert sum(answer["action"] == "retry" for answer in before) >= ORDERS // 2, "the new code is retried first"
        recovered = _post_outcomes(client, before)
        assert recovered > 0

        # The store holds only what was served since: the export adds the history the champion learned from.
        store = f"sqlite:///{tmp_path / 'winback.db'}"
        exported = tmp_path / "history-all"
        result = CliRunner().invoke(
            app,
            ["history", "export", "--out", str(exported), "--database-url", store, "--with-history",
             str(simulated)],
            env={"COLUMNS": "1000"},
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert f"for {1000 + ORDERS:,} orders" in result.output, result.output
        assert "".join(f"of which 1,000 orders from --with-history {simulated}".split()) in "".join(
            result.output.split()
        )
        listed = _codes_report(exported, mlflow_store, tmp_path / "codes-before.csv")
        assert len(listed) == 1, "the report names the new code"
        assert int(listed["training_support"].iloc[0]) == 0

        retrained = retrain(
            *(exported / f for f in files),
            stops=exported / "stops.parquet",
            **quick,  # type: ignore[arg-type]
            # The new code's outcomes are what moves the retry model; on 1,000 simulated orders and 40 rounds the
            # other metrics are noise around a tie (AUCs near 0.5) that flips the verdict from run to run.
            gate=("retry_log_loss",),
        )
        printed = console.export_text()
        assert retrained.promoted, printed
        # Promoted for what it learned, not by a tie inside the tolerance: every retry of the new code sits in the
        # holdout, and the challenger is judged at each point with what the holdout's earlier retries showed of it
        # (its code levels as they stood then), as the version registered serves it. Judged blind to the code, the
        # two fits' calibrators decided: the challenger came out 0.006-0.021 worse in six seeds, and was kept.
        assert retrained.summary.gate is not None
        (check,) = retrained.summary.gate.checks
        assert check.challenger < check.champion - check.metric.tolerance, printed
        assert "promoted version 2 over version 1" in printed
        assert "Promotion gate: challenger v2 vs champion v1" in printed

        # Now known to the champion: its retries are in the training data.
        listed = _codes_report(exported, mlflow_store, tmp_path / "codes-after.csv")
        assert listed.empty or int(listed["training_support"].iloc[0]) > 0

        deadline = time.monotonic() + 30
        while client.get("/readyz").json()["model_version"] != "2" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.get("/readyz").json()["model_version"] == "2"
        after = _decide(client, start + timedelta(days=14), "velo_after")

    assert {answer["model_version"] for answer in after} == {"2"}
    mean = {
        name: sum(float(answer["retry_probability"]) for answer in answers) / ORDERS  # type: ignore[arg-type]
        for name, answers in (("before", before), ("after", after))
    }
    retries = {
        name: sum(a["action"] == "retry" for a in answers) for name, answers in (("before", before), ("after", after))
    }
    observed = 0.0  # no retry of the code recovered an order
    print(f"\n{CONNECTOR}/{CODE}: retries {retries}, mean retry_probability {mean}")
    # The data said a retry of the code never works: the new version's estimate moves toward it, and it decides
    # the code otherwise.
    assert abs(mean["after"] - observed) < abs(mean["before"] - observed), (mean, observed)
    assert retries["after"] < retries["before"] / 2, (retries, mean)


@pytest.mark.parametrize("columns", [80, 120])
def test_retrain_on_a_history_far_smaller_than_the_champion_s_says_the_export_may_lack_it(
    tmp_path: Path, mlflow_store: str, columns: int
) -> None:
    # Retraining on a store's export alone (the orders served since the scorer started) gave no hint that the
    # history the champion learned from was missing: the gate's "too small a holdout" was the only sign.
    from model.history import write_attempts, write_nudges
    from tests.factories import make_new_code_history

    console = Console(width=columns, record=True)
    quick = {"tracking_uri": mlflow_store, "train_options": TRAIN_OPTIONS, "evaluation_options": EVALUATION_OPTIONS,
             "console": console, "show_progress": False}  # fmt: skip
    attempts, nudges = make_new_code_history(600, seed=5)
    whole, part = tmp_path / "whole", tmp_path / "part"
    orders = sorted(set(attempts["order_id"]))
    recent = set(orders[: len(orders) // 4])
    for folder, a, n in (
        (whole, attempts, nudges),
        (part, attempts[attempts["order_id"].isin(recent)], nudges[nudges["order_id"].isin(recent)]),
    ):
        folder.mkdir()
        write_attempts(a, folder / "attempts.parquet")
        write_nudges(n, folder / "nudges.parquet")
    files = ("attempts.parquet", "nudges.parquet")
    run_training(*(whole / f for f in files), promote=True, **quick)  # type: ignore[arg-type]
    retrain(*(part / f for f in files), **quick)  # type: ignore[arg-type]
    lines = console.export_text().splitlines()
    assert all(len(line) <= columns for line in lines)
    start = next((i for i, line in enumerate(lines) if line.startswith("note: this history holds")), None)
    assert start is not None, "\n".join(lines)
    note = lines[start].strip()
    for line in lines[start + 1 : start + 6]:  # wrapped at words: the lines joined again are the note, words whole
        if note.endswith("adds the history the champion learned from"):
            break
        note += " " + line.strip()
    part_rows = len(read_attempts(part / "attempts.parquet"))
    assert note == (
        f"note: this history holds {part_rows:,} attempts, the champion (version 1) learned from {len(attempts):,}: a "
        "store's export holds only what was served since it started; `winback history export --with-history DIR` "
        "adds the history the champion learned from"
    ), "\n".join(lines[start : start + 6])
