"""Rule baselines: what a payment switch does without winback, as ``policy(request) -> Decision`` callables.

- ``StaticRetryPolicy``: a gateway-status-map rule. While the normalised error class is marked retryable in a
  static map (technical, do-not-honor, processor and configuration errors), cascade to the next connector of the
  pecking order that has not been tried; otherwise stop.
- ``StaticRetryThenRetargetPolicy``: the same, plus fixed-cadence retargeting. Once the cascade is exhausted, or
  at once for a failure the customer can fix (funds, card details, authentication, ...), send a payment link on
  the first allowed channel at the first allowed time of each cadence day, up to ``max_nudges``.

Both only ever choose among the candidates ``model.rules.permitted`` allows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import datetime
from typing import Protocol
from zoneinfo import ZoneInfo

from model.catalog import ErrorCatalog, load_catalog, normalise_request
from model.merchant_config import MerchantConfig
from model.requests import Decision, DecisionRequest
from model.rules import Candidate, RuleContext, build_context, check, enumerate_candidates, permitted
from model.vocab import Action, Strategy
from model.vocab import ErrorClass as E

#: Error classes a static gateway status map marks retryable (cascade to the next connector).
STATIC_RETRYABLE: frozenset[E] = frozenset(
    {E.ISSUER_TECHNICAL, E.PROCESSOR_TECHNICAL, E.DO_NOT_HONOR, E.CONFIGURATION, E.UNKNOWN}
)
#: Error classes the customer cannot fix with a payment link (merchant-side problems).
NOT_CUSTOMER_FIXABLE: frozenset[E] = frozenset({E.CONFIGURATION, E.DUPLICATE})


class Policy(Protocol):
    """Anything that answers a decision request: the learned policy, a baseline, the logging policy."""

    def __call__(self, request: DecisionRequest, /) -> Decision: ...


def decision_id(*parts: object) -> str:
    """A deterministic decision id ("dec_" + 24 hex digits) from the decision point's identity."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=12).hexdigest()
    return f"dec_{digest}"


def candidate_of(decision: Decision) -> Candidate:
    """The rules' view of a decision (what ``model.rules.check`` judges)."""
    retry = decision.action == Action.RETRY
    return Candidate(
        action=decision.action,
        execute_at=decision.execute_at,
        strategy=decision.strategy if retry else None,
        connector=decision.connector if retry else None,
        channel=decision.channel if decision.action == Action.RETARGET else None,
    )


class RuleBook:
    """The hard rules for a set of merchants, with the last request's context and candidates cached.

    A policy and the episode runner that audits it can share one RuleBook, so a decision point builds its rule
    context once. ``allowed`` judges only the candidates a rule policy is interested in: the same verdicts as
    ``model.rules.permitted`` on the full grid, at a fraction of the cost.
    """

    def __init__(self, merchants: Mapping[str, MerchantConfig], catalog: ErrorCatalog | None = None) -> None:
        self.merchants = dict(merchants)
        self.catalog = catalog or load_catalog()
        self._request: DecisionRequest | None = None
        self._context: RuleContext | None = None
        self._candidates: list[Candidate] | None = None
        self._permitted: list[Candidate] | None = None
        self._failure_key: tuple[object, object] | None = None
        self._error_class = E.UNKNOWN

    def merchant(self, request: DecisionRequest) -> MerchantConfig:
        try:
            return self.merchants[request.merchant_id]
        except KeyError:
            raise KeyError(f"no merchant config for merchant_id {request.merchant_id!r}") from None

    def context(self, request: DecisionRequest) -> RuleContext:
        """The rule context of ``request`` (built once per request object)."""
        if self._request is not request or self._context is None:
            self._context = build_context(request, self.merchant(request), self.catalog)
            self._request = request
            self._candidates = None
            self._permitted = None
        return self._context

    def candidates(self, request: DecisionRequest) -> tuple[RuleContext, list[Candidate]]:
        """The rule context and every candidate on the rules' grid (not yet filtered)."""
        context = self.context(request)
        if self._candidates is None:
            self._candidates = enumerate_candidates(context)
        return context, self._candidates

    def permitted(self, request: DecisionRequest) -> tuple[RuleContext, list[Candidate]]:
        """The rule context and all permitted candidates of ``request`` (computed once per request object)."""
        context, candidates = self.candidates(request)
        if self._permitted is None:
            self._permitted = permitted(context, candidates)
        return context, self._permitted

    @staticmethod
    def allowed(context: RuleContext, candidate: Candidate) -> bool:
        """Whether no hard rule forbids ``candidate``."""
        return check(context, candidate).allowed

    def audit(self, request: DecisionRequest, decision: Decision) -> tuple[str, ...]:
        """Names of the hard rules ``decision`` breaks (empty when it is allowed)."""
        verdict = check(self.context(request), candidate_of(decision))
        return () if verdict.allowed else verdict.broken or ("unnamed_rule",)

    def error_class(self, request: DecisionRequest) -> E:
        """The normalised class of the request's failure (cached while the failure stays the same)."""
        key = (request.failure, request.payment)
        if self._failure_key is None or self._failure_key[0] is not key[0] or self._failure_key[1] is not key[1]:
            self._error_class = normalise_request(self.catalog, request).error_class
            self._failure_key = key
        return self._error_class


