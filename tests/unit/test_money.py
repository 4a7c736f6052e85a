"""Planning FX rates (data/economics/costs.yaml) against the currencies whose unit is far from a dollar."""

from __future__ import annotations

import pytest

from model.money import _minor_units_table, load_economics

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
    ],
)
def test_amounts_far_from_a_dollar_are_valued_in_their_own_order_of_magnitude(
    amount: float, currency: str, low: float, high: float
) -> None:
    assert low <= load_economics().to_usd(amount, currency) <= high
