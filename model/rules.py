"""Hard rules (network, regulatory, merchant) as data, and the pure function that applies them.

The rules live in ``data/rules/hard_rules.yaml`` (each with its public source) and are loaded once per process.
``build_context`` does all the expensive work once per request (catalog lookup, history counts, time windows,
timezone objects); ``check`` is then a cheap pure function of (context, candidate) that returns every broken rule
by name. Hard rules always win over the model (CONTRACT.md section 2): the policy only ever chooses among
``permitted`` candidates.

Which rules apply to what:

- silent retries: Visa category 1 and the Visa re-attempt cap, Mastercard merchant advice codes, UPI AutoPay
  off-peak windows and retry budget, user-consent flows, strategy applicability, connector availability, the
  merchant's enabled flows, ``max_retries`` and retry window;
- retargets (a payment link to the customer): the merchant's retarget switch, channels, ``max_nudges``, retry
  window, skip-days cadence and quiet hours, and the customer's opt-outs and reachability. Quiet hours apply to
  customer messages only, never to silent retries (the customer does not see those);
- every candidate: ``execute_at >= event_time``. ``stop`` is always allowed.
"""

from __future__ import annotations

import bisect
import functools
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import yaml

from model.catalog import ErrorCatalog, NormalisedError
from model.merchant_config import MerchantConfig
from model.requests import DecisionRequest
from model.vocab import (
    RETRY_STRATEGIES,
    USER_CONSENT_AUTHENTICATION,
    USER_CONSENT_METHODS,
    Action,
    Channel,
    Strategy,
)

RULES_FILE = Path(__file__).resolve().parent.parent / "data" / "rules" / "hard_rules.yaml"

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
#: "After the next payday": the next day-of-month 1 and 26, at 06:00 in the merchant's timezone.
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
    VISA_REATTEMPT_CAP = "visa_reattempt_cap"
    MAC_NEVER_RETRY = "mastercard_mac_never_retry"
    MAC_NO_RETARGET = "mastercard_mac_no_retarget"
    MAC_CARD_UPDATE = "mastercard_mac_card_update"
    MAC_WAIT = "mastercard_mac_wait"
    UPI_AUTOPAY_PEAK_HOURS = "upi_autopay_peak_hours"
    UPI_AUTOPAY_MAX_RETRIES = "upi_autopay_max_retries"
    UPI_AUTOPAY_RETRY_WINDOW = "upi_autopay_retry_window"
    USER_CONSENT_FLOW = "user_consent_flow"
    STEP_UP_NOT_APPLICABLE = "step_up_not_applicable"
    CLEAR_PAN_NOT_APPLICABLE = "clear_pan_not_applicable"
    ALTERNATE_NETWORK_NOT_APPLICABLE = "alternate_network_not_applicable"
    CASCADE_SAME_CONNECTOR = "cascade_same_connector"
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


class RulesDataError(ValueError):
    """``data/rules/hard_rules.yaml`` is missing or malformed; the message names the key."""


class RuleInputError(ValueError):
    """A request field the rules read is present but unusable; the message names the field."""


# --------------------------------------------------------------------------------------------------- the data


@dataclass(frozen=True, slots=True)
class RuleBook:
    """The parsed ``hard_rules.yaml``."""

    version: int
    visa_reattempt_cap: int
    visa_window: timedelta
    mac_never_retry: frozenset[str]
    mac_no_retarget: frozenset[str]
    mac_card_update: frozenset[str]
    mac_wait_hours: Mapping[str, float]
    upi_payment_methods: frozenset[str]
    upi_mandate_types: frozenset[str]
    upi_timezone: ZoneInfo
    upi_peak_minutes: tuple[tuple[int, int], ...]  # [start, end) minutes of the local day
    upi_max_retries: int
    upi_retry_window: timedelta
    consent_payment_methods: frozenset[str]
    consent_approval_methods: frozenset[str]
    consent_authentication: frozenset[str]
    step_up_payment_methods: frozenset[str]
    step_up_not_when_authentication: frozenset[str]
    alternate_network_payment_methods: frozenset[str]
    alternate_network_payment_method_types: frozenset[str]
    channel_reachability: Mapping[Channel, str]
    sources: Mapping[str, str]


