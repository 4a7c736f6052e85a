"""The evaluation judges and values a model by the P(success) decide() serves, everywhere: its classification table,
and its DR reward model (``dr``, ``dr@name``), so a policy is valued with the model that acts for it.

Stub models whose code levels (model.codelevel) scale their served retries well below their boosters' score stand in
for two fits; the history is the small synthetic one of tests.factories (600 orders).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from model import evaluation as ev
from model.catalog import load_catalog
from model.policy import DEFAULT_RETRYABLE_THRESHOLD, served_probabilities
from model.requests import Decision, DecisionRequest
from model.rules import Candidate
from model.vocab import Action, Strategy
from tests.factories import write_history_frames


class _Levelled:
    """A model: P(success) ``retry`` for every silent retry and ``link`` for every payment link, and code levels
    (n, successes, served sum) for every error code, which scale its served retries by their code factor."""

    version = "stub"
    retryable_threshold = DEFAULT_RETRYABLE_THRESHOLD

    def __init__(self, retry: float, link: float, level: tuple[float, float, float]) -> None:
        self.retry, self.link, self.level = retry, link, level

    def score(self, request: DecisionRequest, candidates: list[Candidate]) -> np.ndarray:
        chances = {Action.RETRY: self.retry, Action.RETARGET: self.link, Action.STOP: 0.0}
        return np.array([chances[c.action] for c in candidates], dtype=np.float64)

    def code_level(self, connector: str, code: str | None) -> tuple[float, float, float]:
        return self.level


def _cascade_in_15_minutes(request: DecisionRequest) -> Decision:
    failed = request.failure.connector
    return Decision(
        decision_id="dec_test",
        model_version="test",
        action=Action.RETRY,
        strategy=Strategy.CASCADE,
        connector=next(c for c in ("stripe", "adyen", "cybersource") if c != failed),
        execute_at=request.event_time + timedelta(minutes=15),
        retryable=True,
        retry_probability=0.5,
        expected_success=0.5,
        propensity=1.0,
    )


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_history_frames(tmp_path_factory.mktemp("history"), 600, seed=5)


def test_every_dr_reward_model_of_a_model_reads_the_probability_it_serves(history: Path, tmp_path: Path) -> None:
    from pipelines.evaluate import evaluate

    catalog = load_catalog()
    # Retries succeeded at 10% where each model served 0.4 (first) or 0.3 (second): served about 0.13 and 0.11.
    first = _Levelled(0.4, 0.2, (2_000.0, 200.0, 800.0))
    second = _Levelled(0.3, 0.1, (2_000.0, 200.0, 600.0))
    summary = evaluate(
        history / "attempts.parquet",
        history / "nudges.parquet",
        tmp_path / "out",
        {"cascade": _cascade_in_15_minutes},
        scorers={"first": first, "second": second},  # type: ignore[dict-item]
        reward="success",
        simulated=False,
        holdout_fraction=0.5,
        n_bootstrap=5,
    )
    points: pd.DataFrame = summary.ope_points
    replayed = summary.replayed.sort_values("point").reset_index(drop=True)
    assert len(replayed) == len(points) > 100
    logged = [ev.logged_candidate({str(k): v for k, v in row.items()}) for row in points.to_dict("records")]
    chosen = [ev.decision_candidate(_cascade_in_15_minutes(request)) for request in points["request"]]
    retried = np.array([c.action == Action.RETRY for c in logged])
    assert retried.sum() > 50

    for name, model, suffix in (("first", first, ""), ("second", second, "@second")):

        def served(request: DecisionRequest, candidate: Candidate, model: Any = model) -> float:
            return float(served_probabilities(request, [candidate], model, catalog=catalog)[0])

        q = np.array(
            [served(r, c) if c.action != Action.STOP else 0.0 for r, c in zip(points["request"], logged, strict=True)]
        )
        v = np.array([served(r, c) for r, c in zip(points["request"], chosen, strict=True)])
        assert replayed[f"q_logged{suffix}"].to_numpy() == pytest.approx(q, abs=1e-12), name
        assert replayed[f"v_target{suffix}"].to_numpy() == pytest.approx(v, abs=1e-12), name
        # What the classification table scores these retries by, and not the boosters' score.
        assert q[retried] == pytest.approx(np.full(retried.sum(), q[retried][0]))
        assert q[retried][0] < model.retry - 0.15, name
        acted = summary.predictions[name][summary.logged_actions == "retry"]
        assert set(np.round(acted, 12)) == {round(float(q[retried][0]), 12)}, name
