"""decide() with a model whose evidence is thin in places: the rules-only priors bound it there (model.cellsupport).

A stub scorer stands in for the model, so each test states exactly what the model believes and what it saw: an
overconfident model that never tried an immediate retry after insufficient funds (the reviewer's case: it cascaded
at once), one whose cell outcomes contradict it, one that is right where it saw a lot, and one without cell support
(a bundle trained before cells were recorded).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.catalog import load_catalog
from model.cellsupport import ARM_INDEX, N_SLOTS, SLOTS_PER_ARM, timing_offsets
from model.policy import DEFAULT_RETRYABLE_THRESHOLD, PolicyConfig, RulesOnlyScorer, decide
from model.requests import DecisionRequest
from model.rules import Candidate, build_context, permitted_grid
from model.vocab import Action, Channel
from tests.factories import make_merchant, make_request

CHANNELS = {channel.value for channel in Channel}
GREEDY = PolicyConfig(exploration=0.0, exploration_rare_code=0.0)
LATER = timedelta(hours=20)
#: The contract's example: a recurring Visa credit card declined with 51 (insufficient funds) on stripe.
INSUFFICIENT_FUNDS = make_request()


def _soon(request: DecisionRequest, candidate: Any) -> bool:
    return candidate.execute_at - request.event_time < LATER


class _Stub:
    """A model: P(success) of retries soon and later and of retargets, and its training cells (n, s, m) for them."""

    version = "stub"
    retryable_threshold = DEFAULT_RETRYABLE_THRESHOLD

    def __init__(
        self,
        *,
        soon: float,
        later: float,
        link: float = 0.01,
        cells_soon: tuple[float, float, float] | None = (0.0, 0.0, 0.0),
        cells_later: tuple[float, float, float] = (500.0, 100.0, 100.0),
    ) -> None:
        self.soon, self.later, self.link = soon, later, link
        self.cells_soon, self.cells_later = cells_soon, cells_later

    def score(self, request: DecisionRequest, candidates: list[Candidate]) -> np.ndarray:
        return np.array(
            [
                (self.soon if _soon(request, c) else self.later) if c.action == Action.RETRY
                else self.link if c.action == Action.RETARGET else 0.0
                for c in candidates
            ]
        )  # fmt: skip

    def explain(self, request: DecisionRequest, candidate: Candidate, k: int = 3) -> list[str]:
        return []

    def cell_table(self, error_class: str) -> np.ndarray | None:
        if self.cells_soon is None:
            return None
        table = np.zeros((3, N_SLOTS))
        for arm, index in ARM_INDEX.items():
            first = SLOTS_PER_ARM * index
            if arm in CHANNELS:
                table[:, first : first + SLOTS_PER_ARM] = np.array([[1000.0], [10.0], [10.0]])
            else:  # its "soon" is the cells' now and hours
                table[:, first], table[:, first + 1], table[:, first + 2] = (
                    self.cells_soon,
                    self.cells_soon,
                    self.cells_later,
                )
        return table


def _decide(scorer: Any, request: DecisionRequest = INSUFFICIENT_FUNDS, config: PolicyConfig = GREEDY) -> Any:
    return decide(request, make_merchant(), scorer, catalog=load_catalog(), config=config, rng=np.random.default_rng(0))


def test_a_model_that_never_tried_an_immediate_retry_does_not_overrule_the_prior() -> None:
    # It believes 90% now (it never saw it: no cell support) and 20% later, where it saw 500 cases and was right.
    decision = _decide(_Stub(soon=0.9, later=0.2))
    assert decision.action == Action.RETRY
    assert decision.execute_at - INSUFFICIENT_FUNDS.event_time >= LATER
    assert decision.expected_success == pytest.approx(0.2 * 500 / 530 + 0.25 * 30 / 530, abs=1e-6)
    assert not any("cases like this action" in reason for reason in decision.reasons)  # 500 cases: not thin


def test_a_model_its_cell_outcomes_contradict_is_recalibrated_to_them() -> None:
    # 500 immediate retries seen: the model predicted 90% for them (m = 450) but 2% succeeded (s = 10). Later it
    # predicts 5% and was right (25 of 500): recalibrated, now is ~2%, below later.
    decision = _decide(_Stub(soon=0.9, later=0.05, cells_soon=(500.0, 10.0, 450.0), cells_later=(500.0, 25.0, 25.0)))
    assert decision.execute_at - INSUFFICIENT_FUNDS.event_time >= LATER
    assert decision.expected_success == pytest.approx((0.05 * 500 + 0.25 * 30) / 530, abs=1e-6)


def test_where_the_model_saw_much_and_was_right_it_decides() -> None:
    rich = _Stub(soon=0.9, later=0.2, cells_soon=(5000.0, 4500.0, 4500.0))
    decision = _decide(rich)
    assert decision.execute_at - INSUFFICIENT_FUNDS.event_time < LATER
    assert decision.expected_success == pytest.approx(0.9 * 5000 / 5030 + 0.03 * 30 / 5030, abs=1e-6)
    assert _key(decision) == _key(_decide(rich, config=PolicyConfig(exploration=0.0, exploration_rare_code=0.0,
                                                                    prior_strength=0.0)))  # fmt: skip


#: An Indian card's renewal declined as issuer unavailable: no cascade (its RBI e-mandate), so a retry on stripe.
ISSUER_DOWN = make_request(
    failure={"connector": "stripe", "error_code": "issuer_not_available", "error_message": None,
             "network_decline_code": "91"}
)  # fmt: skip


def test_a_technical_decline_is_not_held_a_day_by_the_later_cells_evidence_alone() -> None:
    """Found by the payments review: 64 of 210 technical declines of recurring cards (simulated, seed 7) waited a
    day. The model rated the retry six hours on as high as a day on (70%), but the logging policy had tried it a
    day on 100 times as often: shrunk each by its own cell's evidence towards the same prior (45%, a transient
    fault), the later one kept 0.69 and the one within hours 0.49. The priors say a day adds nothing to hours
    here, so the cost of waiting decides: the retry goes six hours on, at the later value, never above the model's."""
    thin_soon = _Stub(soon=0.7, later=0.7, cells_soon=(5.0, 3.5, 3.5), cells_later=(500.0, 350.0, 350.0))
    decision = _decide(thin_soon, ISSUER_DOWN)
    assert (decision.action, decision.strategy) == (Action.RETRY, "retry_same")
    assert decision.execute_at - ISSUER_DOWN.event_time == timedelta(hours=6)
    assert decision.expected_success == pytest.approx(0.45 * 30 / 530 + 0.7 * 500 / 530, abs=1e-6)
    # A model that rates the retry within hours lower than a day on keeps its own (lower) value for it.
    doubtful = _Stub(soon=0.4, later=0.7, cells_soon=(5.0, 2.0, 2.0), cells_later=(500.0, 350.0, 350.0))
    assert _decide(doubtful, ISSUER_DOWN).execute_at - ISSUER_DOWN.event_time >= LATER
    # Insufficient funds recovers after payday (priors: 3% within hours, 25% later): the later retry keeps its edge.
    assert _decide(thin_soon).execute_at - INSUFFICIENT_FUNDS.event_time >= LATER


