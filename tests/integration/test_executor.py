"""The executor's state machine on a real SQLite file: events, decisions carried out, webhooks, links, assisted mode.

Decisions come from a scripted decider (the executor must carry out whatever decide() says, never decide itself);
one test runs the real rules-only decide() against the sandbox connector over HTTP.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import yaml

from model.catalog import load_catalog
from model.merchant_config import MerchantConfig, WinbackConfig, parse_config
from model.requests import Decision, DecisionRequest
from model.rules import build_context
from model.vocab import Channel
from service.executor.channels.base import ChannelAdapter, OutboundMessage, SendResult
from service.executor.channels.templates import link_expiry_text
from service.executor.connectors import (
    ChargeRequest,
    ChargeResult,
    CircuitBreaker,
    CircuitOpenError,
    HttpConnector,
    TransientError,
    UnreachedError,
)
from service.executor.core import AgentQueueError, ChargeResolutionError, Executor, IdempotencyConflictError
from service.executor.effects import Effects
from service.executor.links import LinkError
from service.executor.routes import ExecutorRuntime, _pay
from service.executor.sandbox import start_sandbox
from service.executor.settings import ExecutorSettings
from service.executor.store import (
    actions,
    as_utc,
    make_executor_engine,
    nudges,
    orders,
    transactions,
    webhook_deliveries,
)
from service.executor.views import order_view
from service.executor.worker import Worker, build_effects, build_executor, make_decider
from service.migrations import downgrade, upgrade
from tests.factories import make_merchant, make_request

START = datetime(2026, 11, 2, 6, 0, tzinfo=UTC)  # 11:30 in Kolkata: outside the demo quiet hours
SECRET = "whsec_test_secret"


def config_for(**merchants: MerchantConfig) -> WinbackConfig:
    return parse_config({"merchants": {k: v.model_dump(mode="json") for k, v in merchants.items()}})


def demo_merchant(**overrides: Any) -> MerchantConfig:
    return make_merchant(webhook={"url": "http://merchant.test/hooks", "secret_env": "WB_TEST_WEBHOOK"}, **overrides)


#: How the scripts' card renewals fail, and the fake connector's declines: the issuer was unavailable (91). A cascade
#: may go at once; after insufficient funds (the contract example's 51) one waits a day (rule cascade_same_account).
TECHNICAL_DECLINE = {"error_code": "processing_error", "error_message": None, "network_decline_code": "91"}


def event(order_id: str = "ord_1", key: str | None = None, **overrides: Any) -> dict[str, Any]:
    """The contract's example request as a payment-failed event, but in USD from a customer of no stated country and
    declined as issuer unavailable: a card renewal the scripts may cascade at once (an Indian card's runs on an RBI
    e-mandate bound to its gateway, and insufficient funds is not cascaded the same day)."""
    customer = {"phone": "+919800000001", "email": "a@example.com", "country": None} | overrides.pop("customer", {})
    failure = TECHNICAL_DECLINE | overrides.pop("failure", {})
    request = make_request(
        **{
            "order_id": order_id,
            "event_time": START.isoformat(),
            "currency": "USD",
            "history": {"attempts": [], "nudges": []},
            "customer": customer,
            "failure": failure,
            **overrides,
        }
    )
    body: dict[str, Any] = json.loads(request.model_dump_json())
    body["idempotency_key"] = key or f"evt_{order_id}"
    return body


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class ScriptedDecider:
    """Answers decision points from a script of (action, fields) in order; ``stop`` when the script ends."""

    def __init__(self, clock: Clock, *steps: dict[str, Any]) -> None:
        self.clock = clock
        self.steps = list(steps)
        self.requests: list[DecisionRequest] = []

    def __call__(self, request: DecisionRequest, merchant: MerchantConfig) -> Decision:
        self.requests.append(request)
        step = self.steps.pop(0) if self.steps else {"action": "stop"}
        delay = step.pop("delay", timedelta(0))
        return Decision.model_validate(
            {
                "decision_id": f"dec_{len(self.requests)}_{request.order_id}",
                "model_version": "scripted",
                "execute_at": (request.event_time + delay).isoformat(),
                "retryable": True,
                "retry_probability": 0.5,
                "expected_success": 0.5,
                "propensity": 0.9,
            }
            | step
        )


@dataclass
class FakeConnector:
    """Answers from ``results`` (one per distinct key); charges once per idempotency key like a real switch."""

    results: list[str] = field(default_factory=list)
    transient_first: int = 0
    calls: list[str] = field(default_factory=list)
    charged: dict[str, ChargeResult] = field(default_factory=dict)

    def charge(self, request: ChargeRequest) -> ChargeResult:
        self.calls.append(request.idempotency_key)
        if len(self.calls) <= self.transient_first:
            raise TransientError("connector 'adyen' answered HTTP 503")
        if request.idempotency_key not in self.charged:
            status = self.results.pop(0) if self.results else "failure"
            self.charged[request.idempotency_key] = ChargeResult(
                status="success" if status == "success" else "failure",
                connector=request.connector,
                error_code=None if status == "success" else TECHNICAL_DECLINE["error_code"],
                network_decline_code=None if status == "success" else TECHNICAL_DECLINE["network_decline_code"],
            )
        return self.charged[request.idempotency_key]


class CapturingAdapter:
    def __init__(self, channel: Channel, outbox: list[OutboundMessage]) -> None:
        self.channel = channel
        self.provider = "fake"
        self.outbox = outbox

    async def send(self, message: OutboundMessage) -> SendResult:
        self.outbox.append(message)
        return SendResult(status="accepted", provider_message_id=f"pm_{len(self.outbox)}")


@dataclass
class Receiver:
    """A merchant webhook endpoint: answers ``statuses`` in turn (then 200) and keeps what it got."""

    statuses: list[int] = field(default_factory=list)
    received: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.received.append(request)
        return httpx.Response(self.statuses.pop(0) if self.statuses else 200)


@dataclass
class Harness:
    executor: Executor
    effects: Effects
    worker: Worker
    clock: Clock
    connector: FakeConnector
    outbox: list[OutboundMessage]
    receiver: Receiver

    def drain(self) -> int:
        return self.worker.run(until_idle=True)

    def view(self, order_id: str = "ord_1", merchant_id: str = "m_demo") -> Any:
        found = order_view(self.executor.engine, merchant_id, order_id)
        assert found is not None
        return found

    def count(self, table: sa.Table, *where: Any) -> int:
        with self.executor.engine.connect() as conn:
            return int(conn.scalar(sa.select(sa.func.count()).select_from(table).where(*where)) or 0)


@pytest.fixture
def make_harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Harness]]:
    monkeypatch.setenv("WB_TEST_WEBHOOK", SECRET)
    made: list[Harness] = []

    def build(
        *steps: dict[str, Any],
        merchants: Mapping[str, MerchantConfig] | None = None,
        connector: FakeConnector | None = None,
        receiver: Receiver | None = None,
        decider: Any = None,
        max_attempts: int = 8,
        database_url: str | None = None,
    ) -> Harness:
        clock = Clock()
        url = database_url or f"sqlite:///{tmp_path / f'exec{len(made)}.db'}"
        engine = make_executor_engine(url)
        upgrade(engine)
        settings = ExecutorSettings(database_url=url, max_attempts=max_attempts, backoff_base_seconds=1.0)
        config = config_for(**(merchants or {"m_demo": demo_merchant()}))
        executor = build_executor(settings, config, decider or ScriptedDecider(clock, *steps), engine=engine)
        executor.clock = clock
        executor.retry_policy.jitter = lambda ceiling: ceiling
        fake = connector or FakeConnector()
        outbox: list[OutboundMessage] = []
        hooks = receiver or Receiver()

        def adapters(
            merchant_id: str, merchant: MerchantConfig, http: httpx.AsyncClient
        ) -> dict[Channel, ChannelAdapter]:
            return {channel: CapturingAdapter(channel, outbox) for channel in Channel}

        effects = build_effects(executor, settings, load_catalog(), connectors={"*": fake}, adapters=adapters)
        effects.webhook_client = httpx.Client(transport=httpx.MockTransport(hooks))
        harness = Harness(executor, effects, Worker(executor, effects, "w1"), clock, fake, outbox, hooks)
        made.append(harness)
        return harness

    yield build
    for harness in made:
        harness.effects.close()
        harness.executor.engine.dispose()


def assert_signed(request: httpx.Request) -> dict[str, Any]:
    header = request.headers["Winback-Signature"]
    parts = dict(part.split("=", 1) for part in header.split(","))
    expected = hmac.new(SECRET.encode(), f"{parts['t']}.".encode() + request.content, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(parts["v1"], expected)
    body: dict[str, Any] = json.loads(request.content)
    return body


# ------------------------------------------------------------------------------------------- state machine


def test_failed_retry_then_successful_cascade_succeeds_once_with_one_signed_webhook(make_harness: Any) -> None:
    h = make_harness(
        {"action": "retry", "strategy": "retry_same", "connector": "stripe", "delay": timedelta(minutes=15)},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=FakeConnector(results=["failure", "success"]),
    )
    answer = h.executor.payment_failed("m_demo", event())
    assert (answer.order_id, answer.state) == ("ord_1", "PENDING")
    assert h.drain() == 0  # the retry is due in 15 minutes, not yet
    h.clock.advance(minutes=15)
    h.drain()
    h.clock.advance(seconds=5)
    h.drain()
    view = h.view()
    assert view.state == "SUCCEEDED"
    assert [(a.attempt_number, a.strategy, a.status) for a in view.attempts] == [
        (1, "initial", "failure"),
        (2, "retry_same", "failure"),
        (3, "cascade", "success"),
    ]
    assert [a.processor_payment_id for a in view.attempts] == ["ord_1_1", "ord_1_2", "ord_1_3"]
    assert len({a.txn_id for a in view.attempts}) == 3
    assert view.success_txn_id == view.attempts[-1].txn_id
    assert [d["decision_id"] for d in view.decisions] == ["dec_1_ord_1", "dec_2_ord_1"]
    assert view.attempts[2].decision_id == "dec_2_ord_1"
    assert view.attempts[2].propensity == 0.9
    # the second decision saw the failed retry in its history
    assert [a.strategy for a in h.executor.decider.requests[1].history.attempts] == ["initial", "retry_same"]  # type: ignore[attr-defined]

    assert len(h.receiver.received) == 1
    body = assert_signed(h.receiver.received[0])
    assert body["event"] == "order.succeeded"
    assert body["txn_id"] == view.success_txn_id
    assert (body["order_id"], body["amount"], body["currency"]) == ("ord_1", 499.0, "USD")
    assert len(body["attempts"]) == 3
    # nothing left to do: the window-end close was cancelled, no second webhook ever
    h.clock.advance(days=30)
    h.drain()
    assert len(h.receiver.received) == 1
    assert {a.state for a in view.actions} <= {"done", "cancelled"}


def test_stop_fails_the_order_with_one_webhook(make_harness: Any) -> None:
    h = make_harness({"action": "retry", "strategy": "cascade", "connector": "adyen"}, {"action": "stop"})
    h.executor.payment_failed("m_demo", event())
    h.drain()
    h.clock.advance(seconds=1)
    h.drain()
    view = h.view()
    assert view.state == "FAILED"
    assert [a.status for a in view.attempts] == ["failure", "failure"]
    body = assert_signed(h.receiver.received[0])
    assert body["event"] == "order.failed"
    assert body["txn_id"] == view.attempts[-1].txn_id
    h.clock.advance(days=30)
    h.drain()
    assert len(h.receiver.received) == 1


def test_window_end_fails_an_order_nobody_acts_on(make_harness: Any) -> None:
    h = make_harness({"action": "retry", "strategy": "cascade", "connector": "adyen", "delay": timedelta(days=30)})
    h.executor.payment_failed("m_demo", event())
    h.clock.advance(days=7)
    h.drain()
    assert h.view().state == "FAILED"
    assert h.connector.calls == []  # the retry planned past the window was cancelled with the order


def test_events_are_idempotent_and_a_reused_key_with_another_body_conflicts(make_harness: Any) -> None:
    h = make_harness({"action": "retry", "strategy": "cascade", "connector": "adyen", "delay": timedelta(hours=1)})
    first = h.executor.payment_failed("m_demo", event())
    again = h.executor.payment_failed("m_demo", event())
    assert first == again
    assert h.count(actions) == 2  # the retry and the window-end close, once
    assert len(h.view().decisions) == 1
    changed = event()
    changed["amount"] = 500.0
    with pytest.raises(IdempotencyConflictError, match="evt_ord_1"):
        h.executor.payment_failed("m_demo", changed)
    # the same order under a new key changes nothing either
    assert h.executor.payment_failed("m_demo", event(key="evt_other")).state == "PENDING"
    assert len(h.view().decisions) == 1


def test_success_reported_from_outside_cancels_everything_scheduled(make_harness: Any) -> None:
    h = make_harness({"action": "retry", "strategy": "cascade", "connector": "adyen", "delay": timedelta(hours=1)})
    h.executor.payment_failed("m_demo", event())
    succeeded = {"order_id": "ord_1", "txn_id": "txn_ext", "occurred_at": START.isoformat(), "idempotency_key": "s1"}
    assert h.executor.payment_succeeded("m_demo", succeeded).state == "SUCCEEDED"
    assert h.executor.payment_succeeded("m_demo", succeeded).state == "SUCCEEDED"
    h.clock.advance(hours=2)
    h.drain()
    assert h.connector.calls == []
    view = h.view()
    assert view.success_txn_id == "txn_ext"
    assert sorted(a.state for a in view.actions) == ["cancelled", "cancelled", "done"]  # retry, close; webhook
    assert len(h.receiver.received) == 1


def test_webhook_is_resent_until_acknowledged_and_never_after(make_harness: Any) -> None:
    h = make_harness({"action": "stop"}, receiver=Receiver(statuses=[500, 503]))
    h.executor.payment_failed("m_demo", event())
    for _ in range(6):
        h.drain()
        h.clock.advance(seconds=10)
    assert [r.headers["Idempotency-Key"] for r in h.receiver.received] == ["m_demo:ord_1:webhook"] * 3
    bodies = {r.content for r in h.receiver.received}
    assert len(bodies) == 1  # byte-identical body on every try; only the signature's t moves
    for request in h.receiver.received:
        assert_signed(request)
    assert h.view().webhook.status == "delivered"
    assert h.view().webhook.attempts == 3


def test_a_webhook_is_re_sent_until_a_2xx_however_long_the_merchant_is_down(
    make_harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # CONTRACT.md section 5: "re-sent with backoff until a 2xx". It was given up ("dead") after 20 tries, about ten
    # hours: a merchant endpoint down over a weekend never got the order's webhook.
    h = make_harness({"action": "stop"}, receiver=Receiver(statuses=[500] * 40), max_attempts=3)
    h.executor.retry_policy.webhook_alert_attempts = 3
    h.executor.payment_failed("m_demo", event())
    with caplog.at_level(logging.ERROR, logger="winback.executor"):
        for _ in range(60):  # two and a half days, an hour at a time: the backoff stops growing at an hour
            h.drain()
            h.clock.advance(hours=1)
    assert len(h.receiver.received) == 41
    assert h.view().webhook.status == "delivered"
    assert {r.headers["Idempotency-Key"] for r in h.receiver.received} == {"m_demo:ord_1:webhook"}
    alerts = [r.getMessage() for r in caplog.records if "still failing" in r.getMessage()]
    assert alerts == ["merchant webhook still failing after 3 tries, re-sent until a 2xx: webhook answered HTTP 500"]


def test_a_webhook_of_a_merchant_taken_out_of_the_config_waits_without_a_traceback(
    make_harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    h = make_harness({"action": "stop"}, receiver=Receiver())
    config = h.executor.config
    h.executor.payment_failed("m_demo", event())
    h.executor.config = config.model_copy(update={"merchants": {}})  # as after a restart without m_demo
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            h.drain()
            h.clock.advance(hours=1)
    assert h.receiver.received == []
    assert h.view().webhook.status == "pending"
    assert not [record for record in caplog.records if record.exc_info]  # a traceback on every try
    h.executor.config = config  # back in the config
    for _ in range(2):
        h.drain()
        h.clock.advance(hours=1)
    assert len(h.receiver.received) == 1


def test_a_webhook_whose_secret_is_not_set_waits_for_it(make_harness: Any) -> None:
    h = make_harness({"action": "stop"}, receiver=Receiver())
    secret_env = h.executor.merchant("m_demo").webhook.secret_env
    secret = h.effects.env.pop(secret_env)
    h.executor.payment_failed("m_demo", event())
    for _ in range(5):
        h.drain()
        h.clock.advance(hours=1)
    assert h.receiver.received == []
    assert h.view().webhook.status == "pending"
    h.effects.env[secret_env] = secret  # set, as after a restart with the variable
    for _ in range(3):
        h.drain()
        h.clock.advance(hours=1)
    assert len(h.receiver.received) == 1
    assert h.view().webhook.status == "delivered"


# -------------------------------------------------------------------------------------- connector trouble


def test_connector_5xx_is_retried_with_the_same_key_and_charged_once(make_harness: Any) -> None:
    h = make_harness(
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=FakeConnector(results=["success"], transient_first=2),
    )
    h.executor.payment_failed("m_demo", event())
    for _ in range(6):
        h.drain()
        h.clock.advance(seconds=10)
    assert h.view().state == "SUCCEEDED"
    assert len(h.connector.calls) == 3
    assert len(set(h.connector.calls)) == 1
    assert len(h.connector.charged) == 1
    assert h.count(transactions) == 2


def test_connector_that_never_answers_is_dead_lettered_without_any_attempt_recorded(make_harness: Any) -> None:
    h = make_harness(
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=FakeConnector(transient_first=1000),
        max_attempts=4,
    )
    h.executor.payment_failed("m_demo", event())
    for _ in range(12):
        h.drain()
        h.clock.advance(seconds=30)
    retry = next(a for a in h.view().actions if a.kind == "retry")
    assert retry.state == "dead"
    assert "gave up after 4 tries" in (retry.last_error or "")
    assert len(h.connector.calls) == 4
    assert h.count(transactions) == 1
    assert h.view().state == "PENDING"


# ------------------------------------------------------------------------------------- nudges and links


def test_nudge_waits_out_quiet_hours_then_sends_a_link_that_pays_once(make_harness: Any) -> None:
    h = make_harness(
        {"action": "retarget", "channel": "whatsapp"},
        connector=FakeConnector(results=["success"]),
    )
    h.clock.now = datetime(2026, 11, 1, 17, 0, tzinfo=UTC)  # 22:30 in Kolkata: quiet until 09:00 (03:30 UTC)
    h.executor.payment_failed("m_demo", event())
    h.drain()
    assert h.outbox == []
    nudge_action = next(a for a in h.view().actions if a.kind == "nudge")
    assert nudge_action.due_at == datetime(2026, 11, 2, 3, 30, tzinfo=UTC)
    h.clock.now = datetime(2026, 11, 2, 3, 30, tzinfo=UTC)
    h.drain()
    assert len(h.outbox) == 1
    message = h.outbox[0]
    assert (message.channel, message.to, message.template_id) == (Channel.WHATSAPP, "+919800000001", "payment_link")
    token = message.variables["link_url"].rsplit("/pay/", 1)[1]
    assert message.idempotency_key == nudge_action_key(h)

    page = h.executor.open_link(token)
    assert (page.order_id, page.amount, page.currency) == ("ord_1", 499.0, "USD")
    assert h.view().nudges[0].clicked_at == h.clock.now

    with pytest.raises(LinkError) as tampered:
        h.executor.open_link(token[:-3] + ("xyz" if not token.endswith("xyz") else "abc"))
    assert tampered.value.status_code == 400

    payment = h.executor.start_link_payment(token, 30, "api", "claim-1")
    outcome = h.effects.perform(payment.action, _order_row(h))
    with h.executor.engine.begin() as conn:
        h.executor.complete(conn, payment.action, outcome)
    view = h.view()
    assert view.state == "SUCCEEDED"
    assert view.attempts[-1].strategy == "retarget_link"
    assert view.attempts[-1].nudge_id == view.nudges[0].nudge_id
    with pytest.raises(LinkError) as reused:
        h.executor.start_link_payment(token, 30, "api", "claim-2")
    assert reused.value.status_code == 409
    h.drain()
    assert len(h.receiver.received) == 1


def test_the_message_says_when_its_link_expires_in_the_merchants_time(make_harness: Any) -> None:
    """Before: ``expires_at`` went to the templates as a UTC ISO instant, so the shipped WhatsApp, SMS and e-mail
    told an Indian customer "valid till 2026-11-04T03:30:00+00:00" about a link that lasts until 09:00 their time."""
    h = make_harness({"action": "retarget", "channel": "sms"})
    h.clock.now = datetime(2026, 11, 2, 3, 30, tzinfo=UTC)  # 09:00 in Kolkata; the link lasts 48 hours
    h.executor.payment_failed("m_demo", event())
    h.drain()
    assert h.outbox[0].variables["expires_at"] == "2026-11-04 09:00 IST"
    assert link_expiry_text(datetime(2026, 7, 1, 16, 0, tzinfo=UTC), "America/New_York") == "2026-07-01 12:00 EDT"
    assert link_expiry_text(datetime(2026, 12, 1, 16, 0, tzinfo=UTC), "America/New_York") == "2026-12-01 11:00 EST"
    assert link_expiry_text(datetime(2026, 12, 1, 16, 0, tzinfo=UTC), "Asia/Dubai") == "2026-12-01 20:00 UTC+04"


def test_nudge_waits_out_the_customers_quiet_hours_too(make_harness: Any) -> None:
    h = make_harness({"action": "retarget", "channel": "whatsapp"})
    # 11:30 in Kolkata (the merchant's day) is 01:00 in New York: a US customer's message waits for 09:00 there.
    h.clock.now = datetime(2026, 11, 2, 6, 0, tzinfo=UTC)
    h.executor.payment_failed("m_demo", event(customer={"country": "US"}))
    h.drain()
    assert h.outbox == []
    nudge_action = next(a for a in h.view().actions if a.kind == "nudge")
    assert nudge_action.due_at == datetime(2026, 11, 2, 14, 0, tzinfo=UTC)  # 09:00 EST, 19:30 IST
    h.clock.now = nudge_action.due_at
    h.drain()
    assert len(h.outbox) == 1


def nudge_action_key(h: Harness) -> str:
    with h.executor.engine.connect() as conn:
        return str(conn.scalar(sa.select(actions.c.idempotency_key).where(actions.c.kind == "nudge")))


def _order_row(h: Harness) -> Any:

    with h.executor.engine.connect() as conn:
        return conn.execute(sa.select(orders)).mappings().first()


def test_an_unanswered_nudge_is_a_decision_point_and_links_expire(make_harness: Any) -> None:
    h = make_harness({"action": "retarget", "channel": "sms"}, {"action": "stop"})
    h.executor.payment_failed("m_demo", event())
    h.drain()
    token = h.outbox[0].variables["link_url"].rsplit("/pay/", 1)[1]
    h.clock.advance(hours=24)
    h.drain()
    follow_up = h.executor.decider.requests[1]  # type: ignore[attr-defined]
    assert [n.channel for n in follow_up.history.nudges] == [Channel.SMS]
    # stop while the link is live: the order stays open until the link expires (the customer may still pay)
    assert h.view().state == "PENDING"
    h.clock.advance(hours=25)
    with pytest.raises(LinkError) as expired:
        h.executor.open_link(token)
    assert expired.value.status_code == 410
    h.drain()
    assert h.view().state == "FAILED"
    assert len(h.receiver.received) == 1


def test_provider_refusal_is_recorded_and_decided_again(make_harness: Any) -> None:
    h = make_harness({"action": "retarget", "channel": "email"}, {"action": "stop"})
    h.executor.payment_failed("m_demo", event(customer={"email": None}))  # email_present, but no address given
    h.drain()
    view = h.view()
    assert [(n.channel, n.status, n.delivered) for n in view.nudges] == [("email", "rejected", False)]
    assert "no email address" in (view.nudges[0].error or "")
    assert view.state == "FAILED"
    assert h.outbox == []


# ------------------------------------------------------------------------------------------ assisted mode


def test_assisted_mode_queues_the_decision_until_an_agent_acts(make_harness: Any) -> None:
    h = make_harness(
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        merchants={"m_demo": demo_merchant(mode="assisted")},
        connector=FakeConnector(results=["success"]),
    )
    assert h.executor.payment_failed("m_demo", event()).state == "AWAITING_AGENT"
    h.drain()
    assert h.connector.calls == []
    assert [item.state for item in h.view().agent_queue] == ["pending"]
    with pytest.raises(AgentQueueError, match="unknown agent action"):
        h.executor.act_on_queued("ord_1", "maybe", "ana", "")
    assert h.executor.act_on_queued("ord_1", "approve", "ana", "looks right") == "PENDING"
    with pytest.raises(AgentQueueError, match="no decision waiting"):
        h.executor.act_on_queued("ord_1", "approve", "ana", "twice")
    h.drain()
    view = h.view()
    assert view.state == "SUCCEEDED"
    assert (view.agent_queue[0].state, view.agent_queue[0].agent) == ("approved", "ana")


def test_assisted_reject_fails_the_order(make_harness: Any) -> None:
    h = make_harness(
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        merchants={"m_demo": demo_merchant(mode="assisted")},
    )
    h.executor.payment_failed("m_demo", event())
    assert h.executor.act_on_queued("ord_1", "reject", "ana", "customer asked us to stop") == "FAILED"
    assert h.view().agent_queue[0].reason == "customer asked us to stop"


# --------------------------------------------------------------------------- the real policy and sandbox


def test_rules_only_decide_through_the_sandbox_connector_over_http(make_harness: Any) -> None:
    sandbox = start_sandbox(seed=3, error_rate=0.3)
    try:
        decider, stop = make_decider(load_catalog(), None, seed=1)
        h = make_harness(decider=decider)
        h.effects.connectors.sandbox_url = sandbox.url
        h.effects.connectors.overrides = {}
        for index in range(8):
            h.executor.payment_failed(
                "m_demo",
                event(
                    order_id=f"ord_{index}",
                    failure={"error_code": "processing_error", "network_decline_code": "96"},
                    payment={"card_network": "mastercard"},
                ),
            )
        for _ in range(40):
            h.drain()
            h.clock.advance(hours=2)
        stop()
        stats = httpx.get(f"{sandbox.url}/v1/stats").json()
    finally:
        sandbox.stop()
    views = [h.view(f"ord_{index}") for index in range(8)]
    assert all(v.state in {"SUCCEEDED", "FAILED"} for v in views)
    made = [a for v in views for a in v.attempts if a.strategy != "initial" and a.strategy != "retarget_link"]
    assert made, "rules-only decide() chose no silent retry for processing errors"
    assert stats["charges"] == len(made)  # every sandbox charge is recorded exactly once, re-sends deduplicated
    assert h.count(webhook_deliveries) == 8
    assert len(h.receiver.received) == 8
    assert h.count(nudges) == len(h.outbox)


def test_config_with_webhook_secret_names_only_env(tmp_path: Path) -> None:
    from service.executor.worker import missing_secrets

    config = config_for(m_demo=demo_merchant())
    assert missing_secrets(config, {}) == ["merchants.m_demo.webhook.secret_env: WB_TEST_WEBHOOK"]
    assert missing_secrets(config, {"WB_TEST_WEBHOOK": "x"}) == []
    assert yaml.safe_dump(config.model_dump(mode="json")).count(SECRET) == 0


def test_start_up_check_names_every_unset_secret_and_every_provider_that_cannot_be_built() -> None:
    """Only webhook secrets were checked at start: a provider key not set was found by the first message, refused
    then on every send. Now every secret variable is named (all of them, not the first) with its key's path, and
    a provider that cannot be built (no ``source``) too; adapters replaced (tests, the demo) skip the providers."""
    from service.executor.worker import StartupCheckError, check_secrets

    merchant = demo_merchant(
        providers={
            "whatsapp": {"kind": "gupshup", "api_key_env": "WB_UNSET_WA"},
            "sms": {"kind": "karix", "username_env": "WB_UNSET_USER", "password_env": "WB_UNSET_PW", "source": "X"},
            "email": {"kind": "smtp", "host": "localhost", "sender": "pay@shop.example"},
        }
    )
    config = config_for(m_demo=merchant)
    with pytest.raises(StartupCheckError) as info:
        check_secrets(config, {})
    assert str(info.value) == (
        "secrets are not set: merchants.m_demo.webhook.secret_env: WB_TEST_WEBHOOK; "
        "merchants.m_demo.providers.whatsapp.api_key_env: WB_UNSET_WA; "
        "merchants.m_demo.providers.sms.username_env: WB_UNSET_USER; "
        "merchants.m_demo.providers.sms.password_env: WB_UNSET_PW"
        " | channel providers cannot be built: merchant 'm_demo', providers.whatsapp (kind gupshup): needs 'source'"
    )
    with pytest.raises(
        StartupCheckError, match=r"^secrets are not set: merchants\.m_demo\.webhook\.secret_env: WB_TEST_WEBHOOK$"
    ):
        check_secrets(config, {}, providers=False)
    check_secrets(config, {"WB_TEST_WEBHOOK": "x"}, providers=False)


def test_start_up_check_names_an_unset_connector_endpoint_key() -> None:
    """A connector endpoint's ``api_key_env`` (CONTRACT.md section 4's ``SWITCH_KEY``) left unset passed the start-up
    check: `winback executor run` started, and every silent retry through that connector was refused at send time.
    It is named with its key's path like the other secrets; connectors replaced (tests, the demo) skip it."""
    from service.executor.worker import StartupCheckError, check_secrets

    merchant = demo_merchant(
        connector_endpoints={
            "stripe": {"kind": "sandbox"},
            "adyen": {"kind": "http", "base_url": "https://switch.merchant.example", "api_key_env": "WB_UNSET_SWITCH"},
        }
    )
    config = config_for(m_demo=merchant)
    with pytest.raises(StartupCheckError) as info:
        check_secrets(config, {"WB_TEST_WEBHOOK": "x"})
    assert str(info.value) == (
        "secrets are not set: merchants.m_demo.connector_endpoints.adyen.api_key_env: WB_UNSET_SWITCH"
    )
    check_secrets(config, {"WB_TEST_WEBHOOK": "x", "WB_UNSET_SWITCH": "k"})
    check_secrets(config, {"WB_TEST_WEBHOOK": "x"}, connectors=False)


