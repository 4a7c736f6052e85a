"""The simulated world's entities and latent state: merchants, customers, instruments, connector health, orders.

Everything is deterministic by seed and independent of how orders are chunked: order ``i`` of seed ``s`` is
drawn from its own ``random.Random`` seeded by a hash of ``(s, "order", i)``, a customer from a hash of
``(s, merchant, customer number)``, world-wide facts (connector incidents, issuer x connector affinity) from
hashes of ``(s, ...)``. Python's ``random.Random`` is used for the per-order scalar draws because it is an order
of magnitude cheaper per draw than a numpy Generator.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import cache
from typing import TypeVar
from zoneinfo import ZoneInfo

from model.catalog import ErrorCatalog, load_catalog

# The demo merchant config describes the simulated merchants (one source of truth for their rules).
from model.datafiles import DEMO_MERCHANTS_FILE
from model.merchant_config import MerchantConfig, load_config
from model.money import Economics, load_economics
from model.simulation.params import (
    COUNTRY_ZONE_SHARES,
    DEFAULT_BASE_TECH_FAILURE,
    ISSUERS,
    PAYDAYS,
    MerchantProfile,
    WorldParams,
)
from model.vocab import Channel, Strategy
from model.vocab import ErrorClass as E

_DAY = 86400.0
T = TypeVar("T")
_BIWEEKLY_ANCHOR = date(2026, 1, 2).toordinal()  # a Friday


def mix_seed(*parts: object) -> int:
    """A stable 64-bit seed from any parts (independent of PYTHONHASHSEED and of the process)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@cache
def zone(name: str) -> ZoneInfo:
    """A cached ZoneInfo."""
    return ZoneInfo(name)


def pick(rng: random.Random, weighted: Sequence[tuple[T, float]]) -> T:
    """One item of ``(item, weight)`` pairs, with probability proportional to its weight."""
    total = sum(w for _, w in weighted)
    u = rng.random() * total
    for item, w in weighted:
        u -= w
        if u < 0:
            return item
    return weighted[-1][0]


def to_ts(moment: datetime) -> float:
    return moment.timestamp()


