"""Hard rules (network, regulatory, merchant) as data, and the pure function that applies them.

API STUB written by the lead: the rules helper replaces the bodies, keeping these names and signatures.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from model.catalog import ErrorCatalog
from model.merchant_config import MerchantConfig
from model.requests import DecisionRequest
from model.vocab import Action, Channel, Strategy


@dataclass(frozen=True)
class Candidate:
    """One concrete next action the policy may take."""

    action: Action
    execute_at: datetime  # UTC, >= request.event_time
    strategy: Strategy | None = None  # retry only
    connector: str | None = None  # retry only
    channel: Channel | None = None  # retarget only


@dataclass(frozen=True)
class RuleVerdict:
    candidate: Candidate
    allowed: bool
    broken: tuple[str, ...]  # names of the rules that forbid it, e.g. "visa_category_1", "quiet_hours"


@dataclass(frozen=True)
class RuleContext:
    """Everything the rules need to know about a request, computed once (catalog lookups, counts, windows)."""

    request: DecisionRequest
    merchant: MerchantConfig
    rules_applied: tuple[str, ...]  # rules that constrain this request, e.g. "max_retries:3", "visa_category:2"


def build_context(request: DecisionRequest, merchant: MerchantConfig, catalog: ErrorCatalog) -> RuleContext:
    raise NotImplementedError


def enumerate_candidates(context: RuleContext) -> list[Candidate]:
    """All concrete candidates on winback's grids (strategy x connector x delay, channel x send time, stop)."""
    raise NotImplementedError


def check(context: RuleContext, candidate: Candidate) -> RuleVerdict:
    """Judge one candidate against every hard rule. Pure; also used to audit any policy's actions."""
    raise NotImplementedError


def permitted(context: RuleContext, candidates: list[Candidate]) -> list[Candidate]:
    """The candidates no hard rule forbids; ``stop`` is always among them."""
    raise NotImplementedError
