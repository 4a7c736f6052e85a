"""Model behaviour tests of the whole policy: decide() with a trained bundle and with rules-only priors.

Directionality (hard declines are never retried silently), invariance (formatting never flips a decision) and a
property test: random requests never get a forbidden action, whatever the model or the exploration draws.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.bundle import ModelBundle
from model.catalog import load_catalog
from model.policy import DEFAULT_RETRYABLE_THRESHOLD, PolicyConfig, RulesOnlyScorer, decide
from model.requests import Decision
from model.rules import Candidate, build_context, in_upi_peak_hours, permitted_grid
from model.training import train
from model.vocab import Action, Strategy
from tests.factories import make_history_frames, make_merchant, make_request
from tests.unit.test_rules import _catalog_csv, _contract_violations, scenarios

GREEDY = PolicyConfig(exploration=0.0, exploration_rare_code=0.0)
EXPLORING = PolicyConfig(exploration=0.5, exploration_rare_code=0.5)


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    attempts, nudges = make_history_frames(1500, seed=5)
    return train(attempts, nudges, seed=0, max_rounds=40, evaluate_unseen_codes=False).bundle


def _every_action(decision: Decision) -> list[Candidate]:
    chosen = Candidate(decision.action, decision.execute_at, decision.strategy, decision.connector, decision.channel)
    others = [Candidate(a.action, a.execute_at, a.strategy, a.connector, a.channel) for a in decision.alternatives]
    return [chosen, *others]


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "rules-only"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])
@given(scenario=scenarios())
def test_random_requests_never_get_a_forbidden_action(
    with_model: bool, bundle: ModelBundle, scenario: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    request_data, merchant_data = scenario
    request, merchant = make_request(**request_data), make_merchant(**merchant_data)
    rng = np.random.default_rng(7)
    for _ in range(3):  # exploration draws differ between calls
        decision = decide(
            request, merchant, bundle if with_model else None, catalog=load_catalog(), config=EXPLORING, rng=rng
        )
        for candidate in _every_action(decision):
            assert _contract_violations(request, merchant, candidate) == [], candidate
        assert 0.0 < decision.propensity <= 1.0
        assert decision.execute_at >= request.event_time


@pytest.mark.parametrize("code", ["04", "07", "12", "14", "15", "41", "43", "46", "57", "R0", "R1", "R3"])
@pytest.mark.parametrize("with_model", [True, False], ids=["model", "rules-only"])
def test_visa_category_1_never_gets_a_silent_retry(code: str, with_model: bool, bundle: ModelBundle) -> None:
    request = make_request(failure={"error_code": "card_declined", "error_message": None, "network_decline_code": code})
    decision = decide(
        request, make_merchant(), bundle if with_model else None, catalog=load_catalog(), config=EXPLORING
    )
    assert decision.action != Action.RETRY
    assert not decision.retryable
    assert all(alternative.action != Action.RETRY for alternative in decision.alternatives)
    assert "visa_category:1" in decision.rules_applied


@pytest.mark.parametrize(
    ("network", "failure"),
    [
        ("visa", {"error_code": "card_declined", "network_decline_code": "R1"}),
        ("mastercard", {"error_code": "card_declined", "network_decline_code": "R0"}),
        ("mastercard", {"error_code": "revocation_of_all_authorizations", "network_decline_code": None}),
    ],
)
@pytest.mark.parametrize("with_model", [True, False], ids=["model", "rules-only"])
def test_a_renewal_the_cardholder_told_the_issuer_to_stop_is_given_up(
    network: str, failure: dict[str, str | None], with_model: bool, bundle: ModelBundle
) -> None:
    # A payment link went by WhatsApp for it, and on Mastercard a silent cascade was among the permitted actions.
    request = make_request(
        currency="USD", customer={"country": "US"}, payment={"card_network": network},
        failure={"error_message": None, **failure},
    )  # fmt: skip
    decision = decide(
        request, make_merchant(), bundle if with_model else None, catalog=load_catalog(), config=EXPLORING
    )
    assert decision.action == Action.STOP
    assert decision.alternatives == []
    assert not decision.retryable
    assert "authorization_revoked" in decision.rules_applied


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "rules-only"])
def test_a_mastercard_security_decline_advising_01_at_the_checkout_is_stepped_up(
    with_model: bool, bundle: ModelBundle
) -> None:
    # Mastercard 83 with MAC 01: "retry using authentication (EMV 3DS)". It was held for new card details: no retry.
    request = make_request(
        currency="EUR", customer={"country": "DE"},
        payment={"card_network": "mastercard", "is_recurring": False, "authentication_type": "no_three_ds"},
        failure={"error_code": "card_declined", "error_message": None, "network_decline_code": "83",
                 "merchant_advice_code": "01"},
    )  # fmt: skip
    decision = decide(request, make_merchant(), bundle if with_model else None, catalog=load_catalog(), config=GREEDY)
    retries = [c for c in _every_action(decision) if c.action == Action.RETRY]
    assert [(c.strategy, c.connector) for c in retries] == [(Strategy.STEP_UP, "stripe")]
    assert retries[0].execute_at - request.event_time <= timedelta(seconds=2)


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "rules-only"])
@pytest.mark.parametrize(
    ("authentication", "silent"), [("three_ds", set()), ("no_three_ds", {Strategy.STEP_UP})], ids=["3ds", "no-3ds"]
)
def test_an_indian_one_off_card_payment_is_never_re_attempted_without_the_customers_authentication(
    authentication: str, silent: set[Strategy], with_model: bool, bundle: ModelBundle
) -> None:
    # RBI: a domestic payment's second factor is made for that payment alone. The issuer-down decline of a rupee
    # card payment at the checkout was cascaded to another gateway silently, with no authentication of its own.
    request = make_request(
        payment={"card_network": "rupay", "is_recurring": False, "authentication_type": authentication},
        failure={"connector": "razorpay", "error_code": "processing_error", "error_message": "Issuer unavailable",
                 "network_decline_code": "91"},
        history={"attempts": [{"attempt_number": 1, "connector": "razorpay", "strategy": "initial",
                               "status": "failure", "error_code": "processing_error",
                               "created_at": "2026-11-01T10:15:00Z"}]},
        available_connectors=["razorpay", "payu"],
    )  # fmt: skip
    decision = decide(request, make_merchant(), bundle if with_model else None, catalog=load_catalog(), config=GREEDY)
    assert {c.strategy for c in _every_action(decision) if c.action == Action.RETRY} == silent
    assert decision.action != Action.STOP
    assert decision.retryable  # the error is retryable; the payment flow asks for the customer
    assert "rbi_one_off_afa" in decision.rules_applied


def _key(decision: Decision) -> tuple[object, ...]:
    return (decision.action, decision.strategy, decision.connector, decision.channel, decision.execute_at)


@pytest.mark.parametrize(
    "variant",
    [
        {"failure": {"error_code": "  CARD_DECLINED "}},
        {"failure": {"network_decline_code": "51 "}},
        {"amount": 499},
        {"order_id": "ord_other", "customer": {"id": "cus_other"}},
        {"event_time": "2026-11-01T15:45:00+05:30"},  # the same instant in another offset
    ],
)
@pytest.mark.parametrize("with_model", [True, False], ids=["model", "rules-only"])
def test_formatting_never_flips_a_decision(variant: dict[str, Any], with_model: bool, bundle: ModelBundle) -> None:
    scorer = bundle if with_model else None
    base = decide(make_request(), make_merchant(), scorer, catalog=load_catalog(), config=GREEDY)
    other = decide(make_request(**variant), make_merchant(), scorer, catalog=load_catalog(), config=GREEDY)
    assert _key(other) == _key(base)
    assert other.expected_success == pytest.approx(base.expected_success)


def test_a_hard_decline_is_not_retryable_and_a_technical_one_is(bundle: ModelBundle) -> None:
    stolen = make_request(
        failure={
            "error_code": "stolen_card",
            "error_message": "Your card was reported stolen.",
            "network_decline_code": "43",
        },
        payment={"card_network": "mastercard"},
    )
    technical = make_request(
        failure={"error_code": "processing_error", "error_message": "An error occurred while processing your card.",
                 "network_decline_code": "96"},
    )  # fmt: skip
    for scorer in (bundle, None):
        assert not decide(stolen, make_merchant(), scorer, catalog=load_catalog(), config=GREEDY).retryable
        assert decide(technical, make_merchant(), scorer, catalog=load_catalog(), config=GREEDY).retryable


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "rules-only"])
@pytest.mark.parametrize(
    "payment",
    [
        {"payment_method": "card", "payment_method_type": "credit", "is_recurring": True},  # an Indian card renewal
        {"payment_method": "upi", "payment_method_type": None, "is_recurring": True, "card_network": None},  # AutoPay
    ],
)
def test_an_e_mandate_debit_above_the_afa_free_limit_is_never_retried_silently(
    payment: dict[str, Any], with_model: bool, bundle: ModelBundle
) -> None:
    """Above 15,000 rupees an e-mandate debit needs the customer's own authentication (RBI): no silent retry,
    whichever the model prefers; a payment link is still offered, and the error stays retryable."""
    # A technical decline on each rail: ISO's 96 on the card; NPCI's 21 (full reversal, known) on UPI, where a 96
    # is a deemed transaction whose outcome is open (no silent retry at any amount).
    upi = payment["payment_method"] == "upi"
    technical = {"error_code": "processing_error", "error_message": "An error occurred while processing your card.",
                 "network_decline_code": "21" if upi else "96"}  # fmt: skip
    for amount, limited in ((15_000.0, False), (15_000.01, True)):
        request = make_request(amount=amount, payment=payment, failure=technical)
        decision = decide(
            request, make_merchant(), bundle if with_model else None, catalog=load_catalog(), config=EXPLORING
        )
        retries = [c for c in _every_action(decision) if c.action == Action.RETRY]
        assert ("e_mandate_afa_required:15000INR" in decision.rules_applied) is limited
        assert (retries == []) is limited  # at the limit a silent retry is still among the permitted actions
        if limited:
            assert any(c.action == Action.RETARGET for c in _every_action(decision))
            assert decision.retryable


def _spent_budget_request(failure: dict[str, Any], payment: dict[str, Any] | None = None) -> Any:
    first = make_request().history.attempts[0].model_dump(mode="json")
    retries = [{**first, "attempt_number": n, "strategy": "retry_same", "created_at": "2026-11-01T10:14:00Z"}
               for n in (2, 3, 4)]  # fmt: skip
    return make_request(failure=failure, payment=payment or {}, history={"attempts": [first, *retries]})


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "rules-only"])
def test_retryable_is_the_errors_verdict_even_when_the_order_may_not_retry(
    with_model: bool, bundle: ModelBundle
) -> None:
    scorer = bundle if with_model else None
    technical = {"error_code": "processing_error", "error_message": "An error occurred while processing your card.",
                 "network_decline_code": "96"}  # fmt: skip
    for request in (
        _spent_budget_request(technical),  # max_retries used up
        _spent_budget_request(technical, {"payment_method": "wallet", "payment_method_type": "apple_pay"}),
    ):
        decision = decide(request, make_merchant(), scorer, catalog=load_catalog(), config=GREEDY)
        assert decision.action != Action.RETRY
        assert decision.retry_probability == 0.0  # no permitted retry to succeed
        assert decision.retryable  # but the error itself is worth a retry
    category_1 = {"error_code": "card_declined", "error_message": None, "network_decline_code": "04"}
    decision = decide(_spent_budget_request(category_1), make_merchant(), scorer, catalog=load_catalog(), config=GREEDY)
    assert not decision.retryable  # Visa category 1: the error forbids every re-attempt


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "rules-only"])
@pytest.mark.parametrize(
    ("mac", "payment"),
    [
        ("24", {"is_recurring": False}),  # a one-off: no silent retry after its checkout, the wait outlasts it
        ("25", {"is_recurring": False}),
        ("28", {"is_recurring": False}),
        ("29", {"is_recurring": True}),  # a renewal whose 8-day wait outlasts the 7-day retry window
        ("30", {"is_recurring": True}),
    ],
)
def test_during_a_merchant_advice_wait_retryable_and_retry_probability_tell_of_the_same_retry(
    mac: str, payment: dict[str, Any], with_model: bool, bundle: ModelBundle
) -> None:
    """Found by the payments expert review: during a Mastercard MAC 24-30 wait ("retry after 1 hour ... 10 days")
    that outlasts what the order permits, the answer said ``retryable: true`` beside ``retry_probability: 0``.
    The advice is the error's verdict: both fields now speak of the retry it plans, at the wait's end."""
    scorer = bundle if with_model else None
    request = make_request(
        currency="USD",
        customer={"country": "US"},
        payment={"card_network": "mastercard", **payment},
        failure={"error_code": "card_declined", "error_message": "Do not honor", "network_decline_code": "05",
                 "merchant_advice_code": mac},
    )  # fmt: skip
    decision = decide(request, make_merchant(), scorer, catalog=load_catalog(), config=GREEDY)
    assert decision.action != Action.RETRY  # the order itself may not retry
    assert f"mastercard_mac:{mac}" in decision.rules_applied
    threshold = (scorer or RulesOnlyScorer).retryable_threshold  # as decide() reads it
    assert decision.retry_probability > 0.0
    assert decision.retryable == (decision.retry_probability >= threshold)
    assert decision.retryable or with_model  # the priors rate a retry after a do-not-honor above the threshold
    # Without a wait, an order that may not retry keeps a retry probability of 0 (its budget spent, say).
    spent = _spent_budget_request(
        {"error_code": "processing_error", "error_message": None, "network_decline_code": "96"}
    )
    assert decide(spent, make_merchant(), scorer, catalog=load_catalog(), config=GREEDY).retry_probability == 0.0


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "rules-only"])
@pytest.mark.parametrize(
    "failure",
    [
        {"error_code": "card_declined", "error_message": None, "network_decline_code": code}
        for code in ("96", "51", "05", "91")
    ]
    # A configuration error: retry_same is weak, a cascade strong (the retry that made it flow-dependent).
    + [{"error_code": "weird_x", "error_message": "Issue with configurations", "network_decline_code": None,
        "unified_code": "UE_2000"}],
)  # fmt: skip
def test_retryable_does_not_depend_on_which_retry_flows_the_merchant_enabled(
    with_model: bool, failure: dict[str, Any], bundle: ModelBundle
) -> None:
    scorer = bundle if with_model else None
    request = make_request(payment={"card_network": "mastercard"}, failure=failure)
    verdicts = {
        tuple(flows): decide(
            request, make_merchant(retry={"flows": flows}), scorer, catalog=load_catalog(), config=GREEDY
        ).retryable
        for flows in (["retry_same", "cascade", "step_up", "clear_pan", "alternate_network"], ["retry_same"], [])
    }
    assert len(set(verdicts.values())) == 1, verdicts


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "rules-only"])
@pytest.mark.parametrize("offered", [[], ["adyen"], ["stripe"]])
def test_retryable_does_not_depend_on_which_connectors_are_offered_now(
    with_model: bool, offered: list[str], bundle: ModelBundle
) -> None:
    """(Contract check.) With ``available_connectors: []`` the same error was judged not retryable: retries on a
    connector not offered now were neither permitted nor counted as blocked by the order's situation."""
    scorer = bundle if with_model else None
    technical = {"error_code": "processing_error", "error_message": "An error occurred while processing your card.",
                 "network_decline_code": "96"}  # fmt: skip
    base = decide(make_request(failure=technical), make_merchant(), scorer, catalog=load_catalog(), config=GREEDY)
    request = make_request(failure=technical, available_connectors=offered)
    decision = decide(request, make_merchant(), scorer, catalog=load_catalog(), config=GREEDY)
    assert base.retryable
    assert decision.retryable == base.retryable
    if not offered:
        assert decision.action != Action.RETRY
        assert decision.retry_probability == 0.0


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "rules-only"])
def test_decisions_are_built_as_model_construct_builds_them(with_model: bool, bundle: ModelBundle) -> None:
    # decide() builds its answer without model_construct (policy._constructed): the same state, field by field.
    decision = decide(
        make_request(), make_merchant(), bundle if with_model else None, catalog=load_catalog(), config=EXPLORING
    )
    assert decision.alternatives
    for built in [decision, *decision.alternatives]:
        reference = type(built).model_construct(**dict(built))
        assert list(built.__dict__.items()) == list(reference.__dict__.items())
        assert built.__pydantic_fields_set__ == reference.__pydantic_fields_set__
        assert built.__pydantic_extra__ == reference.__pydantic_extra__
        assert built.__pydantic_private__ == reference.__pydantic_private__
        assert built == reference
        assert built.model_dump_json() == reference.model_dump_json()


