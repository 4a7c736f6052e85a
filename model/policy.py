"""The policy: one `decide()` for the API, the executor, the console and offline evaluation.

decide() enumerates the candidate actions on winback's grids, drops every candidate a hard rule forbids, scores
the rest with a Scorer (the trained bundle, or rules-only priors when no model is registered) and chooses by
expected recovered value net of cost, exploring a small, configurable share of the time and reporting the
probability of its choice (``propensity``) so the next model can correct for this policy's bias.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import yaml

from model.catalog import ErrorCatalog, NormalisedError
from model.datafiles import DATA_DIR
from model.merchant_config import MerchantConfig
from model.money import Economics, load_economics
from model.requests import Alternative, ContractModel, Decision, DecisionRequest
from model.rules import Candidate, build_context, permitted_grid
from model.vocab import Action, Channel, ErrorClass, Strategy

PRIORS_FILE = DATA_DIR / "policy" / "priors.yaml"
RULES_ONLY_VERSION = "rules-only"
# Enum members read once: ``Action.RETRY`` is a class-attribute lookup through the enum's metaclass, ~0.16 us
# each on Python 3.11, and the loops below compare every candidate.
_RETRY, _RETARGET, _STOP = Action.RETRY, Action.RETARGET, Action.STOP
#: A retry this many hours or more after the decision point counts as "later" in the priors table.
LATER_HOURS = 20.0
#: Value of money recovered a day later relative to today (cash flow, churn risk while the order waits).
DAILY_DISCOUNT = 0.995


class Scorer(Protocol):
    """What decide() needs from a model: calibrated P(success) per candidate, and short explanations."""

    version: str

    def score(self, request: DecisionRequest, candidates: list[Candidate]) -> np.ndarray: ...

    def explain(self, request: DecisionRequest, candidate: Candidate, k: int = 3) -> list[str]: ...


@dataclass(frozen=True)
class PolicyConfig:
    exploration: float = 0.05  # share of decisions that explore among permitted candidates
    exploration_rare_code: float = 0.15  # exploration for codes the model never trained on (or the catalog lacks)
    max_alternatives: int | None = None  # None: every other permitted action (CONTRACT.md section 2)
    retryable_threshold: float = 0.10  # P(best silent retry succeeds) at or above which a failure is retryable
    # Training support (silent retries after the code) at which exploration is halfway from rare to base: thin
    # evidence keeps a code explorable, so a code judged non-retryable can still be found retryable later.
    support_half_life: int = 30

    def __post_init__(self) -> None:
        for name in ("exploration", "exploration_rare_code"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"PolicyConfig.{name} must be in [0, 1), got {value}")
        if self.support_half_life < 1:
            raise ValueError(f"PolicyConfig.support_half_life must be at least 1, got {self.support_half_life}")


def exploration_rate(config: PolicyConfig, known_code: bool, support: int | None) -> float:
    """The share of decisions that explore for one error code.

    With the model's training support for the code (``scorer.code_support``), it falls smoothly from
    ``exploration_rare_code`` (never seen) towards ``exploration`` as evidence grows, half-way at
    ``support_half_life`` retries. Without it (rules-only, or an older bundle) the catalog decides: known codes
    get ``exploration``, codes the catalog lacks ``exploration_rare_code``.
    """
    if support is None:
        return config.exploration if known_code else config.exploration_rare_code
    extra = max(config.exploration_rare_code - config.exploration, 0.0)
    return config.exploration + extra * config.support_half_life / (config.support_half_life + max(support, 0))


def code_support(scorer: object, connector: str, code: str | None) -> int | None:
    """``scorer.code_support(connector, code)`` when the scorer offers it, else None."""
    lookup = getattr(scorer, "code_support", None)
    if lookup is None or code is None:
        return None
    value = lookup(connector, code)
    return None if value is None else int(value)


@dataclass(frozen=True)
class Priors:
    retry: dict[str, dict[str, tuple[float, float]]]
    retarget: dict[str, float]
    channel_factor: dict[str, float]
    later_nudge_decay: float


@cache
def load_priors(path: Path = PRIORS_FILE) -> Priors:
    """The rules-only policy's beliefs (data/policy/priors.yaml), read once per process."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    return Priors(
        retry={
            cls: {strategy: (float(soon), float(later)) for strategy, (soon, later) in table.items()}
            for cls, table in raw["retry"].items()
        },
        retarget={cls: float(p) for cls, p in raw["retarget"].items()},
        channel_factor={channel: float(f) for channel, f in raw["channel_factor"].items()},
        later_nudge_decay=float(raw["later_nudge_decay"]),
    )


