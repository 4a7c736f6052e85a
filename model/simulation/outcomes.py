"""The outcome model: how failures arise and look, whether a retry or a payment link succeeds, how nudges land.

``OutcomeModel`` is the single place where the world decides outcomes. Episodes use it with the latent truth of
an order; ``sandbox_attempt`` answers a lone attempt from a decision request alone (it samples a latent cause
consistent with the observed error), so a sandbox connector can answer from the same model.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from model.catalog import CatalogCode, ErrorCatalog, normalise_request
from model.merchant_config import MerchantConfig
from model.requests import DecisionRequest
from model.simulation.params import CAUSES, TECHNICAL_CAUSES, UNSEEN_CODES, WorldParams
from model.simulation.world import (
    Instrument,
    Latent,
    ObservedError,
    SimCustomer,
    from_ts,
    mix_seed,
    pick,
    to_ts,
    zone,
)
from model.vocab import RETRY_STRATEGIES, Channel, Strategy
from model.vocab import ErrorClass as E

if TYPE_CHECKING:
    from model.simulation.world import World

_DAY = 86400.0
_HOUR = 3600.0
_NO_NETWORK_CODE = frozenset({E.PROCESSOR_TECHNICAL, E.CONFIGURATION, E.DUPLICATE})
_COUNTRY_TZ = {
    "IN": "Asia/Kolkata",
    "US": "America/New_York",
    "CA": "America/Toronto",
    "GB": "Europe/London",
    "IE": "Europe/Dublin",
    "DE": "Europe/Berlin",
    "FR": "Europe/Paris",
    "AE": "Asia/Dubai",
    "SG": "Asia/Singapore",
}


@dataclass(frozen=True)
class AttemptResult:
    """One attempt's outcome: success, or the connector's error; ``p_success`` is what the model gave it."""

    success: bool
    error: ObservedError | None
    p_success: float


def family_of(payment_method: str, payment_method_type: str | None) -> str:
    """The method family (a key of the cause mix) of a contract payment method."""
    if payment_method == "upi_autopay" or (payment_method == "upi" and payment_method_type == "mandate"):
        return "upi_autopay"
    if payment_method == "upi":
        return "upi_collect"
    if payment_method == "card":
        return "card"
    return "wallet"


def in_quiet_hours(config: MerchantConfig, ts: float, timezone: str | None = None) -> bool:
    """Whether ``ts`` falls inside the merchant's quiet hours' clock times in ``timezone`` (default: the merchant's
    own). The world's customers mind a message by their own clock: a message at 01:00 in Los Angeles annoys its
    reader as much whether the merchant's 01:00 is in New York or Mumbai."""
    quiet = config.retarget.quiet_hours
    local = from_ts(ts).astimezone(zone(timezone or quiet.timezone))
    minute = local.hour * 60 + local.minute
    start, end = quiet.start_minute, quiet.end_minute
    if start <= end:
        return start <= minute < end
    return minute >= start or minute < end


@dataclass
class Vocabulary:
    """Each connector's error vocabulary from the catalog, plus made-up codes the catalog has never seen."""

    catalog: ErrorCatalog
    params: WorldParams
    _codes: dict[tuple[str, E], list[CatalogCode]] = field(default_factory=dict)
    _network_codes: dict[tuple[str, E, str], list[CatalogCode]] = field(default_factory=dict)
    _unseen: dict[tuple[str, E], list[tuple[str, str]]] = field(default_factory=dict)

    def codes(self, source: str, error_class: E) -> list[CatalogCode]:
        key = (source, error_class)
        found = self._codes.get(key)
        if found is None:
            try:
                found = list(self.catalog.codes(source, error_class))
            except KeyError:
                found = []
            self._codes[key] = found
        return found

    def network_codes(self, source: str, error_class: E, card_network: str | None) -> list[CatalogCode]:
        """The codes of a network table (ISO 8583, NPCI) a card of ``card_network`` can be declined with.

        A row with a ``card_network`` is that network's own meaning of its code (Mastercard's 65, Visa's 5C): only
        that network's cards get it. Rows shared by the networks go to every card.
        """
        key = (source, error_class, (card_network or "").casefold())
        found = self._network_codes.get(key)
        if found is None:
            found = [
                c
                for c in self.codes(source, error_class)
                if c.card_network is None or c.card_network.casefold() == key[2]
            ]
            self._network_codes[key] = found
        return found

    def unseen(self, connector: str, error_class: E) -> list[tuple[str, str]]:
        key = (connector, error_class)
        found = self._unseen.get(key)
        if found is None:
            found = [
                (code, message)
                for code, message in UNSEEN_CODES.get(error_class, ())
                if not self.catalog.normalise(connector, code, message).known_code
            ]
            self._unseen[key] = found
        return found


