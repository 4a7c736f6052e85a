"""Each channel adapter against its local fake provider over real HTTP/SMTP: request shapes, failures, callbacks."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from fastapi import FastAPI

from model.merchant_config import MerchantConfig
from model.vocab import Channel
from service.executor.channels import DeliveryReceipt, OutboundMessage, SendResult
from service.executor.channels.adapters import (
    GupshupSmsAdapter,
    GupshupWhatsAppAdapter,
    InteraktAdapter,
    KarixAdapter,
    PushWebhookAdapter,
    SmtpAdapter,
    build_adapters,
    provider_problems,
)
from service.executor.channels.fakes import FakeSmtpServer, RunningFake, _ThreadedServer, run_fake_provider
from service.executor.channels.templates import TEMPLATE_VARIABLES, TemplateStore, template_store
from service.executor.channels.webhooks import create_provider_router
from tests.factories import make_merchant

T = TypeVar("T")
VARIABLES = {k: v for k, v in TEMPLATE_VARIABLES.items() if k != "link_token"}


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def message(channel: Channel, key: str = "nudge:ord_1:1", to: str = "+919876543210", **extra: Any) -> OutboundMessage:
    return OutboundMessage(
        idempotency_key=key,
        merchant_id="m_demo",
        order_id="ord_1",
        nudge_id="ndg_1",
        channel=channel,
        to=to,
        template_id="tpl_pay_link",
        variables=VARIABLES,
        **extra,
    )


def send(adapter_factory: Any, *messages: OutboundMessage, timeout: float = 5.0) -> list[SendResult]:
    async def go() -> list[SendResult]:
        async with httpx.AsyncClient(timeout=timeout) as http:
            adapter = adapter_factory(http)
            return [await adapter.send(m) for m in messages]

    return run(go())


@pytest.fixture(scope="module")
def gupshup() -> Iterator[RunningFake]:
    with run_fake_provider("gupshup", api_key="gs-key", username="2000123", password="pw") as fake:
        yield fake


@pytest.fixture(scope="module")
def interakt() -> Iterator[RunningFake]:
    with run_fake_provider("interakt", api_key="aWstYmFzaWM=") as fake:
        yield fake


@pytest.fixture(scope="module")
def karix() -> Iterator[RunningFake]:
    with run_fake_provider("karix", username="acct-uid", password="acct-token", api_key="kx-wa-key") as fake:
        yield fake


@pytest.fixture(scope="module")
def push() -> Iterator[RunningFake]:
    with run_fake_provider("push", push_secret="push-secret") as fake:
        yield fake


@pytest.fixture(autouse=True)
def _fresh_fakes(request: pytest.FixtureRequest) -> None:
    """Every fake a test uses starts clean, also one it picks by its ``kind`` parameter (``getfixturevalue``), since
    the module-scoped fakes otherwise carry an earlier test's rejected numbers or faults on the same worker."""
    callspec = getattr(request.node, "callspec", None)
    picked = callspec.params.get("kind") if callspec is not None else None
    for name in ("gupshup", "interakt", "karix", "push"):
        if name in request.fixturenames or name == picked:
            request.getfixturevalue(name).state.reset()


def gs_wa(fake: RunningFake, key: str = "gs-key") -> Any:
    return lambda http: GupshupWhatsAppAdapter(
        "m_demo", template_store(), http, fake.base_url, key, "+919000000000", "DemoApp"
    )


def gs_sms(fake: RunningFake) -> Any:
    return lambda http: GupshupSmsAdapter("m_demo", template_store(), http, fake.base_url, "2000123", "pw", "WINBCK")


def ik(fake: RunningFake) -> Any:
    return lambda http: InteraktAdapter("m_demo", template_store(), http, fake.base_url, "aWstYmFzaWM=")


def kx(fake: RunningFake) -> Any:
    return lambda http: KarixAdapter(
        "m_demo", Channel.WHATSAPP, template_store(), http, fake.base_url, "acct-uid", "acct-token", "+919000000000"
    )


# --- request shapes ------------------------------------------------------------------------------------------------


def test_gupshup_whatsapp_template_request(gupshup: RunningFake) -> None:
    [result] = send(gs_wa(gupshup), message(Channel.WHATSAPP))
    assert result.status == "accepted"
    [seen] = gupshup.state.messages
    assert seen["path"] == "/wa/api/v1/template/msg"
    assert seen["headers"]["content-type"] == "application/x-www-form-urlencoded"
    assert {k: seen["form"][k] for k in ("channel", "source", "destination", "src.name")} == {
        "channel": "whatsapp",
        "source": "919000000000",
        "destination": "919876543210",
        "src.name": "DemoApp",
    }
    assert seen["template"] == {
        "id": "tpl_pay_link",
        # the body's variables, then the URL button's suffix: the link token the customer needs
        "params": ["Asha", "Sample Merchant", "INR 1499.00", "2026-11-03 18:00 IST", "SAMPLE-LINK-TOKEN"],
    }
    assert (seen["id"], seen["idempotency_key"]) == (result.provider_message_id, "nudge:ord_1:1")


def test_gupshup_whatsapp_wrong_key_is_rejected(gupshup: RunningFake) -> None:
    [result] = send(gs_wa(gupshup, key="wrong"), message(Channel.WHATSAPP))
    assert result.status == "rejected"
    assert "HTTP 401" in (result.error or "")
    assert gupshup.state.messages == []


