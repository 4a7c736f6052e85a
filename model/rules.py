"""Hard rules (network, regulatory, merchant) as data, and the pure function that applies them.

The rules live in ``data/rules/hard_rules.yaml`` (each with its public source) and are loaded once per process.
``build_context`` does all the expensive work once per request (catalog lookup, history counts, time windows,
timezone objects); ``check`` is then a cheap pure function of (context, candidate) that returns every broken rule
by name. Hard rules always win over the model (CONTRACT.md section 2): the policy only ever chooses among
``permitted`` candidates.

Which rules apply to what:

- silent retries: Visa category 1 and the Visa re-attempt cap, the Mastercard re-attempt cap and merchant advice
  codes, UPI AutoPay off-peak windows and retry budget, the e-mandate AFA-free limit, user-consent flows, strategy
  applicability, connector availability, the merchant's enabled flows, ``max_retries`` and retry window;
- retargets (a payment link to the customer): the merchant's retarget switch, channels, ``max_nudges``, retry
  window, skip-days cadence and quiet hours, and the customer's opt-outs and reachability. Quiet hours apply to
  customer messages only, never to silent retries (the customer does not see those);
- every candidate: ``execute_at >= event_time``. ``stop`` is always allowed.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import operator
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

import yaml

from model.catalog import ErrorCatalog, NormalisedError, normalise_request
from model.datafiles import DATA_DIR
from model.merchant_config import MerchantConfig
from model.money import charged_amount, load_economics
from model.requests import DecisionRequest
from model.vocab import (
    NOT_SILENT_RETRY_STRATEGIES,
    RETRY_STRATEGIES,
    USER_CONSENT_AUTHENTICATION,
    USER_CONSENT_METHODS,
    Action,
    Channel,
    ErrorClass,
    Strategy,
)
from model.zones import customer_zones, outlying_zone

# Enum members are read through EnumType.__getattr__ (about 0.1 us a time): the per-candidate code uses these.
_RETRY, _RETARGET, _STOP = Action.RETRY, Action.RETARGET, Action.STOP
_CASCADE, _RETRY_SAME, _STEP_UP = Strategy.CASCADE, Strategy.RETRY_SAME, Strategy.STEP_UP

RULES_FILE = DATA_DIR / "rules" / "hard_rules.yaml"

#: Extra request field a caller may send: silent re-attempts on this card in the last 30 days, all orders.
CARD_REATTEMPTS_FIELD = "card_reattempts_30d"

#: Delays of the silent-retry grid; 0 means "right away", executed 2 s after the event.
RETRY_DELAYS: tuple[timedelta, ...] = (
    timedelta(seconds=2),
    timedelta(minutes=15),
    timedelta(hours=1),
    timedelta(hours=6),
    timedelta(hours=24),
    timedelta(hours=72),
)
#: "After the next payday": the next day-of-month 1 and 26, at 06:00 in the merchant's timezone and in the customer's
#: (the span of their country's zones, and the zone their phone number places them in: ``model.zones.customer_zones``,
#: as the quiet hours take them), whichever comes last.
PAYDAY_DAYS: tuple[int, ...] = (1, 26)
PAYDAY_LOCAL_TIME = time(6, 0)
#: Local send times of the retarget grid (besides "as soon as allowed").
SEND_LOCAL_TIMES: tuple[time, ...] = (time(10, 0), time(13, 0), time(19, 0))
MAX_SEND_TIMES_PER_CHANNEL = 6
#: Cascade targets on the grid: the first few other connectors in the merchant's pecking order.
MAX_CASCADE_TARGETS = 4


class Rule(StrEnum):
    """Names of the hard rules, as reported in ``RuleVerdict.broken``."""

    MALFORMED_CANDIDATE = "malformed_candidate"
    BEFORE_EVENT_TIME = "before_event_time"
    VISA_CATEGORY_1 = "visa_category_1"
    VISA_CATEGORY_3_SAME_DETAILS = "visa_category_3_same_details"
    LOST_STOLEN_CARD = "lost_stolen_card"
    AUTHORIZATION_REVOKED = "authorization_revoked"
    MANDATE_REVOKED = "mandate_revoked"
    ACCOUNT_CLOSED_OR_INVALID = "account_closed_or_invalid"
    BLOCK_LIST = "block_list"
    DUPLICATE_TRANSACTION = "duplicate_transaction"
    VISA_REATTEMPT_CAP = "visa_reattempt_cap"
    MASTERCARD_REATTEMPT_CAP = "mastercard_reattempt_cap"
    MAC_NEVER_RETRY = "mastercard_mac_never_retry"
    MAC_NO_RETARGET = "mastercard_mac_no_retarget"
    MAC_CARD_UPDATE = "mastercard_mac_card_update"
    MAC_WAIT = "mastercard_mac_wait"
    UPI_AUTOPAY_PEAK_HOURS = "upi_autopay_peak_hours"
    UPI_AUTOPAY_MAX_RETRIES = "upi_autopay_max_retries"
    UPI_AUTOPAY_RETRY_WINDOW = "upi_autopay_retry_window"
    E_MANDATE_AFA_REQUIRED = "e_mandate_afa_required"
    E_MANDATE_RETRY_WINDOW = "e_mandate_retry_window"
    RBI_ONE_OFF_AFA = "rbi_one_off_afa"
    USER_CONSENT_FLOW = "user_consent_flow"
    STEP_UP_NOT_APPLICABLE = "step_up_not_applicable"
    STEP_UP_OUT_OF_SESSION = "step_up_out_of_session"
    ONE_OFF_OUT_OF_SESSION = "one_off_out_of_session"
    CASCADE_MANDATE = "cascade_mandate"
    CASCADE_SAME_ACCOUNT = "cascade_same_account"
    AUTHENTICATION_REQUESTED = "authentication_requested"
    SUSPECTED_FRAUD = "suspected_fraud"
    CLEAR_PAN_NOT_APPLICABLE = "clear_pan_not_applicable"
    ALTERNATE_NETWORK_NOT_APPLICABLE = "alternate_network_not_applicable"
    ALTERNATE_NETWORK_SAME_ACCOUNT = "alternate_network_same_account"
    CASCADE_SAME_CONNECTOR = "cascade_same_connector"
    CASCADE_DECLINED_CONNECTOR = "cascade_declined_connector"
    RETRY_SAME_OTHER_CONNECTOR = "retry_same_other_connector"
    CONNECTOR_UNAVAILABLE = "connector_unavailable"
    RETRY_FLOW_DISABLED = "retry_flow_disabled"
    MAX_RETRIES = "max_retries"
    RETRY_WINDOW = "retry_window"
    RETARGET_DISABLED = "retarget_disabled"
    CHANNEL_DISABLED = "channel_disabled"
    CHANNEL_OPTED_OUT = "channel_opted_out"
    CHANNEL_UNREACHABLE = "channel_unreachable"
    MAX_NUDGES = "max_nudges"
    SKIP_DAYS = "skip_days"
    ONE_NUDGE_PER_DAY = "one_nudge_per_day"
    QUIET_HOURS = "quiet_hours"
    ORDER_ALREADY_PAID = "order_already_paid"
    OUTCOME_UNKNOWN = "outcome_unknown"


#: Rules about the order's situation (budgets, windows, the payment flow, the merchant's switches, when), not about
#: the error: a failure whose retries only these forbid still carries a retryable error (``Decision.retryable``).
SITUATIONAL_RETRY_RULES: frozenset[str] = frozenset(
    {
        Rule.VISA_REATTEMPT_CAP,
        Rule.MASTERCARD_REATTEMPT_CAP,
        # Not Rule.MAC_WAIT: the issuer's own advice (Mastercard 24-30, "retry after 1 hour ... 10 days") is part of
        # the error's verdict, which is that of the retry at the end of the wait, not of one the issuer forbids.
        Rule.UPI_AUTOPAY_PEAK_HOURS,
        Rule.UPI_AUTOPAY_MAX_RETRIES,
        Rule.UPI_AUTOPAY_RETRY_WINDOW,
        # The payment flow: an e-mandate debit above the AFA-free limit needs the customer's own authentication.
        Rule.E_MANDATE_AFA_REQUIRED,
        # When: an Indian card e-mandate's debit is re-attempted only within the day its pre-debit notice announced.
        Rule.E_MANDATE_RETRY_WINDOW,
        # The payment flow too: an Indian one-off card payment is authenticated by its customer, payment by payment.
        Rule.RBI_ONE_OFF_AFA,
        Rule.USER_CONSENT_FLOW,
        Rule.RETRY_FLOW_DISABLED,
        Rule.MAX_RETRIES,
        Rule.RETRY_WINDOW,
        Rule.ORDER_ALREADY_PAID,
        # Which connectors the caller offers now: a retry that must stay on the connector that failed (retry_same,
        # step_up, clear_pan, alternate_network) still carries the error's verdict when that one is not offered.
        Rule.CONNECTOR_UNAVAILABLE,
        # When the decision is made: a follow-up's step_up has no cardholder at the checkout, the failure's had.
        Rule.STEP_UP_OUT_OF_SESSION,
        # When too: a one-off payment's customer has left the checkout; the error would still allow a retry.
        Rule.ONE_OFF_OUT_OF_SESSION,
        # The payment flow: a mandate is executed at the gateway that registered it, whatever the error.
        Rule.CASCADE_MANDATE,
    }
)


#: A decline's rules that forbid every silent re-attempt of the card on file for good: the issuer will never approve
#: it (Visa category 1, a lost or stolen card), Mastercard's advice says never again or new details first, or a block
#: list refused it. A later decline of a payment through a link (the customer's own, perhaps with other details)
#: does not lift them.
LASTING_RETRY_BANS: frozenset[str] = frozenset(
    {
        Rule.VISA_CATEGORY_1,
        Rule.LOST_STOLEN_CARD,
        Rule.AUTHORIZATION_REVOKED,
        Rule.MANDATE_REVOKED,
        Rule.ACCOUNT_CLOSED_OR_INVALID,
        Rule.BLOCK_LIST,
        Rule.MAC_NEVER_RETRY,
        Rule.MAC_CARD_UPDATE,
    }
)


#: A decline's rules that forbid every silent re-attempt of the card on file for good but the kinds that send it
#: with something it lacked: after a suspected-fraud decline (Mastercard's 83 with MAC 01, "retry using
#: authentication such as EMV 3DS", among them) the card is re-presented only with its cardholder's authentication, a
#: 3DS step-up; after a Visa category-3 decline (expired card, CVV failure: "revalidate payment information prior to
#: reattempt") only with other details or authentication. A later decline of a payment through a link does not lift
#: either: the card on file's details are still the ones its issuer refused.
LASTING_STRATEGY_BANS: frozenset[str] = frozenset({Rule.SUSPECTED_FRAUD, Rule.VISA_CATEGORY_3_SAME_DETAILS})


#: Named in ``rules_applied`` when a recurring payment runs on an Indian card e-mandate (no cascade).
RBI_CARD_E_MANDATE = "rbi_card_e_mandate"
#: Named in ``rules_applied`` when a recurring ``upi`` payment is taken as the UPI AutoPay debit it is.
UPI_RECURRING_AUTOPAY = "upi_recurring_autopay"


class RulesDataError(ValueError):
    """``data/rules/hard_rules.yaml`` is missing or malformed; the message names the key."""


class RuleInputError(ValueError):
    """A request field the rules read is present but unusable; the message names the field."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field  # the request field at fault, for an API's 422


# --------------------------------------------------------------------------------------------------- the data


