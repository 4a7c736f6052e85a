"""The forms agents send to the console, each acted on once, and how each went, for its flash and its re-posts.

Every action form the console renders carries a one-time token (``new_token``, the ``submission`` field); a script
may send a key of its own in an ``Idempotency-Key`` header instead (``one_time_key``), and a POST with neither is
refused, acting on nothing: a script retried after a timeout acted again each time. The first POST of a key claims
it (``SubmissionStore.claim``: a row keyed by the token's SHA-256, committed before anything is acted on) and, once
carried out, notes its result (``record``). A second POST of the same token (a double click, a reload of an answer
page, an old page sent again) finds that row: it is answered with the first POST's result, waiting a little for a
first POST still being carried out, and nothing is acted on or audited again. Claiming by a unique key holds
across the server's workers and the machines sharing its database, and for POSTs that arrive at the same moment.

A POST without JavaScript is answered with a redirect to the order's page (Post/Redirect/Get): ``arm_flash`` gives
the result a one-time key, which that redirect's address carries to the page (signed for the agent's session), and
``take_flash`` hands the result over once, so a reload of the page shows the order without it. Rows older than a
session's lifetime are deleted as new forms are claimed: a form older than its session fails its CSRF check before
its token is looked at.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from service.console.actions import ActionResult
from service.console.auth import Agent
from service.console.store import submissions

#: The longest one-time key taken (``new_token`` makes 32 characters; a UUID is 36).
MAX_TOKEN_LENGTH = 64
_TOKEN_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
#: The form field of an action form's one-time token.
SUBMISSION_FIELD = "submission"
#: The request header a script may send its own one-time key in (draft-ietf-httpapi-idempotency-key-header).
IDEMPOTENCY_HEADER = "Idempotency-Key"

NO_KEY = (
    f"Nothing was done: this request carries no one-time key. Send the {SUBMISSION_FIELD!r} field of the order "
    f"page's form, or an {IDEMPOTENCY_HEADER} header with a new key for each action (a UUID, say), the same key "
    "when the request is sent again."
)
BAD_KEY = (
    f"Nothing was done: the one-time key (the {SUBMISSION_FIELD!r} field or the {IDEMPOTENCY_HEADER} header) must be "
    f"1-{MAX_TOKEN_LENGTH} characters of letters, digits, - and _ (a UUID, say)."
)
TWO_KEYS = (
    f"Nothing was done: this request carries two different one-time keys (the {SUBMISSION_FIELD!r} field and an "
    f"{IDEMPOTENCY_HEADER} header, or two such headers). Send one."
)

SENT_BEFORE = "This form was sent before (a reload, a second click or an old page sent again): nothing was done again."
STILL_UNDER_WAY = (
    "This form was sent a moment ago and that request is still being carried out: nothing was done again. "
    "Reload the order in a few seconds to see how it went before acting again."
)
OTHER_FIELDS = (
    "Nothing was done: this one-time key was sent before with other fields (another action, channel, choice or "
    "reason); a request sent again must be the same. Reload the order to see how the first went, and act again "
    "with a new key."
)
OTHER_FORM = (
    "Nothing was done: this form's token belongs to another form (the page was altered, or a script's "
    f"{IDEMPOTENCY_HEADER} was used before for another order or action). Reload the order and act again."
)


def new_token() -> str:
    """A fresh one-time token for a rendered form."""
    return secrets.token_urlsafe(24)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def fields_digest(fields: Mapping[str, str]) -> str:
    """What a POST asked, as compared when its key is sent again: its fields' SHA-256, in any order."""
    return _digest(json.dumps(sorted(fields.items()), ensure_ascii=False))


def _usable(token: str) -> bool:
    return bool(token) and len(token) <= MAX_TOKEN_LENGTH and set(token) <= _TOKEN_CHARACTERS


class KeyRefusedError(ValueError):
    """A POST whose one-time key is missing or malformed: acted on nothing (the message says what to send)."""


@dataclass(frozen=True)
class OneTimeKey:
    """What a POST's form is claimed under: the form's token, or a script's ``Idempotency-Key`` (``from_header``),
    which is the agent's own: two agents' scripts may send the same key without one refusing the other."""

    value: str
    from_header: bool = False

    def digest(self, agent: Agent) -> str:
        """The key of the form's row in ``console_submissions``."""
        return _digest(f"{IDEMPOTENCY_HEADER}:{agent.agent_id}:{self.value}" if self.from_header else self.value)


def one_time_key(form_token: str | None, header_values: list[str]) -> OneTimeKey:
    """The POST's one-time key: its form's ``submission`` field, else its ``Idempotency-Key`` header (a Structured
    Field string, quoted, or the bare key as most clients send it); KeyRefusedError when there is none, it is
    malformed, or two different ones are sent."""
    headers = {value.strip().removeprefix('"').removesuffix('"') for value in header_values}
    if len(headers) > 1 or (form_token and headers and headers != {form_token}):
        raise KeyRefusedError(TWO_KEYS)
    if form_token:
        key = OneTimeKey(form_token)
    elif headers:
        key = OneTimeKey(headers.pop(), from_header=True)
    else:
        raise KeyRefusedError(NO_KEY)
    if not _usable(key.value):
        raise KeyRefusedError(BAD_KEY)
    return key


@dataclass(frozen=True)
class Submission:
    """One POST of a form as ``claim`` found it: ``first`` when it is to be acted on. Otherwise ``sent_before``
    when it is a second POST of the form, and ``earlier`` is how its first POST went (None while that one is still
    being carried out); or a form refused as another's (``earlier`` says so)."""

    submission_id: int
    first: bool
    sent_before: bool = False
    earlier: ActionResult | None = None