def test_text_warm_up_caches_exactly_what_one_error_at_a_time_would_compute(bundle: ModelBundle) -> None:
    errors = [
        ("stripe", "card_declined", "Your card was declined."),
        ("adyen", "Refused", None),
        ("razorpay", "BAD_REQUEST_ERROR", "Payment processing failed due to error at bank or wallet gateway"),
        (None, None, None),
    ]
    one_by_one = dataclasses.replace(bundle.text_model, _cache={})  # same fitted parts, an empty cache
    expected = [one_by_one.features_for(*error) for error in errors]
    warmed = dataclasses.replace(bundle.text_model, _cache={})
    warmed.warm([*errors, errors[0]])  # a repeat is computed once
    assert warmed.cached_errors() == errors
    assert [warmed.features_for(*error) for error in errors] == expected  # from the cache, the same floats


def test_a_loaded_bundle_warmed_up_decides_as_a_cold_one_does(bundle: ModelBundle, tmp_path: Path) -> None:
    request, merchant = make_request(), make_merchant()
    decide(request, merchant, bundle, catalog=load_catalog())  # the serving model has now seen this error
    assert (request.failure.connector, request.failure.error_code, request.failure.error_message) in (
        bundle.seen_errors()
    )
    bundle.save(tmp_path / "bundle")
    cold, warm = ModelBundle.load(tmp_path / "bundle"), ModelBundle.load(tmp_path / "bundle")
    assert getattr(warm.retry_booster, "_winback_fast_predictor", None) is None
    assert getattr(warm.retry_booster, "_winback_path_table", None) is not None  # read with the bundle
    warm.warm_up(bundle.seen_errors())
    # What the first request would have built is there: predictors, explanation tables, the errors' text features.
    for booster in (warm.retry_booster, warm.retarget_booster):
        assert booster is not None
        assert getattr(booster, "_winback_fast_predictor", None) is not None
        assert getattr(booster, "_winback_path_table", None) is not None
    assert set(bundle.seen_errors()) <= set(warm.seen_errors())
    for config in (GREEDY, EXPLORING):
        options: dict[str, Any] = {"catalog": load_catalog(), "config": config, "decision_id": "dec_same"}
        decisions = [decide(request, merchant, one, rng=np.random.default_rng(3), **options) for one in (cold, warm)]
        assert decisions[0] == decisions[1]


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "rules-only"])
def test_an_order_already_paid_gets_stop(with_model: bool, bundle: ModelBundle) -> None:
    """A history whose later attempt succeeded (the caller asks about a failure it has since recovered, or sent
    the history out of order): the answer is stop, never a charge or a payment link."""
    history = {
        "attempts": [
            {"attempt_number": 1, "connector": "stripe", "strategy": "initial", "status": "failure",
             "error_code": "card_declined", "created_at": "2026-11-01T10:15:00Z"},
            {"attempt_number": 2, "connector": "adyen", "strategy": "cascade", "status": "success",
             "created_at": "2026-11-01T11:00:00Z"},
        ],
        "nudges": [],
    }  # fmt: skip
    request = make_request(event_time="2026-11-01T11:15:00Z", history=history)
    decision = decide(
        request, make_merchant(), bundle if with_model else None, catalog=load_catalog(), config=EXPLORING
    )
    assert (decision.action, decision.alternatives) == (Action.STOP, [])
    assert "order_already_paid" in decision.rules_applied


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "rules-only"])
def test_alternatives_are_every_other_permitted_action(with_model: bool, bundle: ModelBundle) -> None:
    """CONTRACT.md section 2: 'the other permitted actions, best first'. They were cut to five, so a permitted
    stop or channel could be missing from what an agent sees (seen in a black-box check of the demo request)."""
    # The demo request with a UK customer: an Indian card's renewal (an RBI e-mandate) has no cascades to list.
    request, merchant = make_request(customer={"country": "GB"}, currency="GBP"), make_merchant()
    decision = decide(request, merchant, bundle if with_model else None, catalog=load_catalog(), config=GREEDY)
    context = build_context(request, merchant, load_catalog())
    allowed, _ = permitted_grid(context)
    groups = {(c.action, c.strategy, c.connector, c.channel) for c in allowed}
    listed = [(a.action, a.strategy, a.connector, a.channel) for a in decision.alternatives]
    chosen = (decision.action, decision.strategy, decision.connector, decision.channel)
    assert len(listed) == len(set(listed))
    assert set(listed) == groups - {chosen}
    assert len(listed) > 5  # the demo request has more than the old cut


