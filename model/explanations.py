"""The words of a decision's ``reasons``: short sentences for the agents who read them (CONTRACT.md section 2).

Agents see reasons in the console, so none of the model's internals may show: no feature names
(``next_payday_before_exec``), no sentinels (``__missing__``), no error-class identifiers, no score notation. Each
feature the model explains with says what the evidence is and which way it points ("no issuer given: lowers the
chance of success"). Text is built only for the few reasons a decision returns, never per candidate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from model.catalog import ISO8583, MESSAGE, NPCI_UPI, UNIFIED, UNKNOWN_SOURCE, NormalisedError
from model.vocab import Action, Channel, ErrorClass, Strategy

#: What each error class means, as a phrase that follows "the failure reads as".
ERROR_CLASS_TEXT: dict[ErrorClass, str] = {
    ErrorClass.INSUFFICIENT_FUNDS: "insufficient funds",
    ErrorClass.DO_NOT_HONOR: "a generic issuer decline (no reason given)",
    ErrorClass.LIMIT_EXCEEDED: "a card or account limit reached",
    ErrorClass.ISSUER_TECHNICAL: "a technical fault at the issuer or network",
    ErrorClass.PROCESSOR_TECHNICAL: "a technical fault at the payment processor",
    ErrorClass.AUTHENTICATION_REQUIRED: "authentication (3-D Secure or PIN) required",
    ErrorClass.SUSPECTED_FRAUD: "suspected fraud",
    ErrorClass.HARD_DECLINE: "a hard decline (lost, stolen or closed account)",
    ErrorClass.BAD_CARD_DATA: "bad card details (expired, wrong number, CVC or expiry)",
    ErrorClass.TOKEN_FAILURE: "a network token problem",
    ErrorClass.CONFIGURATION: "a merchant set-up problem, not the customer's",
    ErrorClass.CUSTOMER_CANCELLED: "cancelled or abandoned by the customer",
    ErrorClass.DUPLICATE: "a duplicate of another payment",
    ErrorClass.UNKNOWN: "an unknown kind of failure",
}

#: A silent retry strategy as a verb phrase ("retry on adyen", "retry with 3-D Secure on stripe").
_STRATEGY_TEXT: dict[str, str] = {
    Strategy.RETRY_SAME: "retry on {connector} again",
    Strategy.CASCADE: "retry on another connector, {connector}",
    Strategy.STEP_UP: "retry with 3-D Secure on {connector}",
    Strategy.CLEAR_PAN: "retry with the card number instead of its network token on {connector}",
    Strategy.ALTERNATE_NETWORK: "retry over another card network on {connector}",
}
#: A strategy as a noun, for the order's history ("a retry with 3-D Secure").
_STRATEGY_NOUN: dict[str, str] = {
    Strategy.RETRY_SAME: "a retry on the same connector",
    Strategy.CASCADE: "a retry on another connector",
    Strategy.STEP_UP: "a retry with 3-D Secure",
    Strategy.CLEAR_PAN: "a retry with the card number instead of its network token",
    Strategy.ALTERNATE_NETWORK: "a retry over another card network",
}
_CHANNEL_TEXT: dict[str, str] = {
    Channel.SMS: "SMS",
    Channel.WHATSAPP: "WhatsApp",
    Channel.EMAIL: "e-mail",
    Channel.PUSH: "push notification",
}
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _words(value: str) -> str:
    """A closed-vocabulary value (``upi_autopay``) as words."""
    return value.replace("_", " ")


def _error_class(value: str) -> ErrorClass:
    """The error class a category names (UNKNOWN for one this release does not have)."""
    try:
        return ErrorClass(value)
    except ValueError:
        return ErrorClass.UNKNOWN


def _source_text(matched_by: str) -> str:
    if matched_by == ISO8583:
        return "judged by the network decline code"
    if matched_by == NPCI_UPI:
        return "judged by the UPI response code"
    if matched_by == UNIFIED:
        return "judged by the unified error code"
    if matched_by == MESSAGE:
        return "judged by the error message"
    if matched_by == UNKNOWN_SOURCE:
        return "no error table knows this code"
    return f"judged by {matched_by}'s error code"


def error_reason(error: NormalisedError) -> str:
    """The failure as the catalog read it: "the failure reads as insufficient funds (judged by the error message)"."""
    return f"the failure reads as {ERROR_CLASS_TEXT[error.error_class]} ({_source_text(error.matched_by)})"


def prior_reason(error_class: ErrorClass) -> str:
    """The rules-only policy's one explanation."""
    return f"no trained model yet: the chances are the usual ones for {ERROR_CLASS_TEXT[error_class]}"


