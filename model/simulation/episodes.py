"""Episodes: play failed orders of the world against any policy, audit every action, and total the value.

A decision point is the initial failure, a failed attempt (at its ``created_at``), or an unanswered nudge (at
``sent_at + NUDGE_FOLLOW_UP_HOURS``). At each one the world builds the ``DecisionRequest`` a caller would send,
asks the policy, re-checks the answer with ``model.rules.check`` (a forbidden action is still executed, and
counted), and carries it out: a retry is an attempt at ``execute_at``; a retarget is a nudge at ``execute_at``,
maybe clicked, maybe followed by a ``retarget_link`` attempt; stop ends the order. Orders also end after a
success, at the merchant's retry window end, or after ``MAX_DECISIONS`` decisions.

Order ``i`` has the same customer, payment and initial failure under every policy (common random numbers); the
draws after that come from the order's own stream, so policies are compared on the same orders.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pandas as pd

from model.baselines import Policy, RuleBook
from model.history import ATTEMPT_COLUMNS, NUDGE_COLUMNS, STOP_COLUMNS
from model.requests import (
    Customer,
    DecisionRequest,
    Failure,
    History,
    HistoryAttempt,
    HistoryNudge,
    Payment,
)
from model.simulation.outcomes import in_quiet_hours
from model.simulation.world import Instrument, ObservedError, SimOrder, World, from_ts, to_ts
from model.vocab import NUDGE_FOLLOW_UP_HOURS, Action, Channel, Strategy

MAX_DECISIONS = 12
_ONE_SECOND = timedelta(seconds=1)

__all__ = [
    "MAX_DECISIONS",
    "EpisodeResult",
    "EpisodeTotals",
    "HistoryRecorder",
    "Policy",
    "first_failure_request",
    "play_order",
    "run_episodes",
]


@dataclass
class HistoryRecorder:
    """Collects attempts, nudges and stops rows in the files' column order."""

    attempts: list[tuple[Any, ...]] = field(default_factory=list)
    nudges: list[tuple[Any, ...]] = field(default_factory=list)
    stops: list[tuple[Any, ...]] = field(default_factory=list)

    def attempts_frame(self) -> pd.DataFrame:
        """The attempts table (contract column order and types)."""
        frame = pd.DataFrame.from_records(self.attempts, columns=list(ATTEMPT_COLUMNS))
        frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True)
        frame["attempt_number"] = frame["attempt_number"].astype("int64")
        frame["propensity"] = frame["propensity"].astype("float64")
        frame["amount"] = frame["amount"].astype("float64")
        return _strings(frame, _BOOL_ATTEMPT_COLUMNS, ("created_at", "attempt_number", "amount", "propensity"))

    def nudges_frame(self) -> pd.DataFrame:
        """The nudges table (contract column order and types)."""
        frame = pd.DataFrame.from_records(self.nudges, columns=list(NUDGE_COLUMNS))
        frame["sent_at"] = pd.to_datetime(frame["sent_at"], utc=True)
        frame["clicked_at"] = pd.to_datetime(frame["clicked_at"], utc=True)
        frame["propensity"] = frame["propensity"].astype("float64")
        return _strings(frame, ("delivered",), ("sent_at", "clicked_at", "propensity"))

    def stops_frame(self) -> pd.DataFrame:
        """The stops table (one row per stop decision; ``model.history.STOP_COLUMNS``)."""
        frame = pd.DataFrame.from_records(self.stops, columns=list(STOP_COLUMNS))
        frame["decided_at"] = pd.to_datetime(frame["decided_at"], utc=True)
        frame["attempt_number"] = frame["attempt_number"].astype("int64")
        frame["propensity"] = frame["propensity"].astype("float64")
        return _strings(frame, (), ("decided_at", "attempt_number", "propensity"))


_BOOL_ATTEMPT_COLUMNS = ("phone_present", "email_present", "is_recurring", "is_network_token")


def _strings(frame: pd.DataFrame, bools: tuple[str, ...], other: tuple[str, ...]) -> pd.DataFrame:
    for column in frame.columns:
        if column in bools:
            frame[column] = frame[column].astype("bool")
        elif column not in other:
            frame[column] = frame[column].astype("string")
    return frame