def make_decision(
    request: DecisionRequest,
    context: RuleContext,
    candidate: Candidate,
    *,
    model_version: str,
    retryable: bool,
    propensity: float = 1.0,
    reasons: list[str] | None = None,
    salt: str = "",
) -> Decision:
    """A full ``Decision`` for a chosen candidate (baselines carry no calibrated probabilities: they are 0)."""
    history = request.history
    return Decision(
        decision_id=decision_id(
            salt,
            request.merchant_id,
            request.order_id,
            request.event_time.isoformat(),
            len(history.attempts),
            len(history.nudges),
        ),
        model_version=model_version,
        action=candidate.action,
        strategy=candidate.strategy,
        connector=candidate.connector,
        channel=candidate.channel,
        execute_at=candidate.execute_at,
        retryable=retryable,
        retry_probability=0.0,
        expected_success=0.0,
        propensity=propensity,
        alternatives=[],
        reasons=reasons or [],
        rules_applied=list(context.rules_applied),
    )


def _first_allowed(context: RuleContext, options: list[Candidate]) -> Candidate | None:
    """The earliest of ``options`` that no hard rule forbids."""
    for candidate in sorted(options, key=lambda c: c.execute_at):
        if check(context, candidate).allowed:
            return candidate
    return None


def _stop(request: DecisionRequest, candidates: list[Candidate]) -> Candidate:
    if candidates and candidates[-1].action == Action.STOP:  # where the rules' grid puts it
        return candidates[-1]
    for candidate in candidates:
        if candidate.action == Action.STOP:
            return candidate
    return Candidate(action=Action.STOP, execute_at=request.event_time)


class StaticRetryPolicy:
    """Cascade along the pecking order while the error class is statically retryable, else stop."""

    model_version = "baseline-static"

    def __init__(
        self,
        merchants: Mapping[str, MerchantConfig] | None = None,
        catalog: ErrorCatalog | None = None,
        *,
        rulebook: RuleBook | None = None,
    ) -> None:
        if rulebook is None:
            if merchants is None:
                raise ValueError("StaticRetryPolicy needs merchants or a rulebook")
            rulebook = RuleBook(merchants, catalog)
        self.rulebook = rulebook

    def choose(self, request: DecisionRequest) -> tuple[RuleContext, Candidate, bool, list[str]]:
        """The rule's candidate for ``request``: (context, candidate, retryable, reasons)."""
        context, candidates = self.rulebook.candidates(request)
        error_class = self.rulebook.error_class(request)
        retryable = error_class in STATIC_RETRYABLE
        if retryable:
            cascade = self._cascade(request, context, candidates)
            if cascade is not None:
                return context, cascade, True, [f"{error_class} is retryable: cascade to {cascade.connector}"]
            return context, _stop(request, candidates), True, ["cascade exhausted"]
        return context, _stop(request, candidates), False, [f"{error_class} is not retryable"]

    def _cascade(self, request: DecisionRequest, context: RuleContext, candidates: list[Candidate]) -> Candidate | None:
        tried = {a.connector for a in request.history.attempts} | {request.failure.connector}
        for connector in context.connector_order:  # available_connectors, else the merchant's pecking order
            if connector in tried:
                continue
            options = [
                c
                for c in candidates
                if c.action == Action.RETRY and c.strategy == Strategy.CASCADE and c.connector == connector
            ]
            found = _first_allowed(context, options)
            if found is not None:
                return found
        return None

    def __call__(self, request: DecisionRequest) -> Decision:
        context, candidate, retryable, reasons = self.choose(request)
        return make_decision(
            request,
            context,
            candidate,
            model_version=self.model_version,
            retryable=retryable,
            reasons=reasons,
            salt=self.model_version,
        )


class StaticRetryThenRetargetPolicy(StaticRetryPolicy):
    """The static retry rule, then fixed-cadence payment links for what the customer can fix."""

    model_version = "baseline-static-retarget"

    def choose(self, request: DecisionRequest) -> tuple[RuleContext, Candidate, bool, list[str]]:
        context, candidate, retryable, reasons = super().choose(request)
        if candidate.action == Action.RETRY:
            return context, candidate, retryable, reasons
        error_class = self.rulebook.error_class(request)
        if error_class in NOT_CUSTOMER_FIXABLE:
            return context, candidate, retryable, [*reasons, f"{error_class} is not for the customer to fix"]
        nudge = self._cadence_nudge(request, context, self.rulebook.candidates(request)[1])
        if nudge is None:
            return context, candidate, retryable, [*reasons, "no cadence day left for a payment link"]
        return context, nudge, retryable, [*reasons, f"payment link by {nudge.channel} on the cadence"]

    def _cadence_nudge(
        self, request: DecisionRequest, context: RuleContext, candidates: list[Candidate]
    ) -> Candidate | None:
        merchant = context.merchant
        if len(request.history.nudges) >= merchant.retarget.max_nudges:
            return None
        options = [c for c in candidates if c.action == Action.RETARGET]
        if not options:
            return None
        tz = merchant.retarget.quiet_hours.timezone
        first = request.history.attempts[0].created_at if request.history.attempts else request.event_time
        step = merchant.retarget.skip_days + 1
        nudges = request.history.nudges
        target = _local_day(nudges[-1].sent_at, first, tz) + step if nudges else 0
        for channel in merchant.retarget.channels:
            eligible = [c for c in options if c.channel == channel and _local_day(c.execute_at, first, tz) >= target]
            found = _first_allowed(context, eligible)
            if found is not None:
                return found
        return None


def _local_day(moment: datetime, first: datetime, tz: str) -> int:
    """Cadence day of ``moment``: calendar days after the first failure, in the merchant's timezone."""
    zone = ZoneInfo(tz)
    return (moment.astimezone(zone).date() - first.astimezone(zone).date()).days