def _get(node: Any, path: str) -> Any:
    current = node
    for key in path.split("."):
        if not isinstance(current, dict) or key not in current:
            raise RulesDataError(f"{RULES_FILE.name}: missing key {path!r}")
        current = current[key]
    return current


def _strings(node: Any, path: str) -> frozenset[str]:
    value = _get(node, path)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise RulesDataError(f"{RULES_FILE.name}: {path!r} must be a list of strings")
    return frozenset(item.strip().lower() for item in value)


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
    return RuleBook(
        version=int(_number(raw, "version")),
        visa_reattempt_cap=int(_number(raw, "visa.reattempt_cap.max_reattempts")),
        visa_window=timedelta(days=_number(raw, "visa.reattempt_cap.window_days")),
        mac_never_retry=_strings(raw, "mastercard_merchant_advice.never_retry_codes"),
        mac_no_retarget=_strings(raw, "mastercard_merchant_advice.no_retarget_codes"),
        mac_card_update=_strings(raw, "mastercard_merchant_advice.card_update_codes"),
        mac_wait_hours={_mac_key(str(code)): _number(wait_raw, str(code)) for code in wait_raw},
        upi_payment_methods=_strings(raw, "upi_autopay.payment_methods"),
        upi_mandate_types=_strings(raw, "upi_autopay.mandate_types"),
        upi_timezone=ZoneInfo(str(_get(raw, "upi_autopay.timezone"))),
        upi_peak_minutes=peak,
        upi_max_retries=int(_number(raw, "upi_autopay.max_retries")),
        upi_retry_window=timedelta(hours=_number(raw, "upi_autopay.retry_window_hours")),
        # The vocabulary's constants are the floor: the data may add methods, never drop them.
        consent_payment_methods=_strings(raw, "user_consent.payment_methods") | USER_CONSENT_METHODS,
        consent_approval_methods=_strings(raw, "user_consent.approval_payment_methods"),
        consent_authentication=_strings(raw, "user_consent.authentication_types") | USER_CONSENT_AUTHENTICATION,
        step_up_payment_methods=_strings(raw, "strategies.step_up.payment_methods"),
        step_up_not_when_authentication=_strings(raw, "strategies.step_up.not_when_authentication"),
        alternate_network_payment_methods=_strings(raw, "strategies.alternate_network.payment_methods"),
        alternate_network_payment_method_types=_strings(raw, "strategies.alternate_network.payment_method_types"),
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
    first_failure_at: datetime  # attempt 1's created_at, else event_time: anchors windows and Day 0
    last_failure_at: datetime  # the last failed attempt's created_at, else event_time: anchors MAC waits
    failed_connector: str
    connector_order: tuple[str, ...]  # available_connectors, else the merchant's pecking order
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
    visa_cap: int | None  # None: the Visa re-attempt cap does not apply
    visa_window: timedelta
    visa_retry_times: tuple[datetime, ...]  # sorted created_at of earlier silent retries
    visa_reported_reattempts: int  # the caller's card_reattempts_30d, 0 when absent
    upi_window_end: datetime | None
    upi_timezone: ZoneInfo
    upi_peak_minutes: tuple[tuple[int, int], ...]
    merchant_timezone: ZoneInfo
    quiet_minutes: tuple[int, int] | None  # [start, end) minutes of the local day, may wrap midnight
    day0: date  # local date of the first failure in the merchant's timezone
    first_allowed_day: int  # nudge i may not go before Day i * (skip_days + 1)
    nudged_days: frozenset[date]  # local dates that already had a nudge
    error: NormalisedError  # the failure as the catalog normalised it (policy reasons and exploration reuse it)


# ------------------------------------------------------------------------------------------------ build_context


def _is_retry_strategy(strategy: str) -> bool:
    return strategy in _RETRY_STRATEGY_VALUES


_RETRY_STRATEGY_VALUES = frozenset(strategy.value for strategy in RETRY_STRATEGIES)


def _reported_reattempts(request: DecisionRequest) -> int:
    extra = request.model_extra or {}
    value = extra.get(CARD_REATTEMPTS_FIELD)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RuleInputError(f"{CARD_REATTEMPTS_FIELD} must be a non-negative integer, got {value!r}")
    return value


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


def build_context(request: DecisionRequest, merchant: MerchantConfig, catalog: ErrorCatalog) -> RuleContext:
    """Compute, once per request, every fact the rules need (the only place that calls the catalog)."""
    book = load_rulebook()
    payment, failure, customer = request.payment, request.failure, request.customer
    event_time = request.event_time
    attempts = request.history.attempts
    nudges = request.history.nudges
    applied: list[str] = []

    normalised = catalog.normalise(
        failure.connector,
        failure.error_code,
        failure.error_message,
        failure.network_decline_code,
        failure.merchant_advice_code,
        failure.unified_code,
        payment.card_network,
        payment.payment_method,
    )

    first_attempt = next((a for a in attempts if a.attempt_number == 1), None)
    if first_attempt is None and attempts:
        first_attempt = min(attempts, key=lambda a: a.created_at)
    first_failure_at = min(first_attempt.created_at, event_time) if first_attempt else event_time
    failures = [a.created_at for a in attempts if a.status.strip().lower() == "failure"]
    last_failure_at = max(failures) if failures else event_time

    connector_order = tuple(dict.fromkeys(request.available_connectors or merchant.connectors))
    retry_times = tuple(sorted(a.created_at for a in attempts if _is_retry_strategy(a.strategy)))
    retries_used = len(retry_times)
    nudges_used = len(nudges)

    method = payment.payment_method.strip().lower()
    method_type = (payment.payment_method_type or "").strip().lower()
    authentication = payment.authentication_type.strip().lower()
    network = (payment.card_network or "").strip().lower()

    retry_blocked: list[str] = []
    retarget_blocked: list[str] = []
    retries_left = [merchant.retry.max_retries - retries_used]
    applied.append(f"max_retries:{merchant.retry.max_retries}")

    # Visa: category 1 never again; any other Visa decline counts against the re-attempt cap.
    visa_category = normalised.visa_category
    if visa_category is None and network == "visa" and failure.network_decline_code:
        # The caller says Visa even where the catalog would not look (e.g. an odd payment method): honour it.
        visa_category = catalog.visa_category(failure.network_decline_code)
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
        if mac in book.mac_card_update or (advice is not None and advice.needs_card_update):
            retry_blocked.append(Rule.MAC_CARD_UPDATE)
        waits = [book.mac_wait_hours.get(mac), advice.wait_hours if advice is not None else None]
        wait = max((w for w in waits if w is not None), default=None)
        if wait:
            earliest_retry_at = last_failure_at + timedelta(hours=wait)
            applied.append(f"mastercard_mac_wait:{wait:g}h")

    # UPI AutoPay: NPCI off-peak windows and retry budget.
    is_upi_autopay = method in book.upi_payment_methods or (method_type in book.upi_mandate_types and "upi" in method)
    upi_window_end: datetime | None = None
    if is_upi_autopay:
        applied.append("upi_autopay_offpeak")
        applied.append(f"upi_autopay_max_retries:{book.upi_max_retries}")
        retries_left.append(book.upi_max_retries - retries_used)
        if retries_used >= book.upi_max_retries:
            retry_blocked.append(Rule.UPI_AUTOPAY_MAX_RETRIES)
        upi_window_end = first_failure_at + book.upi_retry_window

    # User-consent flows: the customer must approve, so nothing can be re-attempted silently.
    is_consent = (
        method in book.consent_payment_methods
        or method_type in book.consent_payment_methods
        or (method in book.consent_approval_methods and not is_upi_autopay)
        or authentication in book.consent_authentication
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
    strategy_blocked: dict[str, tuple[str, ...]] = {}
    for strategy in RETRY_STRATEGIES:
        reasons: list[str] = []
        if strategy.value not in flows:
            reasons.append(Rule.RETRY_FLOW_DISABLED)
        if strategy is Strategy.STEP_UP and (not is_card or authentication in book.step_up_not_when_authentication):
            reasons.append(Rule.STEP_UP_NOT_APPLICABLE)
        elif strategy is Strategy.CLEAR_PAN and not payment.is_network_token:
            reasons.append(Rule.CLEAR_PAN_NOT_APPLICABLE)
        elif strategy is Strategy.ALTERNATE_NETWORK and not (
            method in book.alternate_network_payment_methods
            and method_type in book.alternate_network_payment_method_types
        ):
            reasons.append(Rule.ALTERNATE_NETWORK_NOT_APPLICABLE)
        strategy_blocked[strategy.value] = tuple(reasons)

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
    for channel in Channel:
        reasons = []
        if channel.value not in enabled_channels:
            reasons.append(Rule.CHANNEL_DISABLED)
        if channel.value in opted_out:
            reasons.append(Rule.CHANNEL_OPTED_OUT)
        if not bool(getattr(customer, book.channel_reachability[channel], False)):
            reasons.append(Rule.CHANNEL_UNREACHABLE)
            if channel.value in enabled_channels:
                applied.append(f"unreachable:{channel.value}")
        channel_blocked[channel.value] = tuple(reasons)
    applied.extend(f"opted_out:{channel}" for channel in sorted(opted_out))

    # Windows, cadence and quiet hours.
    window_end = first_failure_at + timedelta(days=retarget.retry_window_days)
    applied.append(f"retry_window:{retarget.retry_window_days}d")
    quiet = retarget.quiet_hours
    merchant_tz = _zone(quiet.timezone)
    quiet_minutes = (_minutes(quiet.start), _minutes(quiet.end))
    if quiet_minutes[0] == quiet_minutes[1]:
        quiet_minutes_or_none: tuple[int, int] | None = None
    else:
        quiet_minutes_or_none = quiet_minutes
        if retarget.enabled:
            applied.append(f"quiet_hours:{quiet.start}-{quiet.end} {quiet.timezone}")
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
        failed_connector=failure.connector,
        connector_order=connector_order,
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
        visa_cap=visa_cap,
        visa_window=book.visa_window,
        visa_retry_times=retry_times,
        visa_reported_reattempts=reported,
        upi_window_end=upi_window_end,
        upi_timezone=book.upi_timezone,
        upi_peak_minutes=book.upi_peak_minutes,
        merchant_timezone=merchant_tz,
        quiet_minutes=quiet_minutes_or_none,
        day0=first_failure_at.astimezone(merchant_tz).date(),
        first_allowed_day=nudges_used * (retarget.skip_days + 1),
        nudged_days=frozenset(n.sent_at.astimezone(merchant_tz).date() for n in nudges),
    )


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
    """Whether ``moment`` falls inside the merchant's quiet hours (local wall clock, DST-aware)."""
    if context.quiet_minutes is None:
        return False
    return _in_window(_local_minute(moment, context.merchant_timezone), context.quiet_minutes)


def in_upi_peak_hours(context: RuleContext, moment: datetime) -> bool:
    """Whether ``moment`` falls inside NPCI's peak hours for UPI AutoPay execution (IST)."""
    minute = _local_minute(moment, context.upi_timezone)
    return any(_in_window(minute, window) for window in context.upi_peak_minutes)


def check(context: RuleContext, candidate: Candidate) -> RuleVerdict:
    """Judge one candidate against every hard rule. Pure; also used to audit any policy's actions.

    Quiet hours, cadence and channel rules apply to retargets (customer messages) only; silent retries are
    invisible to the customer and are judged by the network, regulatory and merchant retry rules instead.
    """
    broken = _broken(context, candidate)
    return RuleVerdict(candidate, not broken, tuple(broken))


def _broken(context: RuleContext, candidate: Candidate) -> list[str]:
    at = candidate.execute_at
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"candidate.execute_at must carry a timezone, got {at.isoformat()}")
    broken: list[str] = []
    if at < context.event_time:
        broken.append(Rule.BEFORE_EVENT_TIME)
    action = candidate.action
    if action == Action.STOP:
        return broken

    if action == Action.RETRY:
        strategy, connector = candidate.strategy, candidate.connector
        blocked = context.strategy_blocked_by.get(strategy) if strategy is not None else None
        if blocked is None or connector is None or candidate.channel is not None:
            broken.append(Rule.MALFORMED_CANDIDATE)
            return broken
        broken.extend(context.retry_blocked_by)
        broken.extend(blocked)
        if connector not in context.connector_order:
            broken.append(Rule.CONNECTOR_UNAVAILABLE)
        if strategy == Strategy.CASCADE:
            if connector == context.failed_connector:
                broken.append(Rule.CASCADE_SAME_CONNECTOR)
        elif strategy == Strategy.RETRY_SAME and connector != context.failed_connector:
            broken.append(Rule.RETRY_SAME_OTHER_CONNECTOR)
        if at > context.window_end:
            broken.append(Rule.RETRY_WINDOW)
        if context.earliest_retry_at is not None and at < context.earliest_retry_at:
            broken.append(Rule.MAC_WAIT)
        if context.visa_cap is not None:
            times = context.visa_retry_times
            recent = len(times) - bisect.bisect_left(times, at - context.visa_window)
            if max(recent, context.visa_reported_reattempts) >= context.visa_cap:
                broken.append(Rule.VISA_REATTEMPT_CAP)
        if context.upi_window_end is not None:
            if at > context.upi_window_end:
                broken.append(Rule.UPI_AUTOPAY_RETRY_WINDOW)
            if in_upi_peak_hours(context, at):
                broken.append(Rule.UPI_AUTOPAY_PEAK_HOURS)
        return broken

    if action == Action.RETARGET:
        channel = candidate.channel
        channel_blocked = context.channel_blocked_by.get(channel) if channel is not None else None
        if channel_blocked is None or candidate.strategy is not None or candidate.connector is not None:
            broken.append(Rule.MALFORMED_CANDIDATE)
            return broken
        broken.extend(context.retarget_blocked_by)
        broken.extend(channel_blocked)
        if at > context.window_end:
            broken.append(Rule.RETRY_WINDOW)
        local = at.astimezone(context.merchant_timezone)
        if context.quiet_minutes is not None and _in_window(local.hour * 60 + local.minute, context.quiet_minutes):
            broken.append(Rule.QUIET_HOURS)
        local_day = local.date()
        if (local_day - context.day0).days < context.first_allowed_day:
            broken.append(Rule.SKIP_DAYS)
        if local_day in context.nudged_days:
            broken.append(Rule.ONE_NUDGE_PER_DAY)
        return broken

    broken.append(Rule.MALFORMED_CANDIDATE)
    return broken