@dataclass(frozen=True)
class EpisodeTotals:
    """What a policy achieved over a set of orders (money in USD at the fixed planning rates)."""

    orders: int
    recovered_orders: int
    recovery_rate: float
    gmv_at_risk_usd: float
    recovered_gmv_usd: float
    retry_fees_usd: float
    message_costs_usd: float
    net_value_usd: float
    silent_retries: int
    link_attempts: int
    nudges_sent: int
    decisions: int
    rule_violations: int  # decisions that broke at least one hard rule
    violations_by_rule: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        """A flat dict (for tables and JSON)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class EpisodeResult:
    """Per-order rows, the totals, and (when recorded) the history the episodes wrote.

    The totals are also attributes of the result itself (``result.recovered_gmv_usd``, ...).
    """

    per_order: pd.DataFrame
    totals: EpisodeTotals
    attempts: pd.DataFrame | None = None
    nudges: pd.DataFrame | None = None
    stops: pd.DataFrame | None = None

    @property
    def orders(self) -> int:
        return self.totals.orders

    @property
    def recovered_orders(self) -> int:
        return self.totals.recovered_orders

    @property
    def recovery_rate(self) -> float:
        return self.totals.recovery_rate

    @property
    def recovered_gmv_usd(self) -> float:
        return self.totals.recovered_gmv_usd

    @property
    def retry_fees_usd(self) -> float:
        return self.totals.retry_fees_usd

    @property
    def message_costs_usd(self) -> float:
        return self.totals.message_costs_usd

    @property
    def net_value_usd(self) -> float:
        return self.totals.net_value_usd

    @property
    def nudges_sent(self) -> int:
        return self.totals.nudges_sent

    @property
    def silent_retries(self) -> int:
        return self.totals.silent_retries

    @property
    def decisions(self) -> int:
        return self.totals.decisions

    @property
    def rule_violations(self) -> int:
        return self.totals.rule_violations


def _customer(order: SimOrder, opted_out: list[Channel]) -> Customer:
    c = order.customer
    return Customer(
        id=c.customer_id,
        phone_present=c.phone_present,
        email_present=c.email_present,
        app_present=c.app_present,
        country=c.country,
        opted_out_channels=opted_out,
    )


def _payment(instrument: Instrument) -> Payment:
    return Payment(
        payment_method=instrument.payment_method,
        payment_method_type=instrument.payment_method_type,
        card_network=instrument.card_network,
        issuer=instrument.issuer,
        is_recurring=instrument.is_recurring,
        authentication_type=instrument.authentication_type,
        is_network_token=instrument.is_network_token,
    )


def _failure(connector: str, error: ObservedError) -> Failure:
    return Failure(
        connector=connector,
        error_code=error.error_code,
        error_message=error.error_message,
        network_decline_code=error.network_decline_code,
        merchant_advice_code=error.merchant_advice_code,
    )


class _Episode:
    """One order's play: its state, and the rows it writes."""

    def __init__(self, world: World, order: SimOrder, recorder: HistoryRecorder | None) -> None:
        self.world = world
        self.order = order
        self.recorder = recorder
        self.rng = random.Random(order.dynamics_seed)
        self.latent = order.latent
        self.opted_out: list[Channel] = list(order.customer.opted_out)
        self.customer_model = _customer(order, self.opted_out)
        self.payment_model = _payment(order.instrument)
        self.attempts: list[HistoryAttempt] = []
        self.nudges: list[HistoryNudge] = []
        self.failure = _failure(order.initial_connector, order.initial_error)
        self.last_connector = order.initial_connector
        self.last_attempt_at = order.first_failure_at
        self.silent_retries = 0
        self.link_attempts = 0
        self.fees = 0.0
        self.message_cost = 0.0
        self.recovered_at: datetime | None = None
        self.recovering_strategy: str | None = None
        self._attempt_row(
            order.first_failure_at,
            order.initial_connector,
            Strategy.INITIAL,
            order.instrument,
            None,
            order.initial_error,
            None,
            None,
        )

    # -- rows ------------------------------------------------------------------------------------------

    def _attempt_row(
        self,
        at: datetime,
        connector: str,
        strategy: Strategy,
        instrument: Instrument,
        nudge_id: str | None,
        error: ObservedError | None,
        decision_id: str | None,
        propensity: float | None,
    ) -> None:
        number = len(self.attempts) + 1
        status = "failure" if error is not None else "success"
        self.attempts.append(
            HistoryAttempt(
                attempt_number=number,
                connector=connector,
                strategy=strategy,
                status=status,
                error_code=error.error_code if error else None,
                created_at=at,
            )
        )
        self.last_attempt_at = at
        if self.recorder is None:
            return
        o = self.order
        c = o.customer
        self.recorder.attempts.append(
            (
                o.merchant.merchant_id,
                o.order_id,
                f"{o.order_id}_{number}",
                number,
                at,
                o.amount,
                o.currency,
                c.customer_id,
                c.phone_present,
                c.email_present,
                c.country,
                instrument.payment_method,
                instrument.payment_method_type,
                instrument.card_network,
                instrument.issuer,
                instrument.is_recurring,
                instrument.is_network_token,
                instrument.authentication_type,
                connector,
                str(strategy),
                nudge_id,
                status,
                error.error_code if error else None,
                error.error_message if error else None,
                error.network_decline_code if error else None,
                error.merchant_advice_code if error else None,
                None,
                decision_id,
                propensity,
            )
        )

    # -- the loop ----------------------------------------------------------------------------------------

    def request(self, event_time: datetime) -> DecisionRequest:
        o = self.order
        # the world's own values are valid by construction: skip re-validating them at every decision point
        return DecisionRequest.model_construct(
            merchant_id=o.merchant.merchant_id,
            order_id=o.order_id,
            event_time=event_time,
            amount=o.amount,
            currency=o.currency,
            customer=self.customer_model,
            payment=self.payment_model,
            failure=self.failure,
            history=History.model_construct(attempts=list(self.attempts), nudges=list(self.nudges)),
            available_connectors=list(o.merchant.config.connectors),
        )

    def play(self, policy: Policy, rulebook: RuleBook, violations: Counter[str]) -> tuple[int, int, str]:
        """Run the order to its end; returns (decisions, decisions that broke a rule, why it ended)."""
        o = self.order
        window_end = o.first_failure_at + timedelta(days=o.merchant.config.retarget.retry_window_days)
        event_time = o.first_failure_at
        decisions = broken_decisions = 0
        while True:
            if decisions >= MAX_DECISIONS:
                return decisions, broken_decisions, "decision_cap"
            if event_time > window_end:
                return decisions, broken_decisions, "window"
            request = self.request(event_time)
            decision = policy(request)
            decisions += 1
            broken = rulebook.audit(request, decision)
            if broken:
                broken_decisions += 1
                violations.update(broken)
            if decision.action == Action.STOP:
                if self.recorder is not None:  # a stop leaves no attempt or nudge: its own row keeps the decision
                    self.recorder.stops.append(
                        (
                            o.merchant.merchant_id,
                            o.order_id,
                            decision.decision_id,
                            event_time,
                            len(self.attempts),
                            decision.propensity,
                        )
                    )
                return decisions, broken_decisions, "stop"
            execute_at = max(decision.execute_at, event_time)
            if execute_at > window_end:
                return decisions, broken_decisions, "window"
            next_time = self.act(decision, execute_at)
            if next_time is None:
                return decisions, broken_decisions, "recovered"
            event_time = next_time

    def act(self, decision: Any, execute_at: datetime) -> datetime | None:
        """Carry out a retry or retarget ``decision`` at ``execute_at``: the next decision point, None once the
        order is recovered (or nothing follows)."""
        if decision.action == Action.RETRY:
            return self._retry(
                decision.strategy or Strategy.RETRY_SAME,
                decision.connector or self.last_connector,
                execute_at,
                decision.decision_id,
                decision.propensity,
            )
        return self._retarget(decision.channel or Channel.EMAIL, execute_at, decision.decision_id, decision.propensity)

    def _retry(
        self, strategy: Strategy, connector: str, execute_at: datetime, decision_id: str, propensity: float
    ) -> datetime | None:
        o = self.order
        at = max(execute_at, self.last_attempt_at + _ONE_SECOND)
        instrument = o.instrument
        if strategy == Strategy.STEP_UP and instrument.is_card:
            instrument = _replace(instrument, authentication_type="three_ds")
        elif strategy == Strategy.CLEAR_PAN:
            instrument = _replace(instrument, is_network_token=False)
        result, self.latent = self.world.outcomes.attempt(
            self.rng,
            self.latent,
            o.instrument,
            o.customer,
            strategy,
            connector,
            to_ts(at),
            failed_connector=self.last_connector,
            prior_retries=self.silent_retries,
        )
        self.silent_retries += 1
        self.fees += self.world.attempt_fee_usd(connector, strategy)
        self._attempt_row(at, connector, strategy, instrument, None, result.error, decision_id, propensity)
        return self._after_attempt(at, connector, strategy, result.error)

    def _after_attempt(
        self, at: datetime, connector: str, strategy: Strategy, error: ObservedError | None
    ) -> datetime | None:
        if error is None:
            self.recovered_at = at
            self.recovering_strategy = str(strategy)
            return None
        self.failure = _failure(connector, error)
        self.last_connector = connector
        return at

    def _retarget(self, channel: Channel, execute_at: datetime, decision_id: str, propensity: float) -> datetime | None:
        o = self.order
        world = self.world
        outcomes = world.outcomes
        rng = self.rng
        sent_ts = to_ts(execute_at)
        number = len(self.nudges) + 1
        nudge_id = f"{o.order_id}_n{number}"
        self.message_cost += world.message_cost_usd(channel, o.customer.country)
        delivered = rng.random() < outcomes.p_delivered(channel, o.customer, tuple(self.opted_out))
        clicked_at: datetime | None = None
        if delivered:
            quiet = in_quiet_hours(o.merchant.config, sent_ts, o.customer.timezone)  # the customer's own night
            p_click = outcomes.p_click(
                channel,
                o.customer,
                sent_ts,
                prior_nudges=len(self.nudges),
                quiet=quiet,
                brand=o.merchant.profile.brand,
            )
            if rng.random() < p_click:
                delay = outcomes.click_delay_hours(rng, sent_ts, o.customer)
                if delay is not None:
                    clicked_at = from_ts(sent_ts + delay * 3600.0).replace(microsecond=0)
            opt_out = world.params.nudge_opt_out + (world.params.quiet_hours_opt_out if quiet else 0.0)
            if rng.random() < opt_out and channel not in self.opted_out:
                self.opted_out.append(channel)
                self.customer_model = _customer(o, list(self.opted_out))
        self.nudges.append(
            HistoryNudge(channel=channel, sent_at=execute_at, delivered=delivered, clicked_at=clicked_at)
        )
        if self.recorder is not None:
            self.recorder.nudges.append(
                (
                    o.merchant.merchant_id,
                    o.order_id,
                    nudge_id,
                    execute_at,
                    str(channel),
                    f"{o.merchant.merchant_id}_payment_link_{channel}_v1",
                    delivered,
                    clicked_at,
                    decision_id,
                    propensity,
                )
            )
        follow_up = execute_at + timedelta(hours=NUDGE_FOLLOW_UP_HOURS)
        if clicked_at is None or rng.random() >= world.params.link_attempt_share:
            return follow_up
        at = max(clicked_at + timedelta(seconds=rng.randint(60, 600)), self.last_attempt_at + _ONE_SECOND)
        connector = o.merchant.config.connectors[0]
        instrument = o.instrument
        if instrument.is_card:
            instrument = _replace(instrument, authentication_type="three_ds", is_network_token=False)
        p_pay = outcomes.p_pay_after_click(self.latent, to_ts(at)) / world.params.link_attempt_share
        result, self.latent = outcomes.attempt(
            rng,
            self.latent,
            instrument,
            o.customer,
            Strategy.RETARGET_LINK,
            connector,
            to_ts(at),
            failed_connector=self.last_connector,
            p_cause=p_pay,
        )
        self.link_attempts += 1
        self.fees += world.attempt_fee_usd(connector, Strategy.RETARGET_LINK)
        self._attempt_row(
            at, connector, Strategy.RETARGET_LINK, instrument, nudge_id, result.error, decision_id, propensity
        )
        return self._after_attempt(at, connector, Strategy.RETARGET_LINK, result.error)


