"""Channels without a network: error mapping (httpx MockTransport), templates, opt-outs, receipts, webhooks."""

from __future__ import annotations

import asyncio
import json
import re
import smtplib
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import httpx
import pytest
from fastapi import FastAPI

from model.merchant_config import MerchantConfig, parse_config
from model.vocab import Channel
from service.executor.channels import (
    ChannelError,
    DeliveryReceipt,
    OutboundMessage,
    TemplateConfigError,
    build_adapters,
    is_opt_out,
    parse_delivery_receipts,
    parse_inbound,
    validate_templates,
)
from service.executor.channels.adapters import (
    GupshupSmsAdapter,
    GupshupWhatsAppAdapter,
    InteraktAdapter,
    KarixAdapter,
    MemoryAdapter,
    PushWebhookAdapter,
    SmtpAdapter,
    phone_digits,
    retry_after_seconds,
    split_calling_code,
)
from service.executor.channels.fakes import (
    inbound_payload,
    karix_whatsapp_message,
    karix_whatsapp_report,
    receipt_payload,
)
from service.executor.channels.inbound import PayloadError, wants_opt_out
from service.executor.channels.templates import TEMPLATE_VARIABLES, TemplateStore, template_store
from service.executor.channels.webhooks import create_provider_router
from service.personal_data import mask_address
from tests.factories import make_merchant

Handler = Callable[[httpx.Request], httpx.Response]
T = TypeVar("T")
VARIABLES = {k: v for k, v in TEMPLATE_VARIABLES.items() if k != "link_token"}


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def message(**overrides: Any) -> OutboundMessage:
    fields: dict[str, Any] = {
        "idempotency_key": "nudge:ord_1:1",
        "merchant_id": "m_demo",
        "order_id": "ord_1",
        "nudge_id": "ndg_1",
        "channel": Channel.WHATSAPP,
        "to": "+919876543210",
        "template_id": "tpl_pay_link",
        "variables": VARIABLES,
    }
    fields.update(overrides)
    return OutboundMessage(**fields)


def client(handler: Handler) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def store() -> TemplateStore:
    return template_store()


# --- small helpers -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "masked"),
    [("+919876543210", "+91******3210"), ("asha@example.com", "a***@example.com"), ("abc", "***")],
)
def test_mask_address_hides_the_middle(address: str, masked: str) -> None:
    assert mask_address(address) == masked


@pytest.mark.parametrize(
    ("to", "digits"),
    [("+919876543210", "919876543210"), ("+1 (415) 555-0100", "14155550100"), ("98765", None), ("x@y.z", None)],
)
def test_phone_digits_accepts_only_e164(to: str, digits: str | None) -> None:
    assert phone_digits(to) == digits


@pytest.mark.parametrize(
    ("digits", "split"),
    [
        ("919876543210", ("91", "9876543210")),
        ("14155550100", ("1", "4155550100")),
        ("971501234567", ("971", "501234567")),
        ("447700900123", ("44", "7700900123")),
    ],
)
def test_split_calling_code(digits: str, split: tuple[str, str]) -> None:
    assert split_calling_code(digits) == split


# --- opt-out -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "STOP",
        "stop",
        " Stop. ",
        "STOP please",
        "Unsubscribe",
        "stop messages",
        "STOP ALL",
        "opt out",
        "रोकें",
        "बंद करें",
        "Don’t message me",
        "END",
        "cancel!",
    ],
)
def test_opt_out_replies(text: str) -> None:
    assert is_opt_out(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Thanks, paid already",
        "end of month I will pay",
        "cancel my order? no, I will pay",
        "please don't stop",
        "stopwatch",
        "when does the link stop working",
    ],
)
def test_ordinary_replies_are_not_opt_outs(text: str) -> None:
    assert not is_opt_out(text)


# --- receipts and inbound ----------------------------------------------------------------------------------------

GUPSHUP_DOC_DELIVERED = {
    "app": "DemoAPI",
    "timestamp": 1580546677791,
    "version": 2,
    "type": "message-event",
    "payload": {
        "id": "gBEGkYaYVSEEAgnZxQ3JmKK6Wvg",
        "gsId": "ee4a68a0-1203-4c85-8dc3-49d0b3226a35",
        "type": "delivered",
        "destination": "918x98xx21x4",
        "payload": {"ts": 1585344475},
    },
}


def test_gupshup_whatsapp_receipt_uses_the_gupshup_id() -> None:
    [receipt] = parse_delivery_receipts("gupshup", GUPSHUP_DOC_DELIVERED)
    assert receipt.provider_message_id == "ee4a68a0-1203-4c85-8dc3-49d0b3226a35"
    assert receipt.status == "delivered"
    assert receipt.occurred_at.timestamp() == 1585344475


@pytest.mark.parametrize(
    ("provider", "channel"),
    [("gupshup", "whatsapp"), ("gupshup", "sms"), ("interakt", "whatsapp"), ("karix", "whatsapp"), ("fake", "sms")],
)
@pytest.mark.parametrize("status", ["delivered", "read", "failed"])
def test_receipts_of_every_provider(provider: str, channel: str, status: str) -> None:
    payload = receipt_payload(provider, "msg-42", status, channel)
    receipts = parse_delivery_receipts(provider, payload)
    if provider == "gupshup" and channel == "sms" and status == "read":
        assert receipts == []  # SMS has no read state
        return
    [receipt] = receipts
    assert (receipt.provider, receipt.provider_message_id, receipt.status) == (provider, "msg-42", status)


