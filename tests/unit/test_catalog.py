"""The error-code catalog: shipped tables, normalisation order, Visa categories, MACs, UPI split, frames."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.catalog import (
    CATALOG_DIR,
    CatalogError,
    ErrorCatalog,
    load_catalog,
    normalise_frame,
    published_retryable,
)
from model.vocab import ErrorClass

E = ErrorClass


@pytest.fixture(scope="module")
def catalog() -> ErrorCatalog:
    return load_catalog()


# --- connector tables ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("connector", "code", "expected"),
    [
        ("stripe", "insufficient_funds", E.INSUFFICIENT_FUNDS),
        ("stripe", "do_not_honor", E.DO_NOT_HONOR),
        ("stripe", "lost_card", E.HARD_DECLINE),
        ("stripe", "stolen_card", E.HARD_DECLINE),
        ("stripe", "expired_card", E.BAD_CARD_DATA),
        ("stripe", "incorrect_cvc", E.BAD_CARD_DATA),
        ("stripe", "authentication_required", E.AUTHENTICATION_REQUIRED),
        ("stripe", "fraudulent", E.SUSPECTED_FRAUD),
        ("stripe", "card_velocity_exceeded", E.LIMIT_EXCEEDED),
        ("stripe", "try_again_later", E.ISSUER_TECHNICAL),
        ("stripe", "processing_error", E.PROCESSOR_TECHNICAL),
        ("stripe", "issuer_not_available", E.ISSUER_TECHNICAL),
        ("stripe", "duplicate_transaction", E.DUPLICATE),
        ("stripe", "testmode_decline", E.CONFIGURATION),
        ("adyen", "12", E.INSUFFICIENT_FUNDS),
        ("adyen", "Not enough balance", E.INSUFFICIENT_FUNDS),
        ("adyen", "6", E.BAD_CARD_DATA),
        ("adyen", "9", E.ISSUER_TECHNICAL),
        ("adyen", "3D Not Authenticated", E.AUTHENTICATION_REQUIRED),
        ("adyen", "FRAUD", E.SUSPECTED_FRAUD),
        ("adyen", "4", E.PROCESSOR_TECHNICAL),
        ("adyen", "16", E.CUSTOMER_CANCELLED),
        ("adyen", "29", E.LIMIT_EXCEEDED),
        ("cybersource", "202", E.BAD_CARD_DATA),
        ("cybersource", "204", E.INSUFFICIENT_FUNDS),
        ("cybersource", "205", E.HARD_DECLINE),
        ("cybersource", "207", E.ISSUER_TECHNICAL),
        ("cybersource", "208", E.HARD_DECLINE),
        ("cybersource", "210", E.LIMIT_EXCEEDED),
        ("cybersource", "211", E.BAD_CARD_DATA),
        ("cybersource", "221", E.SUSPECTED_FRAUD),
        ("cybersource", "231", E.BAD_CARD_DATA),
        ("cybersource", "236", E.PROCESSOR_TECHNICAL),
        ("cybersource", "150", E.PROCESSOR_TECHNICAL),
        ("cybersource", "151", E.PROCESSOR_TECHNICAL),
        ("cybersource", "104", E.DUPLICATE),
        ("cybersource", "475", E.AUTHENTICATION_REQUIRED),
        ("checkout", "20051", E.INSUFFICIENT_FUNDS),
        ("checkout", "20005", E.DO_NOT_HONOR),
        ("checkout", "20054", E.BAD_CARD_DATA),
        ("checkout", "20087", E.BAD_CARD_DATA),
        ("checkout", "20154", E.AUTHENTICATION_REQUIRED),
        ("checkout", "30043", E.HARD_DECLINE),
        ("checkout", "40101", E.SUSPECTED_FRAUD),
        ("checkout.com", "20091", E.ISSUER_TECHNICAL),
        ("razorpay", "insufficient_funds", E.INSUFFICIENT_FUNDS),
        ("razorpay", "payment_collect_request_expired", E.CUSTOMER_CANCELLED),
        ("razorpay", "gateway_technical_error", E.PROCESSOR_TECHNICAL),
        ("razorpay", "bank_technical_error", E.ISSUER_TECHNICAL),
        ("payu", "E307", E.DO_NOT_HONOR),
        ("payu", "E310", E.HARD_DECLINE),
        ("payu", "E9205", E.CUSTOMER_CANCELLED),
        ("  Stripe ", " INSUFFICIENT_FUNDS ", E.INSUFFICIENT_FUNDS),
    ],
)
def test_connector_codes_have_their_class(
    catalog: ErrorCatalog, connector: str, code: str, expected: ErrorClass
) -> None:
    result = catalog.normalise(connector, code)
    assert result.error_class == expected
    assert result.known_code is True
    assert result.matched_by == connector.strip().casefold().removesuffix(".com")


@pytest.mark.parametrize(
    ("connector", "code", "network_code"),
    [
        ("stripe", "insufficient_funds", "51"),
        ("stripe", "lost_card", "41"),
        ("stripe", "incorrect_cvc", "N7"),
        ("adyen", "12", "51"),
        ("cybersource", "204", "51"),
        ("checkout", "20051", "51"),
        ("checkout", "200R3", "R3"),
        ("payu", "E310", "04"),
    ],
)
def test_connector_codes_carry_their_usual_network_code(
    catalog: ErrorCatalog, connector: str, code: str, network_code: str
) -> None:
    entry = catalog.lookup(connector, code)
    assert entry is not None
    assert entry.network_decline_code == network_code


@pytest.mark.parametrize("connector", ["stripe", "adyen", "cybersource", "checkout", "razorpay", "payu"])
def test_every_connector_has_decline_card_data_configuration_and_technical_codes(
    catalog: ErrorCatalog, connector: str
) -> None:
    have = {c.error_class for c in catalog.codes(connector)}
    assert {E.DO_NOT_HONOR, E.HARD_DECLINE, E.BAD_CARD_DATA, E.CONFIGURATION} <= have
    assert have & {E.ISSUER_TECHNICAL, E.PROCESSOR_TECHNICAL}


@pytest.mark.parametrize("connector", ["stripe", "adyen", "cybersource", "checkout", "razorpay"])
def test_full_connectors_cover_funds_fraud_and_authentication(catalog: ErrorCatalog, connector: str) -> None:
    for error_class in (E.INSUFFICIENT_FUNDS, E.SUSPECTED_FRAUD, E.AUTHENTICATION_REQUIRED):
        assert catalog.codes(connector, error_class), (connector, error_class)


def test_codes_filters_by_class_and_names_unknown_sources(catalog: ErrorCatalog) -> None:
    funds = catalog.codes("stripe", E.INSUFFICIENT_FUNDS)
    assert [c.code for c in funds] == ["insufficient_funds"]
    assert all(c.source == "stripe" for c in catalog.codes("stripe"))
    assert {c.code for c in catalog.codes("npci_upi", E.CUSTOMER_CANCELLED)} >= {"ZA", "U69"}
    with pytest.raises(KeyError, match="unknown catalog source 'nopay'"):
        catalog.codes("nopay")
    assert set(catalog.connectors()) == {"stripe", "adyen", "cybersource", "checkout", "razorpay", "payu"}


# --- network codes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("00", None),
        ("01", E.DO_NOT_HONOR),
        ("03", E.CONFIGURATION),
        ("04", E.HARD_DECLINE),
        ("05", E.DO_NOT_HONOR),
        ("5", E.DO_NOT_HONOR),
        ("005", E.DO_NOT_HONOR),
        ("12", E.HARD_DECLINE),
        ("13", E.CONFIGURATION),
        ("14", E.BAD_CARD_DATA),
        ("15", E.HARD_DECLINE),
        ("19", E.ISSUER_TECHNICAL),
        ("41", E.HARD_DECLINE),
        ("43", E.HARD_DECLINE),
        ("51", E.INSUFFICIENT_FUNDS),
        ("54", E.BAD_CARD_DATA),
        ("55", E.BAD_CARD_DATA),
        ("57", E.HARD_DECLINE),
        ("58", E.CONFIGURATION),
        ("59", E.SUSPECTED_FRAUD),
        ("61", E.LIMIT_EXCEEDED),
        ("62", E.HARD_DECLINE),
        ("65", E.LIMIT_EXCEEDED),
        ("75", E.LIMIT_EXCEEDED),
        ("91", E.ISSUER_TECHNICAL),
        ("96", E.ISSUER_TECHNICAL),
        ("n7", E.BAD_CARD_DATA),
        ("1a", E.AUTHENTICATION_REQUIRED),
        ("R0", E.HARD_DECLINE),
        ("R1", E.HARD_DECLINE),
        ("R3", E.HARD_DECLINE),
    ],
)
def test_iso8583_codes_decide_for_unknown_connectors(
    catalog: ErrorCatalog, code: str, expected: ErrorClass | None
) -> None:
    result = catalog.normalise("someconnector", "XYZ", network_decline_code=code, payment_method="card")
    assert result.known_code is False
    if expected is None:
        assert result.error_class == E.UNKNOWN
    else:
        assert (result.error_class, result.matched_by) == (expected, "iso8583")


def test_mastercard_gives_65_its_own_meaning(catalog: ErrorCatalog) -> None:
    mc = catalog.normalise("x", None, network_decline_code="65", card_network="Mastercard")
    visa = catalog.normalise("x", None, network_decline_code="65", card_network="visa")
    assert mc.error_class == E.AUTHENTICATION_REQUIRED
    assert visa.error_class == E.LIMIT_EXCEEDED


@pytest.mark.parametrize(
    ("code", "expected", "decline_type"),
    [
        ("ZA", E.CUSTOMER_CANCELLED, "business"),
        ("U69", E.CUSTOMER_CANCELLED, "business"),
        ("Z9", E.INSUFFICIENT_FUNDS, "business"),
        ("Z8", E.LIMIT_EXCEEDED, "business"),
        ("Z7", E.LIMIT_EXCEEDED, "business"),
        ("ZM", E.BAD_CARD_DATA, "business"),
        ("ZD", E.DO_NOT_HONOR, "business"),
        ("ZE", E.HARD_DECLINE, "business"),
        ("YE", E.HARD_DECLINE, "business"),
        ("B1", E.HARD_DECLINE, "business"),
        ("U16", E.SUSPECTED_FRAUD, "business"),
        ("XY", E.ISSUER_TECHNICAL, "technical"),
        ("U28", E.ISSUER_TECHNICAL, "technical"),
        ("BT", E.PROCESSOR_TECHNICAL, "technical"),
        ("RB", E.PROCESSOR_TECHNICAL, "technical"),
        # The debit's full or partial reversal timed out at the remitter bank (NPCI's final RespPay codes).
        ("RR", E.ISSUER_TECHNICAL, "technical"),
        ("rp", E.ISSUER_TECHNICAL, "technical"),
        # NPCI's own 21, "no action taken (full reversal)": UPI put the whole transaction back (a technical decline
        # of a timed-out leg), where the card table's 21 is an issuer's refusal.
        ("21", E.ISSUER_TECHNICAL, "technical"),
        ("u01", E.DUPLICATE, "technical"),
    ],
)
def test_npci_upi_codes_and_business_technical_split(
    catalog: ErrorCatalog, code: str, expected: ErrorClass, decline_type: str
) -> None:
    result = catalog.normalise("payu", None, network_decline_code=code, payment_method="upi")
    assert (result.error_class, result.matched_by) == (expected, "npci_upi")
    assert catalog.upi_decline_type(code) == decline_type


def test_npci_21_is_read_on_upi_only(catalog: ErrorCatalog) -> None:
    """A UPI payment's 21 was read with the card table's meaning (an issuer's "no action taken", do not honour).
    It is NPCI's full reversal on UPI; a card's 21 keeps its ISO 8583 meaning."""
    upi = catalog.normalise("razorpay", None, network_decline_code="21", payment_method="upi_autopay")
    card = catalog.normalise("stripe", None, network_decline_code="21", payment_method="card")
    assert (upi.error_class, upi.matched_by) == (E.ISSUER_TECHNICAL, "npci_upi")
    assert (card.error_class, card.matched_by) == (E.DO_NOT_HONOR, "iso8583")


def test_upi_decline_type_of_uncatalogued_code_is_none(catalog: ErrorCatalog) -> None:
    assert catalog.upi_decline_type("Q9") is None
    assert catalog.upi_decline_type(None) is None
    assert catalog.upi_decline_type("U30") == "depends"


def test_generic_upi_code_defers_to_the_message(catalog: ErrorCatalog) -> None:
    wrapped = catalog.normalise("x", None, "insufficient balance in account", "U30", payment_method="upi")
    alone = catalog.normalise("x", None, None, "U30", payment_method="upi")
    assert (wrapped.error_class, wrapped.matched_by) == (E.INSUFFICIENT_FUNDS, "message")
    assert (alone.error_class, alone.matched_by) == (E.ISSUER_TECHNICAL, "npci_upi")


# --- trust order -----------------------------------------------------------------------------------------------


def test_generic_connector_code_defers_to_the_network_code(catalog: ErrorCatalog) -> None:
    # CONTRACT.md's example request: Stripe's top-level card_declined carrying an ISO 51
    result = catalog.normalise(
        "stripe", "card_declined", "Your card has insufficient funds.", "51", None, None, "visa", "card"
    )
    assert (result.error_class, result.matched_by, result.known_code) == (E.INSUFFICIENT_FUNDS, "iso8583", True)
    assert result.visa_category == 2


def test_generic_connector_code_decides_when_nothing_else_does(catalog: ErrorCatalog) -> None:
    result = catalog.normalise("stripe", "card_declined")
    assert (result.error_class, result.matched_by) == (E.DO_NOT_HONOR, "stripe")


def test_specific_connector_code_beats_network_code_and_message(catalog: ErrorCatalog) -> None:
    result = catalog.normalise("stripe", "lost_card", "timeout while contacting issuer", "51")
    assert (result.error_class, result.matched_by) == (E.HARD_DECLINE, "stripe")


def test_unified_code_beats_network_code(catalog: ErrorCatalog) -> None:
    result = catalog.normalise("newpsp", "E1", None, "51", unified_code=" Token_Failure ")
    assert (result.error_class, result.matched_by) == (E.TOKEN_FAILURE, "unified_code")


def test_coarse_hyperswitch_unified_code_only_decides_last(catalog: ErrorCatalog) -> None:
    with_network = catalog.normalise("newpsp", "E1", None, "51", unified_code="UE_3000")
    alone = catalog.normalise("newpsp", "E1", unified_code="UE_3000")
    nothing = catalog.normalise("newpsp", "E1", unified_code="UE_9000")
    assert with_network.error_class == E.INSUFFICIENT_FUNDS
    assert (alone.error_class, alone.matched_by) == (E.PROCESSOR_TECHNICAL, "unified_code")
    assert nothing.error_class == E.UNKNOWN


def test_connector_code_known_but_uninformative_lets_the_message_decide(catalog: ErrorCatalog) -> None:
    result = catalog.normalise("razorpay", "BAD_REQUEST_ERROR", "Authentication failed due to incorrect otp")
    assert (result.error_class, result.matched_by, result.known_code) == (
        E.AUTHENTICATION_REQUIRED,
        "message",
        True,
    )


def test_payment_method_chooses_between_network_tables(catalog: ErrorCatalog) -> None:
    # "Z9" is only NPCI, "51" only ISO: each is still found when payment_method points the other way
    assert catalog.normalise("x", None, network_decline_code="Z9", payment_method="card").error_class == (
        E.INSUFFICIENT_FUNDS
    )
    assert catalog.normalise("x", None, network_decline_code="51", payment_method="upi_autopay").error_class == (
        E.INSUFFICIENT_FUNDS
    )


# --- messages --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("Your card has insufficient funds.", E.INSUFFICIENT_FUNDS),
        ("Not enough balance", E.INSUFFICIENT_FUNDS),
        ("Connection timeout talking to issuer", E.ISSUER_TECHNICAL),
        ("Issuer Unavailable", E.ISSUER_TECHNICAL),
        ("Acquirer Error", E.PROCESSOR_TECHNICAL),
        ("Connector did not respond in specified time", E.PROCESSOR_TECHNICAL),
        ("3D Not Authenticated", E.AUTHENTICATION_REQUIRED),
        ("3DS authentication required", E.AUTHENTICATION_REQUIRED),
        ("Card reported STOLEN", E.HARD_DECLINE),
        ("lost card, pick up", E.HARD_DECLINE),
        ("Suspected fraud", E.SUSPECTED_FRAUD),
        ("Exceeds withdrawal amount limit", E.LIMIT_EXCEEDED),
        ("Expired Card", E.BAD_CARD_DATA),
        ("CVV mismatch", E.BAD_CARD_DATA),
        ("Network token cryptogram invalid", E.TOKEN_FAILURE),
        ("Transaction declined by customer", E.CUSTOMER_CANCELLED),
        ("Collect request expired", E.CUSTOMER_CANCELLED),
        ("Duplicate transaction", E.DUPLICATE),
        ("Invalid merchant configuration", E.CONFIGURATION),
        ("Your card was declined.", E.DO_NOT_HONOR),
        ("insufficient_funds", E.INSUFFICIENT_FUNDS),
    ],
)
def test_message_only_fallback(catalog: ErrorCatalog, message: str, expected: ErrorClass) -> None:
    result = catalog.normalise("unheard_of_psp", "ZZZ-1", message)
    assert (result.error_class, result.matched_by, result.known_code) == (expected, "message", False)


@pytest.mark.parametrize("message", ["Something went wrong", "", "   ", None, "ok"])
def test_uninformative_messages_give_unknown(catalog: ErrorCatalog, message: str | None) -> None:
    result = catalog.normalise("unheard_of_psp", None, message)
    assert (result.error_class, result.matched_by, result.known_code) == (E.UNKNOWN, "unknown", False)


# --- Visa categories ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "category"),
    [
        *[(c, 1) for c in ("04", "07", "12", "14", "15", "41", "43", "46", "57", "R0", "R1", "R3", "r1")],
        *[(c, 2) for c in ("03", "19", "51", "59", "61", "62", "65", "75", "78", "91", "93", "96", "N4")],
        *[(c, 2) for c in ("5C", "9G", "5c", "83", "Z5")],  # Visa's moves of 2024-2026
        *[(c, 3) for c in ("54", "55", "N7", "82", "1A", "6P")],
        *[(c, 4) for c in ("05", "01", "13", "N0", "Z3")],
        ("5", 4),
        ("00", None),
        ("85", None),
        ("", None),
        (None, None),
        ("not-a-code", None),
    ],
)
def test_visa_categories(catalog: ErrorCatalog, code: str | None, category: int | None) -> None:
    assert catalog.visa_category(code) == category


@pytest.mark.parametrize(
    ("code", "error_class", "category"),
    [
        ("5C", E.HARD_DECLINE, 2),  # 11 April 2025: transaction not supported / blocked by the issuer's BIN rules
        ("9G", E.HARD_DECLINE, 2),  # 11 April 2025: blocked by the cardholder's card controls
        ("Z5", E.LIMIT_EXCEEDED, 2),  # 13 April 2024: valid account, amount not supported
        ("83", E.SUSPECTED_FRAUD, 2),  # 25 October 2026: Visa network fraud block, category 2
        ("57", E.HARD_DECLINE, 1),  # 25 October 2026: issuer will never approve
    ],
)
def test_visas_newer_decline_codes_have_their_class_and_category(
    catalog: ErrorCatalog, code: str, error_class: E, category: int
) -> None:
    """Visa's category-2 codes 5C and 9G (April 2025), Z5 (April 2024) and 83 (October 2026) were missing: a Visa
    decline with them read as an unknown error of the generic category 4."""
    result = catalog.normalise("unheard_of_psp", None, network_decline_code=code, card_network="visa")
    assert (result.error_class, result.visa_category, result.matched_by) == (error_class, category, "iso8583")


def test_visa_only_codes_keep_other_networks_meanings(catalog: ErrorCatalog) -> None:
    mastercard = catalog.normalise("unheard_of_psp", None, network_decline_code="83", card_network="mastercard")
    assert (mastercard.error_class, mastercard.visa_category) == (E.SUSPECTED_FRAUD, None)
    for code in ("5C", "9G", "Z5"):
        other = catalog.normalise("unheard_of_psp", None, network_decline_code=code, card_network="mastercard")
        assert (other.error_class, other.visa_category) == (E.UNKNOWN, None)


def test_checkouts_blocked_by_issuer_code_implies_visa_5c(catalog: ErrorCatalog) -> None:
    result = catalog.normalise("checkout", "2005C", card_network="visa")
    assert (result.error_class, result.visa_category, result.network_decline_code) == (E.HARD_DECLINE, 2, "5C")


def test_visa_category_rules(catalog: ErrorCatalog) -> None:
    never = catalog.visa_category_rule(1)
    assert never is not None
    assert (never.reattempt_allowed, never.max_reattempts) == (False, None)
    for category in (2, 3, 4):
        rule = catalog.visa_category_rule(category)
        assert rule is not None
        # Visa's revision of 25 May 2025: 20 re-attempts in 30 days (15 before)
        assert (rule.reattempt_allowed, rule.max_reattempts, rule.window_days) == (True, 20, 30)
    assert catalog.visa_category_rule(None) is None
    assert catalog.visa_category_rule(7) is None


@pytest.mark.parametrize("network", ["visa", "VISA", " Visa "])
def test_normalise_sets_visa_category_only_for_visa(catalog: ErrorCatalog, network: str) -> None:
    assert catalog.normalise("x", None, network_decline_code="41", card_network=network).visa_category == 1
    assert catalog.normalise("x", None, network_decline_code="41", card_network="mastercard").visa_category is None
    assert catalog.normalise("x", None, network_decline_code="41").visa_category is None


def test_visa_category_uses_the_code_the_connector_implies(catalog: ErrorCatalog) -> None:
    result = catalog.normalise("stripe", "stolen_card", card_network="visa")
    assert (result.visa_category, result.network_decline_code) == (1, "43")


# --- Mastercard merchant advice ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "never_retry", "needs_update", "wait_hours"),
    [
        ("01", False, True, None),
        ("1", False, True, None),
        ("02", False, False, 72.0),
        ("03", True, False, None),
        ("04", False, False, None),
        ("21", True, False, None),
        ("22", True, False, None),
        ("24", False, False, 1.0),
        ("25", False, False, 24.0),
        ("26", False, False, 48.0),
        ("27", False, False, 96.0),
        ("28", False, False, 144.0),
        ("29", False, False, 192.0),
        ("30", False, False, 240.0),
        ("40", False, False, None),
        ("41", False, False, None),
        ("42", False, False, None),
        ("43", False, False, None),
    ],
)
def test_merchant_advice_codes(
    catalog: ErrorCatalog, code: str, never_retry: bool, needs_update: bool, wait_hours: float | None
) -> None:
    mac = catalog.merchant_advice(code)
    assert mac is not None
    assert (mac.never_retry, mac.needs_card_update, mac.wait_hours) == (never_retry, needs_update, wait_hours)


def test_mac_02_wait_is_marked_as_winbacks_choice(catalog: ErrorCatalog) -> None:
    mac02, mac25 = catalog.merchant_advice("02"), catalog.merchant_advice("25")
    assert mac02 is not None
    assert mac25 is not None
    assert (mac02.wait_basis, mac25.wait_basis) == ("winback_choice", "mastercard")


@pytest.mark.parametrize("code", [None, "", "99", "abc"])
def test_unknown_merchant_advice_is_none(catalog: ErrorCatalog, code: str | None) -> None:
    assert catalog.merchant_advice(code) is None


def test_normalise_attaches_the_merchant_advice(catalog: ErrorCatalog) -> None:
    result = catalog.normalise("adyen", "2", merchant_advice_code="3", card_network="mastercard")
    assert result.merchant_advice is not None
    assert result.merchant_advice.code == "03"


# --- robustness --------------------------------------------------------------------------------------------------

_TEXT = st.one_of(st.none(), st.text(max_size=30), st.sampled_from(["51", "05", "Z9", "stripe", "visa", "upi", ""]))


@settings(max_examples=300, deadline=None)
@given(
    connector=_TEXT,
    error_code=_TEXT,
    error_message=_TEXT,
    network_decline_code=_TEXT,
    merchant_advice_code=_TEXT,
    unified_code=_TEXT,
    card_network=_TEXT,
    payment_method=_TEXT,
)
def test_normalise_never_raises(
    connector: str | None,
    error_code: str | None,
    error_message: str | None,
    network_decline_code: str | None,
    merchant_advice_code: str | None,
    unified_code: str | None,
    card_network: str | None,
    payment_method: str | None,
) -> None:
    result = load_catalog().normalise(
        connector,  # type: ignore[arg-type]  # None must be tolerated too
        error_code,
        error_message,
        network_decline_code,
        merchant_advice_code,
        unified_code,
        card_network,
        payment_method,
    )
    assert isinstance(result.error_class, ErrorClass)
    assert result.visa_category in (None, 1, 2, 3, 4)
    assert isinstance(result.known_code, bool)


def test_everything_unknown_gives_unknown(catalog: ErrorCatalog) -> None:
    result = catalog.normalise(None, None, None, None, None, None, None, None)  # type: ignore[arg-type]
    assert result == catalog.normalise("", "", "", "", "", "", "", "")
    assert (result.error_class, result.visa_category, result.merchant_advice, result.known_code) == (
        E.UNKNOWN,
        None,
        None,
        False,
    )


def test_non_string_cells_are_tolerated(catalog: ErrorCatalog) -> None:
    # numeric codes as pandas reads them from CSV: 204.0, 51, NaN
    result = catalog.normalise("cybersource", 204.0, float("nan"), 51)  # type: ignore[arg-type]
    assert (result.error_class, result.known_code, result.network_decline_code) == (
        E.INSUFFICIENT_FUNDS,
        True,
        "51",
    )


# --- frames ----------------------------------------------------------------------------------------------------


def _sample_frame(n: int, seed: int = 7) -> pd.DataFrame:
    rng = np.random.default_rng(seed)

    def pick(values: list[object]) -> np.ndarray:
        return np.array(values, dtype=object)[rng.integers(0, len(values), n)]

    return pd.DataFrame(
        {
            "connector": pick(["stripe", "adyen", "cybersource", "checkout", "razorpay", "newpsp"]),
            "error_code": pick(["card_declined", "insufficient_funds", "2", "12", "204", "20051", None, "E1"]),
            "error_message": pick(["Your card was declined.", "Not enough balance", None, "timeout"]),
            "network_decline_code": pick(["51", "5", "41", None, "Z9", "U30", np.nan]),
            "merchant_advice_code": pick(["01", "3", None, "99"]),
            "unified_code": pick([None, "UE_3000", "hard_decline"]),
            "card_network": pick(["visa", "Mastercard", None]),
            "payment_method": pick(["card", "upi", None]),
        },
        index=pd.RangeIndex(100, 100 + n),
    )


def test_normalise_frame_equals_row_by_row(catalog: ErrorCatalog) -> None:
    df = _sample_frame(3000)
    out = catalog.normalise_frame(df)
    assert list(out.columns) == ["error_class", "visa_category", "mac", "known_code"]
    assert out.index.equals(df.index)
    for idx in df.sample(400, random_state=1).index:
        row = df.loc[idx]
        args: dict[str, Any] = {str(c): (None if pd.isna(v) else v) for c, v in row.items()}
        expected = catalog.normalise(**args)
        got = out.loc[idx]
        assert got["error_class"] == expected.error_class.value
        assert (None if pd.isna(got["visa_category"]) else int(got["visa_category"])) == expected.visa_category
        assert got["mac"] == (expected.merchant_advice.code if expected.merchant_advice else None)
        assert bool(got["known_code"]) == expected.known_code


def test_normalise_frame_needs_only_connector_and_error_code() -> None:
    out = normalise_frame(pd.DataFrame({"connector": ["stripe", "x"], "error_code": ["lost_card", None]}))
    assert out["error_class"].tolist() == ["hard_decline", "unknown"]
    assert out["known_code"].tolist() == [True, False]
    with pytest.raises(ValueError, match="missing required column"):
        normalise_frame(pd.DataFrame({"connector": ["stripe"]}))


def test_normalise_frame_normalises_each_distinct_error_once(
    catalog: ErrorCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Speed comes from de-duplication (measured by `make bench`, never asserted here): a million rows with few
    # distinct errors must cost one normalise() per distinct tuple, not per row.
    df = _sample_frame(200_000)
    calls = 0
    original = catalog.normalise

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(catalog, "normalise", counting)
    out = catalog.normalise_frame(df)
    assert len(out) == len(df)
    assert 0 < calls <= len(df.drop_duplicates())


# --- loading -----------------------------------------------------------------------------------------------------


def test_load_is_cached() -> None:
    assert load_catalog() is load_catalog()


def test_version_is_a_short_content_hash(tmp_path: Path) -> None:
    copy = tmp_path / "catalog"
    shutil.copytree(CATALOG_DIR, copy)
    same = ErrorCatalog.from_directory(copy)
    assert same.version == load_catalog().version
    assert len(same.version) == 12
    with (copy / "iso8583.csv").open("a", encoding="utf-8") as handle:
        handle.write("N8,Amount exceeds pre-authorised amount,limit_exceeded,,false\n")
    changed = ErrorCatalog.from_directory(copy)
    assert changed.version != same.version
    assert changed.normalise("x", None, network_decline_code="N8").error_class == E.LIMIT_EXCEEDED


def test_bad_table_names_file_line_and_problem(tmp_path: Path) -> None:
    copy = tmp_path / "catalog"
    shutil.copytree(CATALOG_DIR, copy)
    with (copy / "connectors" / "stripe.csv").open("a", encoding="utf-8") as handle:
        handle.write("new_code,Something,insufficent_funds,,false,\n")
    lines = (copy / "connectors" / "stripe.csv").read_text(encoding="utf-8").splitlines()
    with pytest.raises(CatalogError, match=rf"stripe\.csv line {len(lines)}: unknown error_class 'insufficent_funds'"):
        ErrorCatalog.from_directory(copy)


def test_missing_table_is_named(tmp_path: Path) -> None:
    copy = tmp_path / "catalog"
    shutil.copytree(CATALOG_DIR, copy)
    (copy / "mastercard_mac.csv").unlink()
    with pytest.raises(CatalogError, match=r"mastercard_mac\.csv is missing"):
        ErrorCatalog.from_directory(copy)


def test_every_shipped_row_is_unique_per_source(catalog: ErrorCatalog) -> None:
    for source in catalog.sources():
        keys = [(c.code.casefold(), c.card_network) for c in catalog.codes(source)]
        assert len(keys) == len(set(keys)), source


@pytest.mark.parametrize(
    ("connector", "code", "network_code", "card_network", "advice", "expected"),
    [
        ("stripe", "insufficient_funds", "51", "visa", None, True),  # soft: funds come back
        ("stripe", "processing_error", "96", "visa", None, True),  # Visa category 2, a technical decline
        ("stripe", "do_not_honor", "05", "mastercard", None, True),
        ("stripe", "do_not_honor", "05", "mastercard", "03", False),  # Mastercard: do not try again
        ("stripe", "stolen_card", "43", "visa", None, False),  # Visa category 1
        ("stripe", "expired_card", "54", "mastercard", None, False),  # new details needed
        ("stripe", "fraudulent", "59", "mastercard", None, False),
        ("razorpay", "payment_cancelled", None, None, None, False),  # the customer said no
        ("stripe", "never_seen_code_x", None, "visa", None, None),  # the catalog publishes nothing about it
    ],
)
def test_published_retryability_splits_soft_from_hard_declines(
    catalog: ErrorCatalog,
    connector: str,
    code: str,
    network_code: str | None,
    card_network: str | None,
    advice: str | None,
    expected: bool | None,
) -> None:
    error = catalog.normalise(connector, code, None, network_code, advice, None, card_network, "card")
    assert published_retryable(error) is expected
