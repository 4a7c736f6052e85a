"""An SMTP relay's throttling answer holds the merchant's e-mail sender, as a rate-limited WhatsApp receipt does.

Before: Amazon SES's ``454 Throttling failure`` was one more 4xx that certainly did not go: the message was tried
again on its own after a few seconds (its backoff), into the same limit, while the merchant's other e-mails went on
at full speed; it counted toward the channel's outage and was given up after an hour (a daily quota lasts longer),
then recorded as refused and counted against the customer's ``max_nudges``. Google's ``550 5.4.5 Daily user sending
limit exceeded`` was a refusal for good at once. Now either holds the merchant's e-mail (service/executor/pacing.py):
the message and every other e-mail of the merchant wait for the hold's end, uncounted, none lost, and go one at a
time then. A refusal of the recipient (``550 5.1.1``) is about that message alone and holds nothing.

The adapters are the real ones (``build_adapters``: ``SmtpAdapter`` over smtplib) against the fake SMTP server.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from model.baselines import StaticRetryThenRetargetPolicy, decision_id
from model.merchant_config import MerchantConfig
from model.requests import Decision, DecisionRequest
from model.vocab import Channel
from service.api.app import create_app
from service.executor.channels.adapters import build_adapters
from service.executor.channels.fakes import FakeSmtpServer, run_fake_provider
from service.executor.metrics import SenderBansCollector, SenderSetupRefusalsCollector
from service.executor.store import as_utc, channel_outages, channel_pacing
from tests.integration.test_executor import (  # noqa: F401 - make_harness is a fixture
    START,
    Harness,
    demo_merchant,
    event,
    make_harness,
)
from tests.integration.test_executor_message_outage import rules_only  # noqa: F401 - a fixture
from tests.integration.test_whatsapp_held_back import holds_scraped
from tests.unit.test_api import Api, settings_for

EMAIL = {"action": "retarget", "channel": "email"}
SES_RATE = "Throttling failure: Maximum sending rate exceeded"
SES_DAILY = "Throttling failure: Daily message quota exceeded"
GMAIL_DAILY = "5.4.5 Daily user sending limit exceeded. - gsmtp"


#: The relay's user name and password in ``through_relay(login=True)``.
RELAY_LOGIN = ("mailer", "s3cret")


@pytest.fixture
def smtp() -> Iterator[FakeSmtpServer]:
    with FakeSmtpServer() as server:
        yield server


def through_relay(
    make: Callable[..., Harness],
    smtp: FakeSmtpServer,
    orders: int,
    *,
    sms: Any = None,
    login: bool = False,
    **kwargs: Any,
) -> Harness:
    """A harness whose merchant sends e-mail through ``smtp`` with the real adapters, planning ``orders`` e-mails
    (with no ``decider`` given); with ``sms`` (a running Gupshup fake), SMS through it too, after e-mail; with
    ``login``, logging in to the relay as ``RELAY_LOGIN``."""
    relay = {"kind": "smtp", "host": "127.0.0.1", "port": smtp.port, "sender": "pay@shop.example"}
    providers: dict[str, Any] = {"email": relay}
    env: dict[str, str] = {}
    if login:
        relay |= {"username_env": "SMTP_USER", "password_env": "SMTP_PASS"}
        env = dict(zip(("SMTP_USER", "SMTP_PASS"), RELAY_LOGIN, strict=True))
    if sms is not None:
        providers["sms"] = {
            "kind": "gupshup", "base_url": sms.base_url, "username_env": "GS_USER", "password_env": "GS_PASS",
            "source": "WINBCK",
        }  # fmt: skip
        env |= {"GS_USER": "2000123", "GS_PASS": "pw"}
    merchant = demo_merchant(
        retry={"max_retries": 0}, retarget={"channels": list(providers), "max_nudges": 2}, providers=providers
    )
    h = make(*(dict(EMAIL) for _ in range(orders)), merchants={"m_demo": merchant}, **kwargs)

    def adapters(merchant_id: str, config: MerchantConfig, http: httpx.AsyncClient) -> dict[Channel, Any]:
        return dict(build_adapters(merchant_id, config, env, http))

    h.effects.adapter_factory = adapters
    return h


def fail_by_email(h: Harness, *orders: str) -> None:
    for order in orders:
        h.executor.payment_failed("m_demo", event(order, customer={"phone": None, "email": f"{order}@example.com"}))


def fail_by_sms_or_email(h: Harness, order: str) -> None:
    h.executor.payment_failed("m_demo", event(order, customer={"email": f"{order}@example.com"}))


def mailed(smtp: FakeSmtpServer) -> list[str]:
    return [mail["to"][0].split("@")[0] for mail in smtp.messages]


def nudges_of(h: Harness, *orders: str) -> dict[str, list[tuple[str, Any]]]:
    return {order: [(n.status, as_utc(n.sent_at) - START) for n in h.view(order).nudges] for order in orders}


def pacing(h: Harness) -> tuple[timedelta, int] | None:
    with h.executor.engine.connect() as conn:
        row = conn.execute(sa.select(channel_pacing).where(channel_pacing.c.channel == "email")).mappings().first()
        outage = conn.execute(sa.select(channel_outages)).first()
    assert outage is None  # a limited sender is up: the outage breaker is not told
    return None if row is None else (as_utc(row["held_until"]) - START, int(row["times_limited"]))


def test_ses_throttling_holds_the_merchants_e_mail_and_the_held_messages_go_one_at_a_time(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    smtp: FakeSmtpServer,
    database_url: str,
) -> None:
    """SES answers ord_1's e-mail ``454 Throttling failure: Maximum sending rate exceeded``: the merchant's e-mail
    is held a minute (the rate limit's first hold), so ord_2's, planned meanwhile, waits too instead of going into
    the same limit. Neither is recorded as sent nor refused; at the hold's end both go, a second apart, each once."""
    h = through_relay(make_harness, smtp, 2, database_url=database_url)
    smtp.fail(code=454, text=SES_RATE, at="DATA")
    fail_by_email(h, "ord_1")
    h.drain()
    h.clock.advance(seconds=5)
    fail_by_email(h, "ord_2")
    h.drain()
    assert mailed(smtp) == []
    assert nudges_of(h, "ord_1", "ord_2") == {"ord_1": [], "ord_2": []}  # not sent, not counted
    assert pacing(h) == (timedelta(seconds=60), 1)  # counted as the sender's rate limit, once
    waiting = [a for order in ("ord_1", "ord_2") for a in h.view(order).actions if a.kind == "nudge"]
    assert [a.state for a in waiting] == ["scheduled"] * 2
    # Their reasons write the hold's end as the lists write times (UTC to the second, Z), not isoformat()'s
    # ``+00:00``: ord_1's refused into the limit, ord_2's waiting for its turn.
    assert [a.last_error for a in waiting] == [
        f"email is paced until 2026-11-02T06:01:00Z: its sender is limited (smtp: 454 {SES_RATE})",
        "email is paced until 2026-11-02T06:01:00Z (its turn): its sender was rate limited",
    ]
    h.clock.advance(seconds=54)
    h.drain()
    assert mailed(smtp) == []  # still held
    for _ in range(3):
        h.clock.advance(seconds=1)
        h.drain()
    assert sorted(mailed(smtp)) == ["ord_1", "ord_2"]
    sent = nudges_of(h, "ord_1", "ord_2")
    assert sorted(at for nudges in sent.values() for _, at in nudges) == [timedelta(seconds=60), timedelta(seconds=61)]
    assert all([status for status, _ in nudges] == ["accepted"] for nudges in sent.values())


@pytest.mark.parametrize(("code", "text", "at"), [(454, SES_DAILY, "DATA"), (550, GMAIL_DAILY, "MAIL")])
def test_a_daily_quota_holds_the_sender_for_minutes_growing_to_a_day_not_seconds(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    rules_only: Any,  # noqa: F811 - the fixture
    smtp: FakeSmtpServer,
    code: int,
    text: str,
    at: str,
) -> None:
    """The sender over its daily quota (SES's 454, Google's 550 5.4.5) is held 10 minutes (SES asks to wait up to
    10 minutes), and twice as long when the first message after the hold is refused again: not tried every few
    seconds, and the message is neither given up nor counted (Google's 550 was a refusal recorded at once). The
    second hold is long (``sender_quota_replan_after_seconds``): the order is decided again without e-mail, and, the
    merchant having no other channel, its message waits for the hold's end."""
    h = through_relay(make_harness, smtp, 0, decider=rules_only)
    smtp.fail(times=2, code=code, text=text, at=at)
    fail_by_email(h, "ord_1")
    h.drain()
    assert pacing(h) == (timedelta(minutes=10), 1)
    h.clock.advance(minutes=9)
    h.drain()
    assert (mailed(smtp), pacing(h)) == ([], (timedelta(minutes=10), 1))  # no try during the hold
    h.clock.advance(minutes=1)
    h.drain()  # the first try after the hold: refused again, held twice as long
    assert (mailed(smtp), pacing(h)) == ([], (timedelta(minutes=30), 2))
    h.clock.advance(minutes=19)
    h.drain()
    assert mailed(smtp) == []
    h.clock.advance(minutes=1)
    h.drain()
    assert mailed(smtp) == ["ord_1"]
    assert nudges_of(h, "ord_1") == {"ord_1": [("accepted", timedelta(minutes=30))]}
    decisions = h.view("ord_1").decisions
    assert [(d["action"], d["channel"]) for d in decisions] == [("retarget", "email")] * 2
    assert "sender_over_quota:email" in decisions[-1]["rules_applied"]


def first_channel_first(request: DecisionRequest, merchant: MerchantConfig) -> Decision:
    """The static rules' policy (``model.baselines``): a payment link on the merchant's first allowed channel (the
    rules-only ``decide()`` prefers SMS to e-mail), within every rule (quiet hours, ``max_nudges``, opt-outs)."""
    return StaticRetryThenRetargetPolicy({request.merchant_id: merchant})(request)


def test_a_sender_over_its_daily_quota_for_long_is_decided_around_as_an_outage_is(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    smtp: FakeSmtpServer,
    database_url: str,
) -> None:
    """A merchant with e-mail and SMS; its relay says the daily quota is spent (Google's 550 5.4.5) on every try.
    The first hold (10 minutes) is waited out, with ord_2's e-mail planned meanwhile. Refused again after it, the
    sender is held 20 minutes, then 40, up to a day: before, every order's e-mail waited all that time (an outage
    is decided around after 15 minutes). Now a hold longer than 15 minutes is: ord_1's message (refused again) and
    ord_2's (at its turn) are not sent nor counted, both orders are decided again without e-mail and go by SMS,
    and ord_3, failing during the hold, goes by SMS at once."""
    with run_fake_provider("gupshup", username="2000123", password="pw") as sms:
        h = through_relay(make_harness, smtp, 0, sms=sms, decider=first_channel_first, database_url=database_url)
        smtp.fail(times=100, code=550, text=GMAIL_DAILY, at="MAIL")
        fail_by_sms_or_email(h, "ord_1")
        h.drain()
        first = h.view("ord_1").decisions[0]
        assert (first["action"], first["channel"]) == ("retarget", "email")
        assert pacing(h) == (timedelta(minutes=10), 1)
        h.clock.advance(minutes=1)
        fail_by_sms_or_email(h, "ord_2")
        h.drain()
        assert [(d["action"], d["channel"]) for d in h.view("ord_2").decisions] == [("retarget", "email")]
        assert sms.state.messages == []  # the first hold is waited out
        for _ in range(12):
            h.clock.advance(minutes=1)
            h.drain()
        assert mailed(smtp) == []
        assert pacing(h) == (timedelta(minutes=30), 2)
        for order in ("ord_1", "ord_2"):
            view = h.view(order)
            assert [(n.channel, n.status) for n in view.nudges] == [("sms", "accepted")]
            assert "sender_over_quota:email" in view.decisions[-1]["rules_applied"]
        # Why each e-mail went no further, its hold's end in UTC to the second with a Z (it was isoformat()'s
        # ``+00:00``): one refused again at the hold's end, the other finding the sender held at its turn.
        e_mails = [next(a for a in h.view(order).actions if a.kind == "nudge") for order in ("ord_1", "ord_2")]
        assert sorted(a.last_error or "" for a in e_mails) == [
            "email has its sender over its daily quota until 2026-11-02T06:30:00Z",
            f"not sent: email's sender is over its daily quota until 2026-11-02T06:30:00Z (smtp: 550 {GMAIL_DAILY})",
        ]
        fail_by_sms_or_email(h, "ord_3")
        h.drain()
        assert [(n.channel, n.status) for n in h.view("ord_3").nudges] == [("sms", "accepted")]
        assert len(sms.state.messages) == 3


def test_a_refused_recipient_does_not_hold_the_sender(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    smtp: FakeSmtpServer,
) -> None:
    """``550 5.1.1`` (no such user) refuses ord_1's address: that message is recorded as refused, as before, and
    the merchant's next e-mail goes at once; nothing is held."""
    h = through_relay(make_harness, smtp, 2)
    smtp.reject("ord_1@example.com")
    fail_by_email(h, "ord_1", "ord_2")
    h.drain()
    assert mailed(smtp) == ["ord_2"]
    assert pacing(h) is None
    assert [status for status, _ in nudges_of(h, "ord_1")["ord_1"]] == ["rejected"]


def scraped(h: Harness, limit: str) -> tuple[float | None, float | None]:
    return holds_scraped(h, limit, "email")


def test_each_hold_of_the_sender_is_counted_on_metrics_by_its_limit_and_shown_while_it_lasts(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    smtp: FakeSmtpServer,
    database_url: str,
    tmp_path: Path,
) -> None:
    """SES throttles ord_1's e-mail (454 rate), and the refusal of ord_2's, planned meanwhile, would be of the same
    burst: one hold, counted once as ``rate``, the sender shown held until the hold ends. Later the relay says the
    daily quota is spent (Google's 550 5.4.5): a hold counted as ``daily_quota``. Before, a hold left only a log
    line and its pacing row (whose count starts over): /metrics had no series of it."""
    h = through_relay(make_harness, smtp, 3, database_url=database_url)
    assert scraped(h, "rate") == (None, None)
    smtp.fail(code=454, text=SES_RATE, at="DATA")
    fail_by_email(h, "ord_1")
    h.drain()
    assert scraped(h, "rate") == (1.0, 1.0)
    h.clock.advance(seconds=5)
    fail_by_email(h, "ord_2")
    h.drain()
    assert scraped(h, "rate") == (1.0, 1.0)
    for _ in range(60):
        h.clock.advance(seconds=1)
        h.drain()
    assert sorted(mailed(smtp)) == ["ord_1", "ord_2"]
    assert scraped(h, "rate") == (1.0, 0.0)  # over: counted still, held no more
    assert scraped(h, "daily_quota") == (None, None)
    smtp.fail(code=550, text=GMAIL_DAILY, at="MAIL")
    fail_by_email(h, "ord_3")
    h.drain()
    assert scraped(h, "daily_quota") == (1.0, 1.0)
    assert scraped(h, "rate") == (1.0, 0.0)
    assert sorted(mailed(smtp)) == ["ord_1", "ord_2"]  # ord_3 waits with the sender
    api = Api(create_app(settings_for(tmp_path, database_url=database_url)))
    try:  # the scorer's /metrics (its gauge read at the wall clock's time, not the harness's)
        metrics = api.get("/metrics").text
    finally:
        api.close()
    for limit in ("rate", "daily_quota"):
        labels = f'channel="email",limit="{limit}",merchant_id="m_demo"'
        assert f"winback_executor_sender_holds_total{{{labels}}} 1.0" in metrics
        assert f"winback_executor_senders_held{{{labels}}} " in metrics


def test_a_decision_and_its_message_each_read_the_channels_out_once(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    smtp: FakeSmtpServer,
    database_url: str,
) -> None:
    """With no channel down nor sender held, a decision reads the merchant's outages and daily-quota holds in one
    statement, and its message the same for its own channel only, then its probe: three reads. Before, each read
    ``channel_outages`` and ``sender_holds`` apart (five), the message every channel's."""
    h = through_relay(make_harness, smtp, 1, database_url=database_url)
    seen: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "sender_holds" in statement or "channel_outages" in statement:
            seen.append(" ".join(statement.split()))

    sa.event.listen(h.executor.engine, "before_cursor_execute", note)
    try:
        fail_by_email(h, "ord_1")
        h.drain()
    finally:
        sa.event.remove(h.executor.engine, "before_cursor_execute", note)
    assert mailed(smtp) == ["ord_1"]
    reads = [statement for statement in seen if statement.startswith("SELECT")]
    assert len(reads) == 3, reads
    decision, message, probe = reads
    assert "UNION ALL" in decision
    assert "UNION ALL" in message
    assert message.count("channel =") == 2  # the message's own channel only, in each table
    assert decision.count("channel =") == 0
    assert "sender_holds" not in probe


EXCHANGE_BAN = "5.7.708 Service unavailable. Access denied, traffic not accepted from this IP."
SES_PAUSED = (
    "Message rejected: Sending paused for this account. For more information, please check the inbox of the email "
    "address associated with your AWS account."
)


def first_channel_first_each_anew() -> Callable[[DecisionRequest, MerchantConfig], Decision]:
    """``first_channel_first`` with a decision id of its own for each decision: the baseline's id is its decision
    point's (the order, its time, its history), and the harness's clock stands still while an order is decided
    again at once with the same history (its refused e-mail not recorded)."""
    made = itertools.count()

    def decide(request: DecisionRequest, merchant: MerchantConfig) -> Decision:
        decision = first_channel_first(request, merchant)
        return decision.model_copy(update={"decision_id": decision_id(decision.decision_id, next(made))})

    return decide


def blocks_scraped(h: Harness, why: str = "ban") -> float | None:
    """``winback_executor_sender_bans_total`` (``why`` ``ban``) or ``winback_executor_sender_setup_refusals_total``
    (``setup``) of m_demo's e-mail, as /metrics shows it."""
    collector, name = {
        "ban": (SenderBansCollector, "winback_executor_sender_bans_total"),
        "setup": (SenderSetupRefusalsCollector, "winback_executor_sender_setup_refusals_total"),
    }[why]
    registry = CollectorRegistry()
    registry.register(collector(h.executor.engine, read_every_seconds=0))
    return registry.get_sample_value(name, {"merchant_id": "m_demo", "channel": "email"})


def bans_scraped(h: Harness) -> float | None:
    return blocks_scraped(h, "ban")


def e_mail_down_until(h: Harness) -> timedelta | None:
    with h.executor.engine.connect() as conn:
        row = conn.execute(sa.select(channel_outages.c.down_until)).first()
    return None if row is None or row.down_until is None else as_utc(row.down_until) - START


#: Exchange Online's answer to AUTH when SMTP AUTH is turned off for the mailbox or tenant (data/README.md).
EXCHANGE_AUTH_OFF = (
    "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit "
    "https://aka.ms/smtp_auth_disabled for more information."
)
GOOGLE_RELAY_DENIED = (
    "5.7.0 Mail relay denied [203.0.113.7]. Invalid credentials for relay for one of the domains in: shop.example "
    "(as obtained from HELO and MAIL FROM). - gsmtp"
)
#: Amazon SES, the merchant's From address not verified (the sender's, not the recipient's: data/README.md).
SES_SENDER_UNVERIFIED = (
    "Message rejected: Email address is not verified. The following identities failed the check in region "
    "AP-SOUTH-1: pay@shop.example"
)

#: Exchange Online refusing the login to send as the merchant's From address (data/README.md).
EXCHANGE_SEND_AS_DENIED = "5.7.60 SMTP; Client does not have permissions to send as this sender"


@pytest.mark.parametrize(
    ("code", "text", "at", "why"),
    [
        (550, EXCHANGE_BAN, "MAIL", "ban"),
        (554, SES_PAUSED, "DATA", "ban"),
        (535, EXCHANGE_AUTH_OFF, "AUTH", "setup"),
        (550, GOOGLE_RELAY_DENIED, "MAIL", "setup"),
        (554, SES_SENDER_UNVERIFIED, "DATA", "setup"),
        (550, EXCHANGE_SEND_AS_DENIED, "MAIL", "setup"),
    ],
)
def test_a_ban_of_the_sender_or_its_set_up_wrong_puts_e_mail_down_at_once_and_a_probe_after_the_hold_brings_it_back(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    database_url: str,
    caplog: pytest.LogCaptureFixture,
    code: int,
    text: str,
    at: str,
    why: str,
) -> None:
    """Exchange Online answers ord_1's e-mail ``550 5.7.708`` (traffic not accepted from the merchant's IP: banned
    until an admin acts), or Amazon SES ``554 Message rejected: Sending paused for this account`` after DATA (AWS
    paused the merchant's account: before, only Exchange's bans were read as such); or the merchant's SMTP set-up is
    wrong: Exchange Online refuses its login (``535 5.7.139``, SMTP AUTH turned off) or its sending as the From
    address (``550 5.7.60``), Google's relay does not know its IP or domain (``550 5.7.0 Mail relay denied``), SES
    has not verified its From address. Before, the message
    was recorded as refused and counted against the customer's ``max_nudges``, and the next customer's e-mail went
    into the same ban or set-up. Now the merchant's e-mail is down at once
    (the outage breaker's first hold, 5 minutes): ord_1's e-mail is neither recorded nor counted and the order is
    decided again onto SMS; ord_2, failing during the hold, goes by SMS at once; the ban (or the set-up) is logged
    as an error saying what an admin must do, naming the answer, and counted under its own name. After the hold,
    ord_3's e-mail probes the relay: refused still, e-mail is down twice as long (the same one, not counted again).
    The admin having acted, the probe after that hold (ord_4's e-mail) is taken: e-mail is up, and the next e-mail
    goes at once."""
    other = "setup" if why == "ban" else "ban"
    with (
        run_fake_provider("gupshup", username="2000123", password="pw") as sms,
        FakeSmtpServer(username=RELAY_LOGIN[0], password=RELAY_LOGIN[1]) as smtp,
    ):
        decide = first_channel_first_each_anew()
        h = through_relay(make_harness, smtp, 0, sms=sms, login=True, decider=decide, database_url=database_url)
        smtp.fail(code=code, text=text, at=at)
        caplog.set_level(logging.ERROR, logger="winback.executor")
        fail_by_sms_or_email(h, "ord_1")
        h.drain()
        view = h.view("ord_1")
        assert [(d["action"], d["channel"]) for d in view.decisions] == [("retarget", "email"), ("retarget", "sms")]
        assert "channel_down:email" in view.decisions[-1]["rules_applied"]
        assert [(n.channel, n.status) for n in view.nudges] == [("sms", "accepted")]  # the e-mail not counted
        assert e_mail_down_until(h) == timedelta(minutes=5)
        assert (blocks_scraped(h, why), blocks_scraped(h, other)) == (1.0, None)
        [logged] = [r for r in caplog.records if r.levelno == logging.ERROR and text[:30] in r.getMessage()]
        assert "m_demo" in logged.getMessage()
        assert "is down until 2026-11-02T06:05:00Z: its provider" in logged.getMessage()  # UTC to the second, Z
        assert (
            "an admin" if why == "ban" else "an admin must fix the merchant's email settings"
        ) in logged.getMessage()
        h.clock.advance(minutes=1)
        fail_by_sms_or_email(h, "ord_2")
        h.drain()
        assert [(n.channel, n.status) for n in h.view("ord_2").nudges] == [("sms", "accepted")]
        assert mailed(smtp) == []
        h.clock.advance(minutes=4)
        smtp.fail(code=code, text=text, at=at)  # not fixed yet
        fail_by_email(h, "ord_3")  # after the hold, its e-mail is the probe: refused
        h.drain()
        assert e_mail_down_until(h) == timedelta(minutes=15)  # down again, twice as long
        assert (blocks_scraped(h, why), blocks_scraped(h, other)) == (1.0, None)  # the same one, not counted again
        assert ("still bans" if why == "ban" else "still refuses") in caplog.text
        assert "email" not in [n.channel for n in h.view("ord_3").nudges]  # its e-mail not counted either
        h.clock.advance(minutes=10)
        fail_by_email(h, "ord_4")  # the admin has acted: the probe after the second hold is taken
        h.drain()
        assert e_mail_down_until(h) is None  # up again
        fail_by_email(h, "ord_5")
        h.drain()
        assert mailed(smtp) == ["ord_4", "ord_5"]
        assert [(n.channel, n.status) for n in h.view("ord_4").nudges] == [("email", "accepted")]
        assert (blocks_scraped(h, why), blocks_scraped(h, other)) == (1.0, None)


#: Exchange Online's inbound answer to a server whose IP Microsoft has banned: its own recipients' provider speaking.
M365_BANNED_IP = (
    "5.7.606 Access denied, banned sending IP [203.0.113.7]. To request removal from this list please visit "
    "https://sender.office.com/ and follow the directions."
)

#: Postfix's answer at RCPT TO when it will not relay for the client (reject_unauth_destination: data/README.md); the
#: recipient's own server may answer so too (its MX record wrong), handed back by a relay passing RCPT through.
POSTFIX_RELAY_DENIED = "5.7.1 <{}>: Relay access denied"
#: The same refusal by Postfix's default relay rule (defer_unauth_destination: data/README.md), with a 4xx.
POSTFIX_RELAY_DEFERRED = "4.7.1 <{}>: Relay access denied"


@pytest.mark.parametrize(
    ("code", "text", "why"),
    [(550, M365_BANNED_IP, "ban"), (554, POSTFIX_RELAY_DENIED, "setup"), (454, POSTFIX_RELAY_DEFERRED, "setup")],
)
def test_a_ban_answered_at_rcpt_puts_e_mail_down_only_when_two_domains_are_refused_with_none_taken_between(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    smtp: FakeSmtpServer,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
    code: int,
    text: str,
    why: str,
) -> None:
    """The merchant's relay passes RCPT through, and Microsoft 365 refuses the merchant's IP for the recipients it
    hosts (``550 5.7.606`` at RCPT); or the recipients' servers answer Postfix's ``554 5.7.1 Relay access denied``
    (their MX records wrong), an answer the merchant's own relay gives every recipient when it will not relay for
    the merchant: its set-up to fix (before, a refusal of each message); or its default ``454 4.7.1`` form (before, a
    4xx like any, tried again message after message with no WARNING). Before, the first such recipient (ord_1's,
    ord_0's) put the merchant's e-mail down for everyone: ord_2's e-mail to another provider went by SMS, and the
    probe after the hold brought e-mail back until the next such recipient. Now a ban (or set-up) at RCPT is one
    more refusal of its message (tried again later, not counted) until recipients of two domains are refused so with
    no e-mail taken in between: two recipients of one domain are not (ord_0, ord_1), nor are two domains with an
    e-mail taken between them (ord_2 between ord_1's and ord_3's). ord_4's refusal right after ord_3's is: e-mail is
    down at once, counted once (a ban, or a set-up), and ord_4, then ord_3, ord_1 and ord_0 when their tries come
    up, go by SMS, none counted on e-mail.

    Before, a refusal not confirmed yet wrote no log line, only the action's ``last_error``. Now the first one of each
    domain in a streak is a WARNING naming the domain (not the address) and saying e-mail stays up meanwhile: one for
    m365-a (not again for ord_1), one for m365-b after ord_2 ended the streak; m365-c's confirms the ban (an ERROR)."""
    caplog.set_level(logging.WARNING, logger="winback.executor")
    other = "setup" if why == "ban" else "ban"
    said = "5.7.606" if why == "ban" else "Relay access denied"

    def warned() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "RCPT TO" in r.getMessage()]

    with run_fake_provider("gupshup", username="2000123", password="pw") as sms:
        decide = first_channel_first_each_anew()
        h = through_relay(make_harness, smtp, 0, sms=sms, decider=decide, database_url=database_url)
        recipients = {
            "ord_0": "ord_0@m365-a.example",
            "ord_1": "ord_1@m365-a.example",
            "ord_2": "ord_2@gmail.example",
            "ord_3": "ord_3@m365-b.example",
            "ord_4": "ord_4@m365-c.example",
        }
        for address in recipients.values():
            if "m365" in address:
                smtp.reject(address, code=code, text=text.format(address))

        def fail(order: str) -> None:
            h.executor.payment_failed("m_demo", event(order, customer={"email": recipients[order]}))
            h.drain()

        fail("ord_0")
        fail("ord_1")  # tried again 1 s after its refusal: none comes up again before ord_4's, 0.75 s later
        assert (e_mail_down_until(h), blocks_scraped(h, why)) == (None, None)
        [first] = warned()
        assert "merchant m_demo" in first, first
        assert "recipient at m365-a.example" in first, first
        assert "email stays up until a recipient of another domain is refused alike" in first
        assert said in first
        assert ("sender is banned" if why == "ban" else "sender is set up wrong") in first, first
        assert "ord_0" not in first  # the domain, not the address
        assert "ord_1" not in first
        h.clock.advance(seconds=0.25)
        fail("ord_2")
        assert mailed(smtp) == ["ord_2"]
        h.clock.advance(seconds=0.25)
        fail("ord_3")
        assert (e_mail_down_until(h), blocks_scraped(h, why)) == (None, None)  # ord_2 was taken since ord_1's
        for order in ("ord_0", "ord_1", "ord_3"):
            assert h.view(order).nudges == []  # waiting to be tried again, not counted
        assert len(warned()) == 2, warned()
        assert "recipient at m365-b.example" in warned()[1], warned()
        h.clock.advance(seconds=0.25)
        fail("ord_4")
        assert e_mail_down_until(h) == timedelta(seconds=0.75, minutes=5)
        assert (blocks_scraped(h, why), blocks_scraped(h, other)) == (1.0, None)
        assert len(warned()) == 2, warned()  # m365-c's confirmed the ban: an ERROR, no warning
        assert [r for r in caplog.records if r.levelno == logging.ERROR and said in r.getMessage()]
        for _ in range(5):
            h.clock.advance(seconds=2)
            h.drain()
        for order in ("ord_0", "ord_1", "ord_3", "ord_4"):
            assert [(n.channel, n.status) for n in h.view(order).nudges] == [("sms", "accepted")], order
        assert [(n.channel, n.status) for n in h.view("ord_2").nudges] == [("email", "accepted")]
        assert mailed(smtp) == ["ord_2"]
        assert (blocks_scraped(h, why), blocks_scraped(h, other)) == (1.0, None)


