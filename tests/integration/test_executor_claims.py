"""A charge's claim is renewed while its send is out, however long the send takes (``effects.ClaimKeeper``).

Real sockets: a switch whose host name has six addresses (e.g. three A and three AAAA records behind a load
balancer), none of which answers a SYN (local listeners with full accept queues), so every connect times out and
``socket.create_connection`` tries each address in turn with the full connect timeout. No sum of timeouts bounds
such a send. Timeouts, backoffs and leases are the defaults scaled by 1/50, so the ratios are production's.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from service.executor.connectors import ChargeRequest, ChargeResult, CircuitBreaker, HttpConnector, TransientError
from service.executor.routes import ExecutorRuntime, _pay
from service.executor.settings import ExecutorSettings
from service.executor.store import actions, transactions
from service.executor.worker import Worker
from tests.integration.test_executor import (  # noqa: F401 - make_harness is a fixture
    HookConnector,
    _claim_due,
    _order_row,
    action_rows,
    event,
    make_harness,
)

SCALE = 1 / 50  # production defaults, scaled down so the test runs in seconds
ADDRESSES = 6  # e.g. three A and three AAAA records


def _black_hole() -> list[socket.socket]:
    """A listener that drops every SYN (its accept queue is full): a connect to it times out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    held = [listener]
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(listener.getsockname())
        held.append(filler)
    return held


