"""The decision API (CONTRACT.md section 2): ``create_app(settings)`` builds it; the lifespan loads the model.

Handlers validate, authenticate and call ``decide()`` through the runtime; no policy logic lives here.
"""

from __future__ import annotations

import gc
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Body, FastAPI, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.engine import Engine
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import STARTUP_FAILURE

from model.catalog import REQUEST_CATALOG_MEMO_SIZE, ErrorCatalog, MemoCatalog
from model.datafiles import DEMO_REQUEST_FILE
from model.gsm import serving_catalog
from model.merchant_config import WinbackConfig, load_config
from model.money import load_economics
from model.policy import PolicyConfig, Scorer, decide, load_priors
from model.requests import Decision, DecisionRequest
from model.rules import RuleInputError, load_rulebook
from service.api.deadline import DeadlineCallsExhaustedError, within_deadline
from service.api.deps import BatchItemError, CallerDep, Runtime, RuntimeDep, refused_caller
from service.api.fastpath import DecisionFastPath
from service.api.heap import release_free_memory
from service.api.inflight import RequestsInFlight, precise_timers
from service.api.logging import configure_logging
from service.api.metrics import CONTENT_TYPE_LATEST, ApiMetrics
from service.api.mirror import READ_SECONDS as MIRROR_READ_SECONDS
from service.api.mirror import MirrorSource
from service.api.model_holder import MlflowSource, ModelHolder, ModelSource, first_line
from service.api.schemas import (
    BODY_ERRORS,
    CALLER_ERRORS,
    ErrorBody,
    FieldError,
    Health,
    OutcomeIn,
    OutcomeOut,
    Readiness,
    ValidationErrorBody,
)
from service.api.settings import Settings
from service.api.startup import startup_failed, take_worker_settings
from service.api.store import (
    DATABASE_AWAY,
    DatabaseFileGoneError,
    DecisionWriter,
    ForeignDecisionError,
    OutcomeBeforeFailureError,
    OutcomeConflictError,
    OutcomeOrderMismatchError,
    Store,
    decision_spool,
    make_engine,
    stored_json,
)
from service.console.routes import mount_console
from service.executor.metrics import (
    ChargeDisputesCollector,
    ChecksAskedNoMoreCollector,
    PaidTwiceCollector,
    RefundsByHandCollector,
    SenderBansCollector,
    SenderHoldsCollector,
    SenderSetupRefusalsCollector,
    SilentNotChargedCollector,
)
from service.executor.routes import provider_router
from service.executor.routes import router as executor_router
from service.json_keys import RepeatedKeyError, UniqueKeysRoute
from service.linux import end_with_parent

log = logging.getLogger("winback.api")

_JSON = "application/json"
#: Longest an outcome waits for the database (its decision's grace included) before a 503 says to send it again.
OUTCOME_DEADLINE_SECONDS = 10.0
_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {**CALLER_ERRORS, **BODY_ERRORS}
#: How a 503 for an outcome ends: the database may have committed it, and a repeat is stored once.
_SEND_AGAIN = "the outcome may not be stored: send it again (the same outcome is stored once)"


def _field_path(loc: tuple[int | str, ...] | list[int | str]) -> str:
    parts = list(loc[1:]) if loc and loc[0] == "body" else list(loc)
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def _field_error(*loc: int | str, msg: str) -> RequestValidationError:
    """A 422 for one value pydantic accepted but winback cannot use; ``loc`` is its path in the body."""
    return RequestValidationError([{"type": "value_error", "loc": ("body", *loc), "msg": msg}])


#: pydantic's types for a whole body of the wrong kind ("Input should be a valid dictionary or object to extract
#: fields from" for a form-encoded body says nothing of what to send).
_WHOLE_BODY_TYPES = {
    "model_attributes_type": "a JSON object",
    "dict_type": "a JSON object",
    "list_type": "a JSON array",
}
_JSON_KINDS = {str: "a string", int: "a number", float: "a number", bool: "true or false", list: "an array",
               dict: "an object", type(None): "null"}  # fmt: skip


_MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,30}/[a-z0-9][a-z0-9!#$&^_.+-]{0,40}")


def _whole_body_message(error: Mapping[str, Any], content_type: str | None) -> str | None:
    """What to say of a body that is not the kind the route takes at all, naming what was sent (its
    Content-Type, or its JSON kind): never the input itself."""
    expected = _WHOLE_BODY_TYPES.get(error.get("type", ""))
    if expected is None or list(error.get("loc", ())) != ["body"]:
        return None
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    main_type, _, subtype = media_type.partition("/")
    json_subtype = "/" not in subtype and (subtype == "json" or subtype.endswith("+json"))
    if main_type != "application" or not json_subtype:  # as FastAPI reads JSON (two slashes: not a media type)
        # The header is the client's own text: named back only when it is a plain, short media type.
        came = "had none" if content_type is None else "came as another type"
        if _MEDIA_TYPE.fullmatch(media_type):
            came = f"came as {media_type}"
        return f"body must be {expected} sent as Content-Type: {_JSON} (this one {came})"
    sent = _JSON_KINDS.get(type(error.get("input")))
    return f"body must be {expected}" + (f", not {sent}" if sent is not None else "")


def _validation_response(exc: RequestValidationError, content_type: str | None = None) -> JSONResponse:
    details = []
    for error in exc.errors():
        loc = list(error.get("loc", ()))
        message = error.get("msg", "invalid")
        if error.get("type") == "json_invalid":
            message = f"body is not valid JSON: {error.get('ctx', {}).get('error', message)}"
            loc = ["body"]
        elif (whole_body := _whole_body_message(error, content_type)) is not None:
            message = whole_body
        # The offending input is left out on purpose: it may carry personal data.
        details.append(FieldError(field=_field_path(loc), msg=message, type=error.get("type", "invalid"), loc=loc))
    body = ValidationErrorBody(message="; ".join(f"{d.field}: {d.msg}" for d in details), detail=details)
    return JSONResponse(body.model_dump(), status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


class LatencyMiddleware:
    """Times every request into the latency histogram, labelled by route template (bounded cardinality).

    An answer of 400 or more also gets an ``X-Request-ID`` (the caller's own, when it sent a plain one, else a
    fresh one) and a log line with it, the route, the status and what the answer said, so a merchant reporting a
    refused request can be found in the logs. A refused request used to leave no line at all."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_code = 500
        request_id: str | None = None
        said = b""

        async def send_wrapper(message: Message) -> None:
            nonlocal status_code, request_id, said
            if message["type"] == "http.response.start":
                status_code = message["status"]
                if status_code >= 400:
                    request_id = _request_id(scope)
                    message = {
                        **message,
                        "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())],
                    }
            elif request_id is not None and len(said) < _REFUSAL_LOG_CHARS:
                said += message.get("body", b"")[:_REFUSAL_LOG_CHARS]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_latency(scope["method"], template, status_code, time.perf_counter() - started)
            # /readyz's 503 is its answer (rules-only until a model serves), not a failure: a load balancer's probe
            # every few seconds logged an ERROR "request failed" each time. The model's state is logged as it changes.
            if request_id is not None and template != "/readyz":
                _log_refusal(scope["method"], template, status_code, request_id, said)


#: Characters of a refused request's answer its log line keeps.
_REFUSAL_LOG_CHARS = 500
_PLAIN_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def _request_id(scope: Scope) -> str:
    """The caller's ``X-Request-ID`` when it is a plain one (letters, digits, ``._:-``, at most 64), else a new one."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            sent: str = value.decode("latin-1")
            if _PLAIN_REQUEST_ID.fullmatch(sent):
                return sent
    return "req_" + uuid.uuid4().hex


def _log_refusal(method: str, route: str, status_code: int, request_id: str, said: bytes) -> None:
    """One line for an answer of 400 or more: what a JSON answer said (its ``message`` or ``detail``), not the body
    the caller sent (it may carry personal data; 422 messages name fields, never their values)."""
    answer: Any = None
    try:
        parsed = orjson.loads(said)
        answer = parsed.get("message") or parsed.get("detail") if isinstance(parsed, dict) else None
    except orjson.JSONDecodeError:
        pass  # an HTML page (the console) or an answer cut at _REFUSAL_LOG_CHARS: the status says enough
    level = logging.ERROR if status_code >= 500 else logging.WARNING
    extra = {"request_id": request_id, "method": method, "route": route, "status": status_code}
    if isinstance(answer, str):
        extra["answer"] = answer[:_REFUSAL_LOG_CHARS]
    log.log(level, "request refused" if status_code < 500 else "request failed", extra=extra)


#: Merchants a new model version decides the canary request for (the first ones, by id): each exercises its own
#: grid, and the check runs on every worker's poller thread beside the requests (~1 ms a merchant).
CANARY_MERCHANTS = 20


def canary_check(
    config: WinbackConfig,
    catalog: ErrorCatalog,
    policy: PolicyConfig,
    between_steps: Callable[[], object] | None = None,
) -> Callable[[Scorer], None]:
    """A check for ``ModelHolder``: a loaded version decides the shipped demo request (CONTRACT.md section 2) under
    up to ``CANARY_MERCHANTS`` merchants of the config before it serves, and whatever it raises keeps the serving
    model. A merchant the request does not fit (RuleInputError: the input's fault, raised before any model is
    asked) says nothing about the model and is skipped. ``between_steps()`` is called after each merchant."""
    request = DecisionRequest.model_validate_json(DEMO_REQUEST_FILE.read_bytes())
    merchants = sorted(config.merchants.items())[:CANARY_MERCHANTS]

    def check(scorer: Scorer) -> None:
        for merchant_id, merchant in merchants:
            canary = request.model_copy(update={"merchant_id": merchant_id})
            try:
                decide(canary, merchant, scorer, catalog=catalog, config=policy, rng=np.random.default_rng(0),
                       decision_id="dec_canary")  # fmt: skip
            except RuleInputError:
                continue
            finally:
                if between_steps is not None:
                    between_steps()

    return check


def build_runtime(settings: Settings) -> Runtime:
    """Load the merchant config (ConfigError names the bad key's path) and the catalog; nothing is started."""
    config = load_config(settings.config_path)
    # Read the shipped tables now, not in the first request (which would otherwise take tens of milliseconds).
    load_priors()
    load_economics()
    load_rulebook()
    catalog = serving_catalog(settings.gsm_overlay)
    known = {c for merchant in config.merchants.values() for c in merchant.connectors}
    metrics = ApiMetrics(connectors=known | set(catalog.connectors()))
    source: ModelSource | None = None
    poll_seconds = settings.model_poll_seconds
    in_flight = RequestsInFlight()  # a load of a new champion gives way to the requests (api/inflight.py)
    if settings.load_model and settings.model_mirror_dir is not None:
        source = MirrorSource(settings.model_mirror_dir, settings.model_poll_seconds, between_steps=in_flight.give_way)
        poll_seconds = min(poll_seconds, MIRROR_READ_SECONDS)  # a file read: the swap waits on the mirror's poll
    elif settings.load_model:
        source = MlflowSource(settings.tracking_uri)
    policy = PolicyConfig()
    holder = ModelHolder(
        source,
        poll_seconds=poll_seconds,
        retry_base_seconds=settings.model_poll_seconds,
        on_change=lambda served: metrics.set_model_version(served.version),
        on_error=lambda _reason: metrics.registry_errors.inc(),
        check=canary_check(config, catalog, policy, between_steps=in_flight.give_way),
        in_flight=in_flight,
        catalog=catalog,  # the model's features read the rules' catalog, overlay included
    )
    return Runtime(
        in_flight=in_flight,
        settings=settings,
        config=config,
        catalog=MemoCatalog(catalog, REQUEST_CATALOG_MEMO_SIZE),
        holder=holder,
        metrics=metrics,
        policy=policy,
        rng=np.random.default_rng(settings.seed),
    )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Migrate and open the store, start the decision writer, load the champion and poll it; undo on exit."""
    try:
        writer, writer_engine, engine = await _start(app)
    except Exception as error:  # uvicorn stops this worker, and the others with it (api/startup.py)
        startup_failed(error)
        raise
    try:
        yield
    finally:
        app.state.runtime.holder.stop()
        writer.close()
        writer_engine.dispose()
        engine.dispose()


async def _start(app: FastAPI) -> tuple[DecisionWriter, Engine, Engine]:
    """The lifespan's start: what it opened that its end closes (the decision writer, its engine, the requests'
    engine)."""
    runtime: Runtime = app.state.runtime
    settings = runtime.settings
    precise_timers()  # this thread, the event loop's, and the threads started below (api/inflight.py)
    spool = decision_spool(settings.spool_dir)
    spool.check_writable()  # found now, not in the middle of an outage
    engine = make_engine(settings.database_url)
    if settings.run_migrations:
        from service.migrations import upgrade

        await run_in_threadpool(upgrade, engine)
    runtime.store = Store(engine)
    # The executor's tables are in the same database: its charge disputes and refunds by hand are counted there.
    runtime.metrics.read_at_scrape(ChargeDisputesCollector(engine))
    runtime.metrics.read_at_scrape(RefundsByHandCollector(engine))
    runtime.metrics.read_at_scrape(PaidTwiceCollector(engine))
    runtime.metrics.read_at_scrape(SenderHoldsCollector(engine))
    runtime.metrics.read_at_scrape(SenderBansCollector(engine))
    runtime.metrics.read_at_scrape(SenderSetupRefusalsCollector(engine))
    runtime.metrics.read_at_scrape(ChecksAskedNoMoreCollector(engine))
    runtime.metrics.read_at_scrape(SilentNotChargedCollector(engine))
    # The writer has a pool of its own: requests holding connections (an outcome waiting out a hung database)
    # cannot starve it, so decisions are never refused for a pool that ran dry.
    writer_engine = make_engine(settings.database_url)
    runtime.writer = DecisionWriter(Store(writer_engine), interval=settings.decision_flush_seconds, spool=spool)
    await run_in_threadpool(runtime.holder.start)
    if settings.gc_freeze:
        # The ~360k objects alive now (modules, the catalog, the model) live as long as the process. A full pass of
        # the cyclic collector walks every one of them, ~0.2 s with the GIL held, stalling every request in
        # flight: frozen, they are left out of its passes (refcounting still frees them). What becomes garbage
        # later is collected as before; the model holds no reference cycle, so a swapped-out one is freed.
        gc.collect()
        gc.freeze()
    release_free_memory()  # what the load and the start-up freed stays in malloc's heaps otherwise (api/heap.py)
    log.info(
        "decision API ready",
        extra={"model_version": runtime.holder.current.version, "merchants": len(runtime.config.merchants)},
    )
    return runtime.writer, writer_engine, engine


def _json(content: bytes | str, status_code: int = 200) -> Response:
    return Response(content=content, status_code=status_code, media_type=_JSON)


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> FastAPI:
    """The decision API. ``settings`` default to the environment (``WINBACK_*``); ``runtime`` is for tests."""
    settings = settings or Settings()
    configure_logging(settings.log_level)
    runtime = runtime or build_runtime(settings)
    app = FastAPI(
        title="winback decision API",
        version="1",
        summary="Retry, retarget or stop: what to do about a failed payment, decided at failure time.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.add_middleware(LatencyMiddleware, metrics=runtime.metrics)

    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        if (refused := await refused_caller(request)) is not None:
            return await http_exception_handler(request, refused)
        return _validation_response(exc, request.headers.get("content-type"))

    @app.exception_handler(Exception)
    async def _on_unexpected_error(request: Request, _exc: Exception) -> JSONResponse:
        # Starlette sends this and re-raises (uvicorn logs the traceback, then drops the connection): say so in
        # the answer, so a pooling client opens a fresh connection instead of sending its next request into it.
        deciding = request.url.path.startswith("/v1/decisions")
        detail = "internal error; the request was not decided" if deciding else "internal error"
        return JSONResponse(
            ErrorBody(detail=detail).model_dump(),
            status_code=status.HTTP_500_INTERNAL_SERVER_ERROR,
            headers={"Connection": "close"},
        )

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == status.HTTP_400_BAD_REQUEST and (refused := await refused_caller(request)) is not None:
            return await http_exception_handler(request, refused)  # a body FastAPI could not parse: the key first
        # FastAPI answers a body its JSON parser gives up on (nested thousands of levels deep: RecursionError)
        # with a bare 400; it is malformed input, so it gets the contract's 422 naming the body.
        if exc.status_code == status.HTTP_400_BAD_REQUEST and isinstance(exc.__cause__, RecursionError):
            return _validation_response(_field_error(msg="body is nested too deeply to be parsed"))
        # Likewise a body in another encoding (Latin-1 "refusée"): FastAPI's bare 400 "There was an error parsing
        # the body" did not say what was wrong. The offset, not the byte, is named: the input may be personal data.
        if exc.status_code == status.HTTP_400_BAD_REQUEST and isinstance(exc.__cause__, UnicodeDecodeError):
            return _validation_response(
                _field_error(msg=f"body is not UTF-8 (JSON is sent as UTF-8): byte {exc.__cause__.start} is not")
            )
        # A key written twice in one object, on the routes that read JSON through UniqueKeysRoute (the decisions,
        # /v1/outcomes, the executor's; the providers' callbacks answer it themselves): FastAPI's bare 400 for what its
        # reading raised; the 422 names the key's path.
        if exc.status_code == status.HTTP_400_BAD_REQUEST and isinstance(exc.__cause__, RepeatedKeyError):
            return _validation_response(_field_error(*exc.__cause__.path, msg=RepeatedKeyError.reason))
        return await http_exception_handler(request, exc)

    @app.exception_handler(DatabaseFileGoneError)
    async def _on_database_file_gone(request: Request, exc: DatabaseFileGoneError) -> JSONResponse:
        # The executor's routes and the console: nothing is written into a deleted SQLite file, nothing succeeds.
        log.error("database file gone; %s %s refused", request.method, request.url.path, extra={"error": str(exc)})
        return JSONResponse(
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            content={"detail": f"{exc}; nothing was stored: restore the database and restart the scorer"},
        )

    @app.exception_handler(RuleInputError)
    async def _on_rule_input_error(_request: Request, exc: RuleInputError) -> JSONResponse:
        # A field pydantic accepted (an extra the contract allows) but the hard rules cannot use: malformed input.
        return _validation_response(_field_error(exc.field, msg=str(exc)))

    @app.exception_handler(BatchItemError)
    async def _on_batch_item_error(_request: Request, exc: BatchItemError) -> JSONResponse:
        return _validation_response(_field_error(exc.index, exc.field, msg=str(exc)))

    # A key written twice in one object ({"merchant_id": "m_a", ..., "merchant_id": "m_b"}) is refused with the 422
    # naming it, as on every route that reads JSON, rather than read as its last value (service/json_keys.py).
    decisions_router = APIRouter(route_class=UniqueKeysRoute)

    @decisions_router.post("/v1/decisions", response_model=Decision, responses=_AUTH_ERRORS, tags=["decisions"])
    async def create_decision(body: DecisionRequest, caller: CallerDep, runtime: RuntimeDep) -> Response:
        """Decide what to do about one failed payment (a valid request is answered by fastpath.py, same call)."""
        caller.require(body.merchant_id)
        return _json(runtime.decide_json(body, caller.merchant))

    # The body's limit is a default, not Annotated metadata: annotations are strings here (PEP 563), resolved in the
    # module's namespace, where ``settings`` is not.
    batch_body = Body(max_length=settings.max_batch)

    @decisions_router.post(
        "/v1/decisions:batch", response_model=list[Decision], responses=_AUTH_ERRORS, tags=["decisions"]
    )
    async def create_decisions(
        caller: CallerDep, runtime: RuntimeDep, body: list[DecisionRequest] = batch_body
    ) -> Response:
        """Decide for a list of failed payments; the answers come in the same order."""
        for index, item in enumerate(body):
            caller.require(item.merchant_id, where=f"[{index}].merchant_id")
        return _json(runtime.decide_batch_json(body, caller.merchant))

    app.include_router(decisions_router)

    # A key written twice ({"status": "failure", "status": "success"}) is refused with the 422 naming it, as above.
    outcomes_router = APIRouter(route_class=UniqueKeysRoute)

    @outcomes_router.post(
        "/v1/outcomes",
        response_model=OutcomeOut,
        responses={
            **_AUTH_ERRORS,
            409: {"model": ErrorBody, "description": "another status or instant is stored"},
            503: {"model": ErrorBody, "description": "the database is unavailable or did not answer: send it again"},
        },
        tags=["outcomes"],
    )
    async def record_outcome(body: OutcomeIn, caller: CallerDep, runtime: RuntimeDep) -> OutcomeOut:
        """Record what happened after a decision. The same outcome again (decision_id, order_id, status and
        occurred_at; extras may differ) answers the stored one, changing nothing; another status or instant is 409."""
        if runtime.store is None:  # pragma: no cover - the lifespan always opens the store
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail="store not open yet")
        stored_json(body)  # a 422 (RuleInputError) naming a string the store cannot hold
        try:
            # A decision answered a moment ago may still be on its way to the store (any worker's writer).
            # Capped well inside the deadline, so a healthy database always answers before it.
            grace = min(3 * runtime.settings.decision_flush_seconds, OUTCOME_DEADLINE_SECONDS / 2)
            stored = await within_deadline(
                OUTCOME_DEADLINE_SECONDS,
                runtime.store.record_outcome,
                caller.merchant_id,
                body.model_dump(mode="json", exclude_unset=True),
                grace,
                None if runtime.writer is None else runtime.writer.in_flight,
            )
        except TimeoutError:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                detail=f"the database did not answer within {OUTCOME_DEADLINE_SECONDS:g} s; {_SEND_AGAIN}",
            ) from None
        except DeadlineCallsExhaustedError:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                detail="too many outcomes are waiting for the database; the outcome was not stored: send it again",
            ) from None
        except DatabaseFileGoneError as exc:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                detail=f"{exc}; the outcome was not stored: restore the database and restart the scorer, then "
                "send it again",
            ) from None
        except DATABASE_AWAY as exc:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                detail=f"the database is unavailable ({type(getattr(exc, 'orig', None) or exc).__name__}); "
                f"{_SEND_AGAIN}",
            ) from None
        except OutcomeConflictError as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from None
        except ForeignDecisionError as exc:
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail=str(exc)) from None
        except OutcomeOrderMismatchError as exc:
            raise _field_error("order_id", msg=str(exc)) from None
        except OutcomeBeforeFailureError as exc:
            raise _field_error("occurred_at", msg=str(exc)) from None
        return OutcomeOut(
            decision_id=stored.decision_id,
            order_id=stored.order_id,
            status=stored.status,
            occurred_at=stored.occurred_at,
            recorded_at=stored.recorded_at,
            decision_found=stored.decision_found,
        )

    app.include_router(outcomes_router)

    @app.get("/healthz", response_model=Health, tags=["operations"])
    async def healthz() -> Health:
        """The process is up."""
        return Health()

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}}, tags=["operations"])
    async def readyz(runtime: RuntimeDep) -> JSONResponse:
        """Ready only when a registered model serves (decisions are answered rules-only before that). ``reason``
        says why not, or, while ready, why the last check of the champion failed (e.g. a champion version that
        could not be loaded, while the previous one serves). ``catalog_mismatch`` names the error catalog the
        serving model was trained with and the one it serves with, when they differ (it still serves)."""
        holder = runtime.holder
        body = Readiness(
            ready=holder.ready,
            model_version=holder.current.version,
            reason=holder.last_error or (None if holder.ready else "no model loaded"),
            catalog_mismatch=holder.current.catalog_mismatch,
        )
        return JSONResponse(body.model_dump(), status_code=200 if holder.ready else 503)

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics(runtime: RuntimeDep) -> Response:
        """Prometheus metrics of this worker."""
        return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(executor_router)
    app.include_router(provider_router(app))
    mount_console(app)
    return app


def serving_app(app: FastAPI) -> DecisionFastPath:
    """What the server runs: ``app`` behind the decision fast path, in front of all of FastAPI's own middleware,
    so a valid decision request never enters its stack (see fastpath.py); everything else goes to ``app``."""
    return DecisionFastPath(app)


def app_from_env() -> DecisionFastPath:
    """Factory for ``uvicorn --factory``: settings from ``WINBACK_*`` variables (each worker builds its own).

    A worker process of ``winback serve`` first asks for a SIGTERM when the command's process ends (its graceful
    stop, as uvicorn's own): killed outright (SIGKILL, the OOM killer), the command cannot stop its workers, which
    held the port (a restarted command could not bind it) and served on with a model that no longer changed (the
    registry mirror is the command's)."""
    try:
        parent_pid = take_worker_settings()
        if parent_pid is not None:
            end_with_parent(parent_pid)
        return serving_app(create_app(Settings()))
    except Exception as error:
        _not_started(error)
        raise SystemExit(STARTUP_FAILURE) from None


def _not_started(error: Exception) -> None:
    """Say why this worker could not start, in its log and to the command (api/startup.py)."""
    configure_logging()  # idempotent; the app's own settings may be what failed
    log.error("a worker of the decision API could not start: %s", first_line(error), exc_info=error)
    startup_failed(error)