@dataclass(frozen=True, slots=True)
class RuleBook:
    """The parsed ``hard_rules.yaml``."""

    version: int
    visa_reattempt_cap: int
    visa_category_3_only: frozenset[str]  # the silent retries that send other details after a category-3 decline
    visa_window: timedelta
    lost_stolen_codes: frozenset[str]  # ISO 8583 codes (normalised like the catalog's): never retried, any network
    lost_stolen_connector_codes: frozenset[tuple[str, str]]  # (connector, code), both case-folded
    lost_stolen_message: Words  # a connector's words for it, when it sends no code that says so
    # The cardholder withdrew their consent to the merchant's card-on-file payments (Visa Stop Payment Service):
    # ISO 8583 codes as the catalog keys them, and a connector's words for it when it sends no such code.
    revoked_codes: frozenset[str]
    revoked_message: Words
    mandate_revoked_message: Words  # a connector's words for a revoked mandate, any payment method
    # The account is closed or the card number unknown to its issuer: ISO 8583 codes, and a connector's words.
    closed_codes: frozenset[str]
    closed_message: Words
    block_list_connector_codes: frozenset[tuple[str, str]]  # (connector, code): a block list refused the payment
    mastercard_networks: frozenset[str]
    mastercard_reattempt_cap: int
    mastercard_window: timedelta
    mac_never_retry: frozenset[str]
    mac_no_retarget: frozenset[str]
    mac_card_update: frozenset[str]
    # Card types unfit for card-on-file payments (40 non-reloadable prepaid, 41 single-use virtual card number): a
    # recurring payment's card on file needs replacing, as for 01.
    mac_card_update_when_recurring: frozenset[str]
    # Response codes with which a card-update advice (01) means "authenticate the cardholder" instead (83).
    mac_authenticate_decline_codes: frozenset[str]
    mac_wait_hours: Mapping[str, float]
    upi_payment_methods: frozenset[str]
    upi_mandate_types: frozenset[str]
    # A recurring payment of these methods is an AutoPay debit, unless its type is one the customer approves.
    upi_recurring_payment_methods: frozenset[str]
    upi_customer_approved_types: frozenset[str]
    upi_timezone: ZoneInfo
    upi_peak_minutes: tuple[tuple[int, int], ...]  # [start, end) minutes of the local day
    upi_max_retries: int
    upi_retry_window: timedelta
    consent_payment_methods: frozenset[str]
    consent_approval_methods: frozenset[str]
    consent_authentication: frozenset[str]
    # A failure in the 3DS challenge itself: the authentication type and the error classes that mean it.
    challenge_authentication: frozenset[str]
    challenge_error_classes: frozenset[str]
    step_up_payment_methods: frozenset[str]
    step_up_not_when_authentication: frozenset[str]
    step_up_not_when_recurring: bool  # a recurring (off-session) payment has no cardholder to authenticate
    step_up_in_session: timedelta  # a decision point later than this after the failure has no cardholder either
    one_off_in_session: timedelta  # a one-off payment is re-attempted silently only this long after its customer paid
    one_off_not_for_payment_method_types: frozenset[str]  # merchant-initiated by nature (a mandate)
    after_authentication_request_only: frozenset[str]  # the silent retries left when the issuer asked for SCA
    authentication_request_classes: frozenset[str]
    fraud_suspicion_only: frozenset[str]  # the silent retries left after a suspected-fraud decline (a step-up)
    fraud_suspicion_classes: frozenset[str]
    alternate_network_payment_methods: frozenset[str]
    alternate_network_payment_method_types: frozenset[str]
    # Error classes an alternate debit network cannot cure: it draws on the same account (insufficient funds).
    alternate_network_not_for_error_classes: frozenset[str]
    cascade_not_for_payment_methods: frozenset[str]  # mandates: bound to the gateway that registered them
    cascade_not_for_payment_method_types: frozenset[str]
    # Declines about the cardholder's account (funds, limits): another acquirer reaches the same issuer and account,
    # so no cascade until this long after the last failed attempt.
    cascade_same_account_error_classes: frozenset[str]
    cascade_same_account_wait: timedelta
    cascade_declined_classes: frozenset[str]  # an earlier attempt's classes that keep a cascade off its connector
    outcome_unknown_codes: frozenset[str]  # connector error codes (case-folded) that leave the attempt's outcome open
    outcome_unknown_words: Words  # searched in the error code and message
    outcome_unknown_wait: timedelta  # no new attempt or payment link of the order until this long after such a failure
    # NPCI's final codes of a UPI leg that timed out (upper case): reversed, so known (UT, BT), or deemed, open (RB).
    upi_final_codes: frozenset[str]
    upi_deemed_codes: frozenset[str]
    # India's card e-mandates (RBI): a recurring card payment of an Indian customer runs on one, bound to its gateway.
    e_mandate_payment_methods: frozenset[str]
    e_mandate_payment_method_types: frozenset[str]  # a card payment of these types is a mandate debit, recurring or not
    e_mandate_customer_countries: frozenset[str]  # upper case, ISO 3166 alpha-2
    e_mandate_currencies_without_country: frozenset[str]  # upper case, ISO 4217: when the request has no country
    # A card e-mandate debit's silent retries go only this long after the original debit, which its issuer's
    # pre-debit notification announced (24 hours ahead); later, a new debit needs a new notification.
    e_mandate_retry_window: timedelta
    # An e-mandate debit (UPI AutoPay, an Indian card's) above this needs the customer's AFA (RBI): no silent retry.
    e_mandate_afa_free_limit: float
    e_mandate_afa_currency: str  # upper case, ISO 4217
    # India's domestic one-off card payments: authenticated payment by payment (RBI), so only these silent retries.
    one_off_afa_payment_methods: frozenset[str]
    one_off_afa_currencies: frozenset[str]  # upper case, ISO 4217
    one_off_afa_customer_countries: frozenset[str]  # upper case, ISO 3166 alpha-2; a request without one counts
    one_off_afa_only: frozenset[str]
    channel_reachability: Mapping[Channel, str]
    sources: Mapping[str, str]


def _get(node: Any, path: str) -> Any:
    current = node
    for key in path.split("."):
        if not isinstance(current, dict) or key not in current:
            raise RulesDataError(f"{RULES_FILE.name}: missing key {path!r}")
        current = current[key]
    return current


def _connector_codes(node: Any, path: str) -> frozenset[tuple[str, str]]:
    """The (connector, code) pairs of the mapping at ``path`` (connector: [codes]), both case-folded."""
    by_connector = _get(node, path)
    if not isinstance(by_connector, dict):
        raise RulesDataError(f"{RULES_FILE.name}: '{path}' must be a mapping")
    return frozenset(
        (str(connector).strip().casefold(), code.strip().casefold())
        for connector in by_connector
        for code in _strings(by_connector, str(connector))
    )


#: Texts (error codes and messages) each ``Words`` remembers its answer for, and the longest it remembers.
WORDS_MEMO_SIZE = 1024
WORDS_MEMO_CHARS = 256


class Words:
    """A rulebook pattern searched in connectors' error codes and messages, with its answer for the texts seen
    lately remembered: a connector sends the same few texts again and again, and searching one is costly (the
    patterns are alternations of case-insensitive expressions, tried at every character: 3.6% of a request's
    instructions before, callgrind on mixed traffic). ``found(text)`` is ``pattern.search(text) is not None``."""

    __slots__ = ("_seen", "pattern")

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern = pattern
        self._seen: dict[str, bool] = {}

    def found(self, text: str) -> bool:
        """Whether ``text`` holds the pattern."""
        seen = self._seen.get(text)
        if seen is None:
            seen = self.pattern.search(text) is not None
            if len(text) <= WORDS_MEMO_CHARS:  # bounded in count and size: any caller may send any text
                if len(self._seen) >= WORDS_MEMO_SIZE:
                    self._seen.clear()
                self._seen[text] = seen
        return seen

    def remembered(self) -> int:
        """How many texts' answers are remembered now."""
        return len(self._seen)


def _any_of(node: Any, path: str) -> Words:
    """One case-insensitive pattern matching any of the regular expressions listed at ``path``."""
    patterns = sorted(_strings(node, path))
    if not patterns:
        raise RulesDataError(f"{RULES_FILE.name}: '{path}' lists no pattern")
    try:
        return Words(re.compile("|".join(f"(?:{pattern})" for pattern in patterns), re.IGNORECASE))
    except re.error as exc:
        raise RulesDataError(f"{RULES_FILE.name}: '{path}' has a bad pattern: {exc}") from None


def _strings(node: Any, path: str) -> frozenset[str]:
    value = _get(node, path)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise RulesDataError(f"{RULES_FILE.name}: {path!r} must be a list of strings")
    return frozenset(item.strip().lower() for item in value)


def _upper(names: frozenset[str]) -> frozenset[str]:
    return frozenset(name.upper() for name in names)


def _error_classes(node: Any, path: str) -> frozenset[str]:
    names = _strings(node, path)
    unknown = sorted(names - {error_class.value for error_class in ErrorClass})
    if unknown:
        raise RulesDataError(f"{RULES_FILE.name}: '{path}' names unknown error classes {unknown}")
    return names


def _strategies(node: Any, path: str) -> frozenset[str]:
    names = _strings(node, path)
    unknown = sorted(names - set(_RETRY_STRATEGY_NAMES))
    if unknown:
        raise RulesDataError(f"{RULES_FILE.name}: '{path}' names unknown retry strategies {unknown}")
    return names


def _flag(node: Any, path: str) -> bool:
    value = _get(node, path)
    if not isinstance(value, bool):
        raise RulesDataError(f"{RULES_FILE.name}: {path!r} must be true or false, got {value!r}")
    return value


def _number(node: Any, path: str) -> float:
    value = _get(node, path)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise RulesDataError(f"{RULES_FILE.name}: {path!r} must be a non-negative number, got {value!r}")
    return float(value)


def _minute_of_day(text: str, path: str) -> int:
    try:
        hours, minutes = text.split(":")
        value = int(hours) * 60 + int(minutes)
    except (AttributeError, ValueError):
        raise RulesDataError(f"{RULES_FILE.name}: {path!r} must be HH:MM, got {text!r}") from None
    if not 0 <= value <= 24 * 60:
        raise RulesDataError(f"{RULES_FILE.name}: {path!r} must be HH:MM, got {text!r}")
    return value


