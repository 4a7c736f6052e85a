"""The closed vocabularies of the contract (CONTRACT.md sections 2 and 3) and winback's error classes.

Open vocabularies (connectors, payment methods, error codes, issuers) are plain strings: a value never seen
before is valid input everywhere.
"""

from __future__ import annotations

from enum import StrEnum


class Strategy(StrEnum):
    """How an attempt was made (history column ``strategy``)."""

    INITIAL = "initial"
    RETRY_SAME = "retry_same"
    CASCADE = "cascade"
    STEP_UP = "step_up"
    CLEAR_PAN = "clear_pan"
    ALTERNATE_NETWORK = "alternate_network"
    RETARGET_LINK = "retarget_link"


#: Strategies a silent retry may use (the decision API's ``strategy`` for ``action == "retry"``).
RETRY_STRATEGIES: tuple[Strategy, ...] = (
    Strategy.RETRY_SAME,
    Strategy.CASCADE,
    Strategy.STEP_UP,
    Strategy.CLEAR_PAN,
    Strategy.ALTERNATE_NETWORK,
)
#: History strategies that are not a silent re-attempt: the original payment and a payment through a link.
#: Any other, one winback does not know included, is a re-attempt (retry budgets count it).
NOT_SILENT_RETRY_STRATEGIES: frozenset[str] = frozenset({Strategy.INITIAL.value, Strategy.RETARGET_LINK.value})


class Channel(StrEnum):
    """Retarget channels."""

    SMS = "sms"
    WHATSAPP = "whatsapp"
    EMAIL = "email"
    PUSH = "push"


class Action(StrEnum):
    """What the decision API tells the caller to do."""

    RETRY = "retry"
    RETARGET = "retarget"
    STOP = "stop"


class AttemptStatus(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"


class AuthenticationType(StrEnum):
    THREE_DS = "three_ds"
    NO_THREE_DS = "no_three_ds"


class ErrorClass(StrEnum):
    """The small set of standard classes every connector error is normalised to."""

    INSUFFICIENT_FUNDS = "insufficient_funds"
    DO_NOT_HONOR = "do_not_honor"  # generic issuer decline, no reason given
    LIMIT_EXCEEDED = "limit_exceeded"  # amount or frequency limits on the card/account
    ISSUER_TECHNICAL = "issuer_technical"  # issuer/network unavailable, timeouts, system errors at the issuer
    PROCESSOR_TECHNICAL = "processor_technical"  # the PSP/acquirer itself failed (5xx, timeouts, gateway errors)
    AUTHENTICATION_REQUIRED = "authentication_required"  # SCA/3DS or PIN needed
    SUSPECTED_FRAUD = "suspected_fraud"
    HARD_DECLINE = "hard_decline"  # lost/stolen/closed/pick-up/invalid account: the issuer will never approve
    BAD_CARD_DATA = "bad_card_data"  # expired card, wrong CVC/expiry/number: needs new details
    TOKEN_FAILURE = "token_failure"  # network token / cryptogram problems: clear PAN may pass
    CONFIGURATION = "configuration"  # merchant/integration setup: not the customer's problem
    CUSTOMER_CANCELLED = "customer_cancelled"  # customer declined, abandoned or let a collect request expire
    DUPLICATE = "duplicate"
    UNKNOWN = "unknown"


#: Payment methods and types whose success needs the customer's own action: never retried silently.
USER_CONSENT_METHODS: frozenset[str] = frozenset({"wallet", "bank_redirect", "pay_later"})
#: Authentication types that mean a 3DS challenge was (or must be) shown to the customer.
USER_CONSENT_AUTHENTICATION: frozenset[str] = frozenset({"three_ds_challenge"})

#: A nudge with no click this long after ``sent_at`` counts as unanswered; the next decision point is then.
NUDGE_FOLLOW_UP_HOURS: float = 24.0