def action_reason(action: Action, strategy: Strategy | None, connector: str | None, channel: Channel | None,
                  p_success: float) -> str:  # fmt: skip
    """The chosen action and its chance: "retry on another connector, adyen: 58% chance it recovers the order"."""
    if action == Action.RETRY:
        text = _STRATEGY_TEXT.get(str(strategy), "retry on {connector}").format(connector=connector)
        return f"{text}: {p_success:.0%} chance it recovers the order"
    if action == Action.RETARGET:
        medium = _CHANNEL_TEXT.get(str(channel), str(channel))
        return f"send a payment link by {medium}: {p_success:.0%} chance the customer pays"
    return "no action is worth its cost"


def unknown_currency_reason(currency: str, value_usd: float) -> str:
    """Why an order's amount did not weigh in: its currency has no planning rate (model.money)."""
    return (
        f"no USD rate for {currency.upper()}: the order's value is unknown, so it counts as {value_usd:,.0f} USD "
        "whatever its amount"
    )


# ------------------------------------------------------------------------------------------------ features
# A feature's evidence as words. Categorical features: the category, None for a value the model saw too rarely to
# learn (its shared "other" code), the sentinel for a missing value. Numeric ones: the number (NaN: unknown).

#: Categorical features: (the evidence with the value as ``{}``, when it was not given, when the model rarely saw it).
_CATEGORY_TEXT: dict[str, tuple[str, str, str]] = {
    "connector": ("the payment failed on {}", "no connector given", "it failed on a connector the model rarely saw"),
    "error_code": ("the error code itself", "no error code given", "an error code the model rarely saw"),
    # Not "the failure reads as {}": every decision's reasons open with that (error_reason), said once.
    "error_class": ("this kind of failure ({})", "the kind of failure is unknown", "a rare kind of failure"),
    "network_decline_code": ("network decline code {}", "no network decline code", "a rare network decline code"),
    "visa_category": ("Visa response category {}", "no Visa response category", "a rare Visa response category"),
    "merchant_advice_code": ("merchant advice code {}", "no merchant advice code", "a rare merchant advice code"),
    "unified_code": ("unified error code {}", "no unified error code", "a rare unified error code"),
    "card_network": ("a {} card", "no card network given", "a card network the model rarely saw"),
    "payment_method": ("paid by {}", "no payment method given", "a payment method the model rarely saw"),
    "payment_method_type": ("payment type {}", "no payment type given", "a payment type the model rarely saw"),
    "issuer": ("the issuer is {}", "no issuer given", "an issuer the model rarely saw"),
    "currency": ("paid in {}", "no currency given", "a currency the model rarely saw"),
    "customer_country": ("the customer is in {}", "no customer country given", "a country the model rarely saw"),
    "authentication_type": ("{}", "no authentication type given", "a rare authentication type"),
    "last_channel": ("the last payment link went by {}", "no payment link sent yet", "a rare channel"),
    "action": ("the action is {}", "no action", "a rare action"),
    "strategy": ("a retry {}", "not a silent retry", "a retry of a kind the model rarely saw"),
    "target_connector": ("the retry would go to {}", "not a silent retry", "a connector the model rarely saw"),
    "channel": ("a payment link by {}", "not a payment link", "a channel the model rarely saw"),
}
_CATEGORY_VALUE_TEXT: dict[str, Callable[[str], str]] = {
    "error_class": lambda value: ERROR_CLASS_TEXT[_error_class(value)],
    "strategy": lambda value: _STRATEGY_NOUN.get(value, "a retry of another kind")[len("a retry ") :],
    "channel": lambda value: _CHANNEL_TEXT.get(value, _words(value)),
    "last_channel": lambda value: _CHANNEL_TEXT.get(value, _words(value)),
    "action": lambda value: {"retry": "a silent retry", "retarget": "a payment link", "stop": "to stop"}.get(
        value, _words(value)
    ),
    "authentication_type": lambda value: (
        "authenticated with 3-D Secure" if value.startswith("three_ds") else "not authenticated with 3-D Secure"
    ),
    "payment_method": _words,
    "payment_method_type": _words,
}