def test_gupshup_sms_batch_receipts() -> None:
    batch = [
        {"externalId": "a-1", "eventType": "DELIVERED", "eventTs": 1526347800000, "cause": "SUCCESS"},
        {"externalId": "a-2", "eventType": "FAILED", "eventTs": 1526347800000, "cause": "UNKNOWN_SUBSCRIBER"},
    ]
    receipts = parse_delivery_receipts("gupshup", batch)
    assert [(r.provider_message_id, r.status, r.error) for r in receipts] == [
        ("a-1", "delivered", None),
        ("a-2", "failed", "UNKNOWN_SUBSCRIBER"),
    ]


def whatsapp_failure(provider: str, code: Any, reason: str = "why") -> Any:
    """A failed WhatsApp receipt of ``provider`` with the error ``code`` where that provider puts it."""
    body = receipt_payload(provider, "msg-42", "failed")
    if provider == "gupshup":
        body["payload"]["payload"] = {"code": code, "reason": reason}
    else:  # interakt
        body["data"]["message"] |= {"channel_error_code": code, "channel_failure_reason": reason}
    return body


@pytest.mark.parametrize(
    ("provider", "code", "failure"),
    [
        ("gupshup", 131050, "opted_out"),
        ("interakt", "131050", "opted_out"),
        ("gupshup", 1012, "opted_out"),
        ("interakt", "1012", None),  # Gupshup's own code: nothing at Interakt
        ("gupshup", 131026, "undeliverable"),
        ("interakt", "131026", "undeliverable"),
        ("gupshup", 1002, "undeliverable"),
        ("interakt", "131049", "try_later"),
        ("gupshup", 130472, "try_later"),
        ("interakt", "130429", "rate_limited"),
        ("gupshup", 131056, "pair_rate_limited"),
        ("gupshup", 4001, "rate_limited"),
        ("interakt", "131047", "merchant_config"),
        ("gupshup", 131051, "merchant_config"),
        ("interakt", "132001", "merchant_config"),
        ("gupshup", 132000, "merchant_config"),
        ("interakt", "132015", "merchant_config"),
        ("gupshup", 1005, "merchant_config"),
        ("interakt", "131000", None),  # Meta's "something went wrong": no kind
        ("gupshup", None, None),
    ],
)
def test_a_failed_whatsapp_receipt_says_what_its_code_means(provider: str, code: Any, failure: str | None) -> None:
    """Before: only an opt-out (1012, 131050) was read from a failed receipt's code, and the code was dropped from
    its error. Now Meta's and Gupshup's codes are sorted into opted out, undeliverable, try later, rate limited and
    the merchant's set-up, and the code leads the error text."""
    [receipt] = parse_delivery_receipts(provider, whatsapp_failure(provider, code, "Reason text"))
    assert receipt.failure == failure
    assert receipt.opted_out is (failure == "opted_out")
    assert receipt.error == ("Reason text" if code is None else f"{code} Reason text")


def test_a_failed_karix_receipt_keeps_its_error_code_with_its_text() -> None:
    """Before: a Karix failure kept only ``error.message``; its ``error.code`` was dropped. Now the code leads the
    text, as for Gupshup and Interakt; Karix publishes no code list, so no kind of failure is read from it."""
    body = receipt_payload("karix", "msg-42", "failed")
    body["data"]["error"] = {"code": 4103, "message": "Destination unreachable"}
    [receipt] = parse_delivery_receipts("karix", body)
    assert (receipt.status, receipt.error, receipt.failure) == ("failed", "4103 Destination unreachable", None)


@pytest.mark.parametrize(
    ("status", "code", "reason", "expected"),
    [
        ("delivered", "101", "Delivered to User", ("delivered", None, None)),
        ("read", None, None, ("read", None, None)),
        ("READ", None, None, ("read", None, None)),
        ("failed", "131049", "not delivered to maintain healthy ecosystem engagement", ("failed", "try_later", 1)),
        ("failed", "130472", "User's number is part of an experiment", ("failed", "try_later", 1)),
        ("failed", "130429", "Rate limit hit", ("failed", "rate_limited", 1)),
        ("failed", "131056", "Pair rate limit hit", ("failed", "pair_rate_limited", 1)),
        ("failed", "131050", "User has stopped marketing messages", ("failed", "opted_out", 1)),
        ("failed", "131026", "Message undeliverable", ("failed", "undeliverable", 1)),
        ("failed", "132001", "Template does not exist", ("failed", "merchant_config", 1)),
        ("failed", "417", "Message expired", ("failed", None, 1)),  # Karix's own code: kept, not classified
        ("failed", None, "Failed", ("failed", None, 1)),
    ],
)
def test_a_karix_whatsapp_delivery_report_is_a_receipt(
    status: str, code: str | None, reason: str | None, expected: tuple[str, str | None, int | None]
) -> None:
    """Before: a report of Karix's WhatsApp API (``events``, ``notificationAttributes``) was read as a messaging
    API v2 record, found no status there, and gave no receipt: a Karix WhatsApp nudge stayed "delivered" whatever
    happened, and a message Meta held back counted against ``max_nudges``. Now delivered, read and failed are
    receipts of the ``mid`` Karix answered the send with, dated by ``events.timestamp``; a failure keeps its code
    and reason, and a Meta code in it says what kind of failure it is, held-back ones included."""
    body = karix_whatsapp_report("410135450328122240866789", status, code, reason, at_ms=1743144770000)
    [receipt] = parse_delivery_receipts("karix", body)
    want_status, want_failure, with_error = expected
    assert (receipt.provider, receipt.provider_message_id) == ("karix", "410135450328122240866789")
    assert (receipt.status, receipt.failure) == (want_status, want_failure)
    assert receipt.occurred_at.timestamp() == 1743144770
    text = " ".join(part for part in (code, reason) if part)
    assert receipt.error == (text if with_error else None)


