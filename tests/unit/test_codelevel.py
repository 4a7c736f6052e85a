"""decide() with a model whose level for an error code its retries contradict: the code levels (model.codelevel).

The colleague's measurement: a code renamed two weeks before a retrain (stripe/balance_insufficient_acct, retries
recovered 11.5%) was served 0.247 before and after it, because its retries all fell in the holdout and the boosters
barely use the text features. A stub scorer stands in for the model, so each test states what the model believes
and what the code's retries showed; one without code levels (a bundle registered before they were recorded, or
without the refit) decides exactly as before.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from model.catalog import load_catalog
from model.codelevel import CODE_LEVEL_KEY, CodeLevels, CodeLevelsOverTime, code_factor, code_level_rows
from model.codewatch import code_key
from model.policy import PROBABILITY_FLOOR, PolicyConfig, decide, served_probabilities
from model.requests import DecisionRequest
from model.rules import Candidate
from tests.factories import make_merchant, make_request
from tests.unit.test_shrinkage import LATER, _soon, _Stub

GREEDY = PolicyConfig(exploration=0.0, exploration_rare_code=0.0)
NO_CELLS = PolicyConfig(exploration=0.0, exploration_rare_code=0.0, prior_strength=0.0)
NEW_CODE = make_request(
    failure={"error_code": "balance_insufficient_acct", "error_message": "insufficient balance on account",
             "network_decline_code": None}
)  # fmt: skip


class _Levelled(_Stub):
    """The stub model of test_shrinkage, with code levels: (n, s, m) of the failure's code, or None (none kept)."""

    def __init__(self, level: tuple[float, float, float] | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.level = level
        self.asked: list[tuple[str, str | None]] = []

    def code_level(self, connector: str, code: str | None) -> tuple[float, float, float] | None:
        self.asked.append((connector, code))
        return self.level


def _decide(scorer: Any, request: DecisionRequest = NEW_CODE, config: PolicyConfig = NO_CELLS) -> Any:
    return decide(request, make_merchant(), scorer, catalog=load_catalog(), config=config, rng=np.random.default_rng(0))


def test_the_factor_is_one_without_evidence_and_the_observed_ratio_with_much() -> None:
    assert code_factor(0.0, 0.0, 0.0, 30.0) == 1.0
    assert code_factor(0.0, 5.0, 3.0, 30.0) == 1.0
    assert code_factor(100.0, 10.0, 0.0, 30.0) == 1.0  # nothing predicted: nothing to rescale
    assert code_factor(1e9, 0.115e9, 0.247e9, 30.0) == pytest.approx(0.115 / 0.247)
    # 131 retries, 15 succeeded, the model predicted 0.247 each: the ratio 15 / 32.4 weighed against 1 by 131 / 161.
    assert code_factor(131.0, 15.0, 131 * 0.247, 30.0) == pytest.approx((15 / (131 * 0.247) * 131 + 30) / 161)
    assert code_factor(131.0, 15.0, 131 * 0.247, 0.0) == pytest.approx(15 / (131 * 0.247))


def test_a_new_code_whose_retries_recovered_less_is_served_lower_and_keeps_its_ranking() -> None:
    # The model: 25% for a retry now, 30% later. 131 retries after the code, 15 succeeded; it predicted 0.26 each.
    level = (131.0, 15.0, 131 * 0.26)
    before = _decide(_Levelled(None, soon=0.25, later=0.30))
    after = _decide(_Levelled(level, soon=0.25, later=0.30))
    factor = code_factor(*level, 30.0)
    assert factor < 0.6
    assert before.retry_probability == pytest.approx(0.30)
    assert after.retry_probability == pytest.approx(0.30 * factor, abs=1e-6)
    # Every retry candidate of the code rescaled alike: the later retry still beats the one now.
    retries = [a for a in after.alternatives if a.action.value == "retry"]
    assert all(a.p_success in (pytest.approx(0.25 * factor, abs=1e-6), pytest.approx(0.30 * factor, abs=1e-6))
               for a in retries)  # fmt: skip
    assert after.action.value != "retry" or not _soon(NEW_CODE, after)
    # Retargets are no silent retries: untouched.
    links = [a.p_success for a in after.alternatives if a.action.value == "retarget"]
    assert links
    assert all(p == pytest.approx(0.01) for p in links)
    assert any("retries after this code recovered 11% of 131" in reason for reason in after.reasons)


def test_a_code_whose_retries_recovered_more_is_served_higher_but_never_above_one() -> None:
    assert _decide(_Levelled((151.0, 79.0, 151 * 0.3), soon=0.3, later=0.3)).retry_probability == pytest.approx(
        0.3 * code_factor(151.0, 79.0, 151 * 0.3, 30.0), abs=1e-6
    )
    # Never certain either: at most 1 - PROBABILITY_FLOOR.
    assert _decide(_Levelled((1e6, 1e6, 1e5), soon=0.6, later=0.6)).retry_probability == 1.0 - PROBABILITY_FLOOR


@pytest.mark.parametrize("request_", [NEW_CODE, make_request()], ids=["new_code", "insufficient_funds"])
@pytest.mark.parametrize("config", [GREEDY, NO_CELLS], ids=["cells", "no_cells"])
def test_a_model_without_code_levels_or_without_retries_of_the_code_decides_as_before(
    request_: DecisionRequest, config: PolicyConfig
) -> None:
    plain = _Stub(soon=0.9, later=0.2)
    before = decide(request_, make_merchant(), plain, catalog=load_catalog(), config=config, decision_id="d")
    for level in (None, (0.0, 0.0, 0.0)):
        scorer = _Levelled(level, soon=0.9, later=0.2)
        after = decide(request_, make_merchant(), scorer, catalog=load_catalog(), config=config, decision_id="d")
        assert after == before
        assert scorer.asked == [(request_.failure.connector, request_.failure.error_code)]


def test_code_strength_none_turns_the_correction_off_and_negative_is_refused() -> None:
    scorer = _Levelled((1000.0, 10.0, 300.0), soon=0.3, later=0.3)
    off = PolicyConfig(exploration=0.0, exploration_rare_code=0.0, prior_strength=0.0, code_strength=None)
    assert _decide(scorer, config=off).retry_probability == pytest.approx(0.3)
    assert scorer.asked == []  # not even looked up
    with pytest.raises(ValueError, match="code_strength"):
        PolicyConfig(code_strength=-1.0)


def test_the_code_level_corrects_the_served_level_after_the_cell_shrinkage() -> None:
    # Later retries: a cell of 500 seen, the model right there (100 of 100 predicted); now: never seen, the prior.
    # The code's 400 retries were served 20% on average (m = 80) and 5% succeeded: the served level is rescaled,
    # also where the prior decides (its cells thin), and the cell correction is not counted twice.
    level = (400.0, 20.0, 80.0)
    factor = code_factor(*level, 30.0)
    plain = _decide(_Stub(soon=0.9, later=0.2), make_request(), GREEDY)
    decision = _decide(_Levelled(level, soon=0.9, later=0.2), make_request(), GREEDY)
    prior_later = 0.25  # insufficient funds after a payday (data/policy/priors.yaml), as in test_shrinkage
    assert decision.execute_at - make_request().event_time >= LATER
    assert plain.expected_success == pytest.approx(prior_later + 500 / 530 * (0.2 - prior_later), abs=1e-6)
    assert decision.expected_success == pytest.approx(plain.expected_success * factor, abs=1e-6)
    assert decision.retry_probability == pytest.approx(plain.retry_probability * factor, abs=1e-6)


def test_the_table_of_a_bundle_is_its_rows_case_folded() -> None:
    rows = code_level_rows(
        ["stripe", "Stripe", "adyen", "adyen", "adyen"],
        ["card_declined", "CARD_DECLINED ", "901", None, ""],
        [1, 0, 1, 1, 0],
        [0.5, 0.25, 0.4, 0.9, 0.9],
    )
    assert rows == [["adyen", "901", 1, 1, 0.4], ["stripe", "card_declined", 2, 1, 0.75]]
    table = CodeLevels.from_metadata({CODE_LEVEL_KEY: rows})
    assert table is not None
    assert table.of_code("STRIPE", " card_declined") == (2.0, 1.0, 0.75)
    assert table.of_code("adyen", "never_seen") == (0.0, 0.0, 0.0)
    assert table.of_code("adyen", None) == (0.0, 0.0, 0.0)
    assert CodeLevels.from_metadata({}) is None


def test_the_levels_over_time_count_only_the_retries_carried_out_before_the_moment() -> None:
    # The promotion gate judges a fit at each holdout point with what was known of the code then: a point's own
    # retry (carried out at its time) and later ones are not counted, earlier ones are, whatever their order given.
    at = [300, 100, 200, 100]
    levels = CodeLevelsOverTime(
        [code_key("stripe", "card_declined"), code_key("Stripe", "CARD_DECLINED"), code_key("stripe", "card_declined"),
         code_key("adyen", "901")],
        at, [1, 0, 1, 1], [0.5, 0.25, 0.4, 0.9],
    )  # fmt: skip
    assert levels.of_code_at("stripe", "card_declined", 100) == (0.0, 0.0, 0.0)
    assert levels.of_code_at("stripe", "card_declined", 101) == (1.0, 0.0, 0.25)
    assert levels.of_code_at("STRIPE", " card_declined", 300) == pytest.approx((2.0, 1.0, 0.65))
    assert levels.of_code_at("stripe", "card_declined", 10**18) == pytest.approx((3.0, 2.0, 1.15))
    assert levels.of_code_at("adyen", "never_seen", 10**18) == (0.0, 0.0, 0.0)
    assert levels.of_code_at("adyen", None, 10**18) == (0.0, 0.0, 0.0)


def test_the_served_probability_of_a_candidate_is_what_decide_serves_for_it() -> None:
    # The evaluation and the promotion gate judge what decide() serves (cells' priors and the code level included),
    # not the model's raw score: the raw score left a retrain's learning of a new code (its code level) out.
    level = (400.0, 20.0, 80.0)
    request = make_request()
    decision = _decide(_Levelled(level, soon=0.9, later=0.2), request, GREEDY)
    chosen = Candidate(
        action=decision.action, execute_at=decision.execute_at, strategy=decision.strategy,
        connector=decision.connector, channel=decision.channel,
    )  # fmt: skip
    served = served_probabilities(request, [chosen], _Levelled(level, soon=0.9, later=0.2), catalog=load_catalog())
    assert served[0] == pytest.approx(decision.expected_success, abs=1e-6)
    raw = served_probabilities(request, [chosen], _Stub(soon=0.9, later=0.2), catalog=load_catalog(), config=NO_CELLS)
    assert raw[0] == pytest.approx(0.2)
    assert served[0] != pytest.approx(raw[0])