def test_gupshup_sms_request(gupshup: RunningFake) -> None:
    results = send(gs_sms(gupshup), message(Channel.SMS), message(Channel.SMS, key="k2", locale="hi"))
    assert [r.status for r in results] == ["accepted", "accepted"]
    english, hindi = gupshup.state.messages
    assert english["path"] == "/GatewayAPI/rest"
    form = english["form"]
    assert {k: form[k] for k in ("method", "send_to", "msg_type", "userid", "auth_scheme", "v", "format", "mask")} == {
        "method": "SendMessage",
        "send_to": "919876543210",
        "msg_type": "TEXT",
        "userid": "2000123",
        "auth_scheme": "plain",
        "v": "1.1",
        "format": "json",
        "mask": "WINBCK",
    }
    assert "https://pay.example/p/SAMPLE-LINK-TOKEN" in english["text"]
    assert hindi["form"]["msg_type"] == "Unicode_Text"
    assert "भुगतान" in hindi["text"]


def gupshup_sms_config(fake: RunningFake, **dlt: str) -> MerchantConfig:
    sms = {"kind": "gupshup", "base_url": fake.base_url, "api_key_env": "GS_SMS", "source": "WINBCK"}
    return make_merchant(providers={"sms": sms | dlt})


def test_gupshup_sms_carries_the_merchants_dlt_entity_and_template_ids(gupshup: RunningFake) -> None:
    """Before: no DLT ids could be configured or were sent, and Indian operators drop a commercial SMS whose
    registered entity and template (TRAI's DLT) it does not name. ``providers.sms.entity_id`` and
    ``template_id`` now go out as Gupshup's ``principalEntityId`` and ``dltTemplateId``."""
    merchant = gupshup_sms_config(gupshup, entity_id="1101660960000072501", template_id="1107169632532933613")
    env = {"GS_SMS": "2000123:pw"}
    [result] = send(lambda http: build_adapters("m_demo", merchant, env, http)[Channel.SMS], message(Channel.SMS))
    assert result.status == "accepted"
    [seen] = gupshup.state.messages
    assert seen["form"]["principalEntityId"] == "1101660960000072501"
    assert seen["form"]["dltTemplateId"] == "1107169632532933613"
    assert provider_problems("m_demo", merchant, env) == ([], [])


@pytest.mark.parametrize("dlt", [{"entity_id": "1101660960000072501"}, {"template_id": "1107169632532933613"}])
def test_gupshup_sms_with_half_of_its_dlt_ids_is_a_start_up_problem(gupshup: RunningFake, dlt: dict[str, str]) -> None:
    """An entity id without a template id (or the reverse) would be dropped by the operators just the same."""
    unset, problems = provider_problems("m_demo", gupshup_sms_config(gupshup, **dlt), {"GS_SMS": "2000123:pw"})
    assert unset == []
    assert problems == [
        "merchant 'm_demo', providers.sms (kind gupshup): India's DLT needs both 'entity_id' and 'template_id' "
        "(the principal entity id and the DLT template id), or neither"
    ]


def test_gupshup_sms_invalid_number_is_rejected(gupshup: RunningFake) -> None:
    gupshup.state.reject("919876543210")
    [result] = send(gs_sms(gupshup), message(Channel.SMS))
    assert result.status == "rejected"
    assert result.error == "gupshup sms error 175: The phone number is not valid"


def test_interakt_request(interakt: RunningFake) -> None:
    factory = ik(interakt)
    [result] = send(factory, message(Channel.WHATSAPP, locale="hi"))
    assert result.status == "accepted"
    [seen] = interakt.state.messages
    assert seen["path"] == "/v1/public/message/"
    assert seen["json"] == {
        "countryCode": "+91",
        "phoneNumber": "9876543210",
        "callbackData": "nudge:ord_1:1",
        "type": "Template",
        "template": {
            "name": "tpl_pay_link",
            "languageCode": "hi",
            "bodyValues": ["Asha", "Sample Merchant", "INR 1499.00", "2026-11-03 18:00 IST"],
            "buttonValues": {"0": ["SAMPLE-LINK-TOKEN"]},
        },
    }


@pytest.mark.parametrize(
    ("locale", "merchant_file", "language_code"),
    [
        ("hi-IN", None, "hi"),  # the shipped Hindi template: Meta's code for Hindi is "hi", not "hi-IN"
        ("fr-FR", None, "en"),  # no French template: the English one is sent, so its language is "en"
        ("en-US", "whatsapp.en-US.j2", "en_US"),  # the merchant's template for its approved en_US one
        ("en-us", "whatsapp.en-us.j2", "en_US"),  # a file named with a hyphen or lower case: Meta's form
        ("pt-BR", "whatsapp.pt.j2", "pt"),
    ],
)
def test_interakt_names_the_language_of_the_template_it_sends(
    interakt: RunningFake, tmp_path: Path, locale: str, merchant_file: str | None, language_code: str
) -> None:
    """Before: ``languageCode`` was the customer's locale as the event gave it (``hi-IN``, ``fr-FR``): not a code
    of Meta's form (``hi``, ``en_US``: an underscore), and not the language of the body values sent, so
    WhatsApp refused the message (its template in that language does not exist). It is now the locale of the
    template file the values were rendered from, in Meta's form."""
    shipped = template_store().root / "_default"
    for path in shipped.iterdir():
        (tmp_path / "_default").mkdir(exist_ok=True)
        (tmp_path / "_default" / path.name).write_text(path.read_text())
    if merchant_file:
        (tmp_path / "m_demo").mkdir()
        (tmp_path / "m_demo" / merchant_file).write_text((shipped / "whatsapp.en.j2").read_text())
    factory = lambda http: InteraktAdapter("m_demo", TemplateStore(tmp_path), http, interakt.base_url, "aWstYmFzaWM=")  # noqa: E731
    [result] = send(factory, message(Channel.WHATSAPP, locale=locale))
    assert result.status == "accepted"
    [seen] = interakt.state.messages
    assert seen["json"]["template"]["languageCode"] == language_code


