"""Provider callbacks: ``POST /v1/providers/{provider}/receipts`` and ``POST /v1/providers/{provider}/inbound``.

The router only parses; what happens next is the caller's: ``on_receipt(receipt)`` for each delivery receipt,
``on_opt_out(merchant_id, channel, address)`` for each reply asking to stop. Callbacks may be plain or async.
Inbound callbacks name their merchant with ``?merchant_id=`` in the callback URL configured at the provider
(one callback URL per merchant app), or through the optional ``resolve_merchant`` callable. With
``authenticate`` (the app's router), every callback is first authenticated by it, which names the merchant (then
also set on each receipt) or raises an HTTPException.
Bodies may be JSON, form-encoded, or (Gupshup SMS delivery reports and keyword replies, sent with GET) query
parameters.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel

from model.vocab import Channel
from service.executor.channels.base import DeliveryReceipt, InboundMessage
from service.executor.channels.inbound import (
    PROVIDERS,
    PayloadError,
    parse_delivery_receipts,
    parse_inbound,
    wants_opt_out,
)
from service.json_keys import RepeatedKeyError, loads_refusing_repeated_keys
from service.personal_data import mask_address

logger = logging.getLogger("winback.executor.channels")

ReceiptCallback = Callable[[DeliveryReceipt], Awaitable[None] | None]
OptOutCallback = Callable[[str, Channel, str], Awaitable[None] | None]
MerchantResolver = Callable[[InboundMessage], str | None]
#: Authenticates one callback request: the merchant it is for, or an HTTPException (401/403) raised.
Authenticator = Callable[[Request], Awaitable[str] | str]


class ReceiptsAck(BaseModel):
    """Answer to a receipts callback: how many delivery receipts it carried."""

    received: int


class InboundAck(BaseModel):
    """Answer to an inbound callback: whether it was a text reply and whether it opted out."""

    message: bool
    opted_out: bool


async def _call(callback: Callable[..., Awaitable[Any] | Any], *args: Any) -> Any:
    result = callback(*args)
    if inspect.isawaitable(result):
        return await result
    return result


async def _payload(request: Request) -> Any:
    raw = await request.body()
    content_type = request.headers.get("content-type", "")
    if not raw:
        return dict(request.query_params)
    if "application/x-www-form-urlencoded" in content_type:
        # Parsed here rather than with request.form(), which needs python-multipart for no gain on these bodies.
        return dict(parse_qsl(raw.decode(errors="replace"), keep_blank_values=True))
    try:
        return loads_refusing_repeated_keys(raw)
    except RepeatedKeyError as exc:
        raise malformed(RepeatedKeyError.reason, *exc.path) from None
    except ValueError:
        raise malformed("callback body is neither JSON nor a form") from None


def malformed(message: str, *path: int | str) -> RequestValidationError:
    """The contract's answer to malformed input (CONTRACT.md section 1), a 422 naming where in the body (``path``;
    none: the body as a whole), for a callback body winback cannot read. A body that is not JSON was a bare 400
    while a key written twice was a 422. Gupshup retries any answer but a 2xx, drawing no line between 4xx codes,
    and no public document of Interakt or Karix says a code stops theirs (data/README.md): which 4xx it is tells
    only the operator reading it, and the decision API's 422 tells them most."""
    return RequestValidationError([{"type": "value_error", "loc": ("body", *path), "msg": message}])


def _check_provider(provider: str) -> None:
    if provider not in PROVIDERS:
        raise HTTPException(status_code=404, detail=f"unknown provider {provider!r}: one of {sorted(PROVIDERS)}")


def create_provider_router(
    on_receipt: ReceiptCallback,
    on_opt_out: OptOutCallback,
    resolve_merchant: MerchantResolver | None = None,
    authenticate: Authenticator | None = None,
) -> APIRouter:
    """The router of provider callbacks, calling the given callbacks (see the module docstring)."""
    router = APIRouter(prefix="/v1/providers", tags=["providers"])

    async def receipts(provider: str, request: Request) -> ReceiptsAck:
        _check_provider(provider)
        merchant_id: str | None = await _call(authenticate, request) if authenticate else None
        try:
            found = parse_delivery_receipts(provider, await _payload(request))
        except PayloadError as exc:
            raise malformed(str(exc), *exc.path) from None
        for receipt in found:
            if merchant_id is not None:
                receipt = receipt.model_copy(update={"merchant_id": merchant_id})
            await _call(on_receipt, receipt)
        return ReceiptsAck(received=len(found))

    router.add_api_route("/{provider}/receipts", receipts, methods=["POST"], response_model=ReceiptsAck)
    # Gupshup Enterprise SMS calls its real-time delivery URL with GET and query parameters by default.
    router.add_api_route(
        "/{provider}/receipts", receipts, methods=["GET"], response_model=ReceiptsAck, include_in_schema=False
    )

    async def inbound(provider: str, request: Request) -> InboundAck:
        _check_provider(provider)
        authenticated: str | None = await _call(authenticate, request) if authenticate else None
        try:
            message = parse_inbound(provider, await _payload(request))
        except PayloadError as exc:
            raise malformed(str(exc), *exc.path) from None
        if message is None:
            return InboundAck(message=False, opted_out=False)
        if not wants_opt_out(message):
            return InboundAck(message=True, opted_out=False)
        merchant_id = (
            authenticated
            or request.query_params.get("merchant_id")
            or (resolve_merchant(message) if resolve_merchant else None)
        )
        if not merchant_id:
            logger.warning("opt-out from %s via %s without a merchant", mask_address(message.sender), provider)
            raise HTTPException(
                status_code=400,
                detail="opt-out reply without a merchant: configure the callback URL with ?merchant_id=<id>",
            )
        await _call(on_opt_out, merchant_id, message.channel, message.sender)
        logger.info(
            "opt-out from %s on %s",
            mask_address(message.sender),
            message.channel.value,
            extra={"merchant_id": merchant_id},
        )
        return InboundAck(message=True, opted_out=True)

    router.add_api_route("/{provider}/inbound", inbound, methods=["POST"], response_model=InboundAck)

    async def keyword_inbound(provider: str, request: Request) -> Response:
        await inbound(provider, request)
        return Response(KEYWORD_NO_REPLY, media_type="application/xml")

    # Gupshup Enterprise SMS forwards a keyword reply (a STOP) by calling the configured URL with its fields in the
    # query (``?phonecode=%pcode&keyword=%kw&content=%con&msisdn=%ph...``): a GET. It texts the customer what the
    # URL answers: the messages of an XML ``<response>``, else the answer's first 160 characters (Gupshup's docs,
    # "Keyword Response URL"). So the answer is a response with no message, not the JSON acknowledgement, which the
    # customer would have got as an SMS.
    router.add_api_route("/{provider}/inbound", keyword_inbound, methods=["GET"], include_in_schema=False)
    return router


#: A keyword response URL's answer that sends the customer nothing (Gupshup Enterprise SMS).
KEYWORD_NO_REPLY = b'<?xml version="1.0" encoding="UTF-8"?><response></response>'
