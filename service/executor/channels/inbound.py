"""What providers send back: delivery receipts and customers' replies (with opt-out detection).

Payload shapes follow each provider's documented callbacks:

- ``gupshup`` WhatsApp: ``{"type": "message-event", "payload": {"id", "gsId", "type": delivered|read|failed|...}}``
  (``gsId`` is the id the send API returned; ``failed`` events carry it as ``id``), inbound
  ``{"type": "message", "payload": {"source", "type": "text", "payload": {"text"}}}`` and the user event
  ``{"type": "user-event", "payload": {"phone", "type": "opted-out"}}``;
  Gupshup Enterprise SMS: real-time DLR as query/form fields ``externalId, deliveredTS, status, cause, phoneNo``
  or a JSON list of ``{"externalId", "eventType": DELIVERED|FAILED, "eventTs"}``; replies as ``msisdn, content``.
- ``interakt``: ``{"type": "message_api_delivered"|"message_api_read"|"message_api_failed"|"message_received",
  "data": {"customer": {...}, "message": {"id", "message", "callbackData", "channel_error_code",
  "channel_failure_reason", ...}}}`` (a failure's code is Meta's).
- ``karix``: messaging API v2 (SMS and free-form WhatsApp): ``{"data": {"uid", "status":
  delivered|undelivered|failed|rejected|read, "direction", "source", "content": {"text"}, "updated_time"}}`` (the
  message record; accepted with or without the ``data`` wrapper). Its WhatsApp API (``rcmapi.instaalerts.zone``,
  the approved templates): ``{"channel": "WABA", "events": {"eventType": "DELIVERY EVENTS", "mid", "timestamp"},
  "notificationAttributes": {"status": sent|delivered|read|failed, "reason", "code"}, "recipient": {"to",
  "reference": {"cust_ref"}}, ...}`` (``_karix_whatsapp_receipts``), and a customer's message as ``{"events":
  {"eventType": "User initiated"}, "eventContent": {"message": {"from", "to", "contentType", "text": {"body"},
  ...}}}`` (``_karix_whatsapp_inbound``); their sources: data/README.md.
- ``push_webhook`` / ``fake``: ``{"provider_message_id", "status", "occurred_at"}`` and ``{"from", "text"}``.

Events that are neither a final delivery state nor a read (``enqueued``, ``sent`` ...) yield no receipt.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from datetime import UTC, datetime
from typing import Any, Literal

from model.vocab import Channel
from service.executor.channels.base import DeliveryReceipt, InboundMessage, ReceiptFailure
from service.personal_data import mask_addresses_in

logger = logging.getLogger("winback.executor.channels")

PROVIDERS: frozenset[str] = frozenset({"gupshup", "interakt", "karix", "push_webhook", "fake"})

#: Whole-message opt-out replies (compared after case folding, trimming punctuation and collapsing spaces).
OPT_OUT_PHRASES: frozenset[str] = frozenset(
    {
        # English (the carrier-standard keywords and common phrasings)
        "stop",
        "stopall",
        "stop all",
        "unsubscribe",
        "cancel",
        "end",
        "quit",
        "optout",
        "opt out",
        "opt-out",
        "stop messages",
        "stop messaging",
        "stop sending",
        "stop sending messages",
        "no more messages",
        "remove me",
        "dont message me",
        "don't message me",
        # Hindi (Devanagari and romanised)
        "रोकें",
        "रोको",
        "बंद",
        "बंद करें",
        "बंद करो",
        "संदेश बंद करें",
        "मैसेज बंद करें",
        "band karo",
        "band karein",
        # Spanish, Portuguese, French, German
        "baja",
        "parar",
        "pare",
        "arrêt",
        "arret",
        "stopp",
        "abmelden",
    }
)
#: First words that opt out whatever follows ("STOP please", "unsubscribe me"); deliberately short, since
#: "end"/"cancel" open many ordinary sentences.
OPT_OUT_FIRST_WORDS: frozenset[str] = frozenset({"stop", "stopall", "unsubscribe", "optout", "रोकें"})

_PUNCTUATION = re.compile(r"[\s!.,;:?¡¿\"'`()\[\]{}*_~।-]+$|^[\s!.,;:?¡¿\"'`()\[\]{}*_~।-]+")


def _normalise(text: str) -> str:
    folded = unicodedata.normalize("NFC", text).casefold().replace("’", "'")
    return " ".join(_PUNCTUATION.sub("", folded).split())


def is_opt_out(text: str) -> bool:
    """True when a reply asks to stop messages (see OPT_OUT_PHRASES and OPT_OUT_FIRST_WORDS)."""
    normalised = _normalise(text)
    if not normalised:
        return False
    if normalised in OPT_OUT_PHRASES:
        return True
    first = _PUNCTUATION.sub("", normalised.split(" ", 1)[0])
    return first in OPT_OUT_FIRST_WORDS


class PayloadError(ValueError):
    """A provider callback could not be read; the message says what was missing, ``path`` where in the body (empty:
    the body as a whole)."""

    def __init__(self, message: str, *path: int | str) -> None:
        super().__init__(message)
        self.path = path


def _timestamp(value: Any) -> datetime:
    """Provider time stamps come as unix seconds or milliseconds (numbers or digit strings) or ISO 8601."""
    if value is None or value == "":
        return datetime.now(UTC)
    if isinstance(value, int | float) or (isinstance(value, str) and value.strip().isdigit()):
        number = float(value)
        if number > 1e11:  # milliseconds
            number /= 1000
        return datetime.fromtimestamp(number, UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise PayloadError(f"unreadable time stamp {value!r}") from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise PayloadError(f"unreadable time stamp {value!r}")


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


Status = Literal["delivered", "failed", "read"]
_GUPSHUP_WA: dict[str, Status] = {"delivered": "delivered", "read": "read", "failed": "failed"}
_GUPSHUP_SMS: dict[str, Status] = {
    "success": "delivered",
    "delivered": "delivered",
    "failure": "failed",
    "failed": "failed",
    "fail": "failed",
}
_INTERAKT: dict[str, Status] = {
    "message_api_delivered": "delivered",
    "message_api_read": "read",
    "message_api_failed": "failed",
}
_KARIX: dict[str, Status] = {
    "delivered": "delivered",
    "read": "read",
    "undelivered": "failed",
    "failed": "failed",
    "rejected": "failed",
}
_GENERIC: dict[str, Status] = {"delivered": "delivered", "read": "read", "failed": "failed"}


#: What the error code of a failed WhatsApp receipt says (``ReceiptFailure``), as Gupshup and Interakt pass them on.
#: Meta's WhatsApp Cloud API codes (developers.facebook.com/documentation/business-messaging/whatsapp/support/
#: error-codes; data/README.md): 131050 "User has stopped marketing messages" is the customer's own choice in
#: WhatsApp, refused until they resume them; 131026 "Message undeliverable" (not a WhatsApp number, terms not
#: accepted, an old app); 131049 "not delivered to maintain healthy ecosystem engagement" (Meta's per-user limit on
#: marketing messages, lifted after a while: wait, never an opt-out) and 130472 (the number is in a Meta
#: experiment); 130429 (the business number's throughput) and 131056 (too many messages to this customer) are rate
#: limits; 131047 (outside the 24-hour window: a template is needed), 131051 (unsupported message type) and the
#: 132xxx template errors are the merchant's set-up. Gupshup's own codes (docs.gupshup.io/docs/error-and-status-
#: messages): 1012 "Number Opted Out" (on the app's opt-out list), 1002 "Number Not Exist On WhatsApp", 1004-1007
#: (template disabled or not matched), 4001 "API Rate Limited".
META_FAILURES: dict[str, ReceiptFailure] = {
    "131050": "opted_out",
    "131026": "undeliverable",
    "131049": "try_later",
    "130472": "try_later",
    "130429": "rate_limited",
    "131056": "pair_rate_limited",
    "131047": "merchant_config",
    "131051": "merchant_config",
    "132000": "merchant_config",  # template parameter count mismatch
    "132001": "merchant_config",  # template does not exist (in that language)
    "132005": "merchant_config",  # template hydrated text too long
    "132007": "merchant_config",  # template format character policy violated
    "132012": "merchant_config",  # template parameter format mismatch
    "132015": "merchant_config",  # template paused
    "132016": "merchant_config",  # template disabled
}
#: Gupshup's WhatsApp error of a message to a number on its opt-out list ("Number Opted Out").
GUPSHUP_NUMBER_OPTED_OUT = "1012"
GUPSHUP_FAILURES: dict[str, ReceiptFailure] = {
    GUPSHUP_NUMBER_OPTED_OUT: "opted_out",
    "1002": "undeliverable",
    "1004": "merchant_config",
    "1005": "merchant_config",
    "1006": "merchant_config",
    "1007": "merchant_config",
    "4001": "rate_limited",
}
#: The failure codes of each provider's WhatsApp receipts: Meta's, which both pass on, and Gupshup's own.
WHATSAPP_FAILURES: dict[str, dict[str, ReceiptFailure]] = {
    "gupshup": META_FAILURES | GUPSHUP_FAILURES,
    "interakt": META_FAILURES,
}


def _failure(failures: dict[str, ReceiptFailure], status: Status, code: Any) -> ReceiptFailure | None:
    """What a failed receipt's error ``code`` says in ``failures``; None for another status or code."""
    if status != "failed" or code is None:
        return None
    return failures.get(str(code).strip())