def test_karix_request(karix: RunningFake) -> None:
    factory = kx(karix)
    [ok] = send(factory, message(Channel.WHATSAPP))
    karix.state.reject("919876543211")
    [bad] = send(factory, message(Channel.WHATSAPP, key="k2", to="+919876543211"))
    assert (ok.status, bad.status, bad.error) == ("accepted", "rejected", "karix: Invalid destination")
    seen = karix.state.messages[0]
    assert seen["path"] == "/message/"
    assert seen["api_version"] == "2.0"
    assert {k: seen["json"][k] for k in ("channel", "source", "destination")} == {
        "channel": "whatsapp",
        "source": "+919000000000",
        "destination": ["+919876543210"],
    }
    assert "https://pay.example/p/SAMPLE-LINK-TOKEN" in seen["json"]["content"]["text"]


def karix_whatsapp(fake: RunningFake, key: str = "kx-wa-key", **extra: str) -> Any:
    provider = {"kind": "karix", "base_url": fake.base_url, "api_key_env": "KX_WA", "source": "+919000000000"}
    merchant = make_merchant(providers={"whatsapp": provider | extra})
    return lambda http: build_adapters("m_demo", merchant, {"KX_WA": key}, http)[Channel.WHATSAPP]


def test_karix_whatsapp_sends_the_merchants_approved_template(karix: RunningFake) -> None:
    """Before: Karix WhatsApp sent the rendered text as a free-form message, which WhatsApp refuses outside its
    24-hour customer-service window, so a payment-link nudge (the business writes first) never reached anyone.
    With ``template_id`` it now asks Karix's WhatsApp API for the approved template: body values in order, and
    the link token as the URL button's dynamic part (``MEDIA_TEMPLATE``, the type that carries buttons)."""
    [result] = send(karix_whatsapp(karix, template_id="payment_reminder"), message(Channel.WHATSAPP))
    assert result.status == "accepted"
    [seen] = karix.state.messages
    assert result.provider_message_id == seen["id"]
    assert seen["path"] == "/services/rcm/sendMessage"
    body = seen["json"]
    assert body["metaData"] == {"version": "v1.0.9"}
    sent = body["message"]
    assert sent["channel"] == "WABA"
    assert sent["sender"] == {"from": "919000000000"}
    assert sent["recipient"] == {
        "to": "919876543210",
        "recipient_type": "individual",
        "reference": {"cust_ref": "nudge:ord_1:1"},
    }
    assert sent["content"] == {
        "type": "MEDIA_TEMPLATE",
        "preview_url": False,
        "shorten_url": False,
        "mediaTemplate": {
            "templateId": "payment_reminder",
            "bodyParameterValues": {
                "0": "Asha",
                "1": "Sample Merchant",
                "2": "INR 1499.00",
                "3": "2026-11-03 18:00 IST",
            },
            "buttons": {"actions": [{"type": "url", "index": "0", "payload": "SAMPLE-LINK-TOKEN"}]},
        },
    }


def test_karix_whatsapp_sends_name_the_webhook_its_delivery_reports_go_to(karix: RunningFake) -> None:
    """Before: the send named no delivery-report webhook (``preferences.webHookDNId``), so Karix had nowhere to post
    the message's reports and none came. Now every send names ``1001``, the id every public integration sends (the
    webhook registered with the URL `winback executor callback-url` prints; no config key names another yet)."""
    [result] = send(karix_whatsapp(karix, template_id="payment_reminder"), message(Channel.WHATSAPP))
    assert result.status == "accepted"
    [seen] = karix.state.messages
    assert seen["json"]["message"]["preferences"] == {"webHookDNId": "1001"}


def test_karix_whatsapp_template_without_buttons_and_its_failures(karix: RunningFake, tmp_path: Path) -> None:
    """A template whose link is in its body goes as ``TEMPLATE`` with ``parameterValues``; a wrong key and a
    refused number are rejections, a 503 is worth retrying."""
    (tmp_path / "_default").mkdir()
    (tmp_path / "_default" / "whatsapp.en.j2").write_text(
        "{%- set params = [merchant_name, link_url] -%}Pay {{ merchant_name }}: {{ link_url }}"
    )
    merchant = make_merchant(
        providers={
            "whatsapp": {
                "kind": "karix",
                "base_url": karix.base_url,
                "api_key_env": "KX_WA",
                "source": "919000000000",
                "template_id": "pay_link_body",
            }
        }
    )

    def factory(key: str) -> Any:
        env = {"KX_WA": key, "WINBACK_TEMPLATES_DIR": str(tmp_path)}
        return lambda http: build_adapters("m_demo", merchant, env, http)[Channel.WHATSAPP]

    [ok] = send(factory("kx-wa-key"), message(Channel.WHATSAPP))
    assert ok.status == "accepted"
    assert karix.state.messages[0]["json"]["message"]["content"] == {
        "type": "TEMPLATE",
        "preview_url": False,
        "shorten_url": False,
        "template": {
            "templateId": "pay_link_body",
            "parameterValues": {"0": "Sample Merchant", "1": "https://pay.example/p/SAMPLE-LINK-TOKEN"},
        },
    }
    [wrong_key] = send(factory("not-the-key"), message(Channel.WHATSAPP, key="k2"))
    assert (wrong_key.status, wrong_key.error) == ("rejected", "karix answered HTTP 401")
    karix.state.reject("919876543211")
    [refused] = send(factory("kx-wa-key"), message(Channel.WHATSAPP, key="k3", to="+919876543211"))
    assert (refused.status, refused.error) == ("rejected", "karix answered HTTP 400")
    karix.state.fail(times=1, status=503)
    [later] = send(factory("kx-wa-key"), message(Channel.WHATSAPP, key="k4"))
    assert (later.status, later.not_taken) == ("retryable", True)
    assert len(karix.state.messages) == 1


