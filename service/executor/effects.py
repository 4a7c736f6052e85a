"""Performing the side effects of claimed actions: charges, status checks and refunds through connectors, nudges
through channels, and merchant webhooks. Every call carries the action's idempotency key, and the answer comes back
as an ``Outcome`` that ``Executor.complete`` records. What is written here, through the executor, is only what must
be durable before a call goes out or while it runs: the send mark of a charge or message (with the hard rules, the
pacing turn and the order's lock checked in the same transaction), its removal when the call certainly never left,
and the renewal of the claims of calls still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import httpx
import orjson
import sqlalchemy as sa
from sqlalchemy import RowMapping

from model.catalog import ErrorCatalog
from model.merchant_config import MerchantConfig
from model.money import format_amount
from model.rules import (
    Candidate,
    Rule,
    RuleContext,
    build_context,
    check,
    in_quiet_hours,
    quiet_hours_end,
    upi_off_peak_from,
)
from model.vocab import Action, Channel
from model.wording import utc_second
from service.executor.channels.base import ChannelAdapter, ChannelError, OutboundMessage
from service.executor.channels.templates import MessageVariables, link_expiry_text
from service.executor.connectors import (
    ChargeRequest,
    ChecksStatus,
    CircuitOpenError,
    Connector,
    ConnectorRegistry,
    PermanentError,
    RefundRequest,
    Refunds,
    RefusedError,
    TransientError,
    UnreachedError,
)
from service.executor.core import (
    CHARGE_KINDS,
    MESSAGE_CUSTOMER_PACED_TURN,
    MESSAGE_MAYBE_SENT_TRIES,
    MESSAGE_PACED_TURN,
    MESSAGE_WAITS_FOR_CHANNEL,
    PAYMENT_LINK_TEMPLATE,
    RECHECK,
    ActionRow,
    Charged,
    Defer,
    Delivered,
    Executor,
    NoEffect,
    NotSent,
    Outcome,
    Permanent,
    Refunded,
    Replan,
    Sent,
    Skip,
    StatusAnswered,
    Transient,
    nudge_id_for,
    retry_forbidden,
)
from service.executor.optouts import (
    address_hash,
    customer_address,
    is_opted_out,
    order_customer_address,
    unsubscribe_url,
)
from service.executor.outages import claim_probe
from service.executor.pacing import QUIET_HOURS_WAKE, pair_answered, pair_turn, release_turn
from service.executor.store import OPEN_ORDER_STATES, ActionKind, OrderState, actions, as_utc, webhook_deliveries
from service.executor.webhooks import post_webhook
from service.personal_data import mask_addresses_in

#: How long a charge waits for a connector whose circuit is open (its cool-down is 30 s by default).
CIRCUIT_WAIT = timedelta(seconds=30)
#: A charge's lease when none is configured (the executor's ``WINBACK_LEASE_SECONDS`` default).
DEFAULT_LEASE = timedelta(seconds=30)


def _turn_of(action: ActionRow, key: str) -> datetime | None:
    """The turn kept on message ``action`` under payload ``key`` (service/executor/pacing.py), if any."""
    given = action.payload.get(key)
    return None if given is None else as_utc(datetime.fromisoformat(str(given)))


def _wait_for_turn(action: ActionRow, key: str, turn: datetime, held: str, why: str) -> Defer:
    """A Defer of message ``action`` to its ``turn``, kept on it under payload ``key``: ``held`` is paced, ``why``."""
    reason = f"{held} is paced until {utc_second(turn)} (its turn): {why}"
    return Defer(turn, reason, payload=action.payload | {key: turn.isoformat()})


def unexpected_error(exc: BaseException) -> str:
    """What an action keeps of an unexpected exception (``last_error``: the order view and the console show it):
    its type and text, personal data masked. A database error quotes its statement's parameters (a message's
    address, the order's request with the customer's phone and e-mail), a library's error the value it refused."""
    return mask_addresses_in(f"{type(exc).__name__}: {exc}")


