"""Channel adapters: one class per provider API, each mapping the provider's answer to a SendResult.

Error mapping, the same for every HTTP provider: 2xx with the provider's message id -> ``accepted``; 408, 425,
429 and 5xx, timeouts and connection errors -> ``retryable``; any other 4xx (bad number, opted out, bad
credentials) -> ``rejected``. A provider that answers 2xx but says "error" in its body is ``rejected``.
A ``retryable`` answer is also ``not_taken`` when the provider certainly did not take the message: it answered
408, 425 or 429, or 501, 502 or 503 (not implemented, a bad gateway, unavailable: the request was not served), or
no connection was made (refused, connect or pool timeout). A 500 (the provider may have failed after taking it), a
504 or another 5xx (a gateway's timeout: the provider behind it may have it), a read timeout or a connection lost
mid-request may have reached it.
Its ``Retry-After`` (seconds or an HTTP-date, read against the answer's ``Date``) comes with it.
Every request carries the message's idempotency key: in the provider's own reference field where it has one
(Interakt ``callbackData``, the email's ``Message-ID``) and always in an ``Idempotency-Key`` header.
Secrets come from the environment variables the merchant config names and are never logged; phone numbers and
e-mail addresses are logged masked (:func:`mask_address`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import smtplib
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import parseaddr, parsedate_to_datetime
from pathlib import Path
from typing import Any, Final

import httpx

from model.merchant_config import MerchantConfig, ProviderConfig
from model.vocab import Channel
from service.executor.channels.base import (
    ChannelAdapter,
    ChannelError,
    OutboundMessage,
    SenderBlock,
    SenderLimit,
    SendResult,
)
from service.executor.channels.templates import (
    DEFAULT_TEMPLATES_DIR,
    RenderedMessage,
    TemplateConfigError,
    TemplateStore,
    template_store,
)
from service.personal_data import mask_address, mask_addresses_in

logger = logging.getLogger("winback.executor.channels")

IDEMPOTENCY_HEADER = "Idempotency-Key"
SIGNATURE_HEADER = "Winback-Signature"
TEMPLATES_DIR_ENV = "WINBACK_TEMPLATES_DIR"
_E164 = re.compile(r"^\+?[1-9]\d{6,14}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_RETRYABLE_4XX = frozenset({408, 425, 429})
#: Answers that say the request was not served: the message was certainly not taken (the module's text).
_NOT_TAKEN = frozenset({*_RETRYABLE_4XX, 501, 502, 503})
#: The ITU-T E.164 country calling codes of one and two digits; every other code has three (codes are prefix-free).
_SHORT_CALLING_CODE = re.compile(r"^(1|7|2[07]|3[0-469]|4[013-9]|5[1-8]|6[0-6]|8[1246]|9[0-58])")


def phone_digits(to: str) -> str | None:
    """The E.164 number without ``+`` (as Gupshup and Karix expect it), or None when ``to`` is not one."""
    compact = re.sub(r"[\s\-()]", "", to)
    return compact.lstrip("+") if _E164.match(compact) else None


def split_calling_code(digits: str) -> tuple[str, str]:
    """Split an E.164 number (digits only) into its country calling code and national number."""
    match = _SHORT_CALLING_CODE.match(digits)
    size = len(match.group(1)) if match else 3
    return digits[:size], digits[size:]


def sign_payload(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">``, the scheme of CONTRACT.md section 5."""
    t = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def verify_signature(secret: str, body: bytes, header: str, tolerance_seconds: int = 300) -> bool:
    """Check a ``Winback-Signature`` header against the raw body (used by receivers and the fake push server)."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        t = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - t) > tolerance_seconds:
        return False
    expected = sign_payload(secret, body, t).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _http_failure(response: httpx.Response, provider: str) -> SendResult | None:
    """The SendResult of a non-2xx answer, or None for a 2xx the caller must still read."""
    code = response.status_code
    if 200 <= code < 300:
        return None
    body = _json(response)
    detail = ""
    if isinstance(body, dict):
        detail = str(body.get("message") or body.get("error") or body.get("details") or "")
    error = f"{provider} answered HTTP {code}" + (f": {detail[:200]}" if detail else "")
    if code >= 500 or code in _RETRYABLE_4XX:
        return SendResult(
            status="retryable",
            error=error,
            not_taken=code in _NOT_TAKEN,
            retry_after_seconds=retry_after_seconds(response),
        )
    return SendResult(status="rejected", error=error)


#: The longest ``Retry-After`` read, in seconds (a day): the executor honours far less, and a longer one (up to
#: hundreds of digits) would overflow a ``timedelta``.
MAX_RETRY_AFTER_SECONDS = 86_400.0


def retry_after_seconds(response: httpx.Response) -> float | None:
    """The answer's ``Retry-After`` in seconds (0 to ``MAX_RETRY_AFTER_SECONDS``), from delta-seconds or an
    HTTP-date (against the answer's own ``Date`` when it has one, so the two clocks need not agree); None when
    absent or unreadable. Only ASCII digits are delta-seconds (``"²".isdigit()`` is true, and ``float`` refuses it)."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_SECONDS)
    until = _http_date(value)
    if until is None:
        return None
    now = _http_date(response.headers.get("date", "")) or datetime.now(UTC)
    return min(max((until - now).total_seconds(), 0.0), MAX_RETRY_AFTER_SECONDS)


def _http_date(value: str) -> datetime | None:
    """An HTTP-date (always GMT) as an aware datetime, or None when ``value`` is not one."""
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


class _Adapter:
    """What every adapter shares: identity, templates, rendering and outcome logging."""

    channel: Channel
    provider: str

    def __init__(self, merchant_id: str, channel: Channel, templates: TemplateStore) -> None:
        self.merchant_id = merchant_id
        self.channel = channel
        self.templates = templates

    def _render(self, message: OutboundMessage) -> RenderedMessage:
        return self.templates.render(message.merchant_id, self.channel, message.locale, message.variables)

    def _log(self, message: OutboundMessage, result: SendResult) -> SendResult:
        logger.info(
            "nudge %s via %s/%s to %s: %s",
            message.nudge_id,
            self.channel.value,
            self.provider,
            mask_address(message.to),
            result.status,
            extra={
                "merchant_id": message.merchant_id,
                "order_id": message.order_id,
                "nudge_id": message.nudge_id,
                "send_status": result.status,
                "send_error": result.error,
            },
        )
        return result

    async def send(self, message: OutboundMessage) -> SendResult:
        """Render the message and deliver it; every failure becomes a SendResult, never an exception."""
        try:
            rendered = self._render(message)
        except TemplateConfigError as exc:
            return self._log(message, SendResult(status="rejected", error=f"template: {exc}"))
        try:
            result = await self._deliver(message, rendered)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:  # the request never went
            result = SendResult(status="retryable", error=f"{self.provider}: {type(exc).__name__}", not_taken=True)
        except httpx.TimeoutException:
            result = SendResult(status="retryable", error=f"{self.provider}: timed out")
        except httpx.TransportError as exc:
            result = SendResult(status="retryable", error=f"{self.provider}: {type(exc).__name__}")
        except httpx.HTTPError as exc:  # answered, but unreadable (a body its Content-Encoding cannot decode ...)
            result = SendResult(status="retryable", error=f"{self.provider}: unreadable answer ({type(exc).__name__})")
        if result.error:
            result = result.model_copy(update={"error": mask_addresses_in(result.error)})
        return self._log(message, result)

    async def _deliver(self, message: OutboundMessage, rendered: RenderedMessage) -> SendResult:
        raise NotImplementedError


class _HttpAdapter(_Adapter):
    def __init__(
        self, merchant_id: str, channel: Channel, templates: TemplateStore, http: httpx.AsyncClient, base_url: str
    ) -> None:
        super().__init__(merchant_id, channel, templates)
        self.http = http
        self.base_url = base_url.rstrip("/")

    async def _post_json(
        self, path: str, payload: Any, message: OutboundMessage, headers: Mapping[str, str]
    ) -> tuple[SendResult | None, Any]:
        """POST ``payload`` as JSON with the message's idempotency key: (the failure of a non-2xx answer, else
        None; the answer's JSON body, or None)."""
        response = await self.http.post(
            self.base_url + path, json=payload, headers={**headers, IDEMPOTENCY_HEADER: message.idempotency_key}
        )
        return _http_failure(response, self.provider), _json(response)

    def _phone(self, message: OutboundMessage) -> str | SendResult:
        digits = phone_digits(message.to)
        if digits is None:
            return SendResult(status="rejected", error=f"not an E.164 phone number: {mask_address(message.to)}")
        return digits


class _WhatsAppTemplateAdapter(_HttpAdapter):
    """A WhatsApp provider that sends the merchant's approved template, authenticated by an API key."""

    def __init__(
        self,
        merchant_id: str,
        templates: TemplateStore,
        http: httpx.AsyncClient,
        base_url: str,
        api_key: str,
        template_id: str | None = None,
        source: str | None = None,
    ) -> None:
        super().__init__(merchant_id, Channel.WHATSAPP, templates, http, base_url)
        self._api_key = api_key
        self.template_id = template_id
        #: The merchant's WhatsApp number, digits only, for a provider that is told the sender.
        self.source = (source or "").lstrip("+")

    def _template(self, message: OutboundMessage) -> str:
        """The approved template's id or name at the provider (config ``template_id``), else the message's."""
        return self.template_id or message.template_id


class GupshupWhatsAppAdapter(_WhatsAppTemplateAdapter):
    """Gupshup WhatsApp API: ``POST /wa/api/v1/template/msg`` (template params) or ``/wa/api/v1/msg`` (text).

    Form-encoded, ``apikey`` header; answer ``{"status": "submitted", "messageId": ...}``.
    """

    provider = "gupshup"

    def __init__(
        self,
        merchant_id: str,
        templates: TemplateStore,
        http: httpx.AsyncClient,
        base_url: str,
        api_key: str,
        source: str,
        app_name: str | None,
        template_id: str | None = None,
    ) -> None:
        super().__init__(merchant_id, templates, http, base_url, api_key, template_id, source)
        self.app_name = app_name

    async def _deliver(self, message: OutboundMessage, rendered: RenderedMessage) -> SendResult:
        destination = self._phone(message)
        if isinstance(destination, SendResult):
            return destination
        form = {"channel": "whatsapp", "source": self.source, "destination": destination}
        if self.app_name:
            form["src.name"] = self.app_name
        if rendered.params:
            path = "/wa/api/v1/template/msg"
            # Gupshup takes every variable of the template in one ``params`` list, in order of occurrence: the
            # body's, then the URL button's dynamic suffix (the link token), else the customer gets no link.
            params = [*rendered.params, *rendered.button_params]
            form["template"] = json.dumps({"id": self._template(message), "params": params})
        else:
            path = "/wa/api/v1/msg"
            form["message"] = json.dumps({"type": "text", "text": rendered.text})
        response = await self.http.post(
            self.base_url + path,
            data=form,
            headers={"apikey": self._api_key, IDEMPOTENCY_HEADER: message.idempotency_key},
        )
        failure = _http_failure(response, self.provider)
        if failure is not None:
            return failure
        body = _json(response)
        if isinstance(body, dict) and body.get("status") == "submitted" and body.get("messageId"):
            return SendResult(status="accepted", provider_message_id=str(body["messageId"]))
        return SendResult(status="rejected", error=f"gupshup: unexpected answer {str(body)[:200]}")


class GupshupSmsAdapter(_HttpAdapter):
    """Gupshup Enterprise SMS: ``POST /GatewayAPI/rest`` with ``method=SendMessage`` (form-encoded, v1.1, json).

    The answer is HTTP 200 either way; ``{"response": {"status": "success"|"error", "id", "details"}}`` decides.
    With the merchant's DLT ids (India, TRAI) the form carries ``principalEntityId`` and ``dltTemplateId``.
    """

    provider = "gupshup"

    def __init__(
        self,
        merchant_id: str,
        templates: TemplateStore,
        http: httpx.AsyncClient,
        base_url: str,
        userid: str,
        password: str,
        mask: str | None,
        dlt_entity_id: str | None = None,
        dlt_template_id: str | None = None,
    ) -> None:
        super().__init__(merchant_id, Channel.SMS, templates, http, base_url)
        self._userid = userid
        self._password = password
        self.mask = mask
        self.dlt_entity_id = dlt_entity_id
        self.dlt_template_id = dlt_template_id

    async def _deliver(self, message: OutboundMessage, rendered: RenderedMessage) -> SendResult:
        send_to = self._phone(message)
        if isinstance(send_to, SendResult):
            return send_to
        form = {
            "method": "SendMessage",
            "send_to": send_to,
            "msg": rendered.text,
            "msg_type": "TEXT" if rendered.text.isascii() else "Unicode_Text",
            "userid": self._userid,
            "password": self._password,
            "auth_scheme": "plain",
            "v": "1.1",
            "format": "json",
        }
        if self.mask:
            form["mask"] = self.mask
        if self.dlt_entity_id and self.dlt_template_id:
            form["principalEntityId"] = self.dlt_entity_id
            form["dltTemplateId"] = self.dlt_template_id
        response = await self.http.post(
            self.base_url + "/GatewayAPI/rest", data=form, headers={IDEMPOTENCY_HEADER: message.idempotency_key}
        )
        failure = _http_failure(response, self.provider)
        if failure is not None:
            return failure
        body = _json(response)
        answer = body.get("response") if isinstance(body, dict) else None
        if isinstance(answer, dict) and str(answer.get("status", "")).lower() == "success" and answer.get("id"):
            return SendResult(status="accepted", provider_message_id=str(answer["id"]))
        if isinstance(answer, dict):
            return SendResult(
                status="rejected", error=f"gupshup sms error {answer.get('id', '?')}: {answer.get('details', '')}"
            )
        return SendResult(status="rejected", error=f"gupshup sms: unexpected answer {str(body)[:200]}")


def whatsapp_language_code(locale: str) -> str:
    """A locale (``hi``, ``en-US``, ``en_us``) in the form of WhatsApp's template language codes: the language in
    lower case, a region after an underscore in upper case (``hi``, ``en_US``, ``pt_BR``)."""
    language, _, region = locale.replace("-", "_").partition("_")
    return f"{language.lower()}_{region.upper()}" if region else language.lower()


class InteraktAdapter(_WhatsAppTemplateAdapter):
    """Interakt: ``POST /v1/public/message/`` JSON, ``Authorization: Basic <api key>``, type ``Template``.

    ``callbackData`` carries the idempotency key back in Interakt's delivery webhooks.
    """

    provider = "interakt"

    async def _deliver(self, message: OutboundMessage, rendered: RenderedMessage) -> SendResult:
        digits = self._phone(message)
        if isinstance(digits, SendResult):
            return digits
        calling_code, national = split_calling_code(digits)
        template: dict[str, Any] = {
            "name": self._template(message),
            # The approved template's language, as WhatsApp names it: that of the file the values were rendered
            # from (a customer's ``hi-IN`` is sent the ``hi`` template, a ``fr`` one the ``en`` fallback).
            "languageCode": whatsapp_language_code(rendered.locale),
            "bodyValues": list(rendered.params),
        }
        if rendered.button_params:
            template["buttonValues"] = {"0": list(rendered.button_params)}
        payload = {
            "countryCode": f"+{calling_code}",
            "phoneNumber": national,
            "callbackData": message.idempotency_key,
            "type": "Template",
            "template": template,
        }
        failure, body = await self._post_json(
            "/v1/public/message/", payload, message, {"Authorization": f"Basic {self._api_key}"}
        )
        if failure is not None:
            return failure
        if isinstance(body, dict) and body.get("result") is True and body.get("id"):
            return SendResult(status="accepted", provider_message_id=str(body["id"]))
        detail = body.get("message") if isinstance(body, dict) else body
        return SendResult(status="rejected", error=f"interakt: {str(detail)[:200]}")


#: Where Karix's WhatsApp API answers (template messages), unless the config's ``base_url`` says otherwise.
KARIX_WHATSAPP_BASE_URL = "https://rcmapi.instaalerts.zone"
#: The delivery-report webhook a Karix WhatsApp send names (``message.preferences.webHookDNId``). Karix's WhatsApp
#: API takes no callback URL per message: the URL (the one ``winback executor callback-url --provider karix`` prints)
#: is registered with Karix for the account, and each message names that webhook by the id Karix gave it. ``"1001"``
#: is the id every public integration with the API we found sends (data/README.md); Karix's own reference, which
#: would say whether it is every account's first webhook, could not be read.
KARIX_DEFAULT_WEBHOOK_DN_ID = "1001"


class KarixWhatsAppTemplateAdapter(_WhatsAppTemplateAdapter):
    """Karix's WhatsApp API: ``POST /services/rcm/sendMessage`` JSON, header ``Authentication: Bearer <api key>``.

    Sends the merchant's approved template (config ``template_id``): ``content.type`` ``TEMPLATE`` with
    ``template.parameterValues`` (``{"0": ..., "1": ...}``, the body's values in order), or, when the template has a
    URL button whose dynamic part is the link token, ``MEDIA_TEMPLATE`` with ``mediaTemplate.bodyParameterValues``
    and ``buttons.actions``. ``recipient.reference.cust_ref`` carries the idempotency key, and
    ``preferences.webHookDNId`` the delivery-report webhook (``KARIX_DEFAULT_WEBHOOK_DN_ID``), without which Karix
    posts no report of the message. Answer ``{"statusCode": "200", "statusDesc": "Successfully Accepted"}``, with
    the message's id as ``mid`` when it gives one (else the idempotency key stands for it, which the report echoes
    as ``cust_ref``). Its shape: data/README.md.
    """

    provider = "karix"

    async def _deliver(self, message: OutboundMessage, rendered: RenderedMessage) -> SendResult:
        digits = self._phone(message)
        if isinstance(digits, SendResult):
            return digits
        body_values = {str(i): value for i, value in enumerate(rendered.params)}
        content: dict[str, Any] = {"preview_url": False, "shorten_url": False}
        if rendered.button_params:
            actions = [
                {"type": "url", "index": str(i), "payload": value} for i, value in enumerate(rendered.button_params)
            ]
            content["type"] = "MEDIA_TEMPLATE"
            content["mediaTemplate"] = {
                "templateId": self._template(message),
                "bodyParameterValues": body_values,
                "buttons": {"actions": actions},
            }
        else:
            content["type"] = "TEMPLATE"
            content["template"] = {"templateId": self._template(message), "parameterValues": body_values}
        payload = {
            "message": {
                "channel": "WABA",
                "content": content,
                "recipient": {
                    "to": digits,
                    "recipient_type": "individual",
                    "reference": {"cust_ref": message.idempotency_key},
                },
                "sender": {"from": self.source},
                # No merchant-config key names another webhook yet (a proposal): every send names the default one.
                "preferences": {"webHookDNId": KARIX_DEFAULT_WEBHOOK_DN_ID},
            },
            "metaData": {"version": "v1.0.9"},
        }
        failure, body = await self._post_json(
            "/services/rcm/sendMessage", payload, message, {"Authentication": f"Bearer {self._api_key}"}
        )
        if failure is not None:
            return failure
        if isinstance(body, dict) and str(body.get("statusCode")) == "200":
            return SendResult(status="accepted", provider_message_id=str(body.get("mid") or message.idempotency_key))
        detail = body.get("statusDesc") if isinstance(body, dict) else body
        return SendResult(status="rejected", error=f"karix: {str(detail)[:200]}")


class KarixAdapter(_HttpAdapter):
    """Karix messaging API v2: ``POST /message/`` JSON with HTTP Basic (account uid, token), ``api-version: 2.0``.

    Body ``{"channel", "source", "destination": [..], "content": {"text"}}``; answer 202 with ``objects[0].uid``.
    """

    provider = "karix"

    def __init__(
        self,
        merchant_id: str,
        channel: Channel,
        templates: TemplateStore,
        http: httpx.AsyncClient,
        base_url: str,
        account_uid: str,
        token: str,
        source: str,
    ) -> None:
        super().__init__(merchant_id, channel, templates, http, base_url)
        self._auth = httpx.BasicAuth(account_uid, token)
        self.source = source

    async def _deliver(self, message: OutboundMessage, rendered: RenderedMessage) -> SendResult:
        digits = self._phone(message)
        if isinstance(digits, SendResult):
            return digits
        payload = {
            "channel": self.channel.value,
            "source": self.source,
            "destination": [f"+{digits}"],
            "content": {"text": rendered.text},
        }
        response = await self.http.post(
            self.base_url + "/message/",
            json=payload,
            auth=self._auth,
            headers={"api-version": "2.0", IDEMPOTENCY_HEADER: message.idempotency_key},
        )
        failure = _http_failure(response, self.provider)
        if failure is not None:
            return failure
        body = _json(response)
        objects = body.get("objects") if isinstance(body, dict) else None
        first = objects[0] if isinstance(objects, list) and objects and isinstance(objects[0], dict) else None
        if first is None or not first.get("uid"):
            return SendResult(status="rejected", error=f"karix: unexpected answer {str(body)[:200]}")
        if first.get("status") in {"failed", "rejected", "undelivered"}:
            error = first.get("error") or {}
            detail = error.get("message", "") if isinstance(error, dict) else str(error)
            return SendResult(status="rejected", provider_message_id=str(first["uid"]), error=f"karix: {detail}")
        return SendResult(status="accepted", provider_message_id=str(first["uid"]))


class PushWebhookAdapter(_HttpAdapter):
    """POSTs the rendered notification as JSON to the merchant's push endpoint, HMAC-signed like its webhooks."""

    provider = "push_webhook"

    def __init__(
        self, merchant_id: str, templates: TemplateStore, http: httpx.AsyncClient, url: str, secret: str
    ) -> None:
        super().__init__(merchant_id, Channel.PUSH, templates, http, url)
        self._secret = secret

    async def _deliver(self, message: OutboundMessage, rendered: RenderedMessage) -> SendResult:
        body = json.dumps(
            {
                "idempotency_key": message.idempotency_key,
                "merchant_id": message.merchant_id,
                "order_id": message.order_id,
                "nudge_id": message.nudge_id,
                "device_token": message.to,
                "locale": message.locale,
                "title": rendered.title,
                "body": rendered.text,
                "link_url": message.variables.get("link_url"),
            },
            separators=(",", ":"),
        ).encode()
        response = await self.http.post(
            self.base_url,
            content=body,
            headers={
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign_payload(self._secret, body),
                IDEMPOTENCY_HEADER: message.idempotency_key,
            },
        )
        failure = _http_failure(response, self.provider)
        if failure is not None:
            return failure
        answer = _json(response)
        provider_id = answer.get("id") if isinstance(answer, dict) else None
        return SendResult(status="accepted", provider_message_id=str(provider_id or message.idempotency_key))


def message_id_for(idempotency_key: str, sender: str) -> str:
    """The e-mail ``Message-ID`` of a nudge: derived from its idempotency key, so a re-send has the same one."""
    domain = sender.rpartition("@")[2] or "winback.invalid"
    return f"<{hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]}@{domain}>"


_ENHANCED_STATUS = re.compile(r"\b[245]\.\d{1,3}\.\d{1,3}\b")


def smtp_sender_limit(code: int, reply: str) -> SenderLimit | None:
    """What an SMTP relay's answer ``code`` ``reply`` says the merchant's sender is over, or None when it is about
    something else (this message, its recipient, the relay's own trouble). From the providers' own texts
    (data/README.md):

    - Amazon SES: ``454 Throttling failure: Maximum sending rate exceeded`` (``rate``) and ``454 Throttling failure:
      Daily message quota exceeded`` (``daily_quota``, a rolling 24 hours). SES drops the message, queues nothing.
    - Gmail and Google Workspace: ``421 4.7.28`` (mail from the sender's IP or domain rate limited), ``421 4.7.0``
      saying the sender's IP is rate limited or showed an unusual rate of mail, ``450 4.2.1 Peak SMTP relay limit
      exceeded`` (all ``rate``, temporary); ``550 5.4.5 Daily user sending limit exceeded``, ``550 5.4.5 Daily SMTP
      relay limit exceeded for user`` and ``550 5.7.1 Daily SMTP relay limit exceeded for customer`` (``daily_quota``:
      a 5xx, yet the sender can send again within 24 hours, so not a refusal of the message).
    - Microsoft Exchange Online (its NDR codes): ``4.7.500``-``4.7.699`` and ``4.7.850``-``4.7.899`` "Access denied,
      please try again later" (sending, or the sending IP, temporarily restricted), ``5.7.508`` (the sender's IP range
      exceeded permitted limits: too many messages in too short a time), and Exchange Server's ``421 4.4.2`` "Message
      submission rate for this client has exceeded the configured limit" (all ``rate``); ``5.1.90`` (the daily limit
      for message recipients), ``5.2.2`` "Submission quota exceeded" and ``5.7.232``/``5.7.233`` (the tenant's
      external recipient rate limit, a rolling 24 hours) (``daily_quota``).

    Not a sender's limit: ``450 4.2.1`` "the user you are trying to contact is receiving mail too quickly" (that
    recipient only), a refused recipient (``550 5.1.1``), any other 4xx (the message is tried again on its own).
    The bans of the sender (Exchange Online's ``5.1.8``, ``5.7.501``-``5.7.503``, ``5.7.511``, ``5.7.606``-``5.7.649``,
    ``5.7.705``, ``5.7.708``, ``5.7.750``; Amazon SES's paused account; Google's ``5.7.0 Mail Sending denied``) end
    only when an admin acts: not a limit but a ban (``smtp_sender_banned``); Exchange Online's recipient limits
    (``432 4.3.2``, ``5.2.121``, ``5.2.122``: ``smtp_recipient_busy``) are about that recipient."""
    text = " ".join(reply.split()).lower()
    if code == 454 and "throttling failure" in text:
        return "daily_quota" if "daily message quota" in text else "rate"
    status = _enhanced_status(text)
    daily = "daily" in text and ("limit exceeded" in text or "quota exceeded" in text)
    if 500 <= code < 600 and status in ("5.4.5", "5.7.1") and daily:
        return "daily_quota"
    if code == 421 and (
        status == "4.7.28" or (status == "4.7.0" and ("rate limited" in text or "unusual rate" in text))
    ):
        return "rate"
    if code == 450 and status == "4.2.1" and "relay limit" in text:
        return "rate"
    if 500 <= code < 600 and (status in _EXCHANGE_DAILY or (status == "5.2.2" and "submission quota" in text)):
        return "daily_quota"
    if 400 <= code < 500 and _in_ranges(status, _EXCHANGE_RESTRICTED):
        return "rate"
    if (500 <= code < 600 and status == "5.7.508") or (code == 421 and "submission rate" in text):
        return "rate"
    return None


#: Exchange Online's daily limits of a sender (data/README.md): the daily limit for message recipients (5.1.90) and
#: the tenant's external recipient rate limit (5.7.232 for a trial tenant, 5.7.233), both over a rolling 24 hours.
_EXCHANGE_DAILY: Final = frozenset({"5.1.90", "5.7.232", "5.7.233"})
#: Exchange Online's "Access denied, please try again later": sending (4.7.500-699) or the sending IP (4.7.850-899)
#: temporarily restricted, "lifted shortly" (data/README.md).
_EXCHANGE_RESTRICTED: Final = ((4, 7, 500, 699), (4, 7, 850, 899))
#: Exchange Online's 5xx answers that a recipient takes no more this hour (data/README.md): from this sender
#: (5.2.121) or from all (5.2.122). Its throttled recipient mailbox (432 4.3.2) is a 4xx, tried later as any is.
_EXCHANGE_RECIPIENT_BUSY: Final = frozenset({"5.2.121", "5.2.122"})


#: Exchange Online's bans of the merchant's sender, which end only when an admin acts or asks support (data/README.md):
#: a bad outbound sender (5.1.8), a banned sender (5.7.501-503, 5.7.511), a banned sending IP (5.7.606-649), the
#: tenant over its threshold (5.7.705), traffic not accepted from its IP (5.7.708), a client blocked from sending
#: from unregistered domains (5.7.750).
_EXCHANGE_BANS: Final = (
    (5, 1, 8, 8), (5, 7, 501, 503), (5, 7, 511, 511), (5, 7, 606, 649), (5, 7, 705, 705), (5, 7, 708, 708),
    (5, 7, 750, 750),
)  # fmt: skip


#: Amazon SES's answer when it has paused the AWS account's sending (its sending review process; data/README.md):
#: "554 Message rejected: Sending paused for this account" ("Sending suspended" in its older wording), which its
#: error list calls "Account is paused". Only a request to AWS, once the cause is fixed, ends it.
_SES_PAUSED: Final = ("sending paused for this account", "sending suspended for this account", "account is paused")


def smtp_sender_banned(code: int, reply: str) -> bool:
    """Whether an SMTP relay's 5xx answer ``code`` ``reply`` says the merchant's sender (its account, sending IP or
    domain) is banned until an admin acts: every message of the merchant would be refused alike, whoever its
    recipient, so the channel is down for the merchant, not this message refused. From the providers' own texts
    (data/README.md):

    - Microsoft Exchange Online: its bans of the sender (``_EXCHANGE_BANS``).
    - Amazon SES: the account's sending paused (``_SES_PAUSED``).
    - Google (Gmail's SMTP, Workspace's SMTP relay): ``550 5.7.0 Mail Sending denied``, the sender account disabled
      or not registered in the Workspace domain.

    Not a ban but a set-up to fix (``smtp_set_up_wrong``): Google's ``5.7.0 Mail relay denied`` and ``5.7.1 Invalid
    credentials for relay``, wrong credentials (``535``), SES's unverified sender. A ban answered at RCPT TO may be
    the recipient's provider's only (``SendResult.rcpt_domain``)."""
    if not 500 <= code < 600:
        return False
    text = " ".join(reply.split()).lower()
    status = _enhanced_status(text)
    if _in_ranges(status, _EXCHANGE_BANS):
        return True
    if status == "5.7.0" and "mail sending denied" in text:
        return True
    return any(paused in text for paused in _SES_PAUSED)


#: The answers to AUTH (RFC 4954, section 6) that say the merchant's credentials or its account's settings are wrong:
#: 530 authentication required (none was given), 534 the mechanism too weak (Gmail's "Application-specific password
#: required", 534 5.7.9), 535 the credentials invalid (5.7.8; Exchange Online's 5.7.3 and 5.7.139 "Authentication
#: unsuccessful", SMTP AUTH turned off for the mailbox or tenant; SES's "Authentication Credentials Invalid" and
#: "Account not subscribed to SES"). A 454 "Temporary authentication failure" is a 4xx: tried again later.
_AUTH_REFUSED: Final = frozenset({530, 534, 535})
#: A relay refusing to pass the merchant's mail on (data/README.md): Postfix's reject_unauth_destination, "554 5.7.1
#: <address>: Relay access denied" (the client neither in its mynetworks nor logged in), Exchange's "550 5.7.1 Unable
#: to relay" and Exchange Online's "5.7.64 TenantAttribution; Relay Access Denied" (its inbound connector no longer
#: matches the merchant's server).
_RELAY_REFUSED: Final = ("relay access denied", "unable to relay")
#: Exchange's refusal of a From address the login may not send as (data/README.md): Exchange Online's "550 5.7.60
#: SMTP; Client does not have permissions to send as this sender", Exchange Server's "550 5.7.1 Client does not have
#: permission to send as this sender" (its SmtpResponse.SendAsDenied). Only an admin granting the right ends it.
_SEND_AS_DENIED = re.compile(r"does not have permissions? to send as this sender")
#: Amazon SES's answer naming the identities (addresses or domains) it has not verified (data/README.md).
_SES_UNVERIFIED = re.compile(
    r"email address is not verified\. the following identities failed the check in region [^:]*:(.*)"
)


def smtp_set_up_wrong(code: int, reply: str, sender: str) -> bool:
    """Whether an SMTP relay's 5xx answer ``code`` ``reply`` says the merchant's SMTP set-up is wrong (``sender``:
    the merchant's From address): every message of the merchant is refused alike until an admin fixes the merchant's
    settings or its account at the provider, so the channel is down for the merchant, not this message refused. From
    the providers' own texts (data/README.md):

    - Any refused AUTH (``_AUTH_REFUSED``: wrong credentials, SMTP AUTH turned off at Exchange Online).
    - Google's SMTP relay: ``5.7.0 Mail relay denied`` and ``5.7.1 Invalid credentials for relay`` (the sending IP or
      domain not registered in the relay's settings).
    - The merchant's own relay refusing to pass its mail on (``_RELAY_REFUSED``: Postfix's ``Relay access denied``,
      Exchange's ``Unable to relay``). Answered at RCPT TO, as Postfix does, it may be a recipient's server's that the
      relay passed RCPT through to: ``SendResult.rcpt_domain`` tells the executor to wait for a second domain.
      Postfix's default 4xx form, ``454 4.7.1``, is ``smtp_relay_deferred``'s.
    - Exchange's ``5.7.60 ... Client does not have permissions to send as this sender`` (``_SEND_AS_DENIED``): the
      login may not send as the merchant's From address until an admin grants it the right.
    - Amazon SES: ``554 Access denied: User ... is not authorized to perform ses:SendRawEmail`` (the IAM policy of
      the credentials' user), ``Account not subscribed to SES``, and ``554 Message rejected: Email address is not
      verified`` only when the identities it names include the sender's address or domain: in SES's sandbox every
      recipient must be verified too, and one named alone is that recipient's refusal. A list cut short (``...``)
      not naming the sender is taken as the recipient's."""
    if not 500 <= code < 600:
        return False
    if code in _AUTH_REFUSED:
        return True
    text = " ".join(reply.split()).lower()
    status = _enhanced_status(text)
    if (status == "5.7.0" and "mail relay denied" in text) or (
        status == "5.7.1" and "invalid credentials for relay" in text
    ):
        return True
    if ("not authorized to perform ses:" in text) or "account not subscribed to ses" in text:
        return True
    if any(refused in text for refused in _RELAY_REFUSED) or _SEND_AS_DENIED.search(text):
        return True
    unverified = _SES_UNVERIFIED.search(text)
    if unverified is None:
        return False
    address = parseaddr(sender)[1].lower()
    named = {identity.strip().rstrip(".").strip() for identity in unverified.group(1).split(",")}
    return bool(address) and (address in named or address.rpartition("@")[2] in named)


#: The status of a relay's own deferral of relaying: Postfix's defer_unauth_destination answers 4.7.1 (data/README.md).
_RELAY_DEFERRED_STATUS: Final = frozenset({"4.7.1", ""})


def smtp_relay_deferred(code: int, reply: str) -> bool:
    """Whether a 4xx answer ``code`` ``reply`` to RCPT TO is the merchant's relay putting off relaying for it, as
    Postfix's default relay rule does (``defer_unauth_destination``: ``454 4.7.1 <address>: Relay access denied``,
    data/README.md): the merchant's client is neither in the relay's networks nor logged in, and every recipient is
    refused alike until an admin fixes the merchant's settings (or the relay's). Postfix answers a 4xx so that a
    mistake in its own settings bounces no mail; for the merchant it is the same set-up to fix as the 554, and tried
    again message after message it only waited for the outage breaker. Only the relay's own status (4.7.1, or none)
    counts: a relay verifying a recipient answers ``450 4.1.1 ... unverified address: host ... said: 554 5.7.1 ...
    Relay access denied``, the recipient's server's words about that recipient, a 4xx as any. Answered at RCPT TO
    only, the executor takes e-mail down once a second domain's recipient is refused so (``SendResult.rcpt_domain``)."""
    if not 400 <= code < 500:
        return False
    text = " ".join(reply.split()).lower()
    return "relay access denied" in text and _enhanced_status(text) in _RELAY_DEFERRED_STATUS


def _in_ranges(status: str, ranges: tuple[tuple[int, int, int, int], ...]) -> bool:
    parts = status.split(".")
    if len(parts) != 3:
        return False
    klass, subject, detail = map(int, parts)
    return any(klass == k and subject == s and low <= detail <= high for k, s, low, high in ranges)


def _enhanced_status(reply: str) -> str:
    found = _ENHANCED_STATUS.search(reply)
    return found.group(0) if found else ""


def smtp_recipient_busy(code: int, reply: str) -> bool:
    """Whether a 5xx answer ``code`` ``reply`` is Exchange Online's saying the recipient takes no more messages this
    hour (``5.2.121`` from this sender, ``5.2.122`` from all): the message is tried again later, as a 4xx is, not
    refused for good ("the automated mailer or sender should try again later": data/README.md)."""
    return 500 <= code < 600 and _enhanced_status(reply) in _EXCHANGE_RECIPIENT_BUSY


def _reply_text(reply: bytes | str) -> str:
    return reply.decode(errors="replace") if isinstance(reply, bytes) else reply


def _try_later(code: int, reply: str) -> bool:
    """Whether an SMTP answer about this message says to try it again later (a 4xx; a recipient busy for the hour)."""
    return 400 <= code < 500 or smtp_recipient_busy(code, reply)


def _sender_limited(code: int, reply: str, sender: str, recipient: str | None = None) -> SendResult | None:
    """The SendResult of an SMTP answer saying the merchant's sender is over a limit (``smtp_sender_limit``): not
    taken, to be held with every other message of the sender; or blocked until an admin acts, banned
    (``smtp_sender_banned``) or set up wrong (``smtp_set_up_wrong``, ``sender``: the merchant's From): not taken,
    the merchant's channel down; None for any other answer. ``recipient``: the address the answer refused at RCPT
    TO, whose domain a block names (``SendResult.rcpt_domain``): it may be that domain's provider's only. A relay
    putting off relaying for the merchant at RCPT TO (``smtp_relay_deferred``, a 4xx) is a set-up too."""
    set_up_wrong = smtp_set_up_wrong(code, reply, sender) or (
        recipient is not None and smtp_relay_deferred(code, reply)
    )
    blocked: SenderBlock | None = "ban" if smtp_sender_banned(code, reply) else "setup" if set_up_wrong else None
    if blocked is not None:
        return SendResult(
            status="retryable",
            error=f"smtp: {code} {reply}",
            not_taken=True,
            sender_blocked=blocked,
            rcpt_domain=None if recipient is None else recipient.rpartition("@")[2].strip().lower(),
        )
    limit = smtp_sender_limit(code, reply)
    if limit is None:
        return None
    return SendResult(status="retryable", error=f"smtp: {code} {reply}", not_taken=True, sender_limited=limit)


class SmtpAdapter(_Adapter):
    """E-mail through an SMTP relay (stdlib smtplib in a worker thread); STARTTLS when the server offers it."""

    provider = "smtp"

    def __init__(
        self,
        merchant_id: str,
        templates: TemplateStore,
        host: str,
        port: int,
        sender: str,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        super().__init__(merchant_id, Channel.EMAIL, templates)
        self.host = host
        self.port = port
        self.sender = sender
        self._username = username
        self._password = password
        self.timeout = timeout

    async def _deliver(self, message: OutboundMessage, rendered: RenderedMessage) -> SendResult:
        if not _EMAIL.match(message.to):
            return SendResult(status="rejected", error=f"not an e-mail address: {mask_address(message.to)}")
        email = EmailMessage()
        email["From"] = self.sender
        email["To"] = message.to
        email["Subject"] = rendered.subject or ""
        email["Message-ID"] = message_id_for(message.idempotency_key, self.sender)
        email["X-Winback-Idempotency-Key"] = message.idempotency_key
        unsubscribe = message.variables.get("unsubscribe_url")
        if unsubscribe:  # one-click unsubscribe in the mail client (RFC 2369, RFC 8058: a POST to the URL)
            email["List-Unsubscribe"] = f"<{unsubscribe}>"
            email["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        email.set_content(rendered.text)
        return await asyncio.to_thread(self._send_sync, email)

    def _send_sync(self, email: EmailMessage) -> SendResult:
        message_id = str(email["Message-ID"])
        try:
            with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
                smtp.ehlo()
                if smtp.has_extn("starttls"):
                    smtp.starttls()
                    smtp.ehlo()
                if self._username and self._password:
                    self._login(smtp)
                smtp.send_message(email)
        except smtplib.SMTPRecipientsRefused as exc:
            # A relay may answer its sender's throttling at RCPT too: then it is about the sender, not the recipient.
            for recipient, (code, answer) in exc.recipients.items():
                limited = _sender_limited(code, _reply_text(answer), self.sender, recipient)
                if limited is not None:
                    return limited
            codes = [code for code, _ in exc.recipients.values()]
            later = all(_try_later(code, _reply_text(answer)) for code, answer in exc.recipients.values())
            status = "retryable" if later else "rejected"
            error = f"smtp: recipient refused ({', '.join(map(str, codes))})"
            return SendResult(status=status, error=error, not_taken=status == "retryable")
        except smtplib.SMTPResponseException as exc:  # a 4xx answer is the server's "not taken, try later"
            reply = _reply_text(exc.smtp_error)
            limited = _sender_limited(exc.smtp_code, reply, self.sender)
            if limited is not None:
                return limited
            status = "retryable" if _try_later(exc.smtp_code, reply) else "rejected"
            return SendResult(status=status, error=f"smtp: {exc.smtp_code} {reply}", not_taken=status == "retryable")
        except _NoAuthError as exc:
            error = f"smtp: the relay offers no way to log in with the merchant's credentials ({exc})"
            return SendResult(status="retryable", error=error, not_taken=True, sender_blocked="setup")
        except ConnectionRefusedError as exc:
            return SendResult(status="retryable", error=f"smtp: {type(exc).__name__}: {exc}", not_taken=True)
        except (smtplib.SMTPException, OSError) as exc:
            return SendResult(status="retryable", error=f"smtp: {type(exc).__name__}: {exc}")
        return SendResult(status="accepted", provider_message_id=message_id)

    def _login(self, smtp: smtplib.SMTP) -> None:
        """Log in with the merchant's credentials. A relay that offers no AUTH, or none of the mechanisms smtplib
        knows, refuses every message alike until the merchant's settings change (its host or port, say):
        ``_NoAuthError``. A refused AUTH is an answer (``SMTPAuthenticationError``, ``smtp_set_up_wrong``)."""
        try:
            smtp.login(self._username or "", self._password or "")
        except smtplib.SMTPNotSupportedError as exc:  # no AUTH offered
            raise _NoAuthError(str(exc)) from exc
        except smtplib.SMTPException as exc:
            if type(exc) is smtplib.SMTPException:  # "No suitable authentication method found"
                raise _NoAuthError(str(exc)) from exc
            raise  # an answer (SMTPAuthenticationError) or the connection lost: as any other send's


class _NoAuthError(Exception):
    """The relay offers no AUTH that smtplib can use, while the merchant's settings give credentials."""


class MemoryAdapter(_Adapter):
    """Kind ``fake`` without ``base_url``: renders and keeps messages in memory (demo and tests only)."""

    provider = "fake"

    def __init__(self, merchant_id: str, channel: Channel, templates: TemplateStore) -> None:
        super().__init__(merchant_id, channel, templates)
        self.sent: dict[str, tuple[OutboundMessage, RenderedMessage]] = {}

    async def _deliver(self, message: OutboundMessage, rendered: RenderedMessage) -> SendResult:
        self.sent.setdefault(message.idempotency_key, (message, rendered))
        return SendResult(status="accepted", provider_message_id=f"fake-{message.idempotency_key}")


class GenericFakeAdapter(_HttpAdapter):
    """Kind ``fake`` with ``base_url``: POSTs the rendered message to a fake channel server (``fakes.py``)."""

    provider = "fake"

    async def _deliver(self, message: OutboundMessage, rendered: RenderedMessage) -> SendResult:
        payload = {
            "channel": self.channel.value,
            "to": message.to,
            "merchant_id": message.merchant_id,
            "order_id": message.order_id,
            "nudge_id": message.nudge_id,
            "template": rendered.source,
            "subject": rendered.subject,
            "text": rendered.text,
        }
        response = await self.http.post(
            self.base_url + "/v1/messages", json=payload, headers={IDEMPOTENCY_HEADER: message.idempotency_key}
        )
        failure = _http_failure(response, self.provider)
        if failure is not None:
            return failure
        body = _json(response)
        provider_id = body.get("id") if isinstance(body, dict) else None
        return SendResult(status="accepted", provider_message_id=str(provider_id or message.idempotency_key))


# --- construction from the merchant config ---------------------------------------------------------------------

_CHANNELS_BY_KIND: Mapping[str, frozenset[Channel]] = {
    "gupshup": frozenset({Channel.WHATSAPP, Channel.SMS}),
    "interakt": frozenset({Channel.WHATSAPP}),
    "karix": frozenset({Channel.WHATSAPP, Channel.SMS}),
    "smtp": frozenset({Channel.EMAIL}),
    "push_webhook": frozenset({Channel.PUSH}),
    "fake": frozenset(Channel),
}
_DEFAULT_BASE_URLS: Mapping[tuple[str, Channel], str] = {
    ("gupshup", Channel.WHATSAPP): "https://api.gupshup.io",
    ("gupshup", Channel.SMS): "https://enterprise.smsgupshup.com",
    ("interakt", Channel.WHATSAPP): "https://api.interakt.ai",
    ("karix", Channel.WHATSAPP): "https://api.karix.io",
    ("karix", Channel.SMS): "https://api.karix.io",
}


#: What a secret that is not set reads as while ``provider_problems`` builds the adapters anyway (a "user:password"
#: pair, so that the rest of the build is checked too).
_UNSET_SECRET = "unset:unset"


class _Builder:
    def __init__(
        self,
        merchant_id: str,
        channel: Channel,
        provider: ProviderConfig,
        env: Mapping[str, str],
        unset: list[str] | None = None,
    ) -> None:
        self.where = f"merchant {merchant_id!r}, providers.{channel.value} (kind {provider.kind})"
        self.merchant_id = merchant_id
        self.key = f"merchants.{merchant_id}.providers.{channel.value}"
        self.provider = provider
        self.env = env
        #: When a list: each secret not set is noted in it (``<key path>: VAR``) instead of raising.
        self.unset = unset

    def fail(self, problem: str) -> ChannelError:
        return ChannelError(f"{self.where}: {problem}")

    def need(self, field: str) -> str:
        value = getattr(self.provider, field)
        if not value:
            raise self.fail(f"needs '{field}'")
        return str(value)

    def secret(self, field: str) -> str:
        name = self.need(field)
        value = self.env.get(name)
        if not value:
            if self.unset is None:
                raise self.fail(f"environment variable {name} (named by '{field}') is not set")
            self.unset.append(f"{self.key}.{field}: {name}")
            return _UNSET_SECRET
        return value

    def credentials(self) -> tuple[str, str]:
        """(user, password) from username_env + password_env, or from api_key_env holding ``user:password``."""
        if self.provider.username_env or self.provider.password_env:
            return self.secret("username_env"), self.secret("password_env")
        joined = self.secret("api_key_env")
        user, sep, password = joined.partition(":")
        if not sep or not user or not password:
            raise self.fail(
                f"environment variable {self.provider.api_key_env} must hold '<user>:<password>' "
                "(or set username_env and password_env)"
            )
        return user, password

    def base_url(self, channel: Channel) -> str:
        url = self.provider.base_url or _DEFAULT_BASE_URLS.get((self.provider.kind, channel))
        if not url:
            raise self.fail("needs 'base_url'")
        return url


def build_adapters(
    merchant_id: str, merchant: MerchantConfig, env: Mapping[str, str], http: httpx.AsyncClient
) -> dict[Channel, ChannelAdapter]:
    """One adapter per configured provider channel; raises ChannelError naming the merchant, channel and problem."""
    templates = _templates(env)
    return {
        channel: _build_one(_Builder(merchant_id, channel, provider, env), channel, provider, templates, http)
        for channel, provider in merchant.providers.items()
    }


def _templates(env: Mapping[str, str]) -> TemplateStore:
    """The message templates: ``$WINBACK_TEMPLATES_DIR`` when set, else the shipped ones."""
    return template_store(Path(env[TEMPLATES_DIR_ENV]) if env.get(TEMPLATES_DIR_ENV) else DEFAULT_TEMPLATES_DIR)


def provider_problems(
    merchant_id: str, merchant: MerchantConfig, env: Mapping[str, str]
) -> tuple[list[str], list[str]]:
    """The start-up check of a merchant's channel providers: (secrets not set, other problems).

    Builds every adapter as ``build_adapters`` does at the first message, connecting to nothing. Each secret
    variable a provider names and ``env`` lacks is one ``merchants.<id>.providers.<channel>.<field>: VAR``
    (all of them, not only the first); any other reason an adapter cannot be built is its ChannelError text.
    """
    templates = _templates(env)
    unset: list[str] = []
    problems: list[str] = []
    http = httpx.AsyncClient()  # held by the adapters, never used: it opens nothing
    for channel, provider in merchant.providers.items():
        try:
            _build_one(_Builder(merchant_id, channel, provider, env, unset), channel, provider, templates, http)
        except ChannelError as exc:
            problems.append(str(exc))
    return unset, problems


def _build_one(
    b: _Builder, channel: Channel, provider: ProviderConfig, templates: TemplateStore, http: httpx.AsyncClient
) -> ChannelAdapter:
    merchant_id = b.merchant_id
    if channel not in _CHANNELS_BY_KIND[provider.kind]:
        raise b.fail(f"kind '{provider.kind}' cannot deliver {channel.value}")
    adapter: ChannelAdapter
    if provider.kind == "gupshup" and channel is Channel.WHATSAPP:
        adapter = GupshupWhatsAppAdapter(
            merchant_id,
            templates,
            http,
            b.base_url(channel),
            api_key=b.secret("api_key_env"),
            source=b.need("source"),
            app_name=provider.sender,
            template_id=provider.template_id,
        )
    elif provider.kind == "gupshup":
        if bool(provider.entity_id) != bool(provider.template_id):
            raise b.fail(
                "India's DLT needs both 'entity_id' and 'template_id' (the principal entity id and the DLT template "
                "id), or neither"
            )
        userid, password = b.credentials()
        adapter = GupshupSmsAdapter(
            merchant_id,
            templates,
            http,
            b.base_url(channel),
            userid,
            password,
            mask=provider.source,
            dlt_entity_id=provider.entity_id,
            dlt_template_id=provider.template_id,
        )
    elif provider.kind == "interakt":
        adapter = InteraktAdapter(
            merchant_id, templates, http, b.base_url(channel), b.secret("api_key_env"), provider.template_id
        )
    elif provider.kind == "karix" and channel is Channel.WHATSAPP and provider.template_id:
        # A business-initiated WhatsApp message must be an approved template: Karix's WhatsApp API sends one.
        adapter = KarixWhatsAppTemplateAdapter(
            merchant_id,
            templates,
            http,
            provider.base_url or KARIX_WHATSAPP_BASE_URL,
            api_key=b.secret("api_key_env"),
            template_id=provider.template_id,
            source=b.need("source"),
        )
    elif provider.kind == "karix":
        account_uid, token = b.credentials()
        adapter = KarixAdapter(
            merchant_id, channel, templates, http, b.base_url(channel), account_uid, token, b.need("source")
        )
    elif provider.kind == "smtp":
        smtp_user = b.secret("username_env") if provider.username_env else None
        smtp_password = b.secret("password_env") if provider.password_env else None
        adapter = SmtpAdapter(
            merchant_id, templates, b.need("host"), provider.port or 25, b.need("sender"), smtp_user, smtp_password
        )
    elif provider.kind == "push_webhook":
        adapter = PushWebhookAdapter(merchant_id, templates, http, b.need("base_url"), b.secret("api_key_env"))
    elif provider.base_url:
        adapter = GenericFakeAdapter(merchant_id, channel, templates, http, provider.base_url)
    else:
        adapter = MemoryAdapter(merchant_id, channel, templates)
    return adapter
