"""Money: fixed FX rates to compare amounts across currencies, and what each action costs.

One table (data/economics/costs.yaml) serves features, the policy's value, the simulator and evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Context, Decimal
from functools import cache
from pathlib import Path

import yaml

from model.datafiles import DATA_DIR
from model.vocab import Channel, Strategy

COSTS_FILE = DATA_DIR / "economics" / "costs.yaml"
MINOR_UNITS_FILE = DATA_DIR / "economics" / "minor_units.yaml"
#: rules_applied of a decision whose order's currency has no planning rate: "currency_value_unknown:NGN".
UNKNOWN_CURRENCY_RULE = "currency_value_unknown"
#: The minor units of a currency ISO 4217 lists with neither 0, 3 nor 4 (and of a code it does not list).
DEFAULT_MINOR_UNITS = 2
#: Rounding to minor units in Python's default 28 digits raised InvalidOperation from 1e26 INR on (an API request
#: answered 500); the largest float has 309 integer digits, plus at most 4 minor units, so every amount fits here.
_EVERY_FLOAT_EXACTLY = Context(prec=320)
#: The currencies people know by a symbol; any other is written with its ISO code after the amount.
_SYMBOLS = {"INR": "₹", "USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥", "AUD": "A$", "CAD": "C$", "SGD": "S$"}


@dataclass(frozen=True)
class Economics:
    fx_to_usd: dict[str, float]
    #: What an order in a currency without a planning rate counts as worth, whatever its amount.
    unknown_currency_value_usd: float
    retry_fee_usd: float
    step_up_extra_usd: float
    message_price_usd: dict[str, dict[str, float]]

    def to_usd(self, amount: float, currency: str) -> float | None:
        """The amount in USD at the fixed planning rate; None for a currency without one (its value is unknown)."""
        rate = self.fx_to_usd.get(currency.upper())
        return None if rate is None else amount * rate

    def order_value_usd(self, amount: float, currency: str) -> float:
        """What recovering the order is worth in USD: the amount at its planning rate, or for a currency without
        one ``unknown_currency_value_usd`` whatever the amount, never the amount read at par."""
        value = self.to_usd(amount, currency)
        return self.unknown_currency_value_usd if value is None else value

    def knows_currency(self, currency: str) -> bool:
        return currency.upper() in self.fx_to_usd

    def retry_cost(self, strategy: Strategy | str | None) -> float:
        extra = self.step_up_extra_usd if strategy == Strategy.STEP_UP else 0.0
        return self.retry_fee_usd + extra

    def message_cost(self, channel: Channel | str, country: str | None) -> float:
        prices = self.message_price_usd.get(str(channel), {"default": 0.0})
        if country and country.upper() in prices:
            return prices[country.upper()]
        return prices["default"]


@cache
def load_economics(path: Path = COSTS_FILE) -> Economics:
    """The shipped cost and FX table, read once per process."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    return Economics(
        fx_to_usd={str(k).upper(): float(v) for k, v in raw["fx_to_usd"].items()},
        unknown_currency_value_usd=float(raw["unknown_currency_value_usd"]),
        retry_fee_usd=float(raw["retry_fee_usd"]["default"]),
        step_up_extra_usd=float(raw["retry_fee_usd"]["step_up_extra"]),
        message_price_usd={
            str(channel): {str(k).upper() if k != "default" else "default": float(v) for k, v in prices.items()}
            for channel, prices in raw["message_price_usd"].items()
        },
    )


@cache
def _minor_units_table(path: Path = MINOR_UNITS_FILE) -> dict[str, int]:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    return {str(code).upper(): int(units) for units, codes in raw.items() for code in codes}


def minor_units(currency: str) -> int:
    """The currency's ISO 4217 minor units (data/economics/minor_units.yaml): 0 for JPY, 3 for KWD, else 2."""
    return _minor_units_table().get(currency.strip().upper(), DEFAULT_MINOR_UNITS)


def charged_amount(amount: float, currency: str) -> Decimal:
    """The amount as charged: rounded to its currency's minor units (half up, from the shortest decimal of the
    float), so ``14999.999`` INR is ``15000.00`` and comparisons with a limit are exact, not a float's."""
    places = minor_units(currency)
    return Decimal(repr(float(amount))).quantize(
        Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP, context=_EVERY_FLOAT_EXACTLY
    )


def format_amount(amount: float, currency: str, *, grouped: bool = False) -> str:
    """``12.345`` for 12.345 KWD, ``1200`` for 1200 JPY, ``12.50`` for 12.5 USD: the amount with its currency's
    minor units (half up, from the shortest decimal of the float), so a customer reads what is charged.
    ``grouped`` puts thousands separators in (``1,499.00``)."""
    places = minor_units(currency)
    exact = charged_amount(amount, currency)
    return f"{exact:,.{places}f}" if grouped else f"{exact:.{places}f}"


def format_money(amount: float, currency: str) -> str:
    """``₹1,499.00``, ``¥1,200``, ``1,234.500 KWD``: the amount in its own currency as a person reads it (the
    console's pages, the operators' CLI lists): grouped, in its minor units, with its symbol when well known, else
    its ISO code after it."""
    code = currency.upper()
    number = format_amount(amount, code, grouped=True)  # the currency's ISO 4217 minor units: what is charged
    symbol = _SYMBOLS.get(code)
    return f"{symbol}{number}" if symbol else f"{number} {code}"