def _key(decision: Any) -> tuple[object, ...]:
    return (decision.action, decision.strategy, decision.connector, decision.channel, decision.execute_at)


NEW_CODE = make_request(failure={"error_code": "zz_new", "error_message": "odd", "network_decline_code": None})


@pytest.mark.parametrize("request_", [INSUFFICIENT_FUNDS, NEW_CODE], ids=["insufficient_funds", "new_code"])
def test_a_model_without_cell_support_decides_as_before(request_: DecisionRequest) -> None:
    old = _Stub(soon=0.9, later=0.2, cells_soon=None)
    off = PolicyConfig(exploration=0.0, exploration_rare_code=0.0, prior_strength=0.0)
    first, second = _decide(old, request_), _decide(old, request_, off)
    assert first.model_dump(exclude={"decision_id"}) == second.model_dump(exclude={"decision_id"})
    assert first.expected_success == pytest.approx(0.9)


def test_prior_strength_zero_turns_the_shrinkage_off_and_negative_is_refused() -> None:
    off = PolicyConfig(exploration=0.0, exploration_rare_code=0.0, prior_strength=0.0)
    assert _decide(_Stub(soon=0.9, later=0.2), config=off).expected_success == pytest.approx(0.9)
    with pytest.raises(ValueError, match="prior_strength"):
        PolicyConfig(prior_strength=-1.0)


