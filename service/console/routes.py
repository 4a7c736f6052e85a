"""The agent console's pages (``/console/...``): server-rendered Jinja2 with htmx for partial updates.

Every page needs a signed-in agent and shows only that agent's merchant; every POST needs the session's CSRF
token, and every action's POST a one-time key (its form's token, or a script's ``Idempotency-Key``): it is acted on
once whatever the number of times it is sent (``service.console.submissions``). Without htmx (JavaScript off) its
POST is answered with a redirect to the order's page, whose address names that POST's result (``?flash=``, signed
for the session): the page shows it once (Post/Redirect/Get), so a reload or the back button sends nothing again,
and two tabs acting at once each show their own. ``mount_console(app)`` adds the
routes and the static files to the API app.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, quote, urlencode

import jinja2
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from model.money import format_money
from service.api.deps import Runtime, RuntimeDep
from service.console.actions import (
    MAX_REASON_LENGTH,
    ActionRequest,
    ActionResult,
    AgentDesk,
    ForbiddenOptions,
    UnknownOrderError,
)
from service.console.auth import (
    Agent,
    LoginLimiter,
    Session,
    SessionStore,
    Signer,
    csrf_matches,
    sign_in,
)
from service.console.charts import CHARTS, ChartCache, UnknownChartError, load_performance, render_chart, summary
from service.console.settings import ConsoleSettings
from service.console.submissions import (
    IDEMPOTENCY_HEADER,
    STILL_UNDER_WAY,
    SUBMISSION_FIELD,
    KeyRefusedError,
    SubmissionStore,
    new_token,
    one_time_key,
    sent_again,
)
from service.console.views import (
    ACTION_FILTERS,
    STATE_FILTERS,
    QueueFilter,
    age,
    channel_name,
    describe_decision,
    load_order,
    load_queue,
    local_time,
    merchant_zone,
)
from service.executor.core import refund_why
from service.executor.routes import ExecutorDep, ExecutorRuntime
from service.executor.store import OrderState

log = logging.getLogger("winback.console")
#: What a failed sign-in's log says of a name no agent has (``login``).
UNKNOWN_AGENT = "(no such agent)"

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "wb_console"
LOGIN_COOKIE = "wb_console_login"
#: The query parameter of the order's page that names the result of the POST that redirected there
#: (``kind.id.key.signature``, the signature bound to the session and the order: ``_flash_reference``).
FLASH_PARAMETER = "flash"
COOKIE_PATH = "/console"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
#: How long a second POST of a form waits for its first, still being carried out, to answer with its result.
SENT_BEFORE_WAIT_SECONDS = 10.0
MAX_FORM_BYTES = 16_384
PERIODS = (7, 30, 90)

router = APIRouter(prefix="/console", include_in_schema=False)

_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass
class ConsoleRuntime:
    """The console's per-process parts: settings, cookie signer, chart cache and the sessions' and sign-in
    throttle's clock (the wall clock). Orders' times, ages and the agents' actions follow the executor's clock
    instead, which runs faster in a demo (WINBACK_CLOCK_SPEED), as the orders' own times do."""

    settings: ConsoleSettings
    signer: Signer
    charts: ChartCache
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))

    def limiter(self, executor: ExecutorRuntime) -> LoginLimiter:
        """The sign-in throttle over the executor's database (shared by every worker of the server)."""
        return LoginLimiter(
            executor.executor.engine,
            self.settings.login_max_failures,
            self.settings.login_max_failures_per_ip,
            self.settings.login_window_minutes * 60,
            clock=self.clock,
        )

    def sessions(self, executor: ExecutorRuntime) -> SessionStore:
        """The session store over the executor's database."""
        return SessionStore(
            executor.executor.engine,
            lifetime=timedelta(hours=self.settings.session_hours),
            idle=timedelta(minutes=self.settings.session_idle_minutes),
            clock=self.clock,
        )

    def submissions(self, executor: ExecutorRuntime) -> SubmissionStore:
        """The forms sent, over the executor's database (kept a session's lifetime: older ones fail CSRF)."""
        return SubmissionStore(
            executor.executor.engine, keep=timedelta(hours=self.settings.session_hours), clock=self.clock
        )