def test_postfixs_default_relay_refusal_takes_e_mail_down_as_a_set_up_and_the_waiting_messages_go_once_fixed(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
    rules_only: Any,  # noqa: F811 - the fixture
    smtp: FakeSmtpServer,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The merchant's relay is a Postfix with its default relay rule, and winback's client is neither in its
    networks nor logged in: every recipient is answered ``454 4.7.1 <address>: Relay access denied`` at RCPT TO.
    Before, a 4xx like any: each message was tried again every few minutes; after 15 minutes of refusals e-mail went
    down as a provider's outage (a WARNING, nothing counted as a set-up, nothing saying an admin must act) and was
    probed hourly for as long as the set-up stayed wrong. Now ord_1's refusal (a.example) is a WARNING naming the
    domain, e-mail staying up; ord_2's (b.example) right after confirms it: e-mail is down at once as a set-up, an
    ERROR naming the answer and saying an admin must fix the merchant's e-mail settings, counted once on /metrics.
    E-mail being the merchant's only channel, both messages wait for it, uncounted. The admin sets the relay up;
    after the hold both go, each recorded once, as sent."""
    caplog.set_level(logging.WARNING, logger="winback.executor")
    h = through_relay(make_harness, smtp, 0, decider=rules_only, database_url=database_url)
    recipients = {"ord_1": "ord_1@a.example", "ord_2": "ord_2@b.example"}
    for address in recipients.values():
        smtp.reject(address, code=454, text=POSTFIX_RELAY_DEFERRED.format(address))

    def logged(level: int, words: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == level and words in r.getMessage()]

    h.executor.payment_failed("m_demo", event("ord_1", customer={"phone": None, "email": recipients["ord_1"]}))
    h.drain()
    assert (e_mail_down_until(h), blocks_scraped(h, "setup")) == (None, None)
    [warned] = logged(logging.WARNING, "RCPT TO")
    for said in ("recipient at a.example", "454 4.7.1", "sender is set up wrong"):
        assert said in warned, warned
    h.executor.payment_failed("m_demo", event("ord_2", customer={"phone": None, "email": recipients["ord_2"]}))
    h.drain()
    assert e_mail_down_until(h) == timedelta(minutes=5)
    assert (blocks_scraped(h, "setup"), blocks_scraped(h, "ban")) == (1.0, None)
    [error] = logged(logging.ERROR, "454 4.7.1")
    assert "merchant m_demo" in error, error
    assert "an admin must fix the merchant's email settings" in error, error
    assert logged(logging.WARNING, "has refused every message since") == []  # a set-up, not a provider's outage
    assert nudges_of(h, "ord_1", "ord_2") == {"ord_1": [], "ord_2": []}  # neither counted
    smtp.rejected.clear()  # the admin lets the merchant's client relay
    for _ in range(8):
        h.clock.advance(minutes=1)
        h.drain()
    assert sorted(mailed(smtp)) == ["ord_1", "ord_2"]
    assert e_mail_down_until(h) is None
    for order in recipients:
        assert [(n.channel, n.status) for n in h.view(order).nudges] == [("email", "accepted")], order
    assert blocks_scraped(h, "setup") == 1.0