SCA_SOFT_DECLINE = {"error_code": "authentication_required", "error_message": "auth required",
                    "network_decline_code": "1A"}  # fmt: skip


@pytest.mark.parametrize("offered", [["adyen"], ["cybersource"], ["adyen", "cybersource"]])
def test_retryable_of_an_error_retried_on_its_own_connector_does_not_depend_on_the_offered_connectors(
    offered: list[str],
) -> None:
    """(Eighth review.) An SCA soft decline is recovered by step_up on the connector that failed. Offered only
    other connectors, it was judged not retryable: only cascades were scored for the verdict."""
    catalog, merchant = load_catalog(), make_merchant()
    one_off = {"is_recurring": False}  # a customer in session, who can authenticate a step-up
    base = decide(
        make_request(failure=SCA_SOFT_DECLINE, payment=one_off), merchant, None, catalog=catalog, config=GREEDY
    )
    request = make_request(failure=SCA_SOFT_DECLINE, payment=one_off, available_connectors=offered)
    decision = decide(request, merchant, None, catalog=catalog, config=GREEDY)
    assert base.retryable
    assert decision.retryable == base.retryable, (decision.retry_probability, base.retry_probability)


def test_an_sca_soft_decline_of_a_recurring_payment_goes_back_to_the_customer() -> None:
    """A recurring renewal is merchant-initiated: nobody is in session to authenticate, so when the issuer asks for
    authentication the customer must be brought back (Stripe). It was answered with a silent step_up right away."""
    catalog, merchant = load_catalog(), make_merchant()
    request = make_request(failure=SCA_SOFT_DECLINE, payment={"is_recurring": True})
    decision = decide(request, merchant, None, catalog=catalog, config=GREEDY)
    assert decision.action == Action.RETARGET
    assert all(alternative.strategy != Strategy.STEP_UP for alternative in decision.alternatives)


