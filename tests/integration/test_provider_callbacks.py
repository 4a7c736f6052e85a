"""Providers' callbacks through the real app (create_app): customers' STOP replies and delivery receipts.

Before: ``create_provider_router`` was mounted nowhere, so ``/v1/providers/...`` answered 404 on the real app,
a STOP reply was never processed, and receipts never arrived (``nudges.delivered`` stayed True). An opt-out made
with ``Executor.opt_out`` patched only the customer's open orders: their next failed order was messaged on the
opted-out channel again. And a STOP arriving between a message's rules check and its send did not stop it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
import sqlalchemy as sa

from model.vocab import Channel
from service.executor.channels.fakes import (
    inbound_payload,
    karix_whatsapp_message,
    karix_whatsapp_report,
    receipt_payload,
)
from service.executor.optouts import address_hash, callback_urls
from service.executor.routes import ExecutorRuntime
from service.executor.settings import ExecutorSettings
from service.executor.store import actions, nudges, opt_outs
from tests.integration.test_executor import (  # noqa: F401 - make_harness is a fixture
    START,
    Harness,
    demo_merchant,
    event,
    make_harness,
)
from tests.unit.test_api import Api, start

PHONE = "+919800000001"  # the customer of tests.integration.test_executor.event()
WAIT = timedelta(hours=1)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    harness = start(tmp_path)
    yield harness
    harness.close()


def urls(merchant_id: str = "m_demo", provider: str = "gupshup") -> dict[str, str]:
    """The callback URLs `winback executor callback-url` prints, made relative to the test client."""
    settings = ExecutorSettings()
    found = callback_urls(settings.public_base_url, settings.callback_key(), merchant_id, provider)
    return {what: url.removeprefix(settings.public_base_url) for what, url in found.items()}


def with_harness(api: Api, h: Harness) -> None:
    """Serve the harness's executor (clock, capturing adapters) from the app."""
    api.app.state.executor = ExecutorRuntime(h.executor, h.effects, ExecutorSettings())


def two_merchants() -> dict[str, Any]:
    return {"m_demo": demo_merchant(), "m_other": demo_merchant(api_key_sha256="1" * 64)}


def stop_reply(api: Api, text: str = "STOP", url: str | None = None, sender: str = "91 98000-00001") -> Any:
    target = url or urls()["inbound"]
    return api.loop.run_until_complete(api.client.post(target, json=inbound_payload("gupshup", sender, text)))


def receipt(api: Api, message_id: str, status: str, url: str | None = None) -> Any:
    target = url or urls()["receipts"]
    return api.loop.run_until_complete(api.client.post(target, json=receipt_payload("gupshup", message_id, status)))


def opted_out_rows(h: Harness) -> list[tuple[str, str, str]]:
    with h.executor.engine.connect() as conn:
        return [
            tuple(row)
            for row in conn.execute(sa.select(opt_outs.c.merchant_id, opt_outs.c.channel, opt_outs.c.address_sha256))
        ]


def test_the_real_app_answers_provider_callbacks_only_with_the_merchants_token(api: Api) -> None:
    """Before: 404 on every /v1/providers path. Now 200 with the merchant's token, 401 without one, 403 with a
    wrong one or another merchant's; the error says where the right URL comes from."""
    inbound = urls()["inbound"]
    assert stop_reply(api).json() == {"message": True, "opted_out": True}
    bare = inbound.split("?", 1)[0]
    missing = stop_reply(api, url=bare)
    assert missing.status_code == 401
    assert "winback executor callback-url --merchant <id> --provider <provider>" in missing.json()["detail"]
    assert stop_reply(api, url=f"{bare}?merchant_id=m_demo").status_code == 401
    assert stop_reply(api, url=inbound.replace("token=", "token=0")).status_code == 403
    other_token = urls("m_other")["inbound"].split("token=", 1)[1]
    forged = stop_reply(api, url=f"{bare}?merchant_id=m_demo&token={other_token}")
    assert forged.status_code == 403
    assert "m_demo" in forged.json()["detail"]
    unknown = urls("m_nobody")["inbound"]
    assert stop_reply(api, url=unknown).status_code == 403
    receipts = urls()["receipts"]
    assert receipt(api, "pm_unknown", "delivered").json() == {"received": 1}
    assert receipt(api, "pm_unknown", "delivered", url=receipts.split("?", 1)[0]).status_code == 401
    assert api.loop.run_until_complete(api.client.get(receipts.split("?", 1)[0])).status_code == 401
    assert "/v1/providers/{provider}/inbound" in api.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("channel", ["fax", 7, None, ["sms"]])
def test_an_inbound_reply_naming_no_known_channel_is_a_422_naming_it(api: Api, channel: Any) -> None:
    # It raised ValueError (or TypeError) out of Channel(): a 500.
    inbound = urls(provider="fake")["inbound"]
    body = {"from": "+919800000001", "text": "STOP", "channel": channel}
    answer = api.loop.run_until_complete(api.client.post(inbound, json=body))
    assert answer.status_code == 422, answer.text
    [said] = answer.json()["detail"]
    assert said["field"] == "channel"
    assert said["msg"].startswith("channel: ")
    assert "is not a channel (one of " in said["msg"]


