"""No P(success) decide() serves is exactly 0 or 1 (``PROBABILITY_FLOOR``), and the floor alone is no reason to act.

A hard decline's and a duplicate's retry priors are 0 (data/policy/priors.yaml): where the model saw no success in
the cell (or none at all) they were served exactly 0, and one logged retry there that succeeded added 34.5 to that
point's log loss (clipped at 1e-15), which widened the promotion gate's noise. What must never be tried stays a hard
rule's (a Visa category-1 decline is never retried, whatever a model says).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.catalog import load_catalog, normalise_request
from model.cellsupport import N_SLOTS
from model.policy import (
    PROBABILITY_FLOOR,
    PolicyConfig,
    RulesOnlyScorer,
    decide,
    load_priors,
    served_probabilities,
)
from model.requests import DecisionRequest
from model.rules import build_context, permitted_grid
from model.vocab import Action, ErrorClass
from tests.factories import make_merchant, make_request, write_history_frames
from tests.unit.test_shrinkage import _Stub

GREEDY = PolicyConfig(exploration=0.0, exploration_rare_code=0.0)
_US = {"amount": 500.0, "currency": "USD", "customer": {"country": "US"}}
#: A duplicate transaction (Stripe), and a hard decline no hard rule forbids retrying (a Mastercard card not
#: supported for the purchase): both of prior 0 for every retry, the duplicate for every payment link too.
DUPLICATE = make_request(
    **_US,
    failure={"error_code": "duplicate_transaction", "error_message": "An identical transaction was submitted very "
             "recently", "network_decline_code": None},
)  # fmt: skip
HARD_DECLINE = make_request(
    **_US,
    payment={"card_network": "mastercard"},
    failure={"error_code": "card_not_supported", "error_message": "The card does not support this type of purchase",
             "network_decline_code": None},
)  # fmt: skip
#: A Visa category-1 decline (14, invalid account number): never retried, a hard rule.
VISA_CATEGORY_1 = make_request(**_US, failure={"error_code": "card_declined", "network_decline_code": "14",
                                               "error_message": "Invalid account number"})  # fmt: skip


class _NoSuccess(_Stub):
    """A model whose every cell saw 50 cases and no success (and predicted 5): with a prior of 0, the cell's
    evidence said 0 whatever the model's score."""

    def cell_table(self, error_class: str) -> np.ndarray | None:
        return np.tile(np.array([[50.0], [0.0], [5.0]]), (1, N_SLOTS))


def _grid(request: DecisionRequest) -> list:  # type: ignore[type-arg]
    allowed, blocked = permitted_grid(build_context(request, make_merchant(), load_catalog()))
    return allowed + blocked


def test_the_requests_are_of_the_classes_whose_priors_are_zero() -> None:
    catalog = load_catalog()
    assert normalise_request(catalog, DUPLICATE).error_class == ErrorClass.DUPLICATE
    assert normalise_request(catalog, HARD_DECLINE).error_class == ErrorClass.HARD_DECLINE
    raw = load_priors().retry
    assert all(value == 0.0 for cls in ("duplicate", "hard_decline") for row in raw[cls].values() for value in row)


@pytest.mark.parametrize("request_", [DUPLICATE, HARD_DECLINE], ids=["duplicate", "hard_decline"])
@pytest.mark.parametrize(
    "scorer",
    [
        None,
        _NoSuccess(soon=0.3, later=0.3, link=0.2),
        _Stub(soon=0.0, later=1.0, link=1.0, cells_soon=None),  # a model without cells, certain either way
    ],
    ids=["rules_only", "cells_without_success", "certain_model"],
)
def test_no_served_probability_is_exactly_zero_or_one(request_: DecisionRequest, scorer: object) -> None:
    catalog = load_catalog()
    candidates = _grid(request_)
    served = served_probabilities(request_, candidates, scorer or RulesOnlyScorer(catalog), catalog=catalog)
    acting = np.array([c.action != Action.STOP for c in candidates])
    assert acting.sum() > 10
    assert served[acting].min() >= PROBABILITY_FLOOR
    assert served[acting].max() <= 1.0 - PROBABILITY_FLOOR
    assert (served[~acting] == 0.0).all()  # stop: the order fails, no probability


def test_the_floor_alone_is_no_reason_to_act_and_hard_rules_still_forbid() -> None:
    catalog = load_catalog()
    # The duplicate's every action is known by the floor alone: the rules-only policy stops, as before the floor.
    decision = decide(DUPLICATE, make_merchant(), None, catalog=catalog, config=GREEDY)
    assert decision.action == Action.STOP
    assert decision.retryable is False
    assert all(a.p_success >= PROBABILITY_FLOOR for a in decision.alternatives if a.action != Action.STOP)
    # A model sure of a Visa category-1 decline's retries: never retried, a hard rule.
    sure = _Stub(soon=0.9, later=0.9, link=0.01)
    decision = decide(VISA_CATEGORY_1, make_merchant(), sure, catalog=catalog, config=GREEDY)  # type: ignore[arg-type]
    assert decision.action != Action.RETRY
    assert not any(a.action == Action.RETRY for a in decision.alternatives)
    assert "visa_category:1" in decision.rules_applied


def test_a_logged_success_after_a_hard_decline_costs_a_bounded_log_loss(tmp_path: Path) -> None:
    # The synthetic history's stolen cards (hard declines) recover 1% of their retries; a model whose cells saw no
    # success there served them 0, and each such success cost 34.5 of log loss.
    from pipelines.evaluate import evaluate

    history = write_history_frames(tmp_path, 1_500, seed=3)
    summary = evaluate(
        history / "attempts.parquet",
        history / "nudges.parquet",
        tmp_path / "out",
        {"rules-only": lambda request: decide(request, make_merchant(), None, catalog=load_catalog())},
        scorers={"model": _NoSuccess(soon=0.3, later=0.3, link=0.2)},  # type: ignore[dict-item]
        simulated=False,
        holdout_fraction=0.5,
        n_bootstrap=5,
    )
    table = summary.classification.set_index(["model", "breakdown", "group"])
    assert table.loc[("model", "error_class", "hard_decline"), "positives"] > 0  # such successes are in the holdout
    p, y = summary.predictions["model"], summary.labels
    losses = -(y * np.log(np.clip(p, 1e-15, 1.0)) + (1.0 - y) * np.log(np.clip(1.0 - p, 1e-15, 1.0)))
    assert losses.max() <= -np.log(PROBABILITY_FLOOR) + 1e-9