def parse_rulebook(raw: Any) -> RuleBook:
    """Validate the loaded YAML document of the hard rules; raise RulesDataError naming the bad key."""
    windows = _get(raw, "upi_autopay.peak_hours")
    if not isinstance(windows, list) or not windows:
        raise RulesDataError(f"{RULES_FILE.name}: 'upi_autopay.peak_hours' must be a non-empty list")
    peak = tuple(
        (
            _minute_of_day(_get(window, "start"), "upi_autopay.peak_hours.start"),
            _minute_of_day(_get(window, "end"), "upi_autopay.peak_hours.end"),
        )
        for window in windows
    )
    wait_raw = _get(raw, "mastercard_merchant_advice.wait_hours")
    if not isinstance(wait_raw, dict):
        raise RulesDataError(f"{RULES_FILE.name}: 'mastercard_merchant_advice.wait_hours' must be a mapping")
    reach_raw = _get(raw, "channels.reachability")
    if not isinstance(reach_raw, dict) or set(reach_raw) != {channel.value for channel in Channel}:
        raise RulesDataError(f"{RULES_FILE.name}: 'channels.reachability' must name every channel exactly once")
    sources = {
        name: str(_get(raw, f"{name}.source"))
        for name in ("mastercard_merchant_advice", "upi_autopay", "user_consent", "strategies", "channels")
    }
    sources["visa.category_1"] = str(_get(raw, "visa.category_1.source"))
    sources["visa.reattempt_cap"] = str(_get(raw, "visa.reattempt_cap.source"))
    sources["visa.category_3"] = str(_get(raw, "visa.category_3.source"))
    sources["mastercard.reattempt_cap"] = str(_get(raw, "mastercard.reattempt_cap.source"))
    sources["lost_stolen_card"] = str(_get(raw, "lost_stolen_card.source"))
    sources["block_list"] = str(_get(raw, "block_list.source"))
    sources["revoked_authorization"] = str(_get(raw, "revoked_authorization.source"))
    sources["closed_or_invalid_account"] = str(_get(raw, "closed_or_invalid_account.source"))
    sources["suspected_fraud"] = str(_get(raw, "suspected_fraud.source"))
    sources["rbi_card_e_mandate"] = str(_get(raw, "rbi_card_e_mandate.source"))
    sources["e_mandate_afa_limit"] = str(_get(raw, "e_mandate_afa_limit.source"))
    sources["rbi_one_off_afa"] = str(_get(raw, "rbi_one_off_afa.source"))
    sources["outcome_unknown"] = str(_get(raw, "outcome_unknown.source"))
    afa_currency = _get(raw, "e_mandate_afa_limit.currency")
    if not isinstance(afa_currency, str) or not re.fullmatch(r"[A-Za-z]{3}", afa_currency.strip()):
        raise RulesDataError(
            f"{RULES_FILE.name}: 'e_mandate_afa_limit.currency' must be an ISO 4217 code, got {afa_currency!r}"
        )
    return RuleBook(
        version=int(_number(raw, "version")),
        visa_reattempt_cap=int(_number(raw, "visa.reattempt_cap.max_reattempts")),
        visa_category_3_only=_strategies(raw, "visa.category_3.only"),
        visa_window=timedelta(days=_number(raw, "visa.reattempt_cap.window_days")),
        lost_stolen_codes=frozenset(
            _network_code(code) for code in _strings(raw, "lost_stolen_card.network_decline_codes")
        ),
        lost_stolen_connector_codes=_connector_codes(raw, "lost_stolen_card.connector_codes"),
        lost_stolen_message=_any_of(raw, "lost_stolen_card.message_patterns"),
        revoked_codes=frozenset(
            _network_code(code) for code in _strings(raw, "revoked_authorization.network_decline_codes")
        ),
        revoked_message=_any_of(raw, "revoked_authorization.message_patterns"),
        mandate_revoked_message=_any_of(raw, "revoked_authorization.mandate_message_patterns"),
        closed_codes=frozenset(
            _network_code(code) for code in _strings(raw, "closed_or_invalid_account.network_decline_codes")
        ),
        closed_message=_any_of(raw, "closed_or_invalid_account.message_patterns"),
        block_list_connector_codes=_connector_codes(raw, "block_list.connector_codes"),
        mastercard_networks=_strings(raw, "mastercard.reattempt_cap.card_networks"),
        mastercard_reattempt_cap=int(_number(raw, "mastercard.reattempt_cap.max_declines")),
        mastercard_window=timedelta(hours=_number(raw, "mastercard.reattempt_cap.window_hours")),
        mac_never_retry=_strings(raw, "mastercard_merchant_advice.never_retry_codes"),
        mac_no_retarget=_strings(raw, "mastercard_merchant_advice.no_retarget_codes"),
        mac_card_update=_strings(raw, "mastercard_merchant_advice.card_update_codes"),
        mac_card_update_when_recurring=_strings(raw, "mastercard_merchant_advice.card_update_when_recurring_codes"),
        mac_authenticate_decline_codes=frozenset(
            _network_code(code)
            for code in _strings(raw, "mastercard_merchant_advice.card_update_means_authenticate_with_codes")
        ),
        mac_wait_hours={_mac_key(str(code)): _number(wait_raw, str(code)) for code in wait_raw},
        upi_payment_methods=_strings(raw, "upi_autopay.payment_methods"),
        upi_mandate_types=_strings(raw, "upi_autopay.mandate_types"),
        upi_recurring_payment_methods=_strings(raw, "upi_autopay.recurring_payment_methods"),
        upi_customer_approved_types=_strings(raw, "upi_autopay.customer_approved_types"),
        upi_timezone=ZoneInfo(str(_get(raw, "upi_autopay.timezone"))),
        upi_peak_minutes=peak,
        upi_max_retries=int(_number(raw, "upi_autopay.max_retries")),
        upi_retry_window=timedelta(hours=_number(raw, "upi_autopay.retry_window_hours")),
        # The vocabulary's constants are the floor: the data may add methods, never drop them.
        consent_payment_methods=_strings(raw, "user_consent.payment_methods") | USER_CONSENT_METHODS,
        consent_approval_methods=_strings(raw, "user_consent.approval_payment_methods"),
        consent_authentication=_strings(raw, "user_consent.authentication_types") | USER_CONSENT_AUTHENTICATION,
        challenge_authentication=_strings(raw, "user_consent.challenge_failure.authentication_types"),
        challenge_error_classes=_error_classes(raw, "user_consent.challenge_failure.error_classes"),
        step_up_payment_methods=_strings(raw, "strategies.step_up.payment_methods"),
        step_up_not_when_authentication=_strings(raw, "strategies.step_up.not_when_authentication"),
        step_up_not_when_recurring=_flag(raw, "strategies.step_up.not_when_recurring"),
        step_up_in_session=timedelta(minutes=_number(raw, "strategies.step_up.in_session_minutes")),
        one_off_in_session=timedelta(minutes=_number(raw, "one_off_payments.silent_retry_in_session_minutes")),
        one_off_not_for_payment_method_types=_strings(raw, "one_off_payments.not_for_payment_method_types"),
        after_authentication_request_only=_strings(raw, "strategies.after_authentication_request.only"),
        authentication_request_classes=_error_classes(raw, "strategies.after_authentication_request.error_classes"),
        fraud_suspicion_only=_strategies(raw, "suspected_fraud.only"),
        fraud_suspicion_classes=_error_classes(raw, "suspected_fraud.error_classes"),
        alternate_network_payment_methods=_strings(raw, "strategies.alternate_network.payment_methods"),
        alternate_network_payment_method_types=_strings(raw, "strategies.alternate_network.payment_method_types"),
        alternate_network_not_for_error_classes=_error_classes(
            raw, "strategies.alternate_network.not_for_error_classes"
        ),
        cascade_not_for_payment_methods=_strings(raw, "strategies.cascade.not_for_payment_methods"),
        cascade_not_for_payment_method_types=_strings(raw, "strategies.cascade.not_for_payment_method_types"),
        cascade_same_account_error_classes=_error_classes(raw, "strategies.cascade.same_account_error_classes"),
        cascade_same_account_wait=timedelta(hours=_number(raw, "strategies.cascade.same_account_wait_hours")),
        cascade_declined_classes=_error_classes(raw, "strategies.cascade.declined_by_issuer_classes"),
        outcome_unknown_codes=frozenset(code.casefold() for code in _strings(raw, "outcome_unknown.error_codes")),
        outcome_unknown_words=_any_of(raw, "outcome_unknown.message_words"),
        outcome_unknown_wait=timedelta(hours=_number(raw, "outcome_unknown.wait_hours")),
        upi_final_codes=_upper(_strings(raw, "outcome_unknown.upi_final_codes")),
        upi_deemed_codes=_upper(_strings(raw, "outcome_unknown.upi_deemed_codes")),
        e_mandate_payment_methods=_strings(raw, "rbi_card_e_mandate.payment_methods"),
        e_mandate_payment_method_types=_strings(raw, "rbi_card_e_mandate.mandate_payment_method_types"),
        e_mandate_customer_countries=_upper(_strings(raw, "rbi_card_e_mandate.customer_countries")),
        e_mandate_currencies_without_country=_upper(_strings(raw, "rbi_card_e_mandate.currencies_without_country")),
        e_mandate_retry_window=timedelta(hours=_number(raw, "rbi_card_e_mandate.retry_window_hours")),
        e_mandate_afa_free_limit=_number(raw, "e_mandate_afa_limit.amount"),
        e_mandate_afa_currency=afa_currency.strip().upper(),
        one_off_afa_payment_methods=_strings(raw, "rbi_one_off_afa.payment_methods"),
        one_off_afa_currencies=_upper(_strings(raw, "rbi_one_off_afa.currencies")),
        one_off_afa_customer_countries=_upper(_strings(raw, "rbi_one_off_afa.customer_countries")),
        one_off_afa_only=_strategies(raw, "rbi_one_off_afa.only"),
        channel_reachability={Channel(name): str(field) for name, field in reach_raw.items()},
        sources=sources,
    )


@functools.cache
def load_rulebook() -> RuleBook:
    """The shipped hard rules (``data/rules/hard_rules.yaml``), parsed once per process."""
    try:
        raw = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RulesDataError(f"{RULES_FILE}: hard rules file not found") from None
    except yaml.YAMLError as exc:
        raise RulesDataError(f"{RULES_FILE}: not valid YAML: {exc}") from None
    return parse_rulebook(raw)


def _network_code(code: str) -> str:
    """An ISO 8583 response code as the catalog keys it: upper case, numeric codes as two digits ("4" is "04")."""
    code = code.strip().upper()
    return code.lstrip("0").zfill(2) if code.isdigit() else code


def _mac_key(code: str) -> str:
    code = code.strip()
    return code.zfill(2) if code.isdigit() else code.lower()


# ---------------------------------------------------------------------------------------------- the API types


@dataclass(frozen=True, slots=True)
class Candidate:
    """One concrete next action the policy may take."""

    action: Action
    execute_at: datetime  # UTC, >= request.event_time
    strategy: Strategy | None = None  # retry only
    connector: str | None = None  # retry only
    channel: Channel | None = None  # retarget only


@dataclass(frozen=True, slots=True)
class RuleVerdict:
    candidate: Candidate
    allowed: bool
    broken: tuple[str, ...]  # names of the rules that forbid it, e.g. "visa_category_1", "quiet_hours"


@dataclass(frozen=True, slots=True)
class RuleContext:
    """Everything the rules need to know about a request, computed once (catalog lookups, counts, windows).

    Build it with ``build_context``; the fields after ``rules_applied`` are its precomputed facts.
    """

    request: DecisionRequest
    merchant: MerchantConfig
    rules_applied: tuple[str, ...]  # rules that constrain this request, e.g. "max_retries:3", "visa_category:2"
    event_time: datetime
    first_failure_at: datetime  # the earliest of attempt 1, any attempt or nudge, event_time: windows, Day 0
    last_failure_at: datetime  # the last failed attempt's created_at, else event_time: anchors MAC waits
    failed_connector: str
    connector_order: tuple[str, ...]  # available_connectors, else the merchant's pecking order
    # Connectors (spelled as connector_order spells them) whose earlier attempt of this order the issuer declined:
    # no cascade goes to them.
    declined_connectors: frozenset[str]
    visa_category: int | None
    merchant_advice_code: str | None
    is_upi_autopay: bool
    is_user_consent_flow: bool
    retries_used: int
    nudges_used: int
    # Rules that forbid every candidate of a kind, whatever its time, connector or channel.
    retry_blocked_by: tuple[str, ...]
    retarget_blocked_by: tuple[str, ...]
    strategy_blocked_by: Mapping[str, tuple[str, ...]]
    channel_blocked_by: Mapping[str, tuple[str, ...]]
    # Time-dependent rules, as thresholds.
    window_end: datetime  # first failure + retry_window_days, for retries and retargets alike
    earliest_retry_at: datetime | None  # Mastercard MAC wait
    # No cascade before this (a decline about the cardholder's account: funds, limits); None: no such bound.
    cascade_not_before: datetime | None
    # No silent retry and no payment link before this: the failure left the attempt's outcome open (a timeout, a
    # pending status) and it may still succeed late; None: no such bound.
    outcome_known_at: datetime | None
    visa_cap: int | None  # None: the Visa re-attempt cap does not apply
    visa_window: timedelta
    visa_retry_times: tuple[datetime, ...]  # sorted created_at of earlier silent retries (both card caps count them)
    visa_reported_reattempts: int  # the caller's card_reattempts_30d, 0 when absent
    mastercard_cap: int | None  # None: the Mastercard re-attempt cap does not apply
    mastercard_window: timedelta
    mastercard_decline_times: tuple[datetime, ...]  # sorted times of the card's declined authorizations
    upi_window_end: datetime | None
    # An Indian card e-mandate debit: no silent retry after this (its pre-debit notification's day); None: no bound.
    e_mandate_window_end: datetime | None
    one_off_session_end: datetime | None  # a one-off payment: no silent retry after its customer left the checkout
    upi_timezone: ZoneInfo
    upi_peak_minutes: tuple[tuple[int, int], ...]
    merchant_timezone: ZoneInfo
    # The merchant's zone and the customer's country's (its span's ends): a payday is a payday in each of them.
    payday_zones: tuple[ZoneInfo, ...]
    quiet_minutes: tuple[int, int] | None  # [start, end) minutes of the local day, may wrap midnight
    # The customer's zones other than the merchant's (model.zones), where the quiet hours hold too; empty when the
    # country is unknown, or when keeping them there as well would leave no hour of the day to send in.
    customer_zones: tuple[ZoneInfo, ...]
    # Their UTC offsets in minutes when none changes between the failure and the window's end (most of the year),
    # else None (each moment's offset is looked up).
    customer_offsets: tuple[int, ...] | None
    day0: date  # local date of the first failure in the merchant's timezone
    first_allowed_day: int  # nudge i may not go before Day i * (skip_days + 1)
    # skip_days + 1: retriggers (every nudge after the first) go only on Days that are multiples of it (k+1, 2(k+1),
    # ...); the first payment link goes as soon as the quiet hours allow, on whatever Day that is. None: no cadence
    # binds the next nudge (it is the first).
    cadence_days: int | None
    nudged_days: frozenset[date]  # local dates that already had a nudge
    error: NormalisedError  # the failure as the catalog normalised it (policy reasons and exploration reuse it)


def lasting_bans(context: RuleContext) -> frozenset[str]:
    """The rules of ``context`` that restrict silent re-attempts of its card for good: those of
    ``LASTING_RETRY_BANS`` that forbid every one, and those of ``LASTING_STRATEGY_BANS`` that forbid some strategies."""
    found = LASTING_RETRY_BANS.intersection(context.retry_blocked_by)
    for reasons in context.strategy_blocked_by.values():
        found |= LASTING_STRATEGY_BANS.intersection(reasons)
    return frozenset(found)


# ------------------------------------------------------------------------------------------------ build_context


