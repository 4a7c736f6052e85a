"""The logging policy that generated the simulated history: the static rule with epsilon exploration.

With probability ``1 - epsilon`` it does what ``StaticRetryThenRetargetPolicy`` does; with probability
``epsilon`` it explores: uniformly over groups of permitted candidates (same action, strategy, connector and
channel), then uniformly over the times within the group. Every permitted (action, strategy/channel, delay) is
therefore tried now and then, and the exact probability of the chosen candidate is recorded as ``propensity``:

    propensity(c) = (1 - epsilon) * [c is the rule's choice] + epsilon / n_groups / n_times_in_group(c)

Its randomness is a pure function of (seed, order, decision point), so histories do not depend on chunking.
"""

from __future__ import annotations

import random

from model.baselines import RuleBook, StaticRetryThenRetargetPolicy, make_decision
from model.requests import Decision, DecisionRequest
from model.rules import Candidate, RuleContext, check
from model.simulation.world import mix_seed
from model.vocab import Action, Channel, Strategy

GroupKey = tuple[Action, Strategy | None, str | None, Channel | None]


def group_key(candidate: Candidate) -> GroupKey:
    """The exploration group of a candidate: everything but its time."""
    return (candidate.action, candidate.strategy, candidate.connector, candidate.channel)


class EpsilonGreedyLoggingPolicy:
    """``StaticRetryThenRetargetPolicy`` with epsilon exploration over the permitted candidates."""

    def __init__(self, rulebook: RuleBook, epsilon: float = 0.15, seed: int = 0) -> None:
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
        self.rulebook = rulebook
        self.base = StaticRetryThenRetargetPolicy(rulebook=rulebook)
        self.epsilon = epsilon
        self.seed = seed
        self.model_version = f"logging-static-retarget-eps{epsilon:g}"

    def __call__(self, request: DecisionRequest) -> Decision:
        context, rule_choice, retryable, reasons = self.base.choose(request)
        _, candidates = self.rulebook.candidates(request)
        groups: dict[GroupKey, list[Candidate]] = {}
        for c in candidates:
            key = (c.action, c.strategy, c.connector, c.channel)
            members = groups.get(key)
            if members is None:
                groups[key] = [c]
            else:
                members.append(c)
        open_groups = [key for key, members in groups.items() if _group_open(context, key, members)]
        history = request.history
        rng = random.Random(
            mix_seed(
                "logging",
                self.seed,
                request.order_id,
                request.event_time.isoformat(),
                len(history.attempts),
                len(history.nudges),
            )
        )
        chosen = rule_choice
        if open_groups and rng.random() < self.epsilon:
            members = _allowed(context, groups[open_groups[rng.randrange(len(open_groups))]])
            chosen = members[rng.randrange(len(members))]
        propensity = self.propensity(context, chosen, rule_choice, groups, len(open_groups))
        why = [*reasons] if chosen == rule_choice else ["exploration: a uniformly drawn permitted action"]
        return make_decision(
            request,
            context,
            chosen,
            model_version=self.model_version,
            retryable=retryable,
            propensity=propensity,
            reasons=why,
            salt=f"logging-{self.seed}",
        )

    def propensity(
        self,
        context: RuleContext,
        chosen: Candidate,
        rule_choice: Candidate,
        groups: dict[GroupKey, list[Candidate]],
        n_open_groups: int,
    ) -> float:
        """The exact probability that this policy picks ``chosen`` at this decision point."""
        p = (1.0 - self.epsilon) if chosen == rule_choice else 0.0
        members = groups.get(group_key(chosen))
        if members and n_open_groups and chosen in members:
            allowed = _allowed(context, members)
            if chosen in allowed:
                p += self.epsilon / n_open_groups / len(allowed)
        return min(p, 1.0)


def _group_open(context: RuleContext, key: GroupKey, members: list[Candidate]) -> bool:
    """Whether any member of a group is permitted (whole-kind blocks first: they spare the per-time checks)."""
    action, strategy, _, channel = key
    if action == Action.RETRY and (
        context.retry_blocked_by or (strategy is not None and context.strategy_blocked_by.get(strategy))
    ):
        return False
    if action == Action.RETARGET and (
        context.retarget_blocked_by or (channel is not None and context.channel_blocked_by.get(channel))
    ):
        return False
    return any(check(context, candidate).allowed for candidate in members)


def _allowed(context: RuleContext, members: list[Candidate]) -> list[Candidate]:
    return [candidate for candidate in members if check(context, candidate).allowed]