def sent_again(earlier: ActionResult | None) -> ActionResult:
    """What a second POST of a form is told: how its first went (or that it is still under way)."""
    if earlier is None:
        return ActionResult("refused", STILL_UNDER_WAY)
    return ActionResult(earlier.result, f"{SENT_BEFORE} How it went: {earlier.message}", rules=earlier.rules)


@dataclass(frozen=True)
class Flash:
    """A form's result taken for the order's page (``result`` None: its first POST is still under way)."""

    result: ActionResult | None


def _result_of(result: str | None, message: str | None, rules: str | None) -> ActionResult | None:
    """The result noted on a row of ``submissions`` (None while its form is being carried out)."""
    if result not in ("done", "refused", "failed", "unchanged"):
        return None
    return ActionResult(result, message or "", rules=[rule for rule in (rules or "").split(",") if rule])  # type: ignore[arg-type]


class SubmissionStore:
    """The ``console_submissions`` table: forms claimed, their results and their pending flashes."""

    def __init__(
        self, engine: Engine, keep: timedelta, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self.engine = engine
        self.keep = keep
        self.clock = clock

    def claim(
        self, agent: Agent, order_id: str, form_path: str, token: OneTimeKey, fields: Mapping[str, str]
    ) -> Submission:
        """Claim the form's one-time ``token`` for this POST of ``fields`` (its CSRF token and key left out)."""
        now = self.clock()
        key = token.digest(agent)
        asked = fields_digest(fields)
        row = {
            "agent_id": agent.agent_id,
            "order_id": order_id,
            "form_path": form_path[:1024],
            "created_at": now,
            "fields_sha256": asked,
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(submissions.delete().where(submissions.c.created_at <= now - self.keep))
                inserted = conn.execute(submissions.insert().values(token_sha256=key, **row))
                primary = inserted.inserted_primary_key
                assert primary is not None
                return Submission(int(primary[0]), first=True)
        except IntegrityError:
            pass  # the token was claimed before: this is a second POST of the form
        with self.engine.begin() as conn:
            earlier = conn.execute(
                sa.select(
                    submissions.c.submission_id,
                    submissions.c.agent_id,
                    submissions.c.order_id,
                    submissions.c.form_path,
                    submissions.c.result,
                    submissions.c.message,
                    submissions.c.rules,
                    submissions.c.fields_sha256,
                ).where(submissions.c.token_sha256 == key)
            ).one()
            same_form = (earlier.agent_id, earlier.order_id, earlier.form_path) == (
                agent.agent_id,
                order_id,
                row["form_path"],
            )
            if same_form and earlier.fields_sha256 in (None, asked):  # None: sent before 0021 kept what it asked
                found = _result_of(earlier.result, earlier.message, earlier.rules)
                return Submission(int(earlier.submission_id), first=False, sent_before=True, earlier=found)
            # Another agent's, order's or form's token, or the key of another request: refused, under a row of its
            # own (for its flash).
            refusal = OTHER_FIELDS if same_form else OTHER_FORM
            inserted = conn.execute(
                submissions.insert().values(token_sha256=_digest(new_token()), result="refused", message=refusal, **row)
            )
            primary = inserted.inserted_primary_key
            assert primary is not None
            return Submission(int(primary[0]), first=False, earlier=ActionResult("refused", refusal))

    def record(self, submission_id: int, result: ActionResult) -> None:
        """Note how the claimed form's action went (what a second POST of it is answered)."""
        with self.engine.begin() as conn:
            conn.execute(
                submissions.update()
                .where(submissions.c.submission_id == submission_id)
                .values(result=result.result, message=result.message, rules=",".join(result.rules) or None)
            )

    def forget(self, submission_id: int) -> None:
        """Take a claim back: nothing was acted on (the order is not the agent's merchant's)."""
        with self.engine.begin() as conn:
            conn.execute(submissions.delete().where(submissions.c.submission_id == submission_id))

    def wait_for(self, submission_id: int, seconds: float, every: float = 0.1) -> ActionResult | None:
        """The result of a form whose first POST is still being carried out, once noted (None after ``seconds``)."""
        deadline = time.monotonic() + seconds
        while True:
            with self.engine.connect() as conn:
                row = conn.execute(
                    sa.select(submissions.c.result, submissions.c.message, submissions.c.rules).where(
                        submissions.c.submission_id == submission_id
                    )
                ).first()
            found = None if row is None else _result_of(row.result, row.message, row.rules)
            if found is not None or time.monotonic() >= deadline:
                return found
            time.sleep(every)

    def arm_flash(self, submission_id: int) -> str:
        """A new one-time key for showing the form's result once on the order's page (a second POST re-arms it)."""
        key = secrets.token_urlsafe(16)
        with self.engine.begin() as conn:
            conn.execute(submissions.update().where(submissions.c.submission_id == submission_id).values(flash_key=key))
        return key

    def take_flash(self, submission_id: int, key: str, agent: Agent, order_id: str) -> Flash | None:
        """The form's result, once: None when its flash was shown already, or is not this agent's for this order."""
        with self.engine.begin() as conn:
            taken = conn.execute(
                submissions.update()
                .where(
                    submissions.c.submission_id == submission_id,
                    submissions.c.flash_key == key,
                    submissions.c.agent_id == agent.agent_id,
                    submissions.c.order_id == order_id,
                )
                .values(flash_key=None)
            )
            if taken.rowcount != 1:
                return None
            row = conn.execute(
                sa.select(submissions.c.result, submissions.c.message, submissions.c.rules).where(
                    submissions.c.submission_id == submission_id
                )
            ).one()
        return Flash(_result_of(row.result, row.message, row.rules))