_RETRY_STRATEGY_NAMES: tuple[str, ...] = tuple(strategy.value for strategy in RETRY_STRATEGIES)
#: Every channel with its plain value, in the enum's order (``Enum.value`` is a slow property, read once here).
_INITIAL, _RETARGET_LINK = Strategy.INITIAL.value, Strategy.RETARGET_LINK.value
_CHANNEL_ITEMS: tuple[tuple[Channel, str], ...] = tuple((channel, channel.value) for channel in Channel)
_CHANNEL_VALUES = frozenset(name for _, name in _CHANNEL_ITEMS)
_CHANNELS: tuple[Channel, ...] = tuple(Channel)


_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SEPARATOR_RUN = re.compile(r"[\s\-.]+")


@functools.lru_cache(maxsize=1024)
def method_name(text: str) -> str:
    """A payment method (or type) as the rules spell them: ``"OpenBanking"``, ``"open-banking"`` and
    ``" Open Banking "`` are all ``open_banking``."""
    return _SEPARATOR_RUN.sub("_", _CAMEL_BOUNDARY.sub("_", text.strip())).lower()


def _reported_reattempts(request: DecisionRequest) -> int:
    extra = request.model_extra or {}
    value = extra.get(CARD_REATTEMPTS_FIELD)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RuleInputError(
            f"{CARD_REATTEMPTS_FIELD} must be a non-negative integer, got {value!r}", CARD_REATTEMPTS_FIELD
        )
    return value


