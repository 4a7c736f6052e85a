"""Offline evaluation: classification metrics, calibration, off-policy estimators and policy comparisons.

Everything here is pure numpy/pandas over arrays and frames. Off-policy estimates replay a policy at every
logged decision point, match its choice to the logged action (the same candidate: `same_candidate`), and weight
the logged reward by ``target_prob / logged_propensity`` (clipped).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from model.catalog import Normaliser, normalise_request
from model.history_request import floor_us, history_request, is_missing
from model.money import Economics
from model.requests import Decision, DecisionRequest
from model.rules import Candidate
from model.vocab import Action, Channel, Strategy

FloatArray = np.ndarray[Any, np.dtype[np.float64]]
ArrayLike = Sequence[float] | np.ndarray[Any, Any] | pd.Series

#: A policy under evaluation: the same shape as `model.policy.DecidePolicy` and the baselines.
Policy = Callable[[DecisionRequest], Decision]
#: Expected reward of each candidate at a request (P(success), or value in USD net of cost).
RewardModel = Callable[[DecisionRequest, list[Candidate]], np.ndarray]

DEFAULT_MAX_WEIGHT = 50.0
DEFAULT_BOOTSTRAP = 200
_EPS = 1e-15

# ----------------------------------------------------------------------------------------------------------
# Classification metrics and calibration
# ----------------------------------------------------------------------------------------------------------


def _as_float(values: ArrayLike, name: str) -> FloatArray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if np.isnan(array).any():
        raise ValueError(f"{name} contains NaN ({int(np.isnan(array).sum())} of {array.size} values)")
    return array


def _check_binary(y: FloatArray, p: FloatArray) -> None:
    if y.shape != p.shape:
        raise ValueError(f"y_true and p differ in length: {y.size} labels, {p.size} probabilities")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y_true must hold only 0/1 (or False/True) labels")
    if ((p < 0.0) | (p > 1.0)).any():
        raise ValueError("probabilities must lie in [0, 1]")


def reliability_table(y_true: ArrayLike, p: ArrayLike, bins: int = 10) -> pd.DataFrame:
    """Calibration curve: equal-width probability bins with count, mean predicted and observed rate.

    Empty bins are kept (n = 0, rates NaN) so tables of different models line up bin by bin.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    y = _as_float(y_true, "y_true")
    prob = _as_float(p, "p")
    _check_binary(y, prob)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Right-closed top bin: a probability of exactly 1.0 belongs to the last bin.
    index = np.clip(np.searchsorted(edges, prob, side="right") - 1, 0, bins - 1)
    n = np.bincount(index, minlength=bins).astype(np.float64)
    sum_p = np.bincount(index, weights=prob, minlength=bins)
    sum_y = np.bincount(index, weights=y, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.where(n > 0, sum_p / np.maximum(n, 1), np.nan)
        rate = np.where(n > 0, sum_y / np.maximum(n, 1), np.nan)
    return pd.DataFrame(
        {
            "bin": np.arange(bins),
            "lower": edges[:-1],
            "upper": edges[1:],
            "n": n.astype(np.int64),
            "mean_predicted": mean_p,
            "observed_rate": rate,
        }
    )


def expected_calibration_error(y_true: ArrayLike, p: ArrayLike, bins: int = 10) -> float:
    """ECE: count-weighted mean |observed rate - mean predicted| over equal-width bins (NaN when empty)."""
    table = reliability_table(y_true, p, bins)
    total = int(table["n"].sum())
    if total == 0:
        return float("nan")
    filled = table[table["n"] > 0]
    gaps = (filled["observed_rate"] - filled["mean_predicted"]).abs()
    return float((gaps * filled["n"]).sum() / total)


def roc_auc(y_true: ArrayLike, p: ArrayLike) -> float:
    """Area under the ROC curve (rank statistic, ties averaged); NaN when only one class is present."""
    y = _as_float(y_true, "y_true")
    prob = _as_float(p, "p")
    _check_binary(y, prob)
    positives = int(y.sum())
    negatives = y.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = pd.Series(prob).rank(method="average").to_numpy()
    return float((ranks[y == 1.0].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def log_loss(y_true: ArrayLike, p: ArrayLike) -> float:
    """Mean binary cross-entropy, probabilities clipped away from 0 and 1; NaN on empty input."""
    y = _as_float(y_true, "y_true")
    prob = _as_float(p, "p")
    _check_binary(y, prob)
    if y.size == 0:
        return float("nan")
    clipped = np.clip(prob, _EPS, 1.0 - _EPS)
    return float(-np.mean(y * np.log(clipped) + (1.0 - y) * np.log(1.0 - clipped)))


def brier_score(y_true: ArrayLike, p: ArrayLike) -> float:
    """Mean squared error of the probabilities; NaN on empty input."""
    y = _as_float(y_true, "y_true")
    prob = _as_float(p, "p")
    _check_binary(y, prob)
    return float(np.mean((prob - y) ** 2)) if y.size else float("nan")


def _metrics_row(y: FloatArray, p: FloatArray, bins: int) -> dict[str, float | int]:
    return {
        "n": int(y.size),
        "positives": int(y.sum()),
        "base_rate": float(y.mean()) if y.size else float("nan"),
        "mean_predicted": float(p.mean()) if p.size else float("nan"),
        "auc": roc_auc(y, p),
        "log_loss": log_loss(y, p),
        "ece": expected_calibration_error(y, p, bins),
        "brier": brier_score(y, p),
    }


def classification_report(
    y_true: ArrayLike, p: ArrayLike, groups: ArrayLike | Sequence[str] | None = None, *, bins: int = 10
) -> pd.DataFrame:
    """Rows ``overall`` and one per group (e.g. error class, sorted by size): n, positives, base rate,
    mean predicted, AUC (NaN when a group has one class only), log loss, ECE (``bins`` equal-width bins),
    Brier. Indexed by ``group``."""
    y = _as_float(y_true, "y_true")
    prob = _as_float(p, "p")
    _check_binary(y, prob)
    rows = [{"group": "overall", **_metrics_row(y, prob, bins)}]
    if groups is not None:
        labels = pd.Series(np.asarray(groups, dtype=object)).fillna("<missing>").astype(str).to_numpy()
        if labels.size != y.size:
            raise ValueError(f"groups has {labels.size} values for {y.size} labels")
        names, counts = np.unique(labels, return_counts=True)
        for name in names[np.argsort(-counts, kind="stable")]:
            mask = labels == name
            rows.append({"group": str(name), **_metrics_row(y[mask], prob[mask], bins)})
    return pd.DataFrame(rows).set_index("group")


def time_holdout(
    frame: pd.DataFrame, time_column: str, holdout_fraction: float = 0.2
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split by time: the latest ``holdout_fraction`` of the time span (by quantile of ``time_column``) is
    the holdout. Rows at the cut go to the holdout, so no holdout row predates a training row."""
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    if time_column not in frame.columns:
        raise ValueError(f"time column {time_column!r} is not in the frame (columns: {list(frame.columns)})")
    if frame.empty:
        return frame.copy(), frame.copy()
    stamps = pd.DatetimeIndex(pd.to_datetime(frame[time_column], utc=True)).asi8
    test = stamps >= np.quantile(stamps, 1.0 - holdout_fraction)
    return frame.loc[~test].copy(), frame.loc[test].copy()


# ----------------------------------------------------------------------------------------------------------
# Off-policy estimators
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A policy value estimate with its bootstrap confidence interval and weight diagnostics."""

    estimator: str
    value: float
    ci_low: float
    ci_high: float
    n: int
    ess: float  # effective sample size of the (clipped) importance weights
    clipped_share: float  # share of points whose weight hit the clip
    matched_share: float  # share of points with a non-zero target probability of the logged action


def importance_weights(
    logged_propensity: ArrayLike, target_prob: ArrayLike, max_weight: float | None = DEFAULT_MAX_WEIGHT
) -> FloatArray:
    """``target_prob / logged_propensity``, clipped at ``max_weight`` (``None``: no clipping)."""
    propensity = np.asarray(logged_propensity, dtype=np.float64).reshape(-1)
    target = _as_float(target_prob, "target_prob")
    if propensity.shape != target.shape:
        raise ValueError(f"logged_propensity and target_prob differ in length: {propensity.size} vs {target.size}")
    bad = ~((propensity > 0.0) & (propensity <= 1.0))
    if bad.any():
        raise ValueError(
            f"logged propensity must be in (0, 1]: {int(bad.sum())} of {propensity.size} values are missing, "
            "zero, negative or above 1"
        )
    if ((target < 0.0) | (target > 1.0)).any():
        raise ValueError("target_prob must lie in [0, 1]")
    weights = target / propensity
    if max_weight is not None:
        if max_weight <= 0:
            raise ValueError(f"max_weight must be positive, got {max_weight}")
        weights = np.minimum(weights, max_weight)
    return weights


def effective_sample_size(weights: ArrayLike) -> float:
    """Kish's effective sample size ``(sum w)^2 / sum w^2``; 0 when every weight is 0."""
    w = _as_float(weights, "weights")
    squares = float(np.sum(w**2))
    return float(np.sum(w) ** 2 / squares) if squares > 0 else 0.0


def _bootstrap(
    statistic: Callable[[np.ndarray[Any, np.dtype[np.intp]]], FloatArray],
    n: int,
    n_bootstrap: int,
    seed: int,
    confidence: float,
) -> tuple[float, float]:
    """Percentile bootstrap CI; ``statistic`` maps an (r, n) array of resampled indices to r values."""
    if n == 0 or n_bootstrap <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    # Resample in chunks so memory stays bounded (about 4M indices at a time) on large histories.
    chunk = max(1, 4_000_000 // n)
    values: list[FloatArray] = []
    done = 0
    while done < n_bootstrap:
        r = min(chunk, n_bootstrap - done)
        values.append(statistic(rng.integers(0, n, size=(r, n))))
        done += r
    stats = np.concatenate(values)
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(low), float(high)


def _prepare(
    rewards: ArrayLike,
    logged_propensity: ArrayLike,
    target_prob: ArrayLike,
    max_weight: float | None,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    r = _as_float(rewards, "rewards")
    w = importance_weights(logged_propensity, target_prob, max_weight)
    if r.shape != w.shape:
        raise ValueError(f"rewards and propensities differ in length: {r.size} vs {w.size}")
    target = _as_float(target_prob, "target_prob")
    return r, w, target


def _estimate(
    name: str,
    value: float,
    ci: tuple[float, float],
    w: FloatArray,
    target: FloatArray,
    logged_propensity: ArrayLike,
    max_weight: float | None,
) -> Estimate:
    raw = target / np.asarray(logged_propensity, dtype=np.float64).reshape(-1)
    clipped = float(np.mean(raw > max_weight)) if max_weight is not None and raw.size else 0.0
    return Estimate(
        estimator=name,
        value=value,
        ci_low=ci[0],
        ci_high=ci[1],
        n=int(w.size),
        ess=effective_sample_size(w),
        clipped_share=clipped,
        matched_share=float(np.mean(target > 0)) if target.size else float("nan"),
    )


def _mean_of_terms(
    name: str,
    terms: FloatArray,
    w: FloatArray,
    target: FloatArray,
    logged_propensity: ArrayLike,
    max_weight: float | None,
    *,
    n_bootstrap: int,
    seed: int,
    confidence: float,
) -> Estimate:
    """The estimate that is the mean of per-point ``terms``, with its bootstrap interval and weight diagnostics."""
    value = float(terms.mean()) if terms.size else float("nan")
    ci = _bootstrap(lambda idx: terms[idx].mean(axis=1), terms.size, n_bootstrap, seed, confidence)
    return _estimate(name, value, ci, w, target, logged_propensity, max_weight)


def ips(
    rewards: ArrayLike,
    logged_propensity: ArrayLike,
    target_prob: ArrayLike,
    *,
    max_weight: float | None = DEFAULT_MAX_WEIGHT,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Inverse propensity scoring: ``mean(w * r)`` with clipped weights ``w = target_prob / propensity``."""
    r, w, target = _prepare(rewards, logged_propensity, target_prob, max_weight)
    return _mean_of_terms(
        "ips",
        w * r,
        w,
        target,
        logged_propensity,
        max_weight,
        n_bootstrap=n_bootstrap,
        seed=seed,
        confidence=confidence,
    )


def snips(
    rewards: ArrayLike,
    logged_propensity: ArrayLike,
    target_prob: ArrayLike,
    *,
    max_weight: float | None = DEFAULT_MAX_WEIGHT,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    confidence: float = 0.95,
    seed: int = 0,
    known_zero: ArrayLike | None = None,
) -> Estimate:
    """Self-normalised IPS: ``sum(w * r) / sum(w)``; NaN when no logged action matches the target policy.

    ``known_zero`` marks points where the target policy's action is worth exactly 0 whatever happens (stop:
    no reward, no cost). They enter the normalisation with their expected weight, 1, and reward 0: a history
    without a stops file has no logged stop such points could match, and dropping them would inflate the estimate
    of a policy that stops often to its value on the points where it acts (with logged stops, 1 is still the
    weight's expectation there, and a lower-variance one than ``target / propensity``).
    """
    r, w, target = _prepare(rewards, logged_propensity, target_prob, max_weight)
    wr = w * r
    if known_zero is not None:
        w = np.where(np.asarray(known_zero, dtype=bool), 1.0, w)
    total = float(w.sum())
    value = float(wr.sum() / total) if total > 0 else float("nan")

    def statistic(idx: np.ndarray[Any, np.dtype[np.intp]]) -> FloatArray:
        denominator = w[idx].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denominator > 0, wr[idx].sum(axis=1) / denominator, np.nan)

    ci = _bootstrap(statistic, wr.size, n_bootstrap, seed, confidence)
    return _estimate("snips", value, ci, w, target, logged_propensity, max_weight)


def doubly_robust(
    rewards: ArrayLike,
    logged_propensity: ArrayLike,
    target_prob: ArrayLike,
    q_logged: ArrayLike,
    v_target: ArrayLike,
    *,
    max_weight: float | None = DEFAULT_MAX_WEIGHT,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Doubly robust: ``mean(v_target + w * (r - q_logged))``.

    ``q_logged`` is the reward model's prediction for the logged action, ``v_target`` its expected reward
    under the target policy at the same context. Exact when the reward model is; unbiased when the
    propensities are right (up to clipping).
    """
    terms, w, target = _dr_terms(rewards, logged_propensity, target_prob, q_logged, v_target, max_weight)
    return _mean_of_terms(
        "dr", terms, w, target, logged_propensity, max_weight, n_bootstrap=n_bootstrap, seed=seed, confidence=confidence
    )


def _dr_terms(
    rewards: ArrayLike,
    logged_propensity: ArrayLike,
    target_prob: ArrayLike,
    q_logged: ArrayLike,
    v_target: ArrayLike,
    max_weight: float | None,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """DR's term per point (its estimate is their mean), with the clipped weights and target probabilities."""
    r, w, target = _prepare(rewards, logged_propensity, target_prob, max_weight)
    q = _as_float(q_logged, "q_logged")
    v = _as_float(v_target, "v_target")
    if not (q.shape == v.shape == r.shape):
        raise ValueError(f"q_logged ({q.size}) and v_target ({v.size}) must match rewards ({r.size}) in length")
    return v + w * (r - q), w, target


def policy_dr_terms(
    logged: pd.DataFrame,
    replayed: pd.DataFrame,
    policy: str,
    estimator: str,
    *,
    max_weight: float | None = DEFAULT_MAX_WEIGHT,
) -> FloatArray:
    """DR's term per point (the estimate is their mean) of ``policy`` in a `replay` frame of ``logged``, under the
    reward model of DR estimator ``estimator`` (`reward_model_columns`: ``dr``, ``dr@name``)."""
    q_column, v_column = reward_model_columns(replayed)[estimator]
    part = replayed[replayed["policy"] == policy].sort_values("point")
    rewards = logged["reward"].to_numpy(dtype=np.float64)
    propensity = logged["propensity"].to_numpy(dtype=np.float64)
    return _dr_terms(rewards, propensity, part["target_prob"], part[q_column], part[v_column], max_weight)[0]


def paired_standard_error(first: FloatArray, second: FloatArray, groups: ArrayLike | None = None) -> float:
    """The standard error of ``mean(first) - mean(second)`` over the same points (NaN without two points, or two
    groups).

    With ``groups`` (a label per point, e.g. its order), points of one group count as one draw (the cluster-robust
    standard error): an order's decision points share its customer and card, and counting them as independent made
    the noise look smaller than it is. One point per group gives the plain standard error."""
    difference = first - second
    if difference.size < 2 or np.isnan(difference).any():
        return float("nan")
    if groups is None:
        return float(difference.std(ddof=1) / np.sqrt(difference.size))
    labels = pd.Series(np.asarray(groups, dtype=object).reshape(-1))
    if len(labels) != difference.size:
        raise ValueError(f"groups and the differences differ in length: {len(labels)} vs {difference.size}")
    sums = pd.Series(difference - difference.mean()).groupby(labels.to_numpy(), sort=False).sum().to_numpy()
    if sums.size < 2:
        return float("nan")
    return float(np.sqrt(sums.size / (sums.size - 1) * np.sum(sums**2)) / difference.size)


def reward_values(
    labels: ArrayLike,
    amount_usd: ArrayLike | None = None,
    cost_usd: ArrayLike | None = None,
    kind: Literal["value", "success"] = "value",
) -> FloatArray:
    """Rewards of logged decisions: ``success`` gives the 0/1 label; ``value`` gives the amount in USD when
    recovered, minus the action's cost."""
    y = _as_float(labels, "labels")
    if kind == "success":
        return y
    if kind != "value":
        raise ValueError(f"reward kind must be 'value' or 'success', got {kind!r}")
    if amount_usd is None:
        raise ValueError("reward kind 'value' needs amount_usd")
    amount = _as_float(amount_usd, "amount_usd")
    cost = np.zeros_like(y) if cost_usd is None else _as_float(cost_usd, "cost_usd")
    return y * amount - cost


# ----------------------------------------------------------------------------------------------------------
# Action matching: one definition of "the same action" for replaying a policy over logged decisions
# ----------------------------------------------------------------------------------------------------------

#: How long after a candidate's ``execute_at`` the logged action may have been carried out and still be that
#: candidate: the history logs when an action was carried out (an attempt's ``created_at``, a nudge's ``sent_at``),
#: not when it was due, and the executor claims what is due every half second (``service/executor``; the simulator
#: carries it out on time, a retry at least a second after the attempt before). The grid's times of one kind lie
#: further apart than this, but for a send time or a payday that falls within it of another, which is rare.
EXECUTION_LAG_SECONDS = 60.0


def same_candidate(chosen: Candidate, logged: Candidate) -> bool:
    """Whether a policy's ``chosen`` candidate is the ``logged`` action: the same action, strategy, connector and
    channel, carried out at the candidate's ``execute_at`` or up to ``EXECUTION_LAG_SECONDS`` after it.

    The logged propensity is the logging policy's probability of that exact candidate (CONTRACT.md, section 3), so
    the target probability is the policy's probability of it too. A coarser match (a delay bucket) counted every other
    time of the bucket the logging policy could have picked, each with a propensity that was never logged: the
    weights of those points were too large, by the bucket's propensity over the logged one.
    """
    if (chosen.action, chosen.strategy, chosen.connector, chosen.channel) != (
        logged.action,
        logged.strategy,
        logged.connector,
        logged.channel,
    ):
        return False
    lag = _seconds_between(logged.execute_at, chosen.execute_at)
    # A second of slack before: timestamps a store rounded (the executor never acts early).
    return -1.0 <= lag <= EXECUTION_LAG_SECONDS


def _seconds_between(later: datetime | pd.Timestamp, earlier: datetime | pd.Timestamp) -> float:
    return float((pd.Timestamp(later) - pd.Timestamp(earlier)).total_seconds())


def decision_candidate(decision: Decision) -> Candidate:
    """The concrete action of a decision, as a rules/scorer candidate."""
    return Candidate(
        action=decision.action,
        execute_at=decision.execute_at,
        strategy=decision.strategy if decision.action == Action.RETRY else None,
        connector=decision.connector if decision.action == Action.RETRY else None,
        channel=decision.channel if decision.action == Action.RETARGET else None,
    )


# ----------------------------------------------------------------------------------------------------------
# Reward models from a scorer
# ----------------------------------------------------------------------------------------------------------


class _Scores(Protocol):
    def score(self, request: DecisionRequest, candidates: list[Candidate]) -> np.ndarray: ...


def candidate_cost_usd(request: DecisionRequest, candidate: Candidate, economics: Economics) -> float:
    """What carrying out a candidate costs in USD: a retry fee, a message, or nothing for stop."""
    if candidate.action == Action.RETRY:
        return economics.retry_cost(candidate.strategy)
    if candidate.action == Action.RETARGET and candidate.channel is not None:
        return economics.message_cost(candidate.channel, request.customer.country)
    return 0.0


def success_reward_model(scorer: _Scores) -> RewardModel:
    """Reward model for success rewards: the scorer's calibrated P(success); stop is worth 0."""

    def model(request: DecisionRequest, candidates: list[Candidate]) -> np.ndarray:
        p = np.asarray(scorer.score(request, candidates), dtype=np.float64)
        stops = np.array([c.action == Action.STOP for c in candidates], dtype=bool)
        return np.where(stops, 0.0, p)

    return model


def value_reward_model(scorer: _Scores, economics: Economics) -> RewardModel:
    """Reward model for value rewards: ``P(success) * amount_usd - cost``; stop is worth 0."""

    def model(request: DecisionRequest, candidates: list[Candidate]) -> np.ndarray:
        p = np.asarray(scorer.score(request, candidates), dtype=np.float64)
        amount = economics.order_value_usd(request.amount, request.currency)
        cost = np.array([candidate_cost_usd(request, c, economics) for c in candidates], dtype=np.float64)
        stops = np.array([c.action == Action.STOP for c in candidates], dtype=bool)
        return np.where(stops, 0.0, p * amount - cost)

    return model


#: The name (``dr@holdout``, ``q_logged@holdout``) of the reward model `crossfit_reward_model` fits on a holdout.
HOLDOUT_REWARD_MODEL = "holdout"
#: Folds of its cross-fitting (by order) and the pseudo-count each cell is shrunk to its parent cell with.
CROSSFIT_FOLDS = 5
CELL_PRIOR_STRENGTH = 10.0
#: Deals of the orders into folds it averages over: the deal is the evaluation seed's, and one deal moved the gate's
#: difference of two equal models by 0.013 USD a decision (SD over 6 deals, 5,000 points); the mean of 8 by 0.006
#: (README, "The promotion gate's noise"). Each costs a pass over the holdout's counts, no model fit.
CROSSFIT_REPEATS = 8


#: Bootstrap resamples of the holdout's orders its reward model is fitted again on (`fit_noise_models`): the spread of
#: the gate's difference across them is the reward model's fitting noise, which the paired standard error of the
#: points' terms does not see (it added about 20% to the variance of two equal models' difference; README, "Is the
#: standard error right?"). Each costs a valuation of every point's candidates, no decision.
FIT_NOISE_RESAMPLES = 8


def fit_noise_name(resample: int) -> str:
    """The name (``dr@holdout~3``) of the holdout reward model fitted on resample ``resample``."""
    return f"{HOLDOUT_REWARD_MODEL}~{resample}"


def is_fit_noise_estimator(estimator: str) -> bool:
    """Whether DR estimator ``estimator`` (``dr@name``) is under one of `fit_noise_models`: a noise gauge, not a
    value to report."""
    return estimator.startswith(f"dr@{HOLDOUT_REWARD_MODEL}~")


def fit_noise_models(
    points: pd.DataFrame,
    economics: Economics,
    *,
    reward: Literal["value", "success"] = "value",
    seed: int = 0,
    resamples: int = FIT_NOISE_RESAMPLES,
) -> dict[str, RewardModel]:
    """`crossfit_reward_model` of ``points`` fitted on ``resamples`` bootstrap resamples of their orders (one deal
    each), by `fit_noise_name`: the spread of an estimate across them is what fitting the reward model on this
    holdout rather than another of its size moves it by (the DR estimate's other noise, beside which points were
    drawn)."""
    generator = np.random.default_rng([seed, 1])
    seeds = generator.integers(0, 2**31 - 1, size=(resamples, 2))
    return {
        fit_noise_name(index): crossfit_reward_model(
            points, economics, reward=reward, seed=int(deal), repeats=1, resample=int(draw)
        )
        for index, (deal, draw) in enumerate(seeds)
    }


def _cells(action: Action, arm: str, connector: str, error_class: str, bucket: str) -> list[tuple[str, ...]]:
    """A candidate's cells, coarsest first: the error class, the action, its strategy or channel, then the retry's
    connector and the action's time (now, within a day, later)."""
    return [
        (error_class,),
        (error_class, action.value),
        (error_class, action.value, arm),
        (error_class, action.value, arm, connector, bucket),
    ]


def _time_bucket(delay_seconds: float) -> str:
    return "now" if delay_seconds < 3_600.0 else "day" if delay_seconds < 86_400.0 else "later"


def _candidate_cells(candidate: Candidate, event_time: datetime, error_class: str) -> list[tuple[str, ...]]:
    arm = candidate.strategy if candidate.action == Action.RETRY else candidate.channel
    return _cells(
        candidate.action,
        str(None if arm is None else getattr(arm, "value", arm)),
        str(candidate.connector) if candidate.action == Action.RETRY else "",
        error_class,
        _time_bucket(_seconds_between(candidate.execute_at, event_time)),
    )


def _point_key(merchant_id: object, order_id: object, event_time: object) -> tuple[str, str, int]:
    return (str(merchant_id), str(order_id), int(pd.Timestamp(event_time).value))  # type: ignore[arg-type]


def crossfit_reward_model(
    points: pd.DataFrame,
    economics: Economics,
    *,
    reward: Literal["value", "success"] = "value",
    folds: int = CROSSFIT_FOLDS,
    strength: float = CELL_PRIOR_STRENGTH,
    seed: int = 0,
    repeats: int = CROSSFIT_REPEATS,
    resample: int | None = None,
) -> RewardModel:
    """A reward model of a holdout's own outcomes, cross-fitted: no candidate model's, and no point valued by a fit
    that saw it.

    The orders of ``points`` (`logged_decisions` with ``error_class``) are dealt into ``folds`` folds (seeded); a
    request of a fold is valued by the success rates of the other folds' logged actions (stops have none), per cell
    of `_cells`, each shrunk to its parent by ``strength`` pseudo-points, the coarsest to the overall rate; the
    success rate is the mean over ``repeats`` such deals (the first is the deal of ``repeats=1``). Value:
    ``P(success) * amount_usd - cost`` (``success``: the probability); stop is worth 0. It is the promotion gate's
    common yardstick: each candidate's own reward model rates the actions that candidate chose too high (it chose them
    for it), and one candidate's reward model valuing the other lets a poor reward model decide the verdict. It is
    coarse (a cell, not a model of every feature): where the logged action is the candidate's, DR's weighted
    residual corrects it. Requests that are not among ``points`` are refused.

    ``resample`` (a seed) fits it on a bootstrap resample of the orders instead (drawn with replacement: an order's
    outcomes count as often as it was drawn), still valuing every point of ``points`` by the folds it is not in: the
    fit another holdout of the same size would have given, whose spread is the fit's share of the gate's noise
    (`fit_noise_models`).
    """
    missing = [c for c in ("merchant_id", "order_id", "event_time", "error_class", "label") if c not in points.columns]
    if missing:
        raise ValueError(f"a holdout reward model needs column(s) {', '.join(missing)} of the decision points")
    if folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {folds}")
    if repeats < 1:
        raise ValueError(f"cross-fitting needs at least 1 repeat, got {repeats}")
    orders = sorted({(str(m), str(o)) for m, o in zip(points["merchant_id"], points["order_id"], strict=True)})
    generator = np.random.default_rng(seed)
    deals = [generator.permutation(len(orders)) for _ in range(repeats)]
    # Per order: its fold in each deal, and how often its outcomes count (once; a resample's draws).
    folds_of = {order: [int(deal[i]) % folds for deal in deals] for i, order in enumerate(orders)}
    drawn = (
        np.ones(len(orders))
        if resample is None
        else np.bincount(np.random.default_rng(resample).integers(0, len(orders), len(orders)), minlength=len(orders))
    )
    counted = {order: float(drawn[i]) for i, order in enumerate(orders)}
    class_of = {
        _point_key(m, o, t): str(c)
        for m, o, t, c in zip(
            points["merchant_id"], points["order_id"], points["event_time"], points["error_class"], strict=True
        )
    }
    # Per deal and fold: cell -> [successes, tries] over the logged actions of the fold's points.
    counts: list[list[dict[tuple[str, ...], list[float]]]] = [[{} for _ in range(folds)] for _ in range(repeats)]
    for row in points[points["action"] != "stop"].to_dict("records"):
        record = {str(k): v for k, v in row.items()}
        if is_missing(record["label"]):
            continue
        request: DecisionRequest = record["request"]
        cells = _candidate_cells(logged_candidate(record), request.event_time, str(record["error_class"]))
        order = (str(record["merchant_id"]), str(record["order_id"]))
        times = counted[order]
        if not times:
            continue
        for deal, fold in enumerate(folds_of[order]):
            for cell in [(), *cells]:
                tally = counts[deal][fold].setdefault(cell, [0.0, 0.0])
                tally[0] += times * float(record["label"])
                tally[1] += times
    # What each fold's requests are valued by, per deal: the other folds' counts.
    fitted: list[list[dict[tuple[str, ...], list[float]]]] = []
    for by_fold in counts:
        fitted.append([])
        for fold in range(folds):
            merged: dict[tuple[str, ...], list[float]] = {}
            for other, table in enumerate(by_fold):
                if other == fold:
                    continue
                for cell, (won, tried) in table.items():
                    tally = merged.setdefault(cell, [0.0, 0.0])
                    tally[0] += won
                    tally[1] += tried
            fitted[-1].append(merged)

    def probability(table: dict[tuple[str, ...], list[float]], cells: list[tuple[str, ...]]) -> float:
        won, tried = table.get((), [0.0, 0.0])
        p = won / tried if tried else 0.0
        for cell in cells:
            won, tried = table.get(cell, [0.0, 0.0])
            p = (won + strength * p) / (tried + strength)
        return p

    def model(request: DecisionRequest, candidates: list[Candidate]) -> np.ndarray:
        key = _point_key(request.merchant_id, request.order_id, request.event_time)
        if key not in class_of:
            raise ValueError(
                f"the holdout reward model values the holdout's own decision points; {request.merchant_id}/"
                f"{request.order_id} at {request.event_time.isoformat()} is not one of them"
            )
        tables = [fitted[deal][fold] for deal, fold in enumerate(folds_of[key[:2]])]
        amount = economics.order_value_usd(request.amount, request.currency)
        values = []
        # A request's candidates share few cells (the times of one action fall in three buckets): each is rated once.
        rated: dict[tuple[str, ...], float] = {}
        for candidate in candidates:
            if candidate.action == Action.STOP:
                values.append(0.0)
                continue
            cells = _candidate_cells(candidate, request.event_time, class_of[key])
            p = rated.get(cells[-1])
            if p is None:
                p = rated[cells[-1]] = sum(probability(table, cells) for table in tables) / repeats
            values.append(p if reward == "success" else p * amount - candidate_cost_usd(request, candidate, economics))
        return np.asarray(values, dtype=np.float64)

    return model


# ----------------------------------------------------------------------------------------------------------
# Replay and the OPE table
# ----------------------------------------------------------------------------------------------------------

#: Columns `ope_table` and `replay` need in the logged decision frame (one row per logged decision point).
LOGGED_COLUMNS: tuple[str, ...] = (
    "request",  # DecisionRequest at the decision point
    "action",  # logged action: retry / retarget / stop
    "strategy",  # retry only
    "connector",  # retry only: target connector
    "channel",  # retarget only
    "execute_at",  # when the logged action was carried out (UTC)
    "propensity",  # logging policy's probability of the logged action
    "reward",  # observed reward of the logged action
)


def _check_logged(logged: pd.DataFrame) -> None:
    missing = [column for column in LOGGED_COLUMNS if column not in logged.columns]
    if missing:
        raise ValueError(f"logged decisions lack column(s) {', '.join(missing)}; need {', '.join(LOGGED_COLUMNS)}")


def _none_if_missing(value: object) -> str | None:
    return None if is_missing(value) else str(value)


def logged_candidate(row: Mapping[str, Any]) -> Candidate:
    """The logged action of one decision-point row as a candidate."""
    request: DecisionRequest = row["request"]
    action = Action(str(row["action"]))
    execute_at = row["execute_at"]
    if execute_at is None or pd.isna(execute_at):
        execute_at = request.event_time
    when = floor_us(pd.Timestamp(execute_at))
    when = when.tz_localize("UTC") if when.tzinfo is None else when.tz_convert("UTC")
    strategy = _none_if_missing(row["strategy"]) if action == Action.RETRY else None
    channel = _none_if_missing(row["channel"]) if action == Action.RETARGET else None
    return Candidate(
        action=action,
        execute_at=when.to_pydatetime(),
        strategy=None if strategy is None else Strategy(strategy),
        connector=_none_if_missing(row["connector"]) if action == Action.RETRY else None,
        channel=None if channel is None else Channel(channel),
    )


@runtime_checkable
class _WithProbabilities(Protocol):
    """A policy that tells its probability of each action (`model.policy.DecidePolicy`), besides deciding."""

    def action_probabilities(self, request: DecisionRequest) -> tuple[Decision, tuple[tuple[Candidate, float], ...]]:
        """The decision, and (action, probability) of every action the policy may take here."""
        ...


def _decisions(
    policy: Policy, request: DecisionRequest, replays: int
) -> tuple[Decision, tuple[tuple[Candidate, float], ...]]:
    """A policy's first decision at ``request`` and the probability it takes each action there: its own when it tells
    them (`_WithProbabilities`), else each action's share of ``replays`` draws."""
    if isinstance(policy, _WithProbabilities):
        return policy.action_probabilities(request)
    decisions = [policy(request) for _ in range(replays)]
    shares: dict[Candidate, float] = {}
    for decision in decisions:
        action = decision_candidate(decision)
        shares[action] = shares.get(action, 0.0) + 1.0 / replays
    return decisions[0], tuple(shares.items())


def replay(
    logged: pd.DataFrame,
    policies: Mapping[str, Policy],
    reward_model: RewardModel | None = None,
    *,
    replays: int = 1,
    other_reward_models: Mapping[str, RewardModel] | None = None,
) -> pd.DataFrame:
    """Run each policy at every logged decision point.

    One row per (point, policy): ``point`` (position in ``logged``), ``policy``, ``target_prob`` (the policy's
    probability of the logged action, `same_candidate`), ``q_logged`` (the reward model's value of the logged
    action) and ``v_target`` (its value of the policy's action, expected over the policy's probabilities), NaN
    without a reward model; the first decision's ``action`` / ``strategy`` / ``connector`` / ``channel`` /
    ``retry_probability`` / ``expected_success`` / ``propensity``, and ``seconds`` spent deciding. Each of
    ``other_reward_models`` (name -> model) adds its own pair, ``q_logged@name`` and ``v_target@name``
    (`reward_model_columns`): a DR estimate per reward model (`ope_from_replay`), since a model's reward model
    favours the actions that model itself would choose.

    A policy that tells its probability of each action (``action_probabilities``, as `model.policy.DecidePolicy`:
    the one decide(), its exploration's distribution) is valued by them exactly. Any other is valued by ``replays``
    draws: the share of draws that are the logged action, an unbiased estimate of pi(logged action | context) (not
    the policy's reported propensity when it matches, which would estimate pi squared), and their mean value. One
    draw of an exploring policy was the gate's noise: at an explored point it valued a random action, and it matched
    a logged action (weight up to the clip) or missed it by chance.
    """
    _check_logged(logged)
    if replays < 1:
        raise ValueError(f"replays must be >= 1, got {replays}")
    # Column suffix -> reward model: "" is the main one (NaN columns without it), "@name" each other.
    models: dict[str, RewardModel | None] = {"": reward_model}
    models |= {f"@{name}": model for name, model in (other_reward_models or {}).items()}
    rows: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = [{str(k): v for k, v in r.items()} for r in logged.to_dict("records")]
    for position, record in enumerate(records):
        request: DecisionRequest = record["request"]
        logged_action = logged_candidate(record)
        decided: dict[str, tuple[Decision, tuple[tuple[Candidate, float], ...], float]] = {}
        for name, policy in policies.items():
            started = time.perf_counter()
            first, chances = _decisions(policy, request, replays)
            calls = 1 if isinstance(policy, _WithProbabilities) else replays
            decided[name] = (first, chances, (time.perf_counter() - started) / calls)
        # Every action any policy may take here and the logged one, valued once per reward model.
        actions = list(dict.fromkeys([logged_action, *(a for _, chances, _ in decided.values() for a, _ in chances)]))
        values = {suffix: _values(model, request, actions) for suffix, model in models.items()}
        for name, (first, chances, elapsed) in decided.items():
            rows.append(
                {
                    "point": position,
                    "policy": name,
                    "target_prob": sum(p for action, p in chances if same_candidate(action, logged_action)),
                    **{f"q_logged{suffix}": valued[logged_action] for suffix, valued in values.items()},
                    **{
                        f"v_target{suffix}": sum(p * valued[action] for action, p in chances)
                        for suffix, valued in values.items()
                    },
                    "action": first.action.value,
                    "strategy": None if first.strategy is None else first.strategy.value,
                    "connector": first.connector,
                    "channel": None if first.channel is None else first.channel.value,
                    "retry_probability": first.retry_probability,
                    "expected_success": first.expected_success,
                    "propensity": first.propensity,
                    "seconds": elapsed,
                }
            )
    # With no point (a history without logged propensities has nothing to weigh), the columns still say what a
    # replay holds, so the estimators and tables that read them find no row rather than no column.
    columns = ["point", "policy", "target_prob"]
    columns += [f"{kind}{suffix}" for kind in ("q_logged", "v_target") for suffix in models]
    columns += ["action", "strategy", "connector", "channel", "retry_probability", "expected_success"]
    return pd.DataFrame(rows, columns=[*columns, "propensity", "seconds"])


def _values(model: RewardModel | None, request: DecisionRequest, actions: list[Candidate]) -> dict[Candidate, float]:
    """What ``model`` expects of each of ``actions`` (NaN without a model)."""
    if model is None:
        return dict.fromkeys(actions, float("nan"))
    return dict(zip(actions, np.asarray(model(request, actions), dtype=np.float64).tolist(), strict=True))


def reward_model_columns(replayed: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """DR estimator name -> its (``q_logged``, ``v_target``) columns in a `replay` frame: ``dr`` for the main
    reward model, ``dr@name`` for each of its ``other_reward_models``."""
    found = {"dr": ("q_logged", "v_target")} if {"q_logged", "v_target"} <= set(replayed.columns) else {}
    for column in replayed.columns:
        if str(column).startswith("q_logged@"):
            suffix = str(column).removeprefix("q_logged")
            if f"v_target{suffix}" in replayed.columns:
                found[f"dr{suffix}"] = (str(column), f"v_target{suffix}")
    return found


OPE_COLUMNS: tuple[str, ...] = (
    "policy",
    "estimator",
    "value",
    "ci_low",
    "ci_high",
    "n",
    "ess",
    "matched_share",
    "clipped_share",
)


def ope_from_replay(
    logged: pd.DataFrame,
    replayed: pd.DataFrame,
    *,
    max_weight: float | None = DEFAULT_MAX_WEIGHT,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """IPS, SNIPS and (when the replay has reward-model columns) DR per policy, plus the logging policy's
    on-policy average reward as the reference row ``logged`` / ``on_policy``. DR is ``dr`` with the replay's main
    reward model and ``dr@name`` with each of its other ones (`reward_model_columns`)."""
    rewards = logged["reward"].to_numpy(dtype=np.float64)
    propensity = logged["propensity"].to_numpy(dtype=np.float64)
    mean = float(rewards.mean()) if rewards.size else float("nan")
    ci = _bootstrap(lambda idx: rewards[idx].mean(axis=1), rewards.size, n_bootstrap, seed, confidence)
    rows: list[dict[str, Any]] = [
        {
            "policy": "logged",
            "estimator": "on_policy",
            "value": mean,
            "ci_low": ci[0],
            "ci_high": ci[1],
            "n": int(rewards.size),
            "ess": float(rewards.size),
            "matched_share": 1.0,
            "clipped_share": 0.0,
        }
    ]
    options: dict[str, Any] = {
        "max_weight": max_weight,
        "n_bootstrap": n_bootstrap,
        "confidence": confidence,
        "seed": seed,
    }
    for name, part in replayed.groupby("policy", sort=False):
        part = part.sort_values("point")
        target = part["target_prob"].to_numpy(dtype=np.float64)
        estimates = [
            ips(rewards, propensity, target, **options),
            snips(rewards, propensity, target, **options, known_zero=(part["action"] == "stop").to_numpy()),
        ]
        for estimator, (q_column, v_column) in reward_model_columns(part).items():
            q = part[q_column].to_numpy(dtype=np.float64)
            v = part[v_column].to_numpy(dtype=np.float64)
            if q.size and not (np.isnan(q).any() or np.isnan(v).any()):
                estimates.append(
                    replace(doubly_robust(rewards, propensity, target, q, v, **options), estimator=estimator)
                )
        for estimate in estimates:
            rows.append(
                {
                    "policy": str(name),
                    "estimator": estimate.estimator,
                    "value": estimate.value,
                    "ci_low": estimate.ci_low,
                    "ci_high": estimate.ci_high,
                    "n": estimate.n,
                    "ess": estimate.ess,
                    "matched_share": estimate.matched_share,
                    "clipped_share": estimate.clipped_share,
                }
            )
    return pd.DataFrame(rows, columns=list(OPE_COLUMNS))


def ope_table(
    logged: pd.DataFrame,
    policies: Mapping[str, Policy],
    reward_model: RewardModel | None = None,
    *,
    max_weight: float | None = DEFAULT_MAX_WEIGHT,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    confidence: float = 0.95,
    seed: int = 0,
    replays: int = 1,
) -> pd.DataFrame:
    """Off-policy value of each policy on logged decisions: IPS, SNIPS and DR (with a reward model), each
    with a bootstrap CI, effective sample size and match/clip shares. ``logged`` has `LOGGED_COLUMNS`."""
    replayed = replay(logged, policies, reward_model, replays=replays)
    return ope_from_replay(
        logged, replayed, max_weight=max_weight, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed
    )


# ----------------------------------------------------------------------------------------------------------
# Online episodes in the simulator
# ----------------------------------------------------------------------------------------------------------

EPISODE_COLUMNS: tuple[str, ...] = (
    "policy",
    "orders",
    "recovered_orders",
    "recovery_rate",
    "recovered_gmv_usd",
    "retry_fees_usd",
    "message_costs_usd",
    "net_value_usd",
    "nudges_sent",
    "silent_retries",
    "rule_violations",
    "decisions",
    "decisions_per_second",
)

EpisodeRunner = Callable[[Any, Policy, int, int], Any]


def _field(result: Any, *names: str) -> float:
    for name in names:
        value = getattr(result, name, None)
        if value is not None:
            return float(value)
    raise AttributeError(f"episode result {type(result).__name__} has none of the fields {', '.join(names)}")


def episode_table(
    world: Any,
    policies: Mapping[str, Policy],
    n_orders: int,
    seed: int,
    *,
    runner: EpisodeRunner | None = None,
) -> pd.DataFrame:
    """Run every policy for ``n_orders`` simulated orders with the same seed (common random numbers) and
    line up the outcomes. ``runner`` defaults to `model.simulation.run_episodes`."""
    if runner is None:
        from model.simulation import run_episodes  # type: ignore[attr-defined]  # lands with the simulator

        runner = run_episodes
    rows: list[dict[str, Any]] = []
    for name, policy in policies.items():
        started = time.perf_counter()
        result = runner(world, policy, n_orders, seed)
        elapsed = time.perf_counter() - started
        orders = _field(result, "orders", "n_orders")
        recovered = _field(result, "recovered_orders", "recovered")
        decisions = _field(result, "decisions", "n_decisions")
        rows.append(
            {
                "policy": name,
                "orders": int(orders),
                "recovered_orders": int(recovered),
                "recovery_rate": recovered / orders if orders else float("nan"),
                "recovered_gmv_usd": _field(result, "recovered_gmv_usd"),
                "retry_fees_usd": _field(result, "retry_fees_usd"),
                "message_costs_usd": _field(result, "message_costs_usd"),
                "net_value_usd": _field(result, "net_value_usd"),
                "nudges_sent": int(_field(result, "nudges_sent", "nudges")),
                "silent_retries": int(_field(result, "silent_retries", "retries")),
                "rule_violations": int(_field(result, "rule_violations")),
                "decisions": int(decisions),
                "decisions_per_second": decisions / elapsed if elapsed > 0 else float("nan"),
            }
        )
    return pd.DataFrame(rows, columns=list(EPISODE_COLUMNS))


def retryability_by_class(
    error_class: ArrayLike | Sequence[str],
    predicted_retry_probability: ArrayLike,
    retry_label: ArrayLike,
    is_retry: ArrayLike | Sequence[bool],
) -> pd.DataFrame:
    """Per error class: mean predicted retry probability over all decision points, and the observed success
    rate of the logged silent retries (NaN where none was logged). Sorted by predicted, highest first."""
    frame = pd.DataFrame(
        {
            "error_class": pd.Series(np.asarray(error_class, dtype=object)).fillna("<missing>").astype(str),
            "predicted": _as_float(predicted_retry_probability, "predicted_retry_probability"),
            "label": np.asarray(retry_label, dtype=np.float64).reshape(-1),
            "is_retry": np.asarray(is_retry, dtype=bool).reshape(-1),
        }
    )
    grouped = frame.groupby("error_class")
    retries = frame[frame["is_retry"]].groupby("error_class")["label"]
    table = pd.DataFrame(
        {
            "points": grouped.size(),
            "mean_predicted_retry_probability": grouped["predicted"].mean(),
            "logged_retries": retries.size(),
            "observed_retry_success": retries.mean(),
        }
    )
    table["logged_retries"] = table["logged_retries"].fillna(0).astype(np.int64)
    return table.sort_values("mean_predicted_retry_probability", ascending=False)


# ----------------------------------------------------------------------------------------------------------
# Logged decision points rebuilt from the history files
# ----------------------------------------------------------------------------------------------------------


_ZERO = pd.Timedelta(0)


def _ts(value: Any) -> pd.Timestamp:
    # Hot path (called for every timestamp of a history): a UTC timestamp to the microsecond is used as is.
    if (
        isinstance(value, pd.Timestamp)
        and value.tzinfo is not None
        and not value.nanosecond
        and value.utcoffset() == _ZERO
    ):
        return value
    # Python datetimes hold microseconds: drop nanoseconds here rather than warn at every conversion.
    stamp = floor_us(pd.Timestamp(value))
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def _float_or_nan(value: Any) -> float:
    return float("nan") if value is None or pd.isna(value) else float(value)


def _request_at(
    event_time: pd.Timestamp,
    failure: dict[str, Any],
    attempts: list[dict[str, Any]],
    nudges: list[dict[str, Any]],
    action_nudge: dict[str, Any] | None,
) -> DecisionRequest:
    """The decision request a caller would have sent at ``event_time``: the attempts up to ``failure`` and the
    nudges (oldest first) sent by then, short of ``action_nudge``, the one this decision sent (as training's
    `model.training.decision_points` counts them): a nudge sent the instant its failure came in answers it."""
    seen_attempts = [a for a in attempts if a["attempt_number"] <= failure["attempt_number"]]
    seen_nudges = []
    for nudge in nudges:
        if nudge is action_nudge or _ts(nudge["sent_at"]) > event_time:
            break
        seen_nudges.append(nudge)
    return history_request(event_time, failure, seen_attempts, seen_nudges)


#: Sorts a nudge after every attempt of the same instant.
_NUDGE_AFTER_ATTEMPTS = 2**62


def _order_points(
    attempts: list[dict[str, Any]],
    nudges: list[dict[str, Any]],
    follow_up: pd.Timedelta,
    stops: list[dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Decision points of one order (attempts sorted by number, nudges by time) with their logged action, and why
    each of the order's ``stops`` rows matches none of them (`_apply_stops`)."""
    from model.vocab import RETRY_STRATEGIES, Strategy

    retry_values = {s.value for s in RETRY_STRATEGIES}
    success_at = min(
        (_ts(a["created_at"]) for a in attempts if a["status"] == "success" and a["attempt_number"] > 1),
        default=None,
    )
    paid_nudges = {
        str(a["nudge_id"])
        for a in attempts
        if a["status"] == "success" and a["strategy"] == Strategy.RETARGET_LINK and a["nudge_id"] is not None
    }
    # Winback's own actions (silent retries and nudges), in time order: what a decision point led to.
    actions: list[tuple[pd.Timestamp, int, dict[str, Any], str]] = [
        (_ts(a["created_at"]), int(a["attempt_number"]), a, "retry")
        for a in attempts
        if str(a["strategy"]) in retry_values
    ]
    # A nudge sent the instant an attempt failed answers that failure: it comes after the attempt (training's
    # decision points credit the attempt to the failure before it, and the nudge to the attempt's own).
    actions += [(_ts(n["sent_at"]), _NUDGE_AFTER_ATTEMPTS, n, "retarget") for n in nudges]
    actions.sort(key=lambda item: (item[0], item[1]))

    # (time, failure row, minimum attempt number of the next action, kind)
    moments: list[tuple[pd.Timestamp, dict[str, Any], int, str]] = []
    failures = [a for a in attempts if a["status"] != "success"]
    for a in failures:
        moments.append((_ts(a["created_at"]), a, int(a["attempt_number"]) + 1, "failure"))
    for n in nudges:
        due = _ts(n["sent_at"]) + follow_up
        # Something already happened between the nudge and its follow-up time: no follow-up decision then. A click
        # alone is not something: opening a link does not cancel the follow-up (executor, simulator, training).
        busy = any(_ts(n["sent_at"]) < when < due for when, _, _, _ in actions) or any(
            _ts(n["sent_at"]) < _ts(a["created_at"]) < due for a in attempts
        )
        last_failure = [a for a in failures if _ts(a["created_at"]) <= due]
        if not busy and last_failure:
            moments.append((due, last_failure[-1], 0, "follow_up"))
    points: list[dict[str, Any]] = []
    for when, failure, min_number, kind in sorted(moments, key=lambda m: m[0]):
        if success_at is not None and when >= success_at:
            continue
        nxt = next(
            (
                item
                for item in actions
                # A message sent the instant its failure came in answers it (as in training's decision points).
                if (item[0] > when or (item[0] == when and (kind == "follow_up" or item[3] == "retarget")))
                and (item[3] == "retarget" or item[1] >= min_number)
            ),
            None,
        )
        if nxt is not None and success_at is not None and nxt[0] > success_at:
            nxt = None
        row: dict[str, Any] = {"event_time": when, "failure": failure, "kind": kind, "logged_stop": False}
        row["action_nudge"] = nxt[2] if nxt is not None and nxt[3] == "retarget" else None
        if nxt is None:
            row.update(action="stop", strategy=None, connector=None, channel=None, execute_at=when)
            row.update(propensity=float("nan"), label=0.0)
        elif nxt[3] == "retry":
            attempt = nxt[2]
            row.update(
                action="retry",
                strategy=str(attempt["strategy"]),
                connector=str(attempt["connector"]),
                channel=None,
                execute_at=nxt[0],
                propensity=_float_or_nan(attempt["propensity"]),
                label=float(attempt["status"] == "success"),
            )
        else:
            nudge = nxt[2]
            row.update(
                action="retarget",
                strategy=None,
                connector=None,
                channel=str(nudge["channel"]),
                execute_at=nxt[0],
                propensity=_float_or_nan(nudge["propensity"]),
                label=float(str(nudge["nudge_id"]) in paid_nudges),
            )
        points.append(row)
    return points, _apply_stops(points, stops or [])


def _apply_stops(points: list[dict[str, Any]], stops: list[dict[str, Any]]) -> list[str]:
    """Set the logged action of the points the order's recorded stops were decided at; returns why each stop that
    matches no point does not.

    A stop (a row of the stops file) belongs to the latest point at or before its ``decided_at`` that answers the
    same failed attempt (``attempt_number``): the simulator decides at the point's own time, the executor a little
    later. That point's logged action becomes ``stop`` with the stop's propensity (null for a stop that was not a
    policy's choice, e.g. an agent's reject) and reward 0: a stop neither costs nor recovers anything itself (a
    customer who pays later through a link sent earlier is that nudge's reward). A point whose reconstructed action
    was carried out before the stop was decided is not the stop's (the stop answered a later point the files do
    not show): such a stop matches none, and is counted rather than guessed at.
    """
    unmatched: list[str] = []
    for stop in sorted(stops, key=lambda row: _ts(row["decided_at"])):
        decided = _ts(stop["decided_at"])
        number = int(stop["attempt_number"])
        candidates = [p for p in points if int(p["failure"]["attempt_number"]) == number and p["event_time"] <= decided]
        if not candidates:
            unmatched.append(f"no decision point after attempt {number} at or before {decided.isoformat()}")
            continue
        point = candidates[-1]
        if not point["logged_stop"] and point["action"] != "stop" and _ts(point["execute_at"]) <= decided:
            unmatched.append(
                f"the decision point at {point['event_time'].isoformat()} led to a {point['action']} at "
                f"{_ts(point['execute_at']).isoformat()}, before the stop was decided at {decided.isoformat()}"
            )
            continue
        # Of two stops at one point (decided again), the later one is what the order did.
        point.update(action="stop", strategy=None, connector=None, channel=None, execute_at=point["event_time"])
        point.update(propensity=_float_or_nan(stop["propensity"]), label=0.0, logged_stop=True)
    return unmatched


def orders_active_since(
    attempts: pd.DataFrame, nudges: pd.DataFrame, cut: pd.Timestamp, follow_up: pd.Timedelta
) -> set[str]:
    """Orders that can have a decision point at or after ``cut``: their last attempt, or their last nudge's
    follow-up time, is not before it (the others end before the cut). Needs only ``order_id``,
    ``created_at`` and ``sent_at``."""
    last = attempts.groupby("order_id", sort=False)["created_at"].max()
    if len(nudges):
        last_nudge = nudges.groupby("order_id", sort=False)["sent_at"].max() + follow_up
        last = pd.concat([last, last_nudge]).groupby(level=0).max()
    return set(last.index[last >= cut].astype(str))


def logged_decisions(
    attempts: pd.DataFrame,
    nudges: pd.DataFrame,
    economics: Economics,
    *,
    catalog: Normaliser | None = None,
    reward: Literal["value", "success"] = "value",
    follow_up_hours: float | None = None,
    since: datetime | pd.Timestamp | None = None,
    max_orders: int | None = None,
    seed: int = 0,
    stops: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Every logged decision point of a history, with the request a caller would have sent and what followed.

    Decision points: each failed attempt of an order whose first attempt failed, and each nudge's follow-up
    ``follow_up_hours`` after it (default ``NUDGE_FOLLOW_UP_HOURS``) when nothing else happened meanwhile (a click
    without a payment attempt does not count: the executor follows up on it); none after the order's recovery.
    The logged action is winback's next action (a silent retry or a nudge; a customer's own payment through a
    link is not an action), or ``stop`` when none followed. ``label`` is
    whether that action succeeded (the retry's attempt, or a payment through that nudge's link); ``reward``
    follows `reward_values`.

    A logged ``stop`` leaves no attempt or nudge: ``stops`` (the history's stops file, `model.history.StopsSchema`)
    gives the points where the logging policy stopped their propensity (`_apply_stops`; column ``logged_stop``).
    Without it, and at a point where nothing followed and no stop was recorded (the history ends before the next
    action, or the order's last decision was never carried out), the action is ``stop`` with a NaN propensity:
    the off-policy estimators cannot use such a point. ``frame.attrs["unmatched_stops"]`` lists the stops that
    match no decision point (``merchant/order: why``).

    With ``since``, only the decision points at or after it are built (a holdout), and orders that end before
    it are skipped without building anything. ``max_orders`` builds the points of a seeded random sample of at
    most that many (remaining) orders, which bounds the cost on million-order histories.

    Columns: `LOGGED_COLUMNS` plus ``merchant_id``, ``order_id``, ``event_time``, ``kind`` (failure /
    follow_up), ``logged_stop``, ``label``, ``amount_usd``, ``cost_usd``, ``error_code`` and, with a catalog,
    ``error_class``.
    """
    from model.vocab import NUDGE_FOLLOW_UP_HOURS

    follow_up = pd.Timedelta(hours=NUDGE_FOLLOW_UP_HOURS if follow_up_hours is None else follow_up_hours)
    cut = None if since is None else _ts(since)
    if cut is not None:
        keep = orders_active_since(attempts, nudges, cut, follow_up)
        attempts = attempts[attempts["order_id"].astype(str).isin(keep)]
        nudges = nudges[nudges["order_id"].astype(str).isin(keep)]
    if max_orders is not None:
        order_ids = attempts["order_id"].astype(str).drop_duplicates()
        if len(order_ids) > max_orders:
            keep = set(order_ids.sample(n=max_orders, random_state=seed))
            attempts = attempts[attempts["order_id"].astype(str).isin(keep)]
            nudges = nudges[nudges["order_id"].astype(str).isin(keep)]
    stops_by_order: dict[str, list[dict[str, Any]]] = {}
    if stops is not None and len(stops):
        known = set(attempts["order_id"].astype(str))
        for record in stops[stops["order_id"].astype(str).isin(known)].to_dict("records"):
            stops_by_order.setdefault(str(record["order_id"]), []).append({str(k): v for k, v in record.items()})
    unmatched: list[str] = []
    nudges_by_order: dict[str, list[dict[str, Any]]] = {}
    # Oldest first, ties in nudge_id order (as training's decision points count them).
    for record in nudges.sort_values(["sent_at", "nudge_id"], kind="mergesort").to_dict("records"):
        nudges_by_order.setdefault(str(record["order_id"]), []).append({str(k): v for k, v in record.items()})
    attempts_by_order: dict[str, list[dict[str, Any]]] = {}
    ordered = attempts.sort_values(["order_id", "attempt_number"], kind="stable")
    for record in ordered.to_dict("records"):
        attempts_by_order.setdefault(str(record["order_id"]), []).append({str(k): v for k, v in record.items()})
    rows: list[dict[str, Any]] = []
    for order_id, order_attempts in attempts_by_order.items():
        if order_attempts[0]["status"] == "success":
            continue
        order_nudges = nudges_by_order.get(order_id, [])
        points, missed = _order_points(order_attempts, order_nudges, follow_up, stops_by_order.get(order_id))
        merchant = str(order_attempts[0]["merchant_id"])
        unmatched.extend(f"{merchant}/{order_id}: {why}" for why in missed)
        for point in points:
            if cut is not None and point["event_time"] < cut:
                continue
            failure = point.pop("failure")
            action_nudge = point.pop("action_nudge")
            request = _request_at(point["event_time"], failure, order_attempts, order_nudges, action_nudge)
            point["request"] = request
            point["merchant_id"] = request.merchant_id
            point["order_id"] = request.order_id
            point["error_code"] = request.failure.error_code
            point["amount_usd"] = economics.order_value_usd(request.amount, request.currency)
            point["cost_usd"] = candidate_cost_usd(request, logged_candidate(point), economics)
            if catalog is not None:
                point["error_class"] = str(normalise_request(catalog, request).error_class)
            rows.append(point)
    columns = [
        "merchant_id",
        "order_id",
        "event_time",
        "kind",
        *LOGGED_COLUMNS,
        "logged_stop",
        "label",
        "amount_usd",
        "cost_usd",
        "error_code",
    ] + (["error_class"] if catalog is not None else [])
    frame = pd.DataFrame(rows, columns=[c for c in columns if c != "reward"])
    frame["reward"] = reward_values(
        frame["label"].to_numpy(dtype=np.float64),
        frame["amount_usd"].to_numpy(dtype=np.float64),
        frame["cost_usd"].to_numpy(dtype=np.float64),
        kind=reward,
    )
    frame["event_time"] = pd.to_datetime(frame["event_time"], utc=True)
    frame["execute_at"] = pd.to_datetime(frame["execute_at"], utc=True)
    frame["logged_stop"] = frame["logged_stop"].astype(bool)
    result = frame[columns].sort_values("event_time", kind="stable").reset_index(drop=True)
    result.attrs["unmatched_stops"] = unmatched
    return result
