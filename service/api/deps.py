"""Typed dependencies of the API: the runtime (config, catalog, model, store, metrics) and the caller's identity.

Tests swap any of them with ``app.dependency_overrides``.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from fastapi import Depends, Header, HTTPException, Request, status

from model.catalog import ErrorCatalog, NormalisedError
from model.merchant_config import MerchantConfig, WinbackConfig
from model.policy import PolicyConfig, code_support, decide
from model.requests import Decision, DecisionRequest
from service.api.metrics import ApiMetrics
from service.api.model_holder import ModelHolder
from service.api.settings import Settings
from service.api.store import DecisionWriter, Store, decision_row

log = logging.getLogger("winback.api")


class MemoCatalog(ErrorCatalog):
    """The loaded catalog with ``normalise`` memoised: decide() asks it several times per request, and the
    same few (connector, code, ...) combinations make up most traffic. normalise is a pure function of its
    arguments (all strings or None), so caching cannot change an answer."""

    def __init__(self, inner: ErrorCatalog, maxsize: int = 65_536) -> None:
        self.__dict__.update(inner.__dict__)
        self._memo = functools.lru_cache(maxsize=maxsize)(super().normalise)

    def normalise(
        self,
        connector: str,
        error_code: str | None,
        error_message: str | None = None,
        network_decline_code: str | None = None,
        merchant_advice_code: str | None = None,
        unified_code: str | None = None,
        card_network: str | None = None,
        payment_method: str | None = None,
    ) -> NormalisedError:
        """Memoised ``ErrorCatalog.normalise``."""
        result: NormalisedError = self._memo(
            connector,
            error_code,
            error_message,
            network_decline_code,
            merchant_advice_code,
            unified_code,
            card_network,
            payment_method,
        )
        return result


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

    def decide(self, request: DecisionRequest, merchant: MerchantConfig) -> Decision:
        """decide() with the serving model; if the model fails on this request, the rules-only policy answers."""
        served = self.holder.current  # read once: a swap mid-request does not change this request's model
        started = time.perf_counter()
        try:
            decision = decide(request, merchant, served.scorer, catalog=self.catalog, config=self.policy, rng=self.rng)
        except Exception:
            if served.scorer is None:
                raise
            log.exception(
                "model %s failed on a request; answered rules-only",
                served.version,
                extra={"merchant_id": request.merchant_id, "order_id": request.order_id},
            )
            decision = decide(request, merchant, None, catalog=self.catalog, config=self.policy, rng=self.rng)
        self._record(request, decision, time.perf_counter() - started, served.scorer)
        return decision

    def _record(self, request: DecisionRequest, decision: Decision, seconds: float, scorer: object = None) -> None:
        if self.writer is not None:
            self.writer.put(decision_row(request, decision))
        self.metrics.observe_decision(decision)
        failure = request.failure
        error = self.catalog.normalise(
            failure.connector,
            failure.error_code,
            failure.error_message,
            failure.network_decline_code,
            failure.merchant_advice_code,
            failure.unified_code,
            request.payment.card_network,
            request.payment.payment_method,
        )
        support = code_support(scorer, failure.connector, failure.error_code)
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
                    "decide_ms": round(seconds * 1e3, 3),
                },
            )


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


def get_runtime(request: Request) -> Runtime:
    """The app's runtime (set by create_app)."""
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]

_UNAUTHORIZED_HEADERS = {"WWW-Authenticate": "Bearer"}


def get_caller(runtime: RuntimeDep, authorization: Annotated[str | None, Header()] = None) -> Caller:
    """Identify the merchant by its bearer key: SHA-256 of the key against every digest, in constant time."""
    if not authorization:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing Authorization: Bearer <api key>",
            headers=_UNAUTHORIZED_HEADERS,
        )
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="Authorization header must be 'Bearer <api key>'",
            headers=_UNAUTHORIZED_HEADERS,
        )
    digest = hashlib.sha256(key.strip().encode()).hexdigest().encode()
    found: Caller | None = None
    # Compare against every merchant, not stopping at a match, so timing says nothing about which one matched.
    for merchant_id, merchant in runtime.config.merchants.items():
        if hmac.compare_digest(digest, merchant.api_key_sha256.encode()) and found is None:
            found = Caller(merchant_id=merchant_id, merchant=merchant)
    if found is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="unknown API key", headers=_UNAUTHORIZED_HEADERS)
    return found


CallerDep = Annotated[Caller, Depends(get_caller)]
