"""The executor's HTTP surface (CONTRACT.md section 5), mounted by the decision API's ``create_app``.

Events and the order view need the merchant's API key (the API's ``CallerDep``); the payment-link pages are
for customers and need only the signed token; the providers' callbacks (``provider_router``: customers' replies
and delivery receipts) need the merchant's callback token in their URL. Handlers validate and hand over to the
state machine.
"""

from __future__ import annotations

import functools
import logging
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse

from model.merchant_config import MerchantConfig
from model.policy import decide, new_decision_id
from model.requests import Decision, DecisionRequest
from model.vocab import Channel
from service.api.deps import CallerDep, Runtime
from service.api.schemas import BODY_ERRORS, CALLER_ERRORS, ErrorBody
from service.executor.channels.base import DeliveryReceipt, ReceiptFailure
from service.executor.channels.templates import link_expiry_text
from service.executor.channels.webhooks import create_provider_router
from service.executor.core import (
    Charged,
    Decider,
    Defer,
    Executor,
    IdempotencyConflictError,
    OrderNotFoundError,
    StaleClaimError,
    Transient,
    TxnIdTakenError,
)
from service.executor.effects import Effects
from service.executor.links import LinkError
from service.executor.optouts import token_matches, unsubscribe_token_matches
from service.executor.pages import PAGE_HEADERS, render
from service.executor.schemas import EventOut, OrderOut, PaymentFailedEvent, PaymentSucceededEvent
from service.executor.settings import ExecutorSettings
from service.executor.views import order_view
from service.json_keys import UniqueKeysRoute
from service.personal_data import mask_addresses_in

log = logging.getLogger("winback.executor")

# Events are JSON: a key written twice in one object is refused (422) rather than read as its last value.
router = APIRouter(route_class=UniqueKeysRoute)


@dataclass
class ExecutorRuntime:
    """The executor as the API process uses it: the state machine, and effects for link payments."""

    executor: Executor
    effects: Effects
    settings: ExecutorSettings


def api_decider(runtime: Runtime) -> Decider:
    """decide() with the API's serving model (rules-only if the model fails on a request), counted in metrics."""

    def decider(request: DecisionRequest, merchant: MerchantConfig) -> Decision:
        served = runtime.holder.current
        policy = functools.partial(
            decide, catalog=runtime.catalog, config=runtime.policy, rng=runtime.rng, decision_id=new_decision_id(None)
        )
        try:
            decision = policy(request, merchant, served.scorer)
        except Exception:
            if served.scorer is None:
                raise
            log.exception("model %s failed on a request; answered rules-only", served.version)
            decision = policy(request, merchant, None)
        runtime.metrics.observe_decision(decision)
        return decision

    return decider


def build_executor_runtime(runtime: Runtime, settings: ExecutorSettings | None = None) -> ExecutorRuntime:
    """The executor over the API's database and config (built on the first executor request)."""
    from service.executor.worker import build_effects, build_executor

    settings = settings or ExecutorSettings(database_url=runtime.settings.database_url)
    executor = build_executor(settings, runtime.config, api_decider(runtime), catalog=runtime.catalog)
    return ExecutorRuntime(executor, build_effects(executor, settings, runtime.catalog), settings)


def executor_runtime(app: FastAPI) -> ExecutorRuntime:
    """The app's executor runtime, built on first use (tests may put one on ``app.state.executor`` beforehand)."""
    found: ExecutorRuntime | None = getattr(app.state, "executor", None)
    if found is None:
        found = build_executor_runtime(app.state.runtime)
        app.state.executor = found
    return found


def get_executor(request: Request) -> ExecutorRuntime:
    """The app's executor runtime (see ``executor_runtime``)."""
    return executor_runtime(request.app)


ExecutorDep = Annotated[ExecutorRuntime, Depends(get_executor)]

_EVENT_ERRORS: dict[int | str, dict[str, Any]] = {
    **CALLER_ERRORS,
    **BODY_ERRORS,
    409: {
        "model": ErrorBody,
        "description": "the idempotency key was used with a different body, or (payment-failed) a history txn_id is "
        "another order's",
    },
}
_LINK_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "a link whose token does not check out (an HTML page says so)"},
    409: {"description": "the order is already paid or the link was used (an HTML page says so)"},
    410: {"description": "the link has expired (an HTML page says so)"},
}


