"""The decision request and answer of CONTRACT.md section 2, as domain types.

The HTTP API, the executor, the console and offline evaluation all speak these; open vocabularies (connector,
payment method, error code) are plain strings so never-seen values are valid input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    WithJsonSchema,
    model_validator,
)

from model.vocab import RETRY_STRATEGIES, Action, Channel, Strategy

#: Timestamps outside these years are refused: the rules add and subtract weeks and months around them, and no
#: payment happens there.
EARLIEST_YEAR, LATEST_YEAR = 1970, 9000


def _iso_timestamp_only(value: object) -> object:
    # pydantic would read a number, or a string holding one, as seconds since the epoch
    if isinstance(value, int | float) or (isinstance(value, str) and _is_number(value)):
        raise ValueError("timestamp must be an ISO 8601 string with a timezone (e.g. 2026-11-01T10:15:00Z)")
    return value


def _is_number(text: str) -> bool:
    if ":" in text:  # no number float() reads holds a colon, and every ISO time does: no exception to raise
        return False
    try:
        float(text)
    except ValueError:
        return False
    return True


def _require_timezone(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("timestamp must carry a timezone (e.g. 2026-11-01T10:15:00Z)")
    if not EARLIEST_YEAR <= value.year < LATEST_YEAR:
        raise ValueError(f"timestamp must lie between the years {EARLIEST_YEAR} and {LATEST_YEAR - 1}")
    return value.astimezone(UTC)


#: A timestamp that must carry a timezone, given as an ISO 8601 string; normalised to UTC.
AwareDatetime = Annotated[datetime, BeforeValidator(_iso_timestamp_only), AfterValidator(_require_timezone)]


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


NonEmptyStr = Annotated[str, Field(min_length=1), AfterValidator(_not_blank)]
# Bounded by the width of the stores' columns (service/api/store.py, service/executor/store.py): a longer value is
# a 422 naming its field, not a decision answered and then refused by the database.
MerchantIdStr = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_not_blank)]
OrderIdStr = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_not_blank)]
ConnectorStr = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_not_blank)]


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


def invalid_text_field(model: BaseModel) -> str | None:
    """The path (``failure.error_message``) of the first string or key in ``model`` that is not valid Unicode: a
    lone UTF-16 surrogate, which a JSON escape can carry but UTF-8 cannot store. None when every string is valid."""
    stack: list[tuple[str, object]] = [("", model.model_dump())]
    while stack:
        path, value = stack.pop()
        items: Iterable[tuple[object, object]] = (
            value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        )
        for key, child in items:
            here = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
            if any(isinstance(text, str) and not _encodes(text) for text in (key, child)):
                return here
            stack.append((here, child))
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: Extra fields nested deeper than this are refused: they are stored with the request and serialised again.
MAX_EXTRA_DEPTH = 32


def _too_deep(value: object, limit: int) -> bool:
    """Whether a JSON value nests objects or arrays more than ``limit`` levels deep."""
    level = [value]
    for _ in range(limit):
        level = [
            child
            for node in level
            if isinstance(node, dict | list)
            for child in (node.values() if isinstance(node, dict) else node)
        ]
        if not level:
            return False
    return any(isinstance(node, dict | list) for node in level)


class ContractModel(BaseModel):
    """A body of the contract: extra fields are welcome, kept and stored, never failed on (unless too deep to
    store)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    @model_validator(mode="after")
    def _extras_not_too_deep(self) -> ContractModel:
        for name, value in (self.__pydantic_extra__ or {}).items():
            if _too_deep(value, MAX_EXTRA_DEPTH):
                raise ValueError(f"extra field {name!r} is nested deeper than {MAX_EXTRA_DEPTH} levels")
        return self


class Customer(ContractModel):
    id: NonEmptyStr
    # Flags are StrictBool: JSON true or false only, "yes" or 1 is not read as true (a flag changes which rules apply).
    phone_present: StrictBool = False
    email_present: StrictBool = False
    app_present: StrictBool = False
    country: str | None = Field(default=None, min_length=2, max_length=2)
    opted_out_channels: list[ChannelName] = Field(default_factory=list)


