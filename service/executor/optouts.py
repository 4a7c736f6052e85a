"""Customers' opt-outs, kept per merchant, channel and address, and the provider callbacks' per-merchant token.

A STOP reply names a phone number (or address), not a customer: the opt-out is stored against the address, so it
holds for every order of that merchant whose customer is reached there, however the merchant ids the customer.
Only a SHA-256 of the normalised address is stored (addresses never appear in logs either, see ``mask_address``);
it is keyed by nothing secret, so it survives a rotation of any secret. An e-mail address is compared case-folded.

A phone number is kept as the reply names it, its digits only (``+91 98000-00001`` and ``919800000001`` are one
number; a leading ``00``, the international prefix, counts as ``+``), because a reply does not always say its
country: Gupshup's Enterprise SMS names an Indian sender by ten national digits (``msisdn=9812348765``), others
write ``+91...``, ``91...`` or the national form with its trunk prefix (``098...``), and nothing in the callback
says which reading is meant. So the match is made from the customer's side, where the country is known (the
number's own ``+``, else the customer's ``country``): a customer has opted out when the reply named their number in
any of the forms a provider writes it in (``phone_forms``: its E.164 digits, its national significant number, that
number after its country's trunk prefix). Opt-outs kept before this matched the same way, so STOPs that were
missed then are honoured now, without a migration.

What that trades: an opt-out is never missed for a number written in one of those forms, but a reply that names
a number without its country (``9800000001``) also opts out, for that merchant and channel, a customer in another
country with the same national number (``+1 980-000-0001``). Missing a STOP breaks the customer's request (and
TRAI/TCPA rules); the false opt-out only costs a message on that one channel, so the match errs that way.

Provider callbacks carry ``?merchant_id=<id>&token=<token>`` in the URL configured at the provider (the BSPs
post to a fixed URL without signing it in a way all of them share): the token is an HMAC-SHA256 of the merchant
id under ``WINBACK_PROVIDER_CALLBACK_SECRET`` (else a key derived from ``WINBACK_LINK_SECRET``). A token made with
the key before a rotation (``WINBACK_PROVIDER_CALLBACK_SECRET_PREVIOUS``, or while the key derives from the link
secret, ``WINBACK_LINK_SECRET_PREVIOUS``) is still accepted, so STOP replies are not refused while the providers
are given the new URLs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import orjson
import phonenumbers
import sqlalchemy as sa

from model.vocab import Channel
from service.executor.store import opt_outs, upsert_into

#: Customer request fields (extras of ``customer``) that carry the address of each channel.
ADDRESS_FIELDS: dict[Channel, tuple[str, ...]] = {
    Channel.SMS: ("phone",),
    Channel.WHATSAPP: ("whatsapp", "phone"),
    Channel.EMAIL: ("email",),
    Channel.PUSH: ("device_token", "push_token"),
}
_PHONE_CHANNELS = frozenset({Channel.SMS, Channel.WHATSAPP})


def customer_address(customer: Mapping[str, Any], channel: Channel) -> str | None:
    """The customer's address on ``channel`` (the first of its ``ADDRESS_FIELDS`` given), or None."""
    for name in ADDRESS_FIELDS[channel]:
        value = customer.get(name)
        if value:
            return str(value)
    return None


def order_customer_address(request_json: str | bytes, channel: Channel) -> str | None:
    """The address on ``channel`` of the customer of an order's stored request (``orders.request_json``), or None."""
    return customer_address(orjson.loads(request_json)["customer"], channel)


_PHONE_SEPARATORS = re.compile(r"[\s\-().]")


def normalise_address(channel: Channel, address: str) -> str:
    """The address as an opt-out keeps it: a phone number's digits (a leading ``+`` or ``00`` dropped), case-folded
    e-mail, else trimmed."""
    if channel in _PHONE_CHANNELS:
        compact = _PHONE_SEPARATORS.sub("", address)
        digits = compact[1:] if compact.startswith("+") else compact
        digits = digits[2:] if digits.startswith("00") else digits
        return digits if digits.isdigit() else address.strip()
    if channel == Channel.EMAIL:
        return address.strip().casefold()
    return address.strip()


