"""Local fake providers for tests and ``make demo``: each imitates one provider's endpoint and answer format.

``run_fake_provider(kind)`` starts a FastAPI app under uvicorn in a thread on a free loopback port and returns
a handle with ``base_url`` and its :class:`FakeState`; ``FakeSmtpServer`` is a small SMTP server. Every fake
records what it receives (``GET /_messages``, or ``state.messages``), can be told to fail (``state.fail`` /
``POST /_control/fail``: answer an HTTP status N times; ``state.hang``: answer nothing for a while, N times;
neither records the request, as if it never reached the provider) and can call a callback URL with a delivery
receipt or an inbound reply in the provider's own format (``POST /_control/receipt``, ``/_control/inbound``).

Third-party fakes record every request, duplicates included, as the real provider would deliver both; the
``push`` and ``generic`` fakes (our own protocols) honour ``Idempotency-Key``: a repeat answers the first id.
Run one from a shell with ``python -m service.executor.channels.fakes KIND --port N``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import email
import email.policy
import itertools
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from service.executor.channels.adapters import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, verify_signature

KINDS = ("gupshup", "interakt", "karix", "push", "generic")


@dataclass
class FakeState:
    """What a fake provider expects, has received, and is told to do next (thread-safe)."""

    kind: str
    api_key: str = "test-key"
    username: str = "test-user"
    password: str = "test-pass"
    push_secret: str = "test-push-secret"
    dedupe: bool = False
    rejected_numbers: set[str] = field(default_factory=set)
    auto_receipt_url: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    _faults: list[tuple[str, float, str | None]] = field(default_factory=list)
    _ids: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _counter: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def fail(self, times: int = 1, status: int = 503, retry_after: str | None = None) -> None:
        """Answer the next ``times`` send requests with HTTP ``status`` (and record nothing), with a
        ``Retry-After: <retry_after>`` header when given."""
        with self._lock:
            self._faults.extend([("status", float(status), retry_after)] * times)

    def hang(self, times: int = 1, seconds: float = 2.0) -> None:
        """Answer the next ``times`` send requests only after ``seconds`` (with 504), recording nothing."""
        with self._lock:
            self._faults.extend([("hang", seconds, None)] * times)

    def reject(self, number: str) -> None:
        """Refuse messages to this number (digits, no ``+``) as the provider refuses an invalid/opted-out one."""
        self.rejected_numbers.add(number.lstrip("+"))

    def reset(self) -> None:
        """Forget received messages, pending faults, rejected numbers and the receipt URL."""
        with self._lock:
            self.messages.clear()
            self._ids.clear()
            self._faults.clear()
            self.rejected_numbers.clear()
            self.auto_receipt_url = None

    def take_fault(self) -> tuple[str, float, str | None] | None:
        with self._lock:
            return self._faults.pop(0) if self._faults else None

    def record(self, idempotency_key: str | None, entry: dict[str, Any]) -> tuple[str, bool]:
        """Store one received message; returns its provider id and whether it was new."""
        with self._lock:
            if self.dedupe and idempotency_key and idempotency_key in self._ids:
                return self._ids[idempotency_key], False
            message_id = f"{self.kind}-{next(self._counter)}-{uuid.uuid4().hex[:8]}"
            if idempotency_key:
                self._ids.setdefault(idempotency_key, message_id)
            self.messages.append({"id": message_id, "idempotency_key": idempotency_key, **entry})
            return message_id, True

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(m) for m in self.messages]


# --- provider callback payloads ----------------------------------------------------------------------------------


def receipt_payload(kind: str, message_id: str, status: str, channel: str = "whatsapp") -> Any:
    """A delivery receipt for ``message_id`` in the provider's callback format (status delivered/read/failed)."""
    now_ms = int(time.time() * 1000)
    if kind == "gupshup" and channel == "sms":
        return {
            "externalId": message_id,
            "deliveredTS": str(now_ms),
            "status": {"delivered": "SUCCESS", "failed": "FAIL"}.get(status, "UNKNOWN"),
            "cause": "SUCCESS" if status == "delivered" else "UNKNOWN_SUBSCRIBER",
            "phoneNo": "",
            "errCode": "000",
        }
    if kind == "gupshup":
        inner: dict[str, Any] = {"ts": now_ms // 1000}
        event: dict[str, Any] = {
            "id": f"wamid.{uuid.uuid4().hex}",
            "gsId": message_id,
            "type": status,
            "destination": "",
            "payload": inner,
        }
        if status == "failed":
            event = {
                "id": message_id,
                "type": "failed",
                "destination": "",
                "payload": {"code": 1002, "reason": "Number does not exist on WhatsApp"},
            }
        return {"app": "FakeApp", "timestamp": now_ms, "version": 2, "type": "message-event", "payload": event}
    if kind == "interakt":
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
        message = {
            "id": message_id,
            "message_status": status.capitalize(),
            f"{'seen' if status == 'read' else status}_at_utc": stamp,
        }
        return {"timestamp": stamp, "type": f"message_api_{status}", "data": {"customer": {}, "message": message}}
    if kind == "karix":
        karix_status = {"failed": "undelivered"}.get(status, status)
        return {
            "data": {
                "uid": message_id,
                "status": karix_status,
                "direction": "outbound",
                "updated_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        }
    return {"provider_message_id": message_id, "status": status, "occurred_at": int(time.time())}


def karix_whatsapp_report(
    mid: str,
    status: str,
    code: str | None = None,
    reason: str | None = None,
    cust_ref: str | None = None,
    at_ms: int | None = None,
) -> dict[str, Any]:
    """A delivery report of Karix's WhatsApp API for the message its send answered ``mid`` for, shaped as one
    logged from Karix (data/README.md): ``status`` sent/delivered/read/failed, ``code`` and ``reason`` as Karix
    puts them (a delivered one: Karix's own ``101``, "Delivered to User", unless given), ``cust_ref`` echoed from
    the send."""
    at = int(time.time() * 1000) if at_ms is None else at_ms
    recipient: dict[str, Any] = {"to": "919800000001", "recipient_type": "individual"}
    if cust_ref is not None:
        recipient["reference"] = {"cust_ref": cust_ref}
    delivered = status == "delivered"
    attributes = {
        "status": status,
        "reason": reason or ("Delivered to User" if delivered else ""),
        "code": code or ("101" if delivered else ""),
    }
    return {
        "channel": "WABA",
        "appDetails": {"type": "LIVE", "id": ""},
        "recipient": recipient,
        "batchId": "",
        "campaignId": "",
        "templateId": "payment_reminder",
        "templateCategory": "UTILITY",
        "sender": {"from": "919000000000"},
        "events": {
            "eventType": "DELIVERY EVENTS",
            "timestamp": str(at),
            "date": time.strftime("%Y-%B-%d", time.gmtime(at / 1000)),
            "mid": mid,
        },
        "notificationAttributes": attributes,
    }


def karix_whatsapp_message(sender: str, text: str, content_type: str = "text") -> dict[str, Any]:
    """A customer's message on Karix's WhatsApp API (``User initiated``), as public integrations read it
    (data/README.md): typed ``text``, or the ``button`` of a template's quick reply."""
    content: dict[str, Any] = {"text": {"body": text}} if content_type == "text" else {"button": {"text": text}}
    at = int(time.time() * 1000)
    return {
        "channel": "WABA",
        "appDetails": {"type": "LIVE"},
        "events": {"eventType": "User initiated", "timestamp": str(at), "date": time.strftime("%Y-%B-%d")},
        "eventContent": {
            "message": {"from": sender.lstrip("+"), "to": "919000000000", "contentType": content_type} | content
        },
    }


def inbound_payload(kind: str, sender: str, text: str, channel: str = "whatsapp") -> Any:
    """A customer's reply in the provider's callback format (``sender`` as the provider writes it)."""
    digits = sender.lstrip("+")
    if kind == "gupshup" and channel == "sms":
        return {"msisdn": digits, "content": text, "keyword": text.split(" ", 1)[0].upper(), "phonecode": ""}
    if kind == "gupshup":
        return {
            "app": "FakeApp",
            "timestamp": int(time.time() * 1000),
            "version": 2,
            "type": "message",
            "payload": {
                "id": f"ABEG{uuid.uuid4().hex[:12]}",
                "source": digits,
                "type": "text",
                "payload": {"text": text},
                "sender": {"phone": digits, "name": "Customer"},
            },
        }
    if kind == "interakt":
        return {
            "type": "message_received",
            "data": {
                "customer": {"channel_phone_number": digits},
                "message": {"message": text, "message_content_type": "Text"},
            },
        }
    if kind == "karix":
        return {
            "data": {
                "uid": uuid.uuid4().hex,
                "direction": "inbound",
                "channel": channel,
                "source": f"+{digits}",
                "content": {"text": text},
            }
        }
    return {"from": sender, "text": text, "channel": channel}


# --- the fake apps ------------------------------------------------------------------------------------------------


def _unauthorised(detail: str) -> JSONResponse:
    return JSONResponse({"status": "error", "message": detail}, status_code=401)


async def _fault(state: FakeState) -> Response | None:
    fault = state.take_fault()
    if fault is None:
        return None
    mode, value, retry_after = fault
    if mode == "hang":
        await asyncio.sleep(value)
        return JSONResponse({"status": "error", "message": "gateway timeout"}, status_code=504)
    headers = {"Retry-After": retry_after} if retry_after is not None else None
    return JSONResponse({"status": "error", "message": "fake failure"}, status_code=int(value), headers=headers)


def _basic(request: Request) -> tuple[str, str] | None:
    header = request.headers.get("authorization", "")
    if not header.startswith("Basic "):
        return None
    user, _, password = base64.b64decode(header[6:]).decode(errors="replace").partition(":")
    return user, password


def create_fake_app(state: FakeState) -> FastAPI:
    """The FastAPI app imitating ``state.kind``'s send endpoint(s), plus ``/_messages`` and ``/_control/*``."""
    app = FastAPI(title=f"fake {state.kind}")
    http_holder: dict[str, httpx.AsyncClient] = {}

    async def post_callback(url: str, payload: Any) -> int:
        client = http_holder.setdefault("client", httpx.AsyncClient(timeout=5.0))
        response = await client.post(url, json=payload)
        return response.status_code

    async def accepted(message_id: str, channel: str) -> None:
        if state.auto_receipt_url:
            await post_callback(state.auto_receipt_url, receipt_payload(state.kind, message_id, "delivered", channel))

    if state.kind == "gupshup":

        async def gupshup_wa(request: Request, template: bool) -> Response:
            if request.headers.get("apikey") != state.api_key:
                return _unauthorised("Authentication Failed")
            if (failure := await _fault(state)) is not None:
                return failure
            form = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
            destination = form.get("destination", "")
            if not destination.isdigit() or destination in state.rejected_numbers or not form.get("source"):
                return JSONResponse({"status": "error", "message": "Invalid Destination"}, status_code=400)
            entry = {
                "channel": "whatsapp",
                "path": request.url.path,
                "form": form,
                "to": destination,
                "headers": {"apikey": "<set>", "content-type": request.headers.get("content-type")},
            }
            entry["template" if template else "message"] = json.loads(
                form.get("template" if template else "message", "null")
            )
            message_id, _ = state.record(request.headers.get(IDEMPOTENCY_HEADER), entry)
            await accepted(message_id, "whatsapp")
            return JSONResponse({"status": "submitted", "messageId": message_id}, status_code=202)

        @app.post("/wa/api/v1/msg")
        async def wa_msg(request: Request) -> Response:
            return await gupshup_wa(request, template=False)

        @app.post("/wa/api/v1/template/msg")
        async def wa_template(request: Request) -> Response:
            return await gupshup_wa(request, template=True)

        @app.post("/GatewayAPI/rest")
        async def sms(request: Request) -> Response:
            form = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
            if form.get("userid") != state.username or form.get("password") != state.password:
                return JSONResponse(
                    {"response": {"id": "105", "phone": "", "details": "Authentication failed", "status": "error"}}
                )
            if (failure := await _fault(state)) is not None:
                return failure
            send_to = form.get("send_to", "")
            if form.get("method", "").lower() != "sendmessage" or not form.get("msg"):
                return JSONResponse(
                    {"response": {"id": "101", "phone": send_to, "details": "Method/msg missing", "status": "error"}}
                )
            if not send_to.isdigit() or send_to in state.rejected_numbers:
                return JSONResponse(
                    {
                        "response": {
                            "id": "175",
                            "phone": send_to,
                            "details": "The phone number is not valid",
                            "status": "error",
                        }
                    }
                )
            entry = {
                "channel": "sms",
                "path": request.url.path,
                "to": send_to,
                "text": form["msg"],
                "form": {k: ("<set>" if k == "password" else v) for k, v in form.items()},
            }
            message_id, _ = state.record(request.headers.get(IDEMPOTENCY_HEADER), entry)
            await accepted(message_id, "sms")
            return JSONResponse({"response": {"id": message_id, "phone": send_to, "details": "", "status": "success"}})

    elif state.kind == "interakt":

        @app.post("/v1/public/message/")
        async def interakt(request: Request) -> Response:
            if request.headers.get("authorization") != f"Basic {state.api_key}":
                return JSONResponse({"result": False, "message": "Invalid API key"}, status_code=401)
            if (failure := await _fault(state)) is not None:
                return failure
            body = await request.json()
            number = f"{body.get('countryCode', '').lstrip('+')}{body.get('phoneNumber', '')}"
            if not number.isdigit() or number in state.rejected_numbers or body.get("type") != "Template":
                return JSONResponse({"result": False, "message": "Invalid phone number or payload"}, status_code=400)
            key = body.get("callbackData") or request.headers.get(IDEMPOTENCY_HEADER)
            message_id, _ = state.record(
                key, {"channel": "whatsapp", "path": request.url.path, "to": number, "json": body}
            )
            await accepted(message_id, "whatsapp")
            return JSONResponse(
                {"result": True, "message": "Message created successfully", "id": message_id}, status_code=201
            )

    elif state.kind == "karix":

        @app.post("/services/rcm/sendMessage")
        async def karix_whatsapp(request: Request) -> Response:
            """Karix's WhatsApp API: an approved template (``TEMPLATE``, or ``MEDIA_TEMPLATE`` with URL buttons)."""
            if request.headers.get("authentication") != f"Bearer {state.api_key}":
                return JSONResponse({"statusCode": "401", "statusDesc": "Authentication failed"}, status_code=401)
            if (failure := await _fault(state)) is not None:
                return failure
            body = await request.json()
            message = body.get("message") if isinstance(body, dict) else None
            message = message if isinstance(message, dict) else {}
            content = message.get("content") or {}
            kind = str(content.get("type"))
            template = content.get({"TEMPLATE": "template", "MEDIA_TEMPLATE": "mediaTemplate"}.get(kind, "")) or {}
            number = str((message.get("recipient") or {}).get("to", ""))
            if (
                message.get("channel") != "WABA"
                or not template.get("templateId")
                or not number.isdigit()
                or not (message.get("sender") or {}).get("from")
            ):
                return JSONResponse({"statusCode": "400", "statusDesc": "Invalid request"}, status_code=400)
            if number in state.rejected_numbers:
                return JSONResponse({"statusCode": "400", "statusDesc": "Invalid recipient"}, status_code=400)
            message_id, _ = state.record(
                request.headers.get(IDEMPOTENCY_HEADER),
                {"channel": "whatsapp", "path": request.url.path, "to": number, "json": body},
            )
            if state.auto_receipt_url:
                await post_callback(state.auto_receipt_url, karix_whatsapp_report(message_id, "delivered"))
            return JSONResponse({"statusCode": "200", "statusDesc": "Successfully Accepted", "mid": message_id})

        @app.post("/message/")
        async def karix(request: Request) -> Response:
            if _basic(request) != (state.username, state.password):
                return JSONResponse({"error": {"message": "Authentication failed"}}, status_code=401)
            if (failure := await _fault(state)) is not None:
                return failure
            body = await request.json()
            destinations = body.get("destination")
            if not isinstance(destinations, list) or len(destinations) != 1 or not body.get("source"):
                return JSONResponse({"error": {"message": "destination must be a list of one number"}}, status_code=400)
            number = str(destinations[0]).lstrip("+")
            message_id, _ = state.record(
                request.headers.get(IDEMPOTENCY_HEADER),
                {
                    "channel": body.get("channel"),
                    "path": request.url.path,
                    "to": number,
                    "json": body,
                    "api_version": request.headers.get("api-version"),
                },
            )
            status = "failed" if number in state.rejected_numbers else "queued"
            record: dict[str, Any] = {
                "uid": message_id,
                "status": status,
                "destination": f"+{number}",
                "source": body["source"],
                "direction": "outbound",
            }
            if status == "failed":
                record["error"] = {"code": "1003", "message": "Invalid destination"}
            else:
                await accepted(message_id, str(body.get("channel")))
            return JSONResponse({"objects": [record], "meta": {"request_uuid": uuid.uuid4().hex}}, status_code=202)

    elif state.kind in ("push", "generic"):
        path = "/push" if state.kind == "push" else "/v1/messages"

        @app.post(path)
        async def own(request: Request) -> Response:
            raw = await request.body()
            if state.kind == "push" and not verify_signature(
                state.push_secret, raw, request.headers.get(SIGNATURE_HEADER, "")
            ):
                return JSONResponse({"error": "bad signature"}, status_code=401)
            if (failure := await _fault(state)) is not None:
                return failure
            body = json.loads(raw)
            to = str(body.get("device_token") or body.get("to") or "")
            if to.lstrip("+") in state.rejected_numbers:
                return JSONResponse({"error": "unknown recipient"}, status_code=404)
            message_id, _ = state.record(
                request.headers.get(IDEMPOTENCY_HEADER),
                {"channel": body.get("channel", "push"), "path": path, "to": to, "json": body},
            )
            return JSONResponse({"id": message_id}, status_code=200)

    else:
        raise ValueError(f"unknown fake provider kind {state.kind!r}: one of {', '.join(KINDS)}")

    @app.get("/_messages")
    async def messages() -> list[dict[str, Any]]:
        return state.snapshot()

    @app.post("/_control/fail")
    async def control_fail(body: dict[str, Any]) -> dict[str, str]:
        if body.get("mode") == "hang":
            state.hang(int(body.get("times", 1)), float(body.get("seconds", 2.0)))
        else:
            state.fail(int(body.get("times", 1)), int(body.get("status", 503)))
        return {"ok": "true"}

    @app.post("/_control/receipt")
    async def control_receipt(body: dict[str, Any]) -> dict[str, int]:
        payload = receipt_payload(
            state.kind, body["message_id"], body.get("status", "delivered"), body.get("channel", "whatsapp")
        )
        return {"callback_status": await post_callback(body["callback_url"], payload)}

    @app.post("/_control/inbound")
    async def control_inbound(body: dict[str, Any]) -> dict[str, int]:
        payload = inbound_payload(state.kind, body["from"], body.get("text", "STOP"), body.get("channel", "whatsapp"))
        return {"callback_status": await post_callback(body["callback_url"], payload)}

    return app


# --- running a fake in this process -------------------------------------------------------------------------------


class _ThreadedServer:
    """Runs an ASGI app with uvicorn in a daemon thread on a loopback socket."""

    def __init__(self, app: FastAPI, port: int = 0) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(
            app, log_level="warning", lifespan="off", ws="none", http="h11", loop="asyncio", timeout_graceful_shutdown=1
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake provider did not start within 10 s")
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
        self._sock.close()


class RunningFake:
    """A fake provider serving on ``base_url`` until closed (a context manager)."""

    def __init__(self, state: FakeState, port: int = 0) -> None:
        self.state = state
        self._server = _ThreadedServer(create_fake_app(state), port)
        self.base_url = f"http://127.0.0.1:{self._server.port}"

    def __enter__(self) -> RunningFake:
        self._server.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.stop()


def run_fake_provider(kind: str, port: int = 0, **settings: Any) -> RunningFake:
    """A fake of ``kind`` (one of KINDS); use as ``with run_fake_provider("gupshup") as fake: ...``."""
    settings.setdefault("dedupe", kind in ("push", "generic"))
    return RunningFake(FakeState(kind=kind, **settings), port)


# --- fake SMTP -----------------------------------------------------------------------------------------------------


class FakeSmtpServer:
    """A minimal SMTP server (EHLO, AUTH PLAIN, MAIL, RCPT, DATA, RSET, NOOP, QUIT) recording each e-mail.

    ``fail(times, code)`` answers MAIL FROM with ``code`` (4xx temporary, 5xx permanent), or another command with
    another text (``at``, ``text``: Amazon SES answers its throttling after DATA, Exchange Online its SMTP AUTH
    turned off at AUTH); ``reject(address)`` refuses RCPT TO with 550 (or another answer: a recipient's provider
    banning the sender). ``broken_starttls``: STARTTLS is offered, then answered with no TLS (a failed handshake).
    Use as a context manager; ``port`` is chosen free unless given.
    """

    def __init__(
        self,
        port: int = 0,
        username: str | None = None,
        password: str | None = None,
        *,
        broken_starttls: bool = False,
    ) -> None:
        self.messages: list[dict[str, Any]] = []
        self.rejected: dict[str, tuple[int, str]] = {}
        self._faults: list[tuple[int, str, str]] = []
        self._credentials = (username, password) if username else None
        self._broken_starttls = broken_starttls
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._requested_port = port
        self.port = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.base_events.Server | None = None

    def fail(self, times: int = 1, code: int = 451, text: str = "fake failure", at: str = "MAIL") -> None:
        """Answer the next ``times`` sends at command ``at`` (``AUTH``, ``MAIL``, ``RCPT`` or ``DATA``'s end) with
        ``code`` and ``text`` (its lines joined by newlines: a multi-line reply)."""
        with self._lock:
            self._faults.extend([(code, text, at.upper())] * times)

    def _fault(self, at: str) -> tuple[int, str] | None:
        """The fault planned for command ``at`` of this send, taken off the list; None when the first is not at it."""
        with self._lock:
            if self._faults and self._faults[0][2] == at:
                code, text, _ = self._faults.pop(0)
                return code, text
        return None

    def reject(self, address: str, code: int = 550, text: str = "5.1.1 no such user") -> None:
        """Refuse RCPT TO for this address, every time, with ``code`` and ``text`` (by default: no such user)."""
        self.rejected[address.lower()] = (code, text)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._session, "127.0.0.1", self._requested_port)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._server.close()
        self._loop.run_until_complete(self._server.wait_closed())
        self._loop.close()

    def __enter__(self) -> FakeSmtpServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake SMTP server did not start within 10 s")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def say(line: str) -> None:
            writer.write(line.encode() + b"\r\n")
            await writer.drain()

        async def refuse(fault: tuple[int, str]) -> None:
            code, text = fault
            lines = text.split("\n")
            for line in lines[:-1]:
                await say(f"{code}-{line}")
            await say(f"{code} {lines[-1]}")

        sender, recipients = "", list[str]()
        await say("220 fake-smtp ready")
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while line := (await reader.readline()).decode(errors="replace").strip():
                verb = line.split(" ", 1)[0].upper()
                arg = line[len(verb) :].strip()
                if verb == "EHLO":
                    await say("250-fake-smtp")
                    if self._credentials:
                        await say("250-AUTH PLAIN")
                    if self._broken_starttls:
                        await say("250-STARTTLS")
                    await say("250 8BITMIME")
                elif verb == "HELO":
                    await say("250 fake-smtp")
                elif verb == "STARTTLS" and self._broken_starttls:
                    await say("220 2.0.0 Ready to start TLS")
                    await say("this is no TLS handshake")
                    break
                elif verb == "AUTH":
                    fault = self._fault("AUTH")
                    if fault is not None:
                        await refuse(fault)
                        continue
                    parts = arg.split(" ")
                    given = base64.b64decode(parts[1]).split(b"\0") if len(parts) > 1 else []
                    ok = self._credentials and [p.decode() for p in given[1:]] == list(self._credentials)
                    await say("235 2.7.0 Authentication successful" if ok else "535 5.7.8 Authentication failed")
                elif verb == "MAIL":
                    fault = self._fault("MAIL")
                    if fault is not None:
                        await refuse(fault)
                        continue
                    sender, recipients = arg.partition(":")[2].split(" ")[0].strip("<>"), []
                    await say("250 OK")
                elif verb == "RCPT":
                    address = arg.partition(":")[2].strip().strip("<>")
                    fault = self._fault("RCPT")
                    if fault is not None:
                        await refuse(fault)
                    elif address.lower() in self.rejected:
                        await refuse(self.rejected[address.lower()])
                    else:
                        recipients.append(address)
                        await say("250 OK")
                elif verb == "DATA":
                    await say("354 end with <CRLF>.<CRLF>")
                    lines = []
                    while (data := await reader.readline()) not in (b".\r\n", b".\n", b""):
                        lines.append(data[1:] if data.startswith(b"..") else data)
                    fault = self._fault("DATA")
                    if fault is not None:  # not taken: nothing recorded
                        await refuse(fault)
                        continue
                    parsed = email.message_from_bytes(b"".join(lines), policy=email.policy.default)
                    body = parsed.get_body(preferencelist=("plain",))
                    with self._lock:
                        self.messages.append(
                            {
                                "from": sender,
                                "to": list(recipients),
                                "subject": str(parsed["Subject"]),
                                "message_id": str(parsed["Message-ID"]),
                                "idempotency_key": str(parsed["X-Winback-Idempotency-Key"]),
                                "list_unsubscribe": parsed["List-Unsubscribe"],
                                "list_unsubscribe_post": parsed["List-Unsubscribe-Post"],
                                "text": body.get_content() if body is not None else "",  # type: ignore[attr-defined]
                            }
                        )
                    await say("250 OK queued")
                elif verb in ("RSET", "NOOP"):
                    sender, recipients = ("", []) if verb == "RSET" else (sender, recipients)
                    await say("250 OK")
                elif verb == "QUIT":
                    await say("221 bye")
                    break
                else:
                    await say("502 command not implemented")
        writer.close()


def main(argv: list[str] | None = None) -> None:
    """Serve one fake provider until interrupted (for ``make demo``)."""
    parser = argparse.ArgumentParser(description="Run a fake messaging provider on 127.0.0.1.")
    parser.add_argument("kind", choices=[*KINDS, "smtp"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--receipts-url", default=None, help="POST a 'delivered' receipt here for each message")
    args = parser.parse_args(argv)
    if args.kind == "smtp":
        with FakeSmtpServer(args.port) as smtp:
            print(f"fake smtp on 127.0.0.1:{smtp.port}", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()
        return
    state = FakeState(kind=args.kind, dedupe=args.kind in ("push", "generic"), auto_receipt_url=args.receipts_url)
    config = uvicorn.Config(create_fake_app(state), host="127.0.0.1", port=args.port, log_level="warning")
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
