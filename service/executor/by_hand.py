"""The money cases the executor hands to a person, kept in ``cases_by_hand`` (migration 0023): refunds of duplicate
charges to make by hand (``winback executor refunds-by-hand``), orders the customer may have paid twice (winback's
charge and the merchant's own payment), and charges taken as never charged whose switch then answered no status
check for a day (a late send may have charged the customer after all: check with the connector). Each is written in
the transaction that flags it on its action, and marked dealt with by a person (the CLI's ``--resolve``, the
console's card) with who, when and a note, once: marking it again changes nothing and says so. ``/metrics`` counts
them here, a few rows, instead of reading every charge's payload at each scrape.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, Protocol, TypeVar

import sqlalchemy as sa

from model.personal_data import mask_addresses_in
from model.wording import utc_second
from service.executor.store import as_utc, as_utc_or_none, cases_by_hand, upsert_into

#: ``cases_by_hand.kind`` of a refund given to an operator to make by hand (REFUND_BY_HAND).
REFUND_CASE = "refund"
#: ``cases_by_hand.kind`` of an order winback's charge paid that its merchant reported paid by its own payment too
#: (MERCHANT_PAID_TOO), one case per merchant txn id (``ref``).
PAID_TWICE_CASE = "paid_twice"
#: ``cases_by_hand.kind`` of a charge taken as never charged (by an operator, or by its switch's "not found") whose
#: status checks were then asked no more after SWITCH_SILENCE_LIMIT of its switch's silence: if a send reached the
#: connector late, the customer paid and nothing else will show it. One case per status check (``action_id``).
SILENT_NOT_CHARGED_CASE = "silent_uncharged"
#: The longest note saying what was done (as a dispute's resolution, and an agent's reason in the console).
MAX_CASE_NOTE_LENGTH = 1000
#: The longest name of who dealt with a case (``--by``).
MAX_CASE_BY_LENGTH = 200


class CaseResolutionError(ValueError):
    """A case cannot be marked dealt with: no note, a note or name too long, or no such case. Nothing written."""


@dataclass(frozen=True)
class CaseDone:
    """Who marked a case dealt with, when, and the note saying what was done."""

    by: str
    at: datetime
    note: str


@dataclass(frozen=True)
class Case:
    """One row of ``cases_by_hand``: ``ref`` is the merchant's txn id of a possible double payment ('' for a
    refund), ``why`` a refund's reason (None for a possible double payment); ``done`` None while it is open."""

    case_id: int
    kind: str
    merchant_id: str
    order_id: str
    action_id: int
    ref: str
    why: str | None
    flagged_at: datetime
    done: CaseDone | None

    @property
    def open(self) -> bool:
        """Whether nobody has marked it dealt with yet."""
        return self.done is None

    def described(self) -> str:
        """The case in the words of the CLI's and the console's messages."""
        if self.kind == REFUND_CASE:
            return f"the refund by hand (refund action {self.action_id})"
        if self.kind == SILENT_NOT_CHARGED_CASE:
            return f"the charge taken as never charged, its switch silent (status check {self.action_id})"
        return f"the possible double payment (the merchant's txn_id {self.ref})"


def done_of(row: sa.Row[object] | sa.RowMapping) -> CaseDone | None:
    """The resolution of a row carrying ``cases_by_hand``'s ``done_by``, ``done_at`` and ``done_note``."""
    mapping = row._mapping if isinstance(row, sa.Row) else row
    at = as_utc_or_none(mapping["done_at"])
    if at is None:
        return None
    return CaseDone(by=str(mapping["done_by"]), at=at, note=str(mapping["done_note"] or ""))


def _case(row: sa.RowMapping) -> Case:
    return Case(
        case_id=int(row["case_id"]),
        kind=str(row["kind"]),
        merchant_id=str(row["merchant_id"]),
        order_id=str(row["order_id"]),
        action_id=int(row["action_id"]),
        ref=str(row["ref"]),
        why=None if row["why"] is None else str(row["why"]),
        flagged_at=as_utc(row["flagged_at"]),
        done=done_of(row),
    )


def note_case(
    conn: sa.Connection,
    kind: str,
    merchant_id: str,
    order_id: str,
    action_id: int,
    flagged_at: datetime,
    *,
    ref: str = "",
    why: str | None = None,
) -> None:
    """Keep a case handed to a person, in the transaction that flags it on action ``action_id``; the same case
    again (a refund handed over a second time) is kept once, as first flagged."""
    conn.execute(
        upsert_into(conn, cases_by_hand)
        .values(
            kind=kind,
            merchant_id=merchant_id,
            order_id=order_id,
            action_id=action_id,
            ref=ref,
            why=why,
            flagged_at=flagged_at,
        )
        .on_conflict_do_nothing(index_elements=["kind", "action_id", "ref"])
    )


class DealtWith(Protocol):
    """Something a person marks dealt with once (a case, a charge dispute): its words, and its resolution."""

    @property
    def done(self) -> CaseDone | None: ...

    def described(self) -> str: ...