def _retry_strategies_served(request: Any, scorer: ModelBundle | None, seed: int) -> tuple[set[Strategy], Decision]:
    """Every retry strategy chosen or listed over 30 exploring decisions of ``request``, and the last decision."""
    rng = np.random.default_rng(seed)
    strategies: set[Strategy] = set()
    for _ in range(30):  # exploration draws differ between calls
        decision = decide(request, make_merchant(), scorer, catalog=load_catalog(), config=EXPLORING, rng=rng)
        strategies |= {c.strategy for c in _every_action(decision) if c.action is Action.RETRY and c.strategy}
    return strategies, decision


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "rules-only"])
def test_an_indian_card_renewal_is_never_cascaded_to_another_gateway(with_model: bool, bundle: ModelBundle) -> None:
    """The contract's example (an Indian customer's card renewal in INR) failed for a technical fault: a cascade
    scores best, and was chosen, though the RBI e-mandate it runs on is registered through the gateway that failed.
    Neither the choice, nor exploration, nor the alternatives may cascade it; retry_same on that gateway stays."""
    request = make_request(
        failure={"connector": "stripe", "error_code": "processing_error", "error_message": None,
                 "network_decline_code": "91"},
    )  # fmt: skip
    strategies, decision = _retry_strategies_served(request, bundle if with_model else None, seed=11)
    assert Strategy.CASCADE not in strategies
    assert Strategy.RETRY_SAME in strategies
    assert "rbi_card_e_mandate" in decision.rules_applied


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "rules-only"])
def test_insufficient_funds_on_a_debit_card_never_goes_over_an_alternate_network(
    with_model: bool, bundle: ModelBundle
) -> None:
    """An alternate debit network draws on the same account: it cannot cure insufficient funds. It was offered,
    listed and explored (the priors rate it like a cascade after payday). A retry after payday or a link remain."""
    request = make_request(
        currency="USD",
        customer={"country": "US"},
        failure={"connector": "stripe", "error_code": "card_declined", "error_message": None,
                 "network_decline_code": "51"},
        payment={"is_recurring": True, "payment_method_type": "debit", "card_network": "mastercard"},
    )  # fmt: skip
    strategies, decision = _retry_strategies_served(request, bundle if with_model else None, seed=5)
    assert Strategy.ALTERNATE_NETWORK not in strategies
    assert Strategy.RETRY_SAME in strategies
    assert "alternate_network_same_account" in decision.rules_applied


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "rules-only"])
@pytest.mark.parametrize(("network", "code"), [("visa", "1A"), ("mastercard", "65")], ids=["visa-1A", "mastercard-65"])
@pytest.mark.parametrize("failed_at", ["2026-11-02T19:30:00Z", "2026-11-02T23:30:00Z"], ids=["20:30", "00:30"])
def test_an_sca_renewals_payment_link_goes_when_the_quiet_hours_end_not_days_later(
    network: str, code: str, failed_at: str, with_model: bool, bundle: ModelBundle
) -> None:
    """Found by the payments expert review: a German subscription renewal declined for strong customer
    authentication (Visa 1A, Mastercard 65) in the evening got its payment link 3 days later. The customer must
    come back on session to authenticate, and a link is the only way: it goes at the end of the quiet hours. The
    skip-days cadence (Days 0, 3, 6 at skip_days 2) held the first link too, though it only spaces retriggers."""
    merchant = make_merchant(
        connectors=["adyen", "stripe"],
        retarget={"channels": ["email", "sms"], "skip_days": 2, "retry_window_days": 10,
                  "quiet_hours": {"start": "20:00", "end": "09:00", "timezone": "Europe/Berlin"}},
    )  # fmt: skip
    request = make_request(
        event_time=failed_at,
        currency="EUR",
        customer={"country": "DE"},
        payment={"card_network": network, "is_recurring": True},
        failure={"connector": "adyen", "error_code": "card_declined", "error_message": "Authentication required",
                 "network_decline_code": code},
        history={"attempts": [{"attempt_number": 1, "connector": "adyen", "strategy": "initial",
                               "status": "failure", "error_code": "card_declined", "created_at": failed_at}]},
        available_connectors=None,
    )  # fmt: skip
    decision = decide(request, merchant, bundle if with_model else None, catalog=load_catalog(), config=GREEDY)
    assert decision.action == Action.RETARGET
    assert decision.execute_at == datetime(2026, 11, 3, 8, 0, tzinfo=UTC)  # 09:00 in Berlin, the next morning
    assert "skip_days:2" in decision.rules_applied