@pytest.mark.parametrize("route", ["inbound", "receipts"])
@pytest.mark.parametrize(
    ("body", "field", "said"),
    [
        (b"STOP please", "body", "callback body is neither JSON nor a form"),
        (b'{"from": "+919800000001", "text": "hi", "from": "+919800000002"}', "from", "written twice"),
    ],
)
def test_a_provider_body_winback_cannot_read_is_a_422_naming_where_as_any_malformed_input(
    api: Api, route: str, body: bytes, field: str, said: str
) -> None:
    """A callback body that was not JSON (nor a form) was a bare 400, while one writing a key twice was a 422
    naming the key: malformed input is the contract's 422 naming where, whichever way it is malformed (the
    providers retry any answer but a 2xx alike: data/README.md)."""
    target = urls(provider="fake")[route]
    answer = api.loop.run_until_complete(
        api.client.post(target, content=body, headers={"Content-Type": "application/json"})
    )
    assert answer.status_code == 422, answer.text
    [error] = answer.json()["detail"]
    assert error["field"] == field
    assert said in error["msg"]


def test_a_callback_writing_a_key_twice_is_a_422_naming_it_and_opts_nothing_out(
    api: Api,
    make_harness: Any,  # noqa: F811 - the fixture
) -> None:
    """``{"text": "hello", "text": "STOP"}`` was read as STOP (JSON keeps the last): an opt-out the provider's
    other readers may not have seen. Now refused, naming the key."""
    h = make_harness({"action": "stop"})
    with_harness(api, h)
    inbound = urls(provider="fake")["inbound"]
    twice = b'{"from": "+919800000001", "text": "hello", "text": "STOP", "channel": "whatsapp"}'
    answer = api.loop.run_until_complete(
        api.client.post(inbound, content=twice, headers={"Content-Type": "application/json"})
    )
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["field"] == "text"
    assert opted_out_rows(h) == []
    once = b'{"from": "+919800000001", "text": "STOP", "channel": "whatsapp"}'
    answer = api.loop.run_until_complete(
        api.client.post(inbound, content=once, headers={"Content-Type": "application/json"})
    )
    assert answer.json() == {"message": True, "opted_out": True}


def test_a_stop_reply_keeps_the_customers_next_order_off_the_channel_and_holds_a_planned_message(
    api: Api,
    make_harness: Any,  # noqa: F811 - the fixture
) -> None:
    """Before: the reply was never processed, and an opt-out patched only the open orders' requests. Now the
    opt-out is kept for the address: the message planned for the open order is not sent (and not counted as a
    nudge), and the customer's next order is decided with the channel opted out and is not messaged on it."""
    later = {"action": "retarget", "channel": "whatsapp", "delay": WAIT}
    h = make_harness(later, {"action": "stop"}, later, {"action": "stop"}, merchants=two_merchants())
    with_harness(api, h)
    h.executor.payment_failed("m_demo", event("ord_1"))
    assert stop_reply(api, "stop please").json()["opted_out"] is True
    assert stop_reply(api).status_code == 200  # a second STOP changes nothing
    assert opted_out_rows(h) == [("m_demo", "whatsapp", address_hash(Channel.WHATSAPP, PHONE))]
    h.clock.advance(hours=2)
    h.drain()
    assert h.outbox == []
    assert h.count(nudges) == 0  # not sent, and not a nudge that counts against max_nudges
    requests = h.executor.decider.requests  # type: ignore[attr-defined]
    assert "whatsapp" in requests[-1].customer.opted_out_channels

    h.executor.payment_failed("m_demo", event("ord_2"))  # the same customer's next order fails
    h.clock.advance(hours=2)
    h.drain()
    assert [m.order_id for m in h.outbox] == []
    ord_2 = [r for r in h.executor.decider.requests if r.order_id == "ord_2"]  # type: ignore[attr-defined]
    assert ord_2
    assert all("whatsapp" in r.customer.opted_out_channels for r in ord_2)
    assert all("sms" not in r.customer.opted_out_channels for r in ord_2)
    # Only m_demo's customer opted out: the same phone number at another merchant is still reached.
    h.executor.payment_failed("m_other", event("ord_3", merchant_id="m_other"))
    assert "whatsapp" not in h.executor.decider.requests[-1].customer.opted_out_channels  # type: ignore[attr-defined]


def test_a_stop_arriving_after_the_rules_check_still_stops_the_send(make_harness: Any) -> None:  # noqa: F811
    """Before: nothing checked the opt-out under the order lock just before the provider call. Now the message
    that was past its rules check when the STOP came is not sent, is decided again, and is no nudge."""
    h = make_harness({"action": "retarget", "channel": "whatsapp"}, {"action": "stop"})
    mint = h.executor.new_link

    def stop_meanwhile(*args: Any) -> Any:
        h.executor.opt_out_address("m_demo", Channel.WHATSAPP, "919800000001", "test")
        return mint(*args)

    h.executor.new_link = stop_meanwhile  # type: ignore[method-assign]
    h.executor.payment_failed("m_demo", event())
    h.drain()
    assert h.outbox == []
    assert h.count(nudges) == 0
    with h.executor.engine.connect() as conn:
        error = conn.scalar(sa.select(actions.c.last_error).where(actions.c.kind == "nudge"))
    assert error == "the customer opted out of whatsapp"
    follow = h.executor.decider.requests[-1]  # type: ignore[attr-defined]
    assert "whatsapp" in follow.customer.opted_out_channels


