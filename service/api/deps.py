"""Typed dependencies of the API: the runtime (config, catalog, model, store, metrics) and the caller's identity.

Tests swap any of them with ``app.dependency_overrides``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import dataclass, field
from typing import Annotated, NamedTuple

import numpy as np
from fastapi import Depends, HTTPException, Request, status
from fastapi.dependencies.models import Dependant
from fastapi.openapi.models import HTTPBearer as HTTPBearerModel
from fastapi.security.base import SecurityBase

from model.catalog import ErrorCatalog, normalise_request
from model.merchant_config import MerchantConfig, WinbackConfig
from model.policy import PolicyConfig, Scorer, code_support, decide, new_decision_id
from model.requests import Decision, DecisionRequest
from model.rules import RuleInputError
from service.api.inflight import RequestsInFlight
from service.api.metrics import ApiMetrics
from service.api.model_holder import ModelHolder
from service.api.settings import Settings
from service.api.store import DecisionWriter, Store, decision_row, stored_json

log = logging.getLogger("winback.api")


class Served(NamedTuple):
    """One decision served and not yet recorded: its request (and the request's JSON, as stored), the decision,
    its JSON, the time decide() took and the scorer that answered."""

    request: DecisionRequest
    request_json: str
    decision: Decision
    answer: str
    seconds: float
    scorer: object


class BatchItemError(ValueError):
    """An item of a batch the hard rules cannot use (``RuleInputError``), with its index in the batch."""

    def __init__(self, index: int, error: RuleInputError) -> None:
        super().__init__(str(error))
        self.index = index
        self.field = error.field


@dataclass
class Runtime:
    """Everything a request needs, built by the app factory and the lifespan."""

    settings: Settings
    config: WinbackConfig
    catalog: ErrorCatalog
    holder: ModelHolder
    metrics: ApiMetrics
    policy: PolicyConfig
    rng: np.random.Generator
    store: Store | None = None
    writer: DecisionWriter | None = None
    in_flight: RequestsInFlight = field(default_factory=RequestsInFlight)
    _keys: tuple[WinbackConfig, tuple[tuple[bytes, Caller], ...]] | None = field(default=None, init=False, repr=False)

    def decide_json(self, request: DecisionRequest, merchant: MerchantConfig) -> str:
        """decide() with the serving model, as the answer's JSON, then stored, counted and logged (``record``)."""
        served = self.decide(request, merchant)
        self.record(served)
        return served.answer

    def decide_batch_json(self, requests: list[DecisionRequest], merchant: MerchantConfig) -> str:
        """The answers to ``requests`` as one JSON array, in order. Every item is decided before any is recorded,
        so an item the rules cannot use (BatchItemError, naming its index) leaves nothing stored."""
        served: list[Served] = []
        for index, request in enumerate(requests):
            try:
                served.append(self.decide(request, merchant))
            except RuleInputError as error:
                raise BatchItemError(index, error) from error
        for one in served:
            self.record(one)
        return "[" + ",".join([one.answer for one in served]) + "]"

    def decide(self, request: DecisionRequest, merchant: MerchantConfig) -> Served:
        """decide() with the serving model, serialised once (the same text is the response and is stored); if
        the model fails on this request, the rules-only policy answers. Nothing is recorded yet."""
        request_json = stored_json(request)
        served = self.holder.current  # read once: a swap mid-request does not change this request's model
        started = time.perf_counter()
        try:
            decision = self._decide(request, merchant, served.scorer)
        except RuleInputError:
            raise  # malformed input: a 422 whatever the model
        except Exception:
            if served.scorer is None:
                raise
            log.exception(
                "model %s failed on a request; answered rules-only",
                served.version,
                extra={"merchant_id": request.merchant_id, "order_id": request.order_id},
            )
            decision = self._decide(request, merchant, None)
        seconds = time.perf_counter() - started
        return Served(request, request_json, decision, decision.model_dump_json(), seconds, served.scorer)

    def _decide(self, request: DecisionRequest, merchant: MerchantConfig, scorer: Scorer | None) -> Decision:
        # A fresh decision id every time, whatever the seed: a seeded rng repeats ids across workers and restarts.
        return decide(
            request, merchant, scorer, catalog=self.catalog, config=self.policy, rng=self.rng,
            decision_id=new_decision_id(None),
        )  # fmt: skip

    def record(self, served: Served) -> None:
        """Queue the decision's row for the store, then count and log it. The row is queued first and a failure
        after it is logged, not raised: the answer is already on its way, so nothing may decide it again."""
        request, decision = served.request, served.decision
        if self.writer is not None:
            self.writer.put(
                decision_row(request, decision, answer_json=served.answer, request_json=served.request_json)
            )
        try:
            self._observe(served)
        except Exception:
            log.exception("could not count or log decision %s", decision.decision_id)

    def _observe(self, served: Served) -> None:
        request, decision = served.request, served.decision
        self.metrics.observe_decision(decision)
        failure = request.failure
        error = normalise_request(self.catalog, request)
        support = code_support(served.scorer, failure.connector, failure.error_code)
        self.metrics.observe_error_code(failure.connector, failure.error_code, error.known_code, support)
        if self.settings.log_decisions:
            log.info(
                "decision",
                extra={
                    "decision_id": decision.decision_id,
                    "merchant_id": request.merchant_id,
                    "order_id": request.order_id,
                    "action": decision.action.value,
                    "strategy": decision.strategy.value if decision.strategy else None,
                    "channel": decision.channel.value if decision.channel else None,
                    "model_version": decision.model_version,
                    "known_code": error.known_code,
                    "code_support": support,
                    "decide_ms": round(served.seconds * 1e3, 3),
                },
            )

    def key_digests(self) -> tuple[tuple[bytes, Caller], ...]:
        """(SHA-256 hex digest of the API key, caller) of every merchant, built once per config."""
        if self._keys is None or self._keys[0] is not self.config:
            callers = tuple(
                (merchant.api_key_sha256.encode(), Caller(merchant_id=merchant_id, merchant=merchant))
                for merchant_id, merchant in self.config.merchants.items()
            )
            self._keys = (self.config, callers)
        return self._keys[1]


@dataclass(frozen=True)
class Caller:
    """The merchant whose API key came with the request."""

    merchant_id: str
    merchant: MerchantConfig

    def require(self, merchant_id: str, where: str = "merchant_id") -> None:
        """403 unless ``merchant_id`` is the caller's own."""
        if not hmac.compare_digest(merchant_id.encode(), self.merchant_id.encode()):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                detail=f"{where}: this API key may only act for merchant {self.merchant_id!r}",
            )


