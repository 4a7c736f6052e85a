"""A messaging provider's (BSP's) short outage or rate limit costs the customer no message and no cadence day.

Defect hunt 30: with the real Gupshup adapter against the Gupshup fake answering 503 eight times in a row and the
rules-only ``decide()`` (``max_nudges: 2``), the message was dead-lettered after its 8 tries (a few minutes of
backoff) and recorded as ``rejected``, which counted against ``max_nudges`` and used up Day 0: the order ended
FAILED and the customer got one message. A ``Retry-After`` was not honoured either. Now a message the provider
certainly did not take (429, 503, no connection) is tried again for an hour, no sooner than its ``Retry-After``;
given up after that, it counts as before. Tries that may have reached the provider (a timeout, a 500 or 504) are
counted apart, 8 of them, as before.

Hunt 30's reviews left outages longer than an hour: the message was given up and counted. Now a channel whose
provider has refused every message for 15 minutes is down (service/executor/outages.py): its messages are neither
tried nor counted, and orders are decided again without it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from model.catalog import load_catalog
from model.merchant_config import MerchantConfig
from model.vocab import Channel
from service.executor.channels.adapters import build_adapters
from service.executor.channels.fakes import FakeState, run_fake_provider
from service.executor.core import MESSAGE_MAYBE_SENT_TRIES, Replan, Skip, StaleClaimError, Transient
from service.executor.store import actions, as_utc, channel_outages, nudges, payment_links
from service.executor.worker import make_decider
from tests.integration.test_executor import (  # noqa: F401 - make_harness is a fixture
    START,
    Harness,
    demo_merchant,
    event,
    make_harness,
    nudge_action_key,
)


@pytest.fixture
def gupshup() -> Iterator[Any]:
    with run_fake_provider("gupshup") as fake:
        yield fake


@pytest.fixture
def rules_only() -> Iterator[Any]:
    decider, stop = make_decider(load_catalog(), None, seed=1)
    yield decider
    stop()


def whatsapp_through(fake: Any, max_nudges: int = 2) -> MerchantConfig:
    provider = {"kind": "gupshup", "base_url": fake.base_url, "api_key_env": "GS_KEY", "source": "919000000000"}
    return demo_merchant(
        retry={"max_retries": 0},
        retarget={"channels": ["whatsapp"], "max_nudges": max_nudges},
        providers={"whatsapp": provider},
    )


def harness_for(build: Callable[..., Harness], fake: Any, decider: Any) -> Harness:
    """The executor with the real Gupshup adapter against ``fake`` and the real rules-only ``decide()``."""
    h = build(decider=decider, merchants={"m_demo": whatsapp_through(fake)})
    env = {"GS_KEY": fake.state.api_key}
    h.effects.adapter_factory = lambda mid, merchant, http: build_adapters(mid, merchant, env, http)
    return h


def step(h: Harness, times: int, **every: float) -> None:
    for _ in range(times):
        h.drain()
        h.clock.advance(**every)


def statuses(h: Harness) -> list[str]:
    return [nudge.status for nudge in h.view().nudges]


def message_action(h: Harness) -> Any:
    return next(a for a in h.view().actions if a.kind == "nudge")


def test_a_short_bsp_outage_leaves_the_message_budget_intact_and_the_message_goes_out_when_it_is_back(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    gupshup: Any,
    rules_only: Any,
) -> None:
    """Before, ten 503s in a row (about ten minutes) dead-lettered the message after 8 tries and recorded it
    ``rejected``: it counted against ``max_nudges: 2`` and took Day 0, and the customer got one message in all."""
    h = harness_for(make_harness, gupshup, rules_only)
    state: FakeState = gupshup.state
    state.fail(times=10, status=503)
    h.executor.payment_failed("m_demo", event())
    step(h, 30, minutes=1)
    assert statuses(h) == ["accepted"]  # sent on Day 0, once the provider answered again
    assert h.clock.now - START == timedelta(minutes=30)
    assert h.view().nudges[0].sent_at < START + timedelta(minutes=30)
    assert len(state.messages) == 1
    step(h, 8 * 24, hours=1)
    assert statuses(h) == ["accepted", "accepted"]
    assert len(state.messages) == 2


def test_retry_after_from_the_provider_is_honoured(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    gupshup: Any,
    rules_only: Any,
) -> None:
    """Before, a 429 with ``Retry-After: 120`` was tried again after the 1 s backoff, and again, hammering a
    provider that asked for two minutes of quiet."""
    h = harness_for(make_harness, gupshup, rules_only)
    state: FakeState = gupshup.state
    state.fail(times=1, status=429, retry_after="120")
    h.executor.payment_failed("m_demo", event())
    h.drain()
    failed_at = h.clock.now
    assert (message_action(h).state, message_action(h).due_at) == ("scheduled", failed_at + timedelta(seconds=120))
    h.clock.advance(seconds=119)
    h.drain()
    assert state.messages == []
    h.clock.advance(seconds=1)
    h.drain()
    assert len(state.messages) == 1
    assert statuses(h) == ["accepted"]


def test_a_retry_after_of_a_day_is_capped(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    gupshup: Any,
    rules_only: Any,
) -> None:
    """A provider asking for a day of quiet is tried again after ``retry_after_cap_seconds`` (15 minutes)."""
    h = harness_for(make_harness, gupshup, rules_only)
    gupshup.state.fail(times=1, status=503, retry_after="86400")
    h.executor.payment_failed("m_demo", event())
    h.drain()
    assert message_action(h).due_at == h.clock.now + timedelta(minutes=15)


def decisions_of(h: Harness) -> list[dict[str, Any]]:
    return h.view().decisions


def test_an_outage_of_hours_costs_no_message_and_the_message_goes_when_the_provider_is_back(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    gupshup: Any,
    rules_only: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before, a message refused for an hour was given up and recorded ``rejected``: it counted against
    ``max_nudges`` and went into the exported history as a nudge that never reached the customer. Now, after 15
    minutes of refusals the channel is down: the message is not counted nor recorded, and, WhatsApp being the
    merchant's only channel, it waits for the channel (held 5, 10, 20, 40 minutes, then hourly) instead of the
    order failing; it goes out once the provider takes messages again."""
    h = harness_for(make_harness, gupshup, rules_only)
    state: FakeState = gupshup.state
    state.fail(times=100_000, status=503)
    caplog.set_level(logging.WARNING, logger="winback.executor")
    h.executor.payment_failed("m_demo", event())
    step(h, 3 * 60, minutes=1)
    assert statuses(h) == []  # nothing was sent, so nothing is in the history
    assert (
        "channel whatsapp of merchant m_demo is down until 2026-11-02T06:21:00Z: its provider has refused every "
        "message since 2026-11-02T06:00:00Z"
    ) in caplog.text  # the times as operators read them (UTC to the second, Z), not isoformat()'s ``+00:00``
    assert h.view().state == "PENDING"
    made = decisions_of(h)
    # One at the failure, and one when the channel went down (after 15 minutes of refusals): the message then
    # planned waits for the channel through every later hold (5, 10, 20, 40 and 60 minutes), uncounted, and the
    # order is not decided again at each (an exploring policy could stop it there: review).
    assert len(made) == 2
    assert all(decision["action"] == "retarget" and decision["channel"] == "whatsapp" for decision in made)
    assert "channel_down:whatsapp" in made[1]["rules_applied"]
    # Times an operator reads (the order view, the console, the CLI) in UTC to the second with a Z, as the lists
    # write them: the reasons wrote ``2026-11-02T06:21:00+00:00`` (Python's isoformat()).
    assert "whatsapp is down until 2026-11-02T06:21:00Z: the message waits for it" in made[1]["reasons"]
    waiting = [action for action in h.view().actions if action.kind == "nudge"][-1]
    assert waiting.state == "scheduled"
    assert waiting.last_error == "whatsapp is down until 2026-11-02T09:31:00Z (gupshup answered HTTP 503: fake failure)"
    assert state.messages == []
    state.reset()  # the provider is back
    step(h, 61, minutes=1)  # the longest hold is an hour
    assert statuses(h) == ["accepted"]
    assert len(state.messages) == 1