def judge(context: RuleContext, candidates: Iterable[Candidate]) -> list[RuleVerdict]:
    """``check`` for each candidate, in order."""
    return [check(context, candidate) for candidate in candidates]


def permitted(context: RuleContext, candidates: list[Candidate]) -> list[Candidate]:
    """The candidates no hard rule forbids; ``stop`` is always among them.

    When the input holds no permitted stop, a stop at ``event_time`` is appended.
    """
    allowed = [candidate for candidate in candidates if not _broken(context, candidate)]
    if not any(candidate.action == Action.STOP for candidate in allowed):
        allowed.append(Candidate(Action.STOP, context.event_time))
    return allowed


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


def _local_instant(day: date, clock: time, zone: ZoneInfo) -> datetime:
    """The UTC instant of a local wall-clock time (a time skipped by DST maps to just after the gap)."""
    return datetime.combine(day, clock, tzinfo=zone).astimezone(UTC)


def _next_payday(event_time: datetime, zone: ZoneInfo, day_of_month: int) -> datetime:
    local = event_time.astimezone(zone)
    year, month = local.year, local.month
    for _ in range(3):
        moment = _local_instant(date(year, month, day_of_month), PAYDAY_LOCAL_TIME, zone)
        if moment > event_time:
            return moment
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    raise AssertionError("unreachable: a payday always falls within three months")  # pragma: no cover