@pytest.mark.parametrize("code", ["51", "61", "65"])
@pytest.mark.parametrize("with_model", [True, False], ids=["model", "rules-only"])
def test_insufficient_funds_or_a_limit_is_never_cascaded_the_same_day(
    code: str, with_model: bool, bundle: ModelBundle
) -> None:
    """Another acquirer reaches the same issuer and account: a cascade at once after insufficient funds or a limit
    is declined again. It was offered, listed and explored; now it waits a day, and the answer says why."""
    request = make_request(
        currency="USD",
        customer={"country": "US"},
        failure={"connector": "stripe", "error_code": "card_declined", "error_message": None,
                 "network_decline_code": code},
    )  # fmt: skip
    rng = np.random.default_rng(11)
    cascades = []
    for _ in range(30):  # exploration draws differ between calls
        decision = decide(
            request, make_merchant(), bundle if with_model else None, catalog=load_catalog(), config=EXPLORING, rng=rng
        )
        cascades += [c for c in _every_action(decision) if c.strategy is Strategy.CASCADE]
    assert cascades  # a day later, the account may have changed: another connector is as good a path
    assert min(c.execute_at for c in cascades) >= request.event_time + timedelta(hours=24)
    assert "cascade_same_account:24h" in decision.rules_applied


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "rules-only"])
def test_a_recurring_upi_payment_is_retried_silently_as_autopay_off_peak(with_model: bool, bundle: ModelBundle) -> None:
    """A recurring UPI payment sent as `upi` (not `mandate`) is an AutoPay debit: it was taken for a collect the
    customer approves and got no silent retry. Now it gets AutoPay's: off NPCI's peak hours, never cascaded."""
    peak = datetime(2026, 11, 1, 11, 0, tzinfo=ZoneInfo("Asia/Kolkata")).astimezone(UTC)  # 11:00 IST: peak hours
    request = make_request(
        event_time=peak.isoformat(),
        payment={"payment_method": "upi", "payment_method_type": None, "card_network": None, "is_recurring": True},
        failure={"connector": "razorpay", "error_code": "XY", "error_message": "Remitter CBS offline",
                 "network_decline_code": "XY"},
        history={"attempts": [{"attempt_number": 1, "connector": "razorpay", "strategy": "initial",
                               "status": "failure", "error_code": "XY", "created_at": peak.isoformat()}]},
        available_connectors=["razorpay", "payu"],
    )  # fmt: skip
    merchant = make_merchant(connectors=["razorpay", "payu"])
    decision = decide(request, merchant, bundle if with_model else None, catalog=load_catalog(), config=GREEDY)
    retries = [c for c in _every_action(decision) if c.action is Action.RETRY]
    assert retries, decision
    assert "upi_recurring_autopay" in decision.rules_applied
    assert "user_consent_flow" not in decision.rules_applied
    context = build_context(request, merchant, load_catalog())
    for candidate in retries:
        assert candidate.strategy is Strategy.RETRY_SAME
        assert candidate.connector == "razorpay"
        assert not in_upi_peak_hours(context, candidate.execute_at), candidate.execute_at


