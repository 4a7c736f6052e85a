"""The channel interface the executor core codes against: outbound messages, send results, adapters, receipts.

An adapter turns one :class:`OutboundMessage` into one call to a messaging provider (a BSP such as Gupshup,
Interakt or Karix, an SMTP relay, or the merchant's push endpoint) and maps the answer to a :class:`SendResult`.
Adapters never raise for provider trouble: every failure becomes ``rejected`` (do not try again) or ``retryable``
(5xx, timeouts, connection errors: the scheduler tries again with the same idempotency key).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Literal, Protocol

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from model.merchant_config import MerchantConfig
from model.vocab import Channel


class OutboundMessage(BaseModel, frozen=True):
    """One nudge to deliver: who, through which channel, with which template and variables."""

    idempotency_key: str
    merchant_id: str
    order_id: str
    nudge_id: str
    channel: Channel
    to: str  # E.164 phone, email address or device token
    template_id: str
    locale: str = "en"
    # amount, currency, link_url, merchant_name, customer_name, expires_at ...
    variables: dict[str, str] = Field(default_factory=dict)


#: What a provider said its merchant's sender is over (``SendResult.sender_limited``).
SenderLimit = Literal["rate", "daily_quota"]
#: Why a provider refuses every message of the merchant's sender until an admin acts (``SendResult.sender_blocked``):
#: ``ban``, the provider banned it (its account, sending IP or domain: Exchange Online's 5.7.708, say:
#: ``channels.adapters.smtp_sender_banned``); ``setup``, the merchant's settings at the provider are wrong (its
#: credentials, the relay's registered IPs or domains, an unverified sender: ``channels.adapters.smtp_set_up_wrong``;
#: the relay putting off relaying for it at RCPT TO: ``channels.adapters.smtp_relay_deferred``).
#: Also ``sender_holds.held_for`` of each (service/executor/outages.py).
SenderBlock = Literal["ban", "setup"]


class SendResult(BaseModel, frozen=True):
    """What became of one send: accepted (with the provider's id), rejected for good, or worth retrying."""

    status: Literal["accepted", "rejected", "retryable"]
    provider_message_id: str | None = None
    error: str | None = None
    #: ``retryable`` only: the provider certainly did not take the message (it answered 408, 425, 429, 501, 502 or
    #: 503, or no connection was made). A timeout, a 500, a 504 or a connection lost after the request went may
    #: have reached it, and is False.
    not_taken: bool = False
    #: ``retryable`` only: the provider's ``Retry-After``, in seconds from its answer (None when it sent none).
    retry_after_seconds: float | None = None
    #: ``retryable`` only: the provider refused the message because the merchant's *sender* (its account, IP or
    #: domain at the provider) is over its sending rate (``rate``) or its daily quota (``daily_quota``), not for
    #: anything about this message or its recipient: every message of the merchant on the channel would be refused
    #: alike until the limit clears (an SMTP relay's throttling answers: ``channels.adapters.smtp_sender_limit``).
    sender_limited: SenderLimit | None = None
    #: ``retryable`` only (with ``not_taken``): the provider refused the message because the merchant's sender refuses
    #: every message alike until an admin acts, whoever the recipient (``SenderBlock``): the channel is down for the
    #: merchant at once (service/executor/outages.py), none of its messages is counted.
    sender_blocked: SenderBlock | None = None
    #: ``sender_blocked`` only: it was answered at RCPT TO for a recipient of this domain (lower case). A relay that
    #: passes RCPT through answers there for the recipient's provider, which may ban the merchant's sender for its
    #: own recipients only (Microsoft 365 refusing the merchant's IP, say): the channel is down only once a recipient
    #: of another domain is refused alike with no message taken in between (service/executor/outages.py).
    rcpt_domain: str | None = None


class ChannelAdapter(Protocol):
    """Delivers messages of one channel through one provider."""

    channel: Channel
    provider: str

    async def send(self, message: OutboundMessage) -> SendResult:
        """Send one message; never raises for provider or network trouble (see :class:`SendResult`)."""
        ...


#: What a failed receipt's error code says about the message's address and the merchant's set-up
#: (``service.executor.channels.inbound.WHATSAPP_FAILURES``):
#: ``opted_out``: the customer opted out there, never send on the channel again (for that merchant);
#: ``undeliverable``: the address cannot get messages on the channel (not on WhatsApp): not again for this order;
#: ``try_later``: WhatsApp held this one back (its per-user marketing limit, an experiment): not the customer's
#: choice, a later message may go;
#: ``rate_limited``: the business number sent too much (its throughput, its provider's API limit): back off, every
#: customer of the merchant alike (service/executor/pacing.py);
#: ``pair_rate_limited``: too many messages from the business number to this customer: back off with this one only
#: (service/executor/pacing.py);
#: ``merchant_config``: the merchant's template or set-up is wrong (a template missing, paused or with the wrong
#: parameters; a message outside the 24-hour window that needed one): every message fails until it is fixed.
ReceiptFailure = Literal[
    "opted_out", "undeliverable", "try_later", "rate_limited", "pair_rate_limited", "merchant_config"
]


class DeliveryReceipt(BaseModel, frozen=True):
    """A provider's report that a message it accepted was delivered, read, or failed."""

    provider: str
    provider_message_id: str
    status: Literal["delivered", "failed", "read"]
    occurred_at: datetime
    error: str | None = None
    merchant_id: str | None = None  # the merchant whose authenticated callback URL it came to, when known
    #: A failed receipt's kind of failure, when its error code is a known one (see ``ReceiptFailure``).
    failure: ReceiptFailure | None = None

    @property
    def opted_out(self) -> bool:
        """The provider refused the message because its recipient opted out there (Gupshup's 1012, Meta's 131050)."""
        return self.failure == "opted_out"


class InboundMessage(BaseModel):
    """A message a customer sent back; ``sender`` (JSON ``from``) is their phone number or address."""

    model_config = ConfigDict(populate_by_name=True, frozen=True)

    provider: str
    channel: Channel
    sender: str = Field(alias="from")
    text: str
    to: str | None = None  # the merchant's number the customer wrote to, when the provider says
    opted_out: bool = False  # the provider itself reported an opt-out (e.g. Gupshup's "opted-out" user event)

    @field_validator("sender")
    @classmethod
    def _e164(cls, value: str) -> str:
        # Providers write numbers as "91987..." or "+91 987..."; the store knows them as E.164 "+91987...".
        compact = re.sub(r"[\s\-()]", "", value)
        return "+" + compact.lstrip("+") if re.fullmatch(r"\+?[1-9]\d{6,14}", compact) else value


class ChannelError(ValueError):
    """A channel cannot be built or a template is unusable; the message names the merchant, channel or file."""


def build_adapters(
    merchant_id: str, merchant: MerchantConfig, env: Mapping[str, str], http: httpx.AsyncClient
) -> dict[Channel, ChannelAdapter]:
    """One adapter per channel in ``merchant.providers``; raises ChannelError when a provider is misconfigured.

    Secrets are read from ``env`` under the names the config gives (``api_key_env`` ...). Templates come from
    ``env["WINBACK_TEMPLATES_DIR"]`` when set, else the shipped ``data/templates``.
    """
    from service.executor.channels.adapters import build_adapters as _build

    return _build(merchant_id, merchant, env, http)