class Payment(ContractModel):
    payment_method: NonEmptyStr
    payment_method_type: str | None = None
    card_network: str | None = None
    issuer: str | None = None
    is_recurring: StrictBool = False
    authentication_type: str = "no_three_ds"
    is_network_token: StrictBool = False


class Failure(ContractModel):
    connector: ConnectorStr
    error_code: str | None = None
    error_message: str | None = None
    network_decline_code: str | None = None
    merchant_advice_code: str | None = None
    unified_code: str | None = None


class HistoryAttempt(ContractModel):
    attempt_number: int = Field(ge=1, strict=True)
    connector: ConnectorStr
    strategy: StrategyName
    status: AttemptStatus
    error_code: str | None = None
    created_at: AwareDatetime


class HistoryNudge(ContractModel):
    channel: ChannelName
    sent_at: AwareDatetime
    delivered: StrictBool = True
    clicked_at: AwareDatetime | None = None


def _null_as(empty: Callable[[], object]) -> BeforeValidator:
    """Reads JSON null as ``empty()``: ``"history": null`` (or ``"attempts": null``) says what an absent one says."""
    return BeforeValidator(lambda value: empty() if value is None else value)


class History(ContractModel):
    attempts: Annotated[list[HistoryAttempt], _null_as(list)] = Field(default_factory=list)
    nudges: Annotated[list[HistoryNudge], _null_as(list)] = Field(default_factory=list)


class DecisionRequest(ContractModel):
    """What a caller knows at a decision point (the failure, or a follow-up after an unanswered nudge)."""

    merchant_id: MerchantIdStr
    order_id: OrderIdStr
    event_time: AwareDatetime
    amount: float = Field(ge=0, allow_inf_nan=False, strict=True)  # a JSON number: not "49.0", not true
    currency: str = Field(pattern=r"^[A-Za-z]{3}$", description="ISO 4217 code (three letters)")
    customer: Customer
    payment: Payment
    failure: Failure
    history: Annotated[History, _null_as(dict)] = Field(default_factory=History)
    available_connectors: list[ConnectorStr] | None = None


#: An answer's ``strategy`` as its OpenAPI schema shows it: a retry's strategy or null (CONTRACT.md section 2). The
#: type stays ``Strategy``, whose ``initial`` and ``retarget_link`` name history attempts, never an answer.
AnswerStrategy = Annotated[
    Strategy | None,
    WithJsonSchema(
        {
            "anyOf": [{"type": "string", "enum": [str(strategy) for strategy in RETRY_STRATEGIES]}, {"type": "null"}],
            "title": "Strategy",
            "description": "for action retry, how to retry; else null",
        }
    ),
]

#: An answer always carries every field (null where it has no value): its OpenAPI schema lists them all as required.
_ANSWER_CONFIG = ConfigDict(extra="allow", frozen=True, json_schema_serialization_defaults_required=True)


class Alternative(ContractModel):
    model_config = _ANSWER_CONFIG

    action: Action
    strategy: AnswerStrategy = None
    connector: str | None = None
    channel: Channel | None = None
    execute_at: datetime
    p_success: float


class Decision(ContractModel):
    """The scorer's answer (CONTRACT.md section 2, response 200)."""

    model_config = _ANSWER_CONFIG

    decision_id: str
    model_version: str
    action: Action
    strategy: AnswerStrategy = None
    connector: str | None = None
    channel: Channel | None = None
    execute_at: datetime
    retryable: bool
    retry_probability: float
    expected_success: float
    propensity: float
    alternatives: list[Alternative] = Field(
        default_factory=list,
        description="the best candidate of each other permitted action (strategy and connector, or channel), best "
        "first by the policy's own measure, expected recovered value net of the action's cost: a cheaper or sooner "
        "action may come before one with a higher p_success",
    )
    reasons: list[str] = Field(default_factory=list)
    rules_applied: list[str] = Field(default_factory=list)