def test_while_whatsapp_is_down_the_customer_gets_the_message_by_sms(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    gupshup: Any,
    rules_only: Any,
) -> None:
    """A merchant with WhatsApp and SMS: WhatsApp's provider refuses every message. Before, the customer got no
    message for an hour, then the refused WhatsApp message counted against them. Now, once WhatsApp is down (15
    minutes of refusals), the order is decided again without it and the message goes by SMS."""
    with run_fake_provider("gupshup", username="2000123", password="pw") as sms_fake:
        whatsapp = {"kind": "gupshup", "base_url": gupshup.base_url, "api_key_env": "GS_KEY", "source": "919000000000"}
        sms = {
            "kind": "gupshup", "base_url": sms_fake.base_url, "username_env": "GS_USER", "password_env": "GS_PASS",
            "source": "WINBCK",
        }  # fmt: skip
        merchant = demo_merchant(
            retry={"max_retries": 0},
            retarget={"channels": ["whatsapp", "sms"], "max_nudges": 2},
            providers={"whatsapp": whatsapp, "sms": sms},
        )
        h = make_harness(decider=rules_only, merchants={"m_demo": merchant})
        env = {"GS_KEY": gupshup.state.api_key, "GS_USER": "2000123", "GS_PASS": "pw"}
        h.effects.adapter_factory = lambda mid, config, http: build_adapters(mid, config, env, http)
        gupshup.state.fail(times=100_000, status=503)
        h.executor.payment_failed("m_demo", event())
        first = decisions_of(h)[0]
        assert (first["action"], first["channel"]) == ("retarget", "whatsapp")
        step(h, 30, minutes=1)
        sent = h.view().nudges
        assert [(nudge.channel, nudge.status) for nudge in sent] == [("sms", "accepted")]
        assert len(sms_fake.state.messages) == 1
        assert "channel_down:whatsapp" in decisions_of(h)[-1]["rules_applied"]
        refused = next(a for a in h.view().actions if a.kind == "nudge")  # the WhatsApp message, planned first
        assert refused.state == "done"
        assert refused.last_error == (
            "not sent: whatsapp is down until 2026-11-02T06:21:00Z (gupshup answered HTTP 503: fake failure)"
        )