def _yes_no(yes: str, no: str, unknown: str) -> Callable[[float], str]:
    return lambda value: unknown if not math.isfinite(value) else yes if value >= 0.5 else no


def _count(one: str, many: str) -> Callable[[float], str]:
    """``one``/``many`` hold ``{n}``: "1 attempt so far", "3 attempts so far"."""

    def render(value: float) -> str:
        if not math.isfinite(value):
            return "unknown"
        return (one if value == 1 else many).format(n=f"{value:.0f}")

    return render


def _hours(value: float) -> str:
    return (
        f"{value * 60:.0f} minutes"
        if value < 1.0
        else f"{value:.0f} hours"
        if value < 48.0
        else f"{value / 24:.0f} days"
    )


def _delay(hours: float) -> str:
    if not math.isfinite(hours):
        return "the wait before the attempt is unknown"
    return "acting at once" if hours < 1 / 60 else f"waiting {_hours(hours)} before acting"


def _amount(usd: float) -> str:
    return "the order's value in USD is unknown" if not math.isfinite(usd) else f"an order worth about ${usd:,.0f}"


def _text_likeness(error_class_text: str) -> Callable[[float], str]:
    """The text model's reading of the message as one class: "reads like insufficient funds (91%)", or, below even
    odds, "does not read like a technical fault at the payment processor (2%)" (a low likeness is evidence too)."""

    def render(value: float) -> str:
        if not math.isfinite(value):
            return "the error message could not be read"
        verb = "reads like" if value >= 0.5 else "does not read like"
        return f"the error message {verb} {error_class_text} ({value:.0%})"

    return render


def _known(template: str, unknown: str, render: Callable[[float], str]) -> Callable[[float], str]:
    return lambda value: unknown if not math.isfinite(value) else template.format(render(value))


def _clock(value: float) -> str:
    return f"{int(value):02d}:00"


def _weekday(value: float) -> str:
    return _WEEKDAYS[int(value) % 7]


def _number(value: float) -> str:
    return f"{value:.0f}" if value == int(value) else f"{value:.1f}"