def test_push_webhook_is_signed_and_deduplicated(push: RunningFake) -> None:
    factory = lambda http: PushWebhookAdapter("m_demo", template_store(), http, push.base_url + "/push", "push-secret")  # noqa: E731
    first, again = send(factory, message(Channel.PUSH, to="device-token-1"), message(Channel.PUSH, to="device-token-1"))
    assert first.status == again.status == "accepted"
    assert first.provider_message_id == again.provider_message_id
    [seen] = push.state.messages
    assert seen["json"]["title"] == "Sample Merchant: payment pending"
    assert seen["json"]["link_url"] == "https://pay.example/p/SAMPLE-LINK-TOKEN"
    bad = lambda http: PushWebhookAdapter("m_demo", template_store(), http, push.base_url + "/push", "other")  # noqa: E731
    [forged] = send(bad, message(Channel.PUSH, key="k3", to="device-token-1"))
    assert forged.status == "rejected"


def test_get_messages_endpoint_lists_what_was_received(gupshup: RunningFake) -> None:
    send(gs_sms(gupshup), message(Channel.SMS))
    listed = httpx.get(gupshup.base_url + "/_messages").json()
    assert [m["idempotency_key"] for m in listed] == ["nudge:ord_1:1"]


# --- failures and retries ----------------------------------------------------------------------------------------


def test_5xx_then_success_records_one_message(gupshup: RunningFake) -> None:
    gupshup.state.fail(times=2, status=503)
    results = send(gs_wa(gupshup), *[message(Channel.WHATSAPP)] * 3)
    assert [r.status for r in results] == ["retryable", "retryable", "accepted"]
    assert len(gupshup.state.messages) == 1


def test_timeout_is_retryable_and_records_nothing(interakt: RunningFake) -> None:
    interakt.state.hang(times=1, seconds=1.0)
    factory = ik(interakt)
    [result] = send(factory, message(Channel.WHATSAPP), timeout=0.2)
    assert (result.status, result.error) == ("retryable", "interakt: timed out")
    time.sleep(1.0)  # let the fake finish its hung request
    assert interakt.state.messages == []


def test_control_endpoint_injects_failures(karix: RunningFake) -> None:
    httpx.post(karix.base_url + "/_control/fail", json={"times": 1, "status": 502})
    factory = kx(karix)
    assert [r.status for r in send(factory, *[message(Channel.WHATSAPP)] * 2)] == ["retryable", "accepted"]


def test_connection_refused_is_retryable() -> None:
    factory = lambda http: InteraktAdapter("m_demo", template_store(), http, "http://127.0.0.1:9", "k")  # noqa: E731
    [result] = send(factory, message(Channel.WHATSAPP))
    assert result.status == "retryable"


# --- SMTP -----------------------------------------------------------------------------------------------------------


def smtp_adapter(port: int) -> Any:
    return lambda http: SmtpAdapter(
        "m_demo", template_store(), "127.0.0.1", port, "pay@merchant.example", "mailer", "s3cret", timeout=2.0
    )


def test_smtp_delivery_failures_and_auth() -> None:
    with FakeSmtpServer(username="mailer", password="s3cret") as smtp:
        smtp.fail(times=1, code=451)
        smtp.reject("gone@example.com")
        results = send(
            smtp_adapter(smtp.port),
            *[message(Channel.EMAIL, to="asha@example.com")] * 2,
            message(Channel.EMAIL, key="k2", to="gone@example.com"),
            message(Channel.EMAIL, key="k3", to="not-an-address"),
        )
    assert [r.status for r in results] == ["retryable", "accepted", "rejected", "rejected"]
    [mail] = smtp.messages
    assert mail["to"] == ["asha@example.com"]
    assert mail["subject"] == "Your payment to Sample Merchant did not go through"
    assert mail["idempotency_key"] == "nudge:ord_1:1"
    assert mail["message_id"] == results[1].provider_message_id
    assert "https://pay.example/p/SAMPLE-LINK-TOKEN" in mail["text"]
    # One-click unsubscribe in the mail client (RFC 8058); before, an e-mail customer had no way to opt out.
    assert mail["list_unsubscribe"] == f"<{VARIABLES['unsubscribe_url']}>"
    assert mail["list_unsubscribe_post"] == "List-Unsubscribe=One-Click"
    assert VARIABLES["unsubscribe_url"] in mail["text"]