def _sent_through_templates(h: Harness, templates: Path) -> list[tuple[OutboundMessage, Any]]:
    """Give ``h`` real adapters of the merchants' providers (kind ``fake``: rendered, kept in memory) over the
    templates in ``templates``; the (message, rendered) pairs they sent, filled in as they send."""
    from service.executor.channels.adapters import MemoryAdapter, build_adapters

    sent: list[tuple[OutboundMessage, Any]] = []

    def adapters(merchant_id: str, merchant: MerchantConfig, http: httpx.AsyncClient) -> dict[Channel, Any]:
        built = build_adapters(merchant_id, merchant, {"WINBACK_TEMPLATES_DIR": str(templates)}, http)
        for adapter in built.values():
            assert isinstance(adapter, MemoryAdapter)
            adapter.sent = _AppendOnSet(sent)
        return built

    h.effects.adapter_factory = adapters
    return sent


class _AppendOnSet(dict[str, Any]):
    def __init__(self, into: list[tuple[OutboundMessage, Any]]) -> None:
        super().__init__()
        self.into = into

    def setdefault(self, key: str, value: Any = None) -> Any:
        self.into.append(value)
        return super().setdefault(key, value)


def _branded_sms(tmp_path: Path, text: str) -> Path:
    from service.executor.channels.templates import DEFAULT_TEMPLATES_DIR

    root = tmp_path / "templates"
    shutil.copytree(DEFAULT_TEMPLATES_DIR, root)
    (root / "m_demo").mkdir()
    (root / "m_demo" / "sms.en.j2").write_text(text)
    return root


