"""The policy: one `decide()` for the API, the executor, the console and offline evaluation.

decide() enumerates the candidate actions on winback's grids, drops every candidate a hard rule forbids, scores
the rest with a Scorer (the trained bundle, or rules-only priors when no model is registered) and chooses by
expected recovered value net of cost, exploring a small, configurable share of the time and reporting the
probability of its choice (``propensity``) so the next model can correct for this policy's bias.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar, cast

import numpy as np
import yaml

from model.catalog import ErrorCatalog, NormalisedError, normalise_request
from model.cellsupport import (
    ARM_INDEX,
    HOURS,
    LATER,
    N_SLOTS,
    SLOTS_PER_ARM,
    TIMINGS,
    timing_offset,
    timing_offsets,
)
from model.codelevel import code_factor
from model.datafiles import DATA_DIR
from model.explanations import action_reason, error_reason, prior_reason, unknown_currency_reason
from model.merchant_config import MerchantConfig
from model.money import UNKNOWN_CURRENCY_RULE, Economics, load_economics
from model.requests import Alternative, ContractModel, Decision, DecisionRequest
from model.rules import Candidate, build_context, permitted_grid
from model.vocab import Action, Channel, ErrorClass, Strategy
from model.wording import count_noun

PRIORS_FILE = DATA_DIR / "policy" / "priors.yaml"
RULES_ONLY_VERSION = "rules-only"
# Enum members read once: ``Action.RETRY`` is a class-attribute lookup through the enum's metaclass, ~0.16 us
# each on Python 3.11, and the loops below compare every candidate.
_RETRY, _RETARGET, _STOP = Action.RETRY, Action.RETARGET, Action.STOP
#: Value of money recovered a day later relative to today (cash flow, churn risk while the order waits). winback's
#: modelling choice, not a measured or published figure (README, "The daily discount"): a retry 24 h later must be
#: rated over 0.5% higher (relative) than the same action now to be chosen.
DAILY_DISCOUNT = 0.995
#: The rules-only policy's retryability threshold: a failure is ``retryable`` when the best retry its error allows
#: succeeds with at least this P(success). A bundle saved before bundles carried a threshold of their own was served
#: with it too (model.bundle); a trained one carries the threshold its training job chose (README, "How a decision
#: is made").
DEFAULT_RETRYABLE_THRESHOLD = 0.10
#: No P(success) decide() serves for a retry or a payment link is below this or above 1 minus it: the rules-only
#: priors are floored at it (``Priors.prior_slots``, the pseudo-count of every cell's prior, ``cell_factors``) and the
#: served probability is kept within it (``_served_scores``). A prior of 0 (a hard decline's or a duplicate's retry)
#: served exactly 0 where the model saw no success, and one logged retry there that succeeded added 34.5 to that
#: point's log loss (clipped at 1e-15), the gate's noise with it; at this floor it adds at most 6.9. What must never
#: be tried is a hard rule's (Visa category 1, Mastercard's "never retry" advice, a lost or stolen card: model.rules),
#: not a probability's. winback's modelling choice, not a measured figure (README, "How a decision is made").
PROBABILITY_FLOOR = 0.001


class CandidateScorer(Protocol):
    """What scoring candidates needs of a model (``served_probabilities``): calibrated P(success) per candidate."""

    def score(self, request: DecisionRequest, candidates: list[Candidate]) -> np.ndarray: ...


class Scorer(CandidateScorer, Protocol):
    """What decide() needs from a model: calibrated P(success) per candidate, and short explanations."""

    version: str

    @property
    def retryable_threshold(self) -> float:
        """P(the best retry the error allows succeeds) at or above which a failure is ``retryable``."""
        ...

    def score(self, request: DecisionRequest, candidates: list[Candidate]) -> np.ndarray: ...

    def explain(self, request: DecisionRequest, candidate: Candidate, k: int = 3) -> list[str]: ...


@dataclass(frozen=True)
class PolicyConfig:
    exploration: float = 0.05  # share of decisions that explore among permitted candidates
    exploration_rare_code: float = 0.15  # exploration for codes the model never trained on (or the catalog lacks)
    max_alternatives: int | None = None  # None: every other permitted action (CONTRACT.md section 2)
    # Training support (silent retries after the code) at which exploration is halfway from rare to base: thin
    # evidence keeps a code explorable, so a code judged non-retryable can still be found retryable later.
    support_half_life: int = 30
    # Weight of the rules-only prior, in training examples, against the model's P(success) of a candidate whose
    # cell (error class, strategy or channel, now, hours or later: model.cellsupport) had that many (shrink_to_prior).
    # 0 turns the shrinkage off; a model trained before cells were recorded is never shrunk.
    prior_strength: float = 30.0
    # Weight, in silent retries, of the served level for an error code against the code's observed retries
    # (model.codelevel, code_factor): the served P(success) of the code's retries is rescaled to what they showed
    # by n / (n + k). None turns the correction off; a model without code levels is never corrected.
    code_strength: float | None = 30.0

    def __post_init__(self) -> None:
        for name in ("exploration", "exploration_rare_code"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"PolicyConfig.{name} must be in [0, 1), got {value}")
        if self.support_half_life < 1:
            raise ValueError(f"PolicyConfig.support_half_life must be at least 1, got {self.support_half_life}")
        if not 0.0 <= self.prior_strength < float("inf"):
            raise ValueError(f"PolicyConfig.prior_strength must be finite and at least 0, got {self.prior_strength}")
        if self.code_strength is not None and not 0.0 <= self.code_strength < float("inf"):
            raise ValueError(
                f"PolicyConfig.code_strength must be None or finite and at least 0, got {self.code_strength}"
            )


#: A policy that never explores: the verdict's P(success) does not depend on exploration, its draws are skipped.
_NO_EXPLORATION = PolicyConfig(exploration=0.0, exploration_rare_code=0.0)


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


def cell_table(scorer: object, error_class: str) -> np.ndarray | None:
    """``scorer.cell_table(error_class)`` when the scorer offers it, else None: the training support, successes and
    sum of the model's predictions of every cell slot of the class (model.cellsupport)."""
    lookup = getattr(scorer, "cell_table", None)
    return None if lookup is None else lookup(error_class)