def test_an_autopay_debit_npci_fully_reversed_is_retried_silently_off_peak() -> None:
    """NPCI's 21 on UPI is "no action taken (full reversal)": UPI put a timed-out transaction back, a technical
    decline. It was read with the card table's 21 (an issuer's refusal, do not honour), so an AutoPay debit got a
    payment link six hours later instead of AutoPay's silent retry off NPCI's peak hours."""
    at = datetime(2026, 11, 2, 3, 0, tzinfo=ZoneInfo("Asia/Kolkata")).astimezone(UTC)  # 03:00 IST, off-peak
    request = make_request(
        event_time=at.isoformat(),
        payment={"payment_method": "upi_autopay", "payment_method_type": "mandate", "card_network": None,
                 "is_recurring": True},
        failure={"connector": "razorpay", "error_code": "21", "error_message": None, "network_decline_code": "21"},
        history={"attempts": [{"attempt_number": 1, "connector": "razorpay", "strategy": "initial",
                               "status": "failure", "error_code": "21", "created_at": at.isoformat()}]},
        available_connectors=["razorpay", "payu"],
    )  # fmt: skip
    merchant = make_merchant(connectors=["razorpay", "payu"])
    decision = decide(request, merchant, None, catalog=load_catalog(), config=GREEDY)
    assert (decision.action, decision.strategy, decision.connector) == (Action.RETRY, Strategy.RETRY_SAME, "razorpay")
    assert not in_upi_peak_hours(build_context(request, merchant, load_catalog()), decision.execute_at)
    assert decision.retryable


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "rules-only"])
def test_a_suspected_fraud_renewal_is_never_retried_silently_and_is_not_retryable(
    with_model: bool, bundle: ModelBundle
) -> None:
    """A subscription renewal the issuer declined as suspected fraud (Visa 59) goes back to the customer, who must
    confirm with their bank or pay another way: no silent retry is chosen, explored or listed, and ``retryable`` is
    false. It was served retryable about half the time, and exploration cascaded such cards to other acquirers."""
    request = make_request(
        failure={
            "connector": "stripe",
            "error_code": "fraudulent",
            "error_message": None,
            "network_decline_code": "59",
        },
        payment={"is_recurring": True, "payment_method_type": "debit", "is_network_token": True},
    )
    rng = np.random.default_rng(3)
    for _ in range(20):  # exploration draws differ between calls
        decision = decide(
            request, make_merchant(), bundle if with_model else None, catalog=load_catalog(), config=EXPLORING, rng=rng
        )
        assert [c.action for c in _every_action(decision) if c.action is Action.RETRY] == []
        assert not decision.retryable
        assert "suspected_fraud" in decision.rules_applied


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "rules-only"])
def test_exploration_never_picks_stop_and_its_propensities_add_up(with_model: bool, bundle: ModelBundle) -> None:
    """Stop's outcome is known (the order fails): exploring it teaches nothing and costs the order. It was drawn
    like any candidate, and an executor order whose only channel was down failed that way. Over many draws, the
    chosen action is the greedy one or an explored non-stop candidate, and each logged propensity is what the
    policy's distribution gives it: 1 - epsilon + epsilon / n for the greedy choice, epsilon / n for another."""
    scorer = bundle if with_model else None
    request, merchant = make_request(), make_merchant()
    greedy = decide(request, merchant, scorer, catalog=load_catalog(), config=GREEDY, rng=np.random.default_rng(0))
    allowed, _ = permitted_grid(build_context(request, merchant, load_catalog()))
    explorable = sum(candidate.action != Action.STOP for candidate in allowed)
    assert explorable > 1
    rng = np.random.default_rng(3)
    chosen = [decide(request, merchant, scorer, catalog=load_catalog(), config=EXPLORING, rng=rng) for _ in range(300)]
    assert all(decision.action != Action.STOP for decision in chosen)
    explored = [d for d in chosen if (d.action, d.execute_at, d.strategy, d.connector, d.channel) != (
        greedy.action, greedy.execute_at, greedy.strategy, greedy.connector, greedy.channel)]  # fmt: skip
    assert 100 < len(explored) < 200
    assert {d.propensity for d in explored} == {round(0.5 / explorable, 6)}
    kept = [d for d in chosen if d not in explored]
    assert {d.propensity for d in kept} == {round(0.5 + 0.5 / explorable, 6)}