SMS_MERCHANT = {"retarget": {"channels": ["sms"]}, "providers": {"sms": {"kind": "fake"}}}


def test_a_template_greeting_the_customer_by_name_is_sent_with_the_events_name(
    make_harness: Any, tmp_path: Path
) -> None:
    """``customer_name`` is documented and start-up rendered every template with a sample name, but the executor
    never sent it: ``Hi {{ customer_name }}`` passed start-up, then every send was refused ("'customer_name' is
    undefined") and the order FAILED. It is now the event's ``customer.name``, "" when there is none."""
    from service.executor.channels.templates import TEMPLATE_VARIABLES, validate_templates

    root = _branded_sms(tmp_path, "Hi {{ customer_name }}, your order {{ order_id }} is unpaid: {{ link_url }}")
    merchant = demo_merchant(**SMS_MERCHANT)
    validate_templates(config_for(m_demo=merchant), root)  # start-up accepts it
    retarget = {"action": "retarget", "channel": "sms"}
    h = make_harness(retarget, retarget, {"action": "stop"}, merchants={"m_demo": merchant})
    sent = _sent_through_templates(h, root)
    h.executor.payment_failed("m_demo", event("ord_1", customer={"name": "Asha"}))
    h.executor.payment_failed("m_demo", event("ord_2"))  # no name given
    h.drain()
    assert [n.status for n in h.view("ord_1").nudges + h.view("ord_2").nudges] == ["accepted", "accepted"]
    texts = sorted(rendered.text for _, rendered in sent)
    assert texts[0].startswith("Hi , your order ord_2 is unpaid: ")
    assert texts[1].startswith("Hi Asha, your order ord_1 is unpaid: ")
    # What start-up renders with is what is sent: the same variables, none more, none fewer.
    assert {tuple(sorted(message.variables)) for message, _ in sent} == {tuple(sorted(TEMPLATE_VARIABLES))}


@pytest.mark.parametrize(("amount", "currency", "shown"), [(12.345, "KWD", "12.345"), (1200.0, "JPY", "1200")])
def test_the_message_and_the_pay_page_show_the_amount_charged_in_its_currencys_minor_units(
    make_harness: Any, tmp_path: Path, amount: float, currency: str, shown: str
) -> None:
    """Both formatted every amount with two decimals: an order of 12.345 KWD was offered as "KWD 12.35" while
    12.345 was charged (and 1200 JPY as "1200.00"). Both now use the currency's ISO 4217 minor units."""
    from service.executor.channels.templates import DEFAULT_TEMPLATES_DIR
    from service.executor.pages import render

    h = make_harness({"action": "retarget", "channel": "sms"}, merchants={"m_demo": demo_merchant(**SMS_MERCHANT)})
    sent = _sent_through_templates(h, DEFAULT_TEMPLATES_DIR)
    h.executor.payment_failed("m_demo", event(amount=amount, currency=currency))
    h.drain()
    [(message, rendered)] = sent
    assert f"{currency} {shown} " in rendered.text
    page = h.executor.open_link(message.variables["link_url"].rsplit("/pay/", 1)[1])
    html = render(
        "pay.html",
        title="Complete your payment",
        token="t",
        merchant_name=page.merchant_id,
        order_id=page.order_id,
        amount=page.amount,
        currency=page.currency,
        expires_at=page.expires_at,
    )
    assert f'<p class="amount">{shown} {currency}</p>' in html


def test_a_send_the_rules_forbid_now_is_decided_again_not_sent(make_harness: Any) -> None:
    h = make_harness({"action": "retarget", "channel": "push"}, {"action": "stop"})
    h.executor.payment_failed("m_demo", event())  # the customer has no app: push is unreachable
    h.drain()
    assert h.outbox == []
    assert h.view().nudges == []
    assert h.view().state == "FAILED"
    assert len(h.executor.decider.requests) == 2  # type: ignore[attr-defined]


# ------------------------------------------------------------------------ an order settled mid-charge


def _claim_due(h: Harness, kind: str) -> Any:
    claimed = h.executor.claim(10, 30, "w1", f"claim-{kind}")
    return next(action for action in claimed if action.kind == kind)


def test_a_charge_made_while_the_order_was_settled_elsewhere_is_recorded_and_flagged(
    make_harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    h = make_harness(
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=FakeConnector(results=["success"]),
    )
    h.executor.payment_failed("m_demo", event())
    retry = _claim_due(h, "retry")
    outcome = h.effects.perform(retry, _order_row(h))  # the connector charges the customer ...
    succeeded = {"order_id": "ord_1", "txn_id": "txn_ext", "occurred_at": START.isoformat(), "idempotency_key": "s1"}
    assert (
        h.executor.payment_succeeded("m_demo", succeeded).state == "SUCCEEDED"
    )  # ... as the merchant reports a payment
    with caplog.at_level("WARNING", logger="winback.executor"):
        h.worker.record([(retry, outcome)])
    view = h.view()
    assert view.state == "SUCCEEDED"
    assert view.success_txn_id == "txn_ext"  # the merchant's payment stays the order's
    charged = [a for a in view.attempts if a.strategy == "cascade"]
    assert [(a.status, a.connector) for a in charged] == [("success", "adyen")]  # the money taken is on record
    assert any("a refund may be needed" in record.getMessage() for record in caplog.records)
    assert not any("outcome is dropped" in record.getMessage() for record in caplog.records)
    h.worker.record([(retry, outcome)])  # recorded once, however often the worker retries
    assert len([a for a in h.view().attempts if a.strategy == "cascade"]) == 1
    h.drain()
    assert len(h.receiver.received) == 1  # one webhook, for the merchant's payment


def _link_and_due_retry(h: Harness) -> str:
    """An order with a live payment link (sent by SMS) and, a day later, a silent retry due now; the link's token."""
    h.executor.payment_failed("m_demo", event())
    h.drain()
    token: str = h.outbox[0].variables["link_url"].rsplit("/pay/", 1)[1]
    h.clock.advance(hours=24)
    follow_up = _claim_due(h, "follow_up")
    h.worker.record([(follow_up, h.effects.perform(follow_up, _order_row(h)))])
    return token


def test_a_link_is_not_paid_while_a_silent_retry_of_its_order_is_with_the_connector(make_harness: Any) -> None:
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=FakeConnector(results=["failure", "success"]),
    )
    token = _link_and_due_retry(h)
    retry = _claim_due(h, "retry")
    with pytest.raises(LinkError) as busy:
        h.executor.start_link_payment(token, 30, "api", "claim-link")
    assert busy.value.status_code == 409
    assert "being processed" in str(busy.value)
    h.worker.record([(retry, h.effects.perform(retry, _order_row(h)))])  # the retry is declined
    payment = h.executor.start_link_payment(token, 30, "api", "claim-link")  # the link was not used up
    h.worker.record([(payment.action, h.effects.perform(payment.action, _order_row(h)))])
    view = h.view()
    assert view.state == "SUCCEEDED"
    assert [(a.strategy, a.status) for a in view.attempts[1:]] == [
        ("cascade", "failure"),
        ("retarget_link", "success"),
    ]


def test_a_silent_retry_waits_while_a_link_payment_of_its_order_is_with_the_connector(make_harness: Any) -> None:
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=FakeConnector(results=["success"]),
    )
    token = _link_and_due_retry(h)
    payment = h.executor.start_link_payment(token, 30, "api", "claim-link")
    retry = _claim_due(h, "retry")
    h.worker.record([(retry, h.effects.perform(retry, _order_row(h)))])
    assert h.connector.calls == []  # the retry did not charge beside the link payment
    waiting = next(a for a in h.view().actions if a.kind == "retry")
    assert waiting.state == "scheduled"
    assert waiting.due_at == payment.action.due_at  # it looks again when the link payment's lease ends
    h.worker.record([(payment.action, h.effects.perform(payment.action, _order_row(h)))])
    h.clock.advance(seconds=31)
    h.drain()
    view = h.view()
    assert view.state == "SUCCEEDED"
    assert len(h.connector.calls) == 1  # the link payment only
    assert next(a for a in view.actions if a.kind == "retry").state == "cancelled"


def test_a_message_sent_while_the_order_was_settled_elsewhere_is_recorded_once(make_harness: Any) -> None:
    h = make_harness({"action": "retarget", "channel": "sms"})
    h.executor.payment_failed("m_demo", event())
    nudge = _claim_due(h, "nudge")
    outcome = h.effects.perform(nudge, _order_row(h))  # the SMS goes out ...
    succeeded = {"order_id": "ord_1", "txn_id": "txn_ext", "occurred_at": START.isoformat(), "idempotency_key": "s1"}
    assert (
        h.executor.payment_succeeded("m_demo", succeeded).state == "SUCCEEDED"
    )  # ... as the merchant reports a payment
    h.worker.record([(nudge, outcome)])
    h.worker.record([(nudge, outcome)])
    view = h.view()
    assert [(n.channel, n.status) for n in view.nudges] == [("sms", "accepted")]
    with h.executor.engine.connect() as conn:  # counted among the messages sent, once (it was left out before)
        assert conn.scalar(sa.select(orders.c.nudge_count)) == 1
    assert len(h.outbox) == 1
    assert not [a for a in view.actions if a.kind == "follow_up"]  # nothing more for a settled order
    assert view.state == "SUCCEEDED"