def build_console_runtime(settings: ConsoleSettings | None = None) -> ConsoleRuntime:
    """The console runtime from ``WINBACK_*`` settings (ValueError names a placeholder secret outside dev)."""
    settings = settings or ConsoleSettings()
    return ConsoleRuntime(
        settings=settings,
        signer=Signer(settings.console_secret.get_secret_value()),
        charts=ChartCache(settings.chart_cache_seconds),
    )


def get_console(request: Request) -> ConsoleRuntime:
    """The app's console runtime, built on first use (tests may put one on ``app.state.console``)."""
    found: ConsoleRuntime | None = getattr(request.app.state, "console", None)
    if found is None:
        found = build_console_runtime()
        request.app.state.console = found
    return found


ConsoleDep = Annotated[ConsoleRuntime, Depends(get_console)]


# ----------------------------------------------------------------------------------------------- templates


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


@functools.cache
def templates() -> jinja2.Environment:
    """The console's templates, loaded once per process."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        money=format_money, pct=_pct, channel=channel_name, describe=describe_decision, refund_why=refund_why
    )
    env.globals.update(local_time=local_time, age=age, urlencode=urlencode, submission_token=new_token)
    return env


def _page(
    template: str, status_code: int = 200, headers: Mapping[str, str] | None = None, **context: Any
) -> HTMLResponse:
    html = templates().get_template(template).render(**context)
    return HTMLResponse(html, status_code=status_code, headers={**_SECURITY_HEADERS, **(headers or {})})


def _secure(request: Request, console: ConsoleRuntime) -> bool:
    forced = console.settings.cookie_secure
    return forced if forced is not None else request.url.scheme == "https"


def _set_cookie(
    response: Response, request: Request, console: ConsoleRuntime, name: str, value: str, max_age: int
) -> None:
    response.set_cookie(
        name,
        console.signer.sign(value),
        max_age=max_age,
        path=COOKIE_PATH,
        httponly=True,
        samesite="lax",
        secure=_secure(request, console),
    )


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


class _FormTooLargeError(Exception):
    """A form body over ``MAX_FORM_BYTES``: none of it is read further, nor acted on."""


TOO_LARGE = f"the form is larger than {MAX_FORM_BYTES // 1024} KiB"


async def _form(request: Request) -> dict[str, str]:
    """The urlencoded form body (first value of each field); a non-form body gives {}. An oversized one raises
    ``_FormTooLargeError``: it gave {} too, and the agent was told "missing CSRF token", the wrong problem."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return {}
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > MAX_FORM_BYTES:
        raise _FormTooLargeError
    body = bytearray()
    async for chunk in request.stream():  # read no more than the limit, whatever the body claims
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise _FormTooLargeError
    parsed = parse_qs(bytes(body).decode("utf-8", errors="replace"), keep_blank_values=True)
    return {key: values[0] for key, values in parsed.items()}


async def _session(request: Request, console: ConsoleRuntime, executor: ExecutorRuntime) -> Session | None:
    token = console.signer.unsign(request.cookies.get(SESSION_COOKIE))
    if token is None:
        return None
    session = await run_in_threadpool(console.sessions(executor).load, token)
    if session is not None and session.agent.merchant_id not in executor.executor.config.merchants:
        # The agent's merchant left the config since the sign-in (the server restarted without it): signed out, as
        # sign-in refuses such an agent, where every page answered 500.
        return None
    return session


def _to_login(request: Request, back_to: str | None = None) -> Response:
    """The sign-in page, then back to ``back_to`` (default: this request's page). A form's POST names the page the
    form was on: its own address answers no GET, and sign-in led the agent to a bare 405."""
    target = "/console/login?next=" + quote(back_to or request.url.path, safe="/")
    if request.headers.get("hx-request"):
        return Response(status_code=401, headers={"HX-Redirect": target})
    return RedirectResponse(target, status_code=303)