@pytest.mark.parametrize("status", ["sent", "queued", "something-new"])
def test_a_karix_whatsapp_report_that_is_no_final_state_gives_no_receipt_and_an_unknown_one_is_logged(
    status: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="winback.executor.channels"):
        assert parse_delivery_receipts("karix", karix_whatsapp_report("m-1", status)) == []
    logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert logged == (
        [
            "karix WhatsApp delivery report with an unknown status 'something-new' for message m-1: "
            "acknowledged, not applied"
        ]
        if status == "something-new"
        else []
    )


def test_a_karix_whatsapp_report_without_mid_is_the_message_of_its_echoed_reference() -> None:
    body = karix_whatsapp_report("", "delivered", cust_ref="nudge:ord_1:1")
    [receipt] = parse_delivery_receipts("karix", body)
    assert receipt.provider_message_id == "nudge:ord_1:1"


def test_a_customers_message_on_karix_whatsapp_is_no_receipt() -> None:
    body = {
        "channel": "WABA",
        "events": {"eventType": "User initiated", "timestamp": "1743144770000"},
        "eventContent": {"message": {"from": "919800000001", "contentType": "text", "text": {"body": "hi"}}},
    }
    assert parse_delivery_receipts("karix", body) == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda body: body.update(events="DELIVERY EVENTS"), "'events' is not an object"),
        (lambda body: body.pop("notificationAttributes"), "without a 'notificationAttributes' object"),
        (lambda body: body["notificationAttributes"].pop("status"), "without 'notificationAttributes.status'"),
        (lambda body: body["events"].pop("mid"), "without 'events.mid' (nor 'recipient.reference.cust_ref')"),
        (lambda body: body["events"].update(timestamp="yesterday"), "unreadable time stamp 'yesterday'"),
    ],
)
def test_a_malformed_karix_whatsapp_report_is_refused_naming_the_problem(change: Any, problem: str) -> None:
    body = karix_whatsapp_report("m-1", "delivered")
    change(body)
    with pytest.raises(PayloadError, match=re.escape(problem)):
        parse_delivery_receipts("karix", body)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (karix_whatsapp_message("919800000001", "STOP"), ("+919800000001", "STOP", True)),
        (karix_whatsapp_message("919800000001", "Stop", "button"), ("+919800000001", "Stop", True)),
        (
            {
                "events": {"eventType": "User initiated"},
                "eventContent": {
                    "message": {
                        "from": "919800000001",
                        "contentType": "interactive",
                        "interactive": {"button_reply": {"id": "b1", "title": "Unsubscribe"}},
                    }
                },
            },
            ("+919800000001", "Unsubscribe", True),
        ),
        (karix_whatsapp_message("919800000001", "when is it due?"), ("+919800000001", "when is it due?", False)),
        (karix_whatsapp_report("m-1", "delivered"), None),
        ({"events": {"eventType": "User initiated"}, "eventContent": {"message": {"contentType": "ATTACHMENT"}}}, None),
    ],
)
def test_a_customers_message_on_karix_whatsapp_is_read_and_a_stop_opts_out(
    body: Any, expected: tuple[str, str, bool] | None
) -> None:
    """Before: Karix's WhatsApp API's ``User initiated`` events were read as messaging API v2 records, found no
    ``direction: inbound``, and a customer's STOP there opted nobody out. Now the typed text, a template's quick
    reply or an interactive reply is the reply, and a STOP opts out."""
    message = parse_inbound("karix", body)
    if expected is None:
        assert message is None
        return
    assert message is not None
    assert (message.sender, message.text, wants_opt_out(message)) == expected
    assert message.channel is Channel.WHATSAPP


def test_a_code_on_a_receipt_that_is_not_a_failure_is_no_failure() -> None:
    body = receipt_payload("interakt", "msg-42", "delivered")
    body["data"]["message"]["channel_error_code"] = "131026"
    [receipt] = parse_delivery_receipts("interakt", body)
    assert (receipt.status, receipt.failure, receipt.error) == ("delivered", None, None)


@pytest.mark.parametrize("interim", ["enqueued", "sent"])
def test_interim_states_give_no_receipt(interim: str) -> None:
    payload = dict(GUPSHUP_DOC_DELIVERED, payload=dict(GUPSHUP_DOC_DELIVERED["payload"], type=interim))  # type: ignore[arg-type]
    assert parse_delivery_receipts("gupshup", payload) == []


def test_unreadable_receipts_raise_clear_errors() -> None:
    with pytest.raises(PayloadError, match="unknown provider 'nope'"):
        parse_delivery_receipts("nope", {})
    with pytest.raises(PayloadError, match="neither a WhatsApp message-event nor an SMS delivery report"):
        parse_delivery_receipts("gupshup", {"hello": 1})
    with pytest.raises(PayloadError, match="without a message id"):
        parse_delivery_receipts("interakt", {"type": "message_api_delivered", "data": {"message": {}}})


@pytest.mark.parametrize(
    ("provider", "channel"),
    [("gupshup", "whatsapp"), ("gupshup", "sms"), ("interakt", "whatsapp"), ("karix", "whatsapp"), ("karix", "sms")],
)
def test_inbound_replies_are_read_with_e164_sender(provider: str, channel: str) -> None:
    inbound = parse_inbound(provider, inbound_payload(provider, "919876543210", "STOP", channel))
    assert inbound is not None
    assert (inbound.sender, inbound.text, inbound.channel) == ("+919876543210", "STOP", Channel(channel))


def test_gupshup_opted_out_user_event() -> None:
    event = {
        "app": "DemoAPI",
        "timestamp": 1,
        "version": 2,
        "type": "user-event",
        "payload": {"phone": "919876543210", "type": "opted-out"},
    }
    inbound = parse_inbound("gupshup", event)
    assert inbound is not None
    assert inbound.opted_out
    assert inbound.sender == "+919876543210"


