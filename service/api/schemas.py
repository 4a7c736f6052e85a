"""API-only schemas: outcomes, errors, health. Decisions use ``model.requests`` (DecisionRequest, Decision)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, StrictBool

from model.requests import AwareDatetime, ContractModel, NonEmptyStr


class OutcomeIn(ContractModel):
    """What happened after a decision (CONTRACT.md section 2). Extra fields are kept and stored.

    The optional fields below are what the feedback loop exports to the history files (CONTRACT.md section 3):
    ``txn_id`` and ``connector`` of the attempt, its error fields on a failure; for a retarget ``nudge_id``,
    ``sent_at``, ``delivered``, ``clicked_at`` and ``template_id``. They are typed here, so a wrong one is a 422
    naming it instead of an export that fails later, for every merchant.
    """

    decision_id: NonEmptyStr = Field(max_length=64)
    order_id: NonEmptyStr = Field(max_length=256)
    status: Literal["success", "failure"]
    occurred_at: AwareDatetime
    txn_id: NonEmptyStr | None = Field(default=None, max_length=256)
    connector: NonEmptyStr | None = Field(default=None, max_length=256)
    error_code: str | None = None
    error_message: str | None = None
    network_decline_code: str | None = None
    merchant_advice_code: str | None = None
    unified_code: str | None = None
    nudge_id: NonEmptyStr | None = Field(default=None, max_length=256)
    sent_at: AwareDatetime | None = None
    delivered: StrictBool | None = None
    clicked_at: AwareDatetime | None = None
    template_id: NonEmptyStr | None = Field(default=None, max_length=256)


class OutcomeOut(BaseModel):
    """The stored outcome; the same request again gets this same answer."""

    decision_id: str
    order_id: str
    status: Literal["success", "failure"]
    occurred_at: datetime
    recorded_at: datetime
    decision_found: bool = Field(
        default=True,
        description="Whether this scorer served the decision_id. false: a mistyped id, or a decision served "
        "elsewhere; the outcome is kept, but without its decision it cannot reach the history files retraining "
        "reads.",
    )


class FieldError(BaseModel):
    field: str = Field(description="Dotted path of the offending field, e.g. 'failure.connector' or '[2].amount'.")
    msg: str
    type: str
    loc: list[str | int]


class ValidationErrorBody(BaseModel):
    message: str = Field(description="All problems in one line, each prefixed by its field.")
    detail: list[FieldError]


class ErrorBody(BaseModel):
    detail: str


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    ready: bool
    model_version: str
    reason: str | None = None
    #: The serving model was trained with another error catalog than the one served (both versions named); None
    #: when they agree or no model serves.
    catalog_mismatch: str | None = None


#: OpenAPI ``responses`` of a route that authenticates its caller by API key (service.api.deps.MerchantKey).
CALLER_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing or unknown API key, or more than one Authorization header"},
    403: {"model": ErrorBody, "description": "the key belongs to another merchant"},
}
#: OpenAPI ``responses`` of a route that reads a JSON body (limits and encodings: service.api.fastpath).
BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "a compressed body that does not decode (gzip, deflate)"},
    413: {"model": ErrorBody, "description": "a body over 32 MiB, sent or once decoded"},
    415: {"model": ErrorBody, "description": "a Content-Encoding other than gzip or deflate"},
    422: {"model": ValidationErrorBody, "description": "malformed input; each problem names its field"},
}
