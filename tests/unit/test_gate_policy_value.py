"""The gate's policy-value check judges the two models' decisions, whatever either model's reward model says.

A synthetic history (tests.factories.make_history_frames) whose outcomes are known: a cascade after a processing
error recovers 75% of the orders, a retry on the same connector 35%, and so on. Two policies that retry 15 minutes
after each failure (a time the history never logged, so DR rests on its reward model there, as it does at most points
of a real holdout): a cascade, and a retry on the same connector, the worse one. The champion's reward model knows
the outcomes; the challenger's is degenerate. Run through the evaluation the training pipeline runs (`evaluate`)
and the gate's own metric, noise and verdict (`pipelines.train.gate_metrics`, `gate_dr_noise`, `pipelines.gate`).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from model.requests import Decision, DecisionRequest
from model.rules import Candidate
from model.vocab import Action, Strategy
from tests.factories import _SYNTH_CONNECTORS, _SYNTH_ERRORS, write_history_frames


def _retry_in_15_minutes(strategy: Strategy) -> object:
    def policy(request: DecisionRequest) -> Decision:
        failed = request.failure.connector
        connector = next(c for c in _SYNTH_CONNECTORS if c != failed) if strategy == Strategy.CASCADE else failed
        return Decision(
            decision_id="dec_test",
            model_version="test",
            action=Action.RETRY,
            strategy=strategy,
            connector=connector,
            execute_at=request.event_time + timedelta(minutes=15),
            retryable=True,
            retry_probability=0.5,
            expected_success=0.5,
            propensity=1.0,
        )

    return policy


class _Truth:
    """The history's own chances of success (the payday effect left out)."""

    def score(self, request: DecisionRequest, candidates: list[Candidate]) -> np.ndarray:
        (p_now, _, p_cascade) = next(row[4:] for row in _SYNTH_ERRORS if row[1] == request.failure.error_code)
        chances = {Action.RETRY: p_now, Action.RETARGET: 0.3, Action.STOP: 0.0}
        return np.array(
            [p_cascade if c.strategy == Strategy.CASCADE else chances[c.action] for c in candidates], dtype=np.float64
        )


class _Constant:
    """A degenerate model: the same chance for everything."""

    def __init__(self, p: float) -> None:
        self.p = p

    def score(self, request: DecisionRequest, candidates: list[Candidate]) -> np.ndarray:
        return np.full(len(candidates), self.p)


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_history_frames(tmp_path_factory.mktemp("history"), 1_500, seed=3)


@pytest.mark.parametrize(
    ("challenger_policy", "challenger_model", "promote"),
    [
        # A worse policy, and a reward model that values every action at nothing: under it, the champion's value
        # fell to minus its retry fees, and the challenger passed.
        pytest.param(Strategy.RETRY_SAME, _Constant(0.0), False, id="worse-policy-degenerate-reward-model"),
        # The champion's very policy, and a reward model that expects every action to recover the order: under it,
        # the champion's value rose to the orders' whole amount, and the challenger failed.
        pytest.param(Strategy.CASCADE, _Constant(1.0), True, id="same-policy-degenerate-reward-model"),
    ],
)
def test_the_policy_value_check_judges_decisions_not_reward_models(
    history: Path, tmp_path: Path, challenger_policy: Strategy, challenger_model: object, promote: bool
) -> None:
    from pipelines.evaluate import evaluate
    from pipelines.gate import GATE_METRICS, compare
    from pipelines.train import CHALLENGER_NAME, CHAMPION_NAME, gate_dr_noise, gate_metrics

    summary = evaluate(
        history / "attempts.parquet",
        history / "nudges.parquet",
        tmp_path / "out",
        {
            CHALLENGER_NAME: _retry_in_15_minutes(challenger_policy),
            CHAMPION_NAME: _retry_in_15_minutes(Strategy.CASCADE),
        },
        scorers={CHALLENGER_NAME: challenger_model, CHAMPION_NAME: _Truth()},  # type: ignore[dict-item]
        simulated=False,
        holdout_fraction=0.5,
        n_bootstrap=5,
    )
    (policy_value,) = (metric for metric in GATE_METRICS if metric.name == "policy_value_dr")
    values = {name: gate_metrics(summary, name)[policy_value.name] for name in (CHALLENGER_NAME, CHAMPION_NAME)}
    verdict = compare(
        {policy_value.name: values[CHALLENGER_NAME]},
        {policy_value.name: values[CHAMPION_NAME]},
        challenger_version="2",
        champion_version="1",
        metrics=(policy_value,),
        noise={policy_value.name: gate_dr_noise(summary)},
    )
    assert verdict.promote is promote, (values, verdict.verdict)
    if challenger_policy == Strategy.CASCADE:  # the same decisions, valued alike, point by point
        assert values[CHALLENGER_NAME] == pytest.approx(values[CHAMPION_NAME])


