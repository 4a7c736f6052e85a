"""Executor building blocks: link tokens, webhook signatures, quiet-hour deferral across DST, the breaker."""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import selectors
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from model.catalog import load_catalog
from model.merchant_config import QuietHours
from model.rules import build_context, quiet_hours_end
from service.executor.connectors import (
    ChargeRequest,
    CircuitBreaker,
    CircuitOpenError,
    HttpConnector,
    PermanentError,
    TransientError,
)
from service.executor.links import LinkClaims, LinkError, LinkSigner
from service.executor.optouts import callback_key, callback_token, token_matches
from service.executor.settings import ExecutorSettings
from service.executor.webhooks import signature, verify_signature
from tests.factories import make_merchant, make_request

NOW = datetime(2026, 11, 1, 10, 0, tzinfo=UTC)


def test_link_token_round_trip_and_rejections() -> None:
    signer = LinkSigner("s" * 40)
    token = signer.issue(LinkClaims("lnk_1", "m_demo", "ord_1", NOW + timedelta(hours=48)))
    assert signer.verify(token, NOW).order_id == "ord_1"

    head, _, tail = token.partition(".")
    forged_payload = head[:-2] + ("AA" if head[-2:] != "AA" else "BB")
    for bad in (forged_payload + "." + tail, head + "." + tail[::-1], "garbage", "", head):
        with pytest.raises(LinkError) as caught:
            signer.verify(bad, NOW)
        assert caught.value.status_code == 400
    with pytest.raises(LinkError) as caught:
        LinkSigner("another secret of enough length!!").verify(token, NOW)
    assert caught.value.status_code == 400

    with pytest.raises(LinkError, match="expired") as expired:
        signer.verify(token, NOW + timedelta(hours=48))
    assert expired.value.status_code == 410


def test_placeholder_link_secret_is_refused_outside_dev() -> None:
    assert ExecutorSettings(env="dev").link_secret.get_secret_value()
    with pytest.raises(ValidationError, match="WINBACK_LINK_SECRET must be set"):
        ExecutorSettings(env="prod")
    with pytest.raises(ValidationError, match="at least 32 characters"):
        ExecutorSettings(env="prod", link_secret="short")
    assert ExecutorSettings(env="test", link_secret="x" * 32).env == "test"
    assert ExecutorSettings(env="prod", link_secret="x" * 32, provider_callback_secret="y" * 32).env == "prod"


def test_prod_refuses_to_start_without_a_callback_secret_of_its_own() -> None:
    """Before: with WINBACK_ENV=prod and WINBACK_PROVIDER_CALLBACK_SECRET unset, the callback key derived from the
    link secret, so one leaked secret forged both payment links and the providers' STOP replies and receipts.
    Now prod refuses that (and a callback secret equal to the link secret); dev and test still derive it."""
    link, own = "l" * 40, "c" * 40
    for callback_secret in (None, "", link):
        with pytest.raises(ValidationError, match="WINBACK_PROVIDER_CALLBACK_SECRET must be"):
            ExecutorSettings(env="prod", link_secret=link, provider_callback_secret=callback_secret)
    with pytest.raises(ValidationError, match="set, apart from WINBACK_LINK_SECRET, with WINBACK_ENV=prod"):
        ExecutorSettings(env="prod", link_secret=link)
    assert ExecutorSettings(env="prod", link_secret=link, provider_callback_secret=own).callback_key() == own.encode()
    assert ExecutorSettings(env="test", link_secret=link).callback_key() == callback_key(None, link)
    assert ExecutorSettings(env="dev").callback_key()


def test_the_switch_to_a_callback_secret_keeps_the_providers_urls_working_meanwhile() -> None:
    """The URLs the providers have were made with the key derived from the link secret; with that secret as
    WINBACK_PROVIDER_CALLBACK_SECRET_PREVIOUS they are still accepted beside the new ones, and not without it."""
    link, own = "l" * 40, "c" * 40
    before = callback_token(ExecutorSettings(env="test", link_secret=link).callback_key(), "m_demo")
    switching = ExecutorSettings(
        env="prod", link_secret=link, provider_callback_secret=own, provider_callback_secret_previous=link
    )
    assert token_matches(switching.callback_keys(), "m_demo", before)
    assert token_matches(switching.callback_keys(), "m_demo", callback_token(own.encode(), "m_demo"))
    switched = ExecutorSettings(env="prod", link_secret=link, provider_callback_secret=own)
    assert not token_matches(switched.callback_keys(), "m_demo", before)


