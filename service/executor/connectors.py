"""Connectors: how the executor performs a silent retry (or a link payment) through a payment switch.

``HttpConnector`` speaks a small JSON API, retries timeouts and 5xx with exponential backoff and full jitter, and
sits behind a circuit breaker per connector:

- ``POST {base_url}/v1/payments`` with ``Idempotency-Key``: charge one attempt (``charge``);
- ``GET {base_url}/v1/payments/{payment_id}``: what became of a payment, by its processor payment id
  ``<order_id>_<n>`` (``status``; as Hyperswitch's payments retrieve, Stripe's PaymentIntent retrieve). It answers
  the payment as the charge did (``status`` ``succeeded`` or ``failed``, with the decline's fields), or 404 with
  ``{"error": {"code": "payment_not_found"}}`` when no charge under that id ever reached the switch. Any other 404
  (a switch without this endpoint) is not taken for "not found": the charge stays unknown;
- ``POST {base_url}/v1/payments/{payment_id}/refunds`` with ``Idempotency-Key`` and
  ``{"amount", "currency", "reason"}``: refund a payment (``refund``; as Adyen's ``/payments/{pspReference}/refunds``,
  Stripe's and Hyperswitch's refunds create). It answers ``{"refund_id", "payment_id", "status"}``, ``status``
  ``succeeded`` or ``pending`` (taken; the money goes back later), or ``failed``.

``sandbox`` endpoints use the same client against the sandbox server of ``service.executor.sandbox``, which
answers from the simulator's outcome model and deduplicates by idempotency key.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol, runtime_checkable
from urllib.parse import quote

import httpx

from model.merchant_config import ConnectorEndpoint, connector_key
from model.requests import DecisionRequest
from model.vocab import Strategy

PAYMENTS_PATH = "/v1/payments"
#: The error code of a switch's 404 for a payment id it never saw (``HttpConnector.status``).
PAYMENT_NOT_FOUND = "payment_not_found"


class TransientError(RuntimeError):
    """The call may succeed later (5xx, timeout, connection refused, open circuit): try again, same key."""


class PermanentError(RuntimeError):
    """The call will never succeed as made (a 4xx other than a decline, a missing endpoint or secret)."""


@dataclass(frozen=True)
class ChargeRequest:
    """One payment attempt to make; ``idempotency_key`` is derived from the action and never changes."""

    idempotency_key: str
    merchant_id: str
    order_id: str
    attempt_number: int
    amount: float
    currency: str
    strategy: str
    connector: str
    execute_at: datetime
    context: DecisionRequest | None = None  # the order as the decision API saw it (the sandbox needs it)

    @property
    def payment_id(self) -> str:
        """The processor payment id of CONTRACT.md section 5: ``<order_id>_<attempt_number>``."""
        return f"{self.order_id}_{self.attempt_number}"

    def hints(self) -> dict[str, Any]:
        """Strategy hints for the switch: 3DS step-up, clear PAN instead of the network token, another network."""
        return {
            "three_ds": self.strategy == Strategy.STEP_UP,
            "clear_pan": self.strategy == Strategy.CLEAR_PAN,
            "network": "alternate" if self.strategy == Strategy.ALTERNATE_NETWORK else None,
        }

    def payload(self, with_context: bool) -> dict[str, Any]:
        """The JSON body sent to the switch."""
        body: dict[str, Any] = {
            "merchant_id": self.merchant_id,
            "order_id": self.order_id,
            "payment_id": self.payment_id,
            "attempt_number": self.attempt_number,
            "amount": self.amount,
            "currency": self.currency,
            "strategy": self.strategy,
            "connector": self.connector,
            "hints": self.hints(),
            "execute_at": self.execute_at.isoformat(),
        }
        if with_context and self.context is not None:
            body["context"] = self.context.model_dump(mode="json")
        return body


@dataclass(frozen=True)
class ChargeResult:
    """What the switch answered: success, or a decline with the connector's error fields."""

    status: Literal["success", "failure"]
    connector: str
    error_code: str | None = None
    error_message: str | None = None
    network_decline_code: str | None = None
    merchant_advice_code: str | None = None
    unified_code: str | None = None
    reference: str | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any], connector: str) -> ChargeResult:
        """Parse the switch's answer (``status`` is ``succeeded``/``success`` or ``failed``/``failure``)."""
        raw = str(body.get("status", "")).lower()
        if raw not in {"succeeded", "success", "failed", "failure"}:
            raise PermanentError(f"connector {connector!r} answered an unknown status {body.get('status')!r}")

        def text(name: str) -> str | None:
            value = body.get(name)
            return None if value is None else str(value)

        return cls(
            status="success" if raw in {"succeeded", "success"} else "failure",
            connector=str(body.get("connector") or connector),
            error_code=text("error_code"),
            error_message=text("error_message"),
            network_decline_code=text("network_decline_code"),
            merchant_advice_code=text("merchant_advice_code"),
            unified_code=text("unified_code"),
            reference=text("reference"),
        )