class OutcomeModel:
    """P(success | latent cause, strategy, connector, timing, ...), the observed errors, and nudge responses."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.params = world.params
        self.health = world.health
        self.affinity = world.affinity
        self.vocab = Vocabulary(world.catalog, world.params)
        self._mix_cache: dict[tuple[str, bool], list[tuple[E, float]]] = {}

    # -- failures and how they look ----------------------------------------------------------------------

    def cause_mix(self, family: str, recurring: bool) -> list[tuple[E, float]]:
        """The latent-cause mix of a method family (recurring or not), as ``(cause, weight)`` pairs."""
        key = (family, recurring)
        mix = self._mix_cache.get(key)
        if mix is None:
            table = self.params.cause_mix.get(key) or self.params.cause_mix.get((family, not recurring))
            if table is None:
                table = self.params.cause_mix[("card", recurring)]
            mix = [(c, w) for c, w in table.items() if w > 0]
            self._mix_cache[key] = mix
        return mix

    def sample_cause(
        self, rng: random.Random, instrument: Instrument, connector: str, ts: float, *, technical: bool = True
    ) -> E:
        """The latent cause of a failure on ``connector`` at ``ts`` (incidents make technical causes likelier)."""
        rate = self.health.failure_rate(connector, ts)
        weighted: list[tuple[E, float]] = []
        for cause, w in self.cause_mix(instrument.family, instrument.is_recurring):
            if cause in TECHNICAL_CAUSES and not technical:
                continue
            if cause == E.PROCESSOR_TECHNICAL:
                w *= 1.0 + 40.0 * rate
            elif cause == E.TOKEN_FAILURE and not instrument.is_network_token:
                continue
            elif cause == E.AUTHENTICATION_REQUIRED and instrument.authentication_type == "three_ds":
                w *= 0.3
            weighted.append((cause, w))
        return pick(rng, weighted)

    def sample_latent(self, rng: random.Random, cause: E, ts: float, customer: SimCustomer, connector: str) -> Latent:
        """The hidden state that decides how a failure with this cause can recover."""
        latent = Latent(cause=cause, failed_at=ts)
        if cause == E.INSUFFICIENT_FUNDS:
            u = rng.random()
            payday = self.world.funds_back_at(customer, ts, rng)
            if u < 0.1:
                latent.funds_at = math.inf  # the money does not come back in time
            elif u < 0.4:
                latent.funds_at = min(payday, ts + rng.expovariate(1 / (3 * _DAY)))
            else:
                latent.funds_at = payday
        elif cause == E.LIMIT_EXCEEDED:
            local = from_ts(ts).astimezone(zone(customer.timezone))
            if rng.random() < 0.6:
                midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
                latent.reset_at = to_ts(midnight) + _DAY
            else:
                month = local.replace(day=28, hour=0, minute=0, second=0, microsecond=0)
                latent.reset_at = to_ts(month) + 4 * _DAY
                latent.reset_at = max(latent.reset_at, ts + _DAY)
        elif cause == E.ISSUER_TECHNICAL:
            latent.recover_at = ts + 40 * 60 * math.exp(rng.gauss(0.0, 1.0))
        elif cause == E.PROCESSOR_TECHNICAL:
            latent.tech_connector = connector
            ongoing = self.health.incident(connector, ts)
            if ongoing is not None:
                latent.recover_at = ongoing[0]
            else:
                latent.recover_at = ts + 10 * 60 * math.exp(rng.gauss(0.0, 1.0))
        elif cause == E.CONFIGURATION:
            latent.tech_connector = connector
        return latent

    def observe(self, rng: random.Random, cause: E, connector: str, instrument: Instrument) -> ObservedError:
        """What ``connector`` reports for a failure with this latent cause (noisy; sometimes an unseen code)."""
        p = self.params
        observed = pick(rng, list(p.observation_noise[cause].items()))
        code: CatalogCode | None = None
        known = True
        unseen = self.vocab.unseen(connector, observed) if rng.random() < p.unseen_code_share else []
        if unseen:
            error_code, message = unseen[rng.randrange(len(unseen))]
            known = False
        else:
            codes = self.vocab.codes(connector, observed)
            if not codes and observed not in _NO_NETWORK_CODE:
                # switches pass the network's own code through when they have none of their own
                source = "npci_upi" if instrument.family.startswith("upi") else "iso8583"
                codes = self.vocab.network_codes(source, observed, instrument.card_network)
            codes = codes or self.vocab.codes(connector, E.DO_NOT_HONOR)
            if codes:
                code = codes[rng.randrange(len(codes))]
                error_code, message = code.code, code.message
            else:
                error_code, message, known = "declined", "The payment was declined.", False
        network_code: str | None = None
        if instrument.is_card and observed not in _NO_NETWORK_CODE:
            if code is not None and code.network_decline_code:
                network_code = code.network_decline_code
            elif rng.random() < 0.85:
                iso = self.vocab.network_codes("iso8583", observed, instrument.card_network)
                network_code = iso[rng.randrange(len(iso))].code if iso else None
        elif instrument.family.startswith("upi") and observed not in _NO_NETWORK_CODE:
            if code is not None and code.network_decline_code:
                network_code = code.network_decline_code
            else:
                npci = self.vocab.codes("npci_upi", observed)
                network_code = npci[rng.randrange(len(npci))].code if npci else None
        advice: str | None = None
        if instrument.card_network == "mastercard":
            u = rng.random()
            for mac, prob in p.mac_on_mastercard.get(cause, ()):
                u -= prob
                if u < 0:
                    advice = mac
                    break
        return ObservedError(observed, error_code, message, network_code, advice, known)

    # -- silent retries -----------------------------------------------------------------------------------

    def resolved(self, latent: Latent, connector: str, ts: float) -> bool:
        """Whether a technical cause no longer stands in the way of an attempt on ``connector`` at ``ts``."""
        if latent.cause == E.ISSUER_TECHNICAL:
            return ts >= latent.recover_at
        if latent.cause == E.PROCESSOR_TECHNICAL:
            return connector != latent.tech_connector or ts >= latent.recover_at
        if latent.cause == E.CONFIGURATION:
            return connector != latent.tech_connector
        return False

    def p_cause(
        self,
        latent: Latent,
        instrument: Instrument,
        strategy: Strategy,
        connector: str,
        ts: float,
        *,
        failed_connector: str,
        customer_timezone: str = "UTC",
    ) -> float:
        """P(success) from the latent cause alone: before connector health and the repeated-retry decay."""
        cause = latent.cause
        same = connector == failed_connector
        step_up = strategy == Strategy.STEP_UP and instrument.is_card and instrument.authentication_type != "three_ds"
        alt_net = strategy == Strategy.ALTERNATE_NETWORK and instrument.is_debit
        clear_pan = strategy == Strategy.CLEAR_PAN and instrument.is_network_token
        aff = self.affinity(instrument.issuer, connector)
        since = ts - latent.failed_at
        if cause == E.INSUFFICIENT_FUNDS:
            if ts >= latent.funds_at:
                return 0.55 if ts - latent.funds_at < 4 * _DAY else 0.35
            return 0.03 if since < _DAY else 0.05
        if cause == E.LIMIT_EXCEEDED:
            if ts >= latent.reset_at:
                return 0.5
            return 0.15 if alt_net else 0.03
        if cause == E.ISSUER_TECHNICAL:
            if ts >= latent.recover_at:
                p = 0.62
            elif alt_net:
                p = 0.3
            else:
                p = 0.06 if same else 0.42 * aff
            hour = from_ts(ts).astimezone(zone(customer_timezone)).hour
            return p * (0.85 if 1 <= hour < 5 else 1.0)
        if cause == E.PROCESSOR_TECHNICAL:
            return 0.85 if self.resolved(latent, connector, ts) else 0.05
        if cause == E.CONFIGURATION:
            return 0.6 if connector != latent.tech_connector else 0.02
        recurring = 0.7 if instrument.is_recurring else 1.0
        if cause == E.DO_NOT_HONOR:
            p = 0.07 if since > _DAY else 0.04
            if not same:
                p = max(p, 0.25 * aff)
            if step_up:
                p = max(p, 0.35 * recurring)
            if alt_net:
                p = max(p, 0.3)
            if clear_pan:
                p = max(p, 0.06)
            return p
        if cause == E.SUSPECTED_FRAUD:
            if step_up:
                return 0.3 * recurring
            return 0.02 if same else 0.08 * aff
        if cause == E.AUTHENTICATION_REQUIRED:
            return (0.6 if not instrument.is_recurring else 0.45) if step_up else 0.03
        if cause == E.TOKEN_FAILURE:
            if clear_pan:
                return 0.7
            return 0.04 if same else 0.2
        if cause == E.HARD_DECLINE:
            return 0.003
        if cause == E.BAD_CARD_DATA:
            return 0.01
        if cause == E.CUSTOMER_CANCELLED:
            return 0.06
        return 0.05  # duplicate

    def p_retry(
        self,
        latent: Latent,
        instrument: Instrument,
        strategy: Strategy,
        connector: str,
        ts: float,
        *,
        failed_connector: str,
        prior_retries: int = 0,
        customer_timezone: str = "UTC",
    ) -> float:
        """P(a silent retry succeeds): cause x connector health at ``ts`` x the decay of repeated retries."""
        p = self.p_cause(
            latent,
            instrument,
            strategy,
            connector,
            ts,
            failed_connector=failed_connector,
            customer_timezone=customer_timezone,
        )
        p *= self.params.silent_retry_decay**prior_retries
        p *= 1.0 - self.health.failure_rate(connector, ts)
        return min(max(p, 0.0), 0.97)

    def attempt(
        self,
        rng: random.Random,
        latent: Latent,
        instrument: Instrument,
        customer: SimCustomer,
        strategy: Strategy,
        connector: str,
        ts: float,
        *,
        failed_connector: str,
        prior_retries: int = 0,
        p_cause: float | None = None,
    ) -> tuple[AttemptResult, Latent]:
        """Run one attempt: success, or an observed error and the (possibly changed) latent state.

        ``p_cause`` overrides the cause-level success probability (payment links use the customer's own odds).
        """
        rate = self.health.failure_rate(connector, ts)
        if p_cause is None:
            p_cause = (
                self.p_cause(
                    latent,
                    instrument,
                    strategy,
                    connector,
                    ts,
                    failed_connector=failed_connector,
                    customer_timezone=customer.timezone,
                )
                * self.params.silent_retry_decay**prior_retries
            )
        p_cause = min(max(p_cause, 0.0), 0.97)
        p_total = (1.0 - rate) * p_cause
        if rng.random() < rate:
            error = self.observe(rng, E.PROCESSOR_TECHNICAL, connector, instrument)
            return AttemptResult(False, error, p_total), latent
        if rng.random() < p_cause:
            return AttemptResult(True, None, p_total), latent
        if latent.cause in TECHNICAL_CAUSES and self.resolved(latent, connector, ts):
            # the fault is gone but the payment still failed: the issuer's own answer shows through
            cause = self.sample_cause(rng, instrument, connector, ts, technical=False)
            latent = self.sample_latent(rng, cause, ts, customer, connector)
        error = self.observe(rng, latent.cause, connector, instrument)
        return AttemptResult(False, error, p_total), latent

    # -- retargeting --------------------------------------------------------------------------------------

    @staticmethod
    def reachable(channel: Channel, customer: SimCustomer) -> bool:
        if channel in (Channel.SMS, Channel.WHATSAPP):
            return customer.phone_present
        if channel == Channel.EMAIL:
            return customer.email_present
        return customer.app_present

    def p_delivered(self, channel: Channel, customer: SimCustomer, opted_out: tuple[Channel, ...]) -> float:
        """P(the message reaches the customer): 0 for a missing or opted-out channel."""
        if channel in opted_out or not self.reachable(channel, customer):
            return 0.0
        return self.params.delivery.get(channel, 0.8)

    def p_click(
        self,
        channel: Channel,
        customer: SimCustomer,
        ts: float,
        *,
        prior_nudges: int,
        quiet: bool,
        brand: float = 1.0,
    ) -> float:
        """P(a delivered nudge is clicked within a day)."""
        p = self.params
        base = p.click_base.get(customer.country, p.click_base["_other"]).get(channel, 0.1)
        hour = from_ts(ts).astimezone(zone(customer.timezone)).hour
        value = base * p.hour_factor[hour] * p.nudge_decay**prior_nudges * customer.responsiveness * brand
        if quiet:
            value *= p.quiet_hours_click_factor
        return min(value, 0.9)

    def click_delay_hours(self, rng: random.Random, sent_ts: float, customer: SimCustomer) -> float | None:
        """Hours from sending to the click (None when it would come after the follow-up point)."""
        p = self.params
        delay = p.click_delay_median_hours * math.exp(rng.gauss(0.0, p.click_delay_sigma))
        local = from_ts(sent_ts + delay * _HOUR).astimezone(zone(customer.timezone))
        if local.hour < 6:  # asleep: the click waits for the morning
            delay += (7 - local.hour) + rng.random() * 2
        return delay if delay < 23.9 else None

    def p_pay_after_click(self, latent: Latent, ts: float) -> float:
        """P(the customer pays through the link | clicked), by latent cause and timing."""
        p = self.params
        before = p.pay_given_click_before_funds
        if latent.cause == E.INSUFFICIENT_FUNDS and ts < latent.funds_at:
            return before.get(E.INSUFFICIENT_FUNDS, 0.18)
        if latent.cause == E.LIMIT_EXCEEDED and ts < latent.reset_at:
            return before.get(E.LIMIT_EXCEEDED, 0.3)
        return p.pay_given_click.get(latent.cause, 0.5)

    # -- sandbox -------------------------------------------------------------------------------------------

    def sandbox_attempt(
        self,
        request: DecisionRequest,
        strategy: Strategy | str,
        connector: str,
        execute_at: datetime,
        seed: int = 0,
    ) -> AttemptResult:
        """Answer one attempt of the order described by ``request`` (for a sandbox connector).

        The latent cause is sampled from its posterior given the observed error (cause mix x observation
        noise), once per order and seed, so repeated attempts of one order tell a consistent story.
        """
        strategy = Strategy(strategy)
        payment = request.payment
        family = family_of(payment.payment_method, payment.payment_method_type)
        instrument = Instrument(
            family=family,
            payment_method=payment.payment_method,
            payment_method_type=payment.payment_method_type or "unknown",
            card_network=payment.card_network,
            issuer=payment.issuer,
            is_recurring=payment.is_recurring,
            authentication_type=payment.authentication_type,
            is_network_token=payment.is_network_token,
        )
        country = request.customer.country or "US"
        rng_latent = random.Random(mix_seed("sandbox-latent", seed, request.merchant_id, request.order_id))
        customer = SimCustomer(
            customer_id=request.customer.id,
            country=country,
            timezone=_COUNTRY_TZ.get(country, "UTC"),
            phone_present=request.customer.phone_present,
            email_present=request.customer.email_present,
            app_present=request.customer.app_present,
            opted_out=tuple(c for c in request.customer.opted_out_channels if isinstance(c, Channel)),
            payday_kind=pick(rng_latent, (("day_1", 0.4), ("last_working", 0.4), ("day_15", 0.2))),
            payday_phase=0,
            responsiveness=1.0,
            plan_index=0,
        )
        failure = request.failure
        observed = normalise_request(self.world.catalog, request).error_class
        posterior = [
            (cause, w * self.params.observation_noise[cause].get(observed, 0.0))
            for cause, w in self.cause_mix(family, payment.is_recurring)
        ]
        if sum(w for _, w in posterior) <= 0:
            posterior = self.cause_mix(family, payment.is_recurring)
        cause = pick(rng_latent, posterior)
        history = request.history.attempts
        first_ts = to_ts(history[0].created_at) if history else to_ts(request.event_time)
        latent = self.sample_latent(rng_latent, cause, first_ts, customer, failure.connector)
        prior = sum(1 for a in history if a.strategy in RETRY_STRATEGIES)
        rng = random.Random(mix_seed("sandbox-outcome", seed, request.order_id, len(history), strategy, connector))
        ts = to_ts(execute_at)
        p_override = self.p_pay_after_click(latent, ts) if strategy == Strategy.RETARGET_LINK else None
        result, _ = self.attempt(
            rng,
            latent,
            instrument,
            customer,
            strategy,
            connector,
            ts,
            failed_connector=failure.connector,
            prior_retries=prior,
            p_cause=p_override,
        )
        return result


__all__ = ["CAUSES", "AttemptResult", "OutcomeModel", "Vocabulary", "family_of", "in_quiet_hours"]