_NUMBER_TEXT: dict[str, Callable[[float], str]] = {
    "is_recurring": _yes_no("a recurring payment", "a one-off payment", "whether it recurs is unknown"),
    "is_network_token": _yes_no("paid with a network token", "paid with the card number", "token use unknown"),
    "is_three_ds": _yes_no("authenticated with 3-D Secure", "not authenticated with 3-D Secure", "3-D Secure unknown"),
    "phone_present": _yes_no("a phone number is on file", "no phone number on file", "phone number unknown"),
    "email_present": _yes_no("an e-mail address is on file", "no e-mail address on file", "e-mail address unknown"),
    "known_code": _yes_no("a code the error catalog knows", "a code the error catalog does not know", "no error code"),
    "mac_never_retry": _yes_no(
        "the merchant advice code says never retry", "the merchant advice code allows a retry", "no advice code"
    ),
    "amount_usd": _amount,
    "log_amount_usd": lambda value: _amount(math.expm1(value)),
    "local_hour": _known("the customer's local time is {}", "the customer's local time is unknown", _clock),
    "local_weekday": _known("it is {} for the customer", "the customer's weekday is unknown", _weekday),
    "local_day": _known("day {} of the month for the customer", "the day of the month is unknown", _number),
    "days_to_next_payday": _known(
        "the next payday (the 1st or 26th) is {} away", "the time to payday is unknown", lambda d: _hours(d * 24.0)
    ),
    "is_month_end": _yes_no("the last days of the month", "not the end of the month", "the date is unknown"),
    "days_since_first_failure": _known(
        "the first failure was {} ago", "the time since the first failure is unknown", lambda d: _hours(d * 24.0)
    ),
    "n_attempts": _count("{n} attempt so far", "{n} attempts so far"),
    "n_silent_retries": _count("{n} silent retry so far", "{n} silent retries so far"),
    "n_connectors_tried": _count("{n} connector tried so far", "{n} connectors tried so far"),
    "n_nudges": _count("{n} payment link sent so far", "{n} payment links sent so far"),
    "hours_since_last_nudge": _known("the last payment link went {} ago", "no payment link sent yet", _hours),
    "last_nudge_clicked": _yes_no(
        "the customer opened the last payment link", "the customer did not open the last payment link", "no link yet"
    ),
    "text_p_retry": lambda value: (
        "the error message could not be read"
        if not math.isfinite(value)
        else f"the error message reads as {'retryable' if value >= 0.5 else 'final'} ({value:.0%} retryable)"
    ),
    "is_same_connector": _yes_no(
        "the retry goes to the connector that failed", "the retry goes to another connector", "not a silent retry"
    ),
    "delay_hours": _delay,
    "log_delay_hours": lambda value: _delay(math.expm1(value)),
    "exec_local_hour": _known("acting at {} the customer's time", "the customer's time then is unknown", _clock),
    "exec_weekday": _known("acting on a {}", "the weekday of the attempt is unknown", _weekday),
    "exec_day": _known("acting on day {} of the month", "the day of the attempt is unknown", _number),
    "exec_days_to_next_payday": _known(
        "acting {} before the next payday (the 1st or 26th)",
        "the time to payday is unknown",
        lambda d: _hours(d * 24.0),
    ),
    "exec_is_month_end": _yes_no("acting in the month's last days", "acting before the month's end", "date unknown"),
    "next_payday_before_exec": _yes_no(
        "a payday (the 1st or 26th) comes before the attempt", "no payday before the attempt", "the payday is unknown"
    ),
}
# The retired payday features (model.features.RETIRED_FEATURES) of bundles trained before the payday features
# followed the rules' paydays: such a bundle still serves, and its reasons read as they did.
_NUMBER_TEXT.update(
    days_to_payday=_known("{} days to the next payday (the 1st)", "the days to payday are unknown", _number),
    exec_days_to_payday=_known(
        "acting {} days before the next payday (the 1st)", "the days to payday are unknown", _number
    ),
    payday_before_exec=_yes_no(
        "a payday (the 1st) comes before the attempt", "no payday before the attempt", "the payday is unknown"
    ),
)
_NUMBER_TEXT.update(
    (f"tried_{strategy}", _yes_no(f"{noun} was tried already", f"no {noun[2:]} yet", "the order's retries are unknown"))
    for strategy, noun in _STRATEGY_NOUN.items()
)
_NUMBER_TEXT.update(
    (f"text_p_{error_class.value}", _text_likeness(text)) for error_class, text in ERROR_CLASS_TEXT.items()
)


def category_evidence(name: str, category: str | None, missing: bool) -> str | None:
    """A categorical feature's evidence: its category (None: one the model saw too rarely to learn), or
    ``missing`` when the value was not given. None for a feature this module has no words for."""
    texts = _CATEGORY_TEXT.get(name)
    if texts is None:
        return None
    given, absent, rare = texts
    if missing:
        return absent
    if category is None:
        return rare
    render = _CATEGORY_VALUE_TEXT.get(name, str)
    return given.format(render(category))


def number_evidence(name: str, value: float) -> str | None:
    """A numeric feature's evidence; None for a feature this module has no words for."""
    render = _NUMBER_TEXT.get(name)
    return None if render is None else render(value)


def with_direction(evidence: str, raises: bool) -> str:
    """ "no issuer given: lowers the chance of success"."""
    return f"{evidence}: {'raises' if raises else 'lowers'} the chance of success"