def build_context(request: DecisionRequest, merchant: MerchantConfig, catalog: ErrorCatalog) -> RuleContext:
    """Compute, once per request, every fact the rules need (the only place that calls the catalog)."""
    book = load_rulebook()
    payment, failure, customer = request.payment, request.failure, request.customer
    event_time = request.event_time
    attempts = request.history.attempts
    nudges = request.history.nudges
    applied: list[str] = []

    normalised = normalise_request(catalog, request)

    first_attempt = next((a for a in attempts if a.attempt_number == 1), None)
    if first_attempt is None and attempts:
        first_attempt = min(attempts, key=lambda a: a.created_at)
    first_attempt_at = min(first_attempt.created_at, event_time) if first_attempt else event_time
    # The order failed no later than anything the history records of it: a nudge (its payment link) or an attempt
    # sent before the one the caller numbers 1. A follow-up sent with its nudges but without its attempts keeps
    # the window and Day 0 of the order's real first failure, not its own event_time (which moved them days on).
    first_failure_at = min([first_attempt_at, *(a.created_at for a in attempts), *(n.sent_at for n in nudges)])
    failures = [a.created_at for a in attempts if a.status == "failure"]
    last_failure_at = max(failures) if failures else event_time

    # An empty list is the caller saying no connector is available now (no retry), not that it sent none.
    offered = request.available_connectors
    # Connector names are matched trimmed and in any case ("Stripe" is stripe: a cascade must leave the PSP that
    # failed), and spelled as the pecking order spells them.
    spelled: dict[str, str] = {}
    for name in merchant.connectors if offered is None else offered:
        spelled.setdefault(name.strip().lower(), name)
    connector_order = tuple(spelled.values())
    failed_connector = spelled.get(failure.connector.strip().lower(), failure.connector)
    declined_connectors = _declined_connectors(book, catalog, request, spelled)
    applied.extend(
        f"{Rule.CASCADE_DECLINED_CONNECTOR.value}:{name}"
        for name in connector_order
        if name in declined_connectors and name != failed_connector
    )
    # Every re-attempt counts against the budgets, one with a strategy winback does not know included.
    retry_times = tuple(sorted(a.created_at for a in attempts if a.strategy not in NOT_SILENT_RETRY_STRATEGIES))
    # A history that skips attempt numbers (only attempt 3 sent, say) is partial: every attempt it leaves out
    # after the first counts as a retry, so a budget can never look larger than it is.
    numbers = {a.attempt_number for a in attempts}
    unlisted_retries = max(numbers, default=1) - len(numbers) - (1 not in numbers)
    retries_used = len(retry_times) + max(unlisted_retries, 0)
    nudges_used = len(nudges)

    method = method_name(payment.payment_method)
    method_type = method_name(payment.payment_method_type or "")
    authentication = payment.authentication_type.strip().lower()
    network = (payment.card_network or "").strip().lower()

    retry_blocked: list[str] = []
    retarget_blocked: list[str] = []
    # An attempt of the order that succeeded means it is paid: no charge and no payment link can follow, whatever
    # the failure after it says (a caller's race, or a history sent out of order). Stop is all that is left.
    if any(a.status == "success" for a in attempts):
        applied.append(Rule.ORDER_ALREADY_PAID.value)
        retry_blocked.append(Rule.ORDER_ALREADY_PAID)
        retarget_blocked.append(Rule.ORDER_ALREADY_PAID)
    retries_left = [merchant.retry.max_retries - retries_used]
    applied.append(f"max_retries:{merchant.retry.max_retries}")

    # Visa: category 1 never again; any other Visa decline counts against the re-attempt cap.
    visa_category = normalised.visa_category
    visa_code = failure.network_decline_code or normalised.network_decline_code
    if visa_category is None and network == "visa" and visa_code:
        # The caller says Visa even where the catalog would not look (e.g. an odd payment method): honour it, for
        # the code sent or the one the connector's own code carries (Stripe's lost_card is a 41).
        visa_category = catalog.visa_category(visa_code)
    visa_cap: int | None = None
    reported = _reported_reattempts(request)
    if visa_category is not None:
        applied.append(f"visa_category:{visa_category}")
    if visa_category == 1:
        retry_blocked.append(Rule.VISA_CATEGORY_1)
    elif network == "visa" or visa_category is not None:
        visa_cap = book.visa_reattempt_cap
        since = event_time - book.visa_window
        recent = max(sum(1 for t in retry_times if t >= since), reported)
        retries_left.append(visa_cap - recent)
        applied.append(f"visa_reattempts:{recent}/{visa_cap}")

    # Pick-up, lost and stolen cards: blocked by the issuer on every network, never re-attempted (Visa's category 1
    # says so for Visa; the others pair these codes with MAC 03, which many connectors do not pass on). The code is
    # the one sent or the one the catalog maps the connector's code to; UPI's NPCI codes are another namespace.
    own_code = (failure.connector.strip().casefold(), (failure.error_code or "").strip().casefold())
    if not _is_upi_method(method):
        sent_code = _network_code(failure.network_decline_code) if failure.network_decline_code else None
        codes = {sent_code, normalised.network_decline_code}
        message = failure.error_message
        if _said(codes, message, book.lost_stolen_codes, book.lost_stolen_message) or (
            own_code in book.lost_stolen_connector_codes
        ):
            applied.append(Rule.LOST_STOLEN_CARD.value)
            retry_blocked.append(Rule.LOST_STOLEN_CARD)
        # A closed account or a card number its issuer does not know: no silent re-attempt on any network (Visa's
        # category 1 for Visa; Mastercard pairs them with MAC 03); a payment link, with another card, stays open.
        if _said(codes, message, book.closed_codes, book.closed_message):
            applied.append(Rule.ACCOUNT_CLOSED_OR_INVALID.value)
            retry_blocked.append(Rule.ACCOUNT_CLOSED_OR_INVALID)
        # The cardholder told their issuer to stop the merchant's payments (Visa R0, R1, R3, on whichever network a
        # connector reports them): no silent re-attempt ever, and no payment link asking them to pay what they
        # stopped, as for Mastercard's MAC 21.
        if _said(codes, message, book.revoked_codes, book.revoked_message):
            applied.append(Rule.AUTHORIZATION_REVOKED.value)
            retry_blocked.append(Rule.AUTHORIZATION_REVOKED)
            retarget_blocked.append(Rule.AUTHORIZATION_REVOKED)

    # A revoked mandate (UPI AutoPay, an e-mandate): nothing is left to debit, so no silent retry; a link stays open
    # (a bank also revokes a mandate whose debits keep failing for want of balance).
    if failure.error_message is not None and book.mandate_revoked_message.found(failure.error_message):
        applied.append(Rule.MANDATE_REVOKED.value)
        retry_blocked.append(Rule.MANDATE_REVOKED)

    # A block list refused the payment: the merchant's own (Stripe Radar's list) or its processor's negative file.
    # Another connector would not consult that list, so a cascade would slip past the merchant's own decision, and a
    # link would invite the customer it blocked: neither is tried.
    if own_code in book.block_list_connector_codes:
        applied.append(Rule.BLOCK_LIST.value)
        retry_blocked.append(Rule.BLOCK_LIST)
        retarget_blocked.append(Rule.BLOCK_LIST)

    # A duplicate-transaction refusal (Stripe's duplicate_transaction, ISO 8583 94, NPCI U01, Cybersource's reused
    # reference: the catalog's duplicate class): the switch or network saw the same payment moments before, and that
    # one may have gone through. Its status is to be checked, not the payment sent again: another connector, or the
    # same one later, would not see the first and could take the money twice. No silent retry; a payment link, which
    # the customer pays knowingly, is left to the policy (data/README.md, rules/hard_rules.yaml).
    if normalised.error_class is ErrorClass.DUPLICATE:
        applied.append(Rule.DUPLICATE_TRANSACTION.value)
        retry_blocked.append(Rule.DUPLICATE_TRANSACTION)

    # Mastercard: no authorization after so many declines of the card in any window (24 h), the original attempt's
    # decline included, counted from the order's history (a failure the history does not list is the event's).
    # A declined payment through a link counts too: Mastercard counts every declined authorization of the card
    # number, whoever initiated it, and the history does not say whether the customer paid with the card on file.
    mastercard_cap: int | None = None
    mastercard_declines: tuple[datetime, ...] = ()
    if network in book.mastercard_networks:
        mastercard_cap = book.mastercard_reattempt_cap
        declined = [a.created_at for a in attempts if a.status == "failure"]
        if not any(a.strategy == _INITIAL for a in attempts):
            declined.append(first_attempt_at)
        mastercard_declines = tuple(sorted(declined))
        since = event_time - book.mastercard_window
        recent = sum(1 for t in mastercard_declines if t >= since)
        retries_left.append(mastercard_cap - recent)
        applied.append(f"mastercard_declines:{recent}/{mastercard_cap}")

    # Mastercard merchant advice: honoured whenever present, on any network; the stricter of data and catalog.
    mac = _mac_key(failure.merchant_advice_code) if failure.merchant_advice_code else None
    earliest_retry_at: datetime | None = None
    if mac:
        applied.append(f"mastercard_mac:{mac}")
        advice = normalised.merchant_advice
        if mac in book.mac_never_retry or (advice is not None and advice.never_retry):
            retry_blocked.append(Rule.MAC_NEVER_RETRY)
        if mac in book.mac_no_retarget:
            retarget_blocked.append(Rule.MAC_NO_RETARGET)
        # With a security decline (Mastercard 83), 01 asks for the cardholder's authentication, not new details:
        # the suspected-fraud rule below leaves the 3DS step-up at the checkout, which this advice calls for.
        authenticate = normalised.error_class.value in book.fraud_suspicion_classes and bool(
            {failure.network_decline_code and _network_code(failure.network_decline_code),
             normalised.network_decline_code} & book.mac_authenticate_decline_codes
        )  # fmt: skip
        needs_card_update = mac in book.mac_card_update or (advice is not None and advice.needs_card_update)
        # A card type not meant for card-on-file payments (MAC 40, 41): the card on file of a recurring payment is
        # to be replaced by the customer, not re-attempted.
        unfit_on_file = payment.is_recurring and mac in book.mac_card_update_when_recurring
        if (needs_card_update and not authenticate) or unfit_on_file:
            retry_blocked.append(Rule.MAC_CARD_UPDATE)
        waits = [book.mac_wait_hours.get(mac), advice.wait_hours if advice is not None else None]
        wait = max((w for w in waits if w is not None), default=None)
        if wait:
            earliest_retry_at = last_failure_at + timedelta(hours=wait)
            applied.append(f"mastercard_mac_wait:{wait:g}h")

    # UPI AutoPay: NPCI off-peak windows and retry budget.
    is_upi_autopay = method in book.upi_payment_methods or (method_type in book.upi_mandate_types and "upi" in method)
    if not is_upi_autopay and _is_recurring_upi_debit(book, request, method, method_type):
        # NPCI's one recurring UPI flow is the AutoPay mandate: a recurring `upi` payment is one of its debits, held
        # to the same off-peak windows and retry budget (it was taken for a collect the customer must approve).
        is_upi_autopay = True
        applied.append(UPI_RECURRING_AUTOPAY)
    upi_window_end: datetime | None = None
    if is_upi_autopay:
        applied.append("upi_autopay_offpeak")
        applied.append(f"upi_autopay_max_retries:{book.upi_max_retries}")
        retries_left.append(book.upi_max_retries - retries_used)
        if retries_used >= book.upi_max_retries:
            retry_blocked.append(Rule.UPI_AUTOPAY_MAX_RETRIES)
        upi_window_end = first_failure_at + book.upi_retry_window

    # A one-off payment was made by its customer at a checkout (customer-initiated): a silent re-attempt hours later
    # would charge them without their say, after they may have paid another way, which only recurring (shopper-not-
    # present) payments allow. It is re-attempted silently only while they may still be at the checkout: up to
    # one_off_in_session after their latest own attempt (the first one, or a payment through a link); after that, a
    # payment link asks them.
    one_off_session_end: datetime | None = None
    if (
        not payment.is_recurring
        and not merchant.retry.one_off_after_checkout
        and not is_upi_autopay
        and method_type not in book.one_off_not_for_payment_method_types
    ):
        customer_attempts = [a.created_at for a in attempts if a.strategy in NOT_SILENT_RETRY_STRATEGIES]
        one_off_session_end = max(customer_attempts, default=first_failure_at) + book.one_off_in_session
        applied.append(f"one_off_in_session:{book.one_off_in_session.total_seconds() / 60:g}m")

    # User-consent flows: the customer must approve, so nothing can be re-attempted silently.
    is_consent = (
        method in book.consent_payment_methods
        or method_type in book.consent_payment_methods
        or (method in book.consent_approval_methods and not is_upi_autopay)
        or authentication in book.consent_authentication
        # A 3DS payment that failed in its challenge (not passed, abandoned): the contract's authentication_type
        # cannot say "challenge", the error class can.
        or (
            authentication in book.challenge_authentication
            and normalised.error_class.value in book.challenge_error_classes
        )
    )
    if is_consent:
        applied.append("user_consent_flow")
        retry_blocked.append(Rule.USER_CONSENT_FLOW)

    if retries_used >= merchant.retry.max_retries:
        retry_blocked.append(Rule.MAX_RETRIES)
    applied.append(f"retries_left:{max(0, min(retries_left))}")

    # Strategy applicability and the merchant's enabled flows.
    flows = {str(flow) for flow in merchant.retry.flows}
    is_card = method in book.step_up_payment_methods
    not_applicable: dict[str, str] = {}
    if (
        not is_card
        or authentication in book.step_up_not_when_authentication
        or (payment.is_recurring and book.step_up_not_when_recurring)
    ):
        not_applicable[Strategy.STEP_UP.value] = Rule.STEP_UP_NOT_APPLICABLE
    elif event_time - last_failure_at > book.step_up_in_session or any(
        # A message sent since the last failure (or, with no failure listed, at all) makes this a follow-up: the
        # cardholder left the checkout. A follow-up sent with its nudges but not its attempts has no failure time
        # (last_failure_at is its own event_time), and was offered a silent step-up a day after the failure.
        not failures or nudge.sent_at >= last_failure_at
        for nudge in nudges
    ):
        not_applicable[Strategy.STEP_UP.value] = Rule.STEP_UP_OUT_OF_SESSION
    if normalised.error_class.value in book.authentication_request_classes:
        _only_these_retries(not_applicable, book.after_authentication_request_only, Rule.AUTHENTICATION_REQUESTED)
    # Visa category 3: the issuer declined the details it was sent; only a retry that sends others (a step-up's
    # authentication, the PAN for a token) revalidates them (hard_rules.yaml, visa.category_3).
    if visa_category == 3:
        _only_these_retries(not_applicable, book.visa_category_3_only, Rule.VISA_CATEGORY_3_SAME_DETAILS)
    # A suspected-fraud decline: the card is not re-presented silently; only a step-up lets the issuer verify the
    # cardholder, while they are at the checkout (hard_rules.yaml, suspected_fraud).
    if normalised.error_class.value in book.fraud_suspicion_classes:
        applied.append(Rule.SUSPECTED_FRAUD.value)
        _only_these_retries(not_applicable, book.fraud_suspicion_only, Rule.SUSPECTED_FRAUD)
    is_card_e_mandate = _is_indian_card_e_mandate(book, request, method, method_type)
    e_mandate_window_end: datetime | None = None
    if is_card_e_mandate:
        applied.append(RBI_CARD_E_MANDATE)
        # The issuer notified the cardholder of this debit 24 hours ahead (RBI); its retries stay within that debit's
        # day, a later one would be a debit nobody was told of (hard_rules.yaml, rbi_card_e_mandate).
        e_mandate_window_end = first_failure_at + book.e_mandate_retry_window
        hours = book.e_mandate_retry_window.total_seconds() / 3600
        applied.append(f"{Rule.E_MANDATE_RETRY_WINDOW.value}:{hours:g}h")
    elif _is_indian_one_off_card_payment(book, request, method, method_type):
        # Authenticated by its customer with a factor made for that payment alone (RBI): a silent re-attempt has
        # none, so only a step-up, where the customer authenticates again at the checkout.
        applied.append(Rule.RBI_ONE_OFF_AFA.value)
        _only_these_retries(not_applicable, book.one_off_afa_only, Rule.RBI_ONE_OFF_AFA)
    # Above the AFA-free limit an e-mandate debit needs the customer's own authentication (UPI PIN, card OTP): a
    # user-consent flow, so no silent retry; a payment link, where the customer pays, stays open.
    if (is_upi_autopay or is_card_e_mandate) and _above_afa_free_limit(book, request):
        limit = f"{book.e_mandate_afa_free_limit:g}{book.e_mandate_afa_currency}"
        applied.append(f"{Rule.E_MANDATE_AFA_REQUIRED.value}:{limit}")
        retry_blocked.append(Rule.E_MANDATE_AFA_REQUIRED)
    if (
        is_upi_autopay
        or is_card_e_mandate
        or method in book.cascade_not_for_payment_methods
        or method_type in book.cascade_not_for_payment_method_types
    ):
        not_applicable.setdefault(Strategy.CASCADE.value, Rule.CASCADE_MANDATE)
    # Insufficient funds or a limit of the card or account: the issuer's answer about the cardholder's account, which
    # another acquirer reaches unchanged. A cascade waits until the account may have changed (hard_rules.yaml).
    cascade_not_before: datetime | None = None
    if (
        normalised.error_class.value in book.cascade_same_account_error_classes
        and Strategy.CASCADE.value not in not_applicable
        and last_failure_at + book.cascade_same_account_wait > event_time
    ):
        cascade_not_before = last_failure_at + book.cascade_same_account_wait
        applied.append(f"{Rule.CASCADE_SAME_ACCOUNT.value}:{book.cascade_same_account_wait.total_seconds() / 3600:g}h")
    # An attempt whose outcome is not known (a timeout, a pending status) may still be authorised late: any new
    # attempt or payment link of the order before then may charge the customer twice (hard_rules.yaml).
    # An earlier attempt of the order left open (its error code says so; the history carries no message) may land
    # late as well, whatever the last failure was.
    # A UPI payment's NPCI code, when it is one of a timed-out leg's final codes, decides (hard_rules.yaml).
    upi = _is_upi_method(method)
    open_now = _outcome_open(book, upi, failure.error_code, failure.error_message, failure.network_decline_code)
    unknown_since = [last_failure_at] if open_now else []
    unknown_since += [
        a.created_at for a in attempts if a.status == "failure" and _outcome_open(book, upi, a.error_code)
    ]
    outcome_known_at = max(unknown_since) + book.outcome_unknown_wait if unknown_since else None
    if outcome_known_at is not None and outcome_known_at <= event_time:
        outcome_known_at = None  # known by now
    if outcome_known_at is not None:
        applied.append(f"{Rule.OUTCOME_UNKNOWN.value}:{book.outcome_unknown_wait.total_seconds() / 3600:g}h")
    if not payment.is_network_token:
        not_applicable[Strategy.CLEAR_PAN.value] = Rule.CLEAR_PAN_NOT_APPLICABLE
    if not (
        method in book.alternate_network_payment_methods and method_type in book.alternate_network_payment_method_types
    ):
        not_applicable[Strategy.ALTERNATE_NETWORK.value] = Rule.ALTERNATE_NETWORK_NOT_APPLICABLE
    elif normalised.error_class.value in book.alternate_network_not_for_error_classes:
        # Another debit network draws on the same account: it cannot cure insufficient funds (hard_rules.yaml).
        applied.append(Rule.ALTERNATE_NETWORK_SAME_ACCOUNT.value)
        not_applicable.setdefault(Strategy.ALTERNATE_NETWORK.value, Rule.ALTERNATE_NETWORK_SAME_ACCOUNT)
    flow_disabled = Rule.RETRY_FLOW_DISABLED
    strategy_blocked: dict[str, tuple[str, ...]] = {}
    for name in _RETRY_STRATEGY_NAMES:
        reasons: list[str] = [] if name in flows else [flow_disabled]
        if name in not_applicable:
            reasons.append(not_applicable[name])
        strategy_blocked[name] = tuple(reasons)

    # Retarget: merchant switch, budget, channels.
    retarget = merchant.retarget
    if not retarget.enabled:
        retarget_blocked.append(Rule.RETARGET_DISABLED)
        applied.append("retarget_disabled")
    else:
        applied.append(f"max_nudges:{retarget.max_nudges}")
    if nudges_used >= retarget.max_nudges:
        retarget_blocked.append(Rule.MAX_NUDGES)
    applied.append(f"nudges_left:{max(0, retarget.max_nudges - nudges_used)}")
    enabled_channels = {str(channel) for channel in retarget.channels}
    opted_out = {str(channel) for channel in customer.opted_out_channels}
    channel_blocked: dict[str, tuple[str, ...]] = {}
    reachability = book.channel_reachability
    for channel, name in _CHANNEL_ITEMS:
        reasons = []
        if name not in enabled_channels:
            reasons.append(Rule.CHANNEL_DISABLED)
        if name in opted_out:
            reasons.append(Rule.CHANNEL_OPTED_OUT)
        if not bool(getattr(customer, reachability[channel], False)):
            reasons.append(Rule.CHANNEL_UNREACHABLE)
            if name in enabled_channels:
                applied.append(f"unreachable:{name}")
        channel_blocked[name] = tuple(reasons)
    applied.extend(f"opted_out:{channel}" for channel in sorted(opted_out & _CHANNEL_VALUES))

    # Windows, cadence and quiet hours.
    window_end = first_failure_at + timedelta(days=retarget.retry_window_days)
    applied.append(f"retry_window:{retarget.retry_window_days}d")
    quiet = retarget.quiet_hours
    merchant_tz = _zone(quiet.timezone)
    quiet_minutes = (quiet.start_minute, quiet.end_minute)
    if quiet_minutes[0] == quiet_minutes[1]:
        quiet_minutes_or_none: tuple[int, int] | None = None
    else:
        quiet_minutes_or_none = quiet_minutes
        if retarget.enabled:
            applied.append(f"quiet_hours:{quiet.start}-{quiet.end} {quiet.timezone}")
    phone = (customer.model_extra or {}).get("phone")
    outlying = outlying_zone(customer.country, phone if isinstance(phone, str) else None)
    quiet_customer_zones = _customer_quiet_zones(
        customer.country, merchant_tz, quiet_minutes_or_none, event_time, outlying
    )
    if retarget.enabled and quiet_customer_zones:
        applied.append("quiet_hours_customer:" + ",".join(str(zone) for zone in quiet_customer_zones))
    if retarget.enabled:
        applied.append(f"skip_days:{retarget.skip_days}")

    return RuleContext(
        error=normalised,
        request=request,
        merchant=merchant,
        rules_applied=tuple(dict.fromkeys(applied)),
        event_time=event_time,
        first_failure_at=first_failure_at,
        last_failure_at=last_failure_at,
        failed_connector=failed_connector,
        connector_order=connector_order,
        declined_connectors=declined_connectors,
        visa_category=visa_category,
        merchant_advice_code=mac,
        is_upi_autopay=is_upi_autopay,
        is_user_consent_flow=is_consent,
        retries_used=retries_used,
        nudges_used=nudges_used,
        retry_blocked_by=tuple(dict.fromkeys(retry_blocked)),
        retarget_blocked_by=tuple(dict.fromkeys(retarget_blocked)),
        strategy_blocked_by=strategy_blocked,
        channel_blocked_by=channel_blocked,
        window_end=window_end,
        earliest_retry_at=earliest_retry_at,
        cascade_not_before=cascade_not_before,
        outcome_known_at=outcome_known_at,
        visa_cap=visa_cap,
        visa_window=book.visa_window,
        visa_retry_times=retry_times,
        visa_reported_reattempts=reported,
        mastercard_cap=mastercard_cap,
        mastercard_window=book.mastercard_window,
        mastercard_decline_times=mastercard_declines,
        upi_window_end=upi_window_end,
        e_mandate_window_end=e_mandate_window_end,
        one_off_session_end=one_off_session_end,
        upi_timezone=book.upi_timezone,
        upi_peak_minutes=book.upi_peak_minutes,
        merchant_timezone=merchant_tz,
        payday_zones=payday_zones(customer.country, merchant_tz, outlying),
        quiet_minutes=quiet_minutes_or_none,
        customer_zones=quiet_customer_zones,
        customer_offsets=_fixed_offsets(quiet_customer_zones, event_time, window_end),
        day0=first_failure_at.astimezone(merchant_tz).date(),
        first_allowed_day=nudges_used * (retarget.skip_days + 1),
        # The cadence spaces retriggers (CONTRACT.md: "retrigger on days (k+1), 2(k+1), ..."): a first link held
        # to it waited for Day k+1 when Day 0 ended in quiet hours (an SCA renewal's link went 3 days late).
        cadence_days=retarget.skip_days + 1 if nudges_used else None,
        nudged_days=frozenset(n.sent_at.astimezone(merchant_tz).date() for n in nudges),
    )


