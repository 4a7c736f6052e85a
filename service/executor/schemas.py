"""Request and response schemas of the executor's HTTP surface (CONTRACT.md section 5)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from model.requests import AwareDatetime, DecisionRequest, History

OrderStateName = Literal["PENDING", "SUCCEEDED", "FAILED", "AWAITING_AGENT"]


#: The width of the stores' txn_id columns: a caller's own txn_id of a history attempt is kept as it is.
TXN_ID_MAX_LENGTH = 64


class PaymentFailedEvent(DecisionRequest):
    """A failed payment: a decision request (section 2) plus the caller's idempotency key."""

    idempotency_key: str = Field(min_length=1, max_length=256)

    @field_validator("history")
    @classmethod
    def _one_row_per_attempt(cls, history: History) -> History:
        """The order's history becomes its attempts (one per attempt number, each with its txn_id): two attempts
        under one number, or a txn_id wider than the store's, was a database error (HTTP 500), not a 422."""
        seen: set[int] = set()
        txn_ids: set[str] = set()
        for index, attempt in enumerate(history.attempts):
            if attempt.attempt_number in seen:
                raise ValueError(
                    f"attempts[{index}].attempt_number: attempt {attempt.attempt_number} is listed twice; "
                    "each attempt of an order has its own number"
                )
            seen.add(attempt.attempt_number)
            txn_id = (attempt.model_extra or {}).get("txn_id")
            if txn_id is not None and len(str(txn_id)) > TXN_ID_MAX_LENGTH:
                raise ValueError(f"attempts[{index}].txn_id: longer than {TXN_ID_MAX_LENGTH} characters")
            if txn_id:  # the store's txn_id is a key: two attempts under one txn_id cannot both be stored
                if str(txn_id) in txn_ids:
                    raise ValueError(
                        f"attempts[{index}].txn_id: {str(txn_id)!r} is listed twice; each attempt has its own"
                    )
                txn_ids.add(str(txn_id))
        return history


class PaymentSucceededEvent(BaseModel):
    """The order succeeded outside winback; everything still scheduled for it is cancelled."""

    model_config = ConfigDict(extra="allow", frozen=True)

    order_id: str = Field(min_length=1, max_length=256)
    txn_id: str = Field(min_length=1, max_length=64)
    occurred_at: AwareDatetime
    idempotency_key: str = Field(min_length=1, max_length=256)


class EventOut(BaseModel):
    """The answer to an event: the order and its state."""

    order_id: str
    state: OrderStateName


class AttemptOut(BaseModel):
    txn_id: str
    attempt_number: int
    processor_payment_id: str
    strategy: str
    connector: str
    status: str
    error_code: str | None
    error_message: str | None
    network_decline_code: str | None
    merchant_advice_code: str | None
    unified_code: str | None
    decision_id: str | None
    propensity: float | None
    nudge_id: str | None
    created_at: datetime


class NudgeOut(BaseModel):
    nudge_id: str
    channel: str
    template_id: str
    sent_at: datetime
    status: str
    delivered: bool | None
    clicked_at: datetime | None
    provider_message_id: str | None
    error: str | None
    decision_id: str | None
    propensity: float | None


class ActionOut(BaseModel):
    action_id: int
    kind: str
    state: str
    planned_at: datetime
    due_at: datetime
    attempts: int
    decision_id: str | None
    last_error: str | None
    # A charge sent to its connector and not answered since this moment: whether it took the money is unknown.
    unanswered_since: datetime | None = None


class WebhookOut(BaseModel):
    event: str
    status: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    delivered_at: datetime | None


class AgentItemOut(BaseModel):
    item_id: int
    decision_id: str
    state: str
    agent: str | None
    reason: str | None
    created_at: datetime
    acted_at: datetime | None
    #: An approval withdrawn before it was carried out (the order was decided again and planned otherwise).
    withdrawn_at: datetime | None = None
    withdrawn_by: str | None = None
    withdrawn_reason: str | None = None


class OrderOut(BaseModel):
    """An order with everything that happened to it (``decisions`` are the decision API's answers)."""

    order_id: str
    merchant_id: str
    state: OrderStateName
    amount: float
    currency: str
    created_at: datetime
    closed_at: datetime | None
    success_txn_id: str | None
    attempts: list[AttemptOut]
    nudges: list[NudgeOut]
    decisions: list[dict[str, Any]]
    actions: list[ActionOut]
    webhook: WebhookOut | None
    agent_queue: list[AgentItemOut]