def code_level(scorer: object, connector: str, code: str | None) -> tuple[float, float, float] | None:
    """``scorer.code_level(connector, code)`` when the scorer offers it, else None: the silent retries after the
    code, their successes and the sum of the P(success) served for them (model.codelevel)."""
    lookup = getattr(scorer, "code_level", None)
    return None if lookup is None else lookup(connector, code)


def code_support(scorer: object, connector: str, code: str | None) -> int | None:
    """``scorer.code_support(connector, code)`` when the scorer offers it, else None."""
    lookup = getattr(scorer, "code_support", None)
    if lookup is None or code is None:
        return None
    value = lookup(connector, code)
    return None if value is None else int(value)


@dataclass(frozen=True)
class Priors:
    retry: dict[str, dict[str, tuple[float, float, float]]]  # (now, hours, later) per class and strategy
    retarget: dict[str, float]
    channel_factor: dict[str, float]
    later_nudge_decay: float
    # prior_slots() results by (error class, nudges sent), filled on use.
    _slots: dict[tuple[str, int], np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    def prior_slots(self, error_class: str, nudges: int) -> np.ndarray:
        """RulesOnlyScorer's score of every cell slot (model.cellsupport.ARMS) for one error class and number of
        nudges sent: a retry strategy's now, hours and later value, a channel's link probability in each of its
        slots, each within ``PROBABILITY_FLOOR`` of 0 and 1; then two slots of 0 for candidates of no cell (stop).
        Do not modify."""
        key = (error_class, nudges)
        slots = self._slots.get(key)
        if slots is None:
            unknown = ErrorClass.UNKNOWN.value
            retry_table = self.retry.get(error_class, self.retry[unknown])
            link = self.retarget.get(error_class, self.retarget[unknown]) * self.later_nudge_decay**nudges
            slots = np.zeros(N_SLOTS + 2, dtype=np.float64)  # two slots past the cells: 0 for stop
            for arm, index in ARM_INDEX.items():
                first = SLOTS_PER_ARM * index
                if arm in _CHANNEL_VALUES:
                    slots[first : first + SLOTS_PER_ARM] = link * self.channel_factor.get(arm, 0.5)
                else:
                    slots[first : first + SLOTS_PER_ARM] = retry_table.get(arm, (0.0,) * SLOTS_PER_ARM)
            _within_floor(slots[:N_SLOTS])
            if len(self._slots) >= 4096:
                self._slots.clear()
            self._slots[key] = slots
        return slots


_CHANNEL_VALUES = frozenset(channel.value for channel in Channel)


def _within_floor(p: np.ndarray) -> None:
    """Clip probabilities to [``PROBABILITY_FLOOR``, 1 - ``PROBABILITY_FLOOR``], in place (two ufuncs: np.clip's
    dispatch costs more)."""
    np.maximum(p, PROBABILITY_FLOOR, out=p)
    np.minimum(p, 1.0 - PROBABILITY_FLOOR, out=p)


@cache
def load_priors(path: Path = PRIORS_FILE) -> Priors:
    """The rules-only policy's beliefs (data/policy/priors.yaml), read once per process."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    return Priors(
        retry={
            cls: {strategy: (float(now), float(hours), float(later)) for strategy, (now, hours, later) in table.items()}
            for cls, table in raw["retry"].items()
        },
        retarget={cls: float(p) for cls, p in raw["retarget"].items()},
        channel_factor={channel: float(f) for channel, f in raw["channel_factor"].items()},
        later_nudge_decay=float(raw["later_nudge_decay"]),
    )


class RulesOnlyScorer:
    """Scores candidates from the priors table: the policy used before any model is registered."""

    version = RULES_ONLY_VERSION
    retryable_threshold = DEFAULT_RETRYABLE_THRESHOLD

    def __init__(self, catalog: ErrorCatalog, priors: Priors | None = None) -> None:
        self.catalog = catalog
        self.priors = priors or load_priors()

    def _error(self, request: DecisionRequest) -> NormalisedError:
        return normalise_request(self.catalog, request)

    def score(self, request: DecisionRequest, candidates: list[Candidate]) -> np.ndarray:
        slots = self.priors.prior_slots(self._error(request).error_class.value, len(request.history.nudges))
        event_time = request.event_time
        index = [N_SLOTS] * len(candidates)  # stop, and a candidate without its strategy or channel: 0
        for position, candidate in enumerate(candidates):
            if candidate.action == _RETRY and candidate.strategy is not None:
                arm = ARM_INDEX.get(candidate.strategy.value)
                if arm is not None:
                    delay = (candidate.execute_at - event_time).total_seconds()
                    index[position] = SLOTS_PER_ARM * arm + timing_offset(delay)
            elif candidate.action == _RETARGET and candidate.channel is not None:
                index[position] = SLOTS_PER_ARM * ARM_INDEX[candidate.channel.value]
        scores: np.ndarray = slots[np.array(index, dtype=np.intp)]  # a copy: the table stays as it is
        return scores

    def explain(self, request: DecisionRequest, candidate: Candidate, k: int = 3) -> list[str]:
        return [prior_reason(self._error(request).error_class)][:k]


def expected_values(
    request: DecisionRequest, candidates: list[Candidate], p_success: np.ndarray, economics: Economics
) -> np.ndarray:
    """Expected recovered value in USD net of the action's cost, discounted for waiting; 0 for stop."""
    delays = _delay_seconds(request, candidates)
    return _expected_values(request, candidates, _kind_runs(candidates), p_success, economics, delays)


def _delay_seconds(request: DecisionRequest, candidates: list[Candidate]) -> np.ndarray:
    """Seconds from the decision point to each candidate's execution (negative if before it)."""
    event_time = request.event_time
    return np.array([(candidate.execute_at - event_time).total_seconds() for candidate in candidates], dtype=np.float64)


def _expected_values(
    request: DecisionRequest,
    candidates: list[Candidate],
    runs: list[_Run],
    p_success: np.ndarray,
    economics: Economics,
    delay_seconds: np.ndarray,
) -> np.ndarray:
    """expected_values() given the candidates' runs of one kind (the cost is looked up once per run) and delays."""
    amount_usd = economics.order_value_usd(request.amount, request.currency)
    country = request.customer.country
    costs: list[float] = []
    stops: list[tuple[int, int]] = []
    for start, stop, first in runs:
        action = first.action
        if action is _STOP:
            cost = 0.0
            stops.append((start, stop))
        elif action is _RETRY:
            cost = economics.retry_cost(first.strategy)
        else:
            cost = economics.message_cost(first.channel or "", country)
        costs += [cost] * (stop - start)
    discount: np.ndarray = DAILY_DISCOUNT ** (np.maximum(delay_seconds, 0.0) / 86_400.0)
    values: np.ndarray = np.asarray(p_success, dtype=np.float64) * amount_usd * discount - np.array(
        costs, dtype=np.float64
    )
    for start, stop in stops:  # a run's slice, not a mask of every row: one numpy call instead of three
        values[start:stop] = 0.0
    return values


def _floor_value(request: DecisionRequest, economics: Economics, delay_seconds: float) -> float:
    """What an action ``delay_seconds`` on is worth at P(success) ``PROBABILITY_FLOOR``, before its cost: the value
    the best action must exceed to be taken rather than stop. The floor keeps a probability from claiming certainty;
    it is no evidence that acting pays, so an action known by the floor alone (a duplicate's payment link, where the
    prior is 0 and the model saw no success) is not taken for it: decide() stops there as it did before the floor."""
    amount_usd = economics.order_value_usd(request.amount, request.currency)
    return float(PROBABILITY_FLOOR * amount_usd * DAILY_DISCOUNT ** (max(delay_seconds, 0.0) / 86_400.0))


def _slot_bases(runs: list[_Run], n: int) -> np.ndarray:
    """Each of ``n`` candidates' cell slot at "now" (model.cellsupport), from its run; ``N_SLOTS`` (a slot past
    the cells, see ``_cell_factors``) for a candidate of no cell (stop)."""
    base: list[int] = []
    for start, stop, first in runs:
        arm = first.strategy if first.action is _RETRY else first.channel if first.action is _RETARGET else None
        # A Strategy or Channel hashes and compares as its value: no ``.value`` (a Python-level property) needed.
        index = -1 if arm is None else ARM_INDEX.get(arm, -1)
        base += [SLOTS_PER_ARM * index if index >= 0 else N_SLOTS] * (stop - start)
    return np.array(base, dtype=np.intp) if n else np.zeros(0, dtype=np.intp)


def _seconds_since_first_failure(request: DecisionRequest) -> float:
    """Seconds from the order's first failed attempt to the decision point (0 without one), as training counts."""
    failed = [attempt for attempt in request.history.attempts if attempt.status != "success"]
    if not failed:
        return 0.0
    first = min(failed, key=lambda attempt: attempt.attempt_number)
    return max((request.event_time - first.created_at).total_seconds(), 0.0)


def cell_factors(table: np.ndarray, prior: np.ndarray, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """How the model's P(success) p of a candidate in each cell slot combines with the slot's rules-only prior
    (empirical Bayes): ``prior + weight * (min(p * ratio, 1) - prior)`` (``shrink_to_prior``).

    ``table`` holds per slot the cell's training support n, successes s and sum of the model's predictions m
    (model.cellsupport); ``strength`` k is the prior's weight in examples. The cell's success rate has the prior
    Beta(k * prior, k * (1 - prior)); its posterior mean (s + k * prior) / (n + k) is what the cell's outcomes say,
    and the model's mean there, shrunk alike, (m + k * prior) / (n + k), what the model says: their ratio corrects
    the model's level in the cell and keeps its ranking within it (delays, connectors, customers). The corrected
    model then weighs n / (n + k) against the prior: with no evidence the prior alone, with ample evidence the
    model recalibrated to the cell's outcomes. Two more slots past the cells, for candidates of none (stop): the
    model as it is.
    """
    support, successes, predicted = np.maximum(np.asarray(table, dtype=np.float64), 0.0)
    pseudo = strength * np.asarray(prior[:N_SLOTS], dtype=np.float64)
    model_mean = predicted + pseudo
    ratio = np.divide(successes + pseudo, model_mean, out=np.ones(N_SLOTS), where=model_mean > 0.0)
    weight = support / (support + strength) if strength > 0.0 else np.ones(N_SLOTS)
    return np.append(ratio, (1.0, 1.0)), np.append(weight, (1.0, 1.0))


def shrink_to_prior(p_model: np.ndarray, prior: np.ndarray, ratio: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``prior + weight * (min(p_model * ratio, 1) - prior)``: the model's P(success) recalibrated to its cells'
    outcomes and weighed against the rules-only prior by its evidence (per candidate; see ``cell_factors``)."""
    shrunk: np.ndarray = prior + weight * (np.minimum(p_model * ratio, 1.0) - prior)
    return shrunk


#: cell_factors() by (cell table, error class, nudges sent, strength), with the table it was computed from.
_FACTORS: dict[tuple[int, str, int, float], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _cached_cell_factors(
    table: np.ndarray, priors: Priors, error_class: str, nudges: int, strength: float
) -> tuple[np.ndarray, np.ndarray]:
    key = (id(table), error_class, nudges, strength)
    found = _FACTORS.get(key)
    if found is None or found[0] is not table:
        if len(_FACTORS) >= 4096:
            _FACTORS.clear()
        found = _FACTORS[key] = (table, *cell_factors(table, priors.prior_slots(error_class, nudges), strength))
    return found[1], found[2]


_HOURS, _LATER = TIMINGS.index(HOURS), TIMINGS.index(LATER)


def _no_later_than_hours(
    scores: np.ndarray,
    recalibrated: np.ndarray,
    offsets: np.ndarray,
    bases: np.ndarray,
    prior_slots: np.ndarray,
    runs: list[_Run],
) -> None:
    """Where the priors say a retry hours after the decision point does as well as one a day or more on (a transient
    fault: their later value is no higher), serve each retry within the hours at least its kind's best later value,
    but never more than the model's own recalibrated value for it (in place).

    Each candidate is shrunk by its own cell's evidence (``shrink_to_prior``), and the logging policy retried a day
    on far more often than within hours: a candidate the model rated above the prior kept most of that in the
    well-tried later cell and little in the thin hours cell, so a technical decline's retry a day on outranked the
    same retry six hours on that the model rated as high, and the order waited a day for nothing. With this, the
    cost of waiting decides between them, as the priors intend (data/policy/priors.yaml).
    """
    # Walked as Python floats: numpy's per-call overhead came ten times per run of a few rows (mixed traffic, both
    # forms in one process on a loaded box: 18.5 us a decision as slices, 8.0 us as floats). The scores are
    # probabilities (never NaN, where numpy's max and Python's would differ), so max() and min() pick what
    # np.maximum and np.minimum pick, ties included (the first argument).
    timing: list[int] | None = None
    for start, stop, first in runs:
        if first.action is not _RETRY:
            continue
        base = int(bases[start])
        if base >= N_SLOTS or prior_slots[base + _HOURS] < prior_slots[base + _LATER]:
            continue
        if timing is None:
            timing, served, ceiling = offsets.tolist(), scores.tolist(), recalibrated.tolist()
        later = [served[i] for i in range(start, stop) if timing[i] == _LATER]
        if not later:
            continue
        best_later = max(later)
        for i in range(start, stop):
            if timing[i] == _HOURS:
                scores[i] = max(served[i], min(ceiling[i], best_later))


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
ScorerT = TypeVar("ScorerT", bound=CandidateScorer)
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


class _Served(NamedTuple):
    """decide()'s P(success) of each candidate (``scores``) and what it read on the way: the failure's code level
    and its factor, the error class's cell table and each candidate's cell slot (None without a table)."""

    scores: np.ndarray
    level: tuple[float, float, float] | None
    level_factor: float
    table: np.ndarray | None
    cells: np.ndarray | None


def _served_scores(
    request: DecisionRequest,
    candidates: list[Candidate],
    runs: list[_Run],
    allowed: int,
    delays: np.ndarray,
    active: CandidateScorer,
    error_class: str,
    config: PolicyConfig,
    /,
) -> _Served:
    """P(success) of each of ``candidates`` as decide() serves it: the scorer's, shrunk to the rules-only prior where
    the model saw few cases like it, then scaled by the failure's code level; a stop's is 0. ``runs`` are those of
    the first ``allowed`` candidates; the rest are scored alike, their runs built only when a cell table or code
    level needs them."""
    scores = np.minimum(np.maximum(np.asarray(active.score(request, candidates), dtype=np.float64), 0.0), 1.0)
    # The failure's code levels (model.codelevel), applied below once the cells have weighed in.
    strength = config.code_strength
    level = None if strength is None else code_level(active, request.failure.connector, request.failure.error_code)
    level_factor = 1.0 if level is None or strength is None or level[0] <= 0.0 else code_factor(*level, strength)
    # Where the model saw few cases like a candidate (its cell's training support), the rules-only prior of the
    # cell weighs in: a model extrapolating into actions its logging policy seldom took must not overrule the priors.
    table = cell_table(active, error_class) if config.prior_strength > 0.0 else None
    cells: np.ndarray | None = None  # each candidate's cell slot
    blocked_runs = (
        [(start + allowed, stop + allowed, first) for start, stop, first in _kind_runs(candidates[allowed:])]
        if table is not None or level_factor != 1.0
        else []
    )
    if table is not None:
        bases = _slot_bases(runs + blocked_runs, len(candidates))
        priors, nudges = load_priors(), len(request.history.nudges)
        ratio, weight = _cached_cell_factors(table, priors, error_class, nudges, config.prior_strength)
        # The prior is RulesOnlyScorer's (its timing counts from the decision point); the cell's timing counts from
        # the first failure, as training counted it. A candidate of no cell (stop) has delay 0: offset 0 past it.
        slots = priors.prior_slots(error_class, nudges)
        offsets = timing_offsets(delays) * (bases < N_SLOTS)
        prior = slots[bases + offsets]
        cells = bases + timing_offsets(delays + _seconds_since_first_failure(request)) * (bases < N_SLOTS)
        recalibrated = np.minimum(scores * ratio[cells], 1.0)
        scores = np.minimum(np.maximum(shrink_to_prior(scores, prior, ratio[cells], weight[cells]), 0.0), 1.0)
        _no_later_than_hours(scores, recalibrated, offsets, bases, slots, runs + blocked_runs)
    # The served level of the failure's error code, corrected to what its silent retries showed (model.codelevel):
    # every retry candidate alike, after the cell shrinkage, whose served P(success) the code levels summed (with
    # the default prior_strength), so a code's evidence counts where its cells are thin too and nothing twice.
    if level_factor != 1.0:
        # The retries' rows at once: per run, three numpy calls each (~2 us) came four or five times a decision.
        retries = [
            i for start, stop, first in runs + blocked_runs if first.action is _RETRY for i in range(start, stop)
        ]
        scores[retries] = np.minimum(scores[retries] * level_factor, 1.0)
    # Never exactly 0 or 1 (a booster's calibrator, a code level can reach either); stop has no probability (the
    # order fails), and is 0 for decide() and for an evaluation alike.
    _within_floor(scores)
    for start, stop, first in runs:
        if first.action == _STOP:
            scores[start:stop] = 0.0
    return _Served(scores, level, level_factor, table, cells)


def served_probabilities(
    request: DecisionRequest,
    candidates: list[Candidate],
    scorer: CandidateScorer,
    *,
    catalog: ErrorCatalog,
    config: PolicyConfig | None = None,
) -> np.ndarray:
    """P(success) of each of ``candidates`` as decide() serves it (``expected_success``, ``retry_probability``): the
    scorer's calibrated estimate, shrunk to the rules-only prior where the model saw few cases like it, then scaled
    by what the failure's code showed in training (its code level), within ``PROBABILITY_FLOOR`` of 0 and 1 (stop: 0).
    Scored as decide() scores a grid of them, without its rules: a model is judged on what it serves (evaluation, the
    promotion gate), not on its boosters alone."""
    error_class = normalise_request(catalog, request).error_class.value
    delays = _delay_seconds(request, candidates)
    runs = _kind_runs(candidates)
    return _served_scores(
        request, candidates, runs, len(candidates), delays, scorer, error_class, config or PolicyConfig()
    ).scores


class ServedScorer:
    """``scorer`` as decide() serves it: ``score`` gives `served_probabilities` of the candidates, from the model that
    answers the request (`scorer_for`). What an evaluation judges and values a model by (its classification metrics,
    its DR reward model), so the probability it is judged on is the one its policy acts on and the API reports."""

    def __init__(self, scorer: CandidateScorer, *, catalog: ErrorCatalog, config: PolicyConfig | None = None) -> None:
        self.scorer = scorer
        self.catalog = catalog
        self.config = config or PolicyConfig()

    def score(self, request: DecisionRequest, candidates: list[Candidate]) -> np.ndarray:
        return served_probabilities(
            request, candidates, scorer_for(self.scorer, request), catalog=self.catalog, config=self.config
        )


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
    return _decide(request, merchant, scorer, catalog, config, rng, economics, decision_id, False)[0]


#: A policy's probability of each action it may take at one decision point: (the action as decided, probability),
#: each action once, the probabilities summing to 1.
ActionProbabilities = tuple[tuple[Candidate, float], ...]


def verdict_probability(
    request: DecisionRequest,
    merchant: MerchantConfig,
    scorer: Scorer | None,
    *,
    catalog: ErrorCatalog,
    economics: Economics | None = None,
) -> float:
    """What decide() compares with the scorer's ``retryable_threshold`` for its ``retryable`` verdict: P(success)
    of the best retry the error itself allows, whether or not the order's situation permits it (training chooses
    the threshold on it, model.training.choose_retryable_threshold)."""
    return _decide(request, merchant, scorer, catalog, _NO_EXPLORATION, None, economics, "verdict", False)[1]


def _decide(
    request: DecisionRequest,
    merchant: MerchantConfig,
    scorer: Scorer | None,
    catalog: ErrorCatalog,
    config: PolicyConfig | None,
    rng: np.random.Generator | None,
    economics: Economics | None,
    decision_id: str | None,
    with_probabilities: bool,
    /,
) -> tuple[Decision, float, ActionProbabilities]:
    """decide()'s decision, the P(success) its ``retryable`` verdict compared with the threshold and, when
    ``with_probabilities``, every action's probability of being the decision (`decide_with_probabilities`; else
    empty: serving does not pay for it; `DecidePolicy.action_probabilities`).

    decide()'s arguments, in its order, all given: its signature alone holds the defaults and keyword names.
    """
    config = config or PolicyConfig()
    economics = economics or load_economics()
    active: Scorer = scorer if scorer is not None else RulesOnlyScorer(catalog)
    context = build_context(request, merchant, catalog)
    # Retries only the order's situation forbids (budget, window, flow) are scored in the same model call: the
    # error-code verdict (``retryable``) is the best retry the error itself allows, whatever the merchant permits.
    allowed, blocked = permitted_grid(context)  # stop is always among the allowed
    candidates = allowed + blocked
    runs = _kind_runs(allowed)
    delays = _delay_seconds(request, candidates)
    error_class = context.error.error_class.value
    scores, level, level_factor, table, cells = _served_scores(
        request, candidates, runs, len(allowed), delays, active, error_class, config
    )
    p_success, p_blocked = scores[: len(allowed)], scores[len(allowed) :]
    values = _expected_values(request, allowed, runs, p_success, economics, delays[: len(allowed)])
    # Ties (e.g. equal values at several send times) go to the earliest candidate in grid order.
    best = int(np.argmax(values))
    if values[best] <= _floor_value(request, economics, float(delays[best])):
        best = next(start for start, _, first in runs if first.action == _STOP)

    error = context.error
    code_evidence = code_support(active, request.failure.connector, request.failure.error_code)
    epsilon = exploration_rate(config, error.known_code, code_evidence)
    generator = rng if rng is not None else np.random.default_rng()
    # Exploration never picks stop: its outcome is known (the order fails), so trying it teaches nothing and costs
    # the order. It was drawn like any candidate: an order whose only channel was down failed that way.
    explorable = len(allowed) - sum(stop - start for start, stop, first in runs if first.action == _STOP)
    chosen = best
    if epsilon > 0.0 and explorable > 0 and generator.random() < epsilon:
        choices = [i for start, stop, first in runs if first.action != _STOP for i in range(start, stop)]
        chosen = choices[int(generator.integers(explorable))]
    choice = allowed[chosen]
    explores = epsilon > 0.0 and explorable > 0
    uniform = epsilon / explorable if explores and choice.action != _STOP else 0.0
    propensity = (1.0 - epsilon if explores else 1.0) * (chosen == best) + uniform
    probabilities: ActionProbabilities = ()
    if with_probabilities:
        chances = {_as_decided(allowed[best], request.event_time): 1.0 - epsilon if explores else 1.0}
        if explores:
            for start, stop, first in runs:
                if first.action == _STOP:
                    continue
                for index in range(start, stop):
                    action = _as_decided(allowed[index], request.event_time)
                    chances[action] = chances.get(action, 0.0) + epsilon / explorable
        probabilities = tuple(chances.items())

    retry_indices = [i for start, stop, first in runs if first.action == _RETRY for i in range(start, stop)]
    retry_probability = float(max(p_success[retry_indices].tolist(), default=0.0))
    wait_end = context.earliest_retry_at
    if not retry_indices and wait_end is not None and wait_end > request.event_time:
        # The issuer asked to wait (Mastercard MAC 24-30) and the order permits no retry after it (its window or
        # checkout session ends first, its budget is spent): the retry the advice plans, at the wait's end or later,
        # is the one the answer describes, as ``retryable`` judges it (MAC_WAIT is no situational rule, so every
        # blocked retry is at or after the wait's end), not a retry probability of 0 beside a retryable error.
        retry_probability = float(p_blocked.max(initial=0.0))

    alternatives = _alternatives(
        allowed, runs, values, p_success, exclude=_group(choice), limit=config.max_alternatives
    )
    reasons = [
        error_reason(error),
        action_reason(choice.action, choice.strategy, choice.connector, choice.channel, float(p_success[chosen])),
    ]
    rules_applied = list(context.rules_applied)
    if not economics.knows_currency(request.currency):
        # Its amount cannot be weighed against the actions' costs: the order was valued at a fixed amount instead.
        reasons.append(unknown_currency_reason(request.currency, economics.unknown_currency_value_usd))
        rules_applied.append(f"{UNKNOWN_CURRENCY_RULE}:{request.currency.upper()}")
    if choice.action != Action.STOP:
        reasons.extend(active.explain(request, choice, k=2))
    if chosen != best:
        reasons.append("exploring: a permitted alternative, tried now and then so the model keeps learning")
    if code_evidence is not None and code_evidence < config.support_half_life:
        reasons.append(f"thin evidence: the model saw {count_noun(code_evidence, 'retry', 'retries')} after this code")
    if level is not None and abs(level_factor - 1.0) >= 0.05:
        n, won, predicted = level
        reasons.append(
            f"retries after this code recovered {won / n:.0%} of {n:.0f} (the model expected {predicted / n:.0%}): "
            f"its chances are scaled {'up' if level_factor > 1.0 else 'down'} to match"
        )
    if table is not None and cells is not None and cells[chosen] < N_SLOTS:
        seen = float(table[0, cells[chosen]])
        if seen < config.prior_strength:
            reasons.append(
                f"the model saw only {seen:.0f} {'case' if seen == 1 else 'cases'} like this action: "
                "the usual outcome without a model weighs in"
            )
    if not retry_indices:
        reasons.append("no silent retry permitted")
    if context.outcome_known_at is not None and choice.action != Action.STOP:
        reasons.append(
            "an attempt timed out or is still pending and may yet succeed: nothing is tried before "
            f"{context.outcome_known_at:%Y-%m-%d %H:%M} UTC, so the customer is not charged twice"
        )
    verdict = max(retry_probability, float(p_blocked.max(initial=0.0)))
    retryable = verdict >= active.retryable_threshold

    # Built from values decide() itself typed above, so pydantic's validation is skipped (as model_construct): it
    # cost more than the whole choice. Serialising a wrongly typed field warns, and the tests turn warnings
    # into errors.
    decision = _constructed(
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
            "rules_applied": rules_applied,
        },
    )
    return decision, verdict, probabilities


def _as_decided(candidate: Candidate, event_time: datetime) -> Candidate:
    """A candidate as a decision that chose it carries it out (`model.evaluation.decision_candidate`): not before the
    decision point, and only its action's own fields."""
    return Candidate(
        action=candidate.action,
        execute_at=max(candidate.execute_at, event_time),
        strategy=candidate.strategy if candidate.action == Action.RETRY else None,
        connector=candidate.connector if candidate.action == Action.RETRY else None,
        channel=candidate.channel if candidate.action == Action.RETARGET else None,
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
        merchant, scorer = self._serving(request)
        return decide(request, merchant, scorer, catalog=self.catalog, config=self.config, rng=self.rng)

    def action_probabilities(self, request: DecisionRequest) -> tuple[Decision, ActionProbabilities]:
        """The decision, as a call would make it, and the probability with which decide() takes each action here (its
        exploration's distribution: the best action with 1 - epsilon, each explorable one with epsilon / their number).

        What an off-policy evaluation values the policy with (`model.evaluation.replay`): its expected value over these
        probabilities has none of the noise of the one exploration draw a decision is."""
        merchant, scorer = self._serving(request)
        decision, _, probabilities = _decide(
            request, merchant, scorer, self.catalog, self.config, self.rng, None, None, True
        )
        return decision, probabilities

    def _serving(self, request: DecisionRequest) -> tuple[MerchantConfig, Scorer | None]:
        merchant = self.merchants.get(request.merchant_id)
        if merchant is None:
            raise KeyError(f"unknown merchant_id {request.merchant_id!r}: not in the merchant config")
        return merchant, None if self.scorer is None else scorer_for(self.scorer, request)


def scorer_for(scorer: ScorerT, request: DecisionRequest) -> ScorerT:
    """The model that answers ``request``: ``scorer.for_request(request)`` when the scorer offers it (a judged fit
    answering with the code levels of the request's time, pipelines.train.ForwardLevelsScorer), else ``scorer``."""
    pick = getattr(scorer, "for_request", None)
    return scorer if pick is None else cast(ScorerT, pick(request))