def test_tries_that_may_have_reached_the_provider_are_counted_apart_from_refused_ones(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    gupshup: Any,
    rules_only: Any,
) -> None:
    """Nine refused tries and then one gateway timeout: the message was given up at once, its refused tries
    counted as its 8 (review). The timeout is its first try that may have reached the provider."""
    h = harness_for(make_harness, gupshup, rules_only)
    state: FakeState = gupshup.state
    state.fail(times=9, status=503)
    h.executor.payment_failed("m_demo", event())
    step(h, 12, minutes=1)
    assert len(state.messages) == 0
    state.hang(times=1, seconds=0.0)
    step(h, 20, minutes=1)
    assert statuses(h) == ["accepted"]


def test_a_message_whose_tries_may_have_reached_the_provider_still_counts_when_given_up(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    gupshup: Any,
    rules_only: Any,
) -> None:
    """A 504 (a gateway's timeout) may have reached the provider: given up after its 8 tries, the message counts
    against ``max_nudges`` as before (the customer may have it), and is not tried for an hour."""
    h = harness_for(make_harness, gupshup, rules_only)
    gupshup.state.hang(times=8, seconds=0.0)
    h.executor.payment_failed("m_demo", event())
    step(h, 10, minutes=1)
    given_up = message_action(h)
    assert given_up.state == "dead"
    assert "gave up after 8 tries" in (given_up.last_error or "")
    assert statuses(h) == ["rejected"]
    assert h.view().nudges[0].sent_at < START + timedelta(minutes=10)


def test_a_message_an_earlier_try_may_have_sent_still_counts_when_its_channel_goes_down(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    gupshup: Any,
    rules_only: Any,
) -> None:
    """A first try that timed out (504) may have reached the customer: when WhatsApp then goes down, that message
    is not dropped from the history as never sent. It waits for the channel and, refused for over an hour, is given
    up and counted as before."""
    h = harness_for(make_harness, gupshup, rules_only)
    state: FakeState = gupshup.state
    state.hang(times=1, seconds=0.0)
    state.fail(times=100_000, status=503)
    h.executor.payment_failed("m_demo", event())
    step(h, 30, minutes=1)
    assert message_action(h).state == "scheduled"  # held while the channel is down, not decided again
    assert len(decisions_of(h)) == 1
    step(h, 75, minutes=1)  # refused since 06:01; its first try after 07:01 is at the end of a hold, 07:31
    assert statuses(h) == ["rejected"]