@pytest.mark.parametrize(
    ("kind", "content"),
    [
        ("quick_reply", {"text": "Stop promotions", "type": "button", "postbackText": "stop"}),
        ("button_reply", {"title": "STOP", "id": "opt-out", "reply": "STOP 1"}),
    ],
)
def test_a_tapped_stop_button_on_whatsapp_is_an_opt_out(kind: str, content: dict[str, Any]) -> None:
    """Before: only typed text was read, so a customer who tapped the template's "Stop promotions" quick reply (or
    an interactive STOP button) was never opted out; Gupshup sends those as ``quick_reply`` / ``button_reply``."""
    tapped = inbound_payload("gupshup", "919876543210", "x")
    tapped["payload"]["type"] = kind
    tapped["payload"]["payload"] = content
    inbound = parse_inbound("gupshup", tapped)
    assert inbound is not None
    assert wants_opt_out(inbound)
    assert inbound.sender == "+919876543210"


def test_non_text_inbound_is_ignored() -> None:
    image = inbound_payload("gupshup", "919876543210", "x")
    image["payload"]["type"] = "image"
    assert parse_inbound("gupshup", image) is None
    assert parse_inbound("interakt", {"type": "message_api_sent", "data": {}}) is None


# --- templates ---------------------------------------------------------------------------------------------------


def write(root: Path, name: str, text: str) -> None:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text, encoding="utf-8")


LINK_SMS = "{{ merchant_name }} pay {{ link_url }}"


def test_template_fallbacks_prefer_the_customers_language(tmp_path: Path) -> None:
    write(tmp_path, "m_demo/sms.en.j2", "merchant-en " + LINK_SMS)
    write(tmp_path, "_default/sms.hi.j2", "default-hi " + LINK_SMS)
    write(tmp_path, "_default/sms.en.j2", "default-en " + LINK_SMS)
    templates = TemplateStore(tmp_path)
    assert templates.render("m_demo", Channel.SMS, "hi-IN", VARIABLES).source == "_default/sms.hi.j2"
    assert templates.render("m_demo", Channel.SMS, "en", VARIABLES).source == "m_demo/sms.en.j2"
    assert templates.render("m_demo", Channel.SMS, "ta", VARIABLES).source == "m_demo/sms.en.j2"
    assert templates.render("m_other", Channel.SMS, "fr", VARIABLES).text.startswith("default-en")


def test_a_template_named_with_whatsapps_locale_spelling_is_found(tmp_path: Path) -> None:
    # Start-up validation accepts sms.en_US.j2 (WhatsApp's spelling of a locale), but the lookup asked only for
    # sms.en-US.j2: the merchant's file was never used and its customers got the default text.
    write(tmp_path, "m_demo/sms.en_US.j2", "merchant-en-us " + LINK_SMS)
    write(tmp_path, "m_demo/sms.pt-BR.j2", "merchant-pt-br " + LINK_SMS)
    write(tmp_path, "m_demo/sms.pt_BR.j2", "merchant-pt-br-underscore " + LINK_SMS)
    write(tmp_path, "_default/sms.en.j2", "default-en " + LINK_SMS)
    templates = TemplateStore(tmp_path)
    for locale in ("en-US", "en_US"):
        rendered = templates.render("m_demo", Channel.SMS, locale, VARIABLES)
        assert (rendered.source, rendered.locale) == ("m_demo/sms.en_US.j2", "en_US")
    assert templates.render("m_demo", Channel.SMS, "pt-BR", VARIABLES).source == "m_demo/sms.pt-BR.j2"  # hyphen first
    assert templates.render("m_other", Channel.SMS, "en-US", VARIABLES).source == "_default/sms.en.j2"


def test_template_sandbox_refuses_python_access(tmp_path: Path) -> None:
    write(tmp_path, "_default/sms.en.j2", "{{ link_url.__class__.__mro__ }}")
    with pytest.raises(TemplateConfigError, match=r"sms\.en\.j2"):
        TemplateStore(tmp_path).render("m", Channel.SMS, "en", VARIABLES)


def config_for(channels: list[str]) -> Any:
    merchant = make_merchant().model_dump(mode="json")
    merchant["retarget"]["channels"] = channels
    return parse_config({"merchants": {"m_demo": merchant}})


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("Hi {{ nickname }} {{ link_url }}", "'nickname' is undefined"),
        ("Hi {{ customer_name }}, please pay", "does not contain the payment link"),
        ("Hi {{ link_url ", "sms.en.j2 line 1"),
        ("{% set params = [nickname] %}{{ link_url }}", "'params' uses an undefined variable: 'nickname'"),
    ],
)
def test_validate_templates_names_the_bad_file(tmp_path: Path, text: str, problem: str) -> None:
    write(tmp_path, "_default/sms.en.j2", LINK_SMS)
    write(tmp_path, "m_demo/sms.en.j2", text)
    with pytest.raises(TemplateConfigError) as info:
        validate_templates(config_for(["sms"]), tmp_path)
    assert str(tmp_path / "m_demo" / "sms.en.j2") in str(info.value)
    assert problem in str(info.value)


def test_validate_templates_needs_an_email_subject_and_a_template_per_channel(tmp_path: Path) -> None:
    write(tmp_path, "_default/email.en.j2", LINK_SMS)
    write(tmp_path, "_default/notes.txt", "x")
    with pytest.raises(TemplateConfigError) as info:
        validate_templates(config_for(["email", "whatsapp"]), tmp_path)
    text = str(info.value)
    assert "email template must set a subject" in text
    assert "notes.txt: not a template name" in text
    assert "no whatsapp template for merchant 'm_demo'" in text