def _snap_out_of_upi_peak(context: RuleContext, moment: datetime) -> datetime:
    zone = context.upi_timezone
    for _ in range(len(context.upi_peak_minutes) + 1):
        local = moment.astimezone(zone)
        minute = local.hour * 60 + local.minute
        window = next((w for w in context.upi_peak_minutes if _in_window(minute, w)), None)
        if window is None:
            return moment
        end_day = local.date() if window[1] > minute else local.date() + timedelta(days=1)
        moment = _local_instant(end_day, time(window[1] // 60, window[1] % 60), zone)
    return moment


def _end_of_quiet(context: RuleContext, moment: datetime) -> datetime:
    """``moment`` if outside quiet hours, else the instant quiet hours end."""
    if context.quiet_minutes is None:
        return moment
    zone = context.merchant_timezone
    local = moment.astimezone(zone)
    minute = local.hour * 60 + local.minute
    start, end = context.quiet_minutes
    if not _in_window(minute, context.quiet_minutes):
        return moment
    end_day = local.date() if (start < end or minute < end) else local.date() + timedelta(days=1)
    return _local_instant(end_day, time(end // 60, end % 60), zone)


def _retry_times(context: RuleContext) -> list[datetime]:
    event_time = context.event_time
    times = [event_time + delay for delay in RETRY_DELAYS]
    times.extend(_next_payday(event_time, context.merchant_timezone, day) for day in PAYDAY_DAYS)
    if context.is_upi_autopay:
        times = [_snap_out_of_upi_peak(context, moment) for moment in times]
    return sorted(set(times))


def _send_times(context: RuleContext) -> list[datetime]:
    """As soon as allowed, then local 10:00, 13:00 and 19:00 of the following allowed days, within the window."""
    zone, event_time = context.merchant_timezone, context.event_time
    today = (event_time.astimezone(zone).date() - context.day0).days
    first_day = max(today, context.first_allowed_day)
    times: list[datetime] = []
    asap: datetime | None = None
    for offset in range(first_day, first_day + (context.window_end - event_time).days + 2):
        day = context.day0 + timedelta(days=offset)
        if day in context.nudged_days:
            continue
        day_start = max(event_time, _local_instant(day, time(0, 0), zone))
        if day_start > context.window_end:
            break
        if asap is None:
            asap = _end_of_quiet(context, day_start)
            times.append(asap)
        for clock in SEND_LOCAL_TIMES:
            moment = _local_instant(day, clock, zone)
            if asap < moment <= context.window_end and not in_quiet_hours(context, moment):
                times.append(moment)
        if len(times) >= MAX_SEND_TIMES_PER_CHANNEL:
            break
    return sorted(set(times))[:MAX_SEND_TIMES_PER_CHANNEL]


def enumerate_candidates(context: RuleContext) -> list[Candidate]:
    """All concrete candidates on winback's grids (strategy x connector x delay, channel x send time, stop).

    Deterministic and bounded (about 80 candidates with 3 connectors, at most ~120): cascade goes to the first
    ``MAX_CASCADE_TARGETS`` other connectors in the pecking order; every other strategy stays on the failed
    connector. UPI AutoPay retry times are moved out of NPCI peak hours rather than dropped. Candidates are not
    yet filtered: pass them to ``permitted``.
    """
    failed = context.failed_connector
    others = [connector for connector in context.connector_order if connector != failed]
    retry_times = _retry_times(context)
    grid: dict[Candidate, None] = {}
    for strategy in RETRY_STRATEGIES:
        connectors = others[:MAX_CASCADE_TARGETS] if strategy is Strategy.CASCADE else [failed]
        for connector in connectors:
            for moment in retry_times:
                grid[Candidate(Action.RETRY, moment, strategy=strategy, connector=connector)] = None
    send_times = _send_times(context)
    channels = dict.fromkeys([*context.merchant.retarget.channels, *Channel])
    for channel in channels:
        for moment in send_times:
            grid[Candidate(Action.RETARGET, moment, channel=channel)] = None
    grid[Candidate(Action.STOP, context.event_time)] = None
    return list(grid)