@pytest.mark.parametrize("seed", [1, 6])
def test_an_exploring_policy_does_not_fail_a_one_channel_order_during_a_long_outage(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    gupshup: Any,
    seed: int,
) -> None:
    """Review of the first form: the order was decided again at every hold, and with these seeds the exploring
    policy picked stop at the 10th and 13th decision of 12 hours of 503s, failing the order. The message that waits
    for the channel is now deferred through the holds, and the order is decided twice in all."""
    decider, stop = make_decider(load_catalog(), None, seed=seed)
    try:
        h = harness_for(make_harness, gupshup, decider)
        gupshup.state.fail(times=100_000, status=503)
        h.executor.payment_failed("m_demo", event())
        step(h, 12 * 60, minutes=1)
        assert h.view().state == "PENDING"
        assert len(decisions_of(h)) <= 2
        assert statuses(h) == []
    finally:
        stop()


def _a_message_that_may_have_gone_out_waits_for_its_channel(h: Harness, state: FakeState) -> None:
    """The message's first try timed out (504: the provider may have sent it), then WhatsApp went down: the
    message is held, scheduled, through the outage."""
    state.hang(times=1, seconds=0.0)
    state.fail(times=100_000, status=503)
    h.executor.payment_failed("m_demo", event())
    step(h, 30, minutes=1)
    assert message_action(h).state == "scheduled"
    assert statuses(h) == []


def test_a_message_that_may_have_gone_out_is_kept_in_the_history_when_its_order_succeeds_meanwhile(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    gupshup: Any,
    rules_only: Any,
) -> None:
    """Left from stop 31: the order settled while the message waited for its channel, and settling cancelled it
    with no record, although its first try may have reached the customer (whose payment may be its doing)."""
    h = harness_for(make_harness, gupshup, rules_only)
    _a_message_that_may_have_gone_out_waits_for_its_channel(h, gupshup.state)
    _settle(h)
    step(h, 5, minutes=1)
    assert message_action(h).state == "cancelled"
    assert statuses(h) == ["rejected"]
    (nudge,) = h.view().nudges
    assert "may have reached" in (nudge.error or "")


def test_a_message_that_may_have_gone_out_is_kept_in_the_history_when_the_customer_opts_out_meanwhile(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    gupshup: Any,
    rules_only: Any,
) -> None:
    """The same, when a STOP from the customer arrives while the message waits: at its next try it is decided
    again (the channel opted out), and it stays in the history."""
    h = harness_for(make_harness, gupshup, rules_only)
    _a_message_that_may_have_gone_out_waits_for_its_channel(h, gupshup.state)
    assert h.executor.opt_out_address("m_demo", Channel.WHATSAPP, "+919800000001", "test")
    step(h, 60, minutes=1)
    assert statuses(h)[:1] == ["rejected"]
    assert "may have reached" in (h.view().nudges[0].error or "")
    assert all(nudge.channel != "whatsapp" for nudge in h.view().nudges[1:])


def test_when_a_hold_ends_one_message_probes_the_channel_and_the_others_wait_for_its_answer(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    gupshup: Any,
    rules_only: Any,
) -> None:
    """Six orders of a WhatsApp-only merchant wait through three hours of 503s: each hold's end costs the provider
    at most one refused message, and once it is back the waiting messages all go out (none is left waiting on a
    probe)."""
    h = harness_for(make_harness, gupshup, rules_only)
    state: FakeState = gupshup.state
    state.fail(times=100_000, status=503)
    orders = [f"ord_{n}" for n in range(1, 7)]
    for order_id in orders:
        h.executor.payment_failed("m_demo", event(order_id=order_id, customer={"phone": f"+91980000000{order_id[-1]}"}))
    step(h, 20, minutes=1)  # refused since the first minute: the channel is down from the 15th
    refused_when_down = 100_000 - len(state._faults)
    step(h, 160, minutes=1)  # holds of 5, 10, 20, 40, 60 minutes: five ends
    refused_at_hold_ends = 100_000 - len(state._faults) - refused_when_down
    assert 1 <= refused_at_hold_ends <= 5, f"{refused_at_hold_ends} messages were refused at five hold ends"
    assert [h.view(order_id).state for order_id in orders] == ["PENDING"] * 6
    state.reset()  # the provider is back
    step(h, 65, minutes=1)
    # Each order's message went out once the provider was back, but one the exploring policy planned for a later
    # day (with seed 1, one of the six), which waits for it.
    later = [order_id for order_id in orders if any(
        action.kind == "nudge" and action.state == "scheduled" and action.due_at > h.clock.now
        for action in h.view(order_id).actions
    )]  # fmt: skip
    assert len(later) <= 1
    assert len(state.messages) == 6 - len(later)
    sent = {order_id: [nudge.status for nudge in h.view(order_id).nudges] for order_id in orders}
    assert sent == {order_id: [] if order_id in later else ["accepted"] for order_id in orders}