def _receipt(
    provider: str,
    message_id: Any,
    status: Status,
    at: Any,
    error: Any = None,
    code: Any = None,
    failures: dict[str, ReceiptFailure] | None = None,
) -> DeliveryReceipt:
    """One receipt; a failure's ``code`` leads its ``error`` text and is classified (``_failure``) by ``failures``,
    by default the provider's ``WHATSAPP_FAILURES``."""
    if not message_id:
        raise PayloadError(f"{provider} receipt without a message id")
    code_text = str(code).strip() if code not in (None, "") else ""
    text = " ".join(part for part in (code_text, str(error).strip() if error else "") if part)
    return DeliveryReceipt(
        provider=provider,
        provider_message_id=str(message_id),
        status=status,
        occurred_at=_timestamp(at),
        # A provider's error may quote the recipient's number or address: masked before it is kept with the nudge
        # (the order view, the console and the history export show it) and before it is cut, so no tail escapes.
        error=mask_addresses_in(text)[:300] or None,
        failure=_failure(WHATSAPP_FAILURES.get(provider, {}) if failures is None else failures, status, code),
    )


def _gupshup_receipts(payload: Any) -> list[DeliveryReceipt]:
    if isinstance(payload, list):  # Enterprise SMS, POST mode: a batch of up to 20 events
        out = []
        for event in payload:
            event = _obj(event)
            status = _GUPSHUP_SMS.get(str(event.get("eventType", "")).lower())
            if status:
                error = None if status == "delivered" else event.get("cause")
                out.append(_receipt("gupshup", event.get("externalId"), status, event.get("eventTs"), error))
        return out
    body = _obj(payload)
    if body.get("type") == "message-event":  # WhatsApp
        event = _obj(body.get("payload"))
        status = _GUPSHUP_WA.get(str(event.get("type", "")))
        if status is None:
            return []
        inner = _obj(event.get("payload"))
        at = inner.get("ts") or body.get("timestamp")
        message_id = event.get("gsId") or event.get("id")
        code = inner.get("code") if status == "failed" else None
        return [_receipt("gupshup", message_id, status, at, inner.get("reason"), code)]
    if "externalId" in body:  # Enterprise SMS, GET mode
        status = _GUPSHUP_SMS.get(str(body.get("status", "")).lower())
        if status is None:
            return []
        error = None if status == "delivered" else body.get("cause")
        return [_receipt("gupshup", body["externalId"], status, body.get("deliveredTS"), error)]
    raise PayloadError("gupshup receipt: neither a WhatsApp message-event nor an SMS delivery report")