def test_with_nothing_worth_doing_exploration_still_tries_a_permitted_action() -> None:
    """The greedy choice is stop (rules-only, a payment link costs more than a tiny order is worth): exploration
    still draws among the other permitted actions, which is how the policy learns they were worth more."""
    request, merchant = make_request(amount=0.01), make_merchant()
    greedy = decide(request, merchant, None, catalog=load_catalog(), config=GREEDY, rng=np.random.default_rng(0))
    assert greedy.action == Action.STOP
    allowed, _ = permitted_grid(build_context(request, merchant, load_catalog()))
    explorable = sum(candidate.action != Action.STOP for candidate in allowed)
    rng = np.random.default_rng(3)
    chosen = [decide(request, merchant, None, catalog=load_catalog(), config=EXPLORING, rng=rng) for _ in range(200)]
    stops = [d for d in chosen if d.action == Action.STOP]
    assert 60 < len(stops) < 140
    assert {d.propensity for d in stops} == {0.5}
    assert {d.propensity for d in chosen if d.action != Action.STOP} == {round(0.5 / explorable, 6)}


_ISSUER_DOWN = {
    "connector": "stripe",
    "error_code": "issuer_not_available",
    "error_message": "The card issuer could not be reached.",
    "network_decline_code": "91",
}
_PROCESSOR_ERROR = {
    "connector": "stripe",
    "error_code": "processing_error",
    "error_message": "An error occurred while processing your card.",
    "network_decline_code": "96",
}


class _ImmediateRetriesOnly:
    """A model that cannot tell one delay from another (P(success) 0.30 for every retry), trained on a history like
    the simulator's: its logging policy retried technical declines at once (2 s, into the fault still in place: 2%
    succeeded) or days later (45%), and hardly ever an hour or a few hours after the failure."""

    version = "stub-immediate-retries-only"
    retryable_threshold = DEFAULT_RETRYABLE_THRESHOLD

    def __init__(self, error_class: str) -> None:
        from model.cellsupport import CellSupport, cell_keys, cell_rows

        hours = [0.0005] * 400 + [72.0] * 100  # hours from the first failure to each logged retry
        labels = [1.0] * 8 + [0.0] * 392 + [1.0] * 45 + [0.0] * 55
        keys = cell_keys([error_class] * 500, ["retry"] * 500, ["retry_same"] * 500, [None] * 500, hours)
        self.cells = CellSupport(cell_rows(keys, labels, [0.30] * 500))

    def score(self, request: Any, candidates: list[Candidate]) -> np.ndarray:
        return np.array([0.30 if c.action == Action.RETRY else 0.01 if c.action == Action.RETARGET else 0.0
                         for c in candidates])  # fmt: skip

    def explain(self, request: Any, candidate: Candidate, k: int = 3) -> list[str]:
        return []

    def cell_table(self, error_class: str) -> np.ndarray:
        return self.cells.of_class(error_class)


@pytest.mark.parametrize("connectors", [["stripe"], ["stripe", "adyen", "cybersource"]], ids=["one", "three"])
@pytest.mark.parametrize(
    ("failure", "error_class"),
    [(_ISSUER_DOWN, "issuer_technical"), (_PROCESSOR_ERROR, "processor_technical")],
    ids=["issuer-91", "processor-96"],
)
@pytest.mark.parametrize("with_model", [True, False], ids=["model", "rules-only"])
def test_a_technical_decline_of_a_recurring_payment_is_retried_within_hours_not_days(
    failure: dict[str, Any], error_class: str, connectors: list[str], with_model: bool
) -> None:
    """A merchant-initiated renewal declined for a technical fault (issuer unavailable, processor error) is retried
    silently within hours, not a day or three later: the fault clears in minutes to hours, so waiting a day only
    delays the money. Neither the priors (which once rated a retry 20 h on above one within hours) nor a model
    whose only evidence within 20 h is from retries seconds after the failure make it wait; the choice comes out of
    the values (the same retry is as likely within hours as days later, and money sooner is worth more)."""
    request = make_request(failure=failure, available_connectors=connectors,
                           history={"attempts": [{"attempt_number": 1, "connector": "stripe", "strategy": "initial",
                                                  "status": "failure", "error_code": failure["error_code"],
                                                  "created_at": "2026-11-01T10:15:00Z"}]})  # fmt: skip
    merchant = make_merchant(connectors=connectors)
    scorer = _ImmediateRetriesOnly(error_class) if with_model else None
    decision = decide(request, merchant, scorer, catalog=load_catalog(), config=GREEDY)
    assert request.payment.is_recurring
    assert decision.action == Action.RETRY
    assert decision.execute_at - request.event_time < timedelta(hours=20), decision


def _visa_category_1_codes() -> list[str]:
    return [row["code"] for row in _catalog_csv("visa_categories.csv") if row["category"] == "1"]


def _mac_never_retry_codes() -> list[str]:
    return [row["code"] for row in _catalog_csv("mastercard_mac.csv") if row["never_retry"] == "true"]


def _spellings(code: str) -> st.SearchStrategy[str]:
    """A code as callers spell it: as listed, lower case, padded with spaces, numeric ones with or without zeros."""
    forms = {code, code.lower(), f" {code} "}
    if code.isdigit():
        forms |= {str(int(code)), code.zfill(3)}
    return st.sampled_from(sorted(forms))