def test_two_workers_at_a_holds_end_send_one_probe(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    gupshup: Any,
    rules_only: Any,
) -> None:
    """Left from stop 31: when a hold ended, each executor worker tried a message of its own on the channel (a
    provider that may still be down got one per worker). Two workers claim a waiting message each at the hold's end
    and perform them before either answer is recorded: one is the probe, the other waits for its answer."""
    h = harness_for(make_harness, gupshup, rules_only)
    state: FakeState = gupshup.state
    state.fail(times=100_000, status=503)
    for order_id in ("ord_1", "ord_2"):
        h.executor.payment_failed("m_demo", event(order_id=order_id, customer={"phone": f"+91980000000{order_id[-1]}"}))
    step(h, 20, minutes=1)  # down from the 15th minute, for 5 minutes
    waiting = [a for o in ("ord_1", "ord_2") for a in h.view(o).actions if a.kind == "nudge" and a.state == "scheduled"]
    assert len(waiting) == 2
    h.clock.now = max(action.due_at for action in waiting)  # the hold's end
    refused_before = 100_000 - len(state._faults)
    claimed = [h.executor.claim(1, 30.0, f"w{n}", f"tok{n}")[0] for n in (1, 2)]
    with h.executor.engine.connect() as conn:
        found = h.executor.orders_of(conn, claimed)
    outcomes = [h.effects.perform(action, found[(action.merchant_id, action.order_id)]) for action in claimed]
    assert 100_000 - len(state._faults) - refused_before == 1
    assert [type(outcome).__name__ for outcome in outcomes] == ["Transient", "Defer"]


def test_the_link_of_a_message_its_provider_never_confirmed_still_pays(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    gupshup: Any,
    rules_only: Any,
) -> None:
    """Found by stop 32's retargeting hunt: a link was kept only with a confirmed send, so the customer who got a
    message whose try timed out (the provider sent it and its answer was lost) was told "This link is not valid".
    The genuine token of one of the order's messages now pays, the order succeeds with one webhook, and the message
    is in the history as delivered and clicked."""
    h = harness_for(make_harness, gupshup, rules_only)
    state: FakeState = gupshup.state
    state.hang(times=1, seconds=0.0)
    state.fail(times=100_000, status=503)  # the provider then goes down: the message waits, scheduled
    h.executor.payment_failed("m_demo", event())
    step(h, 30, minutes=1)
    action = message_action(h)
    assert action.state == "scheduled"
    # What the timed-out try carried: the link of that message (the same token_id; its own expiry).
    _, token, _ = h.executor.new_link("m_demo", "ord_1", nudge_action_key(h), START)
    page = h.executor.open_link(token)
    assert (page.order_id, page.state) == ("ord_1", "PENDING")
    payment = h.executor.start_link_payment(token, 30, "api", "claim-1")
    h.connector.results.append("success")
    with h.executor.engine.connect() as conn:
        order = h.executor.orders_of(conn, [payment.action])[("m_demo", "ord_1")]
    outcome = h.effects.perform(payment.action, order)
    assert h.count(nudges) == 0  # the message is not recorded yet
    with h.executor.engine.begin() as conn:
        h.executor.complete(conn, payment.action, outcome)
    step(h, 3, minutes=1)
    view = h.view()
    assert view.state == "SUCCEEDED"
    assert view.attempts[-1].strategy == "retarget_link"
    (nudge,) = view.nudges
    assert view.attempts[-1].nudge_id == nudge.nudge_id
    assert (nudge.status, nudge.delivered, nudge.clicked_at is not None) == ("accepted", True, True)
    assert len(h.receiver.received) == 1
    # Paid before its message was recorded: the payment still carries the decision that sent the link.
    assert nudge.decision_id is not None
    assert (view.attempts[-1].decision_id, view.attempts[-1].propensity) == (nudge.decision_id, nudge.propensity)