def test_without_evidence_the_prior_and_with_much_the_model_recalibrated_to_its_cells() -> None:
    from model.policy import cell_factors, shrink_to_prior

    # Slot 0: never seen; slot 1: seen 1e9 times, the model predicted twice what happened; slot 2: right.
    table = np.zeros((3, N_SLOTS))
    table[:, 1] = (1e9, 1e9 * 0.45, 1e9 * 0.9)
    table[:, 2] = (1e9, 1e9 * 0.9, 1e9 * 0.9)
    prior = np.full(N_SLOTS + 2, 0.03)
    ratio, weight = cell_factors(table, prior, 30.0)
    assert ratio.shape == weight.shape == (N_SLOTS + 2,)
    slots = np.array([0, 1, 2, N_SLOTS])  # the last: a candidate of no cell (stop), the model as it is
    p = np.full(4, 0.9)
    out = shrink_to_prior(p, prior[slots], ratio[slots], weight[slots])
    assert out == pytest.approx([0.03, 0.45, 0.9, 0.9], abs=1e-6)
    ratio, weight = cell_factors(table, prior, 0.0)  # no prior weight: the model recalibrated, wherever it saw any
    assert weight[0] == 1.0


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"payment": {"is_recurring": False, "payment_method_type": "debit", "is_network_token": True}},
        {"failure": {"connector": "stripe", "error_code": "issuer_not_available", "network_decline_code": "91"}},
        {"failure": {"error_code": "zz_new", "error_message": "odd", "network_decline_code": None}},
        {"history": {"nudges": [{"channel": "sms", "sent_at": "2026-11-01T11:00:00Z", "delivered": True}]},
         "event_time": "2026-11-02T11:00:00Z"},
    ],
)  # fmt: skip
def test_the_vectorised_prior_is_the_rules_only_scorer(overrides: dict[str, Any]) -> None:
    from model.policy import _delay_seconds, _kind_runs, _slot_bases, load_priors

    request = make_request(**overrides)
    catalog = load_catalog()
    context = build_context(request, make_merchant(), catalog)
    allowed, blocked = permitted_grid(context)
    candidates = allowed + blocked
    bases = _slot_bases(_kind_runs(candidates), len(candidates))
    timing = timing_offsets(_delay_seconds(request, candidates)) * (bases < N_SLOTS)
    slots = load_priors().prior_slots(context.error.error_class.value, len(request.history.nudges))
    vectorised = slots[bases + timing]
    assert vectorised == pytest.approx(RulesOnlyScorer(catalog).score(request, candidates), abs=1e-12)