def _replace(instrument: Instrument, **changes: Any) -> Instrument:
    return dataclasses.replace(instrument, **changes)


def first_failure_request(world: World, order: SimOrder) -> DecisionRequest:
    """The decision request a caller sends at the order's first failure (its history: that one attempt).

    Built without validation, like every request the world makes (``model_dump`` it to send it).
    """
    return _Episode(world, order, None).request(order.first_failure_at)


def play_order(
    world: World,
    order: SimOrder,
    policy: Policy,
    rulebook: RuleBook,
    *,
    recorder: HistoryRecorder | None = None,
    violations: Counter[str] | None = None,
) -> dict[str, Any]:
    """Play one order against ``policy``; returns its per-order row (and records rows when given a recorder)."""
    episode = _Episode(world, order, recorder)
    counter: Counter[str] = violations if violations is not None else Counter()
    decisions, broken, end = episode.play(policy, rulebook, counter)
    amount_usd = world.order_value_usd(order.amount, order.currency)
    recovered = episode.recovered_at is not None
    error = order.initial_error
    return {
        "order_id": order.order_id,
        "merchant_id": order.merchant.merchant_id,
        "customer_id": order.customer.customer_id,
        "customer_country": order.customer.country,
        "currency": order.currency,
        "amount": order.amount,
        "amount_usd": amount_usd,
        "payment_method": order.instrument.payment_method,
        "payment_method_type": order.instrument.payment_method_type,
        "card_network": order.instrument.card_network,
        "is_recurring": order.instrument.is_recurring,
        "first_failure_at": order.first_failure_at,
        "initial_connector": order.initial_connector,
        "initial_cause": str(order.initial_cause),
        "initial_observed_class": str(error.observed_class),
        "initial_error_code": error.error_code,
        "initial_known_code": error.known_code,
        "recovered": recovered,
        "recovered_at": episode.recovered_at,
        "recovering_strategy": episode.recovering_strategy,
        "recovered_gmv_usd": amount_usd if recovered else 0.0,
        "decisions": decisions,
        "attempts": len(episode.attempts),
        "silent_retries": episode.silent_retries,
        "link_attempts": episode.link_attempts,
        "nudges": len(episode.nudges),
        "retry_fees_usd": episode.fees,
        "message_costs_usd": episode.message_cost,
        "rule_violations": broken,
        "end_reason": end,
    }