@pytest.mark.parametrize(
    ("subject", "merchant_name"),
    [
        ("{% set subject %}Your payment\nto {{ merchant_name }}{% endset %}", "Sample Merchant"),
        ('{%- set subject = "Payment to " ~ merchant_name -%}', "Acme\r\nBcc: victim@example.com"),
    ],
)
def test_an_email_subject_with_a_line_break_is_a_recorded_rejection(
    tmp_path: Path, subject: str, merchant_name: str
) -> None:
    """Before: a line break in the rendered subject (from the template or a variable) raised ValueError out of
    ``send`` (the e-mail library refuses it), so the nudge crashed its worker instead of recording a result."""
    (tmp_path / "m_demo").mkdir()
    (tmp_path / "m_demo" / "email.en.j2").write_text(subject + "\nPay here: {{ link_url }}\n")
    variables = VARIABLES | {"merchant_name": merchant_name}
    mail = message(Channel.EMAIL, to="asha@example.com").model_copy(update={"variables": variables})
    with FakeSmtpServer() as smtp:
        [result] = send(
            lambda http: SmtpAdapter("m_demo", TemplateStore(tmp_path), "127.0.0.1", smtp.port, "pay@m.example"),
            mail,
        )
    assert result.status == "rejected"
    error = result.error or ""
    assert "m_demo/email.en.j2" in error
    assert "'subject' renders with a line break" in error
    assert smtp.messages == []


#: The relays' answers that say the merchant's sender is over a limit (data/README.md), each at the command the
#: provider answers it at, with what the sender is over; and two that must not hold the sender.
SMTP_ANSWERS = [
    ("DATA", 454, "Throttling failure: Maximum sending rate exceeded", "rate"),
    ("DATA", 454, "Throttling failure: Daily message quota exceeded", "daily_quota"),
    (
        "DATA",
        421,
        "4.7.28 [203.0.113.7] Our system has detected an unusual rate of\n4.7.28 unsolicited mail originating from "
        "your IP address. To protect our\n4.7.28 users from spam, mail sent from your IP address has been\n4.7.28 "
        "temporarily rate limited. - gsmtp",
        "rate",
    ),
    ("MAIL", 421, "4.7.0 [203.0.113.7] Our system has detected an unusual rate of unsolicited mail", "rate"),
    ("MAIL", 450, "4.2.1 Peak SMTP relay limit exceeded for customer. - gsmtp", "rate"),
    ("MAIL", 550, "5.4.5 Daily user sending limit exceeded. - gsmtp", "daily_quota"),
    ("RCPT", 550, "5.4.5 Daily SMTP relay limit exceeded for user. - gsmtp", "daily_quota"),
    ("MAIL", 550, "5.7.1 Daily SMTP relay limit exceeded for customer. - gsmtp", "daily_quota"),
    ("MAIL", 550, "5.7.1 [203.0.113.7] Messages missing a valid Message-ID header are not accepted. - gsmtp", None),
    ("RCPT", 550, "5.1.1 The email account that you tried to reach does not exist. - gsmtp", None),
    ("RCPT", 450, "4.2.1 The user you are trying to contact is receiving mail too quickly. - gsmtp", None),
    ("MAIL", 421, "4.7.0 Try again later, closing connection. - gsmtp", None),
    # Microsoft Exchange Online's NDR codes and texts (data/README.md); Exchange Server's submission rate limit.
    ("MAIL", 451, "4.7.500 Access denied, please try again later", "rate"),
    ("RCPT", 451, "4.7.850 Access denied, please try again later", "rate"),
    ("MAIL", 550, "5.7.508 Access denied, [2001:db8::7] has exceeded permitted limits within /64 range", "rate"),
    ("MAIL", 421, "4.4.2 Message submission rate for this client has exceeded the configured limit", "rate"),
    ("DATA", 550, "5.2.2 Submission quota exceeded", "daily_quota"),
    (
        "RCPT",
        550,
        "5.1.90 Your message can't be sent because you've reached your daily limit for message recipients",
        "daily_quota",
    ),
    (
        "RCPT",
        550,
        "5.7.233 Your message can't be sent because your tenant exceeded its daily limit for sending email to "
        "external recipients (tenant external recipient rate limit)",
        "daily_quota",
    ),
    ("RCPT", 452, "4.5.3 Too many recipients", None),
    ("RCPT", 432, "4.3.2 STOREDRV.Deliver; recipient thread limit exceeded", None),
    ("DATA", 552, "5.2.2 Mailbox full", None),  # RFC 3463's 5.2.2, the recipient's: not the submission quota
]


@pytest.mark.parametrize(("at", "code", "text", "limit"), SMTP_ANSWERS)
def test_a_relays_throttling_answer_says_the_sender_is_limited_and_a_recipients_refusal_does_not(
    at: str, code: int, text: str, limit: str | None
) -> None:
    """Before: Amazon SES's ``454 Throttling failure`` was one more 4xx, tried again on its own, and Google's
    ``550 5.4.5 Daily user sending limit exceeded`` a refusal of the message for good. Now each says the merchant's
    sender is over its rate or its daily quota (``sender_limited``): not taken, the sender to be held (the
    executor's part: tests/integration/test_smtp_throttling.py). A recipient's refusal, or that recipient receiving
    too fast, is about this message alone, as before."""
    result = first_of_two_e_mails(code, text, at)
    assert result.sender_limited == limit
    if limit is not None:
        assert (result.status, result.not_taken) == ("retryable", True)
        assert result.error == f"smtp: {code} {text}"
    else:
        assert result.status == ("rejected" if code >= 500 else "retryable")


def first_of_two_e_mails(code: int, text: str, at: str) -> SendResult:
    """The SMTP adapter's result of an e-mail the fake relay answers ``code`` ``text`` at command ``at``; the next
    e-mail, to another recipient, is taken (the fault was the one answer planned)."""
    with FakeSmtpServer(username="mailer", password="s3cret") as smtp:
        smtp.fail(code=code, text=text, at=at)
        [result, after] = send(
            smtp_adapter(smtp.port),
            message(Channel.EMAIL, to="asha@example.com"),
            message(Channel.EMAIL, key="k2", to="ravi@example.com"),
        )
    assert after.status == "accepted"
    assert [mail["to"] for mail in smtp.messages] == [["ravi@example.com"]]
    return result