def _csrf_ok(session: Session, request: Request, form: Mapping[str, str]) -> bool:
    return csrf_matches(session.csrf_token, form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER))


@dataclass(frozen=True)
class _StaleForm:
    """A POST in a live session refused before anything of it is acted on: an htmx POST without that session's
    CSRF token (its page was loaded in an earlier one: the agent signed in again, in another tab say), or any form
    over ``MAX_FORM_BYTES``. Answered 403 (or 413), htmx swapped nothing and the click did nothing visible; the
    order's page is shown again instead, with fresh forms and ``result`` (``status_code`` without htmx)."""

    session: Session
    result: ActionResult
    status_code: int = 409


STALE_FORM = ActionResult(
    "refused",
    "Nothing was done: this page was loaded before you last signed in, and its forms no longer count. "
    "The order is shown as it is now: act again if you still want to.",
)
FORM_TOO_LARGE = ActionResult(
    "refused",
    f"Nothing was done: {TOO_LARGE} (a very long reason, say). Shorten it and try again.",
)


async def _signed_post(
    request: Request, console: ConsoleRuntime, executor: ExecutorRuntime, back_to: str
) -> tuple[Session, dict[str, str]] | _StaleForm | Response:
    """The session and form of a POST, or the answer to give instead: the sign-in page (then back to ``back_to``,
    the form's page) without a session, 403 without the session's CSRF token (``_StaleForm`` to an htmx POST),
    ``_StaleForm`` answered 413 to a form over ``MAX_FORM_BYTES``."""
    session = await _session(request, console, executor)
    if session is None:
        return _to_login(request, back_to)
    try:
        form = await _form(request)
    except _FormTooLargeError:
        return _StaleForm(session, FORM_TOO_LARGE, 413)
    if not _csrf_ok(session, request, form):
        return _StaleForm(session, STALE_FORM) if request.headers.get("hx-request") else _forbidden()
    return session, form


def _too_large() -> HTMLResponse:
    return _page(
        "message.html",
        status_code=413,
        title="Request refused",
        message=f"Nothing was done: {TOO_LARGE}. Go back, shorten it and try again.",
        session=None,
    )


def _forbidden() -> HTMLResponse:
    return _page(
        "message.html",
        status_code=403,
        title="Request refused",
        message=(
            "This form has expired or did not come from the console (missing CSRF token). "
            "Reload the page and try again."
        ),
        session=None,
    )


def _base(session: Session, runtime: Runtime, active: str) -> dict[str, Any]:
    merchant = runtime.config.merchants[session.agent.merchant_id]
    return {
        "session": session,
        "agent": session.agent,
        "merchant": merchant,
        "zone": merchant_zone(merchant),
        "active": active,
    }


# --------------------------------------------------------------------------------------------------- pages


@router.get("", response_class=HTMLResponse)
@router.get("/", response_class=HTMLResponse)
async def home() -> Response:
    """The console starts at the queue."""
    return RedirectResponse("/console/queue", status_code=303)


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request, console: ConsoleDep, next: str = "/console/queue") -> Response:
    """The sign-in form (a fresh login CSRF token in a signed cookie and the form)."""
    return _login_form(request, console, next)


def _login_form(
    request: Request, console: ConsoleRuntime, next_url: str, error: str = "", status_code: int = 200, name: str = ""
) -> Response:
    import secrets

    nonce = secrets.token_urlsafe(24)
    response = _page(
        "login.html",
        status_code=status_code,
        csrf=nonce,
        next=_safe_next(next_url),
        error=error,
        name=name,
        session=None,
    )
    _set_cookie(response, request, console, LOGIN_COOKIE, nonce, max_age=3600)
    return response