class RulesOnlyScorer:
    """Scores candidates from the priors table: the policy used before any model is registered."""

    version = RULES_ONLY_VERSION

    def __init__(self, catalog: ErrorCatalog, priors: Priors | None = None) -> None:
        self.catalog = catalog
        self.priors = priors or load_priors()

    def _error(self, request: DecisionRequest) -> NormalisedError:
        failure = request.failure
        return self.catalog.normalise(
            failure.connector,
            failure.error_code,
            failure.error_message,
            failure.network_decline_code,
            failure.merchant_advice_code,
            failure.unified_code,
            request.payment.card_network,
            request.payment.payment_method,
        )

    def score(self, request: DecisionRequest, candidates: list[Candidate]) -> np.ndarray:
        error_class = self._error(request).error_class.value
        retry_table = self.priors.retry.get(error_class, self.priors.retry[ErrorClass.UNKNOWN.value])
        nudge_decay = self.priors.later_nudge_decay ** len(request.history.nudges)
        retarget_base = self.priors.retarget.get(error_class, self.priors.retarget[ErrorClass.UNKNOWN.value])
        scores = np.zeros(len(candidates), dtype=np.float64)
        for index, candidate in enumerate(candidates):
            if candidate.action == _RETRY and candidate.strategy is not None:
                soon, later = retry_table.get(candidate.strategy.value, (0.0, 0.0))
                hours = (candidate.execute_at - request.event_time).total_seconds() / 3600.0
                scores[index] = later if hours >= LATER_HOURS else soon
            elif candidate.action == _RETARGET and candidate.channel is not None:
                factor = self.priors.channel_factor.get(candidate.channel.value, 0.5)
                scores[index] = retarget_base * factor * nudge_decay
        return scores

    def explain(self, request: DecisionRequest, candidate: Candidate, k: int = 3) -> list[str]:
        return [f"rules-only prior for {self._error(request).error_class.value}"][:k]


def expected_values(
    request: DecisionRequest, candidates: list[Candidate], p_success: np.ndarray, economics: Economics
) -> np.ndarray:
    """Expected recovered value in USD net of the action's cost, discounted for waiting; 0 for stop."""
    return _expected_values(request, candidates, _kind_runs(candidates), p_success, economics)


def _expected_values(
    request: DecisionRequest,
    candidates: list[Candidate],
    runs: list[_Run],
    p_success: np.ndarray,
    economics: Economics,
) -> np.ndarray:
    """expected_values() given the candidates' runs of one kind: the cost is looked up once per run."""
    amount_usd = economics.to_usd(request.amount, request.currency)
    country = request.customer.country
    event_time = request.event_time
    costs: list[float] = []
    delay_seconds: list[float] = []
    acting: list[bool] = []
    for start, stop, first in runs:
        action = first.action
        if action is _STOP:
            costs += [0.0] * (stop - start)
            delay_seconds += [0.0] * (stop - start)
            acting += [False] * (stop - start)
            continue
        if action is _RETRY:
            cost = economics.retry_cost(first.strategy)
        else:
            cost = economics.message_cost(first.channel or "", country)
        costs += [cost] * (stop - start)
        delay_seconds += [(candidate.execute_at - event_time).total_seconds() for candidate in candidates[start:stop]]
        acting += [True] * (stop - start)
    discount = DAILY_DISCOUNT ** (np.maximum(np.array(delay_seconds, dtype=np.float64), 0.0) / 86_400.0)
    values = np.asarray(p_success, dtype=np.float64) * amount_usd * discount - np.array(costs, dtype=np.float64)
    values[~np.array(acting, dtype=np.bool_)] = 0.0
    return values


#: Consecutive candidates of one kind: (start, stop, the first of them).
_Run = tuple[int, int, Candidate]


def _kind_runs(candidates: list[Candidate]) -> list[_Run]:
    """The candidates split into runs of one kind (action, strategy, connector, channel, the same objects).

    A grid lists each kind's candidates together, so what depends on the kind alone (cost, group, action) is
    worked out once per run instead of once per candidate; every candidate of a run holds the first one's
    objects, so a test on the first one is the test on each of them.
    """
    runs: list[_Run] = []
    start = 0
    first: Candidate | None = None
    for index, candidate in enumerate(candidates):
        if first is None or not (
            candidate.action is first.action
            and candidate.strategy is first.strategy
            and candidate.connector is first.connector
            and candidate.channel is first.channel
        ):
            if first is not None:
                runs.append((start, index, first))
            start, first = index, candidate
    if first is not None:
        runs.append((start, len(candidates), first))
    return runs