CaseT = TypeVar("CaseT", bound=DealtWith)


@dataclass(frozen=True)
class Marked(Generic[CaseT]):
    """What a mark as dealt with did (``mark_cases_done``, ``resolve_charge_disputes``): what it marked now, and
    what was dealt with before (left as it was)."""

    now: list[CaseT]
    before: list[CaseT]


def mark_cases_done(
    conn: sa.Connection,
    merchant_id: str,
    order_id: str,
    by: str,
    note: str,
    now: datetime,
    *,
    case_id: int | None = None,
) -> Marked[Case]:
    """Mark the open cases of ``merchant_id``'s order ``order_id`` (or its case ``case_id``) dealt with, ``by``
    whom, with ``note`` saying what was done: they leave the lists and the open gauges on /metrics and stay on the
    order with who, when and the note. Each is set only while open (compared and set in one statement), so a case
    marked twice, one after the other or two people at once, keeps the first resolution: the second is reported
    in ``Marked.before``, nothing written. CaseResolutionError, nothing written, when the note is empty or too long,
    ``by`` too long, or the order has no such case."""
    note = note.strip()
    if not note:
        raise CaseResolutionError('say what was done (a note is required: "refunded by hand on the switch", say)')
    if len(note) > MAX_CASE_NOTE_LENGTH:
        raise CaseResolutionError(f"the note is {len(note)} characters long: at most {MAX_CASE_NOTE_LENGTH}")
    by = by.strip()
    if not by or len(by) > MAX_CASE_BY_LENGTH:
        raise CaseResolutionError(f"who dealt with it is named in 1 to {MAX_CASE_BY_LENGTH} characters")
    query = sa.select(cases_by_hand).where(
        cases_by_hand.c.merchant_id == merchant_id, cases_by_hand.c.order_id == order_id
    )
    if case_id is not None:
        query = query.where(cases_by_hand.c.case_id == case_id)
    found = [_case(row) for row in conn.execute(query.order_by(cases_by_hand.c.case_id)).mappings()]
    if not found:
        which = "no case" if case_id is None else f"no case {case_id}"
        raise CaseResolutionError(
            f"order {order_id} of merchant {merchant_id} has {which} handed to a person (a refund by hand, a "
            "possible double payment, or a charge taken as never charged whose switch went silent)"
        )
    masked = mask_addresses_in(note)
    marked, before = [], []
    for case in found:
        if case.open:
            changed = conn.execute(
                cases_by_hand.update()
                .where(cases_by_hand.c.case_id == case.case_id, cases_by_hand.c.done_at.is_(None))
                .values(done_by=by, done_at=now, done_note=masked)
            ).rowcount
            if changed == 1:
                marked.append(Case(**{**case.__dict__, "done": CaseDone(by=by, at=now, note=masked)}))
                continue
            row = conn.execute(sa.select(cases_by_hand).where(cases_by_hand.c.case_id == case.case_id)).mappings()
            case = _case(row.one())  # someone else marked it meanwhile: theirs stands
        before.append(case)
    return Marked(now=marked, before=before)


def already_done(before: Iterable[DealtWith], order_id: str, when: Callable[[datetime], str] = utc_second) -> str:
    """The no-op message when everything named was dealt with before (``Marked.before``): by whom, when (``when``
    writes it: in UTC to the second with a Z by default, as the CLI's lists; the merchant's local time in the
    console, as its pages), and their note; the same words for a case and a charge dispute."""
    done = "; ".join(
        f"{case.described()} by {case.done.by} at {when(case.done.at)}: {case.done.note}"
        for case in before
        if case.done is not None
    )
    return f"order {order_id}: already marked dealt with ({done}); nothing changed"


@dataclass(frozen=True)
class CasesCounted:
    """Every case of a kind by its labels (merchant, and ``why`` for a refund): all of them, and the open ones."""

    total: Counter[tuple[str, ...]]
    open: Counter[tuple[str, ...]]


def cases_counted(conn: sa.Connection, kind: str) -> CasesCounted:
    """The cases of ``kind`` by merchant (and why, for a refund), all and open, counted in one grouped read of
    ``cases_by_hand`` (a row per case handed to a person: few)."""
    labels = [cases_by_hand.c.merchant_id] + ([cases_by_hand.c.why] if kind == REFUND_CASE else [])
    rows = conn.execute(
        sa.select(*labels, sa.func.count(), sa.func.count() - sa.func.count(cases_by_hand.c.done_at))
        .where(cases_by_hand.c.kind == kind)
        .group_by(*labels)
    )
    total: Counter[tuple[str, ...]] = Counter()
    still_open: Counter[tuple[str, ...]] = Counter()
    for *named, every, not_done in rows:
        key = tuple(str(label) for label in named)
        total[key] = int(every)
        still_open[key] = int(not_done)
    return CasesCounted(total=total, open=still_open)