def test_shipped_templates_validate_against_the_demo_config() -> None:
    from model.merchant_config import load_config
    from service.api.settings import DEMO_CONFIG

    validate_templates(load_config(DEMO_CONFIG))


def test_whatsapp_template_exports_params_and_derives_the_link_token() -> None:
    rendered = store().render("m_demo", Channel.WHATSAPP, "en", VARIABLES)
    assert rendered.params == ("Asha", "Sample Merchant", "INR 1499.00", "2026-11-03 18:00 IST")
    assert rendered.button_params == ("SAMPLE-LINK-TOKEN",)


def test_shipped_templates_greet_a_customer_without_a_name_in_words() -> None:
    """The executor now sends ``customer_name`` always, "" when the event has no name; the shipped templates'
    ``default("there")`` applied only to an undefined name, so they would have read "Hi ," and sent an empty
    WhatsApp template value."""
    unnamed = VARIABLES | {"customer_name": ""}
    assert store().render("m_demo", Channel.EMAIL, "en", unnamed).text.startswith("Hi there,")
    assert store().render("m_demo", Channel.WHATSAPP, "en", unnamed).params[0] == "there"
    assert store().render("m_demo", Channel.WHATSAPP, "hi", unnamed).params[0] == "ग्राहक"


# --- adapters: error mapping ------------------------------------------------------------------------------------


def gupshup_wa(http: httpx.AsyncClient) -> GupshupWhatsAppAdapter:
    return GupshupWhatsAppAdapter("m_demo", store(), http, "https://gs.test", "k", "919000000000", "DemoApp")


ADAPTERS: dict[str, Callable[[httpx.AsyncClient], Any]] = {
    "gupshup_wa": gupshup_wa,
    "gupshup_sms": lambda http: GupshupSmsAdapter("m_demo", store(), http, "https://sms.test", "u", "p", None),
    "interakt": lambda http: InteraktAdapter("m_demo", store(), http, "https://ik.test", "k"),
    "karix": lambda http: KarixAdapter("m_demo", Channel.WHATSAPP, store(), http, "https://kx.test", "u", "t", "+1"),
    "push": lambda http: PushWebhookAdapter("m_demo", store(), http, "https://push.test/hook", "secret"),
}
CHANNEL_OF = {"gupshup_sms": Channel.SMS, "push": Channel.PUSH}


def send_with(name: str, handler: Handler, **overrides: Any) -> Any:
    async def go() -> Any:
        async with client(handler) as http:
            adapter = ADAPTERS[name](http)
            return await adapter.send(message(channel=CHANNEL_OF.get(name, Channel.WHATSAPP), **overrides))

    return run(go())


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_an_answer_that_cannot_be_decoded_is_a_recorded_retry_not_an_exception(name: str) -> None:
    """Before: an answer whose body its Content-Encoding could not decode raised httpx.DecodingError out of
    ``send``, which promises a SendResult for every provider trouble. Now it is retryable; the provider answered,
    so it may have taken the message (not ``not_taken``)."""
    broken = lambda request: httpx.Response(200, headers={"content-encoding": "gzip"}, content=b"not gzip")  # noqa: E731
    result = send_with(name, broken)
    assert (result.status, result.not_taken) == ("retryable", False)
    assert result.error.endswith("unreadable answer (DecodingError)")


@pytest.mark.parametrize(
    ("locale", "expected"),
    [("hi", "_default/whatsapp.hi.j2"), ("HI", "_default/whatsapp.hi.j2"), ("Hi-in", "_default/whatsapp.hi.j2")],
)
def test_a_customers_locale_finds_its_template_whatever_its_case(locale: str, expected: str) -> None:
    """Before: a locale written in another case than the file's (``HI``, ``Hi-in``: BCP 47 tags are
    case-insensitive) found no file and the customer got the English template. Now the tag is also looked for
    in its usual case."""
    assert template_store().resolve("m_demo", Channel.WHATSAPP, locale) == expected


def test_a_merchants_regional_template_is_found_for_a_locale_in_another_case(tmp_path: Path) -> None:
    (tmp_path / "m_demo").mkdir()
    (tmp_path / "m_demo" / "sms.pt-BR.j2").write_text("Pague {{ link_url }}\n")
    (tmp_path / "m_demo" / "sms.en.j2").write_text("Pay {{ link_url }}\n")
    templates = TemplateStore(tmp_path)
    assert templates.resolve("m_demo", Channel.SMS, "pt-br") == "m_demo/sms.pt-BR.j2"
    assert templates.resolve("m_demo", Channel.SMS, "pt-BR") == "m_demo/sms.pt-BR.j2"
    assert templates.resolve("m_demo", Channel.SMS, "de") == "m_demo/sms.en.j2"


def test_a_template_failing_on_a_customers_values_is_a_recorded_rejection(tmp_path: Path) -> None:
    """Before: a template expression that fails on some values only (here a division by the length of an empty
    customer name; the start-up check renders a sample name) raised ZeroDivisionError out of ``send``. Now that
    send is rejected, naming the file."""
    (tmp_path / "m_demo").mkdir()
    (tmp_path / "m_demo" / "sms.en.j2").write_text("{{ 100 // (customer_name | length) }} {{ link_url }}\n")
    adapter = MemoryAdapter("m_demo", Channel.SMS, TemplateStore(tmp_path))
    named = run(adapter.send(message(channel=Channel.SMS)))
    assert named.status == "accepted"
    nameless = message(channel=Channel.SMS).model_copy(update={"variables": VARIABLES | {"customer_name": ""}})
    result = run(adapter.send(nameless))
    assert result.status == "rejected"
    assert "m_demo/sms.en.j2: ZeroDivisionError" in str(result.error)