def test_a_training_run_s_evaluation_draws_from_a_stream_of_its_own() -> None:
    """`winback train --seed S` fitted with S and evaluated with S: the holdout sample, the reward model's folds and
    the replayed policies' exploration followed the very stream training drew from. The evaluation's seed is derived
    from S (reproducible) and is another number (for the default seed, 0, too)."""
    from pipelines.train import evaluation_seed

    seeds = [evaluation_seed(seed) for seed in range(5)]
    assert seeds == [evaluation_seed(seed) for seed in range(5)]
    assert len(set(seeds)) == 5
    assert all(derived != seed for seed, derived in enumerate(seeds))
    assert np.random.default_rng(seeds[0]).permutation(50).tolist() != np.random.default_rng(0).permutation(50).tolist()


def test_the_gate_s_noise_counts_the_reward_model_s_fit(history: Path, tmp_path: Path) -> None:
    """The paired standard error of the points' terms sees which points were drawn, not that the holdout's reward
    model was fitted on them: refitted on each of 40 quarters of a 13,886-point holdout, two equal models' difference
    spread 1.10-1.16 times that standard error (README, "Is the standard error right?"). The gate adds the spread of
    the difference across the reward model fitted on resamples of the holdout's orders; the evaluation's tables leave
    those fits out. Here both policies retry at a time the history never logged, so their DR is the reward model's
    value alone: the points' terms differ by the cells' rates, which the paired standard error takes as known, and the
    fit is most of the noise."""
    from model.evaluation import FIT_NOISE_RESAMPLES, paired_standard_error
    from pipelines.evaluate import evaluate
    from pipelines.train import CHALLENGER_NAME, CHAMPION_NAME, _gate_dr_terms, fit_noise_variance, gate_dr_noise

    summary = evaluate(
        history / "attempts.parquet",
        history / "nudges.parquet",
        tmp_path / "out",
        {
            CHALLENGER_NAME: _retry_in_15_minutes(Strategy.RETRY_SAME),
            CHAMPION_NAME: _retry_in_15_minutes(Strategy.CASCADE),
        },
        scorers={CHALLENGER_NAME: _Truth(), CHAMPION_NAME: _Truth()},  # type: ignore[dict-item]
        simulated=False,
        holdout_fraction=0.5,
        n_bootstrap=5,
        fit_noise_resamples=FIT_NOISE_RESAMPLES,
    )
    points = summary.ope_points
    orders = points["merchant_id"].astype(str) + "/" + points["order_id"].astype(str)
    sampling = paired_standard_error(
        _gate_dr_terms(summary, CHALLENGER_NAME), _gate_dr_terms(summary, CHAMPION_NAME), groups=orders
    )
    fit = fit_noise_variance(summary)
    assert fit > sampling**2 > 0
    assert gate_dr_noise(summary) == pytest.approx(np.sqrt(sampling**2 + fit))
    # The resampled fits are a gauge, not estimates: none in the evaluation's table.
    assert not summary.ope["estimator"].str.contains("~").any()
    assert "dr@holdout" in set(summary.ope["estimator"])