def test_a_follow_up_that_ran_while_its_order_was_settled_is_dropped_quietly(
    make_harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Settling cancels the order's claimed follow-ups and closes; the worker that ran one has nothing to record.
    That is routine (a link paid between a claim and its recording), not a failed batch or a dropped outcome."""
    h = make_harness({"action": "retarget", "channel": "sms"})
    h.executor.payment_failed("m_demo", event())
    h.drain()
    h.clock.advance(hours=24)
    follow_up = _claim_due(h, "follow_up")
    outcome = h.effects.perform(follow_up, _order_row(h))
    succeeded = {"order_id": "ord_1", "txn_id": "txn_ext", "occurred_at": START.isoformat(), "idempotency_key": "s1"}
    assert h.executor.payment_succeeded("m_demo", succeeded).state == "SUCCEEDED"
    with caplog.at_level(logging.WARNING, logger="winback"):
        h.worker.record([(follow_up, outcome)])
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    follow_ups = [a for a in h.view().actions if a.kind == "follow_up"]
    assert [a.state for a in follow_ups] == ["cancelled"]
    h.drain()
    assert webhook_events(h) == ["order.succeeded"]


# ---------------------------------------------------------------- charges racing settlement (review)


@dataclass
class HookConnector(FakeConnector):
    """FakeConnector that runs ``during[key_part]()`` while a charge whose key contains ``key_part`` is with it
    (a slow connector), and can 'lose the answer' of the first call for a key (charged, then TransientError)."""

    during: dict[str, Callable[[], None]] = field(default_factory=dict)
    lose_answer: set[str] = field(default_factory=set)

    def charge(self, request: ChargeRequest) -> ChargeResult:
        for part, hook in list(self.during.items()):
            if part in request.idempotency_key:
                del self.during[part]
                hook()
        result = super().charge(request)
        for part in list(self.lose_answer):
            if part in request.idempotency_key:
                self.lose_answer.discard(part)
                raise TransientError("timeout calling connector 'adyen': ReadTimeout")  # money taken, answer lost
        return result


def successes(h: Harness) -> list[str]:
    return [key for key, result in h.connector.charged.items() if result.status == "success"]


def webhook_events(h: Harness) -> list[str]:
    return [json.loads(r.content)["event"] for r in h.receiver.received]


def runtime(h: Harness) -> ExecutorRuntime:
    return ExecutorRuntime(h.executor, h.effects, ExecutorSettings(database_url="sqlite://", lease_seconds=30))


def token_of(h: Harness, index: int = 0) -> str:
    return h.outbox[index].variables["link_url"].rsplit("/pay/", 1)[1]


# --------------------------------------------------------------------- 1. stop / reject while a link pays


def test_a_stop_waits_for_a_link_payment_that_is_with_the_connector(make_harness: Any) -> None:
    """The follow-up decides 'stop' while the customer's link payment is with the connector: the order is failed
    only once no charge of it is out, so the paid order gets order.succeeded, not order.failed."""
    h = make_harness(
        {"action": "retarget", "channel": "sms"}, {"action": "stop"}, connector=HookConnector(results=["success"])
    )
    h.executor.payment_failed("m_demo", event())
    h.drain()  # the SMS with the link goes out
    h.clock.advance(hours=24)  # the follow-up is due
    h.connector.during["link"] = h.drain  # while the link charge is with the connector, the worker runs

    code, _title, message = _pay(runtime(h), token_of(h))
    h.drain()
    assert code == 200
    assert "is paid" in message
    assert successes(h)  # money taken
    assert webhook_events(h) == ["order.succeeded"], h.view().state


def test_an_agent_reject_waits_for_a_link_payment_that_is_with_the_connector(make_harness: Any) -> None:
    """Assisted mode: an agent rejects while the customer's link payment is with the connector; the reject's close
    waits for the charge, and the paid order gets order.succeeded."""
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        merchants={"m_demo": demo_merchant(mode="assisted")},
        connector=HookConnector(results=["success"]),
    )
    h.executor.payment_failed("m_demo", event())
    h.executor.act_on_queued("ord_1", "approve", "ana", "send the link")
    h.drain()  # SMS sent
    h.clock.advance(hours=24)
    h.drain()  # follow-up: the next decision is queued for an agent
    assert h.view().state == "AWAITING_AGENT"
    h.connector.during["link"] = lambda: h.executor.act_on_queued("ord_1", "reject", "ana", "stop it")

    code, _title, _message = _pay(runtime(h), token_of(h))
    h.drain()
    assert code == 200
    assert successes(h)
    assert webhook_events(h) == ["order.succeeded"], h.view().state


# ------------------------------------------------------------- 2. a lease that ends while the charge is out


def test_a_link_is_refused_while_a_retry_outlasts_its_lease_at_the_connector(make_harness: Any) -> None:
    """A slow connector can outlast the 30 s lease: a claimed retry blocks the order's links (409) until it is
    recorded, whatever its lease says, so the customer is not charged twice."""
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=HookConnector(results=["success", "success"]),
    )
    token = _link_and_due_retry(h)
    answers: list[tuple[int, str, str]] = []

    def customer_pays_after_the_lease() -> None:
        h.clock.advance(seconds=31)
        try:
            answers.append(_pay(runtime(h), token))
        except LinkError as refused:
            answers.append((refused.status_code, refused.title, str(refused)))

    h.connector.during["retry"] = customer_pays_after_the_lease
    h.worker.run_once()
    assert answers[0][0] == 409, answers
    assert len(successes(h)) == 1, successes(h)


def test_a_retry_waits_for_a_link_payment_left_unrecorded_by_a_dead_api_process(
    make_harness: Any,
) -> None:
    """The API process charged a link payment and died before recording it: the due retry waits, a worker re-sends
    the link payment with its key once its lease ends and records it; one charge, on record."""
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=HookConnector(results=["success", "success"]),
    )
    token = _link_and_due_retry(h)
    payment = h.executor.start_link_payment(token, 30, "api", "claim-link")
    h.effects.perform(payment.action, _order_row(h))  # the customer is charged ... and the API process dies
    h.clock.advance(seconds=29)
    retry = _claim_due(h, "retry")
    h.clock.advance(seconds=2)
    h.worker.record([(retry, h.effects.perform(retry, _order_row(h)))])
    h.clock.advance(minutes=5)
    h.drain()
    recorded = h.count(transactions, transactions.c.status == "success")

    assert (len(successes(h)), recorded) == (1, 1), h.view().actions


# ------------------------------------------------------------- 3. a stale order snapshot inside a batch


def test_a_worker_does_not_charge_an_order_paid_by_link_while_its_batch_ran(make_harness: Any) -> None:
    """A worker's batch holds two retries; while it charges the first order, the second is paid by link. The
    worker reads the order again right before charging and does not charge it."""
    h = make_harness(
        {"action": "retry", "strategy": "cascade", "connector": "adyen", "delay": timedelta(hours=24, minutes=1)},
        {"action": "retarget", "channel": "sms"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen", "delay": timedelta(minutes=1)},
        connector=HookConnector(results=["success", "failure", "success"]),
    )
    h.executor.payment_failed("m_demo", event("ord_2"))
    h.executor.payment_failed("m_demo", event("ord_1"))
    h.drain()  # ord_1's SMS
    token = token_of(h)
    h.clock.advance(hours=24)
    h.drain()  # ord_1's follow-up decides a retry in a minute
    h.clock.advance(minutes=1)
    payment = h.executor.start_link_payment(token, 30, "api", "claim-link")  # the customer clicks pay

    def link_payment_finishes() -> None:
        with h.executor.engine.connect() as conn:
            order = h.executor.orders_of(conn, [payment.action])[("m_demo", "ord_1")]
        outcome = h.effects.perform(payment.action, order)
        with h.executor.engine.begin() as conn:
            h.executor.complete(conn, payment.action, outcome)

    h.connector.during["ord_2:retry"] = link_payment_finishes
    assert h.worker.run_once() == 2
    ord_1 = [k for k in successes(h) if ":ord_1:" in k]
    assert h.view("ord_1").state == "SUCCEEDED"
    assert len(ord_1) == 1, ord_1


# ------------------------------------------------------------- 4. a charge whose answer was lost (Transient)


def test_a_link_payment_whose_answer_was_lost_holds_back_the_retry_until_its_re_send(
    make_harness: Any,
) -> None:
    """The connector took the link payment's money but the answer was lost: the charge counts as out, so the due
    retry waits, and the link payment's re-send (same key) gets the stored answer and is recorded."""
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=HookConnector(results=["success", "success"], lose_answer={":link:"}),
    )
    token = _link_and_due_retry(h)  # a retry of the order is due now
    code, _title, message = _pay(runtime(h), token)
    assert code == 202
    assert "processing" in message
    for _ in range(5):
        h.drain()
        h.clock.advance(seconds=10)
    recorded = h.count(transactions, transactions.c.status == "success")
    link = next(a for a in h.view().actions if a.kind == "link_payment")

    assert (len(successes(h)), recorded, link.state) == (1, 1, "done")


def test_the_window_end_waits_for_a_link_payment_whose_answer_was_lost(make_harness: Any) -> None:
    """The customer pays a link just before the window-end close and the answer is lost: the close waits for the
    re-send, which records the success; the merchant gets order.succeeded."""
    h = make_harness(
        {"action": "retarget", "channel": "sms", "delay": timedelta(days=6)},
        connector=HookConnector(results=["success"], lose_answer={":link:"}),
    )
    h.executor.payment_failed("m_demo", event())
    h.clock.advance(days=6)
    h.drain()  # the SMS with the link (live 48 h: the window-end close waits for it, until START + 8 days)
    h.clock.advance(days=1)
    h.drain()  # window end and follow-up ('stop'): the order stays open while the link is live
    h.clock.now = START + timedelta(days=8) - timedelta(seconds=0.5)  # the re-send is due 1 s later (backoff)
    code, _title, message = _pay(runtime(h), token_of(h))
    assert code == 202
    assert "will confirm" in message
    h.clock.advance(seconds=0.5)
    h.drain()  # the link's expiry: the close is due; the link payment's re-send is not yet
    for _ in range(5):
        h.clock.advance(seconds=1)
        h.drain()
    assert successes(h)  # the customer's money was taken

    assert (webhook_events(h), h.count(transactions, transactions.c.status == "success")) == (["order.succeeded"], 1)


def test_a_worker_does_not_charge_an_order_the_merchant_reported_paid_while_its_batch_ran(make_harness: Any) -> None:
    """While a worker charges one order of its batch, the merchant reports another paid: that order's retry, not
    yet sent, is skipped."""
    h = make_harness(
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=HookConnector(results=["failure", "success"]),
    )
    h.executor.payment_failed("m_demo", event("ord_2"))
    h.executor.payment_failed("m_demo", event("ord_1"))
    paid = {"order_id": "ord_1", "txn_id": "txn_ext", "occurred_at": START.isoformat(), "idempotency_key": "s1"}
    h.connector.during["ord_2:retry"] = lambda: h.executor.payment_succeeded("m_demo", paid)
    h.worker.run_once()
    assert h.view("ord_1").success_txn_id == "txn_ext"
    assert [k for k in h.connector.calls if ":ord_1:" in k] == []


# ------------------------------------------------------------- 5. a re-send is not the same request


def test_a_re_send_after_a_lost_answer_is_the_same_request_and_gets_the_stored_answer(
    make_harness: Any,
) -> None:
    """Against the sandbox switch, which refuses a used key with another body (409): the first send charges and
    its answer is lost (503 after charging); the re-send is the same request, gets the stored answer, and the
    charge is recorded."""
    from service.executor.sandbox import start_sandbox

    sandbox = start_sandbox(seed=3, error_rate=1.0)  # 503 after charging: the answer is lost
    try:
        h = make_harness({"action": "retry", "strategy": "cascade", "connector": "adyen"})
        h.effects.connectors.sandbox_url = sandbox.url
        h.effects.connectors.overrides = {}
        state = sandbox.server.config.app.state.sandbox
        h.executor.payment_failed("m_demo", event())
        h.drain()  # 3 tries, all 503: Transient, re-send scheduled
        state.error_rate = 0.0  # the switch answers again
        h.clock.advance(seconds=10)
        h.drain()
        charges = state.answers
    finally:
        sandbox.stop()
    retry = next(a for a in h.view().actions if a.kind == "retry")
    assert len(charges) == 1  # the customer was charged once

    assert (retry.state, h.count(transactions)) == ("done", 2), retry.last_error


# ------------------------------------------------------------- 6. what the customer is told