@pytest.mark.parametrize(
    ("at", "text"),
    [
        ("MAIL", "5.7.708 Service unavailable. Access denied, traffic not accepted from this IP."),
        ("MAIL", "5.7.705 Access denied, tenant has exceeded threshold"),
        ("MAIL", "5.7.750 Service unavailable. Client blocked from sending from unregistered domains"),
        ("MAIL", "5.1.8 Access denied, bad outbound sender"),
        ("DATA", "5.7.501 Access denied, spam abuse detected."),
        ("RCPT", "5.7.511 Access denied, banned sender[203.0.113.7]. To request removal from this list please forward "
         "this message to delist@messaging.microsoft.com."),
        ("RCPT", "5.7.606 Access denied, banned sending IP [203.0.113.7]. To request removal from this list please "
         "visit https://sender.office.com/ and follow the directions."),
    ],
)  # fmt: skip
def test_an_exchange_ban_of_the_sender_is_not_taken_and_says_the_sender_is_banned(at: str, text: str) -> None:
    """Before: Exchange Online's bans of the merchant's sender (its account, sending IP or domain), which end only
    when an admin acts (data/README.md), were refusals of the message for good, recorded and counted against each
    customer in turn. Now each is not taken and says the sender is banned (``sender_blocked``): the executor puts the
    merchant's e-mail down at once (tests/integration/test_smtp_throttling.py). It is no rate limit to wait out."""
    result = first_of_two_e_mails(550, text, at)
    assert (result.status, result.not_taken, result.sender_blocked, result.sender_limited) == (
        "retryable", True, "ban", None
    )  # fmt: skip
    assert (result.error or "").startswith(f"smtp: 550 {text[:30]}")  # the rest: any address in it masked
    # Answered at RCPT, it names the recipient's domain: maybe only that domain's provider's ban (the executor's part).
    assert result.rcpt_domain == ("example.com" if at == "RCPT" else None)


SES_PAUSED = (
    "Message rejected: Sending paused for this account. For more information, please check the inbox of the email "
    "address associated with your AWS account."
)
GOOGLE_SENDING_DENIED = (
    "5.7.0 Mail Sending denied. This error occurs if the sender account is disabled\n5.7.0 or not registered within "
    "your Google Workspace domain. - gsmtp"
)


@pytest.mark.parametrize(
    ("at", "code", "text"),
    [
        ("DATA", 554, SES_PAUSED),
        ("DATA", 554, SES_PAUSED.replace("paused", "suspended")),  # SES's older wording
        ("MAIL", 550, GOOGLE_SENDING_DENIED),
        ("RCPT", 550, GOOGLE_SENDING_DENIED),
    ],
)
def test_a_paused_ses_account_or_a_disabled_google_sender_is_a_ban_of_the_sender(at: str, code: int, text: str) -> None:
    """Before: only Exchange Online's bans were read as such. Amazon SES's paused account (its sending review: it
    sends nothing until AWS accepts a request) and Google's ``550 5.7.0 Mail Sending denied`` (the sender account
    disabled) were refusals of the message for good, recorded and counted against each customer in turn. Now each
    says the sender is banned: not taken, the merchant's e-mail down (data/README.md)."""
    result = first_of_two_e_mails(code, text, at)
    assert (result.status, result.not_taken, result.sender_blocked, result.sender_limited) == (
        "retryable", True, "ban", None
    )  # fmt: skip
    assert result.rcpt_domain == ("example.com" if at == "RCPT" else None)


#: Amazon SES's answer naming the identities it has not verified (data/README.md), for ``{}`` of them.
SES_UNVERIFIED = (
    "Message rejected: Email address is not verified. The following identities failed the check in region US-EAST-1: {}"
)