def test_a_link_opened_before_its_message_was_confirmed_is_kept_when_the_provider_confirms_it(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    gupshup: Any,
    rules_only: Any,
) -> None:
    """The customer opens the link of a message whose try timed out; the provider, back later, confirms a re-send
    of the message: its link row is there already, and the send is recorded (with the later expiry) instead of
    failing on the duplicate row."""
    h = harness_for(make_harness, gupshup, rules_only)
    state: FakeState = gupshup.state
    state.hang(times=1, seconds=0.0)
    state.fail(times=100_000, status=503)
    h.executor.payment_failed("m_demo", event())
    step(h, 30, minutes=1)
    _, token, first_expiry = h.executor.new_link("m_demo", "ord_1", nudge_action_key(h), START)
    opened_at = h.clock.now
    h.executor.open_link(token)
    state.reset()  # the provider is back
    step(h, 61, minutes=1)
    (nudge,) = h.view().nudges
    assert nudge.status == "accepted"
    # The customer opened it before the provider confirmed it: the history says so (it said not clicked).
    assert nudge.clicked_at is not None
    assert as_utc(nudge.clicked_at) == opened_at
    assert len(state.messages) == 1
    with h.executor.engine.connect() as conn:
        (expires_at,) = conn.execute(sa.select(payment_links.c.expires_at)).scalars().all()
    assert as_utc(expires_at) > first_expiry
    assert h.executor.open_link(token).state == "PENDING"  # the first token still opens it


def _a_message_being_tried_again(h: Harness, state: FakeState) -> Any:
    """A message whose first try timed out (it may have been sent), claimed now for its next try: when it is due,
    and 6 s after the first at least (Meta's pair rate: one message every 6 s to one customer)."""
    state.hang(times=1, seconds=0.0)
    h.executor.payment_failed("m_demo", event())
    h.drain()
    action = message_action(h)
    assert action.state == "scheduled"
    h.clock.now = max(action.due_at, START + timedelta(seconds=6))
    (claimed,) = h.executor.claim(1, 30.0, "w1", "tok1")
    return claimed


def _settle(h: Harness) -> None:
    succeeded = {"order_id": "ord_1", "txn_id": "txn_ext", "occurred_at": h.clock.now.isoformat(),
                 "idempotency_key": "s1"}  # fmt: skip
    assert h.executor.payment_succeeded("m_demo", succeeded).state == "SUCCEEDED"


def test_a_message_being_tried_again_when_its_order_settles_stays_in_the_history(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    gupshup: Any,
    rules_only: Any,
) -> None:
    """The order settles while a worker holds the message for its next try: the worker then finds the order
    settled and sends nothing, but the first try may have reached the customer, so it is in the history."""
    h = harness_for(make_harness, gupshup, rules_only)
    claimed = _a_message_being_tried_again(h, gupshup.state)
    _settle(h)
    with h.executor.engine.connect() as conn:
        order = h.executor.orders_of(conn, [claimed])[("m_demo", "ord_1")]
    outcome = h.effects.perform(claimed, order)
    assert type(outcome).__name__ == "Skip"
    with pytest.raises(StaleClaimError), h.executor.engine.begin() as conn:
        h.executor.complete(conn, claimed, outcome)
    (nudge,) = h.view().nudges
    assert nudge.status == "rejected"
    assert "may have reached the provider" in (nudge.error or "")