@router.post(
    "/v1/events/payment-failed",
    response_model=EventOut,
    status_code=status.HTTP_202_ACCEPTED,
    responses=_EVENT_ERRORS,
    tags=["executor"],
)
async def payment_failed(body: PaymentFailedEvent, caller: CallerDep, runtime: ExecutorDep) -> EventOut:
    """A payment failed: winback takes over the order (the same idempotency key again changes nothing)."""
    caller.require(body.merchant_id)
    try:
        answer = await run_in_threadpool(
            runtime.executor.payment_failed, caller.merchant_id, body.model_dump(mode="json")
        )
    except (IdempotencyConflictError, TxnIdTakenError) as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from None
    return EventOut(order_id=answer.order_id, state=answer.state)  # type: ignore[arg-type]


@router.post(
    "/v1/events/payment-succeeded",
    response_model=EventOut,
    status_code=status.HTTP_202_ACCEPTED,
    responses={**_EVENT_ERRORS, 404: {"description": "unknown order"}},
    tags=["executor"],
)
async def payment_succeeded(body: PaymentSucceededEvent, caller: CallerDep, runtime: ExecutorDep) -> EventOut:
    """The order succeeded elsewhere: cancel everything still scheduled for it."""
    try:
        answer = await run_in_threadpool(
            runtime.executor.payment_succeeded, caller.merchant_id, body.model_dump(mode="json")
        )
    except IdempotencyConflictError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from None
    except OrderNotFoundError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from None
    return EventOut(order_id=answer.order_id, state=answer.state)  # type: ignore[arg-type]


@router.get(
    "/v1/orders/{order_id}",
    response_model=OrderOut,
    responses={**CALLER_ERRORS, 404: {"model": ErrorBody, "description": "unknown order"}},
    tags=["executor"],
)
async def get_order(order_id: str, caller: CallerDep, runtime: ExecutorDep) -> OrderOut:
    """An order with its attempts, nudges, decisions, scheduled actions and webhook."""
    view = await run_in_threadpool(order_view, runtime.executor.engine, caller.merchant_id, order_id)
    if view is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"order {order_id!r} is not known")
    return view


def _message(status_code: int, title: str, message: str) -> HTMLResponse:
    return HTMLResponse(
        render("message.html", title=title, message=message), status_code=status_code, headers=PAGE_HEADERS
    )


@router.get("/pay/{token}", response_class=HTMLResponse, responses=_LINK_ERRORS, tags=["payment links"])
async def pay_page(token: str, runtime: ExecutorDep) -> HTMLResponse:
    """The customer's payment page: the order and a pay button."""
    try:
        page = await run_in_threadpool(runtime.executor.open_link, token)
    except LinkError as exc:
        return _message(exc.status_code, exc.title, str(exc))
    except Exception:
        log.exception("payment page failed")
        return _message(500, "Something went wrong", "We could not open this payment link. Please try again later.")
    merchant = runtime.executor.merchant(page.merchant_id)
    return HTMLResponse(
        render(
            "pay.html",
            title="Complete your payment",
            token=token,
            merchant_name=merchant.display_name or page.merchant_id,
            order_id=page.order_id,
            amount=page.amount,
            currency=page.currency,
            # As the message that carried the link said it: the merchant's local time, not UTC.
            expires_at=link_expiry_text(page.expires_at, merchant.retarget.quiet_hours.timezone),
        ),
        headers=PAGE_HEADERS,
    )