def totals_of(orders: pd.DataFrame, violations: Counter[str]) -> EpisodeTotals:
    """Totals over per-order rows."""
    n = len(orders)
    recovered = int(orders["recovered"].sum()) if n else 0
    gmv = float(orders["recovered_gmv_usd"].sum()) if n else 0.0
    fees = float(orders["retry_fees_usd"].sum()) if n else 0.0
    messages = float(orders["message_costs_usd"].sum()) if n else 0.0
    return EpisodeTotals(
        orders=n,
        recovered_orders=recovered,
        recovery_rate=recovered / n if n else 0.0,
        gmv_at_risk_usd=float(orders["amount_usd"].sum()) if n else 0.0,
        recovered_gmv_usd=gmv,
        retry_fees_usd=fees,
        message_costs_usd=messages,
        net_value_usd=gmv - fees - messages,
        silent_retries=int(orders["silent_retries"].sum()) if n else 0,
        link_attempts=int(orders["link_attempts"].sum()) if n else 0,
        nudges_sent=int(orders["nudges"].sum()) if n else 0,
        decisions=int(orders["decisions"].sum()) if n else 0,
        rule_violations=int(orders["rule_violations"].sum()) if n else 0,
        violations_by_rule=dict(sorted(violations.items())),
    )


def run_episodes(
    world: World,
    policy: Policy,
    n_orders: int,
    seed: int | None = None,
    *,
    first_order: int = 0,
    record: bool = False,
    rulebook: RuleBook | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> EpisodeResult:
    """Play orders ``first_order .. first_order + n_orders - 1`` of the world against ``policy``.

    ``seed`` (default: the world's) picks the world; the same seed gives every policy the same orders.
    ``record=True`` also returns the attempts, nudges and stops tables the episodes wrote. ``rulebook`` audits the
    actions (share the policy's own to build each rule context once). ``on_progress`` gets the number of
    orders done so far, every 500 orders.
    """
    if seed is not None and seed != world.seed:
        world = world.with_seed(seed)
    if rulebook is None:
        rulebook = getattr(policy, "rulebook", None) or RuleBook(world.configs, world.catalog)
    recorder = HistoryRecorder() if record else None
    violations: Counter[str] = Counter()
    rows = []
    for done, index in enumerate(range(first_order, first_order + n_orders), start=1):
        rows.append(play_order(world, world.order(index), policy, rulebook, recorder=recorder, violations=violations))
        if on_progress is not None and done % 500 == 0:
            on_progress(done)
    if on_progress is not None:
        on_progress(n_orders)
    orders = pd.DataFrame(rows)
    if not rows:
        orders = pd.DataFrame(
            columns=[
                "amount_usd",
                "recovered",
                "recovered_gmv_usd",
                "retry_fees_usd",
                "message_costs_usd",
                "silent_retries",
                "link_attempts",
                "nudges",
                "decisions",
                "rule_violations",
            ]
        )
    result = EpisodeResult(per_order=orders, totals=totals_of(orders, violations))
    if recorder is not None:
        result.attempts = recorder.attempts_frame()
        result.nudges = recorder.nudges_frame()
        result.stops = recorder.stops_frame()
    return result