@pytest.fixture
def black_holed_switch(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The base URL of a switch whose host name has ADDRESSES addresses, none of which answers a SYN."""
    sockets: list[socket.socket] = []
    addresses = []
    for _ in range(ADDRESSES):
        held = _black_hole()
        sockets += held
        addresses.append(held[0].getsockname())
    time.sleep(0.05)
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "switch.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", address) for address in addresses]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    # sanity: this machine really black-holes them (a connect times out rather than being refused)
    probe = socket.socket()
    probe.settimeout(0.05)
    with pytest.raises(TimeoutError):
        probe.connect(addresses[0])
    probe.close()
    yield "http://switch.test:80"
    for sock in sockets:
        sock.close()


def _scaled_connector(base_url: str, transport: httpx.BaseTransport | None = None) -> HttpConnector:
    """HttpConnector with the registry's defaults (10 s timeouts, three tries, backoff 0.2..2 s), scaled."""
    timeout = httpx.Timeout(10.0 * SCALE)
    client = httpx.Client(timeout=timeout, transport=transport or httpx.HTTPTransport(), trust_env=False)
    return HttpConnector(
        "adyen",
        base_url,
        None,
        tries=3,
        backoff_base=0.2 * SCALE,
        backoff_cap=2.0 * SCALE,
        breaker=CircuitBreaker("adyen", threshold=100),
        client=client,
    )


class PollAfterCall(httpx.BaseTransport):
    """A real transport that runs ``after[n]()`` once its n-th call has ended (a second worker polling meanwhile)."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.calls = 0
        self.after: dict[int, Callable[[], None]] = {}

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        try:
            return self.inner.handle_request(request)
        finally:
            hook = self.after.pop(self.calls, None)
            if hook is not None:
                hook()


def _wall_clock(h: Any) -> None:
    """The executor's clock runs with real time from the harness's start, and a charge's lease is the default
    scaled (0.6 s, renewed every 0.2 s): the sends below outlast it many times over."""
    base, started = h.clock(), time.monotonic()
    h.executor.clock = lambda: base + timedelta(seconds=time.monotonic() - started)
    h.effects.lease = timedelta(seconds=30.0 * SCALE)


def test_an_outage_of_a_switch_with_several_addresses_leaves_no_charge_for_an_operator(
    make_harness: Any,  # noqa: F811 - the fixture
    black_holed_switch: str,
) -> None:
    """As test_a_connector_outage_that_outlasts_the_lease_leaves_no_charge_for_an_operator, with a switch whose
    name has six addresses. Worker 1's send outlasts its hold; worker 2, polling, takes it over (it reads as sent:
    a re-send), re-sends it (nothing reaches the switch either) and keeps the mark; worker 1's send ends with
    nothing reached, but it can no longer take its mark back. The retry is dead-lettered as a charge that may have
    been taken, for an operator, although no try of it ever reached the switch."""
    transport = PollAfterCall()
    connector = _scaled_connector(black_holed_switch, transport)
    h = make_harness(
        {"action": "retry", "strategy": "cascade", "connector": "adyen"}, connector=connector, max_attempts=2
    )
    _wall_clock(h)
    lease = 30.0 * SCALE
    first = Worker(h.executor, h.effects, "w1", lease_seconds=lease)
    second = Worker(h.executor, h.effects, "w2", lease_seconds=lease)
    taken_over: list[int] = []
    # worker 2 polls once worker 1's third try has run (by then the send has lasted ~3.6 s > its 2.48 s hold)
    transport.after[3] = lambda: taken_over.append(second.run_once())
    h.executor.payment_failed("m_demo", event())
    first.run_once()

    retry = action_rows(h, "retry")[0]
    with h.executor.engine.connect() as conn:
        unknown = h.executor.unknown_charge(conn, _order_row(h))
    assert (any(taken_over), retry.unanswered_since, unknown) == (False, None, None), (
        f"a second worker took the send over while it was out (claimed {taken_over}); the retry, which never "
        f"reached the switch, is {retry.state} with unanswered_since={retry.unanswered_since} "
        f"(unknown charge for an operator: {unknown}); last_error={retry.last_error!r}"
    )


def test_a_link_paid_during_an_outage_of_a_switch_with_several_addresses_keeps_the_link(
    make_harness: Any,  # noqa: F811 - the fixture
    black_holed_switch: str,
) -> None:
    """README: a link clicked while no try can reach the switch answers 'try again shortly' (503) and keeps the
    link. With a six-address black-holed switch the API's send outlasts its hold, a worker takes the link payment
    over as a re-send, the API cannot withdraw it and answers 202 'processing' for a payment that never reached
    the switch (the link is used up; the worker's re-sends keep the mark and end with an operator)."""
    transport = PollAfterCall()
    connector = _scaled_connector(black_holed_switch, transport)
    h = make_harness({"action": "retarget", "channel": "sms"}, connector=connector, max_attempts=2)
    _wall_clock(h)
    h.executor.payment_failed("m_demo", event())
    h.drain()  # the SMS with the link (no connector call)
    token = h.outbox[0].variables["link_url"].rsplit("/pay/", 1)[1]
    worker = Worker(h.executor, h.effects, "w2", lease_seconds=30.0 * SCALE)
    taken_over: list[int] = []
    transport.after[3] = lambda: taken_over.append(worker.run_once())
    rt = ExecutorRuntime(h.executor, h.effects, ExecutorSettings(database_url="sqlite://", lease_seconds=30.0 * SCALE))
    code, title, _message = _pay(rt, token)
    links = action_rows(h, "link_payment")
    assert code == 503, (
        f"answered {code} {title!r} for a payment no try of which reached the switch; taken over: {taken_over}; "
        f"link payment: {[(r.state, r.unanswered_since, r.last_error) for r in links]}"
    )


# ----------------------------------------------------------- claims of charges in a batch (fourth review)


def _row(h: Any, action_id: int) -> Any:
    with h.executor.engine.connect() as conn:
        return conn.execute(sa.select(actions).where(actions.c.action_id == action_id)).one()


def test_a_charge_sent_after_its_lease_ended_is_not_claimable_while_it_is_out(
    make_harness: Any,  # noqa: F811 - the fixture
) -> None:
    """A worker reaches a retry of its batch after the batch's lease ended (earlier sends of the batch took long,
    which f0c2e2a allows: a send lasts 'however long it takes'); nobody has re-claimed it, so its token is still
    on the row and ``_charge`` marks and sends it. The lease taken for renewals is max(due_at - now, 1 s) = 1 s,
    and the first renewal comes a third of that later: until then the claim's due_at is in the past, and a second
    worker polling meanwhile claims the charge that is out, as a re-send (two sends of one charge at once)."""
    h = make_harness(
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=HookConnector(results=["success"]),
    )
    h.executor.payment_failed("m_demo", event())
    retry = _claim_due(h, "retry")  # worker 1's batch, lease 30 s
    h.clock.advance(seconds=31)  # the batch ran long: the lease has ended, nobody re-claimed yet
    seen: dict[str, Any] = {}

    def second_worker_polls() -> None:  # right after the send started
        seen["due_at"] = _row(h, retry.action_id).due_at
        seen["claimed"] = [(a.action_id, a.kind) for a in h.executor.claim(10, 30, "w2", "claim-w2")]

    h.connector.during["retry"] = second_worker_polls
    h.effects.perform(retry, _order_row(h))

    assert seen["claimed"] == [], (
        f"while worker 1's send was out (claim due_at {seen['due_at']}, clock {h.clock()}), worker 2 claimed "
        f"{seen['claimed']}: the charge is taken over and re-sent while its first send is out"
    )


@dataclass
class SlowSecondOrder:
    """ord_1's first send charges at once; ord_2's send takes ``slow`` seconds and runs ``during()`` meanwhile; a
    later send of ord_1 finds the switch not answering (TransientError)."""

    slow: float
    during: Callable[[], None] | None = None
    calls: list[str] = field(default_factory=list)
    charged: dict[str, ChargeResult] = field(default_factory=dict)

    def charge(self, request: ChargeRequest) -> ChargeResult:
        self.calls.append(request.idempotency_key)
        if ":ord_1:" in request.idempotency_key and request.idempotency_key in self.charged:
            raise TransientError("timeout calling connector 'adyen': ReadTimeout")
        if ":ord_2:" in request.idempotency_key:
            time.sleep(self.slow)
            hook, self.during = self.during, None
            if hook is not None:
                hook()
        result = ChargeResult(status="success", connector=request.connector)
        self.charged[request.idempotency_key] = result
        return result


def test_a_charge_answered_early_in_a_batch_keeps_its_claim_until_recorded(
    make_harness: Any,  # noqa: F811 - the fixture
) -> None:
    """A batch of two retries: ord_1's is charged at once, ord_2's send is slow (renewed by the ClaimKeeper, as
    f0c2e2a intends). ord_1's answer waits for the batch to be recorded, but its claim is no longer renewed (nor
    held, as f810337's hold did): it ends with the batch's lease, a second worker takes ord_1's charge over as a
    re-send (the switch does not answer it), and worker 1's answer 'success' is dropped as stale. The customer's
    money was taken and nothing records it; the order stays PENDING with a charge that 'may have' gone through."""
    connector = SlowSecondOrder(slow=1.6)
    h = make_harness(
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=connector,  # type: ignore[arg-type]
    )
    base, started = h.clock(), time.monotonic()
    h.executor.clock = lambda: base + timedelta(seconds=time.monotonic() - started)  # real seconds
    h.executor.payment_failed("m_demo", event("ord_1"))
    h.executor.payment_failed("m_demo", event("ord_2"))
    first = Worker(h.executor, h.effects, "w1", lease_seconds=1.0)
    second = Worker(h.executor, h.effects, "w2", lease_seconds=30.0)
    taken: list[int] = []
    connector.during = lambda: taken.append(second.run_once())  # worker 2 polls while ord_2's send is out

    assert first.run_once() == 2
    with h.executor.engine.connect() as conn:
        recorded = conn.scalar(
            sa.select(sa.func.count())
            .select_from(transactions)
            .where(transactions.c.order_id == "ord_1", transactions.c.status == "success")
        )
    ord_1_charged = [k for k, r in connector.charged.items() if ":ord_1:" in k and r.status == "success"]
    assert ord_1_charged  # the money was taken by worker 1's send

    assert (recorded, h.view("ord_1").state) == (1, "SUCCEEDED"), (
        f"ord_1 was charged ({ord_1_charged}) but its success is not on record (state {h.view('ord_1').state}); "
        f"worker 2 claimed {taken} while ord_2's send was out and re-sent ord_1 (calls {connector.calls})"
    )


def test_a_claim_outlives_a_short_database_outage_while_its_charge_is_out(
    make_harness: Any,  # noqa: F811 - the fixture
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database refuses the first three renewals of a charge that is out (a restart, a failover). A renewal
    that failed used to be tried again only a third of the lease later, so three failures in a row ran past the
    lease, and a second worker polling then took the charge over as a re-send while its first send was out. A
    failed renewal is now tried again after a thirtieth of the lease, and the claim never lapses."""
    h = make_harness(
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=HookConnector(results=["success"]),
    )
    base, started = h.clock(), time.monotonic()
    h.executor.clock = lambda: base + timedelta(seconds=time.monotonic() - started)  # real seconds
    lease = 3.0  # renewed every 1 s; a failed renewal tried again 0.1 s later
    h.effects.lease = timedelta(seconds=lease)
    real_renew = h.executor.renew_claims
    refusals = iter(range(3))

    def renew_claims(claims: Any) -> set[int]:
        if next(refusals, None) is not None:
            raise sa.exc.OperationalError("UPDATE actions", {}, Exception("the database is restarting"))
        return real_renew(claims)

    monkeypatch.setattr(h.executor, "renew_claims", renew_claims)
    h.executor.payment_failed("m_demo", event())
    (retry,) = h.executor.claim(10, lease, "w1", "claim-w1")  # worker 1 claims it with the same lease
    seen: dict[str, Any] = {}

    def second_worker_polls_after_the_lease() -> None:
        time.sleep(lease + 0.5)
        seen["due_at"], seen["clock"] = _row(h, retry.action_id).due_at, h.executor.clock()
        seen["claimed"] = [(a.action_id, a.kind) for a in h.executor.claim(10, 30, "w2", "claim-w2")]

    h.connector.during["retry"] = second_worker_polls_after_the_lease
    h.effects.perform(retry, _order_row(h))

    assert next(refusals, None) is None  # all three refusals were met
    assert seen["claimed"] == [], (
        f"{lease + 0.5} s into the send (claim due_at {seen['due_at']}, clock {seen['clock']}), worker 2 claimed "
        f"{seen['claimed']}: the claim lapsed while the database refused renewals, and the charge is re-sent"
    )