def _only_these_retries(not_applicable: dict[str, str], allowed: frozenset[str], rule: Rule) -> None:
    """Every silent retry strategy but ``allowed`` is not applicable, because of ``rule`` (a reason already given
    for a strategy stays)."""
    for name in _RETRY_STRATEGY_NAMES:
        if name not in allowed:
            not_applicable.setdefault(name, rule)


def _declined_connectors(
    book: RuleBook, catalog: ErrorCatalog, request: DecisionRequest, spelled: Mapping[str, str]
) -> frozenset[str]:
    """The connectors whose earlier failed attempt of this order (not through a payment link) the issuer declined,
    by that attempt's error code, spelled as ``spelled`` spells them."""
    payment = request.payment
    declined: set[str] = set()
    for attempt in request.history.attempts:
        if attempt.status != "failure" or attempt.strategy == _RETARGET_LINK or not attempt.error_code:
            continue
        error = catalog.normalise(
            attempt.connector,
            attempt.error_code,
            card_network=payment.card_network,
            payment_method=payment.payment_method,
        )
        if error.error_class.value in book.cascade_declined_classes:
            declined.add(spelled.get(attempt.connector.strip().lower(), attempt.connector))
    return frozenset(declined)


def _outcome_unknown(book: RuleBook, code: str | None, message: str | None = None) -> bool:
    """Whether a failure's code or message says its attempt's outcome is not known (timed out, still pending)."""
    if code and code.strip().casefold() in book.outcome_unknown_codes:
        return True
    return any(book.outcome_unknown_words.found(text) for text in (code, message) if text)


def _outcome_open(
    book: RuleBook, upi: bool, code: str | None, message: str | None = None, network_code: str | None = None
) -> bool:
    """Whether a failure leaves its attempt's outcome open. For a UPI payment, a code NPCI puts in the final answer of
    a timed-out leg decides: deemed (RB) is open, reversed (UT, BT) is known, whatever the words; otherwise
    ``_outcome_unknown`` reads the connector's code and message."""
    if upi:
        given = {text.strip().upper() for text in (network_code, code) if text}
        if not given.isdisjoint(book.upi_deemed_codes):
            return True
        if not given.isdisjoint(book.upi_final_codes):
            return False
    return _outcome_unknown(book, code, message)


def _said(codes: set[str | None], message: str | None, listed: frozenset[str], words: Words) -> bool:
    """Whether the failure's network codes include one of ``listed``, or its message says so in ``words``."""
    return not codes.isdisjoint(listed) or (message is not None and words.found(message))


def _is_indian_one_off_card_payment(book: RuleBook, request: DecisionRequest, method: str, method_type: str) -> bool:
    """Whether the payment is a domestic Indian one-off card payment (hard_rules.yaml, rbi_one_off_afa): a card
    payment that is no e-mandate debit, in rupees, by a customer in India or of no stated country."""
    if method not in book.one_off_afa_payment_methods or request.payment.is_recurring:
        return False
    if method_type in book.e_mandate_payment_method_types or method_type in book.one_off_not_for_payment_method_types:
        return False
    if request.currency.strip().upper() not in book.one_off_afa_currencies:
        return False
    country = request.customer.country
    return not country or country.strip().upper() in book.one_off_afa_customer_countries


def _is_indian_card_e_mandate(book: RuleBook, request: DecisionRequest, method: str, method_type: str) -> bool:
    """Whether the payment is a recurring debit of a card issued in India, which runs on an RBI e-mandate registered
    through one gateway (hard_rules.yaml, rbi_card_e_mandate): one sent with is_recurring, or as a mandate whatever
    is_recurring says. The issuing country is not in the request: the customer's country stands for it, and
    without one the currency."""
    if method not in book.e_mandate_payment_methods:
        return False
    if not (request.payment.is_recurring or method_type in book.e_mandate_payment_method_types):
        return False
    country = request.customer.country
    if country:
        return country.strip().upper() in book.e_mandate_customer_countries
    return request.currency.strip().upper() in book.e_mandate_currencies_without_country


def _above_afa_free_limit(book: RuleBook, request: DecisionRequest) -> bool:
    """Whether an e-mandate debit's amount exceeds the limit RBI allows without the customer's additional factor of
    authentication (hard_rules.yaml, e_mandate_afa_limit), compared as charged (in the limit currency's minor
    units). Another currency is converted at the planning rates; one without a rate cannot be judged and counts
    as above the limit (the conservative reading)."""
    limit_currency = book.e_mandate_afa_currency
    amount = request.amount
    currency = request.currency.strip().upper()
    if currency != limit_currency:
        economics = load_economics()
        in_usd = economics.to_usd(amount, currency)
        usd_per_unit = economics.to_usd(1.0, limit_currency)
        if in_usd is None or not usd_per_unit:
            return True
        amount = in_usd / usd_per_unit
    return charged_amount(amount, limit_currency) > charged_amount(book.e_mandate_afa_free_limit, limit_currency)


def _is_recurring_upi_debit(book: RuleBook, request: DecisionRequest, method: str, method_type: str) -> bool:
    """Whether a payment is an AutoPay debit sent as a recurring UPI payment rather than as a mandate
    (hard_rules.yaml, upi_autopay.recurring_payment_methods): a type the customer approves (collect) is not."""
    return (
        request.payment.is_recurring
        and method in book.upi_recurring_payment_methods
        and method_type not in book.upi_customer_approved_types
    )


def _is_upi_method(method: str) -> bool:
    return method.startswith("upi")


@functools.lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


# ----------------------------------------------------------------------------------------------------- check


def _in_window(minute: int, window: tuple[int, int]) -> bool:
    start, end = window
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end  # wraps midnight, e.g. 21:00-09:00


def _local_minute(moment: datetime, zone: ZoneInfo) -> int:
    local = moment.astimezone(zone)
    return local.hour * 60 + local.minute


def in_quiet_hours(context: RuleContext, moment: datetime) -> bool:
    """Whether ``moment`` falls inside the merchant's quiet hours (local wall clock, DST-aware), in the merchant's
    zone or in one of the customer's."""
    if context.quiet_minutes is None:
        return False
    return _is_quiet_minute(context, _local_minute(moment, context.merchant_timezone)) or _quiet_for_customer(
        context, moment
    )