@pytest.mark.parametrize(
    ("at", "code", "text"),
    [
        ("MAIL", 550, "5.7.0 Mail relay denied [203.0.113.7]. Invalid credentials for relay for one of the domains "
         "in: merchant.example (as obtained from HELO and MAIL FROM). - gsmtp"),
        ("RCPT", 550, "5.7.1 Invalid credentials for relay [203.0.113.7]. The IP address you've registered in your "
         "Workspace SMTP Relay service doesn't match domain of the account this email is being sent from. - gsmtp"),
        ("AUTH", 535, "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. "
         "Visit https://aka.ms/smtp_auth_disabled for more information."),
        ("AUTH", 535, "5.7.139 Authentication unsuccessful, the request did not meet the criteria to be "
         "authenticated successfully. Contact your administrator."),
        ("AUTH", 535, "5.7.3 Authentication unsuccessful"),
        ("AUTH", 535, "Authentication Credentials Invalid"),  # Amazon SES
        ("AUTH", 535, "Account not subscribed to SES"),
        ("AUTH", 534, "5.7.9 Application-specific password required. Learn more at\n5.7.9 "
         "https://support.google.com/mail/?p=InvalidSecondFactor - gsmtp"),
        ("MAIL", 530, "5.7.57 Client not authenticated to send mail."),
        ("DATA", 554, "Access denied: User arn:aws:iam::123456789012:user/ses-smtp-user is not authorized to perform "
         "ses:SendRawEmail on resource arn:aws:ses:us-east-1:123456789012:identity/merchant.example"),
        ("DATA", 554, SES_UNVERIFIED.format("pay@merchant.example")),
        ("DATA", 554, SES_UNVERIFIED.format("asha@example.com, merchant.example")),  # the sender's domain
        ("DATA", 554, SES_UNVERIFIED.format("Pay@Merchant.example, asha@example.com...")),
        # Postfix's reject_unauth_destination, at RCPT; Exchange's "Unable to relay"; Exchange Online's connector.
        ("RCPT", 554, "5.7.1 <asha@example.com>: Relay access denied"),
        ("RCPT", 554, "5.7.1 <asha@example.com>: Recipient address rejected: Relay access denied"),
        ("RCPT", 550, "5.7.1 Unable to relay"),
        ("RCPT", 550, "5.7.64 TenantAttribution; Relay Access Denied"),
        # Exchange Online's send-as refusal (before: a refusal of the message, in SMTP_ANSWERS); Exchange Server's.
        ("MAIL", 550, "5.7.60 SMTP; Client does not have permissions to send as this sender"),
        ("DATA", 550, "5.7.60 SMTP; Client does not have permissions to send as this sender "
         "[BY2PR1001MB1094.namprd10.prod.outlook.com]"),
        ("MAIL", 550, "5.7.1 Client does not have permission to send as this sender"),
    ],
)  # fmt: skip
def test_an_smtp_set_up_to_fix_is_not_taken_and_says_so(at: str, code: int, text: str) -> None:
    """Before: Google's relay refusing an IP or domain its settings do not name, the relay refusing the merchant's
    credentials (an ``SMTPAuthenticationError``: Exchange Online's SMTP AUTH turned off, 5.7.139), SES's IAM refusal
    and its unverified *sender* were refusals of the message for good, recorded and counted against each customer in
    turn, though every message is refused alike until an admin fixes the settings; so were the merchant's own relay
    refusing to pass its mail on (Postfix's ``554 5.7.1 Relay access denied``, Exchange's ``Unable to relay``) and
    Exchange Online refusing the login to send as the merchant's From address (``550 5.7.60``). Now each is not
    taken and says the merchant's set-up is wrong (``sender_blocked`` ``setup``): the executor puts the merchant's
    e-mail down (tests/integration/test_smtp_throttling.py). Answered at RCPT, it names the recipient's domain (the
    executor waits for a second domain: a relay passing RCPT through may hand back a recipient's server's answer)."""
    result = first_of_two_e_mails(code, text, at)
    assert (result.status, result.not_taken, result.sender_blocked, result.sender_limited) == (
        "retryable", True, "setup", None
    )  # fmt: skip
    assert result.rcpt_domain == ("example.com" if at == "RCPT" else None)
    assert (result.error or "").startswith(f"smtp: {code} ")


def test_wrong_credentials_or_no_auth_offered_are_a_set_up_to_fix() -> None:
    """The fake relay's own refusal of a wrong password (``535 5.7.8``), and a relay offering no AUTH at all while
    the merchant's settings give credentials (smtplib's ``SMTPNotSupportedError``: another host or port, say): a
    set-up to fix, not taken. Before: a refusal for good, and a try that may have been sent."""
    with FakeSmtpServer(username="mailer", password="another") as smtp:
        [wrong] = send(smtp_adapter(smtp.port), message(Channel.EMAIL, to="asha@example.com"))
    with FakeSmtpServer() as smtp:
        [no_auth] = send(smtp_adapter(smtp.port), message(Channel.EMAIL, to="asha@example.com"))
    assert smtp.messages == []
    for result in (wrong, no_auth):
        assert (result.status, result.not_taken, result.sender_blocked) == ("retryable", True, "setup"), result


@pytest.mark.parametrize(
    ("at", "code", "text"),
    [
        ("DATA", 554, SES_UNVERIFIED.format("asha@example.com")),  # in SES's sandbox: the recipient's
        ("DATA", 554, SES_UNVERIFIED.format("asha@example.com, other.example...")),  # cut short, not the sender's
        ("RCPT", 550, "5.2.1 The email account that you tried to reach is disabled. - gsmtp"),
    ],
)
def test_an_unverified_recipient_or_a_disabled_one_is_a_refusal_of_the_message(at: str, code: int, text: str) -> None:
    """SES's unverified address when only the recipient's is named (its sandbox verifies recipients too), and a
    recipient's disabled account: a refusal of this message, as before, no block of the sender."""
    result = first_of_two_e_mails(code, text, at)
    assert (result.status, result.sender_blocked) == ("rejected", None)


def test_postfixs_default_relay_refusal_at_rcpt_is_a_set_up_to_fix_though_a_4xx() -> None:
    """Postfix's default relay rule (``defer_unauth_destination``) answers ``454 4.7.1 <address>: Relay access
    denied`` to a client neither in its networks nor logged in (data/README.md). Before: a 4xx like any, tried again
    message after message (this test said so, deliberately changed). Now a set-up to fix, as its 554 is: not taken,
    naming the recipient's domain, so the executor takes e-mail down once a second domain is refused so."""
    result = first_of_two_e_mails(454, "4.7.1 <asha@example.com>: Relay access denied", "RCPT")
    assert (result.status, result.not_taken, result.sender_blocked, result.sender_limited) == (
        "retryable", True, "setup", None
    )  # fmt: skip
    assert result.rcpt_domain == "example.com"


#: Postfix verifying a recipient (reject_unverified_recipient) whose server refuses to relay for it (data/README.md).
POSTFIX_UNVERIFIED_RELAY = (
    "4.1.1 <asha@example.com>: Recipient address rejected: unverified address: host mx.example.com[192.0.2.25] said: "
    "554 5.7.1 <asha@example.com>: Relay access denied (in reply to RCPT TO command)"
)