def _safe_next(target: str) -> str:
    # Only paths inside the console: never an open redirect to another site.
    return (
        target
        if target.startswith("/console/") and not target.startswith("//") and "\\" not in target
        else "/console/queue"
    )


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, console: ConsoleDep, executor: ExecutorDep) -> Response:
    """Check the name and password (throttled per name and client); start a session on success."""
    try:
        form = await _form(request)
    except _FormTooLargeError:
        return _too_large()
    expected = console.signer.unsign(request.cookies.get(LOGIN_COOKIE))
    if expected is None or not csrf_matches(expected, form.get(CSRF_FIELD)):
        return _forbidden()
    name, password = form.get("name", "").strip(), form.get("password", "")
    next_url = form.get("next", "/console/queue")
    client = _client(request)
    limiter = console.limiter(executor)
    attempt = await run_in_threadpool(limiter.begin, name, client)
    if attempt.wait > 0:
        minutes = max(1, round(attempt.wait / 60))
        return _login_form(
            request,
            console,
            next_url,
            f"Too many failed sign-ins. Try again in {minutes} minute{'s' if minutes != 1 else ''}.",
            429,
            name,
        )
    found = await run_in_threadpool(sign_in, executor.executor.engine, name, password) if name else None
    agent = found.agent if found is not None and password else None
    if agent is None or agent.merchant_id not in executor.executor.config.merchants:
        # A name no agent has is not logged: it is often the password, typed into the wrong field.
        known = found is not None and found.known_name
        log.warning("console sign-in failed", extra={"agent": name[:128] if known else UNKNOWN_AGENT, "client": client})
        return _login_form(request, console, next_url, "Wrong name or password.", 401, name)
    await run_in_threadpool(limiter.succeeded, name, attempt)
    session = await run_in_threadpool(console.sessions(executor).create, agent)
    response = RedirectResponse(_safe_next(next_url), status_code=303)
    _set_cookie(
        response, request, console, SESSION_COOKIE, session.token, max_age=int(console.settings.session_hours * 3600)
    )
    response.delete_cookie(LOGIN_COOKIE, path=COOKIE_PATH)
    log.info("console sign-in", extra={"agent": agent.name, "merchant_id": agent.merchant_id})
    return response