def test_a_provider_error_quoting_the_phone_number_is_logged_and_kept_masked(caplog: pytest.LogCaptureFixture) -> None:
    """Before: a provider's error text went into the send's error (logged, and kept with the nudge) as it came, so
    one that quoted the recipient's number (``Invalid phone number 919876543210``) logged it in full. Now every
    phone number and e-mail address in it is masked."""
    answer = {"result": False, "message": "Invalid phone number 919876543210 (+919876543210)"}
    with caplog.at_level("INFO", logger="winback.executor.channels"):
        result = send_with("interakt", lambda request: httpx.Response(400, json=answer))
    assert result.status == "rejected"
    assert result.error == "interakt answered HTTP 400: Invalid phone number 91******3210 (+91******3210)"
    logged = " ".join(f"{record.getMessage()} {vars(record)}" for record in caplog.records)
    assert "9876543210" not in logged
    assert "91******3210" in logged


def test_a_mail_server_refusal_quoting_the_address_is_logged_and_kept_masked(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: a mail server's refusal after the recipient was accepted (at DATA, e.g. ``550 5.1.1
    <asha@example.com>: Recipient address rejected``) went into the send's error as it came, the customer's
    address with it, and from there into the log. Now it is masked there."""

    class RefusingSmtp:
        def __init__(self, *args: Any, **kwargs: Any) -> None: ...
        def __enter__(self) -> RefusingSmtp:
            return self

        def __exit__(self, *exc: object) -> None: ...
        def ehlo(self) -> None: ...
        def has_extn(self, name: str) -> bool:
            return False

        def send_message(self, email: Any) -> None:
            raise smtplib.SMTPDataError(550, b"5.1.1 <asha.k@example.com>: Recipient address rejected")

    monkeypatch.setattr(smtplib, "SMTP", RefusingSmtp)
    adapter = SmtpAdapter("m_demo", store(), "mail.test", 25, "pay@merchant.example")
    with caplog.at_level("INFO", logger="winback.executor.channels"):
        result = run(adapter.send(message(channel=Channel.EMAIL, to="asha.k@example.com")))
    assert result.status == "rejected"
    assert result.error == "smtp: 550 5.1.1 <a***@example.com>: Recipient address rejected"
    logged = " ".join(f"{record.getMessage()} {vars(record)}" for record in caplog.records)
    assert "asha.k@" not in logged


@pytest.mark.parametrize("name", list(ADAPTERS))
@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (500, "retryable"),
        (503, "retryable"),
        (429, "retryable"),
        (400, "rejected"),
        (401, "rejected"),
        (404, "rejected"),
    ],
)
def test_http_status_mapping(name: str, status: int, expected: str) -> None:
    result = send_with(name, lambda request: httpx.Response(status, json={"message": "nope"}))
    assert result.status == expected
    assert f"HTTP {status}" in (result.error or "")


@pytest.mark.parametrize("name", list(ADAPTERS))
@pytest.mark.parametrize(
    "exc", [httpx.ReadTimeout("slow"), httpx.ConnectError("refused"), httpx.RemoteProtocolError("eof")]
)
def test_network_failures_are_retryable(name: str, exc: Exception) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    result = send_with(name, handler)
    assert result.status == "retryable"


@pytest.mark.parametrize("name", list(ADAPTERS))
@pytest.mark.parametrize(
    ("status", "not_taken"),
    [(429, True), (503, True), (502, True), (501, True), (408, True), (500, False), (504, False), (520, False)],
)
def test_a_provider_answering_429_or_503_certainly_did_not_take_the_message(
    name: str, status: int, not_taken: bool
) -> None:
    """Before, every ``retryable`` answer looked alike, so a message the provider answered 503 for was counted
    like one that timed out (possibly sent). A 504 is a gateway's timeout, and a 500 may come after the provider
    took the message: either may have it."""
    result = send_with(name, lambda request: httpx.Response(status, json={"message": "busy"}))
    assert (result.status, result.not_taken) == ("retryable", not_taken)


@pytest.mark.parametrize("name", list(ADAPTERS))
@pytest.mark.parametrize(
    ("exc", "not_taken"),
    [
        (httpx.ConnectError("refused"), True),
        (httpx.ConnectTimeout("no connection"), True),
        (httpx.ReadTimeout("slow"), False),
        (httpx.RemoteProtocolError("eof"), False),
    ],
)
def test_only_a_failed_connection_certainly_did_not_reach_the_provider(
    name: str, exc: Exception, not_taken: bool
) -> None:
    """A refused connection sent nothing; a read timeout or a connection lost mid-request may have been taken."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    result = send_with(name, handler)
    assert (result.status, result.not_taken) == ("retryable", not_taken)


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"Retry-After": "120"}, 120.0),
        ({"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT", "Date": "Wed, 21 Oct 2026 07:23:00 GMT"}, 300.0),
        ({"Retry-After": "Wed, 21 Oct 2026 07:20:00 GMT", "Date": "Wed, 21 Oct 2026 07:23:00 GMT"}, 0.0),
        ({"Retry-After": "soon"}, None),
        ({}, None),
        # A superscript two is a digit to str.isdigit and not to float: the adapter raised (review).
        ({"Retry-After": b"\xb2"}, None),
        # Hundreds of digits read as inf, and a timedelta of it overflowed (review): a day at most.
        ({"Retry-After": "9" * 400}, 86_400.0),
        ({"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT", "Date": "Wed, 21 Oct 2026 07:23:00 GMT"}, 86_400.0),
    ],
)
def test_retry_after_is_read_as_seconds_or_an_http_date(headers: dict[str, str | bytes], seconds: float | None) -> None:
    """Before, ``Retry-After`` was not read at all: the message was tried again on its own backoff."""
    result = send_with("gupshup_wa", lambda request: httpx.Response(429, headers=headers, json={}))
    assert result.retry_after_seconds == seconds
    assert retry_after_seconds(httpx.Response(503, headers=headers)) == seconds