@st.composite
def never_retried(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """A random scenario whose failure is a Visa category-1 decline of a Visa card (its network code, or only a
    connector code that carries one) or carries a Mastercard merchant advice code that forbids any retry."""
    request, merchant = draw(scenarios())
    payment, failure = dict(request["payment"]), dict(request["failure"])
    kind = draw(st.sampled_from(["visa_category_1", "visa_connector_code", "mac"]))
    if kind == "mac":
        failure["merchant_advice_code"] = draw(st.sampled_from(_mac_never_retry_codes()).flatmap(_spellings))
        payment["card_network"] = draw(st.sampled_from(["mastercard", "Mastercard", "maestro", "visa", "rupay", None]))
    else:
        payment["card_network"] = draw(st.sampled_from(["visa", "Visa", " VISA "]))
        if kind == "visa_category_1":
            failure["network_decline_code"] = draw(st.sampled_from(_visa_category_1_codes()).flatmap(_spellings))
        else:  # Stripe's lost_card, stolen_card and pickup_card carry 41, 43 and 04
            failure |= {"connector": "stripe", "network_decline_code": None}
            failure["error_code"] = draw(st.sampled_from(["lost_card", "stolen_card", "pickup_card"]))
    return {**request, "payment": payment, "failure": failure}, merchant


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "rules-only"])
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])
@given(scenario=never_retried())
def test_no_retry_is_ever_offered_after_a_visa_category_1_decline_or_a_never_retry_mac(
    with_model: bool, bundle: ModelBundle, scenario: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    """CONTRACT.md section 2: a Visa category-1 response code and a Mastercard MAC 03 or 21 (and 22, catalogued as
    never retried) are never violated, however the caller spells the code or the network, and whatever the model or
    the exploration draws: no silent retry as the action, nor among the alternatives."""
    request_data, merchant_data = scenario
    request, merchant = make_request(**request_data), make_merchant(**merchant_data)
    rng = np.random.default_rng(11)
    for _ in range(3):
        decision = decide(
            request, merchant, bundle if with_model else None, catalog=load_catalog(), config=EXPLORING, rng=rng
        )
        actions = [decision.action, *(alternative.action for alternative in decision.alternatives)]
        assert Action.RETRY not in actions, (decision.action, decision.rules_applied)
        assert not decision.retryable


_CARD_ONE_OFF_US = {"payment_method": "card", "payment_method_type": "credit", "is_recurring": False}
_UPI_ONE_OFF = {"payment_method": "upi", "payment_method_type": "collect", "card_network": None, "is_recurring": False}
_NETBANKING = {"payment_method": "netbanking", "payment_method_type": None, "card_network": None, "is_recurring": False}


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "rules-only"])
@pytest.mark.parametrize(
    ("payment", "failure", "customer"),
    [
        (_CARD_ONE_OFF_US, {"error_code": "timeout", "error_message": "Request timed out"}, {"country": "US"}),
        ({}, {"error_code": "504", "error_message": "Gateway Timeout"}, {}),
        ({}, {"error_code": "processing_error", "error_message": "No response from issuer"}, {}),
        (_UPI_ONE_OFF, {"connector": "razorpay", "error_code": "pending", "error_message": "Payment is pending"}, {}),
        (_NETBANKING, {"connector": "payu", "error_code": "E1", "error_message": "Transaction timed out"}, {}),
    ],
    ids=["card-timeout", "card-504", "card-no-response", "upi-pending", "netbanking-timeout"],
)
def test_a_failure_whose_outcome_is_unknown_gets_no_new_attempt_or_link_before_it_can_be_known(
    payment: dict[str, Any], failure: dict[str, Any], customer: dict[str, Any], with_model: bool, bundle: ModelBundle
) -> None:
    """The first attempt may still be authorised late (Razorpay keeps asking the bank for 3 days): a cascade at
    +2 s, a re-attempt at +6 h or a payment link paid meanwhile would charge the customer twice."""
    request = make_request(
        payment=payment, customer=customer, failure={**failure, "network_decline_code": None}, currency="USD"
    )
    decision = decide(request, make_merchant(), bundle if with_model else None, catalog=load_catalog(), config=GREEDY)
    known_at = request.event_time + timedelta(hours=72)
    assert "outcome_unknown:72h" in decision.rules_applied
    assert any("may yet succeed" in reason for reason in decision.reasons), decision.reasons
    for candidate in _every_action(decision):
        if candidate.action != Action.STOP:
            assert candidate.execute_at >= known_at, candidate


def test_a_definite_technical_decline_is_not_held_as_an_unknown_outcome() -> None:
    request = make_request(
        failure={"error_code": "processing_error", "error_message": "An error occurred while processing your card.",
                 "network_decline_code": "96"},
    )  # fmt: skip
    decision = decide(request, make_merchant(), None, catalog=load_catalog(), config=GREEDY)
    assert not any(rule.startswith("outcome_unknown") for rule in decision.rules_applied)
    assert decision.execute_at < request.event_time + timedelta(hours=72)


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "rules-only"])
def test_an_earlier_attempt_whose_outcome_is_unknown_holds_the_order_too(with_model: bool, bundle: ModelBundle) -> None:
    """Attempt 1 timed out on stripe; the caller cascaded to adyen itself, which declined for insufficient funds a
    minute later. Attempt 1 may still be authorised late: no cybersource cascade, no re-attempt and no link yet."""
    start = datetime(2026, 11, 1, 10, 15, tzinfo=UTC)
    attempts = [
        {"attempt_number": 1, "connector": "stripe", "strategy": "initial", "status": "failure",
         "error_code": "timeout", "created_at": start.isoformat()},
        {"attempt_number": 2, "connector": "adyen", "strategy": "cascade", "status": "failure",
         "error_code": "Refused", "created_at": (start + timedelta(minutes=1)).isoformat()},
    ]  # fmt: skip
    request = make_request(
        event_time=(start + timedelta(minutes=1)).isoformat(),
        currency="USD",
        customer={"country": "US"},
        failure={"connector": "adyen", "error_code": "Refused", "error_message": "Not enough balance",
                 "network_decline_code": None},
        history={"attempts": attempts, "nudges": []},
    )  # fmt: skip
    decision = decide(request, make_merchant(), bundle if with_model else None, catalog=load_catalog(), config=GREEDY)
    assert "outcome_unknown:72h" in decision.rules_applied
    for candidate in _every_action(decision):
        if candidate.action != Action.STOP:
            assert candidate.execute_at >= start + timedelta(hours=72), candidate