def _group(candidate: Candidate) -> tuple[Action, Strategy | None, str | None, Channel | None]:
    return (candidate.action, candidate.strategy, candidate.connector, candidate.channel)


def new_decision_id(rng: np.random.Generator | None) -> str:
    """A unique decision id; drawn from ``rng`` when given, so replays are reproducible."""
    if rng is None:
        return "dec_" + os.urandom(12).hex()
    # 96 bits straight from the bit generator: Generator.bytes(12) costs ~10 us here, ten times as much.
    return "dec_" + rng.bit_generator.random_raw(2).tobytes()[:12].hex()


ModelT = TypeVar("ModelT", bound=ContractModel)
_set_attribute = object.__setattr__


def _constructed(model: type[ModelT], values: dict[str, Any]) -> ModelT:
    """``model.model_construct(**values)`` for ``values`` that name every field of ``model``, in field order.

    model_construct walks the model's fields looking for aliases and defaults on every call (~4 us each, six
    calls a decision); with every field given, what it builds is this: the values as ``__dict__``, every field
    set, no extra fields, no private attributes (tests/behavioral/test_policy_behaviour.py compares the two).
    """
    instance = model.__new__(model)
    _set_attribute(instance, "__dict__", values)
    _set_attribute(instance, "__pydantic_fields_set__", set(values))
    _set_attribute(instance, "__pydantic_extra__", {})
    _set_attribute(instance, "__pydantic_private__", None)
    return instance


def _describe(candidate: Candidate, p: float) -> str:
    if candidate.action == Action.RETRY:
        return f"{candidate.strategy} via {candidate.connector}: {p:.0%} expected"
    if candidate.action == Action.RETARGET:
        return f"payment link by {candidate.channel}: {p:.0%} expected"
    return "no action is worth its cost"


def decide(
    request: DecisionRequest,
    merchant: MerchantConfig,
    scorer: Scorer | None,
    *,
    catalog: ErrorCatalog,
    config: PolicyConfig | None = None,
    rng: np.random.Generator | None = None,
    economics: Economics | None = None,
    decision_id: str | None = None,
) -> Decision:
    """Enumerate permitted candidates, score them, choose by expected recovered value net of cost.

    ``scorer=None`` gives the rules-only policy (``model_version == "rules-only"``). Pure apart from ``rng``
    (exploration, and the decision id unless ``decision_id`` is given): the same request, scorer and rng state
    give the same decision. Services pass a fresh ``decision_id`` (``new_decision_id(None)``): a seeded rng
    would give every worker and every restart the same ids.
    """
    config = config or PolicyConfig()
    economics = economics or load_economics()
    active: Scorer = scorer if scorer is not None else RulesOnlyScorer(catalog)
    context = build_context(request, merchant, catalog)
    # Retries only the order's situation forbids (budget, window, flow) are scored in the same model call: the
    # error-code verdict (``retryable``) is the best retry the error itself allows, whatever the merchant permits.
    allowed, blocked = permitted_grid(context)  # stop is always among the allowed
    scores = np.minimum(np.maximum(np.asarray(active.score(request, allowed + blocked), dtype=np.float64), 0.0), 1.0)
    p_success, p_blocked = scores[: len(allowed)], scores[len(allowed) :]
    runs = _kind_runs(allowed)
    for start, stop, first in runs:
        if first.action == _STOP:
            p_success[start:stop] = 0.0
    values = _expected_values(request, allowed, runs, p_success, economics)
    # Ties (e.g. equal values at several send times) go to the earliest candidate in grid order.
    best = int(np.argmax(values))
    if values[best] <= 0.0:
        best = next(start for start, _, first in runs if first.action == _STOP)

    error = context.error
    support = code_support(active, request.failure.connector, request.failure.error_code)
    epsilon = exploration_rate(config, error.known_code, support)
    generator = rng if rng is not None else np.random.default_rng()
    # Exploration never picks stop: its outcome is known (the order fails), so trying it teaches nothing and costs
    # the order. It was drawn like any candidate: an order whose only channel was down failed that way.
    explorable = len(allowed) - sum(stop - start for start, stop, first in runs if first.action == _STOP)
    chosen = best
    if epsilon > 0.0 and explorable > 0 and generator.random() < epsilon:
        choices = [i for start, stop, first in runs if first.action != _STOP for i in range(start, stop)]
        chosen = choices[int(generator.integers(explorable))]
    choice = allowed[chosen]
    uniform = epsilon / explorable if explorable > 0 and choice.action != _STOP else 0.0
    propensity = (1.0 - epsilon if explorable > 0 else 1.0) * (chosen == best) + uniform

    retry_indices = [i for start, stop, first in runs if first.action == _RETRY for i in range(start, stop)]
    retry_probability = float(max(p_success[retry_indices].tolist(), default=0.0))

    alternatives = _alternatives(
        allowed, runs, values, p_success, exclude=_group(choice), limit=config.max_alternatives
    )
    reasons = [f"{error.error_class.value} ({error.matched_by})", _describe(choice, float(p_success[chosen]))]
    if choice.action != Action.STOP:
        reasons.extend(active.explain(request, choice, k=2))
    if chosen != best:
        reasons.append("exploration: a permitted alternative tried to keep learning")
    if support is not None and support < config.support_half_life:
        reasons.append(f"thin evidence: the model saw {support} retries after this code")
    if not retry_indices:
        reasons.append("no silent retry permitted")
    threshold = float(getattr(active, "retryable_threshold", config.retryable_threshold))
    retryable = max(retry_probability, float(p_blocked.max(initial=0.0))) >= threshold

    # Built from values decide() itself typed above, so pydantic's validation is skipped (as model_construct): it
    # cost more than the whole choice. Serialising a wrongly typed field warns, and the tests turn warnings
    # into errors.
    return _constructed(
        Decision,
        {
            "decision_id": decision_id or new_decision_id(rng),
            "model_version": active.version,
            "action": choice.action,
            "strategy": choice.strategy if choice.action == Action.RETRY else None,
            "connector": choice.connector if choice.action == Action.RETRY else None,
            "channel": choice.channel if choice.action == Action.RETARGET else None,
            "execute_at": max(choice.execute_at, request.event_time),
            "retryable": retryable,
            "retry_probability": round(retry_probability, 6),
            "expected_success": round(float(p_success[chosen]), 6),
            "propensity": round(float(propensity), 6),
            "alternatives": alternatives,
            "reasons": reasons,
            "rules_applied": list(context.rules_applied),
        },
    )