@pytest.mark.parametrize("name", ["gupshup_wa", "gupshup_sms", "interakt", "karix"])
def test_a_bad_number_is_rejected_without_calling_the_provider(name: str) -> None:
    calls: list[httpx.Request] = []
    result = send_with(name, lambda request: calls.append(request) or httpx.Response(200), to="12345")
    assert (result.status, calls) == ("rejected", [])
    assert "not an E.164 phone number" in (result.error or "")


def test_gupshup_sms_error_in_a_200_answer_is_rejected() -> None:
    body = {"response": {"id": "175", "phone": "", "details": "The phone number is not valid", "status": "error"}}
    result = send_with("gupshup_sms", lambda request: httpx.Response(200, json=body))
    assert result.status == "rejected"
    assert result.error == "gupshup sms error 175: The phone number is not valid"


def test_karix_failed_record_is_rejected() -> None:
    body = {"objects": [{"uid": "u1", "status": "failed", "error": {"message": "Invalid destination"}}]}
    result = send_with("karix", lambda request: httpx.Response(202, json=body))
    assert (result.status, result.provider_message_id, result.error) == ("rejected", "u1", "karix: Invalid destination")


def sent_body_values(name: str, customer_name: str) -> list[str]:
    """The WhatsApp template body values adapter ``name`` posts for a customer of that name."""
    posted: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        posted.append(request)
        return httpx.Response(202, json={"status": "submitted", "messageId": "g1", "result": True, "id": "i1"})

    assert send_with(name, handler, variables=VARIABLES | {"customer_name": customer_name}).status == "accepted"
    if name == "interakt":
        return list(json.loads(posted[0].content)["template"]["bodyValues"])
    form = dict(parse_qsl(posted[0].content.decode()))
    return list(json.loads(form["template"])["params"])


@pytest.mark.parametrize("name", ["gupshup_wa", "interakt"])
def test_whatsapp_template_values_carry_no_line_break_tab_or_long_run_of_spaces(name: str) -> None:
    """Before: a name with a line break or a tab (as merchants' exports have them) went into the template values
    as it was; WhatsApp refuses those (error 132018) after the provider has accepted the send, so the customer
    got no link and the nudge still counted. A name of only white space went as an empty value, not "there"."""
    assert sent_body_values(name, "Asha\nKumar\tR      S")[0] == "Asha Kumar R S"
    assert sent_body_values(name, " \n\t ")[0] == "there"


def test_every_request_carries_the_idempotency_key() -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Idempotency-Key"))
        return httpx.Response(500)

    for name in ADAPTERS:
        send_with(name, handler)
    assert seen == ["nudge:ord_1:1"] * len(ADAPTERS)


def test_a_missing_template_variable_rejects_the_send() -> None:
    result = send_with("gupshup_sms", lambda request: httpx.Response(200), variables={"amount": "1"})
    assert result.status == "rejected"
    assert "is undefined" in (result.error or "")


def test_adapter_logs_mask_the_address(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="winback.executor.channels")
    send_with("interakt", lambda request: httpx.Response(500))
    assert "+91******3210" in caplog.text
    assert "9876543210" not in caplog.text


# --- build_adapters ---------------------------------------------------------------------------------------------


def merchant_with(providers: dict[str, Any]) -> MerchantConfig:
    return make_merchant(providers=providers)


def test_build_adapters_from_config() -> None:
    merchant = merchant_with(
        {
            "whatsapp": {"kind": "gupshup", "api_key_env": "GS_KEY", "source": "919000000000", "sender": "DemoApp"},
            "sms": {"kind": "gupshup", "base_url": "http://sms.test", "api_key_env": "GS_SMS"},
            "email": {"kind": "smtp", "host": "localhost", "port": 1025, "sender": "pay@merchant.example"},
            "push": {"kind": "fake"},
        }
    )
    env = {"GS_KEY": "k", "GS_SMS": "user:pass"}

    async def go() -> dict[Channel, Any]:
        async with httpx.AsyncClient() as http:
            return build_adapters("m_demo", merchant, env, http)

    adapters = run(go())
    assert isinstance(adapters[Channel.WHATSAPP], GupshupWhatsAppAdapter)
    assert adapters[Channel.WHATSAPP].base_url == "https://api.gupshup.io"
    assert isinstance(adapters[Channel.SMS], GupshupSmsAdapter)
    assert isinstance(adapters[Channel.EMAIL], SmtpAdapter)
    assert isinstance(adapters[Channel.PUSH], MemoryAdapter)


@pytest.mark.parametrize(
    ("provider", "template_id"),
    [
        ({"kind": "gupshup", "source": "919000000000", "sender": "DemoApp"}, "8985923d-682d-4bb7-b037-66b61c8c7877"),
        ({"kind": "interakt"}, "acme_payment_reminder"),
    ],
)
def test_the_provider_is_asked_for_the_merchants_approved_whatsapp_template(
    provider: dict[str, Any], template_id: str
) -> None:
    """Before: every WhatsApp message named winback's own template, ``payment_link``: Gupshup ids its templates by
    a UUID it assigns, so no Gupshup account has that one, and every message was refused; an Interakt template
    had to be named so. ``providers.whatsapp.template_id`` now names the merchant's approved template."""
    merchant = merchant_with(
        {"whatsapp": provider | {"base_url": "https://bsp.test", "api_key_env": "KEY", "template_id": template_id}}
    )
    posted: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        posted.append(request)
        return httpx.Response(202, json={"status": "submitted", "messageId": "g1", "result": True, "id": "i1"})

    async def go() -> Any:
        async with client(handler) as http:
            return await build_adapters("m_demo", merchant, {"KEY": "k"}, http)[Channel.WHATSAPP].send(message())

    assert run(go()).status == "accepted"
    if provider["kind"] == "interakt":
        assert json.loads(posted[0].content)["template"]["name"] == template_id
    else:
        assert json.loads(dict(parse_qsl(posted[0].content.decode()))["template"])["id"] == template_id


