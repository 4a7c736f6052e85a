"""The decision route's fast path: a valid, authenticated ``POST /v1/decisions`` answered in plain ASGI.

A decision sits in a payment's failure path, and FastAPI's machinery around it (middleware stack, routing over
every route of the app, dependency solving, the Response object) costs about as much CPU as the decision
itself. This middleware answers the one request that matters for throughput directly: it reads the body,
checks the bearer key (the same constant-time check as ``deps.MerchantKey``), validates the body in one pass
with pydantic-core and calls ``Runtime.decide`` and ``Runtime.record`` — what the FastAPI route's
``decide_json`` calls, so the answer, the stored row, the metrics and the log line are the same.

A request whose body is over ``MAX_REQUEST_BODY`` gets 413 on any route: before its body is read when its
Content-Length says so, or as soon as the limit is passed when it is sent without one (chunked). A gzip or deflate
body (``Content-Encoding``) is decoded here, bounded by the same limit, and handed on as a plain one; another
coding gets 415, and data that does not decode 400 naming the coding. Anything else —
another route, a missing or unknown key, another merchant's id, a body that is not valid or writes a key twice in
one object (service/json_keys.py), a body larger than
``MAX_FAST_BODY``, dependency overrides (tests), an error while deciding — is handed to the
FastAPI app with the body replayed, so every error keeps exactly the status and message the documented route
gives. The FastAPI route stays the documented one (OpenAPI) and the reference for behaviour.
"""

from __future__ import annotations

import time
import zlib

import orjson
from fastapi import FastAPI
from pydantic import ValidationError
from starlette.types import Message, Receive, Scope, Send

from model.requests import DecisionRequest
from service.api.deps import Runtime, bearer_key, caller_for_key
from service.json_keys import repeats_a_key

DECISIONS_PATH = "/v1/decisions"
#: Larger bodies go the documented way (a decision request is a few kilobytes).
MAX_FAST_BODY = 256 * 1024
_RESPONSE_HEADERS = [(b"content-type", b"application/json")]
#: Larger requests are refused (413) before a byte of the body is read: a full batch of 1,000 decision requests
#: is a few megabytes.
MAX_REQUEST_BODY = 32 * 1024 * 1024


class DecisionFastPath:
    """ASGI wrapper of the app (``app.serving_app``): answers valid, authenticated ``POST /v1/decisions`` itself
    and passes everything else (lifespan included) to the app. The app's latency histogram counts both."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Counted while answered, so a model load beside the requests runs between them (api/inflight.py).
        in_flight = self.app.state.runtime.in_flight
        in_flight.started()
        try:
            await self._http(scope, receive, send)
        finally:
            in_flight.ended()

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = _declared_length(scope)
        if declared is not None and declared > MAX_REQUEST_BODY:
            await _refuse(send, 413, _TOO_LARGE)
            return
        codings = _content_codings(scope)
        unsupported = [coding for coding in codings if coding not in _DECODERS]
        if unsupported:
            await _refuse(send, 415, _UNSUPPORTED.format(coding=unsupported[0]))
            return
        if declared is None or codings:
            # Without Content-Length (a chunked body) nothing bounds the body but what is read, and a compressed
            # body is bounded again once decoded: either is read here, up to the limit, and handed on as if it
            # had just arrived (decoded, its Content-Encoding gone).
            body, complete = await _read_body(receive, MAX_REQUEST_BODY)
            if len(body) > MAX_REQUEST_BODY:
                await _refuse(send, 413, _TOO_LARGE)
                return
            if codings and complete and body:
                try:
                    body = _decoded(body, codings)
                except _UndecodableBodyError as exc:
                    await _refuse(send, exc.status, exc.detail)
                    return
                scope = _as_plain_body(scope, len(body))
            receive = _replay(body, complete, receive)
        if scope["method"] != "POST" or scope["path"] != DECISIONS_PATH:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        body, complete = await _read_body(receive, MAX_FAST_BODY)
        answer = self._answer(scope, body) if complete and len(body) <= MAX_FAST_BODY else None
        if answer is None:
            await self.app(scope, _replay(body, complete, receive), send)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*_RESPONSE_HEADERS, (b"content-length", str(len(answer)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": answer})
        runtime: Runtime = self.app.state.runtime
        runtime.metrics.observe_latency("POST", DECISIONS_PATH, 200, time.perf_counter() - started)

    def _answer(self, scope: Scope, body: bytes) -> bytes | None:
        """The answer's JSON, or None when the documented route must answer (errors keep its exact form)."""
        if self.app.dependency_overrides:
            return None
        runtime: Runtime = self.app.state.runtime
        authorization = content_type = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                if authorization is not None:
                    return None  # two keys: the documented route refuses them
                authorization = value
            elif name == b"content-type":
                content_type = value
        if content_type != b"application/json" or authorization is None:
            return None
        key = bearer_key(authorization.decode("latin-1"))
        caller = None if key is None else caller_for_key(runtime, key)
        if caller is None:
            return None
        try:
            request = DecisionRequest.model_validate_json(body)
        except ValidationError:
            return None
        if request.merchant_id != caller.merchant_id or repeats_a_key(body, decision_keys_read(request)):
            return None  # a key written twice: the route's 422 names it
        try:
            served = runtime.decide(request, caller.merchant)
        except Exception:  # the documented route answers (and reports) whatever went wrong, as it always has
            return None
        runtime.record(served)  # outside the fallback: a decision recorded is never decided a second time
        return served.answer.encode()