def test_pay_tells_a_charged_customer_the_truth_when_recording_fails(
    make_harness: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connector charged the link payment and recording it fails (database busy): the customer hears what the
    switch answered, and the still-claimed action is left for a worker's re-send."""
    import asyncio

    from service.executor import routes

    h = make_harness({"action": "retarget", "channel": "sms"}, connector=HookConnector(results=["success"]))
    h.executor.payment_failed("m_demo", event())
    h.drain()

    def broken_complete(*_args: Any, **_kw: Any) -> None:
        raise sa.exc.OperationalError("UPDATE actions", {}, Exception("database is locked"))

    monkeypatch.setattr(h.executor, "complete", broken_complete)
    response = asyncio.run(routes.pay(token_of(h), runtime(h)))
    assert successes(h)  # charged

    assert response.status_code in (200, 202), response.body.decode()[:300]


def test_a_charge_with_a_lost_answer_on_an_order_settled_since_is_left_to_an_operator_not_re_sent(
    make_harness: Any,
) -> None:
    """A retry's answer is lost, then the merchant reports the order paid. Sending the retry again would charge a
    settled order if the first send never reached the switch, and not asking would hide it if it did: the retry
    is dead-lettered naming the payment to ask the connector about, not re-sent and not silently cancelled."""
    h = make_harness(
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=HookConnector(results=["success"], lose_answer={":retry:"}),
    )
    h.executor.payment_failed("m_demo", event())
    h.drain()  # charged, answer lost: a re-send is scheduled
    assert len(h.connector.calls) == 1
    paid = {"order_id": "ord_1", "txn_id": "txn_ext", "occurred_at": START.isoformat(), "idempotency_key": "s1"}
    assert h.executor.payment_succeeded("m_demo", paid).state == "SUCCEEDED"
    retry = next(a for a in h.view().actions if a.kind == "retry")
    assert retry.state == "scheduled"  # not cancelled: it may have taken the money
    h.clock.advance(minutes=1)
    h.drain()
    retry = next(a for a in h.view().actions if a.kind == "retry")
    assert retry.state == "dead"
    assert "ask connector 'adyen' about payment ord_1_2" in (retry.last_error or "")
    assert len(h.connector.calls) == 1  # not sent again
    assert webhook_events(h) == ["order.succeeded"]


# ------------------------------------------------------------- charges racing each other (second review)


PAID_BY_MERCHANT = {"order_id": "ord_1", "txn_id": "txn_ext", "occurred_at": START.isoformat(), "idempotency_key": "s1"}


# A retry that waited for a link payment is replaced by the decision taken after the link was declined.
def test_a_later_decision_replaces_a_retry_that_waited_for_a_declined_link(make_harness: Any) -> None:
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},  # follow-up: retry 1
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},  # after the link's decline: retry 2
        connector=FakeConnector(results=["failure", "success", "success"]),
    )
    token = _link_and_due_retry(h)
    payment = h.executor.start_link_payment(token, 30, "api", "claim-link")
    retry = _claim_due(h, "retry")
    h.worker.record([(retry, h.effects.perform(retry, _order_row(h)))])  # deferred behind the link
    h.worker.record([(payment.action, h.effects.perform(payment.action, _order_row(h)))])  # link declined
    for _ in range(4):
        h.clock.advance(seconds=31)
        h.drain()
    assert len(successes(h)) == 1, (successes(h), [(a.kind, a.state) for a in h.view().actions])


def test_a_decision_after_a_declined_link_does_not_count_the_retry_still_waiting_as_made(make_harness: Any) -> None:
    """A retry planned for after payday took payment number 2; the customer then paid on the SMS's live link
    (number 3) and was declined. The decision that followed saw attempts 1 and 3, and the rules count a gap as a
    silent retry made: a budget of one retry looked spent by a retry that had not gone out (and that this decision
    replaces)."""
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen", "delay": timedelta(days=3)},
        {"action": "stop"},
    )
    h.executor.payment_failed("m_demo", event())
    h.drain()  # the SMS with its link
    h.clock.advance(hours=24)
    h.drain()  # the follow-up: a retry in three days, payment number 2
    h.clock.advance(hours=6)
    assert _pay(runtime(h), token_of(h))[0] == 402
    last = h.executor.decider.requests[-1]  # type: ignore[attr-defined]
    assert [(a.attempt_number, a.strategy) for a in last.history.attempts] == [(1, "initial"), (2, "retarget_link")]


# A retry's first send waits while an earlier retry's answer is lost (its re-send asks the switch).
def test_a_new_retry_waits_for_an_earlier_retry_whose_answer_was_lost(make_harness: Any) -> None:
    h = make_harness(
        {"action": "retarget", "channel": "sms"},  # link L1, follow-up in 24 h
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},  # after L1 is declined: retry A
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},  # at the follow-up: retry B
        connector=HookConnector(results=["failure", "success", "success"], lose_answer={":retry:dec_2"}),
    )
    h.executor.retry_policy.backoff_base_seconds = 60.0
    h.executor.payment_failed("m_demo", event())
    h.drain()
    h.clock.advance(hours=24, seconds=-10)
    code, _t, _m = _pay(runtime(h), token_of(h))  # declined -> retry A now
    assert code == 402
    h.drain()  # retry A charged, answer lost; re-send in 60 s
    h.clock.advance(seconds=10)
    h.drain()  # follow-up -> retry B
    for _ in range(5):
        h.clock.advance(minutes=1)
        h.drain()
    assert len(successes(h)) == 1, successes(h)


# A second link of the order is refused while the first link payment's answer is lost.
def test_a_second_link_is_refused_while_the_first_links_answer_is_lost(make_harness: Any) -> None:
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retarget", "channel": "email", "delay": timedelta(hours=24)},
        merchants={"m_demo": demo_merchant(retarget={"link_ttl_hours": 96})},
        connector=HookConnector(results=["success", "success"], lose_answer={":link:"}),
    )
    h.executor.payment_failed("m_demo", event())
    h.drain()
    h.clock.advance(hours=24)
    h.drain()  # follow-up -> an email with a second link, in 3 h
    while len(h.outbox) < 2 and h.clock.now < START + timedelta(hours=90):
        h.clock.advance(minutes=30)
        h.drain()
    print("second link at", h.clock.now)
    assert len(h.outbox) == 2
    code, _t, _m = _pay(runtime(h), token_of(h, 0))
    assert code == 202  # "processing": money taken, answer lost
    try:
        code2, _t, _m = _pay(runtime(h), token_of(h, 1))
    except LinkError as refused:
        code2 = refused.status_code
    for _ in range(4):
        h.clock.advance(seconds=10)
        h.drain()
    assert (code2, len(successes(h))) == (409, 1), (code2, successes(h))


# A retry held back by an open circuit was never sent: it neither blocks links nor outlives a settled order.
@dataclass
class OpenCircuit(FakeConnector):
    """A connector whose circuit is open while ``open`` (nothing is sent); otherwise a FakeConnector."""

    open: bool = True

    def charge(self, request: ChargeRequest) -> ChargeResult:
        if self.open:
            raise CircuitOpenError("circuit of connector 'adyen' is open after 5 failures")
        return super().charge(request)


def test_a_retry_held_by_an_open_circuit_is_not_a_possible_charge_when_the_order_is_paid(
    make_harness: Any,
) -> None:
    h = make_harness({"action": "retry", "strategy": "cascade", "connector": "adyen"}, connector=OpenCircuit())
    h.executor.payment_failed("m_demo", event())
    h.drain()  # circuit open: nothing sent
    assert h.connector.charged == {}
    assert h.executor.payment_succeeded("m_demo", PAID_BY_MERCHANT).state == "SUCCEEDED"
    h.clock.advance(minutes=1)
    h.drain()
    retry = next(a for a in h.view().actions if a.kind == "retry")
    assert retry.state == "cancelled", (retry.state, retry.last_error)


def test_a_link_is_not_held_back_by_a_retry_waiting_out_an_open_circuit(make_harness: Any) -> None:
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=OpenCircuit(results=["success"]),
    )
    token = _link_and_due_retry(h)
    h.drain()  # the retry meets the open circuit: never sent
    assert h.connector.charged == {}
    try:
        code, *_ = _pay(runtime(h), token)
    except LinkError as refused:
        code = refused.status_code
    assert code != 409


# Assisted mode: a retry whose answer was lost is re-sent (and recorded) while its order waits for an agent.
def test_assisted_a_lost_answer_retry_is_re_sent_while_the_order_awaits_its_agent(make_harness: Any) -> None:
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        merchants={"m_demo": demo_merchant(mode="assisted")},
        connector=HookConnector(results=["failure", "success"], lose_answer={":retry:"}),
    )
    h.executor.retry_policy.backoff_base_seconds = 60.0
    h.executor.payment_failed("m_demo", event())
    h.executor.act_on_queued("ord_1", "approve", "ana", "send the link")
    h.drain()  # SMS; its follow-up is due in 24 h
    h.clock.advance(hours=24, seconds=-10)
    assert _pay(runtime(h), token_of(h))[0] == 402  # declined: the next decision waits for an agent
    h.executor.act_on_queued("ord_1", "approve", "ana", "retry")
    _spared_by_the_last_decision(h, "follow_up")  # the SMS's follow-up was claimed when the retry was planned
    h.drain()  # the retry charges the customer; the answer is lost (re-send in 60 s)
    h.clock.advance(seconds=10)
    h.drain()  # the follow-up: a decision for the agent, AWAITING_AGENT
    assert h.view().state == "AWAITING_AGENT"
    h.clock.advance(minutes=2)
    h.drain()  # the re-send is due
    retry = next(a for a in h.view().actions if a.kind == "retry")
    assert (retry.state, h.count(transactions, transactions.c.status == "success")) == ("done", 1), retry.last_error


# The API died mid link payment, then the merchant reports the order paid: dead-lettered, one webhook.
def test_a_link_payment_left_by_a_dead_api_on_an_order_paid_since_is_dead_lettered_with_one_webhook(
    make_harness: Any,
) -> None:
    h = make_harness({"action": "retarget", "channel": "sms"}, connector=HookConnector(results=["success"]))
    h.executor.payment_failed("m_demo", event())
    h.drain()
    payment = h.executor.start_link_payment(token_of(h), 30, "api", "claim-link")
    h.effects.perform(payment.action, _order_row(h))  # charged; the API process dies
    assert h.executor.payment_succeeded("m_demo", PAID_BY_MERCHANT).state == "SUCCEEDED"
    for _ in range(5):
        h.clock.advance(seconds=31)
        h.drain()
    link = next(a for a in h.view().actions if a.kind == "link_payment")
    assert link.state == "dead"
    assert "ask connector" in (link.last_error or "")
    assert webhook_events(h) == ["order.succeeded"]
    assert h.view().state == "SUCCEEDED"


# ------------------------------------------------------------- sends, not claims (third review)


def actions_of(h: Any) -> list[tuple[str, str, int]]:
    return [(a.kind, a.state, a.attempts) for a in h.view().actions]


def test_pay_during_an_open_circuit_gives_the_link_back_and_charges_nothing(make_harness: Any) -> None:
    h = make_harness({"action": "retarget", "channel": "sms"}, connector=OpenCircuit(results=["success"]))
    h.executor.payment_failed("m_demo", event())
    h.connector.open = False
    h.drain()  # SMS with the link
    h.connector.open = True
    code, _title, message = _pay(runtime(h), token_of(h))
    h.connector.open = False  # the circuit closes again 30 s later
    h.clock.advance(seconds=31)
    h.drain()
    assert code == 503
    assert "Your link still works" in message
    assert successes(h) == []  # nothing charged behind the customer's back
    assert _pay(runtime(h), token_of(h))[0] == 200  # the link pays once the connector takes charges again
    assert len(successes(h)) == 1


def test_two_first_send_retries_claimed_together_do_not_wait_for_each_other(make_harness: Any) -> None:
    h = make_harness(
        {"action": "retarget", "channel": "sms"},  # link; follow-up F in 24 h
        {"action": "retry", "strategy": "cascade", "connector": "adyen", "delay": timedelta(hours=24)},  # A
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},  # F's decision: B, now
        connector=OpenCircuit(results=["failure", "success", "success"], open=False),
    )
    h.executor.payment_failed("m_demo", event())
    h.drain()
    assert _pay(runtime(h), token_of(h))[0] == 402  # declined -> retry A due with the follow-up
    h.clock.advance(hours=24)
    h.connector.open = True
    h.drain()  # F and A in one batch: A meets the open circuit while F's decision plans B (A is CLAIMED: kept)
    h.connector.open = False  # the connector is healthy again
    for _ in range(20):  # ten minutes
        h.clock.advance(seconds=31)
        h.drain()
    retries = [(a.decision_id, a.state, a.attempts, a.last_error) for a in h.view().actions if a.kind == "retry"]
    assert h.view().state == "SUCCEEDED", (retries, h.connector.calls)


def test_a_waiting_first_send_reclaimed_after_its_lease_still_waits_for_the_link_payment(make_harness: Any) -> None:
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=FakeConnector(results=["success", "success"]),
    )
    token = _link_and_due_retry(h)
    payment = h.executor.start_link_payment(token, 60, "api", "claim-link")  # slow connector: 60 s lease
    retry = _claim_due(h, "retry")
    outcome = h.effects.perform(retry, _order_row(h))  # Defer: the link payment is out ...
    assert type(outcome).__name__ == "Defer"
    h.clock.advance(seconds=31)  # ... but this worker's batch outlasts the 30 s lease before recording it
    again = _claim_due(h, "retry")
    assert again.attempts == 2
    h.effects.perform(again, _order_row(h))  # another worker: "re-send", no wait
    h.effects.perform(payment.action, _order_row(h))  # the link payment
    assert len(successes(h)) == 1, successes(h)


@dataclass
class LinkAnswersLost(FakeConnector):
    """Charges link payments but never gets their answer back (timeouts)."""

    def charge(self, request: ChargeRequest) -> ChargeResult:
        result = super().charge(request)
        if ":link:" in request.idempotency_key:
            raise TransientError("timeout calling connector 'adyen': ReadTimeout")
        return result


def test_no_retry_charges_on_top_of_a_dead_lettered_link_payment_of_unknown_outcome(make_harness: Any) -> None:
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=LinkAnswersLost(results=["success", "success"]),
        max_attempts=3,
    )
    h.executor.payment_failed("m_demo", event())
    h.drain()
    assert _pay(runtime(h), token_of(h))[0] == 202  # "processing": charged, answer lost
    for _ in range(10):
        h.clock.advance(seconds=30)
        h.drain()
    link = next(a for a in h.view().actions if a.kind == "link_payment")
    assert link.state == "dead"
    h.clock.advance(hours=24)
    h.drain()  # the follow-up is not decided while the link payment's outcome is unknown
    assert len(successes(h)) == 1, successes(h)
    assert [a for a in h.view().actions if a.kind == "retry"] == []
    assert len(h.outbox) == 1  # and no second message asks the customer to pay