def test_a_message_sent_while_its_order_settles_is_recorded_as_sent(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    gupshup: Any,
    rules_only: Any,
) -> None:
    """The worker's try goes out, then the order settles before the answer is recorded (settling records the
    message as not known to be sent): the recorded answer turns it into a sent message with its link."""
    h = harness_for(make_harness, gupshup, rules_only)
    claimed = _a_message_being_tried_again(h, gupshup.state)
    with h.executor.engine.connect() as conn:
        order = h.executor.orders_of(conn, [claimed])[("m_demo", "ord_1")]
    outcome = h.effects.perform(claimed, order)
    assert type(outcome).__name__ == "Sent"
    _settle(h)
    with h.executor.engine.begin() as conn:
        h.executor.complete(conn, claimed, outcome)
    (nudge,) = h.view().nudges
    assert (nudge.status, nudge.delivered, nudge.error) == ("accepted", True, None)
    with h.executor.engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(payment_links)) == 1


def test_a_message_that_may_have_gone_out_is_kept_when_the_customer_is_opted_out_by_id(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    gupshup: Any,
    rules_only: Any,
) -> None:
    """Review of this stop's change: ``Executor.opt_out`` (by customer id) cancelled the waiting message without
    the record the other cancellations keep."""
    h = harness_for(make_harness, gupshup, rules_only)
    _a_message_that_may_have_gone_out_waits_for_its_channel(h, gupshup.state)
    assert h.executor.opt_out("m_demo", "cus_71", Channel.WHATSAPP) == 1  # the factory request's customer
    assert message_action(h).state == "cancelled"
    assert statuses(h) == ["rejected"]
    assert "opted out" in (h.view().nudges[0].error or "")