# The dependencies are coroutines on purpose: FastAPI runs a plain ``def`` dependency in the thread pool,
# two thread hand-offs per request for a few microseconds of work.


async def get_runtime(request: Request) -> Runtime:
    """The app's runtime (set by create_app)."""
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]

_UNAUTHORIZED_HEADERS = {"WWW-Authenticate": "Bearer"}


class MerchantKey(SecurityBase):
    """The caller, identified by ``Authorization: Bearer <api key>``: the SHA-256 of the key is compared with
    every merchant's digest, in constant time; 401 when the key is missing or unknown.

    A security scheme (HTTP bearer) rather than a function with a ``Header()`` parameter: the OpenAPI document
    says how to authenticate, and the header is read as it is instead of through FastAPI's parameter
    validation (which cost more than the whole key check).
    """

    def __init__(self) -> None:
        self.model = HTTPBearerModel(description="The merchant's API key: `Authorization: Bearer <api key>`.")
        self.scheme_name = "MerchantKey"

    async def __call__(self, request: Request, runtime: RuntimeDep) -> Caller:
        """The merchant whose key came with ``request``."""
        sent = request.headers.getlist("authorization")
        if len(sent) > 1:  # which one would count is up to each proxy and framework: none does
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail="more than one Authorization header: send exactly one",
                headers=_UNAUTHORIZED_HEADERS,
            )
        authorization = sent[0] if sent else None
        if not authorization:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail="missing Authorization: Bearer <api key>",
                headers=_UNAUTHORIZED_HEADERS,
            )
        key = bearer_key(authorization)
        if key is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail="Authorization header must be 'Bearer <api key>'",
                headers=_UNAUTHORIZED_HEADERS,
            )
        found = caller_for_key(runtime, key)
        if found is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="unknown API key", headers=_UNAUTHORIZED_HEADERS)
        return found


def bearer_key(authorization: str) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header value; None for another scheme or an empty key."""
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


def caller_for_key(runtime: Runtime, key: str) -> Caller | None:
    """The merchant whose API key is ``key``: its SHA-256 against every merchant's digest, in constant time."""
    digest = hashlib.sha256(key.encode()).hexdigest().encode()
    found: Caller | None = None
    # Compare against every merchant, not stopping at a match, so timing says nothing about which one matched.
    for expected, caller in runtime.key_digests():
        if hmac.compare_digest(digest, expected) and found is None:
            found = caller
    return found


get_caller = MerchantKey()
CallerDep = Annotated[Caller, Depends(get_caller)]


async def refused_caller(request: Request) -> HTTPException | None:
    """The 401 a route that takes the merchant's key owes ``request`` when its key is missing or unknown; None
    when the key is good or the route takes none.

    FastAPI reads and parses a body before it solves a route's dependencies, so a body that is not JSON would be
    answered 422 (or 400) before the key is looked at. The error handlers ask this first: a caller without a good
    key learns nothing about its body, only that it needs a key."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None or not _takes_key(dependant):
        return None
    try:
        await get_caller(request, request.app.state.runtime)
    except HTTPException as refused:
        return refused
    return None


def _takes_key(dependant: Dependant) -> bool:
    return any(sub.call is get_caller or _takes_key(sub) for sub in dependant.dependencies)