def decision_keys_read(request: DecisionRequest) -> int:
    """The keys ``request`` was read from, as far as its own models tell (``json_keys.keys_read`` walks every value:
    four times the cost): each model's fields given, the names of its extras among them. What an extra holds is
    not counted, nor would be a model left out here: either only makes the count miss, and the body be parsed a
    second time (test_json_keys checks the shipped requests are cleared by the count alone)."""
    history = request.history
    count = 0
    for model in (request, request.customer, request.payment, request.failure, history, *history.attempts,
                  *history.nudges):  # fmt: skip
        count += len(model.__pydantic_fields_set__)
    return count


def _declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, None without one (the server's HTTP parser refuses an unreadable one)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return None


_TOO_LARGE = f"request body larger than {MAX_REQUEST_BODY} bytes"
_UNSUPPORTED = "Content-Encoding {coding!r} is not supported: send the body uncompressed, gzip or deflate"
#: zlib's ``wbits`` per supported content coding (RFC 9110 section 8.4.1): gzip, and deflate in its zlib wrapper.
_GZIP_WBITS = 31
_DECODERS = {"gzip": _GZIP_WBITS, "x-gzip": _GZIP_WBITS, "deflate": 15}


class _UndecodableBodyError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _content_codings(scope: Scope) -> list[str]:
    """The request's content codings in the order applied (``identity`` left out), lower-cased."""
    codings: list[str] = []
    for name, value in scope["headers"]:
        if name == b"content-encoding":
            codings.extend(part.strip().lower() for part in value.decode("latin-1").split(","))
    return [coding for coding in codings if coding and coding != "identity"]


def _decoded(body: bytes, codings: list[str]) -> bytes:
    """``body`` with its content codings undone (last applied first), never more than MAX_REQUEST_BODY bytes.

    A gzip body may hold several members one after another (RFC 1952): each is decoded in turn."""
    for coding in reversed(codings):
        parts: list[bytes] = []
        size = 0
        rest = body
        while rest:
            decoder = zlib.decompressobj(_DECODERS[coding])
            try:
                part = decoder.decompress(rest, MAX_REQUEST_BODY + 1 - size)
            except zlib.error as exc:
                raise _UndecodableBodyError(400, f"request body is not valid {coding} data: {exc}") from None
            size += len(part)
            if size > MAX_REQUEST_BODY:  # a small body can inflate a thousandfold: stop at the limit
                raise _UndecodableBodyError(413, f"{_TOO_LARGE} once decoded ({coding})")
            if not decoder.eof:
                raise _UndecodableBodyError(400, f"request body is not one complete {coding} stream")
            parts.append(part)
            rest = decoder.unused_data
            if rest and _DECODERS[coding] != _GZIP_WBITS:
                raise _UndecodableBodyError(400, f"request body has data after its {coding} stream")
        body = b"".join(parts)
    return body


def _as_plain_body(scope: Scope, length: int) -> Scope:
    """``scope`` for the decoded body: no Content-Encoding, and its Content-Length."""
    headers = [
        (name, value) for name, value in scope["headers"] if name not in (b"content-encoding", b"content-length")
    ]
    return {**scope, "headers": [*headers, (b"content-length", str(length).encode())]}


async def _refuse(send: Send, status: int, detail: str) -> None:
    """Answer ``status`` with ``{"detail": ...}`` and close the connection (the body may be unread)."""
    body = orjson.dumps({"detail": detail})
    await send({"type": "http.response.start", "status": status,
                "headers": [*_RESPONSE_HEADERS, (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, bool]:
    """The request body, and whether it is complete (False: larger than ``limit``, or the client left)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), True
        if size > limit:
            return b"".join(chunks), False


def _replay(body: bytes, complete: bool, receive: Receive) -> Receive:
    """``receive`` with what was already read handed out first."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": not complete}]

    async def replayed() -> Message:
        if pending:
            return pending.pop()
        message: Message = await receive()
        return message

    return replayed