def _pay(runtime: ExecutorRuntime, token: str) -> tuple[int, str, str]:
    settings = runtime.settings
    started = runtime.executor.start_link_payment(token, settings.lease_seconds, "api", uuid.uuid4().hex)
    action = started.action
    with runtime.executor.engine.connect() as conn:
        order = runtime.executor.orders_of(conn, [action]).get((action.merchant_id, action.order_id))
    outcome = runtime.effects.perform(action, order)
    if isinstance(outcome, Defer) and runtime.executor.withdraw_link_payment(action):
        # Nothing was sent (the connector would not take it now): the customer keeps the link and tries later.
        return 503, "Please try again shortly", "We could not reach the payment service. Your link still works."
    try:
        with runtime.executor.engine.begin() as conn:
            runtime.executor.complete(conn, action, outcome)
    except StaleClaimError:
        pass  # a worker took the attempt over after our lease; it records the same answer
    except Exception:
        # The customer hears what the switch answered, not that the database failed: the action stays claimed,
        # and once its lease ends a worker sends it again with the same key and records the stored answer.
        log.exception("recording link payment %s failed; a worker records it after the lease", action.action_id)
    if isinstance(outcome, Charged) and outcome.result.status == "success":
        return 200, "Payment received", f"Thank you: order {action.order_id} is paid."
    if isinstance(outcome, Charged):
        return 402, "Payment declined", "Your payment did not go through. We will be in touch with another way to pay."
    if isinstance(outcome, Transient | Defer):
        # A Defer that could not be withdrawn: the payment is a worker's now, which sends it again under its key.
        return 202, "Payment processing", "We are processing your payment and will confirm it shortly."
    return 502, "Payment not possible", "We could not process this payment. Please contact the merchant."


@router.post("/pay/{token}", response_class=HTMLResponse, responses=_LINK_ERRORS, tags=["payment links"])
async def pay(token: str, runtime: ExecutorDep) -> HTMLResponse:
    """Pay again: a new attempt on the same order through the connector; the link is used up."""
    try:
        code, title, message = await run_in_threadpool(_pay, runtime, token)
    except LinkError as exc:
        return _message(exc.status_code, exc.title, str(exc))
    except Exception:
        log.exception("link payment failed")
        return _message(500, "Something went wrong", "We could not take this payment. Please try again later.")
    return _message(code, title, message)


# ------------------------------------------------------------------------------------ e-mail unsubscribe

_UNSUBSCRIBE_ERRORS: dict[int | str, dict[str, Any]] = {
    403: {"description": "the token is not the order's unsubscribe token (an HTML page says so)"},
    404: {"description": "the order or its customer's e-mail address is not known (an HTML page says so)"},
}


def _unsubscribe_refused(runtime: ExecutorRuntime, merchant_id: str, order_id: str, token: str) -> HTMLResponse | None:
    known = merchant_id in runtime.executor.config.merchants
    if known and unsubscribe_token_matches(runtime.settings.unsubscribe_keys(), merchant_id, order_id, token):
        return None
    return _message(403, "This link is not valid", "the unsubscribe link is malformed or was altered")


@router.get("/unsubscribe", response_class=HTMLResponse, responses=_UNSUBSCRIBE_ERRORS, tags=["payment links"])
async def unsubscribe_page(
    merchant_id: str, order_id: str, token: str, request: Request, runtime: ExecutorDep
) -> HTMLResponse:
    """The page the unsubscribe link in an e-mail opens: a button that stops the merchant's e-mails (a GET
    changes nothing, since mail scanners follow links)."""
    refused = _unsubscribe_refused(runtime, merchant_id, order_id, token)
    if refused is not None:
        return refused
    merchant = runtime.executor.merchant(merchant_id)
    page = render(
        "unsubscribe.html",
        title="Unsubscribe from payment e-mails",
        merchant_name=merchant.display_name or merchant_id,
        action=f"/unsubscribe?{request.url.query}",
    )
    return HTMLResponse(page, headers=PAGE_HEADERS)