# ----------------------------------------------------------- what counts as sent (fourth review)


class Switch:
    """A payment switch behind HTTP: charges once per key; while ``outage``, the answer never comes back
    (the request reached it and was charged, the response timed out)."""

    def __init__(self, status: str = "succeeded") -> None:
        self.status = status
        self.outage = False
        self.charged: dict[str, str] = {}
        self.ids: dict[str, str] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        import json

        key = request.headers["Idempotency-Key"]
        body = json.loads(request.content)
        if key not in self.charged:
            self.charged[key] = self.status
            self.ids[key] = body["payment_id"]
        if self.outage:
            raise httpx.ReadTimeout("read timed out", request=request)
        return httpx.Response(200, json={"status": self.charged[key], "connector": body["connector"]})


def http_connector(
    switch: Callable[[httpx.Request], httpx.Response], breaker: CircuitBreaker | None = None
) -> HttpConnector:
    return HttpConnector(
        "adyen",
        "http://switch.test",
        None,
        breaker=breaker,
        client=httpx.Client(transport=httpx.MockTransport(switch)),
        sleep=lambda _s: None,
    )


def action_rows(h: Any, kind: str) -> list[Any]:
    with h.executor.engine.connect() as conn:
        return list(conn.execute(sa.select(actions).where(actions.c.kind == kind).order_by(actions.c.action_id)))


def test_circuit_opening_mid_call_after_a_sent_try_keeps_the_charge_marked_sent(make_harness: Any) -> None:
    switch = Switch()
    switch.outage = True
    h = make_harness(
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},  # ord_1
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},  # ord_2
        connector=http_connector(switch),  # default breaker: 5 failures, 3 tries per call
    )
    h.executor.payment_failed("m_demo", event("ord_1"))
    h.executor.payment_failed("m_demo", event("ord_2"))
    h.drain()  # ord_1: 3 timed-out tries (failures 1-3); ord_2: tries 1, 2 time out (4, 5: open), try 3 refused
    assert set(switch.ids.values()) == {"ord_1_2", "ord_2_2"}  # both charges reached the switch
    ord_2 = next(r for r in action_rows(h, "retry") if r.order_id == "ord_2")
    assert ord_2.unanswered_since is not None, (ord_2.state, ord_2.last_error)
    # consequence: the merchant reports ord_2 paid; the possibly-charged retry is silently cancelled
    paid = PAID_BY_MERCHANT | {"order_id": "ord_2"}
    h.executor.payment_succeeded("m_demo", paid)
    ord_2 = next(r for r in action_rows(h, "retry") if r.order_id == "ord_2")
    assert ord_2.state != "cancelled"


def test_a_link_payment_sent_before_the_circuit_opened_is_not_withdrawn(make_harness: Any) -> None:
    switch = Switch()
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=http_connector(switch, CircuitBreaker("adyen", threshold=2)),
    )
    h.executor.payment_failed("m_demo", event())
    h.drain()  # the SMS with the link
    switch.outage = True
    code, _title, _message = _pay(runtime(h), token_of(h))  # try 1 reaches the switch, try 2: circuit open
    switch.outage = False
    h.connector.breaker.success()
    h.clock.advance(hours=24)
    h.drain()  # the follow-up decides a retry
    succeeded = [switch.ids[k] for k, s in switch.charged.items() if s == "succeeded"]
    assert code != 503, succeeded
    assert len(succeeded) == 1, succeeded  # one charge, under one payment id


def test_an_unparseable_answer_from_the_switch_is_not_taken_for_a_refusal(make_harness: Any) -> None:
    switch = Switch(status="pending")
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=http_connector(switch),
    )
    token = _link_and_due_retry(h)
    h.drain()  # the retry: HTTP 200 {"status": "pending"} -> PermanentError
    retry = action_rows(h, "retry")[0]
    assert retry.state == "dead"
    assert "unknown status" in retry.last_error
    switch.status = "succeeded"
    try:
        code = _pay(runtime(h), token)[0]
    except LinkError as refused:
        code = refused.status_code
    assert code == 409, switch.charged


def test_upgrading_to_0005_keeps_a_charge_whose_answer_was_lost_as_sent(make_harness: Any) -> None:
    h = make_harness(
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=HookConnector(results=["success"], lose_answer={":retry:"}),
    )
    h.executor.payment_failed("m_demo", event())
    h.drain()  # charged, answer lost: scheduled re-send (attempts 1, last_error set)
    downgrade(h.executor.engine, "0004")  # the database as 0004 left it ...
    upgrade(h.executor.engine)  # ... upgraded to 0005
    assert h.executor.payment_succeeded("m_demo", PAID_BY_MERCHANT).state == "SUCCEEDED"
    retry = action_rows(h, "retry")[0]
    assert retry.state == "scheduled", (retry.state, retry.last_error)


@dataclass
class SlowThenOpen(FakeConnector):
    during: Any = None
    first: bool = True

    def charge(self, request: ChargeRequest) -> ChargeResult:
        if self.first:
            self.first = False
            self.during()
            raise CircuitOpenError("circuit of connector 'adyen' is open after 5 failures")
        super().charge(request)
        raise TransientError("timeout calling connector 'adyen': ReadTimeout")  # charged, answer lost


def test_a_stale_worker_does_not_unmark_a_charge_another_worker_sent(make_harness: Any) -> None:
    conn = SlowThenOpen(results=["success", "success"])
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=conn,
    )
    token = _link_and_due_retry(h)
    a = _claim_due(h, "retry")

    def other_worker() -> None:
        h.clock.advance(seconds=31)
        b = _claim_due(h, "retry")
        h.worker.record([(b, h.effects.perform(b, _order_row(h)))])  # re-send reaches the switch, answer lost

    conn.during = other_worker
    h.worker.record([(a, h.effects.perform(a, _order_row(h)))])  # A: CircuitOpenError -> unmark_sent
    assert len(conn.charged) == 1
    retry = action_rows(h, "retry")[0]
    assert retry.unanswered_since is not None  # FAILS
    try:
        code = _pay(runtime(h), token)[0]
    except LinkError as refused:
        code = refused.status_code
    assert code == 409


def _dead_unanswered_link_payment(h: Harness) -> int:
    """A link payment charged whose answers were all lost, dead-lettered after its tries; its action id."""
    h.executor.payment_failed("m_demo", event())
    h.drain()
    assert _pay(runtime(h), token_of(h))[0] == 202
    for _ in range(5):
        h.clock.advance(seconds=31)
        h.drain()
    link = next(a for a in h.view().actions if a.kind == "link_payment")
    assert link.state == "dead"
    return link.action_id


def test_the_order_view_shows_which_charge_was_sent_and_never_answered(make_harness: Any) -> None:
    h = make_harness(
        {"action": "retarget", "channel": "sms"}, connector=LinkAnswersLost(results=["success"]), max_attempts=2
    )
    action_id = _dead_unanswered_link_payment(h)
    link = next(a for a in h.view().actions if a.action_id == action_id)
    assert link.unanswered_since is not None, link


def test_an_operator_who_finds_the_charge_taken_settles_the_order_with_its_attempt(make_harness: Any) -> None:
    h = make_harness(
        {"action": "retarget", "channel": "sms"}, connector=LinkAnswersLost(results=["success"]), max_attempts=2
    )
    action_id = _dead_unanswered_link_payment(h)
    assert h.executor.resolve_charge(action_id, charged=True) == "SUCCEEDED"
    view = h.view()
    assert [(a.strategy, a.status) for a in view.attempts[1:]] == [("retarget_link", "success")]
    link = next(a for a in view.actions if a.kind == "link_payment")
    assert (link.state, link.unanswered_since) == ("done", None)
    assert "resolved by an operator: charged" in (link.last_error or "")
    h.drain()
    assert webhook_events(h) == ["order.succeeded"]
    with pytest.raises(ChargeResolutionError, match=f"action {action_id} is not a dead-lettered charge"):
        h.executor.resolve_charge(action_id, charged=True)  # answered once


def test_an_operator_who_finds_nothing_charged_frees_the_order_to_be_decided_again(make_harness: Any) -> None:
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=LinkAnswersLost(results=["success"]),
        max_attempts=2,
    )
    action_id = _dead_unanswered_link_payment(h)
    h.connector.charged.clear()  # the switch says it never took that payment ...
    h.connector.results.append("success")  # ... and takes the next one
    assert h.executor.resolve_charge(action_id, charged=False) == "PENDING"
    h.drain()  # decided again: the retry charges
    view = h.view()
    assert view.state == "SUCCEEDED"
    assert [(a.strategy, a.status) for a in view.attempts[1:]] == [("cascade", "success")]
    link = next(a for a in view.actions if a.kind == "link_payment")
    assert (link.state, link.unanswered_since) == ("dead", None)


def test_resolve_charge_refuses_an_action_that_is_not_waiting_for_its_answer(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipelines.cli import app

    url = f"sqlite:///{tmp_path / 'winback.db'}"
    upgrade(make_executor_engine(url))
    result = CliRunner().invoke(
        app, ["executor", "resolve-charge", "42", "--not-charged", "--database-url", url, "--tracking-uri", url]
    )
    assert result.exit_code != 0
    assert "action 42 is not a dead-lettered charge waiting for its answer" in result.output


# ------------------------------------------------------ unknown charges and the operator (fifth review)


def test_window_end_waits_for_an_operator_when_a_charge_is_unknown(
    make_harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The switch took a link payment's money and every answer was lost: the window's end does not fail the order
    (the customer may have paid); it waits for the operator, whose --charged settles it with one order.succeeded."""
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retarget", "channel": "sms", "delay": timedelta(days=30)},  # nothing more before the window end
        connector=LinkAnswersLost(results=["success"]),
        max_attempts=2,
    )
    action_id = _dead_unanswered_link_payment(h)
    h.clock.advance(days=8)
    with caplog.at_level("ERROR", logger="winback.executor"):
        h.drain()
        h.drain()
    assert h.view().state == "PENDING"
    assert webhook_events(h) == []
    assert any(f"resolve-charge {action_id}" in record.getMessage() for record in caplog.records)
    for _ in range(5):  # hours go by: the close looks again each hour, as one action
        h.clock.advance(hours=1)
        h.drain()
    assert h.view().state == "PENDING"
    assert len([a for a in h.view().actions if a.kind == "close"]) == 1
    assert h.executor.resolve_charge(action_id, charged=True) == "SUCCEEDED"
    h.drain()
    assert webhook_events(h) == ["order.succeeded"]


class TimeoutThen4xx:
    def __init__(self, status: int) -> None:
        self.status = status
        self.charged: dict[str, str] = {}
        self.seen: dict[str, int] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        key = request.headers["Idempotency-Key"]
        self.seen[key] = self.seen.get(key, 0) + 1
        if key not in self.charged:
            self.charged[key] = "succeeded"
            raise httpx.ReadTimeout("read timed out", request=request)  # charged, answer lost
        if ":retry:" in key and self.seen[key] == 2:
            return httpx.Response(self.status, json={"error": "gateway says no"})  # e.g. a WAF / gateway 4xx
        import json

        return httpx.Response(200, json={"status": "succeeded", "connector": json.loads(request.content)["connector"]})


@pytest.mark.parametrize("status", [400, 403])
def test_a_4xx_after_a_timed_out_try_is_not_taken_for_nothing_charged(make_harness: Any, status: int) -> None:
    switch = TimeoutThen4xx(status)
    connector = http_connector(switch, CircuitBreaker("adyen", threshold=100))
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=connector,
    )
    token = _link_and_due_retry(h)
    h.drain()  # the retry: try 1 times out (charged), try 2 -> 4xx -> RefusedError -> unmarked
    retry = action_rows(h, "retry")[0]
    assert retry.state == "dead"
    try:
        code = _pay(runtime(h), token)[0]
    except LinkError as refused:
        code = refused.status_code

    assert code == 409, (retry.unanswered_since, switch.charged)


class UnreachableSwitch(Switch):
    """A switch that, while ``down``, cannot be connected to (``refuse="connect"``) or answers 429 before
    processing (``refuse="429"``): no try reaches it."""

    def __init__(self, refuse: str) -> None:
        super().__init__()
        self.refuse = refuse
        self.down = True

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if not self.down:
            return super().__call__(request)
        if self.refuse == "connect":
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(429, json={"error": "too many requests"})


@pytest.mark.parametrize("refuse", ["connect", "429"])
def test_a_charge_that_never_reached_its_connector_does_not_wait_for_an_operator(
    make_harness: Any, refuse: str
) -> None:
    """A connector outage in which no try of a charge reached the switch leaves nothing to answer for: the dead
    charge is not one that may be out, and the customer can still pay by the link once the switch is back."""
    switch = UnreachableSwitch(refuse)
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=http_connector(switch, CircuitBreaker("adyen", threshold=100)),
        max_attempts=2,
    )
    token = _link_and_due_retry(h)
    for _ in range(4):  # the retry's two tries, each of three calls, none of which reaches the switch
        h.drain()
        h.clock.advance(minutes=10)
    retry = action_rows(h, "retry")[0]
    assert retry.state == "dead", retry.last_error
    assert retry.unanswered_since is None, retry.last_error
    assert "cannot reach" in retry.last_error or "429" in retry.last_error
    with h.executor.engine.connect() as conn:
        assert h.executor.unknown_charge(conn, _order_row(h)) is None
    switch.down = False
    code = _pay(runtime(h), token)[0]
    assert code == 200
    assert list(switch.charged.values()) == ["succeeded"]  # one charge: the link's
    h.drain()
    assert h.view().state == "SUCCEEDED"
    assert webhook_events(h) == ["order.succeeded"]


class OutageThenLostAnswer(Switch):
    """While ``down`` no connection can be made. Once up, a retry's first send (its three tries) is charged and
    its answer lost (ReadTimeout); everything else is answered normally."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True
        self.calls: dict[str, int] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        key = request.headers["Idempotency-Key"]
        self.calls[key] = self.calls.get(key, 0) + 1
        self.outage = ":retry:" in key and self.calls[key] <= 3
        return super().__call__(request)


def test_a_link_payment_that_never_reached_the_switch_is_withdrawn_not_left_beside_a_retry(
    make_harness: Any,
) -> None:
    """(Review of the unreached-send change.) The customer pays by link while the connector cannot be reached.
    Nothing was sent, so the link payment is not a charge that may be out: had it stayed scheduled as 'processing',
    the due retry would go first (charged, answer lost) and the link payment then charge on top of it. Like an
    open circuit: the payment is withdrawn, the customer is told to try again, and the link still works."""
    switch = OutageThenLostAnswer()
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=http_connector(switch, CircuitBreaker("adyen", threshold=100)),
    )
    token = _link_and_due_retry(h)
    code = _pay(runtime(h), token)[0]
    assert code == 503
    # withdrawn: cancelled, never sent (kept so the order's history skips its attempt number)
    assert [(row.state, row.unanswered_since) for row in action_rows(h, "link_payment")] == [("cancelled", None)]
    switch.down = False
    for _ in range(6):
        h.drain()
        h.clock.advance(minutes=5)
    taken = [key for key, status in switch.charged.items() if status == "succeeded"]
    assert len(taken) == 1, taken
    with pytest.raises(LinkError) as busy:  # the link works again, but not while the retry's answer is unknown
        _pay(runtime(h), token)
    assert busy.value.status_code == 409


def test_a_link_payment_sent_later_by_a_worker_waits_for_a_charge_whose_answer_was_lost(make_harness: Any) -> None:
    """A link payment whose first send is left to a worker (its claim released unsent) is checked like a retry's
    first send: it does not go out while another charge of the order was sent and not answered."""
    switch = Switch()
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=http_connector(switch, CircuitBreaker("adyen", threshold=100)),
    )
    token = _link_and_due_retry(h)
    started = h.executor.start_link_payment(token, 30, "api", "claim-link")
    with h.executor.engine.begin() as conn:  # released unsent, e.g. after an open circuit whose withdrawal lost
        conn.execute(
            actions.update()
            .where(actions.c.action_id == started.action.action_id)
            .values(state="scheduled", claim_token=None, due_at=h.clock() + timedelta(minutes=1))
        )
    switch.outage = True
    h.worker.run_once()  # the due retry: charged, its answer lost
    retry = action_rows(h, "retry")[0]
    assert retry.unanswered_since is not None
    h.clock.advance(minutes=1)
    h.worker.run_once()  # the link payment is due
    assert len(switch.charged) == 1, switch.ids
    switch.outage = False
    for _ in range(6):
        h.clock.advance(minutes=5)
        h.drain()
    assert list(switch.charged.values()) == ["succeeded"], switch.ids