def from_ts(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


# ---------------------------------------------------------------------------------------------------------
# Entities


@dataclass(frozen=True)
class SimCustomer:
    """A customer as the world sees them (some of it latent: payday, responsiveness)."""

    customer_id: str
    country: str
    timezone: str
    phone_present: bool
    email_present: bool
    app_present: bool
    opted_out: tuple[Channel, ...]
    payday_kind: str
    payday_phase: int  # biweekly paydays: which of the two Fridays
    responsiveness: float  # latent click propensity multiplier, mean about 1
    plan_index: int  # recurring merchants: which price the customer pays


@dataclass(frozen=True)
class Instrument:
    """The payment instrument of an order (the decision request's ``payment``)."""

    family: str  # "card", "upi_autopay", "upi_collect", "wallet"
    payment_method: str
    payment_method_type: str
    card_network: str | None
    issuer: str | None
    is_recurring: bool
    authentication_type: str
    is_network_token: bool

    @property
    def is_card(self) -> bool:
        return self.payment_method == "card"

    @property
    def is_debit(self) -> bool:
        return self.payment_method == "card" and self.payment_method_type == "debit"


@dataclass
class Latent:
    """The truth behind an order's failures; outcomes depend on it, the policy never sees it."""

    cause: E
    failed_at: float  # epoch seconds of the failure that revealed this cause
    funds_at: float = math.inf  # insufficient funds: when money is back on the account
    reset_at: float = math.inf  # limits: when the limit resets
    recover_at: float = math.inf  # technical causes: when the fault is gone
    tech_connector: str | None = None  # processor/configuration faults: the connector at fault


@dataclass(frozen=True)
class ObservedError:
    """What the connector reported for a failed attempt."""

    observed_class: E
    error_code: str
    error_message: str
    network_decline_code: str | None
    merchant_advice_code: str | None
    known_code: bool  # False for a code the catalog has never seen


@dataclass(frozen=True)
class SimMerchant:
    """A simulated merchant: its profile (world knobs) and its config (the rules winback applies)."""

    profile: MerchantProfile
    config: MerchantConfig

    @property
    def merchant_id(self) -> str:
        return self.profile.merchant_id

    @property
    def timezone(self) -> str:
        return self.config.retarget.quiet_hours.timezone


@dataclass
class SimOrder:
    """One failed order: who, what, how it failed first, and the latent truth."""

    index: int
    order_id: str
    merchant: SimMerchant
    customer: SimCustomer
    instrument: Instrument
    amount: float
    currency: str
    first_failure_at: datetime
    initial_connector: str
    latent: Latent
    initial_error: ObservedError
    dynamics_seed: int  # seeds the order's outcome draws after the initial failure

    @property
    def initial_cause(self) -> E:
        return self.latent.cause


# ---------------------------------------------------------------------------------------------------------
# Calendar helpers


def _last_working_day(year: int, month: int) -> date:
    nxt = date(year + (month == 12), month % 12 + 1, 1)
    day = nxt - timedelta(days=1)
    while day.weekday() >= 5:
        day -= timedelta(days=1)
    return day


def _working_day_on_or_before(day: date) -> date:
    while day.weekday() >= 5:
        day -= timedelta(days=1)
    return day


def is_payday(kind: str, phase: int, day: date) -> bool:
    """Whether ``day`` is a payday for this payday pattern (weekend paydays move to the Friday before)."""
    if kind == "last_working":
        return day == _last_working_day(day.year, day.month)
    if kind == "semi_monthly":
        mid = _working_day_on_or_before(date(day.year, day.month, 15))
        return day == mid or day == _last_working_day(day.year, day.month)
    if kind == "biweekly":
        return day.weekday() == 4 and (day.toordinal() - _BIWEEKLY_ANCHOR - 7 * phase) % 14 == 0
    if kind.startswith("day_"):
        nominal = int(kind[4:])
        return day == _working_day_on_or_before(date(day.year, day.month, nominal))
    raise ValueError(f"unknown payday pattern {kind!r}")


def next_payday(kind: str, phase: int, after: date) -> date:
    """The first payday strictly after ``after``."""
    day = after + timedelta(days=1)
    for _ in range(62):
        if is_payday(kind, phase, day):
            return day
        day += timedelta(days=1)
    raise ValueError(f"payday pattern {kind!r} has no payday within two months of {after}")


# ---------------------------------------------------------------------------------------------------------
# Connector health and issuer affinity


@dataclass
class ConnectorHealth:
    """Per-connector technical failure rate over time: a small base rate plus incidents lasting hours."""

    params: WorldParams
    seed: int
    _incidents: dict[str, tuple[list[float], list[float], list[float]]] = field(default_factory=dict)

    def _timeline(self, connector: str) -> tuple[list[float], list[float], list[float]]:
        timeline = self._incidents.get(connector)
        if timeline is None:
            rng = random.Random(mix_seed(self.seed, "incidents", connector))
            start = to_ts(self.params.start) - 30 * _DAY
            end = to_ts(self.params.start) + (self.params.span_days + 120) * _DAY
            starts: list[float] = []
            ends: list[float] = []
            severities: list[float] = []
            rate = self.params.incidents_per_connector_day / _DAY
            t = start + rng.expovariate(rate)
            low, high = self.params.incident_severity
            while t < end:
                hours = self.params.incident_median_hours * math.exp(rng.gauss(0.0, 0.9))
                hours = min(max(hours, 1 / 3), 12.0)
                starts.append(t)
                ends.append(t + hours * 3600.0)
                severities.append(rng.uniform(low, high))
                t = ends[-1] + rng.expovariate(rate)
            timeline = (starts, ends, severities)
            self._incidents[connector] = timeline
        return timeline

    def incident(self, connector: str, ts: float) -> tuple[float, float] | None:
        """``(end, severity)`` of the incident ongoing on ``connector`` at ``ts``, if any."""
        starts, ends, severities = self._timeline(connector)
        i = bisect.bisect_right(starts, ts) - 1
        if i >= 0 and ts < ends[i]:
            return ends[i], severities[i]
        return None

    def failure_rate(self, connector: str, ts: float) -> float:
        """P(an attempt on ``connector`` at ``ts`` fails for the connector's own technical reasons)."""
        base = self.params.base_tech_failure.get(connector, DEFAULT_BASE_TECH_FAILURE)
        # a gentle daily cycle: busier hours fail a little more
        base *= 1.0 + 0.3 * math.sin(2 * math.pi * ((ts / _DAY) % 1.0))
        ongoing = self.incident(connector, ts)
        if ongoing is not None:
            return max(base, ongoing[1])
        return base


@dataclass
class Affinity:
    """Issuer x connector affinity: some pairs approve more (lognormal multiplier with mean 1)."""

    sigma: float
    seed: int
    _cache: dict[tuple[str, str], float] = field(default_factory=dict)

    def __call__(self, issuer: str | None, connector: str) -> float:
        key = (issuer or "", connector)
        value = self._cache.get(key)
        if value is None:
            rng = random.Random(mix_seed(self.seed, "affinity", *key))
            value = math.exp(rng.gauss(0.0, self.sigma) - self.sigma**2 / 2)
            value = min(max(value, 0.5), 1.7)
            self._cache[key] = value
        return value


# ---------------------------------------------------------------------------------------------------------
# The world


class World:
    """The simulated world of one seed: merchants, customers, connectors, and the orders that failed.

    ``order(i)`` is a pure function of ``(seed, i)`` (and the number of orders, which sizes customer pools), so
    every policy meets the same customers, orders and initial failures (common random numbers).
    """

    def __init__(
        self,
        seed: int,
        params: WorldParams | None = None,
        merchants: Mapping[str, MerchantConfig] | None = None,
        catalog: ErrorCatalog | None = None,
        economics: Economics | None = None,
        expected_orders: int = 10_000,
    ) -> None:
        # the import is local to keep outcomes (which needs world's entities) importable on its own
        from model.simulation.outcomes import OutcomeModel

        self.seed = seed
        self.params = params or WorldParams()
        configs = dict(merchants) if merchants is not None else dict(load_config(DEMO_MERCHANTS_FILE).merchants)
        missing = [p.merchant_id for p in self.params.merchants if p.merchant_id not in configs]
        if missing:
            raise ValueError(
                f"simulated merchants {', '.join(missing)} have no merchant config "
                f"(add them to {DEMO_MERCHANTS_FILE.name} or pass merchants=)"
            )
        self.merchants: dict[str, SimMerchant] = {
            p.merchant_id: SimMerchant(p, configs[p.merchant_id]) for p in self.params.merchants
        }
        self.configs: dict[str, MerchantConfig] = {m: s.config for m, s in self.merchants.items()}
        self.catalog = catalog or load_catalog()
        self.economics = economics or load_economics()
        self.health = ConnectorHealth(self.params, seed)
        self.affinity = Affinity(self.params.affinity_sigma, seed)
        self.outcomes = OutcomeModel(self)
        self.expected_orders = max(int(expected_orders), 1)
        self._merchant_weights = [(s, s.profile.share) for s in self.merchants.values()]

    def with_seed(self, seed: int) -> World:
        """The same world (params, merchants, catalog, economics) with another seed."""
        return World(
            seed, self.params, self.configs, self.catalog, self.economics, expected_orders=self.expected_orders
        )

    # -- costs and money (exposed for policies and evaluation) --------------------------------------------

    def order_value_usd(self, amount: float, currency: str) -> float:
        """What an order is worth in USD, as the policy values it (model.money)."""
        return self.economics.order_value_usd(amount, currency)

    def attempt_fee_usd(self, connector: str, strategy: Strategy | str | None) -> float:
        """What one attempt through ``connector`` costs the merchant, in USD."""
        factor = self.params.connector_fee_factor.get(connector, 1.0)
        return self.economics.retry_cost(strategy) * factor

    def message_cost_usd(self, channel: Channel | str, country: str | None) -> float:
        """What one message costs, in USD."""
        return self.economics.message_cost(channel, country)

    # -- customers ----------------------------------------------------------------------------------------

    def _pool_size(self, merchant: SimMerchant) -> int:
        return max(20, int(self.expected_orders * merchant.profile.share * self.params.customer_pool_ratio))

    def customer(self, merchant: SimMerchant, number: int) -> SimCustomer:
        """Customer ``number`` of a merchant (the same person whenever their number comes up)."""
        p = self.params
        profile = merchant.profile
        rng = random.Random(mix_seed(self.seed, "customer", profile.merchant_id, number))
        if rng.random() < profile.foreign_share:
            country, tz = pick(rng, [((c, t), w) for c, t, w in profile.foreign_customers])
        else:
            country, tz = profile.country, merchant.timezone
        zones = COUNTRY_ZONE_SHARES.get(country)
        if zones is not None:  # its own stream: the customer's other traits stay those of the same seed
            tz = pick(random.Random(mix_seed(self.seed, "customer-zone", profile.merchant_id, number)), zones)
        phone = rng.random() < p.phone_present.get(country, p.phone_present["_other"])
        email = rng.random() < p.email_present.get(country, p.email_present["_other"])
        app = rng.random() < profile.has_app
        opted = tuple(ch for ch in Channel if rng.random() < p.opt_out_base.get(ch, 0.0))
        payday = pick(rng, PAYDAYS.get(country, PAYDAYS["_other"]))
        responsiveness = math.exp(rng.gauss(0.0, p.responsiveness_sigma) - p.responsiveness_sigma**2 / 2)
        plan = pick(rng, [(i, w) for i, (_, w) in enumerate(profile.amounts)])
        return SimCustomer(
            customer_id=f"cus_{profile.merchant_id.removeprefix('m_')}_{number}",
            country=country,
            timezone=tz,
            phone_present=phone,
            email_present=email,
            app_present=app,
            opted_out=opted,
            payday_kind=payday,
            payday_phase=rng.randrange(2),
            responsiveness=responsiveness,
            plan_index=plan,
        )

    def instrument(self, merchant: SimMerchant, customer: SimCustomer, slot: int) -> Instrument:
        """The customer's instrument number ``slot`` at this merchant."""
        profile = merchant.profile
        rng = random.Random(mix_seed(self.seed, "instrument", customer.customer_id, slot))
        method = pick(rng, [(m, m.share) for m in profile.methods])
        pm_type = pick(rng, method.payment_method_types)
        if method.family == "card":
            network = pick(rng, profile.card_networks)
            if network == "amex":
                pm_type, issuer = "credit", "American Express"
            else:
                issuer = pick(rng, ISSUERS.get(customer.country, ISSUERS["_other"]))
            three_ds = rng.random() < profile.three_ds_share
            token = rng.random() < profile.network_token_share
            return Instrument(
                family="card",
                payment_method="card",
                payment_method_type=pm_type,
                card_network=network,
                issuer=issuer,
                is_recurring=profile.recurring,
                authentication_type="three_ds" if three_ds else "no_three_ds",
                is_network_token=token,
            )
        upi_bank = pick(rng, ISSUERS["IN"]) if method.family.startswith("upi") else None
        return Instrument(
            family=method.family,
            payment_method=method.payment_method,
            payment_method_type=pm_type,
            card_network=None,
            issuer=upi_bank,
            is_recurring=profile.recurring,
            authentication_type="no_three_ds",
            is_network_token=False,
        )

    # -- orders -------------------------------------------------------------------------------------------

    def order_id(self, index: int) -> str:
        return f"ord_{self.seed}_{index:07d}"

    def order(self, index: int) -> SimOrder:
        """Failed order number ``index`` (0-based): a pure function of the seed and the index."""
        rng = random.Random(mix_seed(self.seed, "order", index))
        merchant = pick(rng, self._merchant_weights)
        profile = merchant.profile
        customer = self.customer(merchant, rng.randrange(self._pool_size(merchant)))
        instrument = self.instrument(merchant, customer, 0 if rng.random() < 0.85 else 1)
        if profile.recurring:
            amount = profile.amounts[customer.plan_index][0]
        else:
            median, sigma = profile.amounts[0]
            amount = median * math.exp(rng.gauss(0.0, sigma))
            amount = float(round(amount)) if profile.currency == "INR" else round(amount, 2)
        first = self._first_failure_time(rng, merchant, customer)
        connectors = merchant.config.connectors
        weights = list(profile.initial_connector_weights[: len(connectors)])
        weights += [0.0] * (len(connectors) - len(weights))
        connector = pick(rng, list(zip(connectors, weights, strict=True)))
        ts = to_ts(first)
        cause = self.outcomes.sample_cause(rng, instrument, connector, ts)
        latent = self.outcomes.sample_latent(rng, cause, ts, customer, connector)
        observed = self.outcomes.observe(rng, cause, connector, instrument)
        return SimOrder(
            index=index,
            order_id=self.order_id(index),
            merchant=merchant,
            customer=customer,
            instrument=instrument,
            amount=float(amount),
            currency=profile.currency,
            first_failure_at=first,
            initial_connector=connector,
            latent=latent,
            initial_error=observed,
            dynamics_seed=mix_seed(self.seed, "dynamics", index),
        )

    def _first_failure_time(self, rng: random.Random, merchant: SimMerchant, customer: SimCustomer) -> datetime:
        day = int(rng.random() * self.params.span_days)
        local_day = (self.params.start + timedelta(days=day)).date()
        if merchant.profile.recurring:
            # renewal billing runs in the merchant's early morning
            hour = min(max(rng.gauss(3.0, 1.5), 0.0), 23.99)
            tz = zone(merchant.timezone)
        else:
            hour = pick(rng, list(enumerate(self.params.hour_factor))) + rng.random()
            tz = zone(customer.timezone)
        local = datetime(local_day.year, local_day.month, local_day.day, tzinfo=tz) + timedelta(hours=hour)
        return local.astimezone(UTC).replace(microsecond=0)

    def funds_back_at(self, customer: SimCustomer, after_ts: float, rng: random.Random) -> float:
        """When an insufficient-funds customer's next salary lands (local early morning of the next payday)."""
        tz = zone(customer.timezone)
        local_day = from_ts(after_ts).astimezone(tz).date()
        payday = next_payday(customer.payday_kind, customer.payday_phase, local_day)
        landing = datetime(payday.year, payday.month, payday.day, 5, tzinfo=tz) + timedelta(hours=rng.uniform(0, 6))
        return landing.timestamp()

    def local_hour(self, ts: float, timezone: str) -> int:
        return from_ts(ts).astimezone(zone(timezone)).hour