def address_hash(channel: Channel, address: str) -> str:
    """SHA-256 hex of the normalised address: what the ``opt_outs`` table keeps instead of the address."""
    return _sha256(normalise_address(channel, address))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def phone_forms(address: str, country: str | None = None) -> set[str]:
    """Every form, as ``normalise_address`` keeps it, in which a provider may name the phone number ``address`` of a
    customer of ``country`` (ISO 3166 alpha-2, when known): the number as given, its E.164 digits, its national
    significant number and that number after its country's trunk prefix. A number given without ``+`` is read both
    in ``country`` and as E.164 digits without the ``+``, whichever are possible numbers (never missing a form
    matters more than the few extra forms of the wrong reading)."""
    given = normalise_address(Channel.SMS, address)
    forms = {given}
    if not given.isdigit():
        return forms
    explicit = _PHONE_SEPARATORS.sub("", address).startswith(("+", "00"))
    readings: list[tuple[str, str | None]] = [(f"+{given}", None)]
    region = (country or "").strip().upper()
    if not explicit and region and region in phonenumbers.SUPPORTED_REGIONS:
        readings.append((given, region))
    for text, default_region in readings:
        try:
            number = phonenumbers.parse(text, default_region)
        except phonenumbers.NumberParseException:
            continue
        if number.country_code is None or not phonenumbers.is_possible_number(number):
            continue
        national = phonenumbers.national_significant_number(number)
        # ``00``+E.164: how opt-outs kept before ``normalise_address`` dropped the international prefix named it.
        forms |= {f"{number.country_code}{national}", national, f"00{number.country_code}{national}"}
        for each in phonenumbers.region_codes_for_country_code(number.country_code):
            trunk = phonenumbers.ndd_prefix_for_region(each, True)
            if trunk:
                forms.add(f"{trunk}{national}")
    return forms


def address_hashes(channel: Channel, address: str, country: str | None = None) -> set[str]:
    """The ``opt_outs`` keys any of which opts out ``address`` (a customer's, of ``country``) on ``channel``."""
    if channel in _PHONE_CHANNELS:
        return {_sha256(form) for form in phone_forms(address, country)}
    return {address_hash(channel, address)}


def record_opt_out(
    conn: sa.Connection, merchant_id: str, channel: Channel, address: str, source: str, now: datetime
) -> bool:
    """Keep the opt-out of ``address`` from ``channel`` for ``merchant_id``; False when it was kept already."""
    key = {"merchant_id": merchant_id, "channel": channel.value, "address_sha256": address_hash(channel, address)}
    insert = upsert_into(conn, opt_outs)
    statement = insert.values(**key, source=source[:64], created_at=now).on_conflict_do_nothing()
    # RETURNING, not rowcount: psycopg reports -1 for an INSERT ... ON CONFLICT DO NOTHING.
    return conn.execute(statement.returning(opt_outs.c.merchant_id)).first() is not None


def opted_out_channels(conn: sa.Connection, merchant_id: str, customer: Mapping[str, Any]) -> set[Channel]:
    """The channels on which the customer's address (as the request gives it) opted out of ``merchant_id``."""
    country = customer.get("country")
    wanted: dict[tuple[str, str], Channel] = {}
    for channel in Channel:
        address = customer_address(customer, channel)
        if address is not None:
            for digest in address_hashes(channel, address, country if isinstance(country, str) else None):
                wanted[(channel.value, digest)] = channel
    if not wanted:
        return set()
    rows = conn.execute(
        sa.select(opt_outs.c.channel, opt_outs.c.address_sha256).where(
            opt_outs.c.merchant_id == merchant_id,
            opt_outs.c.address_sha256.in_({digest for _, digest in wanted}),
        )
    )
    return {wanted[key] for key in ((row.channel, row.address_sha256) for row in rows) if key in wanted}