def test_a_429_whose_recording_fails_keeps_its_retry_after_and_counts_toward_the_outage(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The SMS provider answers 429 with a Retry-After of ten minutes, and recording that answer fails (twice: the
    batch's transaction and the action's own). The worker then recorded a plain "recording failed" transient: the
    message went again two seconds later, against the provider's Retry-After, as a try that may have reached the
    customer, and the refusal never counted toward the channel's outage. The fallback keeps the answer (and says
    recording failed); the failure is logged."""
    h = make_harness({"action": "retarget", "channel": "sms"})
    h.executor.payment_failed("m_demo", event())
    [sms] = h.executor.claim(10, 30, "w1", "claim-w1")
    assert h.effects._mark_message_sending(sms) is None
    h.executor.unmark_sent(sms)  # as ``Effects._nudge`` does for an answer other than accepted
    refused = Transient(
        "sms provider answered HTTP 429", status_code=429, not_taken=True, retry_after=timedelta(minutes=10)
    )
    note_refusal, failures = h.executor.retry_policy.note_refusal, [RuntimeError("the database hiccupped")] * 2

    def failing_note_refusal(*args: Any) -> Any:
        if failures:
            raise failures.pop()
        return note_refusal(*args)

    h.executor.retry_policy.note_refusal = failing_note_refusal  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="winback"):
        h.worker.record([(sms, refused)])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("winback")]
    assert errors == [f"recording action {sms.action_id} failed"]
    action = message_action(h)
    assert action.state == "scheduled"
    assert as_utc(action.due_at) == START + timedelta(minutes=10)
    assert "sms provider answered HTTP 429; recording failed: RuntimeError: the database hiccupped" in (
        action.last_error or ""
    )
    with h.executor.engine.connect() as conn:
        payload = json.loads(conn.scalar(sa.select(actions.c.payload_json).where(actions.c.action_id == sms.action_id)))
        streaks = conn.execute(sa.select(channel_outages.c.channel, channel_outages.c.last_refused_at)).all()
    assert MESSAGE_MAYBE_SENT_TRIES not in payload
    assert [(row.channel, as_utc(row.last_refused_at)) for row in streaks] == [("sms", START)]


def _two_sms_claimed_after_a_hold(h: Harness) -> tuple[Any, Any]:
    """ord_1's and ord_2's SMS, claimed just after a hold of the SMS channel ended (the first is to be the probe)."""
    with h.executor.engine.begin() as conn:
        conn.execute(
            channel_outages.insert().values(
                merchant_id="m_demo",
                channel="sms",
                refused_since=START - timedelta(minutes=30),
                last_refused_at=START - timedelta(minutes=6),
                down_until=START - timedelta(seconds=1),
                times_down=1,
            )
        )
    h.executor.payment_failed("m_demo", event("ord_1"))
    h.executor.payment_failed("m_demo", event("ord_2", customer={"phone": "+919800000002"}))
    first, second = h.executor.claim(10, 30, "w1", "claim-w1")
    assert (first.order_id, second.order_id) == ("ord_1", "ord_2")
    return first, second


def _ord_1_decided_again(h: Harness, message: Any) -> None:
    """ord_1 is decided again (its customer's link payment was declined): its claimed ``message`` is replaced."""
    with h.executor.engine.begin() as conn:
        order = h.executor.lock_order(conn, "m_demo", "ord_1")
        assert order is not None
        h.executor._decision_point(conn, order, h.clock(), "the customer's payment by link was declined")
    replaced = next(a for a in h.view("ord_1").actions if a.action_id == message.action_id)
    assert (replaced.state, replaced.last_error) == ("cancelled", "replaced by a later decision")


def test_a_message_replaced_before_its_hand_over_leaves_the_probe_to_the_channels_next_message(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """The SMS channel's hold has just ended. A worker claims ord_1's SMS (the probe-to-be) and, before it hands the
    message over, ord_1 is decided again and the SMS replaced. The worker's hand-over took the channel's probe and
    only then found its claim gone: nothing went, and ord_2's SMS waited a whole lease for that probe's answer
    ("another message is probing sms"). The claim is checked, under its row's lock, before the probe is taken: the
    replaced message takes nothing, and ord_2's SMS is the probe at once."""
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retarget", "channel": "sms"},
        {"action": "retarget", "channel": "email", "delay": timedelta(hours=1)},  # ord_1 decided again
        database_url=database_url,
    )
    first, second = _two_sms_claimed_after_a_hold(h)
    _ord_1_decided_again(h, first)
    assert h.effects._mark_message_sending(first) == Skip("the claim is no longer this worker's")
    assert h.effects._mark_message_sending(second) is None  # the probe
    with h.executor.engine.connect() as conn:
        probe_until = conn.scalar(sa.select(channel_outages.c.probe_until))
    assert as_utc(probe_until) == START + timedelta(seconds=h.effects.lease.total_seconds())


def test_a_probes_refusal_after_its_message_was_replaced_still_ends_the_probe_with_a_new_hold(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """ord_1's SMS probes the SMS channel after its hold; the provider answers 503 (it did not take it), and ord_1 is
    decided again (the SMS replaced) before that answer is recorded. The answer was refused as stale and rolled back
    whole, the refusal with it: the probe's slot stayed taken for a lease (ord_2's SMS "waits for the probe"), and
    then ord_2's SMS probed a provider that had just refused one. The refusal is kept: the channel is down again (a
    hold twice as long), its probe slot free, and ord_2 is decided again without it."""
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retarget", "channel": "sms"},
        {"action": "retarget", "channel": "email", "delay": timedelta(hours=1)},
        database_url=database_url,
    )
    first, second = _two_sms_claimed_after_a_hold(h)
    assert h.effects._mark_message_sending(first) is None  # the probe, handed over
    h.executor.unmark_sent(first)  # as ``Effects._nudge`` does for an answer other than accepted
    _ord_1_decided_again(h, first)
    refused = Transient("sms provider answered HTTP 503", status_code=503, not_taken=True)
    h.worker.record([(first, refused)])
    h.clock.advance(seconds=5)
    h.worker.record([(first, refused)])  # a repeat: refused as stale, counted once
    with h.executor.engine.connect() as conn:
        streak = conn.execute(sa.select(channel_outages)).mappings().one()
    down_until = START + timedelta(seconds=2 * h.executor.retry_policy.channel_down_first_hold_seconds)
    assert (as_utc(streak["down_until"]), streak["times_down"], streak["probe_until"]) == (down_until, 2, None)
    assert as_utc(streak["last_refused_at"]) == START
    replaced = next(a for a in h.view("ord_1").actions if a.action_id == first.action_id)
    assert (replaced.state, replaced.last_error) == (
        "cancelled",
        "replaced by a later decision; its provider's answer meanwhile: sms provider answered HTTP 503",
    )
    # UTC to the second with a Z, as an operator reads times in the lists: it wrote down_until.isoformat().
    assert h.effects._mark_message_sending(second) == Replan("sms is down until 2026-11-02T06:10:00Z")
