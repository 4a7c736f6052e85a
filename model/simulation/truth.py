"""The true value of a policy at logged decision points of a simulated history: what the off-policy estimates estimate.

The evaluation's IPS/SNIPS/DR (``model.evaluation``) estimate, over a set of logged decision points, the mean
one-step reward of the action a target policy would take there: the order's amount in USD when that action
recovers it (the retry's attempt succeeds, or the customer pays through that message's link), less the action's
cost, and 0 for a stop. On a history the simulator wrote, that quantity is known: replay each order with the
logging policy that wrote it up to the decision point (the world, the order and the logging policy's draws are
pure functions of their seeds, so the replay reaches the very state the history shows, hidden cause included),
carry out the target policy's action there ``draws`` times with fresh draws of the outcome, and average.

The target policy decides on the request the evaluation rebuilds from the history (the ``request`` column of
``model.evaluation.logged_decisions``), so its decisions are those the OPE replays; only the outcome comes from
the world. The estimators' error against these values is then their own: bias (e.g. points left out) and noise.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from model.baselines import Policy, RuleBook
from model.evaluation import candidate_cost_usd, decision_candidate
from model.money import Economics
from model.requests import DecisionRequest
from model.simulation.episodes import MAX_DECISIONS, _Episode
from model.simulation.generate import DEFAULT_EPSILON
from model.simulation.logging_policy import EpsilonGreedyLoggingPolicy
from model.simulation.world import World, mix_seed
from model.vocab import Action

__all__ = ["PointNotReachedError", "true_point_values"]


class PointNotReachedError(LookupError):
    """Replaying an order with the logging policy did not reach a decision point of the history."""


def _order_index(order_id: str) -> int:
    """The world's index of an order id ``ord_<seed>_<index>``."""
    return int(order_id.rsplit("_", 1)[1])


def _same_time(a: datetime, b: datetime) -> bool:
    return abs((pd.Timestamp(a) - pd.Timestamp(b)).total_seconds()) < 1e-6


def _state_at(world: World, logging: EpsilonGreedyLoggingPolicy, order_id: str, when: datetime) -> _Episode:
    """The order's episode at its decision point ``when``, replayed with the logging policy (as ``_Episode.play``)."""
    from datetime import timedelta

    order = world.order(_order_index(order_id))
    if order.order_id != order_id:
        raise PointNotReachedError(f"{order_id} is not an order of the world of seed {world.seed}")
    episode = _Episode(world, order, None)
    window_end = order.first_failure_at + timedelta(days=order.merchant.config.retarget.retry_window_days)
    event_time = order.first_failure_at
    for _ in range(MAX_DECISIONS):
        if event_time > window_end or pd.Timestamp(event_time) > pd.Timestamp(when) + pd.Timedelta(microseconds=1):
            break
        if _same_time(event_time, when):
            return episode
        decision = logging(episode.request(event_time))
        execute_at = max(decision.execute_at, event_time)
        if decision.action == Action.STOP or execute_at > window_end:
            break
        next_time = episode.act(decision, execute_at)
        if next_time is None:
            break
        event_time = next_time
    raise PointNotReachedError(f"replaying {order_id} with the logging policy does not reach {when}")


def _branch(episode: _Episode, seed: int) -> _Episode:
    """A copy of ``episode`` that can act without changing it, with its own outcome draws."""
    twin = copy.copy(episode)
    twin.rng = random.Random(seed)
    twin.attempts = list(episode.attempts)
    twin.nudges = list(episode.nudges)
    twin.opted_out = list(episode.opted_out)
    return twin


def _recovered_by(episode: _Episode, request: DecisionRequest, decision: Any, window_end: datetime) -> bool:
    """Carry out ``decision`` in ``episode`` (a branch); whether that action itself recovered the order."""
    execute_at = max(decision.execute_at, request.event_time)
    if decision.action == Action.STOP or execute_at > window_end:
        return False
    episode.act(decision, execute_at)
    return episode.recovered_at is not None


def true_point_values(
    world: World,
    points: pd.DataFrame,
    policies: Mapping[str, Policy],
    economics: Economics,
    *,
    history_seed: int,
    epsilon: float = DEFAULT_EPSILON,
    draws: int = 32,
) -> pd.DataFrame:
    """Per decision point and policy: the policy's action there and its true expected one-step reward (USD).

    ``world`` is the world the history was simulated in (``World(seed, expected_orders=orders)`` as
    ``model.simulation.generate`` builds it), ``points`` rows of ``model.evaluation.logged_decisions`` of that
    history (``order_id``, ``event_time``, ``request``), ``history_seed``/``epsilon`` the logging policy's.
    Columns: ``point`` (position in ``points``), ``policy``, ``action``, ``true_value`` (mean reward over ``draws``
    outcome draws; exact 0 for a stop or an action past the order's window), ``true_success`` (its P(recovery)).
    """
    from datetime import timedelta

    logging = EpsilonGreedyLoggingPolicy(RuleBook(world.configs, world.catalog), epsilon=epsilon, seed=history_seed)
    rows: list[dict[str, Any]] = []
    for position, (order_id, request) in enumerate(zip(points["order_id"], points["request"], strict=True)):
        assert isinstance(request, DecisionRequest)
        state = _state_at(world, logging, str(order_id), request.event_time)
        order = state.order
        window_end = order.first_failure_at + timedelta(days=order.merchant.config.retarget.retry_window_days)
        amount = economics.order_value_usd(request.amount, request.currency)
        for name, policy in policies.items():
            decision = policy(request)
            cost = candidate_cost_usd(request, decision_candidate(decision), economics)
            if decision.action == Action.STOP:
                successes = 0.0
            else:
                successes = float(
                    np.mean(
                        [
                            _recovered_by(
                                _branch(state, mix_seed("truth", order.order_id, position, draw)),
                                request,
                                decision,
                                window_end,
                            )
                            for draw in range(draws)
                        ]
                    )
                )
            executed = decision.action != Action.STOP and max(decision.execute_at, request.event_time) <= window_end
            rows.append(
                {
                    "point": position,
                    "policy": name,
                    "action": decision.action.value,
                    "true_success": successes,
                    "true_value": successes * amount - (cost if executed else 0.0),
                }
            )
    return pd.DataFrame(rows, columns=["point", "policy", "action", "true_success", "true_value"])
