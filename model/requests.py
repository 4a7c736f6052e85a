"""The decision request and answer of CONTRACT.md section 2, as domain types.

The HTTP API, the executor, the console and offline evaluation all speak these; open vocabularies (connector,
payment method, error code) are plain strings so never-seen values are valid input.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from model.vocab import Action, Channel, Strategy


def _require_timezone(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("timestamp must carry a timezone (e.g. 2026-11-01T10:15:00Z)")
    return value.astimezone(UTC)


#: A timestamp that must carry a timezone; normalised to UTC.
AwareDatetime = Annotated[datetime, AfterValidator(_require_timezone)]

NonEmptyStr = Annotated[str, Field(min_length=1)]


def _attempt_status(value: str) -> str:
    status = value.strip().lower()
    if status not in ("success", "failure"):
        raise ValueError("status must be 'success' or 'failure'")
    return status


def _known_or_sent(vocabulary: type[StrEnum]) -> Callable[[str], str]:
    """The validator of an open vocabulary (CONTRACT.md section 2: unknown enum values are valid input and get a
    decision): a known value, matched trimmed and in any case ("WhatsApp " is whatsapp: an opt-out must hold),
    becomes its enum member (a str); a value never seen stays the string sent."""
    members = {member.value: member for member in vocabulary}

    def known_or_sent(name: str) -> str:
        return members.get(name.strip().lower(), name)

    return known_or_sent


def _names(vocabulary: type[StrEnum], noun: str) -> str:
    return f"{', '.join(sorted(member.value for member in vocabulary))}, or a {noun} winback does not know"


#: An attempt's status: a closed pair (CONTRACT.md section 3), unlike the vocabularies of connectors and codes.
AttemptStatus = Annotated[str, AfterValidator(_attempt_status), Field(description="success or failure")]
#: A channel as input: one of Channel's values, or the name of one winback does not know.
ChannelName = Annotated[
    Annotated[str, Field(min_length=1, max_length=16)],  # the width of the stores' channel columns
    AfterValidator(_known_or_sent(Channel)),
    Field(description=_names(Channel, "channel")),
]
#: An attempt's strategy as input: one of Strategy's values, or the name of one winback does not know.
StrategyName = Annotated[
    Annotated[str, Field(min_length=1, max_length=32)],  # the width of the stores' strategy columns
    AfterValidator(_known_or_sent(Strategy)),
    Field(description=_names(Strategy, "strategy")),
]


class _Model(BaseModel):
    # Extra fields are welcome in the contract: keep them, never fail on them.
    model_config = ConfigDict(extra="allow", frozen=True)


class Customer(_Model):
    id: NonEmptyStr
    phone_present: bool = False
    email_present: bool = False
    app_present: bool = False
    country: str | None = Field(default=None, min_length=2, max_length=2)
    opted_out_channels: list[ChannelName] = Field(default_factory=list)


class Payment(_Model):
    payment_method: NonEmptyStr
    payment_method_type: str | None = None
    card_network: str | None = None
    issuer: str | None = None
    is_recurring: bool = False
    authentication_type: str = "no_three_ds"
    is_network_token: bool = False


class Failure(_Model):
    connector: NonEmptyStr
    error_code: str | None = None
    error_message: str | None = None
    network_decline_code: str | None = None
    merchant_advice_code: str | None = None
    unified_code: str | None = None


class HistoryAttempt(_Model):
    attempt_number: int = Field(ge=1)
    connector: NonEmptyStr
    strategy: StrategyName
    status: AttemptStatus
    error_code: str | None = None
    created_at: AwareDatetime


class HistoryNudge(_Model):
    channel: ChannelName
    sent_at: AwareDatetime
    delivered: bool = True
    clicked_at: AwareDatetime | None = None


class History(_Model):
    attempts: list[HistoryAttempt] = Field(default_factory=list)
    nudges: list[HistoryNudge] = Field(default_factory=list)


class DecisionRequest(_Model):
    """What a caller knows at a decision point (the failure, or a follow-up after an unanswered nudge)."""

    merchant_id: NonEmptyStr
    order_id: NonEmptyStr
    event_time: AwareDatetime
    amount: float = Field(ge=0, allow_inf_nan=False)
    currency: str = Field(min_length=3, max_length=3)
    customer: Customer
    payment: Payment
    failure: Failure
    history: History = Field(default_factory=History)
    available_connectors: list[NonEmptyStr] | None = None


class Alternative(_Model):
    action: Action
    strategy: Strategy | None = None
    connector: str | None = None
    channel: Channel | None = None
    execute_at: datetime
    p_success: float


class Decision(_Model):
    """The scorer's answer (CONTRACT.md section 2, response 200)."""

    decision_id: str
    model_version: str
    action: Action
    strategy: Strategy | None = None
    connector: str | None = None
    channel: Channel | None = None
    execute_at: datetime
    retryable: bool
    retry_probability: float
    expected_success: float
    propensity: float
    alternatives: list[Alternative] = Field(default_factory=list)
    reasons: list[str] = Field(default_factory=list)
    rules_applied: list[str] = Field(default_factory=list)
