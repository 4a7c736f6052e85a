"""Merchant webhooks: the signed ``Winback-Signature`` header and one delivery attempt."""

from __future__ import annotations

import hashlib
import hmac

import httpx

SIGNATURE_HEADER = "Winback-Signature"


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """``t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`` (CONTRACT.md section 5)."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(secret: str, header: str, body: bytes, now: int, tolerance_seconds: int = 300) -> bool:
    """What a merchant does on receipt: check the HMAC and that ``t`` is recent (a reference for receivers)."""
    parts = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    expected = signature(secret, timestamp, body).split("v1=", 1)[1]
    return abs(now - timestamp) <= tolerance_seconds and hmac.compare_digest(expected, parts.get("v1", ""))


def post_webhook(
    client: httpx.Client, url: str, secret: str, body: bytes, timestamp: int, idempotency_key: str
) -> httpx.Response:
    """POST ``body`` to ``url`` signed with ``secret``; transport errors propagate (httpx.HTTPError)."""
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: signature(secret, timestamp, body),
        "Idempotency-Key": idempotency_key,
        "User-Agent": "winback-webhooks/1",
    }
    return client.post(url, content=body, headers=headers)