@pytest.mark.parametrize(
    ("providers", "env", "problem"),
    [
        (
            {"whatsapp": {"kind": "gupshup", "api_key_env": "GS_KEY", "source": "9190"}},
            {},
            "providers.whatsapp (kind gupshup): environment variable GS_KEY (named by 'api_key_env') is not set",
        ),
        ({"whatsapp": {"kind": "gupshup", "api_key_env": "GS_KEY"}}, {"GS_KEY": "secret-value"}, "needs 'source'"),
        ({"sms": {"kind": "interakt", "api_key_env": "K"}}, {"K": "x"}, "kind 'interakt' cannot deliver sms"),
        ({"sms": {"kind": "gupshup", "api_key_env": "GS"}}, {"GS": "no-colon-secret"}, "must hold '<user>:<password>'"),
        ({"push": {"kind": "push_webhook", "api_key_env": "P"}}, {"P": "x"}, "needs 'base_url'"),
    ],
)
def test_build_adapters_errors_name_the_problem_not_the_secret(
    providers: dict[str, Any], env: dict[str, str], problem: str
) -> None:
    async def go() -> None:
        async with httpx.AsyncClient() as http:
            build_adapters("m_demo", merchant_with(providers), env, http)

    with pytest.raises(ChannelError) as info:
        run(go())
    assert problem in str(info.value)
    assert "merchant 'm_demo'" in str(info.value)
    for secret in env.values():
        assert secret not in str(info.value)


# --- webhooks router --------------------------------------------------------------------------------------------


class Client:
    """Sync calls on an ASGI app (starlette's TestClient warns under this httpx version)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://winback") as http:
                return await http.request(method, path, **kwargs)

        return run(go())

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def get(self, path: str) -> httpx.Response:
        return self.request("GET", path)


def router_app() -> tuple[Client, list[DeliveryReceipt], list[tuple[str, Channel, str]]]:
    receipts: list[DeliveryReceipt] = []
    opt_outs: list[tuple[str, Channel, str]] = []

    async def on_opt_out(merchant_id: str, channel: Channel, address: str) -> None:
        opt_outs.append((merchant_id, channel, address))

    app = FastAPI()
    app.include_router(create_provider_router(receipts.append, on_opt_out))
    return Client(app), receipts, opt_outs


def test_receipts_endpoint_calls_back_per_receipt() -> None:
    http, receipts, _ = router_app()
    response = http.post("/v1/providers/gupshup/receipts", json=GUPSHUP_DOC_DELIVERED)
    assert response.json() == {"received": 1}
    assert receipts[0].provider_message_id == "ee4a68a0-1203-4c85-8dc3-49d0b3226a35"


def test_gupshup_sms_get_receipt_with_query_parameters() -> None:
    http, receipts, _ = router_app()
    query = "externalId=37953&deliveredTS=1526347800000&status=SUCCESS&cause=SUCCESS&phoneNo=919876543210"
    assert http.get(f"/v1/providers/gupshup/receipts?{query}").json() == {"received": 1}
    assert (receipts[0].provider_message_id, receipts[0].status) == ("37953", "delivered")


def test_inbound_stop_calls_on_opt_out_with_the_merchant() -> None:
    http, _, opt_outs = router_app()
    payload = inbound_payload("gupshup", "919876543210", "STOP")
    response = http.post("/v1/providers/gupshup/inbound?merchant_id=m_demo", json=payload)
    assert response.json() == {"message": True, "opted_out": True}
    assert opt_outs == [("m_demo", Channel.WHATSAPP, "+919876543210")]


def test_inbound_form_encoded_sms_reply() -> None:
    http, _, opt_outs = router_app()
    response = http.post(
        "/v1/providers/gupshup/inbound?merchant_id=m_demo", data={"msisdn": "919876543210", "content": "stop messages"}
    )
    assert response.json()["opted_out"] is True
    assert opt_outs == [("m_demo", Channel.SMS, "+919876543210")]


def test_ordinary_reply_is_not_an_opt_out() -> None:
    http, _, opt_outs = router_app()
    payload = inbound_payload("interakt", "919876543210", "paid, thanks")
    assert http.post("/v1/providers/interakt/inbound?merchant_id=m", json=payload).json() == {
        "message": True,
        "opted_out": False,
    }
    assert opt_outs == []


@pytest.mark.parametrize(
    ("path", "body", "status", "detail"),
    [
        ("/v1/providers/nope/receipts", {}, 404, "unknown provider 'nope'"),
        (
            "/v1/providers/gupshup/inbound",
            inbound_payload("gupshup", "919876543210", "STOP"),
            400,
            "configure the callback URL with ?merchant_id=",
        ),
        ("/v1/providers/gupshup/receipts", {"x": 1}, 422, "neither a WhatsApp message-event"),  # malformed input
    ],
)
def test_webhook_errors(path: str, body: Any, status: int, detail: str) -> None:
    http, _, _ = router_app()
    response = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == status
    assert detail in str(response.json()["detail"])  # a 422's is FastAPI's list of errors, on a bare router too