@router.post("/logout", response_class=HTMLResponse)
async def logout(request: Request, console: ConsoleDep, executor: ExecutorDep) -> Response:
    """End the session (CSRF-checked) and go back to the sign-in page."""
    session = await _session(request, console, executor)
    if session is None:
        return _to_login(request, "/console/queue")
    try:
        form = await _form(request)
    except _FormTooLargeError:
        return _too_large()
    if not _csrf_ok(session, request, form):
        return _forbidden()
    await run_in_threadpool(console.sessions(executor).revoke, session.token)
    response = RedirectResponse("/console/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)
    return response


@router.get("/queue", response_class=HTMLResponse)
async def queue_page(request: Request, console: ConsoleDep, executor: ExecutorDep, runtime: RuntimeDep) -> Response:
    """Open orders of the agent's merchant, filtered and sorted; htmx requests get only the table."""
    session = await _session(request, console, executor)
    if session is None:
        return _to_login(request)
    chosen = QueueFilter.parse(request.query_params)
    queue = await run_in_threadpool(
        load_queue,
        executor.executor.engine,
        runtime.catalog,
        session.agent.merchant_id,
        chosen,
        executor.executor.clock(),
        console.settings.queue_limit,
    )
    # The rules as of now, as the order's page checks them: the queue listed a recommendation they forbid by now
    # (a one-off payment's retry after the customer left) as if it could be carried out.
    waiting = {
        row.order_id: row.decision
        for row in queue.rows
        if row.state == OrderState.AWAITING_AGENT and row.decision is not None
    }
    desk = AgentDesk(executor.executor, runtime.catalog)
    forbidden = await run_in_threadpool(desk.forbidden_recommendations, session.agent.merchant_id, waiting)
    context = _base(session, runtime, "queue") | {
        "queue": queue,
        "forbidden": forbidden,
        "chosen": chosen,
        "now": executor.executor.clock(),
        "states": STATE_FILTERS,
        "actions": ACTION_FILTERS,
    }
    if request.headers.get("hx-request") and request.headers.get("hx-target") == "queue-results":
        return _page("queue_rows.html", **context)
    return _page("queue.html", **context)


async def _order_context(
    console: ConsoleRuntime, executor: ExecutorRuntime, runtime: Runtime, session: Session, order_id: str
) -> dict[str, Any] | None:
    page = await run_in_threadpool(
        load_order, executor.executor.engine, runtime.catalog, session.agent.merchant_id, order_id
    )
    if page is None:
        return None
    forbidden = ForbiddenOptions()
    if page.pending is not None and page.order.state == "AWAITING_AGENT":
        desk = AgentDesk(executor.executor, runtime.catalog)
        forbidden = await run_in_threadpool(desk.forbidden_now, session.agent.merchant_id, order_id, page.pending)
    return _base(session, runtime, "queue") | {
        "page": page,
        "now": executor.executor.clock(),
        "result": None,
        "forbidden": forbidden,
    }


def _not_found(session: Session, runtime: Runtime, order_id: str) -> HTMLResponse:
    return _page(
        "message.html",
        status_code=404,
        title="Order not found",
        message=f"There is no order {order_id} for your merchant.",
        **_base(session, runtime, "queue"),
    )


@router.get("/orders/{order_id}", response_class=HTMLResponse)
async def order_page(
    order_id: str, request: Request, console: ConsoleDep, executor: ExecutorDep, runtime: RuntimeDep
) -> Response:
    """One order: its recommendation, the actions an agent may take, the timeline and the audit log; and, once,
    how the action whose POST redirected here went (``?flash=``)."""
    session = await _session(request, console, executor)
    if session is None:
        return _to_login(request)
    flash = _flash_of(console, session, request, order_id)
    shown: ActionResult | None = None
    if flash is not None:
        kind, submission_id, key = flash
        taken = await run_in_threadpool(
            console.submissions(executor).take_flash, submission_id, key, session.agent, order_id
        )
        if taken is not None:
            shown = sent_again(taken.result) if kind == "again" else taken.result
            shown = shown or ActionResult("refused", STILL_UNDER_WAY)
    context = await _order_context(console, executor, runtime, session, order_id)
    if context is None:
        return _not_found(session, runtime, order_id)
    context["result"] = shown
    return _page("order.html", **context)


def _flash_signed(session: Session, named: str, order_id: str) -> str:
    """What a flash reference's signature signs: the reference bound to this session and this order (an address
    copied into another session, or another order's, shows nothing)."""
    return f"flash:{session.token}:{quote(order_id, safe='')}:{named}"


def _flash_reference(
    console: ConsoleRuntime, session: Session, kind: str, submission_id: int, key: str, order_id: str
) -> str:
    """The ``?flash=`` value naming one POST's result for the order's page it redirects to."""
    named = f"{kind}.{submission_id}.{key}"
    return f"{named}.{console.signer.sign(_flash_signed(session, named, order_id)).rpartition('.')[2]}"


def _flash_of(
    console: ConsoleRuntime, session: Session, request: Request, order_id: str
) -> tuple[str, int, str] | None:
    """The kind, form and key ``?flash=`` names, when signed for this session and this order."""
    parts = request.query_params.get(FLASH_PARAMETER, "").split(".")
    if len(parts) != 4:
        return None
    kind, submission_id, key, signature = parts
    if kind not in ("result", "again") or not (submission_id.isascii() and submission_id.isdigit()):
        return None
    signed = f"{_flash_signed(session, '.'.join(parts[:3]), order_id)}.{signature}"
    if console.signer.unsign(signed) is None:  # signed here: its id is one of ours
        return None
    return kind, int(submission_id), key


def _order_path(order_id: str) -> str:
    return f"/console/orders/{order_id}"


@router.get("/logout", response_class=HTMLResponse)
@router.get("/orders/{order_id}/actions", response_class=HTMLResponse)
@router.get("/orders/{order_id}/charges/{action_id}", response_class=HTMLResponse)
@router.get("/orders/{order_id}/disputes/{check_action_id}", response_class=HTMLResponse)
@router.get("/orders/{order_id}/by-hand/{case_id}", response_class=HTMLResponse)
async def form_address(request: Request) -> Response:
    """A form's address opened as a page (bookmarked or typed, or sign-in's way back after a session ended): the
    page the form was on, not a bare 405."""
    order_id = request.path_params.get("order_id")
    target = "/console/queue" if order_id is None else "/console/orders/" + quote(order_id, safe="")
    return RedirectResponse(target, status_code=303)


@router.post("/orders/{order_id}/actions", response_class=HTMLResponse)
async def order_action(
    order_id: str, request: Request, console: ConsoleDep, executor: ExecutorDep, runtime: RuntimeDep
) -> Response:
    """Carry out an agent's action through the executor (refused with the rule's name when a hard rule forbids it)."""
    posted = await _order_post(order_id, request, console, executor, runtime)
    if isinstance(posted, Response):
        return posted
    on, form = posted
    alternative = form.get("alternative", "")
    ask = ActionRequest(
        action=form.get("action", ""),
        channel=form.get("channel") or None,
        # ASCII digits only, and few: isdigit() alone takes "²" and 5,000 nines, which int() refuses (a 500).
        alternative=int(alternative)
        if alternative.isascii() and alternative.isdigit() and len(alternative) < 10
        else None,
        reason=form.get("reason", ""),
        decision_id=form.get("decision_id") or None,
    )
    desk = AgentDesk(executor.executor, runtime.catalog)
    return await _carry_out(
        on, form, lambda: _too_long(ask.reason, "reason") or desk.perform(on.session.agent, order_id, ask)
    )


def _too_long(text: str, what: str) -> ActionResult | None:
    """A refusal of a ``what`` (reason, note) longer than the audit log keeps (the form's maxlength, which a script
    need not keep to): it was cut to its first 1,000 characters without a word, and the action carried out."""
    if len(text) <= MAX_REASON_LENGTH:
        return None
    return ActionResult("refused", f"the {what} is {len(text):,} characters long: write at most {MAX_REASON_LENGTH:,}")


@dataclass(frozen=True)
class _OrderPost:
    """A signed-in agent's POST about one order, with what answering it needs."""

    console: ConsoleRuntime
    executor: ExecutorRuntime
    runtime: Runtime
    session: Session
    order_id: str
    request: Request


async def _order_post(
    order_id: str, request: Request, console: ConsoleRuntime, executor: ExecutorRuntime, runtime: Runtime
) -> tuple[_OrderPost, dict[str, str]] | Response:
    """The POST and its form, or the answer to give instead (sign-in, 403, or the order's page for a stale or
    oversized form: ``_signed_post``)."""
    signed = await _signed_post(request, console, executor, _order_path(order_id))
    if isinstance(signed, Response):
        return signed
    if isinstance(signed, _StaleForm):
        stale = _OrderPost(console, executor, runtime, signed.session, order_id, request)
        return await _order_result(stale, signed.result, signed.status_code)
    session, form = signed
    return _OrderPost(console, executor, runtime, session, order_id, request), form


async def _carry_out(on: _OrderPost, form: Mapping[str, str], act: Callable[[], ActionResult]) -> Response:
    """``act`` once per form sent (its one-time key), then the answer: to htmx the order's body with how it
    went; without htmx a redirect to the order's page, which shows it once. A second POST of the form acts on
    nothing and is answered with how the first went; a POST without a one-time key acts on nothing (400)."""
    store = on.console.submissions(on.executor)
    order_id, request = on.order_id, on.request
    try:
        key = one_time_key(form.get(SUBMISSION_FIELD), request.headers.getlist(IDEMPOTENCY_HEADER))
    except KeyRefusedError as refused:
        return await _order_result(on, ActionResult("refused", str(refused)), 400)
    asked = {name: value for name, value in form.items() if name not in (CSRF_FIELD, SUBMISSION_FIELD)}
    submission = await run_in_threadpool(store.claim, on.session.agent, order_id, request.url.path, key, asked)
    if submission.first:
        try:
            result = await run_in_threadpool(act)
        except UnknownOrderError:
            await run_in_threadpool(store.forget, submission.submission_id)
            return _not_found(on.session, on.runtime, order_id)
        except Exception as exc:
            failed = ActionResult(
                "failed", f"This action failed with an unexpected error ({type(exc).__name__}): check the order."
            )
            await run_in_threadpool(store.record, submission.submission_id, failed)
            raise
        await run_in_threadpool(store.record, submission.submission_id, result)
    elif submission.sent_before:
        earlier = submission.earlier or await run_in_threadpool(
            store.wait_for, submission.submission_id, SENT_BEFORE_WAIT_SECONDS
        )
        result = sent_again(earlier)
    else:
        result = submission.earlier or ActionResult("refused", STILL_UNDER_WAY)
    if request.headers.get("hx-request"):
        return await _order_result(on, result)
    flash_key = await run_in_threadpool(store.arm_flash, submission.submission_id)
    kind = "again" if submission.sent_before else "result"
    named = _flash_reference(on.console, on.session, kind, submission.submission_id, flash_key, order_id)
    # The result's reference in this redirect's own address: a cookie held one at a time, and of two tabs acting at
    # once, the later one's result was shown to the first tab's redirect and none to its own.
    target = f"/console/orders/{quote(order_id, safe='')}?{FLASH_PARAMETER}={named}"
    return RedirectResponse(target, status_code=303)


async def _order_result(on: _OrderPost, result: ActionResult, refused_status: int = 409) -> Response:
    """The order page again, with how the agent's action went (``refused_status``: the status of a refusal): the
    order's body to htmx; the whole page only for a form refused before it was read (too large), which acted on
    nothing (an action's result goes to the page by a redirect instead: ``_carry_out``)."""
    context = await _order_context(on.console, on.executor, on.runtime, on.session, on.order_id)
    if context is None:  # pragma: no cover - the order existed a moment ago and orders are never deleted
        return _not_found(on.session, on.runtime, on.order_id)
    context["result"] = result
    status_code = 200 if result.ok else refused_status
    if on.request.headers.get("hx-request"):
        # htmx swaps 2xx answers only: a refusal is still shown, with its reason, in the same place.
        return _page("order_body.html", **context)
    return _page("order.html", status_code=status_code, **context)


@router.post("/orders/{order_id}/charges/{action_id}", response_class=HTMLResponse)
async def charge_answer(
    order_id: str, action_id: int, request: Request, console: ConsoleDep, executor: ExecutorDep, runtime: RuntimeDep
) -> Response:
    """Record what the connector says about a charge of the order that was sent and never answered
    (form: ``answer`` ``charged`` or ``not_charged``, and ``reason``, how the agent knows)."""
    posted = await _order_post(order_id, request, console, executor, runtime)
    if isinstance(posted, Response):
        return posted
    on, form = posted
    answer = form.get("answer", "")
    desk = AgentDesk(executor.executor, runtime.catalog)

    def resolve() -> ActionResult:
        if answer not in ("charged", "not_charged"):
            return ActionResult("refused", f"unknown answer {answer!r}: use charged or not_charged")
        reason = form.get("reason", "")
        return _too_long(reason, "reason") or desk.resolve_charge(
            on.session.agent, order_id, action_id, answer == "charged", reason
        )

    return await _carry_out(on, form, resolve)


@router.post("/orders/{order_id}/disputes/{check_action_id}", response_class=HTMLResponse)
async def dispute_resolution(
    order_id: str,
    check_action_id: int,
    request: Request,
    console: ConsoleDep,
    executor: ExecutorDep,
    runtime: RuntimeDep,
) -> Response:
    """Mark a charge dispute of the order (flagged on status check ``check_action_id``) as dealt with (form:
    ``note``, what was done; required)."""
    return await _mark_dealt_with(
        order_id,
        request,
        console,
        executor,
        runtime,
        lambda desk, agent, note: desk.resolve_dispute(agent, order_id, check_action_id, note),
    )


@router.post("/orders/{order_id}/by-hand/{case_id}", response_class=HTMLResponse)
async def by_hand_resolution(
    order_id: str,
    case_id: int,
    request: Request,
    console: ConsoleDep,
    executor: ExecutorDep,
    runtime: RuntimeDep,
) -> Response:
    """Mark a case of the order handed to a person (a refund by hand, a possible double payment, a charge taken as
    never charged whose switch went silent: ``case_id``) as dealt with (form: ``note``, what was done; required)."""
    return await _mark_dealt_with(
        order_id,
        request,
        console,
        executor,
        runtime,
        lambda desk, agent, note: desk.resolve_by_hand(agent, order_id, case_id, note),
    )


async def _mark_dealt_with(
    order_id: str,
    request: Request,
    console: ConsoleRuntime,
    executor: ExecutorRuntime,
    runtime: Runtime,
    mark: Callable[[AgentDesk, Agent, str], ActionResult],
) -> Response:
    """Mark something of the order as dealt with by the signed-in agent, with the form's ``note`` saying what was
    done (required; refused when longer than the audit log keeps): ``mark(desk, agent, note)``."""
    posted = await _order_post(order_id, request, console, executor, runtime)
    if isinstance(posted, Response):
        return posted
    on, form = posted
    desk = AgentDesk(executor.executor, runtime.catalog)
    note = form.get("note", "")
    return await _carry_out(on, form, lambda: _too_long(note, "note") or mark(desk, on.session.agent, note))


def _period(days: str) -> int:
    """The period a ``days`` parameter names: 7, 30 or 90; anything else (``days=abc`` included, which answered
    a JSON 422 to the browser) is the default 30."""
    return next((period for period in PERIODS if days.strip() == str(period)), 30)


@router.get("/performance", response_class=HTMLResponse)
async def performance_page(
    request: Request, console: ConsoleDep, executor: ExecutorDep, runtime: RuntimeDep, days: str = "30"
) -> Response:
    """Headline numbers and the four charts for the agent's merchant (``days``: 7, 30 or 90, else 30)."""
    session = await _session(request, console, executor)
    if session is None:
        return _to_login(request)
    period = _period(days)
    base = _base(session, runtime, "performance")
    data = await run_in_threadpool(
        load_performance,
        executor.executor.engine,
        session.agent.merchant_id,
        base["zone"],
        executor.executor.clock(),
        period,
    )
    return _page("performance.html", **base, days=period, periods=PERIODS, charts=CHARTS, numbers=summary(data))


@router.get("/charts/{name}.png")
async def chart(
    name: str, request: Request, console: ConsoleDep, executor: ExecutorDep, runtime: RuntimeDep, days: str = "30"
) -> Response:
    """One chart as a PNG (rendered on request, cached for a minute per merchant, chart and period)."""
    session = await _session(request, console, executor)
    if session is None:
        return Response(status_code=401)
    period = _period(days)
    merchant_id = session.agent.merchant_id
    zone = merchant_zone(runtime.config.merchants[merchant_id])

    def draw() -> bytes:
        return render_chart(
            name, executor.executor.engine, runtime.catalog, merchant_id, zone, executor.executor.clock(), period
        )

    try:
        png = await run_in_threadpool(console.charts.get, (merchant_id, name, period), draw)
    except UnknownChartError as exc:
        return Response(str(exc), status_code=404, media_type="text/plain")
    return Response(
        png,
        media_type="image/png",
        headers={"Cache-Control": "private, max-age=60", "X-Content-Type-Options": "nosniff"},
    )


def mount_console(app: FastAPI) -> None:
    """Add the console's pages and static files (``/console/static``) to ``app``."""
    app.include_router(router)
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console-static")