def test_a_customer_whose_link_payment_a_worker_took_over_is_told_it_is_processing(make_harness: Any) -> None:
    """(Second review.) The API's send outlasts its claim: a worker takes the link payment over and charges it.
    The API's own send then ends with nothing reached (Defer), its withdrawal is refused (the claim is the
    worker's), and the customer was told "Payment not possible" for a payment that was taken. It is 'processing'."""

    @dataclass
    class UnreachedOutlastingTheLease(FakeConnector):
        during: Callable[[], None] | None = None

        def charge(self, request: ChargeRequest) -> ChargeResult:
            if self.during is not None:
                hook, self.during = self.during, None
                hook()
                raise UnreachedError("cannot reach connector 'adyen': ConnectTimeout")
            return super().charge(request)

    h = make_harness(
        {"action": "retarget", "channel": "sms"}, connector=UnreachedOutlastingTheLease(results=["success"])
    )
    h.executor.payment_failed("m_demo", event())
    h.drain()

    def lease_ends_and_a_worker_takes_over() -> None:
        h.clock.advance(seconds=31)
        h.worker.run_once()

    h.connector.during = lease_ends_and_a_worker_takes_over
    code, _title, _message = _pay(runtime(h), token_of(h))
    assert (len(successes(h)), h.view().state) == (1, "SUCCEEDED")  # the worker's send took the money
    assert code == 202