#: The ``eventType`` of a delivery report of Karix's WhatsApp API (its other events, ``User initiated``, are the
#: customer's own messages).
KARIX_DELIVERY_EVENTS = "DELIVERY EVENTS"
#: The ``eventType`` of a customer's own message on Karix's WhatsApp API.
KARIX_USER_INITIATED = "User initiated"
#: Karix WhatsApp report statuses that are final or a read (``sent``: handed to WhatsApp, no receipt yet).
_KARIX_WHATSAPP: dict[str, Status] = {"delivered": "delivered", "read": "read", "failed": "failed"}
#: Statuses on the way to one of those: acknowledged, no receipt (``sent``, and those a public integration with
#: Karix's WhatsApp API also takes for not yet delivered; data/README.md).
_KARIX_WHATSAPP_INTERIM = frozenset({"sent", "accepted", "queued", "processing"})
#: The failure codes of Karix's WhatsApp reports that winback classifies: Meta's. Whether Karix passes Meta's
#: code through in ``notificationAttributes.code`` is not in any public document we could read: the one report
#: we saw quoted carries Karix's own three-digit code (``"101"``, "Delivered to User"), which no six-digit Meta
#: code can be mistaken for. So a Meta code there is read as Meta's, and any other code is kept with the text,
#: unclassified (data/README.md).
KARIX_WHATSAPP_FAILURES: dict[str, ReceiptFailure] = META_FAILURES