def _alternatives(
    allowed: list[Candidate],
    runs: list[_Run],
    values: np.ndarray,
    p_success: np.ndarray,
    *,
    exclude: tuple[Action, Strategy | None, str | None, Channel | None],
    limit: int | None,
) -> list[Alternative]:
    """The best candidate of every other action group, best first."""
    # Each candidate's group as a number, found once per run: hashing a group hashes its enum members in Python.
    numbers: dict[tuple[Action, Strategy | None, str | None, Channel | None], int] = {}
    group_of: list[int] = []
    for start, stop, first in runs:
        group_of += [numbers.setdefault(_group(first), len(numbers))] * (stop - start)
    seen = {numbers.get(exclude, -1)}
    result: list[Alternative] = []
    for index in np.argsort(-values, kind="stable").tolist():
        group = group_of[index]
        if group in seen:
            continue
        seen.add(group)
        candidate = allowed[index]
        result.append(
            _constructed(
                Alternative,
                {
                    "action": candidate.action,
                    "strategy": candidate.strategy,
                    "connector": candidate.connector,
                    "channel": candidate.channel,
                    "execute_at": candidate.execute_at,
                    "p_success": round(float(p_success[index]), 6),
                },
            )
        )
        if limit is not None and len(result) >= limit:
            break
    return result


class DecidePolicy:
    """decide() bound to merchants, a scorer and a catalog: a ``policy(request) -> Decision`` callable."""

    def __init__(
        self,
        merchants: dict[str, MerchantConfig],
        scorer: Scorer | None,
        catalog: ErrorCatalog,
        config: PolicyConfig | None = None,
        seed: int = 0,
    ) -> None:
        self.merchants = merchants
        self.scorer = scorer
        self.catalog = catalog
        self.config = config or PolicyConfig()
        self.rng = np.random.default_rng(seed)

    def __call__(self, request: DecisionRequest) -> Decision:
        merchant = self.merchants.get(request.merchant_id)
        if merchant is None:
            raise KeyError(f"unknown merchant_id {request.merchant_id!r}: not in the merchant config")
        return decide(request, merchant, self.scorer, catalog=self.catalog, config=self.config, rng=self.rng)