def test_cli_resolve_charge_names_a_merchant_missing_from_the_config_in_one_line(
    make_harness: Any, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from pipelines.cli import app

    h = make_harness(
        {"action": "retarget", "channel": "sms"}, connector=LinkAnswersLost(results=["success"]), max_attempts=2
    )
    action_id = _dead_unanswered_link_payment(h)
    with h.executor.engine.begin() as conn:  # a production merchant, not in the shipped demo config
        from service.executor.store import actions

        conn.execute(orders.update().values(merchant_id="m_prod_zz"))
        conn.execute(actions.update().values(merchant_id="m_prod_zz"))
    url = str(h.executor.engine.url)
    result = CliRunner().invoke(
        app, ["executor", "resolve-charge", str(action_id), "--charged", "--database-url", url, "--tracking-uri", url]
    )

    assert result.exit_code == 2, (result.exit_code, repr(result.exception))
    assert "Traceback" not in result.output


def test_cli_resolve_charge_refuses_a_database_that_does_not_exist_without_making_one(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipelines.cli import app

    typo = tmp_path / "typo.db"
    url = f"sqlite:///{typo}"
    result = CliRunner().invoke(
        app, ["executor", "resolve-charge", "7", "--not-charged", "--database-url", url, "--tracking-uri", url]
    )

    assert result.exit_code == 2, (result.exit_code, repr(result.exception))
    assert "Traceback" not in result.output
    assert not typo.exists()


# ---------------------------------------------------- an unknown charge holds its order (sixth review)


def test_no_payment_link_is_sent_to_a_customer_whose_charge_is_unknown(make_harness: Any) -> None:
    """While a link payment that took the money has no answer, the nudge's follow-up decides nothing: no new "please
    pay" message goes to a customer who may have paid."""
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retarget", "channel": "sms", "delay": timedelta(days=1)},  # day 2: the cadence allows it
        connector=LinkAnswersLost(results=["success"]),
        max_attempts=2,
    )
    _dead_unanswered_link_payment(h)
    assert len(h.outbox) == 1  # the first SMS
    h.clock.advance(hours=24)
    h.drain()  # the follow-up of the SMS: a decision point decides another SMS for day 2
    h.clock.advance(days=1)
    h.drain()
    sent = [(m.channel.value, m.template_id) for m in h.outbox[1:]]
    assert sent == [], sent


def test_a_merchant_payment_on_an_order_with_an_unknown_charge_is_flagged(
    make_harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The merchant reports a payment for an order whose charge is unknown: settling it logs an error naming the
    action and resolve-charge (a refund may be needed)."""
    h = make_harness(
        {"action": "retarget", "channel": "sms"}, connector=LinkAnswersLost(results=["success"]), max_attempts=2
    )
    action_id = _dead_unanswered_link_payment(h)
    with caplog.at_level("WARNING", logger="winback.executor"):
        assert h.executor.payment_succeeded("m_demo", PAID_BY_MERCHANT).state == "SUCCEEDED"
        h.clock.advance(days=10)
        h.drain()
    flagged = [r.getMessage() for r in caplog.records if str(action_id) in r.getMessage()]
    assert flagged, [r.getMessage() for r in caplog.records]


class MonotonicClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _req() -> ChargeRequest:
    return ChargeRequest("k1", "m", "o", 2, 10.0, "INR", "retry_same", "adyen", START)


def test_an_unexpected_error_in_the_half_open_trial_does_not_keep_the_circuit_open_forever() -> None:
    clock = MonotonicClock()
    breaker = CircuitBreaker("adyen", threshold=1, cooldown_seconds=30, clock=clock)
    mode = {"v": "503"}

    def switch(request: httpx.Request) -> httpx.Response:
        if mode["v"] == "503":
            return httpx.Response(503)
        if mode["v"] == "bad-gzip":  # a proxy mangles one answer: httpx.DecodingError (not a TransportError)
            return httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=b"not gzip")
        return httpx.Response(200, json={"status": "failed", "connector": "adyen"})

    conn = HttpConnector(
        "adyen",
        "http://switch.test",
        None,
        tries=1,
        breaker=breaker,
        client=httpx.Client(transport=httpx.MockTransport(switch)),
        sleep=lambda _s: None,
    )
    with pytest.raises(TransientError):
        conn.charge(_req())  # opens the circuit
    clock.t += 31
    mode["v"] = "bad-gzip"
    with pytest.raises(httpx.DecodingError):
        conn.charge(_req())  # the half-open trial fails in an unexpected way
    mode["v"] = "ok"
    clock.t += 3600  # an hour later, the switch is fine
    try:
        result = conn.charge(_req())
    except CircuitOpenError as exc:
        pytest.fail(f"circuit stuck open an hour after the trial: {exc} (state {breaker.state})")
    assert result.status == "failure"


def test_the_error_of_a_charge_that_reached_the_switch_does_not_read_as_never_sent() -> None:
    """A send whose first try timed out (it may have charged) and whose later tries could not connect keeps saying
    that it may have been charged: an operator reads this error before answering for the charge."""
    calls = {"n": 0}

    def switch(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            raise httpx.ReadTimeout("read timed out", request=request)
        raise httpx.ConnectError("connection refused", request=request)

    conn = http_connector(switch, CircuitBreaker("adyen", threshold=100))
    with pytest.raises(TransientError) as err:
        conn.charge(_req())
    assert "timeout" in str(err.value).lower(), str(err.value)
    assert not isinstance(err.value, UnreachedError)  # it stays a charge that may be out


def test_an_operator_confirmed_charge_is_dated_when_it_was_made_not_when_it_was_resolved(make_harness: Any) -> None:
    """A charge an operator confirms days later is dated when it was sent: the attempt, the order's close and the
    webhook all carry that time."""
    h = make_harness(
        {"action": "retarget", "channel": "sms"}, connector=LinkAnswersLost(results=["success"]), max_attempts=2
    )
    action_id = _dead_unanswered_link_payment(h)
    sent_at = next(a for a in h.view().actions if a.action_id == action_id).unanswered_since
    h.clock.advance(days=8)
    assert h.executor.resolve_charge(action_id, charged=True) == "SUCCEEDED"
    paid = h.view().attempts[-1]
    assert paid.created_at <= sent_at + timedelta(minutes=5), (paid.created_at, sent_at)


def test_an_operator_confirmed_charge_keeps_its_bookkeeping_at_the_time_of_the_answer(make_harness: Any) -> None:
    """Only the attempt and the order's success carry the charge's time; the rows written because of the
    operator's answer (the order's update, the webhook to deliver) carry the time they were written."""
    h = make_harness(
        {"action": "retarget", "channel": "sms"}, connector=LinkAnswersLost(results=["success"]), max_attempts=2
    )
    action_id = _dead_unanswered_link_payment(h)
    h.clock.advance(days=3)
    resolved_at = h.executor.clock()
    assert h.executor.resolve_charge(action_id, charged=True) == "SUCCEEDED"
    with h.executor.engine.connect() as conn:
        order_updated = conn.execute(sa.select(orders.c.updated_at)).scalar_one()
        delivery_created = conn.execute(sa.select(webhook_deliveries.c.created_at)).scalar_one()
    assert as_utc(order_updated) == resolved_at
    assert as_utc(delivery_created) == resolved_at


def test_a_retry_waiting_behind_a_link_payment_that_dies_unanswered_is_not_sent(make_harness: Any) -> None:
    """A retry due while the customer's link payment is out waits; the link payment's answers are all lost and it
    is dead-lettered. The retry, already planned, is not sent on top of it: it is cancelled (never sent) naming
    that charge, and the customer is charged once."""
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=LinkAnswersLost(results=["success", "success"]),
        max_attempts=2,
    )
    token = _link_and_due_retry(h)
    assert _pay(runtime(h), token)[0] == 202  # charged, answer lost
    for _ in range(10):
        h.clock.advance(seconds=31)
        h.drain()
    link = next(a for a in h.view().actions if a.kind == "link_payment")
    retry = next(a for a in h.view().actions if a.kind == "retry")
    assert link.state == "dead"
    assert (retry.state, retry.unanswered_since) == ("cancelled", None)
    assert f"charge action {link.action_id} of the order was sent and never answered" in (retry.last_error or "")
    assert len(successes(h)) == 1
    assert [key for key in h.connector.calls if ":retry:" in key] == []


def test_a_charge_is_marked_sent_only_under_its_own_claim(make_harness: Any) -> None:
    """A worker whose lease ended and whose action another worker claimed since cannot mark it sent (and so does
    not send it): on PostgreSQL the two could otherwise interleave between reading the claim and marking."""
    h = make_harness({"action": "retry", "strategy": "retry_same", "connector": "stripe"})
    h.executor.payment_failed("m_demo", event())
    stale = next(a for a in h.executor.claim(10, 30, "w1", "claim-w1") if a.kind == "retry")
    h.clock.advance(seconds=31)
    fresh = next(a for a in h.executor.claim(10, 30, "w2", "claim-w2") if a.kind == "retry")
    with h.executor.engine.begin() as conn:
        assert h.executor.mark_sent(conn, stale, h.clock()) is False
        assert h.executor.mark_sent(conn, fresh, h.clock()) is True


def test_a_planned_retry_is_not_sent_once_the_merchant_switched_its_flow_off(make_harness: Any) -> None:
    """The hard rules are checked again when a retry is sent, as for messages: a retry planned for tomorrow does
    not go out if the merchant turns that flow off meanwhile; the order is decided again under the new config."""
    h = make_harness(
        {"action": "retry", "strategy": "cascade", "connector": "adyen", "delay": timedelta(hours=20)},
        {"action": "retry", "strategy": "retry_same", "connector": "stripe"},
        connector=FakeConnector(results=["success"]),
    )
    h.executor.payment_failed("m_demo", event())
    h.drain()
    assert h.connector.calls == []  # planned for later
    h.executor.config = config_for(m_demo=demo_merchant(retry={"flows": ["retry_same"]}))
    h.clock.advance(hours=21)
    h.drain()
    assert [key.split(":")[2:3] for key in h.connector.calls] == [["retry"]]
    view = h.view()
    assert [(a.strategy, a.connector, a.status) for a in view.attempts[1:]] == [("retry_same", "stripe", "success")]
    cascade = next(a for a in view.actions if a.kind == "retry" and a.decision_id == "dec_1_ord_1")
    assert "retry_flow_disabled" in (cascade.last_error or ""), cascade
    assert view.state == "SUCCEEDED"


def test_a_replanned_retry_does_not_use_up_a_retry_of_the_budget(make_harness: Any) -> None:
    """(Fifth review.) A retry the rules refuse at its send keeps the attempt number reserved when it was
    planned (#2), so the next retry is #3 and the history reads attempts {1, 3}. That gap is not a retry made:
    with max_retries 2, the second retry allowed must still go out, and the budget used is the retries made."""
    h = make_harness(
        {"action": "retry", "strategy": "cascade", "connector": "adyen", "delay": timedelta(hours=20)},  # #2
        {"action": "retry", "strategy": "retry_same", "connector": "stripe"},  # after the replan: #3, declined
        {"action": "retry", "strategy": "retry_same", "connector": "stripe"},  # the second retry of two allowed
        merchants={"m_demo": demo_merchant(retry={"max_retries": 2})},
        connector=FakeConnector(results=["failure", "success"]),
    )
    h.executor.payment_failed("m_demo", event())
    h.drain()
    assert h.connector.calls == []  # the cascade is planned for tomorrow
    # The merchant switches cascades off meanwhile: the cascade is refused at its send and the order decided again.
    h.executor.config = config_for(m_demo=demo_merchant(retry={"max_retries": 2, "flows": ["retry_same"]}))
    h.clock.advance(hours=21)
    h.drain()

    view = h.view()
    made = [a for a in view.attempts if a.strategy not in ("initial", "retarget_link")]
    # The retry budget as the rules see it now, from the order's recorded history.
    with h.executor.engine.connect() as conn:
        order = conn.execute(orders.select()).mappings().one()
        request = h.executor.request_for(conn, order, h.clock())
    used = build_context(request, h.executor.merchant("m_demo"), h.effects.catalog).retries_used
    refused = [a.last_error for a in view.actions if a.kind == "retry" and "max_retries" in (a.last_error or "")]
    assert used == len(made), f"{len(made)} retry made, but the rules count {used} used"
    assert not refused, f"a retry within the budget was refused at its send: {refused}"
    assert len(h.connector.calls) == 2
    assert view.state == "SUCCEEDED"


def _spared_by_the_last_decision(h: Harness, kind: str) -> None:
    """Put back the ``kind`` action of the order that the last decision replaced, as if a worker had held its claim
    when that decision was made (a new decision replaces only what is scheduled) and let it go unperformed."""
    with h.executor.engine.begin() as conn:
        conn.execute(
            actions.update()
            .where(actions.c.kind == kind, actions.c.last_error == "replaced by a later decision")
            .values(state="scheduled", last_error=None)
        )


def _retry_and_message_due_together(make_harness: Any, connector: FakeConnector) -> Harness:
    """An order whose payment link (N1) was paid and declined, with the silent retry that followed due a minute
    ago and the follow-up's second message (N2) due now; ``connector`` declines the first charge."""
    h: Harness = make_harness(
        {"action": "retarget", "channel": "sms"},  # N1 now; its follow-up in 24 h
        {"action": "retarget", "channel": "sms", "delay": timedelta(hours=24)},  # at the follow-up: N2, on Day 2
        {"action": "retry", "strategy": "cascade", "connector": "adyen", "delay": timedelta(hours=22, minutes=59)},
        connector=connector,
    )
    h.executor.payment_failed("m_demo", event())
    h.drain()  # N1 goes out
    assert len(h.outbox) == 1
    h.clock.advance(hours=24)
    h.drain()  # N1's follow-up plans N2 for tomorrow
    h.clock.advance(hours=1)
    payment = h.executor.start_link_payment(token_of(h), 30, "api", "claim-link")  # the customer pays N1's link ...
    h.worker.record([(payment.action, h.effects.perform(payment.action, _order_row(h)))])  # ... declined: a retry
    _spared_by_the_last_decision(h, "nudge")  # N2 was claimed when the retry was planned
    h.clock.advance(hours=23, minutes=1)  # the retry (due a minute ago) and N2 (due now)
    return h


def test_a_payment_link_is_not_sent_for_an_order_its_own_batch_just_charged(make_harness: Any) -> None:
    """(Fifth review.) A batch holds a retry and, planned after it, a message of the same order. The retry
    succeeds and is recorded at once; the message must then not go out asking a customer who has just paid to pay:
    the batch runs in planned order, and a message reads its order as it is now, not as the batch found it."""
    h = _retry_and_message_due_together(make_harness, FakeConnector(results=["failure", "success"]))
    assert h.worker.run_once() == 2  # the retry and N2, in one batch
    view = h.view()
    assert view.state == "SUCCEEDED"
    assert [(a.strategy, a.status) for a in view.attempts[1:]] == [("retarget_link", "failure"), ("cascade", "success")]
    assert len(h.outbox) == 1, [m.variables["link_url"] for m in h.outbox]


def test_a_payment_link_waits_while_another_worker_has_a_charge_of_its_order_out(make_harness: Any) -> None:
    """(Seventh review.) A retry and a payment-link message of one order fall due together and go to two workers.
    The message used to check only for a charge left unanswered for an operator, not for one with its connector
    now: the customer was asked to pay while the retry charged them. It now waits for the charge's answer (and is
    then skipped, the order being paid)."""
    h = _retry_and_message_due_together(make_harness, HookConnector(results=["failure", "success"]))
    (retry,) = h.executor.claim(1, 30, "w1", "claim-w1")  # worker 1 takes the retry ...
    assert retry.kind == "retry"
    seen: list[tuple[str, str]] = []

    def second_worker_takes_the_message() -> None:  # ... worker 2 takes N2 while the retry is with the connector
        batch = h.executor.claim(10, 30, "w2", "claim-w2")
        performed = [(action, h.effects.perform(action, _order_row(h))) for action in batch]
        seen.extend((action.kind, type(outcome).__name__) for action, outcome in performed)
        h.worker.record(performed)

    h.connector.during["retry"] = second_worker_takes_the_message
    h.worker.record([(retry, h.effects.perform(retry, _order_row(h)))])  # charged

    assert seen == [("nudge", "Defer")]
    assert len(h.outbox) == 1, [m.variables["link_url"] for m in h.outbox]  # N1 only
    h.clock.advance(minutes=5)
    h.drain()
    assert h.view().state == "SUCCEEDED"
    assert len(h.outbox) == 1


@pytest.mark.parametrize("retry_claimed", ["before-the-message-check", "after-the-message-check"])
def test_a_message_is_not_sent_while_a_retry_of_its_order_may_charge_or_after_it_did(
    make_harness: Any, retry_claimed: str
) -> None:
    """(Eighth review.) The message's checks and its send were not atomic with a retry on another worker: a retry
    claimed before the message's check (not yet marked sent), or claimed just after it, charged the customer
    while the message was on its way, and the customer who had just paid was asked to pay. The message now marks
    itself under the order's lock right before the send, and a retry's first send waits for such a message."""
    h = _retry_and_message_due_together(make_harness, HookConnector(results=["failure", "success"]))
    if retry_claimed == "before-the-message-check":
        (retry,) = h.executor.claim(1, 30, "w1", "claim-w1")  # worker 1 has claimed the retry (not marked yet)
        assert retry.kind == "retry"
    else:  # the retry falls due a second after the message
        with h.executor.engine.begin() as conn:
            conn.execute(
                actions.update().where(actions.c.kind == "retry", actions.c.state == "scheduled")
                .values(due_at=h.clock() + timedelta(seconds=1))
            )  # fmt: skip
    (message,) = h.executor.claim(1, 30, "w2", "claim-w2")  # worker 2 has claimed N2
    assert message.kind == "nudge"

    # Worker 2's checks pass; between them and the provider call (here: while the link is minted) worker 1 sends
    # the retry, which succeeds and is recorded.
    real_new_link = h.executor.new_link
    interleaved: list[str] = []

    def new_link(*args: Any, **kwargs: Any) -> Any:
        if not interleaved:
            if retry_claimed == "before-the-message-check":
                batch = [retry]
            else:
                h.clock.advance(seconds=1)
                batch = h.executor.claim(1, 30, "w1", "claim-w1")
                assert [a.kind for a in batch] == ["retry"]
            h.worker.record([(batch[0], h.effects.perform(batch[0], _order_row(h)))])
            interleaved.append(h.view().state)
        return real_new_link(*args, **kwargs)

    h.executor.new_link = new_link  # type: ignore[method-assign]
    outcome = h.effects.perform(message, _order_row(h))
    h.worker.record([(message, outcome)])

    assert type(outcome).__name__ in ("Defer", "Skip")
    h.clock.advance(minutes=1)
    h.drain()
    assert h.view().state == "SUCCEEDED"
    with h.executor.engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(actions).where(actions.c.kind == "retry")) == 1
    # N1 only: N2 must not ask a customer who has just paid to pay
    assert len(h.outbox) == 1, (type(outcome).__name__, [m.variables["link_url"][-12:] for m in h.outbox])


def test_a_retry_waits_while_a_message_of_its_order_is_on_its_way(make_harness: Any) -> None:
    """(Eighth review, the other side.) A message already handed to its provider when a retry of the order
    comes up: the retry waits for the message to be recorded, then charges; the message went out while nothing
    was being charged."""
    h = _retry_and_message_due_together(make_harness, HookConnector(results=["failure", "success"]))
    with h.executor.engine.begin() as conn:  # the retry falls due a second after the message
        conn.execute(
            actions.update().where(actions.c.kind == "retry", actions.c.state == "scheduled")
            .values(due_at=h.clock() + timedelta(seconds=1))
        )  # fmt: skip
    (message,) = h.executor.claim(1, 30, "w2", "claim-w2")
    assert message.kind == "nudge"
    real_run = h.effects._run
    seen: list[str] = []

    def provider_call(call: Any) -> Any:  # worker 1 takes the retry while the message is with its provider
        if not seen:
            h.clock.advance(seconds=1)
            (retry,) = h.executor.claim(1, 30, "w1", "claim-w1")
            outcome = h.effects.perform(retry, _order_row(h))
            h.worker.record([(retry, outcome)])
            seen.append(type(outcome).__name__)
        return real_run(call)

    h.effects._run = provider_call  # type: ignore[method-assign]
    outcome = h.effects.perform(message, _order_row(h))
    h.worker.record([(message, outcome)])
    assert (seen, type(outcome).__name__, len(h.outbox)) == (["Defer"], "Sent", 2)
    h.clock.advance(minutes=1)
    h.drain()
    assert h.view().state == "SUCCEEDED"
    assert len(h.outbox) == 2


def test_a_worker_goes_on_after_its_database_fails_a_batch(
    make_harness: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch that fails on the database (a restart, a deadlock's victim on PostgreSQL) does not end the worker:
    it logs, waits and claims again, and what was due is carried out."""
    h = make_harness(
        {"action": "retry", "strategy": "retry_same", "connector": "stripe"},
        connector=FakeConnector(results=["success"]),
    )
    h.executor.payment_failed("m_demo", event())
    real_claim = h.executor.claim
    failures = {"left": 2}

    def flaky_claim(*args: Any, **kwargs: Any) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise sa.exc.OperationalError("UPDATE actions ...", {}, Exception("server closed the connection"))
        return real_claim(*args, **kwargs)

    monkeypatch.setattr(h.executor, "claim", flaky_claim)
    h.worker.poll_seconds = 0.01
    with caplog.at_level(logging.ERROR, logger="winback"):
        assert h.worker.run(until_idle=True) >= 1
    assert failures["left"] == 0
    assert [r.getMessage() for r in caplog.records if "failed on the database" in r.getMessage()] == [
        "a batch failed on the database; trying again in 0.01 s",
        "a batch failed on the database; trying again in 0.02 s",  # backing off
    ]
    assert [(a.strategy, a.status) for a in h.view().attempts[1:]] == [("retry_same", "success")]


@pytest.mark.parametrize("until_idle", [True, False])
def test_a_worker_stops_when_its_database_keeps_failing(make_harness: Any, until_idle: bool) -> None:
    """(Sixth review.) An error that lasts (the schema is missing: a wrong database URL, migrations not run) ends
    the run after a few batches in a row, so the CLI returns and a supervisor sees the worker stop, instead of a
    retry every 30 s for ever."""
    from service.executor import worker as worker_module

    h = make_harness({"action": "retry", "strategy": "retry_same", "connector": "stripe"})
    h.executor.payment_failed("m_demo", event())
    with h.executor.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE actions"))
    h.worker.poll_seconds = 0.001
    calls = {"n": 0}
    real_run_once = h.worker.run_once

    def counted() -> int:
        calls["n"] += 1
        return real_run_once()

    h.worker.run_once = counted  # type: ignore[method-assign]
    with pytest.raises(sa.exc.OperationalError, match="no such table"):
        h.worker.run(until_idle=until_idle, stop_after=60)
    expected = worker_module.UNTIL_IDLE_DATABASE_FAILURES if until_idle else worker_module.MAX_DATABASE_FAILURES
    assert calls["n"] == expected