def is_opted_out(
    conn: sa.Connection, merchant_id: str, channel: Channel, address: str, country: str | None = None
) -> bool:
    """True when ``address`` (a customer's, of ``country``) opted out of ``channel`` for ``merchant_id``."""
    found = conn.scalar(
        sa.select(opt_outs.c.created_at)
        .where(
            opt_outs.c.merchant_id == merchant_id,
            opt_outs.c.channel == channel.value,
            opt_outs.c.address_sha256.in_(address_hashes(channel, address, country)),
        )
        .limit(1)
    )
    return found is not None


def with_opt_outs(customer: dict[str, Any], channels: Iterable[Channel]) -> None:
    """Add ``channels`` to the request customer's ``opted_out_channels`` (in place, sorted, no repeats)."""
    opted = set(customer.get("opted_out_channels") or []) | {channel.value for channel in channels}
    customer["opted_out_channels"] = sorted(opted)


# ------------------------------------------------------------------------------- provider callback tokens


def callback_key(callback_secret: str | None, link_secret: str) -> bytes:
    """The key of callback tokens: the callback secret, else one derived from the link secret (never the link
    secret itself, so a callback token can never be a link signature)."""
    if callback_secret:
        return callback_secret.encode()
    return hmac.new(link_secret.encode(), b"winback provider callbacks v1", hashlib.sha256).digest()


def callback_token(key: bytes, merchant_id: str) -> str:
    """The token of ``merchant_id``'s provider callback URLs."""
    return hmac.new(key, f"provider-callback:{merchant_id}".encode(), hashlib.sha256).hexdigest()


def token_matches(keys: Iterable[bytes], merchant_id: str, token: str) -> bool:
    """Whether ``token`` is ``merchant_id``'s callback token under any of ``keys`` (the current key and those
    before a rotation)."""
    return _any_matches([callback_token(key, merchant_id) for key in keys], token)


def _any_matches(expected: Iterable[str], token: str) -> bool:
    """Whether ``token`` is one of ``expected``: each compared in constant time, and every one tried."""
    given = token.encode()
    matches = [hmac.compare_digest(each.encode(), given) for each in expected]
    return any(matches)


def callback_urls(base_url: str, key: bytes, merchant_id: str, provider: str) -> dict[str, str]:
    """The inbound (replies, STOP) and receipts (delivery reports) URLs to configure at ``provider``."""
    query = urlencode({"merchant_id": merchant_id, "token": callback_token(key, merchant_id)})
    base = f"{base_url.rstrip('/')}/v1/providers/{provider}"
    return {"inbound": f"{base}/inbound?{query}", "receipts": f"{base}/receipts?{query}"}


# ------------------------------------------------------------------------------------ e-mail unsubscribe links


def unsubscribe_key(link_secret: str) -> bytes:
    """The key of e-mail unsubscribe tokens: derived from the link secret under a label of its own, so such a
    token is never a link signature nor a callback token."""
    return hmac.new(link_secret.encode(), b"winback e-mail unsubscribe v1", hashlib.sha256).digest()


def unsubscribe_token(key: bytes, merchant_id: str, order_id: str) -> str:
    """The token of the unsubscribe link in the e-mails about ``merchant_id``'s order ``order_id``."""
    claims = json.dumps(["e-mail unsubscribe", merchant_id, order_id]).encode()  # ids may hold any separator
    return hmac.new(key, claims, hashlib.sha256).hexdigest()


def unsubscribe_token_matches(keys: Iterable[bytes], merchant_id: str, order_id: str, token: str) -> bool:
    """Whether ``token`` is the unsubscribe token of the order under any of ``keys``."""
    return _any_matches([unsubscribe_token(key, merchant_id, order_id) for key in keys], token)


def unsubscribe_url(base_url: str, key: bytes, merchant_id: str, order_id: str) -> str:
    """The link (and ``List-Unsubscribe`` target) with which the order's customer stops the merchant's e-mails."""
    query = urlencode(
        {"merchant_id": merchant_id, "order_id": order_id, "token": unsubscribe_token(key, merchant_id, order_id)}
    )
    return f"{base_url.rstrip('/')}/unsubscribe?{query}"