def test_webhook_signature_is_hmac_of_timestamp_dot_body() -> None:
    body = b'{"event":"order.succeeded"}'
    header = signature("whsec", 1_700_000_000, body)
    expected = hmac.new(b"whsec", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    assert verify_signature("whsec", header, body, now=1_700_000_010)
    assert not verify_signature("whsec", header, body + b" ", now=1_700_000_010)
    assert not verify_signature("other", header, body, now=1_700_000_010)
    assert not verify_signature("whsec", header, body, now=1_700_001_000)  # too old: replay


LONDON = QuietHours(start="21:00", end="08:00", timezone="Europe/London")
KOLKATA = QuietHours(start="21:00", end="09:00", timezone="Asia/Kolkata")
NEW_YORK = QuietHours(start="20:00", end="08:00", timezone="America/New_York")


@pytest.mark.parametrize(
    ("quiet", "moment", "expected"),
    [
        # Outside quiet hours: send now.
        (KOLKATA, "2026-11-01T05:00:00+00:00", None),  # 10:30 IST
        # 02:00 IST -> 09:00 IST (03:30 UTC).
        (KOLKATA, "2026-10-31T20:30:00+00:00", "2026-11-01T03:30:00+00:00"),
        # London, the night the clocks go back (25 Oct 2026, 02:00 BST -> 01:00 GMT): 08:00 GMT = 08:00 UTC.
        (LONDON, "2026-10-24T21:30:00+00:00", "2026-10-25T08:00:00+00:00"),
        # London, the night the clocks go forward (29 Mar 2026, 01:00 GMT -> 02:00 BST): 08:00 BST = 07:00 UTC.
        (LONDON, "2026-03-28T22:00:00+00:00", "2026-03-29T07:00:00+00:00"),
        # New York, fall back (1 Nov 2026): 23:00 EDT on Oct 31 -> 08:00 EST on Nov 1 = 13:00 UTC.
        (NEW_YORK, "2026-11-01T03:00:00+00:00", "2026-11-01T13:00:00+00:00"),
        # New York, spring forward (8 Mar 2026): 21:00 EST on Mar 7 -> 08:00 EDT on Mar 8 = 12:00 UTC.
        (NEW_YORK, "2026-03-08T02:00:00+00:00", "2026-03-08T12:00:00+00:00"),
    ],
)
def test_quiet_hours_end_across_dst(quiet: QuietHours, moment: str, expected: str | None) -> None:
    # A customer of no known country: the merchant's zone alone (the customer's zones: tests/unit/test_rules.py).
    merchant = make_merchant(retarget={"quiet_hours": quiet.model_dump()})
    context = build_context(make_request(customer={"country": None}, event_time=moment), merchant, load_catalog())
    end = quiet_hours_end(context, datetime.fromisoformat(moment))
    assert end == (None if expected is None else datetime.fromisoformat(expected))


def test_circuit_breaker_opens_half_opens_and_closes() -> None:
    clock = [0.0]
    breaker = CircuitBreaker("adyen", threshold=2, cooldown_seconds=10, clock=lambda: clock[0])
    breaker.failure()
    breaker.before_call()
    breaker.failure()
    assert breaker.state == "open"
    with pytest.raises(CircuitOpenError, match="adyen"):
        breaker.before_call()
    clock[0] = 11.0
    breaker.before_call()  # the one half-open trial
    with pytest.raises(CircuitOpenError):
        breaker.before_call()
    breaker.success()
    assert breaker.state == "closed"


def _charge_request() -> ChargeRequest:
    return ChargeRequest("m:o:retry:d1", "m_demo", "ord_1", 2, 10.0, "USD", "step_up", "adyen", NOW)


def test_http_connector_retries_5xx_with_the_same_key_then_parses() -> None:
    seen: list[tuple[str, dict[str, object]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        import json

        seen.append((request.headers["Idempotency-Key"], json.loads(request.content)))
        if len(seen) < 3:
            return httpx.Response(503)
        return httpx.Response(200, json={"status": "failed", "error_code": "51", "network_decline_code": "51"})

    connector = HttpConnector(
        "adyen",
        "http://switch",
        "key",
        client=httpx.Client(transport=httpx.MockTransport(handler)),
        sleep=lambda _: None,
    )
    result = connector.charge(_charge_request())
    assert result.status == "failure"
    assert result.network_decline_code == "51"
    assert {key for key, _ in seen} == {"m:o:retry:d1"}
    payload = seen[0][1]
    assert payload["payment_id"] == "ord_1_2"
    assert payload["hints"] == {"three_ds": True, "clear_pan": False, "network": None}


def test_http_connector_gives_up_transiently_and_refuses_4xx() -> None:
    down = HttpConnector(
        "adyen",
        "http://switch",
        None,
        tries=2,
        client=httpx.Client(transport=httpx.MockTransport(lambda _: httpx.Response(500))),
        sleep=lambda _: None,
    )
    with pytest.raises(TransientError, match="HTTP 500"):
        down.charge(_charge_request())
    refused = HttpConnector(
        "adyen",
        "http://switch",
        None,
        client=httpx.Client(transport=httpx.MockTransport(lambda _: httpx.Response(401))),
    )
    with pytest.raises(PermanentError, match="HTTP 401"):
        refused.charge(_charge_request())


@pytest.mark.parametrize(
    ("stored", "status"),
    [("success", "success"), (" SUCCESS", "success"), ("failure", "failure"), ("FAILURE ", "failure"),
     ("failed", "failure")],
)  # fmt: skip
def test_a_stored_attempt_status_from_before_the_strict_pair_still_makes_a_valid_request(
    stored: str, status: str
) -> None:
    from service.executor.core import _attempt_status

    assert _attempt_status(stored) == status


@pytest.mark.parametrize(
    ("amount", "currency", "written"), [(1200.0, "JPY", "¥1,200"), (1234.5, "KWD", "1,234.500 KWD")]
)
def test_a_refund_handed_to_an_operator_writes_its_amount_and_times_as_the_console_does(
    amount: float, currency: str, written: str
) -> None:
    """The note of a refund given to an operator after its switch's silence wrote ``1200.0 JPY`` and
    ``2026-11-02T06:00:05.123456+00:00``; the console's card and the CLI lists beside it write ``¥1,200`` and
    ``2026-11-02T06:00:05Z``."""
    from service.executor.core import CHARGED_BY_OPERATOR, ActionRow, _switch_silent_on_refund

    planned = datetime(2026, 11, 2, 6, 0, 5, 123456, tzinfo=UTC)

    def action(action_id: int, kind: str, payload: dict[str, object]) -> ActionRow:
        return ActionRow(action_id, "m_demo", "ord_1", kind, "scheduled", planned, planned, 0, None, f"k{action_id}",
                         None, payload)  # fmt: skip

    charge = action(1, "retry", {CHARGED_BY_OPERATOR: "2026-11-02T05:59:01.654321+00:00"})
    refund = action(2, "refund", {"connector": "adyen", "payment_id": "ord_1_2", "amount": amount,
                                  "currency": currency})  # fmt: skip
    note = _switch_silent_on_refund(refund, charge, planned + timedelta(minutes=5), None)
    assert "(since 2026-11-02T06:00:05Z)" in note, note
    assert "no status check of it since 2026-11-02T06:05:05Z (last: not asked yet)" in note, note
    assert f"what is known: {written} recorded as charged on an operator's word at 2026-11-02T05:59:01Z " in note, note


_STOP_ROUNDS = """
import signal, sys, threading
from service.executor.worker import SignalStop
for _ in range(int(sys.argv[2])):
    if sys.argv[1] == "event":  # what worker_main did: Event.set in the handler
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_, stop=stop: stop.set())
    else:
        stop = SignalStop(signal.SIGTERM)
    print("waiting", flush=True)
    while not stop.is_set():  # a worker's idle loop, its waits cut short
        stop.wait(0.0001)
    if isinstance(stop, SignalStop):
        stop.close()
if sys.argv[1] != "event":  # a SIGTERM after close (the worker's clean-up) still only sets the flag
    signal.raise_signal(signal.SIGTERM)
    assert stop.is_set()
print("done", flush=True)
"""


def test_a_sigterm_always_stops_a_waiting_worker() -> None:
    """A worker's SIGTERM handler called ``threading.Event.set``, which takes the lock that ``Event.wait`` holds
    around its own bytecodes, where the handler may run: the worker then waited for its own lock for good.
    ``stop_rounds("event")`` (the old handler) hangs within 400 rounds (in rounds 72, 63 and 48 of three runs);
    with ``SignalStop`` it never does."""
    stop_rounds("signal")


def test_a_stop_waits_any_length_and_a_signal_still_ends_the_wait() -> None:
    """(Review.) poll() takes milliseconds as a C int: a wait of 25 days or more raised OverflowError."""
    code = (
        "import os, signal, threading, time; from service.executor.worker import SignalStop\n"
        "stop = SignalStop(signal.SIGTERM)\n"
        "threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()\n"
        "started = time.monotonic(); print(stop.wait(2.2e6), time.monotonic() - started < 10)"
    )
    waited = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert waited.stdout.split() == ["True", "True"], waited.stderr


def stop_rounds(stop_kind: str, rounds: int = 400) -> None:
    """Signal a child's idle loop ``rounds`` times, each at a random moment; fails naming a round that hangs."""
    child = subprocess.Popen(
        [sys.executable, "-c", _STOP_ROUNDS, stop_kind, str(rounds)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert child.stdout is not None
    ready = selectors.DefaultSelector()
    ready.register(child.stdout, selectors.EVENT_READ)
    try:
        for round_number in range(rounds):
            assert ready.select(timeout=30 if round_number == 0 else 5), f"the stop hung in round {round_number}"
            assert child.stdout.readline() == b"waiting\n"
            time.sleep(random.uniform(0.0005, 0.003))  # lands anywhere in the loop
            child.send_signal(signal.SIGTERM)
        assert ready.select(timeout=5), "the last stop hung"
        assert child.stdout.readline() == b"done\n"
        assert child.wait(timeout=5) == 0
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
        ready.close()


def test_a_refund_payload_without_a_readable_amount_is_written_as_it_is() -> None:
    # A refund's note read payload["amount"] and ["currency"] strictly: a payload of an older release or edited by
    # hand would have raised while the refund went to an operator, where it printed "None None" before.
    from service.executor.core import _amount_written

    assert _amount_written({"amount": 1200.0, "currency": "JPY"}) == "¥1,200"
    assert _amount_written({"amount": 499.0}) == "499.0 None"
    assert _amount_written({"amount": "n/a", "currency": "USD"}) == "n/a USD"


@pytest.mark.parametrize(
    ("payload", "read"),
    [
        ({"amount": 1200.0, "currency": "JPY"}, (1200.0, "JPY")),
        ({"amount": 1234, "currency": "KWD"}, (1234.0, "KWD")),
        ({"amount": "499.0", "currency": "USD"}, (499.0, "USD")),
        ({"currency": "USD"}, (None, None)),
        ({"amount": None, "currency": "USD"}, (None, None)),
        ({"amount": "n/a", "currency": "USD"}, (None, None)),
        ({"amount": "inf", "currency": "USD"}, (None, None)),
        ({"amount": True, "currency": "USD"}, (None, None)),
        ({"amount": 499.0}, (None, None)),
        ({"amount": 499.0, "currency": " "}, (None, None)),
    ],
)
def test_a_payloads_money_is_read_only_when_its_amount_and_currency_are_readable(
    payload: dict[str, object], read: tuple[object, object]
) -> None:
    # A refund's amount was typed ``object`` and handed to format_money as found: a payload without one (an older
    # release's, one edited by hand) failed the order's page and the refunds-by-hand list.
    from service.executor.core import payload_money

    assert payload_money(payload) == read


def test_the_already_dealt_with_message_writes_its_time_as_the_lists_do_by_default() -> None:
    """Without a writer of times of its own, the message wrote ``datetime.isoformat`` (``...05.123456+00:00``) where
    the CLI's lists and notes write ``2026-11-02T06:00:05Z``."""
    from service.executor.by_hand import REFUND_CASE, Case, CaseDone, already_done

    at = datetime(2026, 11, 2, 6, 0, 5, 123456, tzinfo=UTC)
    case = Case(1, REFUND_CASE, "m_demo", "ord_1", 7, "", "switch_silent", at, CaseDone("ops@shop", at, "refunded"))
    assert already_done([case], "ord_1") == (
        "order ord_1: already marked dealt with (the refund by hand (refund action 7) by ops@shop at "
        "2026-11-02T06:00:05Z: refunded); nothing changed"
    )
