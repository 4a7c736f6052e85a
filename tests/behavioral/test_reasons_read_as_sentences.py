"""A decision's ``reasons`` are read by agents in the console (CONTRACT.md section 2): short sentences, never the
model's internals. Every token the model uses internally comes from the trained feature spec (its column names,
its missing-value sentinel, its own category values) and from the error catalog (which table decided), so a new
feature is checked without anyone listing it here.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from model import catalog as catalog_module
from model.bundle import ModelBundle
from model.catalog import load_catalog
from model.explanations import error_reason
from model.features import MISSING, OTHER_CODE, FeatureSpec
from model.policy import PolicyConfig, decide
from model.requests import DecisionRequest
from model.training import train
from model.vocab import ErrorClass, Strategy
from tests.behavioral.test_policy_behaviour import _every_action
from tests.factories import make_history_frames, make_merchant, make_request
from tests.unit.test_rules import scenarios

EXPLORING = PolicyConfig(exploration=0.3, exploration_rare_code=0.3)
#: The score-contribution notation explain() once appended: "issuer HDFC (+)".
_SIGN_NOTATION = re.compile(r"\([+-]\)")
#: A number printed as the model holds it ("days since first failure 2.99028").
_BARE_FLOAT = re.compile(r"\d\.\d{3,}")


def internal_tokens(spec: FeatureSpec) -> set[str]:
    """What must never reach an agent: the spec's feature names that are identifiers (``next_payday_before_exec``;
    one-word names such as ``issuer`` are plain English), its missing-value sentinel and the "other" sentinel, the
    spec's own categories of winback's closed vocabularies (``insufficient_funds``, ``retry_same``), and the
    catalog's table names (``iso8583``, ``npci_upi``)."""
    tokens = {name for name in spec.columns if "_" in name}
    tokens |= {MISSING, "__other__"}
    for name in ("error_class", "strategy", "authentication_type"):
        tokens |= {value for value in spec.vocabularies.get(name, []) if "_" in value}
    tokens |= {c.value for c in ErrorClass if "_" in c.value} | {s.value for s in Strategy if "_" in s.value}
    tokens |= {catalog_module.ISO8583, catalog_module.NPCI_UPI, catalog_module.UNIFIED}
    return tokens


def leaks(reasons: list[str], tokens: set[str]) -> list[str]:
    """The reasons that show an internal token, a sign notation or a bare float (``2.99028``)."""
    return [
        reason
        for reason in reasons
        if any(token in reason for token in tokens) or _SIGN_NOTATION.search(reason) or _BARE_FLOAT.search(reason)
    ]


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    attempts, nudges = make_history_frames(1500, seed=5)
    # A third of the orders without an issuer: frequent enough for the sentinel to get its own category.
    orders = attempts["order_id"].str.rsplit("_", n=1).str[-1].astype(int)
    attempts.loc[orders % 3 == 0, "issuer"] = None
    return train(attempts, nudges, seed=0, max_rounds=40, evaluate_unseen_codes=False).bundle


