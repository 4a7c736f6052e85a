"""Error-code catalog and normalisation of any connector error to a standard class.

API STUB written by the lead: the catalog helper replaces the bodies, keeping these names and signatures.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.vocab import ErrorClass


@dataclass(frozen=True)
class CatalogCode:
    """One known code of one source table (a connector's, ISO 8583, NPCI UPI, ...)."""

    source: str  # "stripe", "adyen", "iso8583", "npci_upi", ...
    code: str
    message: str
    error_class: ErrorClass
    network_decline_code: str | None = None  # the ISO 8583 / NPCI code this connector code usually carries


@dataclass(frozen=True)
class MerchantAdvice:
    """A Mastercard merchant advice code and what it allows."""

    code: str  # two digits, e.g. "03"
    meaning: str
    never_retry: bool
    needs_card_update: bool
    wait_hours: float | None  # minimum wait before a re-attempt, when the code states one


@dataclass(frozen=True)
class NormalisedError:
    error_class: ErrorClass
    visa_category: int | None  # 1..4 for a Visa card whose network decline code is categorised, else None
    merchant_advice: MerchantAdvice | None
    matched_by: str  # which table decided: "stripe", "iso8583", "npci_upi", "unified_code", "message", "unknown"
    known_code: bool  # False when the connector's (connector, error_code) pair is not in the catalog


class ErrorCatalog:
    version: str

    def normalise(
        self,
        connector: str,
        error_code: str | None,
        error_message: str | None = None,
        network_decline_code: str | None = None,
        merchant_advice_code: str | None = None,
        unified_code: str | None = None,
        card_network: str | None = None,
        payment_method: str | None = None,
    ) -> NormalisedError:
        """Map any connector error to a standard class; unknown input gives ErrorClass.UNKNOWN, never raises."""
        raise NotImplementedError

    def visa_category(self, network_decline_code: str | None) -> int | None:
        raise NotImplementedError

    def merchant_advice(self, code: str | None) -> MerchantAdvice | None:
        raise NotImplementedError

    def codes(self, source: str, error_class: ErrorClass | None = None) -> list[CatalogCode]:
        """Known codes of one source table, optionally of one class (used by the simulator's vocabularies)."""
        raise NotImplementedError


def load_catalog() -> ErrorCatalog:
    """The shipped catalog (data/catalog/), loaded once per process."""
    raise NotImplementedError
