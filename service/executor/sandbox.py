"""The sandbox connector: a small payment switch whose answers come from the simulator's outcome model.

``POST /v1/payments`` (the API ``HttpConnector`` speaks) needs ``Idempotency-Key`` and the order's decision
request under ``context``. Each key is charged once: the same key again answers the stored result (a different
body under a used key gets 409). Faults can be injected (``error_rate``: 503 after charging, the worst case for
a caller: the charge happened and the answer was lost) to test the executor's retries.

``GET /v1/payments/{payment_id}`` answers what the sandbox recorded for that processor payment id (the answer its
charge got, also when that answer was lost to an injected fault), or 404 ``{"error": {"code":
"payment_not_found"}}`` when no charge under it came. ``POST /v1/payments/{payment_id}/refunds`` (``Idempotency-Key``,
``{"amount", "currency", "reason"}``) refunds a succeeded payment once per key (the same key again answers the
stored refund, another body under it 409); a payment not found is 404, one that did not succeed or is refunded
already 422. ``GET /v1/stats`` counts calls, charges and refunds.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any

import orjson
from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse

from model.requests import DecisionRequest


@dataclass
class SandboxState:
    """What the sandbox remembers: one answer per idempotency key, and how often it was asked."""

    seed: int = 0
    error_rate: float = 0.0
    delay_seconds: float = 0.0
    answers: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    #: The answer each processor payment id was charged with, and its amount (what a status check reads).
    payments: dict[str, tuple[dict[str, Any], float]] = field(default_factory=dict)
    #: One refund per idempotency key (the body's digest, the answer), and the payment ids refunded.
    refunds: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    refunded: set[str] = field(default_factory=set)
    calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _outcome_model(seed: int) -> Any:
    from model.simulation.world import World

    return World(seed).outcomes


def create_sandbox_app(seed: int = 0, error_rate: float = 0.0, delay_seconds: float = 0.0) -> FastAPI:
    """The sandbox switch as an ASGI app (start it in-process with ``start_sandbox`` or under uvicorn)."""
    state = SandboxState(seed=seed, error_rate=error_rate, delay_seconds=delay_seconds)
    models: dict[str, Any] = {}
    rng = random.Random(seed)
    app = FastAPI(title="winback sandbox connector", version="1")
    app.state.sandbox = state

    def outcomes() -> Any:
        if "model" not in models:
            models["model"] = _outcome_model(seed)
        return models["model"]

    @app.post("/v1/payments")
    async def pay(request: Request, idempotency_key: Annotated[str | None, Header()] = None) -> JSONResponse:
        """Charge once per idempotency key; answer from the outcome model."""
        if not idempotency_key:
            raise HTTPException(400, detail="missing Idempotency-Key header")
        raw = await request.body()
        try:
            body = orjson.loads(raw)
            context = DecisionRequest.model_validate(body["context"])
            strategy, connector = str(body["strategy"]), str(body["connector"])
            execute_at = datetime.fromisoformat(str(body["execute_at"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            detail = f"sandbox needs order_id, strategy, connector, execute_at, context: {exc}"
            raise HTTPException(422, detail=detail) from None
        digest = hashlib.sha256(orjson.dumps({k: v for k, v in body.items() if k != "context"})).hexdigest()
        with state.lock:
            state.calls += 1
            stored = state.answers.get(idempotency_key)
            if stored is None:
                result = outcomes().sandbox_attempt(context, strategy, connector, execute_at, seed=state.seed)
                answer: dict[str, Any] = {
                    "status": "succeeded" if result.success else "failed",
                    "connector": connector,
                    "payment_id": body.get("payment_id"),
                    "reference": "sbx_" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:16],
                }
                if result.error is not None:
                    answer.update(
                        error_code=result.error.error_code,
                        error_message=result.error.error_message,
                        network_decline_code=result.error.network_decline_code,
                        merchant_advice_code=result.error.merchant_advice_code,
                    )
                state.answers[idempotency_key] = (digest, answer)
                if body.get("payment_id") is not None:
                    state.payments[str(body["payment_id"])] = (answer, float(body.get("amount") or 0.0))
            elif stored[0] != digest:
                raise HTTPException(409, detail="Idempotency-Key reused with a different payment")
            else:
                answer = stored[1]
            fault = state.error_rate > 0 and rng.random() < state.error_rate
        if state.delay_seconds:
            time.sleep(state.delay_seconds)
        if fault:
            return JSONResponse({"detail": "injected fault after charging"}, status_code=503)
        return JSONResponse(answer)

    @app.get("/v1/payments/{payment_id}")
    async def payment(payment_id: str) -> JSONResponse:
        """What became of a payment: the answer its charge got, or 404 payment_not_found."""
        with state.lock:
            state.calls += 1
            found = state.payments.get(payment_id)
        if found is None:
            return _not_found(payment_id)
        return JSONResponse(found[0])

    @app.post("/v1/payments/{payment_id}/refunds")
    async def refund(
        payment_id: str, request: Request, idempotency_key: Annotated[str | None, Header()] = None
    ) -> JSONResponse:
        """Refund a succeeded payment, once per idempotency key."""
        if not idempotency_key:
            raise HTTPException(400, detail="missing Idempotency-Key header")
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            raise HTTPException(422, detail=f"a refund needs a JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise HTTPException(422, detail="a refund needs a JSON object")
        digest = hashlib.sha256(orjson.dumps({"payment_id": payment_id, **body})).hexdigest()
        with state.lock:
            state.calls += 1
            stored = state.refunds.get(idempotency_key)
            if stored is not None:
                if stored[0] != digest:
                    raise HTTPException(409, detail="Idempotency-Key reused with a different refund")
                return JSONResponse(stored[1])
            found = state.payments.get(payment_id)
            if found is None:
                return _not_found(payment_id)
            charged, amount = found
            if charged["status"] != "succeeded":
                raise HTTPException(422, detail=f"payment {payment_id} did not succeed: nothing to refund")
            if payment_id in state.refunded:
                raise HTTPException(422, detail=f"payment {payment_id} is refunded already")
            answer = {
                "refund_id": "rf_" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:16],
                "payment_id": payment_id,
                "status": "succeeded",
                "amount": body.get("amount", amount),
                "currency": body.get("currency"),
                "reason": body.get("reason"),
            }
            state.refunds[idempotency_key] = (digest, answer)
            state.refunded.add(payment_id)
            fault = state.error_rate > 0 and rng.random() < state.error_rate
        if fault:
            return JSONResponse({"detail": "injected fault after refunding"}, status_code=503)
        return JSONResponse(answer)

    @app.get("/v1/stats")
    async def stats() -> dict[str, int]:
        """Calls received, distinct charges made and refunds made."""
        return {"calls": state.calls, "charges": len(state.answers), "refunds": len(state.refunds)}

    return app


def _not_found(payment_id: str) -> JSONResponse:
    """The 404 of a payment id no charge came under (``connectors.PAYMENT_NOT_FOUND``)."""
    error = {"code": "payment_not_found", "message": f"no payment {payment_id} was made"}
    return JSONResponse({"error": error}, status_code=404)


class RunningServer:
    """A uvicorn server on a background thread (``url``; ``stop()`` to end it)."""

    def __init__(self, server: Any, thread: threading.Thread, url: str) -> None:
        self.server = server
        self.thread = thread
        self.url = url

    def stop(self) -> None:
        """Ask the server to exit and wait for it."""
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    """Start ``app`` under uvicorn on a daemon thread; returns once it listens (port 0: any free port)."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="winback-sandbox", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"server on {host}:{bound_port} did not start")
        time.sleep(0.01)
    return RunningServer(server, thread, f"http://{host}:{bound_port}")


def start_sandbox(seed: int = 0, error_rate: float = 0.0, port: int = 0) -> RunningServer:
    """Start the sandbox connector in this process (for ``make demo`` and tests)."""
    return serve_in_thread(create_sandbox_app(seed=seed, error_rate=error_rate), port=port)