def _walk(request: DecisionRequest, merchant_data: dict[str, Any], bundle: ModelBundle, seed: int) -> list[str]:
    """Every reason of a decision with the model and one rules-only, plus the model's whole explanation (every
    feature that moved the score) of each action the decision offers."""
    merchant, tokens = make_merchant(**merchant_data), internal_tokens(bundle.spec)
    rng = np.random.default_rng(seed)
    reasons: list[str] = []
    for scorer in (bundle, None):
        decision = decide(request, merchant, scorer, catalog=load_catalog(), config=EXPLORING, rng=rng)
        reasons += decision.reasons
        if scorer is bundle:
            for candidate in _every_action(decision):
                reasons += bundle.explain(request, candidate, k=len(bundle.spec.columns))
    assert leaks(reasons, tokens) == []
    return reasons


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])
@given(scenario=scenarios())
def test_reasons_of_random_decisions_show_no_internal_token(
    bundle: ModelBundle, scenario: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    request_data, merchant_data = scenario
    _walk(make_request(**request_data), merchant_data, bundle, seed=7)


@pytest.mark.parametrize(
    "overrides",
    [
        {"payment": {"issuer": None}},
        {"payment": {"issuer": "A Bank Never Seen"}},
        {"currency": "XYZ", "customer": {"country": None}},
        {"failure": {"connector": "brand_new_psp", "error_code": "FUNDS_LOW_9", "network_decline_code": None,
                     "error_message": "Insufficient balance"}},
        {"failure": {"error_code": "insufficient_funds", "error_message": "Your card has insufficient funds.",
                     "network_decline_code": "51"}},
        {"failure": {"error_code": "card_declined", "error_message": None, "network_decline_code": "05"}},
        {"failure": {"error_code": "processing_error", "error_message": "An error occurred.",
                     "network_decline_code": "96"}},
    ],
    ids=["no-issuer", "new-issuer", "unknown-currency", "new-code", "funds", "do-not-honor", "technical"],
)  # fmt: skip
def test_reasons_of_typical_failures_show_no_internal_token(bundle: ModelBundle, overrides: dict[str, Any]) -> None:
    reasons = _walk(make_request(**overrides), {}, bundle, seed=3)
    assert len(reasons) >= 4  # the walk did explain something


def _claim(reason: str) -> str:
    """What a reason states, without its detail: "the failure reads as insufficient funds" of both "... (judged
    by stripe's error code)" and "...: raises the chance of success"."""
    return reason.split(":")[0].split(" (")[0]


@pytest.mark.parametrize("raises", [True, False])
def test_the_models_evidence_does_not_repeat_the_catalogs_reading(bundle: ModelBundle, raises: bool) -> None:
    """Every decision's reasons open with the catalog's reading of the failure (error_reason); when the error class
    is among the model's top evidence, it must not state the same thing again in the same words."""
    catalog = load_catalog()
    error = catalog.normalise("stripe", "insufficient_funds", "Your card has insufficient funds.", "51")
    code = float(bundle.spec.vocabularies["error_class"].index(error.error_class.value) + 1)
    evidence = bundle.feature_reason("error_class", code, raises=raises)
    assert evidence is not None
    assert _claim(evidence) != _claim(error_reason(error)), evidence


def test_a_message_unlike_a_class_is_not_said_to_read_like_it(bundle: ModelBundle) -> None:
    """A 2% likeness to a technical fault is evidence that the message is not one, and reads so."""
    name = f"text_p_{ErrorClass.PROCESSOR_TECHNICAL.value}"
    assert bundle.feature_reason(name, 0.02, raises=True) == (
        "the error message does not read like a technical fault at the payment processor (2%): "
        "raises the chance of success"
    )
    assert bundle.feature_reason(name, 0.91, raises=False) == (
        "the error message reads like a technical fault at the payment processor (91%): lowers the chance of success"
    )


def _codes(spec: FeatureSpec, name: str) -> list[float]:
    return [float(OTHER_CODE), *(float(code) for code in range(1, len(spec.vocabularies[name]) + 1))]


def test_every_feature_of_the_spec_reads_as_a_sentence(bundle: ModelBundle) -> None:
    """Each column at each of its categories (rare, missing included) or at typical numbers, either way."""
    spec, tokens = bundle.spec, internal_tokens(bundle.spec)
    for name in spec.columns:
        values = _codes(spec, name) if name in spec.vocabularies else [math.nan, 0.0, 1.0, 2.99028, 30.0]
        for value in values:
            for raises in (True, False):
                text = bundle.feature_reason(name, value, raises=raises)
                assert text, (name, value)
                assert leaks([text], tokens) == [], (name, value)
                assert ("raises" if raises else "lowers") in text, text


def test_a_missing_issuer_is_said_in_words(bundle: ModelBundle) -> None:
    missing = float(bundle.spec.vocabularies["issuer"].index(MISSING) + 1)
    assert bundle.feature_reason("issuer", missing, raises=False) == "no issuer given: lowers the chance of success"
    hdfc = float(bundle.spec.vocabularies["issuer"].index("HDFC") + 1)
    assert bundle.feature_reason("issuer", hdfc, raises=True) == "the issuer is HDFC: raises the chance of success"
    assert bundle.feature_reason("next_payday_before_exec", 1.0, raises=True) == (
        "a payday (the 1st or 26th) comes before the attempt: raises the chance of success"
    )