@router.post("/unsubscribe", response_class=HTMLResponse, responses=_UNSUBSCRIBE_ERRORS, tags=["payment links"])
async def unsubscribe(merchant_id: str, order_id: str, token: str, runtime: ExecutorDep) -> HTMLResponse:
    """Stop the merchant's e-mails to the address of the order's customer, for this and every later order (the
    page's button, and a mail client's one-click unsubscribe, RFC 8058)."""
    refused = _unsubscribe_refused(runtime, merchant_id, order_id, token)
    if refused is not None:
        return refused
    kept = await run_in_threadpool(
        runtime.executor.opt_out_order_address, merchant_id, order_id, Channel.EMAIL, "unsubscribe"
    )
    if kept is None:
        return _message(404, "Nothing to unsubscribe", f"order {order_id} has no e-mail address on record")
    merchant = runtime.executor.merchant(merchant_id)
    name = merchant.display_name or merchant_id
    return _message(200, "You are unsubscribed", f"{name} will send no more e-mails about payments to this address.")


# ------------------------------------------------------------------------------------- provider callbacks

#: Failed receipts that say the merchant's own set-up at its provider is wrong, with what to look at; each is
#: logged as a warning (the nudge keeps the error too: ``GET /v1/orders/{order_id}``).
RECEIPT_FAILURES_TO_FIX: dict[ReceiptFailure | None, str] = {
    "merchant_config": "the template (missing, paused, wrong parameters or language) or a message that needs one",
    "rate_limited": "too many messages from its number (its throughput)",
    "pair_rate_limited": "too many messages from its number to one customer",
}

CALLBACK_URL_HINT = "the URLs `winback executor callback-url --merchant <id> --provider <provider>` prints"


def provider_router(app: FastAPI) -> APIRouter:
    """``/v1/providers/{provider}/inbound`` and ``/receipts`` of ``app``: a STOP reply keeps the opt-out of its
    address, a delivery receipt updates its nudge. Every callback must carry ``?merchant_id=<id>&token=<token>``
    (``service.executor.optouts.callback_token``): 401 without, 403 with a token that is not the merchant's."""

    async def authenticate(request: Request) -> str:
        merchant_id = request.query_params.get("merchant_id")
        token = request.query_params.get("token")
        if not merchant_id or not token:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail=f"provider callback without merchant_id and token in its URL: configure the provider with "
                f"{CALLBACK_URL_HINT}",
            )
        runtime = await run_in_threadpool(executor_runtime, app)
        known = merchant_id in runtime.executor.config.merchants
        if not token_matches(runtime.settings.callback_keys(), merchant_id, token) or not known:
            log.warning("provider callback refused: wrong token", extra={"merchant_id": merchant_id[:128]})
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                detail=f"provider callback token is not merchant {merchant_id[:128]!r}'s: configure the provider "
                f"with {CALLBACK_URL_HINT}",
            )
        return merchant_id

    async def on_receipt(receipt: DeliveryReceipt) -> None:
        executor = executor_runtime(app).executor
        delivered = receipt.status != "failed"
        found = await run_in_threadpool(
            functools.partial(
                executor.record_receipt,
                receipt.provider_message_id,
                delivered,
                receipt.merchant_id,
                error=receipt.error,
                failure=receipt.failure,
                status=receipt.status,
                occurred_at=receipt.occurred_at,
            )
        )
        if found and receipt.opted_out and receipt.merchant_id is not None:  # no more messages it would refuse
            await run_in_threadpool(
                executor.opt_out_message_address, receipt.merchant_id, receipt.provider_message_id, "receipt"
            )
        if found and receipt.failure in RECEIPT_FAILURES_TO_FIX:  # every message of the merchant would fail so
            log.warning(
                "%s refused message %s: %s (%s); check the merchant's %s set-up there",
                receipt.provider,
                receipt.provider_message_id[:256],
                RECEIPT_FAILURES_TO_FIX[receipt.failure],
                mask_addresses_in(receipt.error or "no detail")[:200],
                receipt.provider,
                extra={"merchant_id": receipt.merchant_id},
            )
        # Not found: a receipt before its send is recorded is kept by ``record_receipt`` and applied then, an opt-out
        # included; one for another sender's message on the same provider account expires unmatched.

    async def on_opt_out(merchant_id: str, channel: Channel, address: str) -> None:
        executor = executor_runtime(app).executor
        await run_in_threadpool(executor.opt_out_address, merchant_id, channel, address, "reply")

    return create_provider_router(on_receipt, on_opt_out, authenticate=authenticate)
