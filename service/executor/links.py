"""Payment-link tokens: signed (HMAC-SHA256), expiring, and single-use (the ``payment_links`` row says so).

A token is ``<base64url payload>.<base64url signature>``; the payload names the link, merchant, order and expiry.
The signature makes a token unforgeable; the database row makes it single-use.

The secret can be rotated without voiding the links customers already hold: new links are signed with the current
secret, and a link signed with a previous one (``WINBACK_LINK_SECRET_PREVIOUS``) is still accepted until it expires.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson


class LinkError(ValueError):
    """A payment link cannot be used; ``status_code`` is the HTTP answer and ``title`` the page's heading."""

    def __init__(self, status_code: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.title = title


def tampered() -> LinkError:
    """The error of a token whose signature or format does not check out."""
    return LinkError(400, "This link is not valid", "the payment link is malformed or was altered")


@dataclass(frozen=True)
class LinkClaims:
    """What a verified token says."""

    token_id: str
    merchant_id: str
    order_id: str
    expires_at: datetime


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class LinkSigner:
    """Issues payment-link tokens with ``secret`` and verifies them with it or any of ``previous`` (a rotation)."""

    def __init__(self, secret: str, previous: Sequence[str] = ()) -> None:
        if not secret:
            raise ValueError("the payment-link secret must not be empty")
        if not all(previous):
            raise ValueError("a previous payment-link secret must not be empty")
        self._key = secret.encode()
        self._verify_keys = (self._key, *(old.encode() for old in previous))

    def _sign(self, payload: bytes, key: bytes | None = None) -> bytes:
        return hmac.new(key or self._key, payload, hashlib.sha256).digest()

    def issue(self, claims: LinkClaims) -> str:
        """The token for ``claims``."""
        payload = orjson.dumps(
            {
                "t": claims.token_id,
                "m": claims.merchant_id,
                "o": claims.order_id,
                "e": int(claims.expires_at.timestamp()),
            }
        )
        return f"{_b64(payload)}.{_b64(self._sign(payload))}"

    def verify(self, token: str, now: datetime) -> LinkClaims:
        """The claims of a genuine, unexpired token; LinkError (400 tampered, 410 expired) otherwise."""
        head, dot, tail = token.partition(".")
        if not dot or not head or not tail or len(token) > 2048:
            raise tampered()
        try:
            payload, signature = _unb64(head), _unb64(tail)
        except (ValueError, TypeError):
            raise tampered() from None
        # Every key is tried, so the time taken does not say which one signed the token.
        genuine = [hmac.compare_digest(signature, self._sign(payload, key)) for key in self._verify_keys]
        if not any(genuine):
            raise tampered()
        try:
            raw = orjson.loads(payload)
            claims = LinkClaims(
                token_id=str(raw["t"]),
                merchant_id=str(raw["m"]),
                order_id=str(raw["o"]),
                expires_at=datetime.fromtimestamp(int(raw["e"]), UTC),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise tampered() from None
        if now >= claims.expires_at:
            raise LinkError(
                410, "This link has expired", f"the payment link expired at {claims.expires_at:%Y-%m-%d %H:%M} UTC"
            )
        return claims