def test_an_opt_out_by_customer_holds_for_the_customers_next_order(make_harness: Any) -> None:  # noqa: F811
    """Before (hunt30): ``Executor.opt_out`` patched only the open orders, so the next order of the customer was
    messaged on the opted-out channel again."""
    later = {"action": "retarget", "channel": "whatsapp", "delay": WAIT}
    h = make_harness(later, {"action": "stop"}, {"action": "retarget", "channel": "whatsapp"}, {"action": "stop"})
    h.executor.payment_failed("m_demo", event("ord_1"))
    assert h.executor.opt_out("m_demo", "cus_71", Channel.WHATSAPP) == 1
    h.executor.payment_failed("m_demo", event("ord_2"))
    h.clock.advance(hours=2)
    h.drain()
    assert [(m.order_id, m.channel) for m in h.outbox] == []
    ord_2 = [r for r in h.executor.decider.requests if r.order_id == "ord_2"]  # type: ignore[attr-defined]
    assert "whatsapp" in ord_2[0].customer.opted_out_channels


def test_an_opt_out_decides_an_order_with_two_messages_on_the_channel_once(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """Before: ``Executor.opt_out`` ran a decision point per cancelled message, so an order with two WhatsApp
    messages scheduled was decided twice (two decisions, the first one's plan cancelled by the second). Now both
    messages are cancelled and the order is decided once."""
    h = make_harness(
        {"action": "retarget", "channel": "whatsapp", "delay": WAIT},
        {"action": "retarget", "channel": "sms", "delay": WAIT},
        {"action": "retarget", "channel": "email", "delay": WAIT},
        database_url=database_url,
    )
    h.executor.payment_failed("m_demo", event())
    with h.executor.engine.begin() as conn:  # a second WhatsApp message scheduled for the order
        first = conn.execute(sa.select(actions).where(actions.c.kind == "nudge")).mappings().one()
        second = {key: value for key, value in first.items() if key != "action_id"}
        conn.execute(actions.insert().values(**second | {"idempotency_key": first["idempotency_key"] + ":2"}))
    assert h.executor.opt_out("m_demo", "cus_71", Channel.WHATSAPP) == 1
    assert [d["decision_id"] for d in h.view().decisions] == ["dec_1_ord_1", "dec_2_ord_1"]
    with h.executor.engine.connect() as conn:
        planned = conn.execute(
            sa.select(actions.c.state, actions.c.payload_json).where(actions.c.kind == "nudge").order_by("action_id")
        ).all()
    assert [(state, '"whatsapp"' in payload) for state, payload in planned] == [
        ("cancelled", True),
        ("cancelled", True),
        ("scheduled", False),
    ]


def test_a_delivered_receipt_after_a_failed_one_clears_the_nudges_error(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """Before: a delivered receipt after a failed one for the same message set ``delivered`` back but left the
    failure's error, so GET /v1/orders/{id} showed a delivered nudge with an error. Now the delivered one wins: no
    error; a failed receipt after it changes nothing (a delivered message is delivered)."""
    h = make_harness({"action": "retarget", "channel": "whatsapp"}, database_url=database_url)
    h.executor.payment_failed("m_demo", event())
    h.drain()
    assert h.executor.record_receipt("pm_1", False, "m_demo", error="131000 something", failure=None)
    assert [(n.delivered, n.error) for n in h.view().nudges] == [(False, "131000 something")]
    assert h.executor.record_receipt("pm_1", True, "m_demo")
    assert [(n.delivered, n.error) for n in h.view().nudges] == [(True, None)]
    assert h.executor.record_receipt("pm_1", False, "m_demo", error="1002")
    assert [(n.delivered, n.error) for n in h.view().nudges] == [(True, None)]


def test_receipts_update_the_nudge_of_the_merchant_and_unknown_ids_are_answered(
    api: Api,
    make_harness: Any,  # noqa: F811 - the fixture
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: no receipt ever arrived, so every nudge stayed delivered. Now a failed receipt marks the nudge
    undelivered; another merchant's receipt for the same id, and an unknown id, change nothing and answer 200."""
    h = make_harness({"action": "retarget", "channel": "whatsapp"}, merchants=two_merchants())
    with_harness(api, h)
    h.executor.payment_failed("m_demo", event())
    h.drain()
    (message,) = h.outbox
    view = h.view()
    assert [(n.provider_message_id, n.delivered) for n in view.nudges] == [("pm_1", True)]
    assert receipt(api, "pm_1", "failed", url=urls("m_other")["receipts"]).status_code == 200
    assert h.view().nudges[0].delivered is True
    assert receipt(api, "pm_1", "failed").json() == {"received": 1}
    assert h.view().nudges[0].delivered is False
    assert receipt(api, "pm_1", "read").status_code == 200
    assert h.view().nudges[0].delivered is True
    with caplog.at_level("INFO", logger="winback.executor"):
        assert receipt(api, "pm_nope", "delivered").status_code == 200
    assert "unknown message pm_nope" in caplog.text
    # Gupshup SMS reports delivery with a GET and query parameters, next to the callback token.
    query = "&externalId=pm_1&status=FAIL&cause=UNKNOWN_SUBSCRIBER&deliveredTS=1700000000000"
    got = api.loop.run_until_complete(api.client.get(urls()["receipts"] + query))
    assert got.json() == {"received": 1}
    assert h.view().nudges[0].delivered is True  # read: a later failure report does not undo it
    assert message.to == PHONE


def test_a_gupshup_receipt_saying_the_number_opted_out_keeps_the_opt_out(
    api: Api,
    make_harness: Any,  # noqa: F811 - the fixture
) -> None:
    """Before: Gupshup's failed receipt "Number Opted Out" (error 1012: the customer opted out at Gupshup, which
    refuses every message to them) only marked the nudge undelivered, and every later message of the merchant to
    that number was sent, refused, and counted against max_nudges. Now it keeps the opt-out of the address the
    nudge went to, as a STOP does; another failure (1002, not on WhatsApp) does not."""
    now = {"action": "retarget", "channel": "whatsapp"}
    h = make_harness(now, now, merchants=two_merchants())
    with_harness(api, h)
    h.executor.payment_failed("m_demo", event("ord_1"))
    h.drain()
    assert [m.to for m in h.outbox] == [PHONE]

    def failed(code: int, url: str | None = None) -> Any:
        body = receipt_payload("gupshup", "pm_1", "failed")
        body["payload"]["payload"] = {"code": code, "reason": "Number Opted Out" if code == 1012 else "Not on it"}
        return api.loop.run_until_complete(api.client.post(url or urls()["receipts"], json=body))

    assert failed(1002).json() == {"received": 1}
    assert opted_out_rows(h) == []
    assert failed(1012, url=urls("m_other")["receipts"]).status_code == 200  # another merchant's: not its nudge
    assert opted_out_rows(h) == []
    assert failed(1012).json() == {"received": 1}
    assert opted_out_rows(h) == [("m_demo", "whatsapp", address_hash(Channel.WHATSAPP, PHONE))]
    assert h.view().nudges[0].delivered is False

    h.executor.payment_failed("m_demo", event("ord_2"))  # the same customer's next order fails
    h.clock.advance(hours=2)
    h.drain()
    assert [m.order_id for m in h.outbox] == ["ord_1"]  # its decision's WhatsApp message is not sent
    ord_2 = [r for r in h.executor.decider.requests if r.order_id == "ord_2"]  # type: ignore[attr-defined]
    assert "whatsapp" in ord_2[0].customer.opted_out_channels


def failed_receipt(provider: str, code: int, message_id: str = "pm_1") -> dict[str, Any]:
    """A failed WhatsApp receipt of ``provider`` carrying the error ``code`` where that provider puts it."""
    body = receipt_payload(provider, message_id, "failed")
    if provider == "gupshup":
        body["payload"]["payload"] = {"code": code, "reason": f"error {code}"}
    else:  # interakt: Meta's code in ``channel_error_code``, its text in ``channel_failure_reason``
        body["data"]["message"] |= {"channel_error_code": str(code), "channel_failure_reason": f"error {code}"}
    return body


@pytest.mark.parametrize(
    ("provider", "code", "opts_out"),
    [
        # Meta 131050: the customer chose to stop this business's marketing messages on WhatsApp.
        ("gupshup", 131050, True),
        ("interakt", 131050, True),
        # Not opt-outs: outside the 24-hour window (131047), Meta's marketing cap (131049), not deliverable
        # (131026), rate limit (131056, transient), a template that does not exist or with wrong parameters.
        ("interakt", 131047, False),
        ("interakt", 131049, False),
        ("interakt", 131026, False),
        ("interakt", 131056, False),
        ("interakt", 132001, False),
        ("interakt", 132000, False),
        ("gupshup", 131047, False),
        ("gupshup", 1005, False),
    ],
)
def test_a_whatsapp_receipt_saying_the_customer_stopped_the_business_keeps_the_opt_out(
    api: Api,
    make_harness: Any,  # noqa: F811 - the fixture
    provider: str,
    code: int,
    opts_out: bool,
) -> None:
    """Before: only Gupshup's own 1012 kept an opt-out. Meta's 131050 (the customer stopped this business's
    marketing messages on WhatsApp), which Gupshup and Interakt pass on in their failed receipts, only marked the
    nudge undelivered, and every later message to the customer was sent and refused again. Now it keeps the
    opt-out of that merchant and channel; a window, template or transient failure does not."""
    h = make_harness({"action": "retarget", "channel": "whatsapp"}, merchants=two_merchants())
    with_harness(api, h)
    h.executor.payment_failed("m_demo", event("ord_1"))
    h.drain()
    assert [m.to for m in h.outbox] == [PHONE]
    other = urls("m_other", provider)["receipts"]
    answer = api.loop.run_until_complete(api.client.post(other, json=failed_receipt(provider, code)))
    assert answer.status_code == 200  # another merchant's callback: not its nudge, nobody opted out
    assert opted_out_rows(h) == []
    mine = urls("m_demo", provider)["receipts"]
    answer = api.loop.run_until_complete(api.client.post(mine, json=failed_receipt(provider, code)))
    assert answer.json() == {"received": 1}
    assert h.view().nudges[0].delivered is False
    expected = [("m_demo", "whatsapp", address_hash(Channel.WHATSAPP, PHONE))] if opts_out else []
    assert opted_out_rows(h) == expected


@pytest.mark.parametrize(("provider", "code"), [("interakt", 131026), ("gupshup", 131026), ("gupshup", 1002)])
def test_a_receipt_saying_the_number_is_not_on_whatsapp_moves_the_order_to_another_channel(
    api: Api,
    make_harness: Any,  # noqa: F811 - the fixture
    provider: str,
    code: int,
) -> None:
    """Before: Meta's 131026 "Message undeliverable" (not a WhatsApp number), or Gupshup's 1002, only marked the
    nudge undelivered: the order's next message went to WhatsApp again and failed the same way. Now WhatsApp is
    off that order's later decisions (a message already planned on it is decided again) and the order goes on by
    SMS; it is no opt-out, so the customer's next order may still use WhatsApp."""
    whatsapp, sms = {"action": "retarget", "channel": "whatsapp"}, {"action": "retarget", "channel": "sms"}
    later = whatsapp | {"delay": timedelta(days=1)}  # past the skip day after the first message
    h = make_harness(whatsapp, later, sms, dict(whatsapp), merchants=two_merchants())
    with_harness(api, h)
    h.executor.payment_failed("m_demo", event("ord_1"))
    h.drain()
    mine = urls("m_demo", provider)["receipts"]
    answer = api.loop.run_until_complete(api.client.post(mine, json=failed_receipt(provider, code)))
    assert answer.json() == {"received": 1}
    assert h.view().nudges[0].error == f"undeliverable: {code} error {code}"
    h.clock.advance(hours=25)  # the follow-up plans WhatsApp again, for the next day
    h.drain()
    h.clock.advance(hours=24)  # that send is held, and the order decided once more
    h.drain()
    assert [(m.order_id, m.channel) for m in h.outbox] == [("ord_1", Channel.WHATSAPP), ("ord_1", Channel.SMS)]
    ord_1 = [r for r in h.executor.decider.requests if r.order_id == "ord_1"]  # type: ignore[attr-defined]
    assert "whatsapp" in ord_1[-1].customer.opted_out_channels
    assert opted_out_rows(h) == []
    h.executor.payment_failed("m_demo", event("ord_2"))
    h.drain()
    assert [(m.order_id, m.channel) for m in h.outbox][-1] == ("ord_2", Channel.WHATSAPP)


@pytest.mark.parametrize(
    ("code", "warned"), [(132001, True), (131047, True), (130429, True), (131049, False), (131026, False)]
)
def test_a_receipt_blaming_the_merchants_template_or_rate_is_logged_for_the_operator(
    api: Api,
    make_harness: Any,  # noqa: F811 - the fixture
    caplog: pytest.LogCaptureFixture,
    code: int,
    warned: bool,
) -> None:
    """Before: a WhatsApp template that does not exist (132001), a message that needed one (131047) or the
    number's throughput (130429) failed each message silently: the nudge was marked undelivered, nothing said
    why. Now the nudge keeps the code and its text, and a warning names the merchant and what to check; Meta's
    per-user marketing limit (131049) is not the merchant's to fix, and no warning."""
    h = make_harness({"action": "retarget", "channel": "whatsapp"}, merchants=two_merchants())
    with_harness(api, h)
    h.executor.payment_failed("m_demo", event("ord_1"))
    h.drain()
    mine = urls("m_demo", "interakt")["receipts"]
    with caplog.at_level("WARNING", logger="winback.executor"):
        answer = api.loop.run_until_complete(api.client.post(mine, json=failed_receipt("interakt", code)))
    assert answer.json() == {"received": 1}
    assert f"{code} error {code}" in str(h.view().nudges[0].error)
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "refused message pm_1" in r.getMessage()]
    assert len(warnings) == (1 if warned else 0)
    if warned:
        assert warnings[0].merchant_id == "m_demo"  # type: ignore[attr-defined]
        assert PHONE not in warnings[0].getMessage()
    assert opted_out_rows(h) == []


@pytest.mark.parametrize("written", [PHONE, "+91 98000-00001", "919800000001"])
def test_a_receipt_error_quoting_the_customers_number_is_kept_masked(
    api: Api,
    make_harness: Any,  # noqa: F811 - the fixture
    written: str,
) -> None:
    """Before: a failed receipt's error text was kept with the nudge as the provider wrote it (only its log line
    was masked): a provider quoting the recipient put the customer's number in GET /v1/orders/{id}, the console and
    the history export. It is masked as a send's error is (service.personal_data)."""
    h = make_harness({"action": "retarget", "channel": "whatsapp"}, merchants=two_merchants())
    with_harness(api, h)
    h.executor.payment_failed("m_demo", event("ord_1"))
    h.drain()
    body = receipt_payload("gupshup", "pm_1", "failed")
    body["payload"]["payload"] = {"code": 1002, "reason": f"Invalid destination {written} (not on WhatsApp)"}
    answer = api.loop.run_until_complete(api.client.post(urls()["receipts"], json=body))
    assert answer.json() == {"received": 1}
    error = str(h.view().nudges[0].error)
    assert error.startswith("undeliverable: 1002 Invalid destination "), error
    assert error.endswith(" (not on WhatsApp)"), error
    assert "98000" not in error, error


def test_the_cli_prints_callback_urls_the_app_accepts(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """`winback executor callback-url` prints the URLs to configure at the provider, with the merchant's token;
    a callback secret of its own changes the token, and the app then refuses the old one."""
    from typer.testing import CliRunner

    from pipelines.cli import app as cli

    printed = CliRunner().invoke(cli, ["executor", "callback-url", "--merchant", "m_demo", "--provider", "gupshup"])
    assert printed.exit_code == 0, printed.output
    lines = dict(line.split(": ", 1) for line in printed.output.strip().splitlines())
    assert lines["gupshup inbound"].endswith(urls()["inbound"])
    assert stop_reply(api, url=lines["gupshup inbound"].removeprefix("http://127.0.0.1:8000")).status_code == 200
    unknown = CliRunner().invoke(cli, ["executor", "callback-url", "--merchant", "m_nobody", "--provider", "karix"])
    assert unknown.exit_code != 0
    assert "unknown merchant 'm_nobody'" in unknown.output
    monkeypatch.setenv("WINBACK_PROVIDER_CALLBACK_SECRET", "s" * 32)
    assert urls()["inbound"] != lines["gupshup inbound"].removeprefix("http://127.0.0.1:8000")


def test_addresses_are_normalised_as_the_adapters_do() -> None:
    """A STOP from ``919800000001`` opts out the customer stored as ``+91 98000-00001``; e-mail ignores case."""
    assert address_hash(Channel.WHATSAPP, "919800000001") == address_hash(Channel.WHATSAPP, "+91 98000-00001")
    assert address_hash(Channel.EMAIL, " A@Example.com") == address_hash(Channel.EMAIL, "a@example.com")
    assert "9800000001" not in address_hash(Channel.SMS, PHONE)


def sms_stop(api: Api, sender: str, text: str = "STOP") -> Any:
    """A reply through Gupshup Enterprise SMS, whose incoming-SMS URL names the sender as ``msisdn``."""
    payload = inbound_payload("gupshup", sender, text, channel="sms")
    return api.loop.run_until_complete(api.client.post(urls()["inbound"], json=payload))


@pytest.mark.parametrize(
    ("sender", "customer_phone"),
    [
        ("9800000001", "+91 98000 00001"),  # Gupshup SMS: msisdn=9812348765 in its incoming-SMS example
        ("09800000001", "+91 98000 00001"),  # national, with the trunk prefix
        ("919800000001", "9800000001"),  # the customer's number given nationally, the reply in E.164
        ("00919800000001", "+919800000001"),  # the international prefix instead of "+"
        ("07700 900123", "447700900123"),  # a UK customer (country GB) replying with the trunk prefix
    ],
)
def test_a_stop_from_a_number_written_another_way_opts_the_customer_out(
    api: Api,
    make_harness: Any,  # noqa: F811 - the fixture
    sender: str,
    customer_phone: str,
) -> None:
    """Before: opt-outs were keyed by the number's digits as written, so a STOP from ``9800000001`` (Gupshup
    Enterprise SMS names Indian senders by their ten national digits) did not opt out ``+91 98000 00001``: the
    customer was messaged again on the channel they had stopped. Now the customer's number is matched in each
    form a provider may write it (E.164, national significant number, national with its trunk prefix)."""
    later = {"action": "retarget", "channel": "sms", "delay": WAIT}
    h = make_harness(later, {"action": "stop"})
    with_harness(api, h)
    country = "GB" if customer_phone.startswith("44") else "IN"
    h.executor.payment_failed("m_demo", event(customer={"phone": customer_phone, "country": country}))
    assert sms_stop(api, sender).json() == {"message": True, "opted_out": True}
    h.clock.advance(hours=2)
    h.drain()
    assert h.outbox == []
    assert h.count(nudges) == 0
    assert "sms" in h.executor.decider.requests[-1].customer.opted_out_channels  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("sender", "customer_phone", "country", "opted_out"),
    [
        ("9800000001", "+91 98000 00001", "IN", True),
        ("+91 98000 00001", "9800000001", "IN", True),
        ("9800000001", "+91 98000 00002", "IN", False),  # another number
        ("919800000001", "+1 980-000-0001", "US", False),  # a reply that says its country opts out that number
        ("+1 980 000 0001", "+91 98000 00001", "IN", False),
        # What the match trades: a reply without its country also opts out the same national number elsewhere.
        ("9800000001", "+1 980-000-0001", "US", True),
    ],
)
def test_which_customers_a_stop_opts_out(
    tmp_path: Path, sender: str, customer_phone: str, country: str, opted_out: bool
) -> None:
    from service.executor.optouts import is_opted_out, opted_out_channels, record_opt_out
    from service.executor.store import make_executor_engine
    from service.migrations import upgrade

    engine = make_executor_engine(f"sqlite:///{tmp_path / 'optouts.db'}")
    upgrade(engine)
    with engine.begin() as conn:
        record_opt_out(conn, "m_demo", Channel.SMS, sender, "reply", START)
        assert is_opted_out(conn, "m_demo", Channel.SMS, customer_phone, country) is opted_out
        customer = {"phone": customer_phone, "country": country}
        assert opted_out_channels(conn, "m_demo", customer) == ({Channel.SMS} if opted_out else set())
    engine.dispose()


def test_a_stop_that_gupshup_sms_forwards_with_a_get_opts_the_customer_out(
    api: Api,
    make_harness: Any,  # noqa: F811 - the fixture
) -> None:
    """Before: the inbound URL answered only POST, but Gupshup Enterprise SMS forwards a keyword reply by calling
    the configured URL with its fields in the query (``?phonecode=%pcode&keyword=%kw&content=%con&msisdn=%ph``):
    every SMS STOP got 405 and was lost. Now the inbound URL takes a GET as the receipts URL already did."""
    later = {"action": "retarget", "channel": "sms", "delay": WAIT}
    h = make_harness(later, {"action": "stop"})
    with_harness(api, h)
    h.executor.payment_failed("m_demo", event())
    query = "&phonecode=9220092200&keyword=STOP&location=Mumbai&carrier=Vodafone&content=STOP&msisdn=9800000001"
    got = api.loop.run_until_complete(api.client.get(urls()["inbound"] + query))
    assert got.status_code == 200
    # Gupshup texts the customer what this URL answers (a <response>'s messages, else its first 160 characters):
    # an XML response with no message sends nothing; the JSON acknowledgement would have gone out as an SMS.
    assert got.headers["content-type"].startswith("application/xml")
    assert ElementTree.fromstring(got.content).tag == "response"
    assert list(ElementTree.fromstring(got.content)) == []
    h.clock.advance(hours=2)
    h.drain()
    assert h.outbox == []
    assert "sms" in h.executor.decider.requests[-1].customer.opted_out_channels  # type: ignore[attr-defined]
    bare = urls()["inbound"].split("?", 1)[0]  # a GET is authenticated as a POST is
    assert api.loop.run_until_complete(api.client.get(bare + "?msisdn=9800000001&content=STOP")).status_code == 401


def test_the_cli_without_a_provider_for_a_merchant_whose_config_names_none_says_which_to_name() -> None:
    """The README's first try, `callback-url --merchant m_demo` on the shipped demo config (whose merchants name no
    provider), ended in "name one with --provider" without saying which names it takes."""
    from typer.testing import CliRunner

    from pipelines.cli import app as cli

    refused = CliRunner().invoke(cli, ["executor", "callback-url", "--merchant", "m_demo"])
    assert refused.exit_code == 2
    assert "Traceback" not in refused.output
    assert "--provider (fake, gupshup, interakt, karix, push_webhook), e.g. --provider gupshup" in refused.output


def test_gupshup_receipts_arriving_out_of_order_through_the_app_keep_a_delivered_message_delivered(
    api: Api,
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """WhatsApp reports statuses out of order: Gupshup's ``delivered`` (at t+5 s) arrives after its ``failed``
    (at t+9 s, 131000) and a later ``failed`` (131026 at t+12 s) after both. Before, the last to arrive decided:
    the message ended undelivered and WhatsApp was taken off the order. Now delivered wins, on either store."""
    h = make_harness({"action": "retarget", "channel": "whatsapp"}, database_url=database_url)
    with_harness(api, h)
    h.executor.payment_failed("m_demo", event())
    h.drain()
    sent = int(START.timestamp())

    def post(status: str, seconds: int, code: int | None = None) -> Any:
        body = receipt_payload("gupshup", "pm_1", status)
        body["timestamp"] = (sent + seconds) * 1000
        body["payload"]["payload"] = {"ts": sent + seconds} | ({"code": code, "reason": "x"} if code else {})
        return api.loop.run_until_complete(api.client.post(urls()["receipts"], json=body)).json()

    assert post("failed", 9, 131000) == {"received": 1}
    assert [(n.delivered, n.error) for n in h.view().nudges] == [(False, "131000 x")]
    assert post("delivered", 5) == {"received": 1}
    assert post("failed", 12, 131026) == {"received": 1}
    assert [(n.delivered, n.error) for n in h.view().nudges] == [(True, None)]
    ord_1 = h.executor.request_for  # the order's next decision still offers WhatsApp
    with h.executor.engine.connect() as conn:
        order = h.executor.lock_order(conn, "m_demo", "ord_1")
        assert order is not None
        assert "whatsapp" not in ord_1(conn, order, h.clock.now).customer.opted_out_channels


def karix_report(api: Api, body: Any, merchant_id: str = "m_demo") -> Any:
    target = urls(merchant_id, "karix")["receipts"]
    return api.loop.run_until_complete(api.client.post(target, json=body))


def test_karix_whatsapp_delivery_reports_through_the_app_mark_the_nudge_delivered_then_read(
    api: Api,
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """Before: Karix's WhatsApp reports (``events``, ``notificationAttributes``) were answered ``{"received": 0}``
    and changed nothing: the nudge's delivered/read status never moved. Now they are its receipts, matched by the
    ``mid`` Karix answered the send with; a ``sent`` one is acknowledged and changes nothing, and a failure after
    the read one does not take it back. On either store."""
    h = make_harness({"action": "retarget", "channel": "whatsapp"}, database_url=database_url)
    with_harness(api, h)
    h.executor.payment_failed("m_demo", event())
    h.drain()
    sent = int(START.timestamp() * 1000)
    assert karix_report(api, karix_whatsapp_report("pm_1", "sent", at_ms=sent + 1000)).json() == {"received": 0}
    assert karix_report(api, karix_whatsapp_report("pm_1", "delivered", at_ms=sent + 2000)).json() == {"received": 1}
    assert karix_report(api, karix_whatsapp_report("pm_1", "read", at_ms=sent + 3000)).json() == {"received": 1}
    failed = karix_whatsapp_report("pm_1", "failed", "131026", "Message undeliverable", at_ms=sent + 4000)
    assert karix_report(api, failed).json() == {"received": 1}
    assert [(n.delivered, n.error) for n in h.view().nudges] == [(True, None)]
    with h.executor.engine.connect() as conn:
        (status,) = conn.execute(nudges.select().with_only_columns(nudges.c.receipt_status)).one()
    assert status == "read"


def test_a_karix_whatsapp_report_that_meta_held_the_message_back_decides_the_order_again(
    api: Api,
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """Meta's per-user marketing limit (131049) in a Karix WhatsApp report: before, unread, the message counted as
    delivered. Now the nudge is undelivered with the code and reason, held back (a try-later): the order is
    decided again at once, not on WhatsApp for 24 hours. On either store."""
    h = make_harness(
        {"action": "retarget", "channel": "whatsapp"}, merchants=two_merchants(), database_url=database_url
    )
    with_harness(api, h)
    h.executor.payment_failed("m_demo", event("ord_1"))
    h.drain()
    decisions = len(h.view("ord_1").decisions)
    reason = "Message failed to send because more than 1 marketing message was sent to this user"
    failed = karix_whatsapp_report("pm_1", "failed", "131049", reason)
    assert karix_report(api, failed, "m_other").json() == {"received": 1}  # another merchant's: not its nudge
    assert h.view("ord_1").nudges[0].delivered is True
    assert karix_report(api, failed).json() == {"received": 1}
    [nudge] = h.view("ord_1").nudges
    assert nudge.delivered is False
    assert nudge.error == f"try_later: 131049 {reason}"
    last = h.view("ord_1").decisions[-1]
    assert len(h.view("ord_1").decisions) == decisions + 1
    assert "channel_held:whatsapp" in last["rules_applied"]
    assert opted_out_rows(h) == []


def test_karix_whatsapp_reports_unknown_or_malformed_are_acknowledged_or_refused_never_a_500(
    api: Api,
    make_harness: Any,  # noqa: F811 - the fixture
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unknown status is answered 200 with no receipt and logged; a report without its message id or status is
    a 422 naming what is missing (Karix's retry of it would fail the same way: it is a bad report, not an outage)."""
    h = make_harness({"action": "retarget", "channel": "whatsapp"})
    with_harness(api, h)
    h.executor.payment_failed("m_demo", event())
    h.drain()
    with caplog.at_level("WARNING", logger="winback.executor.channels"):
        answer = karix_report(api, karix_whatsapp_report("pm_1", "deleted"))
    assert (answer.status_code, answer.json()) == (200, {"received": 0})
    assert any("unknown status 'deleted' for message pm_1" in r.getMessage() for r in caplog.records)
    assert [(n.delivered, n.error) for n in h.view().nudges] == [(True, None)]
    no_mid = karix_whatsapp_report("", "delivered")
    answer = karix_report(api, no_mid)
    assert answer.status_code == 422
    [said] = answer.json()["detail"]
    assert (said["field"], "without 'events.mid'" in said["msg"]) == ("events.mid", True)
    no_status = karix_whatsapp_report("pm_1", "")
    answer = karix_report(api, no_status)
    assert answer.status_code == 422
    [said] = answer.json()["detail"]
    assert said["field"] == "notificationAttributes.status"
    assert "'notificationAttributes.status'" in said["msg"]


def test_a_stop_on_karix_whatsapp_through_the_app_keeps_the_opt_out(
    api: Api,
    make_harness: Any,  # noqa: F811 - the fixture
) -> None:
    """Before: a STOP the customer sent on Karix's WhatsApp API was answered ``{"message": false}`` and opted
    nobody out. Now it keeps the opt-out of that number on WhatsApp for the merchant."""
    h = make_harness({"action": "retarget", "channel": "whatsapp"})
    with_harness(api, h)
    target = urls("m_demo", "karix")["inbound"]
    body = karix_whatsapp_message(PHONE, "STOP")
    answer = api.loop.run_until_complete(api.client.post(target, json=body))
    assert answer.json() == {"message": True, "opted_out": True}
    assert opted_out_rows(h) == [("m_demo", "whatsapp", address_hash(Channel.WHATSAPP, PHONE))]