def _karix_whatsapp_receipts(body: dict[str, Any]) -> list[DeliveryReceipt]:
    """A delivery report of Karix's WhatsApp API: ``events.mid`` (the ``mid`` its send answered) names the message,
    ``events.timestamp`` (unix milliseconds) dates it, and ``notificationAttributes`` says what happened: ``status``
    and, on a failure, ``code`` and ``reason``. A report without ``mid`` names its message by the
    ``recipient.reference.cust_ref`` echoed from the send: the idempotency key, which is the message's id when the
    send's answer had no ``mid``. Another event (a customer's message) or an unknown status is acknowledged with no
    receipt, the latter logged; a report missing what it needs is a PayloadError naming it (a 422, never a 5xx)."""
    events = body.get("events")
    if not isinstance(events, dict):
        raise PayloadError("karix WhatsApp event: 'events' is not an object", "events")
    event_type = str(events.get("eventType", ""))
    if event_type != KARIX_DELIVERY_EVENTS:
        logger.info("karix WhatsApp event %r is no delivery report: acknowledged, no receipt", event_type[:40])
        return []
    attributes = body.get("notificationAttributes")
    if not isinstance(attributes, dict):
        raise PayloadError(
            "karix WhatsApp delivery report without a 'notificationAttributes' object", "notificationAttributes"
        )
    said = str(attributes.get("status") or "").strip().casefold()
    if not said:
        raise PayloadError(
            "karix WhatsApp delivery report without 'notificationAttributes.status'", "notificationAttributes", "status"
        )
    reference = _obj(_obj(body.get("recipient")).get("reference"))
    message_id = events.get("mid") or reference.get("cust_ref")
    if not message_id:
        raise PayloadError(
            "karix WhatsApp delivery report without 'events.mid' (nor 'recipient.reference.cust_ref'): no message",
            "events",
            "mid",
        )
    status = _KARIX_WHATSAPP.get(said)
    if status is None:
        if said not in _KARIX_WHATSAPP_INTERIM:
            logger.warning(
                "karix WhatsApp delivery report with an unknown status %r for message %s: acknowledged, not applied",
                said[:40],
                str(message_id)[:100],
            )
        return []
    failed = status == "failed"
    return [
        _receipt(
            "karix",
            message_id,
            status,
            events.get("timestamp"),
            attributes.get("reason") if failed else None,
            attributes.get("code") if failed else None,
            failures=KARIX_WHATSAPP_FAILURES,
        )
    ]


def parse_delivery_receipts(provider: str, payload: Any) -> list[DeliveryReceipt]:
    """The delivery receipts in one provider callback (none for interim states such as ``sent``)."""
    if provider not in PROVIDERS:
        raise PayloadError(f"unknown provider {provider!r}")
    if provider == "gupshup":
        return _gupshup_receipts(payload)
    body = _obj(payload)
    if provider == "interakt":
        status = _INTERAKT.get(str(body.get("type", "")))
        if status is None:
            return []
        message = _obj(_obj(body.get("data")).get("message"))
        at = message.get("delivered_at_utc") or message.get("seen_at_utc") or message.get("failed_at_utc")
        return [
            _receipt(
                "interakt",
                message.get("id"),
                status,
                at or body.get("timestamp"),
                message.get("channel_failure_reason"),
                message.get("channel_error_code") if status == "failed" else None,
            )
        ]
    if provider == "karix":
        if "events" in body or "notificationAttributes" in body:  # its WhatsApp API, not messaging API v2
            return _karix_whatsapp_receipts(body)
        record = _obj(body.get("data")) or body
        status = _KARIX.get(str(record.get("status", "")))
        if status is None or record.get("direction") == "inbound":
            return []
        # A failure's ``error`` is ``{code, message}`` (karix-python, docs/MessageError.md); no code list is public,
        # so none is classified: the code is kept with the text.
        error = _obj(record.get("error"))
        code = error.get("code") if status == "failed" else None
        return [_receipt("karix", record.get("uid"), status, record.get("updated_time"), error.get("message"), code)]
    status = _GENERIC.get(str(body.get("status", "")))
    if status is None:
        return []
    return [_receipt(provider, body.get("provider_message_id"), status, body.get("occurred_at"), body.get("error"))]


#: Gupshup inbound WhatsApp message types whose payload carries words: typed text, and the buttons' replies.
_GUPSHUP_TEXT_TYPES = frozenset({"text", "quick_reply", "button_reply"})