def test_a_4xx_quoting_a_recipients_servers_relay_refusal_is_tried_again_later_not_a_set_up() -> None:
    """A relay verifying the recipient answers its own ``450 4.1.1 ... unverified address`` quoting the recipient's
    server's ``554 5.7.1 Relay access denied`` (that server's MX set-up, not the merchant's): a 4xx about this
    recipient, tried again later as any; only the relay's own 4.7.1 is a set-up."""
    result = first_of_two_e_mails(450, POSTFIX_UNVERIFIED_RELAY, "RCPT")
    assert (result.status, result.not_taken, result.sender_blocked) == ("retryable", True, None)


def test_a_temporary_auth_failure_or_a_failed_tls_handshake_keeps_its_path() -> None:
    """A 454 to AUTH (SES's "Temporary authentication failure") is tried again later, not taken, as any 4xx; a
    STARTTLS whose handshake fails is a try that may have gone, as before: neither is a set-up to fix."""
    temporary = first_of_two_e_mails(454, "4.7.0 Temporary authentication failure", "AUTH")
    assert (temporary.status, temporary.not_taken, temporary.sender_blocked) == ("retryable", True, None)
    with FakeSmtpServer(username="mailer", password="s3cret", broken_starttls=True) as smtp:
        [tls] = send(smtp_adapter(smtp.port), message(Channel.EMAIL, to="asha@example.com"))
    assert (tls.status, tls.not_taken, tls.sender_blocked) == ("retryable", False, None)
    assert "SSL" in (tls.error or ""), tls.error


@pytest.mark.parametrize(
    ("at", "text"),
    [
        ("RCPT", "5.2.121 Recipient's per hour message receive limit from specific sender exceeded"),
        ("DATA", "5.2.122 Recipient's per hour message receive limit exceeded"),
    ],
)
def test_an_exchange_recipients_hourly_limit_is_tried_again_later_not_refused(at: str, text: str) -> None:
    """Before: Exchange Online's ``550 5.2.121``/``5.2.122`` (the recipient got more messages this hour than it may)
    was a refusal of the message for good, counted against the customer's ``max_nudges``. Microsoft says to try again
    later: now it is not taken, tried again on its own (as a 4xx is), and holds no sender (data/README.md)."""
    result = first_of_two_e_mails(550, text, at)
    assert (result.status, result.not_taken, result.sender_limited) == ("retryable", True, None)


def test_smtp_server_down_is_retryable() -> None:
    with FakeSmtpServer() as smtp:
        port = smtp.port
    [result] = send(smtp_adapter(port), message(Channel.EMAIL, to="asha@example.com"))
    assert result.status == "retryable"


# --- callbacks: receipts and STOP from the fake to our router -----------------------------------------------------


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[str, list[DeliveryReceipt], list[tuple[str, Channel, str]]]]:
    receipts: list[DeliveryReceipt] = []
    opt_outs: list[tuple[str, Channel, str]] = []
    app = FastAPI()
    app.include_router(create_provider_router(receipts.append, lambda m, c, a: opt_outs.append((m, c, a))))
    server = _ThreadedServer(app)
    server.start()
    yield f"http://127.0.0.1:{server.port}", receipts, opt_outs
    server.stop()


@pytest.mark.parametrize("kind", ["gupshup", "interakt", "karix"])
def test_fake_sends_receipts_and_stop_to_the_router(
    kind: str,
    request: pytest.FixtureRequest,
    receiver: tuple[str, list[DeliveryReceipt], list[tuple[str, Channel, str]]],
) -> None:
    fake: RunningFake = request.getfixturevalue(kind)
    url, receipts, opt_outs = receiver
    receipts.clear()
    opt_outs.clear()
    receipts_url = f"{url}/v1/providers/{kind}/receipts"
    answer = httpx.post(
        fake.base_url + "/_control/receipt",
        json={"message_id": "msg-7", "status": "read", "callback_url": receipts_url},
    )
    assert answer.json() == {"callback_status": 200}
    assert [(r.provider, r.provider_message_id, r.status) for r in receipts] == [(kind, "msg-7", "read")]
    answer = httpx.post(
        fake.base_url + "/_control/inbound",
        json={
            "from": "919876543210",
            "text": "STOP",
            "callback_url": f"{url}/v1/providers/{kind}/inbound?merchant_id=m_demo",
        },
    )
    assert answer.json() == {"callback_status": 200}
    assert opt_outs == [("m_demo", Channel.WHATSAPP, "+919876543210")]


@pytest.mark.parametrize("kind", ["gupshup", "karix"])
def test_auto_receipt_after_accepting(
    kind: str,
    request: pytest.FixtureRequest,
    receiver: tuple[str, list[DeliveryReceipt], list[tuple[str, Channel, str]]],
) -> None:
    """The receipt a fake posts for a message it accepted is that send's (Karix: a WhatsApp API delivery report
    for the template message, matched by the ``mid`` it answered)."""
    fake: RunningFake = request.getfixturevalue(kind)
    url, receipts, _ = receiver
    receipts.clear()
    fake.state.auto_receipt_url = f"{url}/v1/providers/{kind}/receipts"
    if kind == "gupshup":
        [result] = send(gs_sms(fake), message(Channel.SMS))
    else:
        [result] = send(karix_whatsapp(fake, template_id="payment_reminder"), message(Channel.WHATSAPP))
    assert [(r.provider, r.provider_message_id, r.status) for r in receipts] == [
        (kind, result.provider_message_id, "delivered")
    ]


def test_fake_messages_are_json_serialisable(gupshup: RunningFake) -> None:
    send(gs_wa(gupshup), message(Channel.WHATSAPP))
    json.dumps(gupshup.state.snapshot())
