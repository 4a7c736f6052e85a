"""Planning FX rates (data/economics/costs.yaml) against the currencies whose unit is far from a dollar, and what
an order in a currency without one is worth to the policy."""

from __future__ import annotations

from decimal import Decimal

import numpy as np
import pytest
import yaml

from model.catalog import load_catalog
from model.money import (
    COSTS_FILE,
    _minor_units_table,
    charged_amount,
    format_amount,
    format_money,
    load_economics,
)
from model.policy import PolicyConfig, decide
from model.requests import Decision
from tests.factories import make_merchant, make_request

#: ISO 4217 funds codes (index units, not money a customer pays in): no planning rate is needed.
FUNDS_CODES = {"CLF", "UYI", "UYW"}


def test_every_currency_without_two_decimals_has_a_planning_rate() -> None:
    # Read at par, 500,000 VND was valued as 500,000 USD and 15.125 KWD as 15 USD: every recovery choice weighs
    # the order's value against the cost of trying.
    economics = load_economics()
    currencies = set(_minor_units_table()) - FUNDS_CODES
    assert sorted(c for c in currencies if not economics.knows_currency(c)) == []


@pytest.mark.parametrize(
    ("amount", "currency", "low", "high"),
    [
        (15.125, "KWD", 45.0, 55.0),
        (500_000, "VND", 15.0, 25.0),
        (10_000, "XOF", 15.0, 18.0),
        (1_000, "BHD", 2_600, 2_700),
        (150_000, "IDR", 7.0, 12.0),
        (10_000, "HUF", 20.0, 35.0),
        (1_000, "THB", 20.0, 35.0),
        (100, "SAR", 26.0, 27.0),
    ],
)
def test_amounts_far_from_a_dollar_are_valued_in_their_own_order_of_magnitude(
    amount: float, currency: str, low: float, high: float
) -> None:
    assert low <= load_economics().to_usd(amount, currency) <= high


#: ISO 4217 currencies (two decimals) without a planning rate in the shipped table.
UNRATED = ["NGN", "PKR", "EGP", "XYZ"]


@pytest.mark.parametrize("currency", UNRATED)
def test_a_currency_without_a_rate_has_no_usd_amount_and_a_fixed_order_value(currency: str) -> None:
    # Read at par, 150,000 NGN counted as 150,000 USD: every cost/value trade-off of the order was distorted.
    economics = load_economics()
    assert not economics.knows_currency(currency)
    assert economics.to_usd(150_000, currency) is None
    fixed = yaml.safe_load(COSTS_FILE.read_text(encoding="utf-8"))["unknown_currency_value_usd"]
    assert economics.order_value_usd(150_000, currency) == economics.order_value_usd(0.5, currency) == fixed
    assert fixed <= 100.0  # a small order: nothing dear is bought on a guess


def _decide(amount: float, currency: str) -> Decision:
    request = make_request(
        amount=amount,
        currency=currency,
        failure={"error_code": "card_declined", "error_message": "Your card has insufficient funds.",
                 "network_decline_code": "51"},
    )  # fmt: skip
    config = PolicyConfig(exploration=0.0, exploration_rare_code=0.0)
    return decide(request, make_merchant(), None, catalog=load_catalog(), config=config, rng=np.random.default_rng(0))


@pytest.mark.parametrize("currency", UNRATED)
def test_an_unknown_currency_is_flagged_and_its_amount_does_not_move_the_decision(currency: str) -> None:
    tiny, huge = _decide(0.5, currency), _decide(150_000_000, currency)
    for decision in (tiny, huge):
        assert f"currency_value_unknown:{currency}" in decision.rules_applied
        assert any(f"no USD rate for {currency}" in r for r in decision.reasons)
    chosen = ("action", "strategy", "connector", "channel", "execute_at", "expected_success", "alternatives")
    assert [getattr(tiny, name) for name in chosen] == [getattr(huge, name) for name in chosen]


def test_a_rated_currency_is_not_flagged() -> None:
    small, large = _decide(10, "USD"), _decide(10_000, "USD")
    for decision in (small, large):
        assert not any(rule.startswith("currency_value_unknown") for rule in decision.rules_applied)
        assert not any("no USD rate" in reason for reason in decision.reasons)


@pytest.mark.parametrize(
    ("amount", "currency", "charged", "shown"),
    [
        (14_999.999, "INR", Decimal("15000.00"), "15,000.00"),  # half up to paise: what the issuer sees
        (15_000.004, "inr", Decimal("15000.00"), "15,000.00"),
        (0.1 + 0.2, "USD", Decimal("0.30"), "0.30"),  # the float's shortest decimal, not 0.30000000000000004
        (12.3455, "KWD", Decimal("12.346"), "12.346"),
        (1_200.5, "JPY", Decimal("1201"), "1,201"),
    ],
)
def test_an_amount_is_compared_and_shown_as_charged(amount: float, currency: str, charged: Decimal, shown: str) -> None:
    assert charged_amount(amount, currency) == charged
    assert format_amount(amount, currency, grouped=True) == shown


@pytest.mark.parametrize(
    ("amount", "currency", "text"),
    [
        (1499.0, "INR", "₹1,499.00"),
        (12.5, "usd", "$12.50"),
        (1200.0, "JPY", "¥1,200"),
        (3.0, "CHF", "3.00 CHF"),
        (12345.678, "KWD", "12,345.678 KWD"),
        (10.0, "HUF", "10.00 HUF"),
    ],
)
def test_money_is_written_in_the_orders_currency(amount: float, currency: str, text: str) -> None:
    assert format_money(amount, currency) == text


@pytest.mark.parametrize("amount", [1e26, 1e308])
def test_an_absurdly_large_amount_still_gets_a_decision(amount: float) -> None:
    """A finite amount is valid input: 1e26 INR and more raised decimal.InvalidOperation out of the rounding to
    paise (Python's 28 digits), so the API answered 500 instead of a decision (an e-mandate's AFA limit compares
    the charged amount)."""
    assert charged_amount(amount, "INR") == Decimal(repr(amount))
    assert format_amount(amount, "INR").endswith(".00")
    assert _decide(amount, "INR").action in {"retry", "retarget", "stop"}