def _karix_whatsapp_inbound(body: dict[str, Any]) -> InboundMessage | None:
    """A customer's message on Karix's WhatsApp API (``events.eventType`` ``User initiated``):
    ``eventContent.message`` with ``from``, ``to`` and, by its ``contentType``, typed ``text.body``, a template's
    quick reply ``button.text``, or an interactive reply's ``interactive.button_reply.title`` or ``list_reply.title``
    (a tapped "Stop" counts as its words). Anything else (a delivery report, an attachment) is no text reply."""
    if _obj(body.get("events")).get("eventType") != KARIX_USER_INITIATED:
        return None
    message = _obj(_obj(body.get("eventContent")).get("message"))
    interactive = _obj(message.get("interactive"))
    text = (
        _obj(message.get("text")).get("body")
        or _obj(message.get("button")).get("text")
        or _obj(interactive.get("button_reply")).get("title")
        or _obj(interactive.get("list_reply")).get("title")
    )
    sender, to = message.get("from"), message.get("to")
    if not isinstance(text, str) or not text or not sender:
        return None
    return InboundMessage(
        provider="karix", channel=Channel.WHATSAPP, sender=str(sender), text=text, to=str(to) if to else None
    )


def parse_inbound(provider: str, payload: Any) -> InboundMessage | None:
    """The customer's reply in one provider callback, or None when the callback is not a text reply."""
    if provider not in PROVIDERS:
        raise PayloadError(f"unknown provider {provider!r}")
    body = _obj(payload)
    if provider == "gupshup":
        event = _obj(body.get("payload"))
        if body.get("type") == "user-event" and event.get("type") == "opted-out":
            return InboundMessage(
                provider=provider, channel=Channel.WHATSAPP, sender=str(event.get("phone", "")), text="", opted_out=True
            )
        if body.get("type") == "message":
            # A tapped button counts as its words: a template's "Stop" quick reply (``payload.text``) or an
            # interactive reply button (``payload.title``) is how many customers opt out on WhatsApp.
            content = _obj(event.get("payload"))
            text = content.get("text") or content.get("title")
            sender = event.get("source") or _obj(event.get("sender")).get("phone")
            if event.get("type") not in _GUPSHUP_TEXT_TYPES or not text or not sender:
                return None
            return InboundMessage(provider=provider, channel=Channel.WHATSAPP, sender=str(sender), text=str(text))
        if body.get("msisdn") and body.get("content") is not None:  # Enterprise SMS reply
            return InboundMessage(
                provider=provider,
                channel=Channel.SMS,
                sender=str(body["msisdn"]),
                text=str(body["content"]),
                to=body.get("phonecode"),
            )
        return None
    if provider == "interakt":
        if body.get("type") != "message_received":
            return None
        data = _obj(body.get("data"))
        customer, message = _obj(data.get("customer")), _obj(data.get("message"))
        sender = customer.get("channel_phone_number") or (
            f"{customer.get('country_code', '')}{customer.get('phone_number', '')}"
            if customer.get("phone_number")
            else None
        )
        text = message.get("message")
        if not sender or not isinstance(text, str):
            return None
        return InboundMessage(provider=provider, channel=Channel.WHATSAPP, sender=str(sender), text=text)
    if provider == "karix":
        if "events" in body or "eventContent" in body:  # its WhatsApp API, not messaging API v2
            return _karix_whatsapp_inbound(body)
        record = _obj(body.get("data")) or body
        text = _obj(record.get("content")).get("text") or record.get("text")
        if record.get("direction") != "inbound" or not text or not record.get("source"):
            return None
        channel = Channel.SMS if record.get("channel") == "sms" else Channel.WHATSAPP
        return InboundMessage(
            provider=provider,
            channel=channel,
            sender=str(record["source"]),
            text=str(text),
            to=record.get("destination"),
        )
    if not body.get("from") or not isinstance(body.get("text"), str):
        return None
    named = body.get("channel", Channel.SMS.value)
    try:
        channel = Channel(named)
    except ValueError:
        known = ", ".join(c.value for c in Channel)
        raise PayloadError(f"channel: {str(named)[:40]!r} is not a channel (one of {known})", "channel") from None
    return InboundMessage(provider=provider, channel=channel, sender=str(body["from"]), text=body["text"])


def wants_opt_out(message: InboundMessage) -> bool:
    """True when the provider reported an opt-out or the reply's text asks for one."""
    return message.opted_out or is_opt_out(message.text)