class ClaimKeeper:
    """Renews the claims of the charges that are out, from one thread per process: each claim every third of its
    lease (wall-clock time), each time to the executor's clock plus the lease, for as long as it is still this
    worker's. The claims due together are renewed in one transaction. A renewal that fails (the database away for
    a moment) is tried again after a thirtieth of the lease (at most a second), not a third, so a short outage
    does not let a claim lapse. A process that dies stops renewing, and its claims end one lease later, as any
    other."""

    @dataclass
    class _Kept:
        action: ActionRow
        lease: timedelta
        next_at: float  # time.monotonic() of the next renewal
        failing: bool = False  # the last renewal failed

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self._changed = threading.Condition()
        self._kept: dict[int, ClaimKeeper._Kept] = {}
        self._thread: threading.Thread | None = None
        self._closed = False

    @contextlib.contextmanager
    def keep(self, action: ActionRow, lease: timedelta) -> Iterator[None]:
        """Renew ``action``'s claim while the block runs."""
        kept = ClaimKeeper._Kept(action, lease, time.monotonic() + _renewal_beat(lease))
        with self._changed:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._renew, name="claim-keeper", daemon=True)
                self._thread.start()
            self._kept[id(kept)] = kept
            self._changed.notify()
        try:
            yield
        finally:
            with self._changed:
                self._kept.pop(id(kept), None)

    def close(self) -> None:
        """Stop renewing (the claims still out end one lease later)."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        if self._thread is not None:
            self._thread.join()

    def _renew(self) -> None:
        while True:
            with self._changed:
                if self._closed:
                    return
                now = time.monotonic()
                due = [kept for kept in self._kept.values() if kept.next_at <= now]
                if not due:
                    soonest = min((kept.next_at for kept in self._kept.values()), default=None)
                    self._changed.wait(None if soonest is None else soonest - now)
                    continue
            try:
                lost = self.executor.renew_claims([(kept.action, kept.lease) for kept in due])
            except Exception:
                retry_at = time.monotonic()
                for kept in due:
                    if not kept.failing:
                        log.warning(
                            "could not renew the claim of charge action %s; trying again shortly",
                            kept.action.action_id,
                            exc_info=True,
                        )
                    kept.failing = True
                    kept.next_at = retry_at + _renewal_retry(kept.lease)
                continue
            renewed_at = time.monotonic()
            with self._changed:
                for kept in due:
                    if kept.action.action_id in lost:  # no longer this worker's: its answer will be refused as stale
                        self._kept.pop(id(kept), None)
                        continue
                    if kept.failing:
                        log.info("renewed the claim of charge action %s again", kept.action.action_id)
                    kept.failing = False
                    kept.next_at = renewed_at + _renewal_beat(kept.lease)


def _renewal_beat(lease: timedelta) -> float:
    """Seconds between two renewals of a claim held for ``lease``."""
    return lease.total_seconds() / 3


def _renewal_retry(lease: timedelta) -> float:
    """Seconds before a failed renewal of a claim held for ``lease`` is tried again."""
    return min(lease.total_seconds() / 30, 1.0)


log = logging.getLogger("winback.executor")

T = TypeVar("T")

AdapterFactory = Callable[[str, MerchantConfig, httpx.AsyncClient], Mapping[Channel, ChannelAdapter]]


def _default_adapters(
    merchant_id: str, merchant: MerchantConfig, http: httpx.AsyncClient
) -> Mapping[Channel, ChannelAdapter]:
    from service.executor.channels.base import build_adapters

    return build_adapters(merchant_id, merchant, os.environ, http)


class Effects:
    """Performs claimed actions. One per process: holds connectors (with their breakers), channel adapters,
    an HTTP client for webhooks and an event loop for the async channel adapters."""

    def __init__(
        self,
        executor: Executor,
        connectors: ConnectorRegistry,
        catalog: ErrorCatalog,
        public_base_url: str,
        *,
        unsubscribe_key: bytes,
        env: Mapping[str, str] | None = None,
        adapters: AdapterFactory | None = None,
        webhook_client: httpx.Client | None = None,
        lease: timedelta = DEFAULT_LEASE,
    ) -> None:
        self.executor = executor
        #: How long a charge's claim lasts from its send on, renewed every third of it while the send is out.
        self.lease = lease
        self.claims = ClaimKeeper(executor)
        self.connectors = connectors
        self.catalog = catalog
        self.public_base_url = public_base_url.rstrip("/")
        self.unsubscribe_key = unsubscribe_key
        self.env = env if env is not None else os.environ
        self.adapter_factory = adapters or _default_adapters
        self.webhook_client = webhook_client or httpx.Client(timeout=httpx.Timeout(10.0))
        self._adapters: dict[str, Mapping[Channel, ChannelAdapter]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._http: httpx.AsyncClient | None = None

    # ------------------------------------------------------------------------------------ async bridge

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(coroutine)

    def adapters(self, merchant_id: str) -> Mapping[Channel, ChannelAdapter]:
        """The merchant's channel adapters, built on first use (ChannelError names a misconfiguration)."""
        found = self._adapters.get(merchant_id)
        if found is None:
            if self._http is None:
                if self._loop is None:
                    self._loop = asyncio.new_event_loop()
                self._http = httpx.AsyncClient(timeout=httpx.Timeout(10.0))
            found = self.adapter_factory(merchant_id, self.executor.merchant(merchant_id), self._http)
            self._adapters[merchant_id] = found
        return found

    def close(self) -> None:
        """Release HTTP clients and the event loop, and stop renewing claims."""
        self.claims.close()
        self.webhook_client.close()
        self.connectors.close()
        if self._http is not None:
            self._run(self._http.aclose())
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    # --------------------------------------------------------------------------------------- dispatch

    def perform(self, action: ActionRow, order: RowMapping | None) -> Outcome:
        """Perform one claimed action; never raises (every failure becomes an Outcome)."""
        try:
            if action.kind == ActionKind.WEBHOOK:
                return self._webhook(action)
            if order is None:
                return Skip(f"order {action.order_id!r} is not known")
            if action.kind in (ActionKind.FOLLOW_UP, ActionKind.CLOSE):
                return NoEffect()
            if action.kind in CHARGE_KINDS:
                return self._charge(action)
            if action.kind == ActionKind.CHARGE_STATUS:  # on a settled order too
                return self._charge_status(action)
            if action.kind == ActionKind.REFUND:  # the order is settled
                return self._refund(action, order)
            if order["state"] != OrderState.PENDING:
                return Skip(f"order is {order['state']}")
            if action.kind == ActionKind.NUDGE:
                return self._nudge(action, order)
            return Permanent(f"unknown action kind {action.kind!r}")
        except Exception as exc:  # a bug or an unexpected library error: retried, then dead-lettered
            log.exception("performing %s action %s failed", action.kind, action.action_id)
            return Transient(unexpected_error(exc))

    # ---------------------------------------------------------------------------------------- charges

    def connector(self, merchant_id: str, name: str) -> Connector:
        """The connector for a merchant's connector name."""
        return self.connectors.get(merchant_id, name)

    def _charge(self, action: ActionRow) -> Outcome:
        now = self.executor.clock()
        # The order and this action as they are now, not as the batch found them (the order may have been paid
        # while earlier actions ran), read under the order's lock, which a link payment's start also takes: the
        # two cannot both see no charge out. The action is marked sent in the same transaction.
        with self.executor.engine.begin() as conn:
            order = self.executor.lock_order(conn, action.merchant_id, action.order_id)
            # The action's row too (PostgreSQL): a worker claiming it after its lease skips it until this
            # transaction has marked it sent, and then sees a re-send.
            held = conn.execute(
                self.executor.for_update(
                    sa.select(actions.c.claim_token, actions.c.unanswered_since).where(
                        actions.c.action_id == action.action_id
                    )
                )
            ).first()
            if order is None:
                return Skip(f"order {action.order_id!r} is not known")
            if held is None or held.claim_token != action.claim_token:
                return Skip("the claim is no longer this worker's")
            if action.kind == ActionKind.RETRY and "attempt_number" not in action.payload:
                # Never written (Executor._carry_out fixes it as it plans the retry): dead-lettered unsent, not
                # numbered here, where a number reserved by a send that crashed could change on its re-send.
                return Permanent(f"retry action {action.action_id} has no attempt number: it is not sent")
            # A re-send asks the switch about a charge already sent (same key, same body): it goes ahead on any
            # open order, and never waits, so the charges it holds back cannot hold it back in turn.
            resend = held.unanswered_since is not None
            payable = OPEN_ORDER_STATES if resend or action.kind == ActionKind.LINK_PAYMENT else (OrderState.PENDING,)
            if order["state"] not in payable:
                if resend:
                    # The order is settled since the earlier send, whose answer was lost. Sending again would
                    # charge a settled order if that send never arrived; not asking would hide it if it did.
                    return Permanent(
                        f"order became {order['state']} while the answer to an earlier send of this charge was "
                        f"lost: ask connector {action.payload.get('connector')!r} about payment "
                        f"{action.order_id}_{action.payload.get('attempt_number')}; a refund may be needed"
                    )
                return Skip(f"order is {order['state']}")
            if not resend:
                unknown = self.executor.unknown_charge(conn, order)
                if unknown is not None:
                    # Never sent, so cancelled, not dead-lettered: a dead charge not marked sent counts as one that
                    # may have gone out, and its payment number as a silent retry made in every later decision once
                    # the operator's answer lets the order go on (which decides the order again anyway).
                    return Skip(
                        f"charge action {unknown} of the order was sent and never answered: no new charge goes on "
                        "top of it until an operator has asked its connector"
                    )
                # One charge at a time per order: wait for one that goes first (a charge sent and not answered; for
                # a retry also a link being paid, or an older retry claimed now). A link payment's first send was
                # checked when the customer clicked; this is for one sent again later by a worker.
                busy_until = self.executor.charge_ahead_of(conn, order, action)
                if busy_until is not None:
                    return Defer(
                        max(busy_until, now + RECHECK), "another charge of the order may be with its connector"
                    )
                if action.kind == ActionKind.RETRY:
                    broken = retry_forbidden(
                        self.executor.rules_now(conn, order, action, now, self.catalog, sending=True), action, now
                    )
                    if broken:
                        return Replan("not allowed now: " + ", ".join(broken))
            elif action.kind == ActionKind.RETRY:
                # A re-send is the same charge, asked again; if its first send never arrived, the switch charges
                # it now. A UPI AutoPay retry must not execute in NPCI's peak hours: it waits for the off-peak
                # window (its mark kept: the order waits for its answer).
                off_peak = upi_off_peak_from(self.executor.rules_now(conn, order, action, now, self.catalog), now)
                if off_peak is not None and off_peak > now:
                    return Defer(off_peak, "UPI AutoPay peak hours: the re-send waits for the off-peak window")
                # The rest of the hard rules too: if the earlier send never arrived, this one charges now (a
                # checkout window may have closed since, the merchant's config changed). Forbidden, it is not sent;
                # the charge stays one that may have gone out, and its switch is asked what became of it.
                broken = retry_forbidden(
                    self.executor.rules_now(conn, order, action, now, self.catalog, sending=True), action, now
                )
                if broken:
                    return Permanent(
                        "not sent again: not allowed now: " + ", ".join(broken) + "; its switch is asked what became "
                        "of the earlier send"
                    )
            try:
                connector = self.connector(action.merchant_id, str(action.payload["connector"]))
            except PermanentError as exc:
                # A first send is not marked yet (nothing was charged); a re-send keeps its mark.
                return Permanent(str(exc), nothing_charged=not resend)
            if not resend and not self.executor.mark_sent(conn, action, now):
                return Skip("the claim is no longer this worker's")
            # A whole lease from the send on, whatever was left of the batch's (the row is locked here).
            self.executor.extend_claim(conn, action, now + self.lease)
        context = None
        if getattr(connector, "wants_context", False):
            with self.executor.engine.connect() as conn:
                context = self.executor.request_for(conn, order, now)
        request = ChargeRequest(
            idempotency_key=action.idempotency_key,
            merchant_id=action.merchant_id,
            order_id=action.order_id,
            attempt_number=int(action.payload["attempt_number"]),
            amount=float(order["amount"]),
            currency=str(order["currency"]),
            strategy=str(action.payload["strategy"]),
            connector=str(action.payload["connector"]),
            # The planned time, not the clock: a re-send after a lost answer must be the same request, or the
            # switch refuses the reused key (409) and the first charge is never recorded.
            execute_at=action.planned_at,
            context=context,
        )
        try:
            # The claim is renewed while the send is out, however long it takes (a host name with many addresses,
            # a slow handshake): a worker taking it over would re-send it as one that may have charged, and this
            # one could no longer take its mark back if nothing had been.
            with self.claims.keep(action, self.lease):
                result = connector.charge(request)
        except CircuitOpenError as exc:
            # Nothing was sent: wait without counting a try, and it is not a charge that may be out.
            if not resend:
                self.executor.unmark_sent(action)
            return Defer(now + CIRCUIT_WAIT, str(exc))
        except UnreachedError as exc:
            # No try reached the switch (no connection, 429): it is not a charge that may be out, so a connector
            # outage does not leave charges for an operator to answer for.
            if not resend:
                self.executor.unmark_sent(action)
                if action.kind == ActionKind.LINK_PAYMENT:
                    # As for an open circuit: the customer on the page is told to try again shortly and keeps the
                    # link (the payment is withdrawn), rather than "processing" with a charge that is not out.
                    return Defer(now + CIRCUIT_WAIT, str(exc))
            return Transient(str(exc))  # a retry counts the try
        except TransientError as exc:
            return Transient(str(exc))
        except RefusedError as exc:
            if not resend:  # the switch refused it outright: nothing was charged
                self.executor.unmark_sent(action)
            return Permanent(str(exc), nothing_charged=not resend)
        except PermanentError as exc:  # an answer that cannot be read, or a reused key: the charge is unknown
            return Permanent(str(exc))
        return Charged(result)

    def _charge_status(self, action: ActionRow) -> Outcome:
        """Ask the switch what became of a charge sent and never answered, by its processor payment id."""
        name, payment_id = str(action.payload.get("connector")), str(action.payload.get("payment_id"))
        return self._through_switch(
            action,
            ChecksStatus,
            f"cannot be asked what became of payment {payment_id}",
            self.executor.unasked_standing(action),
            lambda connector: StatusAnswered(connector.status(payment_id, name)),
        )

    def _refund(self, action: ActionRow, order: RowMapping) -> Outcome:
        """Give back a charge that succeeded on an order already settled, through the connector that took it (one
        charged on an operator's word waits for its switch to confirm it: ``Executor.refund_held``)."""
        held = self.executor.refund_held(action)
        if held is not None:
            return held
        request = RefundRequest(
            idempotency_key=action.idempotency_key,
            merchant_id=action.merchant_id,
            order_id=action.order_id,
            payment_id=str(action.payload.get("payment_id")),
            amount=float(action.payload.get("amount", order["amount"])),
            currency=str(action.payload.get("currency", order["currency"])),
            reason=str(action.payload.get("reason", "duplicate")),
        )

        def refund(connector: Any) -> Outcome:
            result = connector.refund(request)  # tried again on no answer: the same key, refunded once
            return Refunded(result.status, result.refund_id)

        by_hand = f"payment {request.payment_id} was charged twice and must be refunded by hand"
        return self._through_switch(action, Refunds, "cannot refund", by_hand, refund)

    def _through_switch(
        self, action: ActionRow, able: type, cannot: str, otherwise: str, call: Callable[[Any], Outcome]
    ) -> Outcome:
        """Make ``call`` with the connector of ``action`` (a status check or a refund), which must be ``able`` to:
        Transient when no answer came, Permanent (saying ``otherwise``) when it cannot be made."""
        name = str(action.payload.get("connector"))
        try:
            connector = self.connector(action.merchant_id, name)
        except PermanentError as exc:  # no endpoint for it in the merchant's config, and no sandbox
            return Permanent(f"{exc}; {otherwise}")
        if not isinstance(connector, able):
            return Permanent(f"connector {name!r} {cannot}; {otherwise}")
        try:
            with self.claims.keep(action, self.lease):
                return call(connector)
        except TransientError as exc:
            return Transient(str(exc))
        except PermanentError as exc:
            return Permanent(f"{exc}; {otherwise}")

    # ----------------------------------------------------------------------------------------- nudges

    def _nudge(self, action: ActionRow, order: RowMapping) -> Outcome:
        now = self.executor.clock()
        merchant = self.executor.merchant(action.merchant_id)
        channel = Channel(str(action.payload["channel"]))
        with self.executor.engine.connect() as conn:
            # The order as it is now: a charge of its own batch may have settled it, or failed it again, since
            # the batch read it.
            order = self.executor.orders_of(conn, [action])[(action.merchant_id, action.order_id)]
            if order["state"] != OrderState.PENDING:
                return Skip(f"order is {order['state']}")
            unknown = self.executor.unknown_charge(conn, order)
            if unknown is not None:  # the customer may have paid: no message asking them to pay
                return Skip(f"charge action {unknown} of the order was sent and never answered")
            waiting = self._message_waits(conn, order, action, now)  # before a link is minted for nothing
            if waiting is not None:
                return waiting
            request = self.executor.request_for(conn, order, now, sending=action)
        # The hard rules again, at the moment of sending: the decision may be hours old.
        context = build_context(request, merchant, self.catalog)
        forbidden = self._message_forbidden(context, action, channel, now)
        if forbidden is not None:
            return forbidden
        # Just after the quiet hours every message kept for their end is due at once: this one takes its turn. It
        # is one of them when it is sent then, or when it was due then (a worker behind sends them later, still
        # all at once: before, one more than QUIET_HOURS_WAKE behind sent its whole backlog unpaced).
        due = action.was_due_at
        wakes = in_quiet_hours(context, now - QUIET_HOURS_WAKE) or (
            due is not None and in_quiet_hours(context, due - QUIET_HOURS_WAKE)
        )
        nudge_id = nudge_id_for(action.idempotency_key)
        address = customer_address(request.customer.model_extra or {}, channel)
        if address is None:
            return NotSent(
                nudge_id, channel.value, PAYMENT_LINK_TEMPLATE, f"no {channel.value} address for the customer"
            )
        try:
            adapter = self.adapters(action.merchant_id).get(channel)
        except ChannelError as exc:
            return Permanent(str(exc))
        if adapter is None:
            return NotSent(
                nudge_id, channel.value, PAYMENT_LINK_TEMPLATE, f"merchant has no provider for {channel.value}"
            )
        token_id, token, expires_at = self.executor.new_link(
            action.merchant_id, action.order_id, action.idempotency_key, now
        )
        message = OutboundMessage(
            idempotency_key=action.idempotency_key,
            merchant_id=action.merchant_id,
            order_id=action.order_id,
            nudge_id=nudge_id,
            channel=channel,
            to=address,
            template_id=PAYMENT_LINK_TEMPLATE,
            locale=str((request.customer.model_extra or {}).get("locale") or "en"),
            variables=MessageVariables(
                amount=format_amount(float(order["amount"]), str(order["currency"])),
                currency=str(order["currency"]),
                link_url=f"{self.public_base_url}/pay/{token}",
                unsubscribe_url=unsubscribe_url(
                    self.public_base_url, self.unsubscribe_key, action.merchant_id, action.order_id
                ),
                merchant_name=merchant.display_name or action.merchant_id,
                customer_name=str((request.customer.model_extra or {}).get("name") or ""),
                order_id=action.order_id,
                expires_at=link_expiry_text(expires_at, merchant.retarget.quiet_hours.timezone),
            ).as_mapping(),
        )
        marked_at = self.executor.clock()
        held = self._mark_message_sending(action, wakes, at=marked_at)
        if held is not None:
            return held
        answered_maybe_taken = False
        try:
            with self.claims.keep(action, self.lease):  # the claim outlives the provider call, as a charge's does
                result = self._run(adapter.send(message))
            answered_maybe_taken = result.status == "accepted" or (
                result.status == "retryable" and not result.not_taken
            )
        finally:
            if channel == Channel.WHATSAPP:
                self._pair_answered(action, channel, address, marked_at)
            # A message the provider accepted, or may have taken (a timeout, a 500), keeps its mark until
            # ``complete`` records the answer (in that transaction): another message of the order must not pass it
            # before the rules can see it on record, and a decision made meanwhile counts it and does not replace it
            # as a message never handed over (review: the timed-out message vanished from the history). A refusal
            # (nothing went) clears it at once.
            if not answered_maybe_taken:
                try:
                    self.executor.unmark_sent(action)
                except Exception:  # the provider's answer still gets recorded, and its record clears the mark
                    log.warning(
                        "could not clear the sending mark of message action %s", action.action_id, exc_info=True
                    )
        if result.status == "accepted":
            return Sent(
                nudge_id, channel.value, PAYMENT_LINK_TEMPLATE, result.provider_message_id, token_id, expires_at
            )
        if result.status == "retryable":
            return Transient(
                result.error or f"{channel.value} provider asked to try again",
                not_taken=result.not_taken,
                retry_after=None
                if result.retry_after_seconds is None
                else timedelta(seconds=result.retry_after_seconds),
                sender_limited=result.sender_limited,
                sender_blocked=result.sender_blocked,
                rcpt_domain=result.rcpt_domain,
            )
        return NotSent(nudge_id, channel.value, PAYMENT_LINK_TEMPLATE, result.error or "rejected by the provider")

    @staticmethod
    def _message_forbidden(
        context: RuleContext, action: ActionRow, channel: Channel, now: datetime
    ) -> Defer | Replan | None:
        """What message ``action`` on ``channel`` that the hard rules (``context``) forbid at ``now`` does instead
        (it waits for the end of the quiet hours, or its order is decided again), or None when it may go."""
        verdict = check(context, Candidate(action=Action.RETARGET, execute_at=now, channel=channel))
        if verdict.allowed:
            return None
        if set(verdict.broken) == {Rule.QUIET_HOURS.value}:
            # The quiet hours' end in every zone they hold in: the merchant's, and the customer's (model.zones).
            until = quiet_hours_end(context, now)
            if until is not None:
                # Its turn in a sender's release that ran into the quiet hours is spent: kept, it let the message
                # go at their end outside the turns of the messages waking then.
                if MESSAGE_PACED_TURN in action.payload:
                    kept = {key: value for key, value in action.payload.items() if key != MESSAGE_PACED_TURN}
                    return Defer(until, "quiet hours", payload=kept)
                return Defer(until, "quiet hours")
            return None
        return Replan("not allowed now: " + ", ".join(verdict.broken))

    def _pair_answered(self, action: ActionRow, channel: Channel, address: str, marked_at: datetime) -> None:
        """The provider answered WhatsApp message ``action``, marked as sending at ``marked_at``: the customer's next
        message counts its 6 seconds from now, not from the bound its send set (``pacing.pair_answered``). A write
        that fails leaves the bound: the next message waits longer, never less."""
        try:
            with self.executor.engine.begin() as conn:
                pair_answered(
                    conn,
                    action.merchant_id,
                    channel,
                    address_hash(channel, address),
                    marked_bound=marked_at + self.lease,
                    answered_at=self.executor.clock(),
                )
        except Exception:
            log.warning("could not note when message action %s was answered", action.action_id, exc_info=True)

    def _mark_message_sending(
        self, action: ActionRow, wakes: bool = False, *, at: datetime | None = None
    ) -> Outcome | None:
        """Mark a payment-link message as going to its provider now, under its order's lock, unless the order was
        settled, a charge of it is claimed or with its connector, its address opted out of its channel meanwhile
        (a STOP that arrived after the send's rules check wins), or another message of it is being sent, or the
        hard rules forbid it now (then the outcome to record). A retry's first send waits for a message so marked
        (``charge_ahead_of``), and takes the same lock, so the customer is never asked to pay while a charge of
        theirs is out, nor after it succeeded. The rules (one message a day, the skip-days cadence,
        ``max_nudges``) are checked again here, on what is committed under the lock: the check before the link
        was minted read without it, and two workers may hold two messages of one order. The mark is cleared when
        the provider's answer is recorded (at once when it did not accept the message), and by the next claim of
        the message if its worker died. ``wakes``: it is sent just after the end of the quiet hours, and takes a
        turn (service/executor/pacing.py). ``at``: the moment of the mark (the executor's clock when not given); a
        WhatsApp message's answer is noted against it (``_pair_answered``)."""
        now = self.executor.clock() if at is None else at
        channel = Channel(str(action.payload["channel"]))
        with self.executor.engine.begin() as conn:
            order = self.executor.lock_order(conn, action.merchant_id, action.order_id)
            if order is None or order["state"] != OrderState.PENDING:
                return Skip(f"order is {None if order is None else order['state']}")
            waiting = self._message_waits(conn, order, action, now)
            if waiting is not None:
                return waiting
            opted_out = self._opted_out(conn, order, action)
            if opted_out is not None:
                return opted_out
            down = self._channel_down(conn, action, now)
            if down is not None:
                return down
            paced = self._paced(conn, order, action, now, wakes)
            if paced is not None:  # held, not dropped: it goes when the hold ends, and counts only then
                return paced
            sending_until = self.executor.message_being_sent(conn, order, action)
            if sending_until is not None:  # its answer, once recorded, decides whether this one may still go
                return Defer(max(sending_until, now + RECHECK), "another message of the order is being sent")
            forbidden = self._message_forbidden(
                build_context(
                    self.executor.request_for(conn, order, now, sending=action),
                    self.executor.merchant(action.merchant_id),
                    self.catalog,
                ),
                action,
                channel,
                now,
            )
            if forbidden is not None:
                return forbidden
            # The claim is checked, its row locked until the mark, before the message takes the channel's probe:
            # a message replaced by a later decision (or taken over) before its hand-over took the probe and then
            # found its claim gone, and the channel's next message waited a whole lease for a probe never sent.
            if not self.executor.lock_claim(conn, action):
                return Skip("the claim is no longer this worker's")
            probe_ends = claim_probe(conn, action.merchant_id, channel, now, self.lease)
            if probe_ends is not None:  # its answer says whether the channel is up again
                return Defer(max(probe_ends, now + RECHECK), f"another message is probing {channel.value}")
            # The claim cleared any earlier mark, and its row is locked: this cannot fail.
            self.executor.mark_sent(conn, action, now)
            # A whole lease from the send on (the ClaimKeeper renews it while the provider call is out).
            self.executor.extend_claim(conn, action, now + self.lease)
        return None

    @staticmethod
    def _opted_out(conn: sa.Connection, order: RowMapping, action: ActionRow) -> Replan | None:
        """A Replan when the address the message goes to (the order's customer's on its channel) opted out of the
        channel, else None; decided again, the channel is opted out in the request (``Executor.request_for``)."""
        channel = Channel(str(action.payload["channel"]))
        customer = orjson.loads(order["request_json"])["customer"]
        address = customer_address(customer, channel)
        country = customer.get("country")
        if address is None or not is_opted_out(
            conn, action.merchant_id, channel, address, country if isinstance(country, str) else None
        ):
            return None
        return Replan(f"the customer opted out of {channel.value}")

    def _paced(
        self, conn: sa.Connection, order: RowMapping, action: ActionRow, now: datetime, wakes: bool
    ) -> Defer | None:
        """A Defer to the message's turn while it is held back after a rate limit (service/executor/pacing.py),
        else None: while its sender is held or the messages it kept back are going, a spacing apart; when it
        ``wakes`` with the end of the quiet hours, with all the messages kept for it, the quiet hours' spacing apart;
        on WhatsApp, always one every 6 seconds to its customer (Meta's pair rate: before, only after Meta had
        refused a message with 131056; the other channels have no pair rate, and no customer's row to read). The
        turn is kept on the message, which goes at it. The customer's turn is taken last,
        when its sender's turn has come: a message kept waiting behind its sender's release after taking its
        customer's turn would go less than 6 seconds before the customer's next message."""
        channel = Channel(str(action.payload["channel"]))
        policy = self.executor.retry_policy
        turn = release_turn(
            conn,
            action.merchant_id,
            channel,
            now,
            _turn_of(action, MESSAGE_PACED_TURN),
            policy.release_spacing,
            policy.wake_spacing(channel, self.executor.merchant(action.merchant_id).providers.get(channel))
            if wakes
            else None,
        )
        if turn is not None:
            why = (
                "the messages kept for the end of the quiet hours go one at a time"
                if wakes
                else "its sender was rate limited"
            )
            return _wait_for_turn(action, MESSAGE_PACED_TURN, turn, channel.value, why)
        # Only WhatsApp has a pair rate (Meta's 131056, classified on WhatsApp receipts alone: channels/inbound.py),
        # so only its messages make customers' rows: an SMS, e-mail or push one would read a row that is never there.
        address = order_customer_address(order["request_json"], channel) if channel == Channel.WHATSAPP else None
        if address is None:
            return None
        kept = _turn_of(action, MESSAGE_CUSTOMER_PACED_TURN)
        customer = address_hash(channel, address)
        # The call may reach the provider until its claim's end: until its answer is noted (``_pair_answered``),
        # the customer's next message counts its 6 seconds from then.
        turn = pair_turn(conn, action.merchant_id, channel, customer, now, kept, call_bound=self.lease)
        if turn is None:
            return None
        why = "at most one message every 6 seconds to their number (pair rate limit)"
        return _wait_for_turn(action, MESSAGE_CUSTOMER_PACED_TURN, turn, f"{channel.value} to this customer", why)

    def _channel_down(self, conn: sa.Connection, action: ActionRow, now: datetime) -> Defer | Replan | None:
        """While the message's channel is down (service/executor/outages.py), or its sender held for hours for its
        daily quota (``RetryPolicy.senders_over_quota``): a Replan (its order is decided again without the channel;
        nothing was sent, nothing counts), or a Defer to the end of the hold for a message an earlier try may have
        sent (a timeout, a 500: it keeps its tries and counts if given up) and for one planned to wait for the channel
        (decided again, the order would get the same plan). None while the channel is up."""
        channel = Channel(str(action.payload["channel"]))
        down, over = self.executor.retry_policy.channels_out(conn, action.merchant_id, now, channel)
        until = down.get(channel)
        what = "is down"
        if until is None:
            until = over.get(channel)
            what = "has its sender over its daily quota"
        if until is None:
            return None
        if action.payload.get(MESSAGE_MAYBE_SENT_TRIES) or action.payload.get(MESSAGE_WAITS_FOR_CHANNEL):
            return Defer(until, f"{channel.value} {what}")
        return Replan(f"{channel.value} {what} until {utc_second(until)}")

    def _message_waits(self, conn: sa.Connection, order: RowMapping, action: ActionRow, now: datetime) -> Defer | None:
        """A Defer while a charge of the order is claimed or with its connector (its answer may settle the order),
        else None."""
        busy_until = self.executor.charge_ahead_of(conn, order, action)
        if busy_until is None:
            return None
        return Defer(max(busy_until, now + RECHECK), "a charge of the order may be with its connector")

    # --------------------------------------------------------------------------------------- webhooks

    def _webhook(self, action: ActionRow) -> Outcome:
        merchant = self.executor.config.merchants.get(action.merchant_id)
        if merchant is None:  # taken out of the config: tried again (hourly at most) in case it comes back
            return Transient(f"merchant {action.merchant_id!r} is not in the merchant config: its webhook waits")
        if merchant.webhook is None:
            return Skip("the merchant has no webhook")
        secret = self.env.get(merchant.webhook.secret_env)
        if not secret:  # tried again later (until a 2xx): set it and restart, and the webhook goes out
            return Transient(
                f"merchants.{action.merchant_id}.webhook.secret_env: environment variable "
                f"{merchant.webhook.secret_env} is not set"
            )
        with self.executor.engine.begin() as conn:
            delivery = (
                conn.execute(
                    sa.select(webhook_deliveries).where(
                        webhook_deliveries.c.merchant_id == action.merchant_id,
                        webhook_deliveries.c.order_id == action.order_id,
                    )
                )
                .mappings()
                .first()
            )
            # Another worker that took this webhook over after our lease may be posting it, or have posted it and
            # not yet recorded the 2xx: only the claim's holder posts, for a whole lease from here on.
            if not self.executor.extend_claim(conn, action, self.executor.clock() + self.lease):
                return Skip("the claim is no longer this worker's")
        if delivery is None:
            return Skip("no webhook delivery recorded")
        if delivery["status"] == "delivered":
            return Skip("already acknowledged")
        body = str(delivery["body"]).encode()
        try:
            with self.claims.keep(action, self.lease):  # the claim outlives the POST, as a charge's does
                response = post_webhook(
                    self.webhook_client, str(delivery["url"]), secret, body, int(time.time()), action.idempotency_key
                )
        except httpx.HTTPError as exc:
            return Transient(f"webhook to {delivery['url']} failed: {type(exc).__name__}: {exc}")
        if 200 <= response.status_code < 300:
            return Delivered(response.status_code)
        return Transient(f"webhook answered HTTP {response.status_code}", status_code=response.status_code)