def _quiet_for_customer(context: RuleContext, moment: datetime) -> bool:
    """Whether ``moment`` falls inside the quiet hours' clock times in one of the customer's zones."""
    window = context.quiet_minutes
    if window is None or not context.customer_zones:
        return False
    # Each retarget candidate is judged here: offsets are read from the context or a cache (astimezone costs ~2 us).
    seconds = moment.timestamp()
    utc_minute = int(seconds // 60)
    offsets = context.customer_offsets
    if offsets is None:
        quarter = int(seconds // 900)
        offsets = tuple(_offset_in_quarter(zone, quarter) for zone in context.customer_zones)
    return any(_in_window((utc_minute + offset) % _MINUTES_PER_DAY, window) for offset in offsets)


def _fixed_offsets(zones: tuple[ZoneInfo, ...], start: datetime, end: datetime) -> tuple[int, ...] | None:
    """Each zone's UTC offset in minutes when it is the same a day before ``start`` and a day after ``end`` (no
    DST change between: the send times lie within), else None. A span of months could hold two changes that cancel
    out: it gets None too."""
    if end - start > _LONGEST_FIXED_SPAN:
        return None
    before, after = start - timedelta(days=1), end + timedelta(days=1)
    offsets = []
    for zone in zones:
        first, last = round(_offset_minutes(zone, before)), round(_offset_minutes(zone, after))
        if first != last:
            return None
        offsets.append(first)
    return tuple(offsets)


_MINUTES_PER_DAY = 24 * 60
#: DST changes are months apart: within this span, one offset at both ends means no change between.
_LONGEST_FIXED_SPAN = timedelta(days=60)


@functools.lru_cache(maxsize=65_536)
def _offset_in_quarter(zone: ZoneInfo, quarter: int) -> int:
    """``zone``'s UTC offset in whole minutes during the quarter hour ``quarter`` (quarter hours since the epoch).
    Offsets change only at a quarter hour of UTC (the tz database's transitions fall on whole, half or quarter
    hours of UTC)."""
    return round(_offset_minutes(zone, datetime.fromtimestamp(quarter * 900, UTC)))


def quiet_hours_end(context: RuleContext, moment: datetime) -> datetime | None:
    """None when ``moment`` is outside the quiet hours (every zone they hold in), else the first instant after them."""
    end = _end_of_quiet(context, moment)
    return None if end == moment else end


def _is_quiet_minute(context: RuleContext, minute: int) -> bool:
    """Whether the merchant-local minute of the day ``minute`` is inside quiet hours."""
    return context.quiet_minutes is not None and _in_window(minute, context.quiet_minutes)


def in_upi_peak_hours(context: RuleContext, moment: datetime) -> bool:
    """Whether ``moment`` falls inside NPCI's peak hours for UPI AutoPay execution (IST)."""
    return _upi_peak_window(context, _local_minute(moment, context.upi_timezone)) is not None


def _upi_peak_window(context: RuleContext, minute: int) -> tuple[int, int] | None:
    """The first NPCI peak window holding the IST minute of the day ``minute``, if any."""
    for window in context.upi_peak_minutes:
        if _in_window(minute, window):
            return window
    return None


def check(context: RuleContext, candidate: Candidate) -> RuleVerdict:
    """Judge one candidate against every hard rule. Pure; also used to audit any policy's actions.

    Quiet hours, cadence and channel rules apply to retargets (customer messages) only; silent retries are
    invisible to the customer and are judged by the network, regulatory and merchant retry rules instead.
    """
    broken = _broken(context, candidate)
    return RuleVerdict(candidate, not broken, tuple(broken))


def _broken(context: RuleContext, candidate: Candidate) -> list[str]:
    action = candidate.action
    kind = _broken_kind(context, action, candidate.strategy, candidate.connector, candidate.channel)
    timing = _broken_at(context, _timed_action(context, action, candidate.strategy, kind), candidate.execute_at)
    # Report before_event_time first, then the kind's rules, then the other time rules (the historical order).
    if timing and timing[0] == Rule.BEFORE_EVENT_TIME:
        return [timing[0], *kind, *timing[1:]]
    return [*kind, *timing]


_MALFORMED: tuple[str, ...] = (Rule.MALFORMED_CANDIDATE,)


def _broken_kind(
    context: RuleContext, action: str, strategy: str | None, connector: str | None, channel: str | None
) -> tuple[str, ...]:
    """The rules a candidate breaks whatever its ``execute_at``: those of its action and strategy/connector/channel."""
    if action == _STOP:
        return ()
    if action == _RETRY:
        blocked = context.strategy_blocked_by.get(strategy) if strategy is not None else None
        if blocked is None or connector is None or channel is not None:
            return _MALFORMED
        broken = [*context.retry_blocked_by, *blocked]
        if connector not in context.connector_order:
            broken.append(Rule.CONNECTOR_UNAVAILABLE)
        if strategy == _CASCADE:
            if connector == context.failed_connector:
                broken.append(Rule.CASCADE_SAME_CONNECTOR)
            if connector in context.declined_connectors:
                broken.append(Rule.CASCADE_DECLINED_CONNECTOR)
        elif strategy == _RETRY_SAME and connector != context.failed_connector:
            broken.append(Rule.RETRY_SAME_OTHER_CONNECTOR)
        return tuple(broken)
    if action == _RETARGET:
        channel_blocked = context.channel_blocked_by.get(channel) if channel is not None else None
        if channel_blocked is None or strategy is not None or connector is not None:
            return _MALFORMED
        return (*context.retarget_blocked_by, *channel_blocked)
    return _MALFORMED


#: The time rules of a cascade when they differ from any other retry's (``RuleContext.cascade_not_before``).
_RETRY_CASCADE = "retry:cascade"


def _timed_action(context: RuleContext, action: str, strategy: str | None, kind: tuple[str, ...]) -> str | None:
    """The action whose time rules apply: none but the universal ones for a malformed candidate; a cascade's own
    when it must wait longer than other retries."""
    if kind == _MALFORMED:
        return None
    if strategy == _CASCADE and action == _RETRY and context.cascade_not_before is not None:
        return _RETRY_CASCADE
    return action


def _broken_at(context: RuleContext, action: str | None, at: datetime) -> tuple[str, ...]:
    """The rules a well-formed ``action`` breaks by executing at ``at`` (``None``: the rules of every candidate)."""
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"candidate.execute_at must carry a timezone, got {at.isoformat()}")
    if at.tzinfo is not UTC:
        # The re-attempt caps count elapsed time (Visa's 30 days, Mastercard's 24 hours): ``at - window`` on a moment
        # in a DST zone subtracts wall-clock days, and the window moved by the hour the clocks changed in it.
        at = at.astimezone(UTC)
    broken: list[str] = []
    if at < context.event_time:
        broken.append(Rule.BEFORE_EVENT_TIME)

    known_at = context.outcome_known_at
    if known_at is not None and action is not None and action != _STOP and at < known_at:
        broken.append(Rule.OUTCOME_UNKNOWN)
    if action in (_RETRY, _RETRY_CASCADE):
        if at > context.window_end:
            broken.append(Rule.RETRY_WINDOW)
        if context.earliest_retry_at is not None and at < context.earliest_retry_at:
            broken.append(Rule.MAC_WAIT)
        if action == _RETRY_CASCADE and context.cascade_not_before is not None and at < context.cascade_not_before:
            broken.append(Rule.CASCADE_SAME_ACCOUNT)
        if context.visa_cap is not None:
            times = context.visa_retry_times
            recent = len(times) - bisect.bisect_left(times, at - context.visa_window)
            if max(recent, context.visa_reported_reattempts) >= context.visa_cap:
                broken.append(Rule.VISA_REATTEMPT_CAP)
        if context.mastercard_cap is not None:
            times = context.mastercard_decline_times
            if len(times) - bisect.bisect_left(times, at - context.mastercard_window) >= context.mastercard_cap:
                broken.append(Rule.MASTERCARD_REATTEMPT_CAP)
        if context.one_off_session_end is not None and at > context.one_off_session_end:
            broken.append(Rule.ONE_OFF_OUT_OF_SESSION)
        if context.e_mandate_window_end is not None and at > context.e_mandate_window_end:
            broken.append(Rule.E_MANDATE_RETRY_WINDOW)
        if context.upi_window_end is not None:
            if at > context.upi_window_end:
                broken.append(Rule.UPI_AUTOPAY_RETRY_WINDOW)
            if in_upi_peak_hours(context, at):
                broken.append(Rule.UPI_AUTOPAY_PEAK_HOURS)

    elif action == _RETARGET:
        if at > context.window_end:
            broken.append(Rule.RETRY_WINDOW)
        local = at.astimezone(context.merchant_timezone)
        if _is_quiet_minute(context, local.hour * 60 + local.minute) or _quiet_for_customer(context, at):
            broken.append(Rule.QUIET_HOURS)
        local_day = local.date()
        day = (local_day - context.day0).days
        cadence = context.cadence_days
        if day < context.first_allowed_day or (cadence is not None and day % cadence):
            broken.append(Rule.SKIP_DAYS)
        if local_day in context.nudged_days:
            broken.append(Rule.ONE_NUDGE_PER_DAY)
    return tuple(broken)


def judge(context: RuleContext, candidates: Iterable[Candidate]) -> list[RuleVerdict]:
    """``check`` for each candidate, in order."""
    return [check(context, candidate) for candidate in candidates]


def permitted(context: RuleContext, candidates: list[Candidate]) -> list[Candidate]:
    """The candidates no hard rule forbids; ``stop`` is always among them.

    When the input holds no permitted stop, a stop at ``event_time`` is appended. The answer is that of keeping
    the candidates ``check`` allows, but each kind (action, strategy, connector, channel) is judged once, and
    each distinct ``execute_at`` once per action.
    """
    allowed = _breaking_only(context, candidates, frozenset())
    if _STOP not in map(_ACTION_OF, allowed):
        allowed.append(Candidate(Action.STOP, context.event_time))
    return allowed


def situation_blocked_retries(
    context: RuleContext, candidates: list[Candidate], allowed: list[Candidate]
) -> list[Candidate]:
    """The retries among ``candidates`` that ``permitted`` left out of ``allowed`` only for the order's situation
    (every rule they break is in SITUATIONAL_RETRY_RULES): what the error itself would still allow.

    The answer is that of keeping the retries whose ``check`` breaks only situational rules, judged like
    ``permitted``.
    """
    kept = {id(candidate) for candidate in allowed}
    left_out = [c for c in candidates if c.action == _RETRY and id(c) not in kept]
    return _breaking_only(context, left_out, SITUATIONAL_RETRY_RULES)


def _breaking_only(context: RuleContext, candidates: list[Candidate], tolerated: frozenset[str]) -> list[Candidate]:
    """The candidates whose ``check`` breaks no rule outside ``tolerated``, in order (the input objects).

    Each kind (action, strategy, connector, channel) is judged once, and each distinct ``execute_at`` once per
    action whose time rules apply.
    """
    # Moments are keyed by identity (a grid shares its datetime objects); _broken_at judges a moment as the UTC
    # instant it is, so equal instants in different zones get the same verdict. Each entry keeps its moment alive,
    # so no id can be reused while the cache exists.
    kinds: dict[tuple[Any, ...], _KindVerdict] = {}
    moments_by_action: dict[str | None, dict[int, tuple[bool, datetime]]] = {}
    kept: list[Candidate] = []
    kind_ok, timed_action = False, None
    moments: dict[int, tuple[bool, datetime]] = {}
    action: Any = _NO_KIND
    strategy = connector = channel = _NO_KIND
    for candidate in candidates:
        # A grid lists each kind's candidates together: look the kind up again only when it changes.
        if not (
            candidate.action is action
            and candidate.strategy is strategy
            and candidate.connector is connector
            and candidate.channel is channel
        ):
            kind = action, strategy, connector, channel = _KIND_OF(candidate)
            try:
                known = kinds.get(kind)
                if known is None:
                    known = kinds[kind] = _kind_verdict(context, kind, tolerated, moments_by_action)
            except TypeError:  # an unhashable field: no valid Candidate has one, but judge it as check() would
                known = _kind_verdict(context, kind, tolerated, moments_by_action)
            kind_ok, timed_action, moments = known
        at = candidate.execute_at
        timing = moments.get(id(at))
        if timing is None:
            timing = moments[id(at)] = (tolerated.issuperset(_broken_at(context, timed_action, at)), at)
        if kind_ok and timing[0]:
            kept.append(candidate)
    return kept


_NO_KIND: Any = object()
_KindVerdict = tuple[bool, str | None, dict[int, tuple[bool, datetime]]]


def _kind_verdict(
    context: RuleContext,
    kind: tuple[Any, ...],
    tolerated: frozenset[str],
    moments_by_action: dict[str | None, dict[int, tuple[bool, datetime]]],
) -> _KindVerdict:
    """Whether ``kind`` breaks no rule outside ``tolerated``, the action whose time rules apply to it, and that
    action's moment cache."""
    broken = _broken_kind(context, *kind)
    timed_action = _timed_action(context, kind[0], kind[1], broken)
    return tolerated.issuperset(broken), timed_action, moments_by_action.setdefault(timed_action, {})


_KIND_OF = operator.attrgetter("action", "strategy", "connector", "channel")
_ACTION_OF = operator.attrgetter("action")


def explain(context: RuleContext, verdicts: Iterable[RuleVerdict]) -> list[str]:
    """The rules that fired, most candidates first: ``"quiet_hours: forbade 12 of 70 candidates"``.

    ``context.rules_applied`` says which rules constrain the request; this says which ones actually removed
    options from the grid, for a decision's reasons.
    """
    fired: Counter[str] = Counter()
    total = 0
    for verdict in verdicts:
        total += 1
        fired.update(set(verdict.broken))
    ranked = sorted(fired.items(), key=lambda item: (-item[1], item[0]))
    return [f"{rule}: forbade {count} of {total} candidates" for rule, count in ranked]


# ------------------------------------------------------------------------------------------------------ grid


_MIDNIGHT = time(0, 0)


def _local_instant(day: date, clock: time, zone: ZoneInfo) -> datetime:
    """The UTC instant of a local wall-clock time (a time skipped by DST maps to just after the gap)."""
    return datetime.combine(day, clock, tzinfo=zone).astimezone(UTC)


@functools.lru_cache(maxsize=1024)
def payday_zones(
    country: str | None, merchant_zone: ZoneInfo | None, outlying: str | None = None
) -> tuple[ZoneInfo, ...]:
    """The zones a payday must have reached 06:00 in: the merchant's, then the customer's (the widest choice of
    ``customer_zones``: a country's span, with the ``outlying`` zone their phone number places them in, as the quiet
    hours take it: ``model.zones.outlying_zone``). Without a merchant zone (the model's features: history rows carry
    no merchant zone, nor a phone number), the customer's alone, or UTC when their country is unknown."""
    choices = customer_zones(country, outlying)
    names = choices[0] if choices else ()
    if merchant_zone is None:
        return tuple(map(_zone, names)) or (_zone("UTC"),)
    return (merchant_zone, *(zone for zone in map(_zone, names) if zone.key != merchant_zone.key))


def next_payday(moment: datetime, zones: tuple[ZoneInfo, ...]) -> datetime:
    """The first payday instant strictly after ``moment`` (any of ``PAYDAY_DAYS``; see :func:`payday_at`): the
    rules' "after the next payday" and the model's payday features both read it."""
    return min(_next_payday(moment, zones, day) for day in PAYDAY_DAYS)


def _next_payday(event_time: datetime, zones: tuple[ZoneInfo, ...], day_of_month: int) -> datetime:
    """The first instant after ``event_time`` when ``day_of_month`` has reached 06:00 in every one of ``zones``.

    The customer's date may still be the month before the merchant's (a US customer of an Indian merchant), so
    the search starts a day before the event, in UTC."""
    start = (event_time - timedelta(days=1)).astimezone(UTC)
    year, month = start.year, start.month
    for _ in range(4):
        moment = payday_at(year, month, day_of_month, zones)
        if moment > event_time:
            return moment
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    raise AssertionError("unreachable: a payday always falls within four months")  # pragma: no cover


# Pure functions of a calendar day and zones: the same few days serve every request, so they are memoised.
@functools.lru_cache(maxsize=1024)
def payday_at(year: int, month: int, day_of_month: int, zones: tuple[ZoneInfo, ...]) -> datetime:
    """The payday ``day_of_month`` of a month as one UTC instant: 06:00 there in the last of ``zones`` to reach it."""
    return max(_local_instant(date(year, month, day_of_month), PAYDAY_LOCAL_TIME, zone) for zone in zones)


@functools.lru_cache(maxsize=4096)
def _local_minute_instant(day: date, minute: int, zone: ZoneInfo) -> datetime:
    return _local_instant(day, time(minute // 60, minute % 60), zone)


@functools.lru_cache(maxsize=4096)
def _day_send_slots(day: date, zone: ZoneInfo) -> tuple[datetime, tuple[tuple[datetime, int], ...]]:
    """Local midnight of ``day`` as a UTC instant, and each of ``SEND_LOCAL_TIMES`` as (UTC instant, local minute
    of the day) -- the minute differs from the clock's when DST skips that clock."""
    slots = []
    for clock in SEND_LOCAL_TIMES:
        moment = _local_instant(day, clock, zone)
        slots.append((moment, _local_minute(moment, zone)))
    return _local_instant(day, _MIDNIGHT, zone), tuple(slots)


def upi_off_peak_from(context: RuleContext, moment: datetime) -> datetime | None:
    """For a UPI AutoPay order, the first instant from ``moment`` outside NPCI's peak hours; None for any other
    order (no peak hours bind it)."""
    if context.upi_window_end is None:
        return None
    return _snap_out_of_upi_peak(context, moment)


def _snap_out_of_upi_peak(context: RuleContext, moment: datetime) -> datetime:
    zone = context.upi_timezone
    for _ in range(len(context.upi_peak_minutes) + 1):
        local = moment.astimezone(zone)
        minute = local.hour * 60 + local.minute
        window = _upi_peak_window(context, minute)
        if window is None:
            return moment
        end_day = local.date() if window[1] > minute else local.date() + timedelta(days=1)
        moment = _local_minute_instant(end_day, window[1], zone)
    return moment


def _end_of_quiet(context: RuleContext, moment: datetime) -> datetime:
    """``moment`` if outside quiet hours, else the first instant they have ended in every zone they hold in."""
    if context.quiet_minutes is None:
        return moment
    zones = (context.merchant_timezone, *context.customer_zones)
    # Each zone's end moves the moment past that zone's quiet hours; the zones' span is shorter than the hours the
    # window leaves free (build_context), so one round past each zone settles it, and a second round checks.
    for _ in range(3 * len(zones)):
        moved = False
        for zone in zones:
            end = _end_of_quiet_in(context.quiet_minutes, zone, moment)
            if end != moment:
                moment, moved = end, True
        if not moved:
            break
    return moment


def _end_of_quiet_in(window: tuple[int, int], zone: ZoneInfo, moment: datetime) -> datetime:
    """``moment`` if outside the quiet ``window`` in ``zone``, else the instant it ends there."""
    local = moment.astimezone(zone)
    minute = local.hour * 60 + local.minute
    start, end = window
    if not _in_window(minute, window):
        return moment
    end_day = local.date() if (start < end or minute < end) else local.date() + timedelta(days=1)
    return _local_minute_instant(end_day, end, zone)


def _customer_quiet_zones(
    country: str | None,
    merchant_zone: ZoneInfo,
    window: tuple[int, int] | None,
    at: datetime,
    outlying: str | None = None,
) -> tuple[ZoneInfo, ...]:
    """The customer's zones other than the merchant's where the quiet ``window`` holds too, as of ``at``: the widest
    choice of ``customer_zones`` (with the ``outlying`` zone their phone number places them in) whose zones and the
    merchant's span fewer hours than the window leaves free (so some moment of the day is outside it everywhere);
    none when the window is empty, the country unknown, or no choice fits."""
    if window is None or not country:
        return ()
    # Offsets change only at DST transitions, which fall on whole UTC hours: one answer per hour.
    return _customer_quiet_zones_in_hour(country, merchant_zone, window, int(at.timestamp() // 3600), outlying)


@functools.lru_cache(maxsize=4096)
def _customer_quiet_zones_in_hour(
    country: str, merchant_zone: ZoneInfo, window: tuple[int, int], utc_hour: int, outlying: str | None
) -> tuple[ZoneInfo, ...]:
    at = datetime.fromtimestamp(utc_hour * 3600, UTC)
    start, end = window
    free_minutes = (start - end) % (24 * 60)
    for names in customer_zones(country, outlying):
        zones = tuple(zone for zone in map(_zone, names) if zone.key != merchant_zone.key)
        offsets = [_offset_minutes(zone, at) for zone in (merchant_zone, *zones)]
        if _arc_minutes(offsets) < free_minutes:
            return zones
    return ()


def _arc_minutes(offsets: list[float]) -> float:
    """The shortest stretch of the 24-hour clock holding every offset: Tokyo (+9) and New York (-5) are 10 hours
    apart that way round, not 14."""
    ordered = sorted(offset % _MINUTES_PER_DAY for offset in offsets)
    gaps = [later - earlier for earlier, later in itertools.pairwise(ordered)]
    gaps.append(ordered[0] + _MINUTES_PER_DAY - ordered[-1])  # from the last round to the first
    return _MINUTES_PER_DAY - max(gaps)


def _offset_minutes(zone: ZoneInfo, at: datetime) -> float:
    offset = at.astimezone(zone).utcoffset()
    return 0.0 if offset is None else offset.total_seconds() / 60.0


def _sorted_unique(moments: list[datetime]) -> list[datetime]:
    """``sorted(set(moments))``; the grid's times are nearly always distinct, so sort first and dedupe only if not."""
    ordered = sorted(moments)
    if all(map(operator.lt, ordered, itertools.islice(ordered, 1, None))):
        return ordered
    return sorted(set(moments))


def _retry_times(context: RuleContext) -> list[datetime]:
    event_time = context.event_time
    times = [event_time + delay for delay in RETRY_DELAYS]
    times.extend(_next_payday(event_time, context.payday_zones, day) for day in PAYDAY_DAYS)
    # The moment a merchant advice code's wait ends (Mastercard 24-30: retry after 1 h ... 10 days): the issuer
    # named it, and a wait longer than the fixed delays (4 days and more) had no grid time within the window.
    if context.earliest_retry_at is not None and context.earliest_retry_at > event_time:
        times.append(context.earliest_retry_at)
    # The moment an open outcome counts as known (outcome_unknown): the first retry it allows.
    if context.outcome_known_at is not None:
        times.append(context.outcome_known_at)
    if context.is_upi_autopay:
        times = [_snap_out_of_upi_peak(context, moment) for moment in times]
    return _sorted_unique(times)


def _send_times(context: RuleContext) -> list[datetime]:
    """As soon as allowed, then local 10:00, 13:00 and 19:00 of the following allowed days (the skip-days cadence:
    Days 0, k+1, 2(k+1), ... for a retrigger; every k+1 days from today for the first link, which no cadence binds),
    within the window."""
    zone, window_end = context.merchant_timezone, context.window_end
    # Nothing is sent before an open outcome counts as known (outcome_unknown): the grid starts there.
    event_time = max(context.event_time, context.outcome_known_at or context.event_time)
    day0, nudged_days, cadence = context.day0, context.nudged_days, context.cadence_days
    step = context.merchant.retarget.skip_days + 1
    today = (event_time.astimezone(zone).date() - day0).days
    first_day = max(today, context.first_allowed_day)
    if cadence is not None:
        first_day += -first_day % cadence  # a retrigger: the first cadence day from there
    times: list[datetime] = []
    asap: datetime | None = None
    for offset in range(first_day, first_day + (window_end - event_time).days + 2, step):
        day = day0 + timedelta(days=offset)
        if day in nudged_days:
            continue
        midnight, slots = _day_send_slots(day, zone)
        day_start = max(event_time, midnight)
        if day_start > window_end:
            break
        if asap is None:
            asap = _end_of_quiet(context, day_start)
            times.append(asap)
        sent_before = len(times)
        for moment, minute in slots:
            if (
                asap < moment <= window_end
                and not _is_quiet_minute(context, minute)
                and not _quiet_for_customer(context, moment)
            ):
                times.append(moment)
        if len(times) == sent_before and context.customer_zones:
            # The day's usual slots all fall in the customer's quiet hours (a customer far from the merchant): the
            # day's first moment outside them everywhere, if the day has one.
            first_free = _end_of_quiet(context, day_start)
            if asap < first_free <= window_end and first_free.astimezone(zone).date() == day:
                times.append(first_free)
        if len(times) >= MAX_SEND_TIMES_PER_CHANNEL:
            break
    return _sorted_unique(times)[:MAX_SEND_TIMES_PER_CHANNEL]


# The frozen dataclass's __init__ sets each field through object.__setattr__; the grid builds ~80 candidates per
# request, so it writes the slots directly (same objects, about half the cost). _CANDIDATE_FIELDS must list
# every field of Candidate: tests/unit/test_rules.py checks it.
_CANDIDATE_FIELDS = ("action", "execute_at", "strategy", "connector", "channel")
_SET_ACTION, _SET_EXECUTE_AT, _SET_STRATEGY, _SET_CONNECTOR, _SET_CHANNEL = (
    Candidate.__dict__[name].__set__ for name in _CANDIDATE_FIELDS
)


def _candidates_at(
    moments: Iterable[datetime],
    action: Action,
    strategy: Strategy | None,
    connector: str | None,
    channel: Channel | None,
) -> list[Candidate]:
    """``[Candidate(action, at, strategy, connector, channel) for at in moments]``."""
    candidates: list[Candidate] = []
    for at in moments:
        candidate = object.__new__(Candidate)
        _SET_ACTION(candidate, action)
        _SET_EXECUTE_AT(candidate, at)
        _SET_STRATEGY(candidate, strategy)
        _SET_CONNECTOR(candidate, connector)
        _SET_CHANNEL(candidate, channel)
        candidates.append(candidate)
    return candidates


#: One block of the grid: a kind (action, strategy, connector, channel) and its execution moments, in grid order.
_GridBlock = tuple[Action, Strategy | None, str | None, Channel | None, list[datetime] | tuple[datetime, ...]]


def _grid_blocks(context: RuleContext) -> list[_GridBlock]:
    """The grid of ``enumerate_candidates`` as blocks: each kind once, with the moments it is offered at."""
    failed = context.failed_connector
    retry_times = _retry_times(context)
    # Strategies, connectors (deduplicated in connector_order), channels and times are each distinct, so every
    # candidate below is: there is nothing to deduplicate.
    blocks: list[_GridBlock] = []
    for strategy in RETRY_STRATEGIES:
        if strategy is _CASCADE:
            # Not back to a connector the issuer declined this order on: the next ones in the pecking order instead.
            declined = context.declined_connectors
            connectors = [c for c in context.connector_order if c != failed and c not in declined]
            connectors = connectors[:MAX_CASCADE_TARGETS]
        else:
            connectors = [failed]
        # A step-up's 3DS needs the cardholder at the checkout: right away, not hours later (hard_rules.yaml).
        times = retry_times[:1] if strategy is _STEP_UP else retry_times
        for connector in connectors:
            blocks.append((_RETRY, strategy, connector, None, times))
    send_times = _send_times(context)
    for channel in dict.fromkeys([*context.merchant.retarget.channels, *_CHANNELS]):
        blocks.append((_RETARGET, None, None, channel, send_times))
    blocks.append((_STOP, None, None, None, (context.event_time,)))
    return blocks


def enumerate_candidates(context: RuleContext) -> list[Candidate]:
    """All concrete candidates on winback's grids (strategy x connector x delay, channel x send time, stop).

    Deterministic and bounded (about 80 candidates with 3 connectors, at most ~120): cascade goes to the first
    ``MAX_CASCADE_TARGETS`` other connectors in the pecking order; every other strategy stays on the failed
    connector. UPI AutoPay retry times are moved out of NPCI peak hours rather than dropped. Candidates are not
    yet filtered: pass them to ``permitted``.
    """
    grid: list[Candidate] = []
    for action, strategy, connector, channel, moments in _grid_blocks(context):
        grid += _candidates_at(moments, action, strategy, connector, channel)
    return grid


def _judge_moments(
    context: RuleContext, action: str | None, moments: Iterable[datetime]
) -> tuple[list[datetime], list[datetime], list[datetime]]:
    """The ``moments`` at which ``action`` breaks no time rule, breaks situational ones at most, and breaks some
    but only situational ones (each in order)."""
    strict: list[datetime] = []
    tolerated: list[datetime] = []
    only_tolerated: list[datetime] = []
    for at in moments:
        broken = _broken_at(context, action, at)
        if not broken:
            strict.append(at)
            tolerated.append(at)
        elif SITUATIONAL_RETRY_RULES.issuperset(broken):
            tolerated.append(at)
            only_tolerated.append(at)
    return strict, tolerated, only_tolerated


def permitted_grid(context: RuleContext) -> tuple[list[Candidate], list[Candidate]]:
    """``(allowed, blocked)``: ``permitted`` and ``situation_blocked_retries`` of ``enumerate_candidates(context)``.

    The same candidates in the same order, but judged kind by kind and moment by moment on the grid's blocks, so
    only the candidates returned are built (decide() needs no others).
    """
    allowed: list[Candidate] = []
    blocked: list[Candidate] = []
    # Per action and moment list (the blocks of one action share theirs): the moments no time rule forbids, the
    # moments only situational ones forbid or none, and those only situational ones forbid.
    by_moments: dict[tuple[str | None, int], tuple[list[datetime], list[datetime], list[datetime]]] = {}
    situational = SITUATIONAL_RETRY_RULES
    for action, strategy, connector, channel, moments in _grid_blocks(context):
        broken = _broken_kind(context, action, strategy, connector, channel)
        kind_ok = not broken
        kind_tolerated = action == _RETRY and situational.issuperset(broken)
        if not (kind_ok or kind_tolerated):
            continue
        timed_action = _timed_action(context, action, strategy, broken)
        judged = by_moments.get((timed_action, id(moments)))
        if judged is None:
            judged = by_moments[timed_action, id(moments)] = _judge_moments(context, timed_action, moments)
        strict, tolerated, only_tolerated = judged
        if kind_ok and strict:
            allowed += _candidates_at(strict, action, strategy, connector, channel)
        blocked_at = (only_tolerated if kind_ok else tolerated) if kind_tolerated else None
        if blocked_at:
            blocked += _candidates_at(blocked_at, action, strategy, connector, channel)
    if _STOP not in map(_ACTION_OF, allowed):
        allowed.append(Candidate(Action.STOP, context.event_time))
    return allowed, blocked