class Connector(Protocol):
    """Performs one payment attempt; raises TransientError or PermanentError when no answer was obtained.

    A connector with a true ``wants_context`` attribute gets the order's decision request in ``context``.
    """

    def charge(self, request: ChargeRequest) -> ChargeResult: ...


@runtime_checkable
class ChecksStatus(Protocol):
    """A connector that can be asked what became of a payment by its processor payment id."""

    def status(self, payment_id: str, connector: str) -> ChargeResult | None:
        """The payment's answer, or None when no charge under ``payment_id`` ever reached the switch; raises
        TransientError when no answer was obtained, PermanentError when the switch cannot be asked."""
        ...


@dataclass(frozen=True)
class RefundRequest:
    """One refund of a payment; ``idempotency_key`` is derived from the refund action and never changes."""

    idempotency_key: str
    merchant_id: str
    order_id: str
    payment_id: str
    amount: float
    currency: str
    reason: str = "duplicate"

    def payload(self) -> dict[str, Any]:
        """The JSON body sent to the switch."""
        return {
            "merchant_id": self.merchant_id,
            "order_id": self.order_id,
            "payment_id": self.payment_id,
            "amount": self.amount,
            "currency": self.currency,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class RefundResult:
    """The switch took the refund: ``succeeded``, or ``pending`` (the money goes back later)."""

    status: Literal["succeeded", "pending"]
    refund_id: str | None = None


@runtime_checkable
class Refunds(Protocol):
    """A connector that can refund a payment."""

    def refund(self, request: RefundRequest) -> RefundResult:
        """Refund the payment; raises TransientError when no answer was obtained (the same key again is safe),
        PermanentError when the switch refused (or cannot take) the refund."""
        ...


class RefusedError(PermanentError):
    """The switch refused the attempt outright (a 4xx other than 409): nothing was charged."""


class CircuitOpenError(TransientError):
    """Calls to this connector are paused after repeated failures."""


class UnreachedError(TransientError):
    """No try of the send reached the switch (no connection could be made, or 429 Too Many Requests, which the
    switch answers before processing): nothing was charged, so the charge is not one that may be out."""


@dataclass
class CircuitBreaker:
    """Closed -> open after ``threshold`` consecutive failures; half-open (one trial call) after ``cooldown``."""

    name: str
    threshold: int = 5
    cooldown_seconds: float = 30.0
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    opened_at: float | None = None
    _trial_running: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def before_call(self) -> None:
        """Raise CircuitOpenError while open (and while a half-open trial is already running)."""
        with self._lock:
            if self.opened_at is None:
                return
            if self.clock() - self.opened_at < self.cooldown_seconds or self._trial_running:
                raise CircuitOpenError(f"circuit of connector {self.name!r} is open after {self.failures} failures")
            self._trial_running = True

    def success(self) -> None:
        """A call got an answer: close the circuit."""
        with self._lock:
            self.failures, self.opened_at, self._trial_running = 0, None, False

    def failure(self) -> None:
        """A call failed transiently: count it, open (or re-open) the circuit at the threshold."""
        with self._lock:
            self.failures += 1
            self._trial_running = False
            if self.failures >= self.threshold:
                self.opened_at = self.clock()

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open`` (for metrics and tests)."""
        if self.opened_at is None:
            return "closed"
        return "open" if self.clock() - self.opened_at < self.cooldown_seconds else "half-open"


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**(attempt-1))]."""
    ceiling = min(cap, base * 2 ** max(attempt - 1, 0))
    return (rng or random).uniform(0.0, ceiling)


class HttpConnector:
    """A payment switch's JSON API: bearer key, idempotency key, timeouts, retries with backoff, a breaker."""

    def __init__(
        self,
        name: str,
        base_url: str,
        api_key: str | None,
        *,
        timeout_seconds: float = 10.0,
        tries: int = 3,
        backoff_base: float = 0.2,
        backoff_cap: float = 2.0,
        send_context: bool = False,
        breaker: CircuitBreaker | None = None,
        client: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.name = name
        self.url = base_url.rstrip("/") + PAYMENTS_PATH
        self.api_key = api_key
        self.tries = tries
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.send_context = send_context
        self.wants_context = send_context  # the executor only builds the order's context when asked
        self.breaker = breaker or CircuitBreaker(name)
        self.client = client or httpx.Client(timeout=httpx.Timeout(timeout_seconds))
        self.sleep = sleep

    def _headers(self, idempotency_key: str | None = None) -> dict[str, str]:
        """Every call's headers: the client's name, the bearer token, and the call's idempotency key if it has one."""
        headers = {"User-Agent": "winback-executor/1"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def charge(self, request: ChargeRequest) -> ChargeResult:
        """POST the attempt; the same idempotency key on every try, so the switch charges at most once."""
        payload = request.payload(self.send_context)
        last_error = "no try made"
        reached = ""  # why an earlier try may have reached the switch (and charged); empty: none may have
        for attempt in range(1, self.tries + 1):
            try:
                self.breaker.before_call()
            except CircuitOpenError as exc:
                if not reached:
                    raise  # nothing was sent
                # An earlier try may have reached the switch: this is a lost answer, not a charge never sent.
                raise TransientError(_lost_answer(f"{last_error}; then {exc}", reached)) from None
            try:
                response = self.client.post(self.url, json=payload, headers=self._headers(request.idempotency_key))
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # no connection: nothing was sent
                last_error = f"cannot reach connector {self.name!r} at {self.url}: {type(exc).__name__}: {exc}"
            except httpx.TimeoutException as exc:
                last_error = reached = f"timeout calling connector {self.name!r}: {type(exc).__name__}"
            except httpx.TransportError as exc:
                last_error = f"cannot reach connector {self.name!r} at {self.url}: {type(exc).__name__}: {exc}"
                reached = last_error
            except BaseException:
                # Anything else (a garbled body, a bug) still ends the breaker's trial, or it would stay half-open.
                self.breaker.failure()
                raise
            else:
                if response.status_code < 500 and response.status_code != 429:
                    self.breaker.success()
                    return self._parse(response, request, after_lost_answer=bool(reached))
                last_error = f"connector {self.name!r} answered HTTP {response.status_code}"
                if response.status_code >= 500 and not reached:  # a 5xx may come after the charge
                    reached = last_error
            self.breaker.failure()
            if attempt < self.tries:
                self.sleep(backoff_delay(attempt, self.backoff_base, self.backoff_cap))
        if reached:
            raise TransientError(_lost_answer(last_error, reached))
        raise UnreachedError(last_error)

    def _parse(
        self, response: httpx.Response, request: ChargeRequest, *, after_lost_answer: bool = False
    ) -> ChargeResult:
        if response.status_code in (200, 201, 402):
            return ChargeResult.from_json(_json_object(response, self.name), request.connector)
        if response.status_code == 409 or after_lost_answer:
            # A 409: the key is the switch's already, under another body. After a try whose answer was lost: this
            # refusal may be of the re-try only. Either way, whatever was charged under the key is not known here.
            raise PermanentError(
                f"connector {self.name!r} refused the request with HTTP {response.status_code} "
                f"(what was charged under the key is unknown): {response.text[:200]}"
            )
        raise RefusedError(
            f"connector {self.name!r} refused the request with HTTP {response.status_code}: {response.text[:200]}"
        )

    def status(self, payment_id: str, connector: str) -> ChargeResult | None:
        """GET the payment by its processor payment id: its answer, or None when the switch says it never had it."""
        response = self._ask("GET", f"{self.url}/{quote(payment_id, safe='')}", None)
        if response.status_code == 404:
            if _error_code(response) == PAYMENT_NOT_FOUND:
                return None
            raise PermanentError(
                f"connector {self.name!r} cannot be asked about payment {payment_id!r}: HTTP 404 without "
                f"error code {PAYMENT_NOT_FOUND!r} ({response.text[:200]})"
            )
        if response.status_code != 200:
            raise PermanentError(
                f"connector {self.name!r} refused the status request for payment {payment_id!r} with HTTP "
                f"{response.status_code}: {response.text[:200]}"
            )
        body = _json_object(response, self.name)
        raw = str(body.get("status", "")).lower()
        if raw in {"pending", "processing"}:
            raise TransientError(f"connector {self.name!r} says payment {payment_id!r} is still {raw}")
        return ChargeResult.from_json(body, connector)

    def refund(self, request: RefundRequest) -> RefundResult:
        """POST a refund of the payment; the same idempotency key on every try, so the switch refunds at most once."""
        url = f"{self.url}/{quote(request.payment_id, safe='')}/refunds"
        response = self._ask("POST", url, request.payload(), request.idempotency_key)
        if response.status_code not in (200, 201):
            raise PermanentError(
                f"connector {self.name!r} refused the refund of payment {request.payment_id!r} with HTTP "
                f"{response.status_code}: {response.text[:200]}"
            )
        body = _json_object(response, self.name)
        raw = str(body.get("status", "")).lower()
        refund_id = None if body.get("refund_id") is None else str(body["refund_id"])
        if raw in {"succeeded", "success"}:
            return RefundResult("succeeded", refund_id)
        if raw in {"pending", "processing"}:
            return RefundResult("pending", refund_id)
        reason = body.get("error_message") or body.get("error_code") or f"status {body.get('status')!r}"
        raise PermanentError(
            f"connector {self.name!r} did not refund payment {request.payment_id!r}: {str(reason)[:200]}"
        )

    def _ask(
        self, method: str, url: str, payload: dict[str, Any] | None, idempotency_key: str | None = None
    ) -> httpx.Response:
        """One read or idempotent call, tried ``tries`` times through the breaker (timeouts, 5xx and 429 are tried
        again); the first answer that is not one of those. TransientError when none came."""
        sent = self._headers(idempotency_key)
        last_error = "no try made"
        for attempt in range(1, self.tries + 1):
            self.breaker.before_call()
            try:
                response = self.client.request(method, url, json=payload, headers=sent)
            except httpx.TransportError as exc:
                last_error = f"calling connector {self.name!r} at {url}: {type(exc).__name__}: {exc}"
            except BaseException:
                self.breaker.failure()
                raise
            else:
                if response.status_code < 500 and response.status_code != 429:
                    self.breaker.success()
                    return response
                last_error = f"connector {self.name!r} answered HTTP {response.status_code} at {url}"
            self.breaker.failure()
            if attempt < self.tries:
                self.sleep(backoff_delay(attempt, self.backoff_base, self.backoff_cap))
        raise TransientError(last_error)

    def close(self) -> None:
        """Close the HTTP client."""
        self.client.close()


def _json_object(response: httpx.Response, name: str) -> dict[str, Any]:
    """The answer's JSON object; PermanentError when it is not one."""
    try:
        body = response.json()
    except ValueError:
        raise PermanentError(f"connector {name!r} answered a body that is not JSON") from None
    if not isinstance(body, dict):
        raise PermanentError(f"connector {name!r} answered JSON that is not an object")
    return body


def _error_code(response: httpx.Response) -> str | None:
    """``error.code`` (or a top-level ``code``) of an error answer, when it is JSON."""
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    code = error.get("code") if isinstance(error, dict) else body.get("code")
    return None if code is None else str(code)


def _lost_answer(last_error: str, reached: str) -> str:
    """The error of a send whose answer was lost after a try that may have charged: it must not read as never sent
    (an operator answering for the charge reads it)."""
    if last_error == reached:
        return f"{last_error} (the payment may have been charged)"
    return f"{last_error}; an earlier try may have been charged ({reached})"


class ConnectorRegistry:
    """The connector of each (merchant, connector name), built on first use from the merchant config.

    A connector without an endpoint in the config uses the sandbox at ``sandbox_url`` when one is set.
    Breakers are per (merchant, connector) and live as long as the registry (one per worker process).
    """

    def __init__(
        self,
        endpoints: Mapping[str, Mapping[str, ConnectorEndpoint]],
        env: Mapping[str, str],
        sandbox_url: str | None,
        overrides: Mapping[str, Connector] | None = None,
    ) -> None:
        self.endpoints = endpoints
        self.env = env
        self.sandbox_url = sandbox_url
        self.overrides = dict(overrides or {})
        self._built: dict[tuple[str, str], Connector] = {}
        self._lock = threading.Lock()

    def get(self, merchant_id: str, connector: str) -> Connector:
        """The connector to use; PermanentError names what is missing."""
        if connector in self.overrides:
            return self.overrides[connector]
        if "*" in self.overrides:
            return self.overrides["*"]
        # Connector names are one connector trimmed and in any case, as the rules and the merchant config read them:
        # a decision spells its connector as the caller's available_connectors do ("Adyen"), the config may not.
        key = (merchant_id, connector_key(connector))
        with self._lock:
            found = self._built.get(key)
            if found is None:
                found = self._build(merchant_id, connector)
                self._built[key] = found
            return found

    def _endpoint(self, merchant_id: str, connector: str) -> ConnectorEndpoint | None:
        """The merchant's ``connector_endpoints`` entry for ``connector`` (its name trimmed and in any case)."""
        configured = self.endpoints.get(merchant_id, {})
        endpoint = configured.get(connector)
        if endpoint is None:
            wanted = connector_key(connector)
            endpoint = next((found for name, found in configured.items() if connector_key(name) == wanted), None)
        return endpoint

    def unrouted(self, merchant_id: str, connectors: Iterable[str]) -> list[str]:
        """Those of ``connectors`` a charge cannot reach: no endpoint entry (or a sandbox one without base_url) and
        no sandbox configured. Each silent retry through one is dead-lettered when it is sent."""
        if self.overrides:
            return []
        unreachable = []
        for connector in connectors:
            endpoint = self._endpoint(merchant_id, connector)
            if (endpoint is None or endpoint.kind == "sandbox") and not self._sandbox(endpoint):
                unreachable.append(connector)
        return unreachable

    def _sandbox(self, endpoint: ConnectorEndpoint | None) -> str | None:
        """Where the charges of a connector without an endpoint, or with a sandbox one, go (None: nowhere)."""
        return (endpoint.base_url if endpoint is not None else None) or self.sandbox_url

    def _build(self, merchant_id: str, connector: str) -> Connector:
        endpoint = self._endpoint(merchant_id, connector)
        if endpoint is None or endpoint.kind == "sandbox":
            url = self._sandbox(endpoint)
            if not url:
                raise PermanentError(
                    f"merchant {merchant_id!r} has no connector_endpoints entry for {connector!r} "
                    "and no sandbox is configured (WINBACK_SANDBOX_URL)"
                )
            return HttpConnector(connector, url, None, send_context=True)
        api_key = None
        if endpoint.api_key_env:
            api_key = self.env.get(endpoint.api_key_env)
            if not api_key:
                raise PermanentError(
                    f"merchants.{merchant_id}.connector_endpoints.{connector}.api_key_env: "
                    f"environment variable {endpoint.api_key_env} is not set"
                )
        assert endpoint.base_url is not None  # the config validator requires it for kind http
        return HttpConnector(connector, endpoint.base_url, api_key, timeout_seconds=endpoint.timeout_seconds)

    def close(self) -> None:
        """Close the HTTP clients of the connectors built so far."""
        with self._lock:
            for connector in self._built.values():
                closer = getattr(connector, "close", None)
                if closer is not None:
                    closer()
            self._built.clear()