def test_cells_of_a_bundle_recorded_before_now_and_hours_were_apart_count_for_both() -> None:
    """A bundle trained before the first hours had a cell of their own recorded "soon" (under 20 h): read today, that
    evidence serves both the now and the hours slot, as it served every retry under 20 h before."""
    from model.cellsupport import CellSupport, cell_keys

    legacy = CellSupport([["issuer_technical", "retry_same", "soon", 400, 8, 120.0],
                          ["issuer_technical", "retry_same", "later", 100, 45, 30.0],
                          ["issuer_technical", "sms", "any", 50, 5, 5.0]]).of_class("issuer_technical")  # fmt: skip
    first, sms = SLOTS_PER_ARM * ARM_INDEX["retry_same"], SLOTS_PER_ARM * ARM_INDEX["sms"]
    assert legacy[:, first].tolist() == legacy[:, first + 1].tolist() == [400.0, 8.0, 120.0]
    assert legacy[:, first + 2].tolist() == [100.0, 45.0, 30.0]
    assert all(legacy[:, slot].tolist() == [50.0, 5.0, 5.0] for slot in range(sms, sms + SLOTS_PER_ARM))
    keys = cell_keys(["issuer_technical"] * 4, ["retry"] * 4, ["retry_same"] * 4, [None] * 4, [0.0, 2.99, 3.0, 20.0])
    assert [key.split("|")[2] for key in keys] == ["now", "now", "hours", "later"]


def _no_later_than_hours_on_arrays(
    scores: np.ndarray, recalibrated: np.ndarray, offsets: np.ndarray, bases: np.ndarray, prior: np.ndarray, runs: Any
) -> None:
    """The rule as numpy states it, slice by slice (the policy's form before it walked plain floats)."""
    from model.cellsupport import HOURS, LATER, TIMINGS

    hours_slot, later_slot = TIMINGS.index(HOURS), TIMINGS.index(LATER)
    for start, stop, first in runs:
        if first.action is not Action.RETRY:
            continue
        base = int(bases[start])
        if base >= N_SLOTS or prior[base + hours_slot] < prior[base + later_slot]:
            continue
        timing = offsets[start:stop]
        later = scores[start:stop][timing == later_slot]
        if not len(later):
            continue
        hours = np.flatnonzero(timing == hours_slot) + start
        scores[hours] = np.maximum(scores[hours], np.minimum(recalibrated[hours], later.max()))


@settings(max_examples=300, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(["retry_same", "cascade", "whatsapp", "stop"]), min_size=1, max_size=6),
    lengths=st.lists(st.integers(1, 8), min_size=6, max_size=6),
    seed=st.integers(0, 2**32 - 1),
    ties=st.booleans(),
)
def test_no_later_than_hours_on_floats_is_the_numpy_rule(
    kinds: list[str], lengths: list[int], seed: int, ties: bool
) -> None:
    """decide()'s "no later than the hours" step walks plain floats: every score it leaves is the one the rule's numpy
    form leaves, ties and runs without a later or an hours candidate included."""
    from model.policy import _kind_runs, _no_later_than_hours, _slot_bases
    from model.vocab import Strategy

    at = INSUFFICIENT_FUNDS.event_time
    candidates: list[Candidate] = []
    for kind, length in zip(kinds, lengths, strict=False):
        if kind in CHANNELS:
            candidates += [Candidate(Action.RETARGET, at, channel=Channel(kind))] * length
        elif kind == "stop":
            candidates += [Candidate(Action.STOP, at)] * length
        else:
            candidates += [Candidate(Action.RETRY, at, strategy=Strategy(kind), connector="stripe")] * length
    rng = np.random.default_rng(seed)
    n = len(candidates)
    draw = (lambda: rng.choice([0.0, 0.25, 0.5, 1.0], size=n)) if ties else (lambda: rng.random(n))
    scores, recalibrated = draw(), draw()
    runs = _kind_runs(candidates)
    bases = _slot_bases(runs, n)
    offsets = rng.integers(0, 3, size=n) * (bases < N_SLOTS)
    prior = rng.choice([0.1, 0.2], size=N_SLOTS + 2)
    expected = scores.copy()
    _no_later_than_hours_on_arrays(expected, recalibrated, offsets, bases, prior, runs)
    _no_later_than_hours(scores, recalibrated, offsets, bases, prior, runs)
    assert scores.tolist() == expected.tolist()
