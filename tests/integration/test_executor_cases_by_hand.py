"""Marking the money cases handed to a person as dealt with: a possible double payment (winback's charge paid the
order, the merchant reported its own payment too) and a refund to make by hand. ``winback executor
refunds-by-hand --resolve``, the console's cards, the lists and the open gauges on /metrics; once only (a second
mark changes nothing and says so). Real executor, switch behind ``HttpConnector``, SQLite and PostgreSQL."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from model.money import format_money
from pipelines.cli import app as cli
from service.api.app import create_app
from service.console.actions import ActionResult, AgentDesk
from service.console.auth import Agent, add_agent
from service.console.store import audit_log
from service.executor.by_hand import MAX_CASE_NOTE_LENGTH
from service.executor.core import (
    SWITCH_SILENCE_LIMIT,
    SilentNotCharged,
    paid_twice,
    refunds_by_hand,
    silent_not_charged,
)
from service.executor.metrics import SilentNotChargedCollector
from service.executor.store import actions, cases_by_hand, is_postgres
from tests.integration.test_console import PASSWORD, flash, flash_kind
from tests.integration.test_executor import (  # noqa: F401 - make_harness is a fixture
    PAID_BY_MERCHANT,
    Harness,
    event,
    make_harness,
)
from tests.integration.test_executor_switch_followups import (
    RETRY,
    FullSwitch,
    MakeHarness,
    disputed,
    disputes_of,
    handed_over_after_the_switchs_silence,
    lost_charge,
    of_kind,
    run_for,
    signed_in_console,
    through,
    to_the_second,
)
from tests.unit.test_api import Api, settings_for


def by_hand(database_url: str, *args: str) -> tuple[int, str]:
    """``winback executor refunds-by-hand ARGS``: its exit code and output."""
    ran = CliRunner().invoke(cli, ["executor", "refunds-by-hand", *args, "--database-url", database_url])
    return ran.exit_code, ran.output


def refused(database_url: str, *args: str) -> str:
    """What ``refunds-by-hand ARGS`` says as it refuses (a non-zero exit)."""
    code, said = by_hand(database_url, *args)
    assert code != 0, said
    return said


def answered(database_url: str, *args: str) -> str:
    """What ``refunds-by-hand ARGS`` prints as it succeeds (exit 0)."""
    code, said = by_hand(database_url, *args)
    assert code == 0, said
    return said


def paid_twice_case(build: MakeHarness, database_url: str, **order: object) -> Harness:
    """Order ord_1 (``order``: the event's fields to change) paid by winback's retry (payment ord_1_2), then
    reported paid by the merchant's own txn_ext."""
    h = build(RETRY, connector=through(FullSwitch(statuses=["succeeded"])), database_url=database_url)
    h.executor.payment_failed("m_demo", event(**order))
    h.drain()
    assert h.executor.payment_succeeded("m_demo", PAID_BY_MERCHANT).state == "SUCCEEDED"
    return h


def test_a_possible_double_payment_is_marked_dealt_with_once_and_leaves_the_list_and_the_open_gauge(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    tmp_path: Path,
) -> None:
    """There was no way to mark one dealt with: ``refunds-by-hand`` listed it for ever. Now ``--resolve ORDER_ID
    --note TEXT`` marks it (who, when, the note); the list hides it (``--all`` shows it with who, when, the note),
    /metrics keeps counting it and its open gauge reads 0; marking it again changes nothing and says so. A missing
    or too long note and an unknown order are refused, nothing written."""
    h = paid_twice_case(make_harness, database_url)
    assert "m_demo ord_1 (SUCCEEDED): possibly paid twice" in answered(database_url)
    assert "--resolve needs --note saying what was done" in refused(database_url, "--resolve", "ord_1")
    assert f"the note is 1001 characters long: at most {MAX_CASE_NOTE_LENGTH}" in refused(
        database_url, "--resolve", "ord_1", "--note", "x" * (MAX_CASE_NOTE_LENGTH + 1)
    )
    assert "a note is required" in refused(database_url, "--resolve", "ord_1", "--note", "  ")
    assert "no order 'ord_9'" in refused(database_url, "--resolve", "ord_9", "--note", "x")
    assert "--note and --by go with --resolve ORDER_ID" in refused(database_url, "--note", "x")
    with h.executor.engine.connect() as conn:
        assert [p.open for p in paid_twice(conn)] == [True]

    note = "merchant refunded txn_ext to the customer"
    code, said = by_hand(database_url, "--resolve", "ord_1", "--note", note, "--by", "alice")
    assert (code, said) == (
        0,
        "m_demo ord_1: the possible double payment (the merchant's txn_id txn_ext) is marked dealt with by operator "
        f"alice: {note}\n",
    )
    code, listed = by_hand(database_url)
    assert (code, listed) == (
        0,
        "no refund by hand, possible double payment or possibly charged payment open (1 case dealt with: --all lists "
        "them)\n",
    )
    everything = answered(database_url, "--all")
    assert "possibly paid twice" in everything, everything
    assert "check with the merchant; dealt with by operator alice at 2026-" in everything, everything
    assert everything.rstrip().endswith(note), everything

    code, again = by_hand(database_url, "--resolve", "ord_1", "--note", "again", "--by", "bob")
    assert code == 0, again
    assert re.match(
        r"order ord_1: already marked dealt with \(the possible double payment \(the merchant's txn_id txn_ext\) by "
        r"operator alice at 2026-\d\d-\d\dT\d\d:\d\d:\d\dZ: ",
        again,
    ), again
    assert again.rstrip().endswith(f"{note}); nothing changed"), again
    with h.executor.engine.connect() as conn:
        rows = conn.execute(sa.select(cases_by_hand.c.done_by, cases_by_hand.c.done_note)).all()
    assert [tuple(row) for row in rows] == [("operator alice", note)]

    api = Api(create_app(settings_for(tmp_path, database_url=database_url)))
    try:
        metrics = api.get("/metrics").text
        assert 'winback_executor_possible_double_payments_total{merchant_id="m_demo"} 1.0' in metrics
        assert 'winback_executor_possible_double_payments_open{merchant_id="m_demo"} 0.0' in metrics
        page = signed_in_console(api).get("/console/orders/ord_1").text
        assert 'data-testid="paid-twice"' not in page
        assert 'data-testid="paid-twice-dealt-with"' in page
        assert "operator alice marked it as dealt with at " in page
    finally:
        api.close()


@pytest.mark.parametrize(("amount", "currency", "shown"), [(1200.0, "JPY", "¥1,200"), (1234.5, "KWD", "1,234.500 KWD")])
def test_the_list_writes_the_amount_in_its_currencys_minor_units_and_the_time_to_the_second_in_utc(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    amount: float,
    currency: str,
    shown: str,
) -> None:
    """``refunds-by-hand`` wrote the amount as stored (``1234.5 KWD``: a fils short, ``1200.0 JPY``: a yen has no
    minor unit) and the time as ISO 8601 with microseconds and +00:00; now the amount as the order's facts panel
    writes it (model.money.format_money) and the time in UTC to the second, with a Z."""
    h = paid_twice_case(make_harness, database_url, amount=amount, currency=currency)
    with h.executor.engine.connect() as conn:
        [found] = paid_twice(conn)
    assert answered(database_url).splitlines() == [
        f"m_demo ord_1 (SUCCEEDED): possibly paid twice: winback's payment ord_1_2 via adyen (txn_id "
        f"{found.winback_txn_id}) paid it, {shown}, and the merchant reported its own txn_id txn_ext at "
        f"{to_the_second(found.reported_at)}: nothing refunded, check with the merchant"
    ]


def test_an_agent_marks_a_possible_double_payment_dealt_with_on_its_card(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    tmp_path: Path,
) -> None:
    """The paid-twice card had no action. Now it has a note and "Mark as dealt with" (CSRF token and one-time key as
    the order's other forms); a blank note is refused; once marked, the card says who, when and what was done, and
    a second mark changes nothing and says so as information, not as a refusal; each try is in the audit log."""
    h = paid_twice_case(make_harness, database_url)
    with h.executor.engine.connect() as conn:
        [case] = paid_twice(conn)
    api = Api(create_app(settings_for(tmp_path, database_url=database_url)))
    try:
        console = signed_in_console(api)
        page = console.get("/console/orders/ord_1").text
        assert 'data-testid="paid-twice"' in page, page
        assert 'data-testid="resolve-case"' in page
        address = f"/console/orders/ord_1/by-hand/{case.case_id}"
        assert console.post(address, {"note": "no token"}).status_code == 403
        csrf = console.csrf()
        blank = console.act(address, {"note": " ", "csrf_token": csrf})
        assert flash(blank).startswith("say what was done (a note is required"), flash(blank)
        elsewhere = console.act(
            f"/console/orders/ord_1/by-hand/{case.case_id + 100}", {"note": "x", "csrf_token": csrf}
        )
        assert f"has no case {case.case_id + 100} handed to a person" in flash(elsewhere)

        note = "merchant refunded its own payment"
        dealt = console.act(address, {"note": note, "csrf_token": csrf})
        assert flash(dealt) == (
            "Marked as dealt with: the possible double payment (the merchant's txn_id txn_ext) is no longer open"
        )
        assert 'data-testid="resolve-case"' not in dealt.text
        assert 'data-testid="paid-twice-dealt-with"' in dealt.text
        assert "agent asha@m_demo marked it as dealt with" in dealt.text
        assert note in dealt.text
        again = console.act(address, {"note": "again", "csrf_token": csrf})
        assert flash(again).startswith("order ord_1: already marked dealt with ("), flash(again)
        assert flash(again).endswith("; nothing changed")
        assert flash_kind(again) == "unchanged"  # information, not the warning of a refusal
        with console.engine.connect() as conn:
            audit = conn.execute(
                sa.select(audit_log.c.action, audit_log.c.result, audit_log.c.reason)
                .where(audit_log.c.order_id == "ord_1")
                .order_by(audit_log.c.audit_id)
            ).all()
            [marked] = paid_twice(conn)
        assert [(a.action, a.result) for a in audit] == [
            ("resolve_by_hand", "refused"),
            ("resolve_by_hand", "refused"),
            ("resolve_by_hand", "done"),
            ("resolve_by_hand", "unchanged"),
        ]
        assert audit[2].reason == note
        assert marked.done is not None
        assert (marked.done.by, marked.done.note) == ("agent asha@m_demo", note)
    finally:
        api.close()


def test_a_refund_by_hand_is_marked_dealt_with_on_its_card_and_leaves_the_list(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    tmp_path: Path,
) -> None:
    """A refund given to an operator (its switch silent for a day) gets a card on the order's page with "Mark as
    dealt with"; once marked it leaves ``refunds-by-hand``'s list and the open gauge, and the counter keeps it."""
    h = handed_over_after_the_switchs_silence(make_harness, database_url, FullSwitch(statuses=["succeeded"]))
    with h.executor.engine.connect() as conn:
        [refund] = refunds_by_hand(conn)
    api = Api(create_app(settings_for(tmp_path, database_url=database_url)))
    try:
        console = signed_in_console(api)
        page = console.get("/console/orders/ord_1").text
        assert 'data-testid="refund-by-hand"' in page, page
        assert "A refund to make by hand</h2>" in page
        note = "refunded by hand on adyen's dashboard"
        dealt = console.act(
            f"/console/orders/ord_1/by-hand/{refund.case_id}", {"note": note, "csrf_token": console.csrf()}
        )
        assert flash(dealt) == (
            f"Marked as dealt with: the refund by hand (refund action {refund.refund_action_id}) is no longer open"
        )
        assert 'data-testid="refund-by-hand-dealt-with"' in dealt.text
        metrics = api.get("/metrics").text
        assert 'winback_executor_refunds_by_hand_total{merchant_id="m_demo",why="switch_silent"} 1.0' in metrics
        assert 'winback_executor_refunds_by_hand_open{merchant_id="m_demo",why="switch_silent"} 0.0' in metrics
    finally:
        api.close()
    code, listed = by_hand(database_url)
    assert (code, listed) == (
        0,
        "no refund by hand, possible double payment or possibly charged payment open (1 case dealt with: --all lists "
        "them)\n",
    )
    everything = answered(database_url, "--all")
    assert f"refund action {refund.refund_action_id} of payment ord_1_2" in everything, everything
    assert "; dealt with by agent asha@m_demo at 2026-" in everything
    assert everything.rstrip().endswith(note)


def taken_as_never_charged_then_silent(
    build: MakeHarness, database_url: str, taken_by: str, **failed: Any
) -> tuple[Harness, SilentNotCharged]:
    """Order ord_1's retry (payment ord_1_2) taken as never charged by ``taken_by`` (``operator``: its "not
    charged"; ``switch``: its "not found" on an order its merchant paid meanwhile, the send reaching it late), then
    its switch silent for a day and its checks asked no more: the case handed to a person. Before it, none.
    ``failed``: the payment-failed event's overrides."""
    switch = FullSwitch(statuses=["succeeded"], drop_charges=taken_by == "switch", hold_charges=taken_by == "switch")
    h = lost_charge(build, database_url, switch, {"action": "stop"}, **failed)
    assert answered(database_url) == (
        "no refund by hand, possible double payment or possibly charged payment given to an operator\n"
    )
    if taken_by == "operator":
        h.executor.resolve_charge(of_kind(h, "retry")[0].action_id, charged=False)
    else:
        assert h.executor.payment_succeeded("m_demo", PAID_BY_MERCHANT).state == "SUCCEEDED"
        run_for(h, 120)  # the status check: 404, taken as never charged; the one more ask is planned
        switch.deliver_held()  # the send reaches the switch late: the customer paid
    switch.status_mode = "timeout"
    run_for(h, int(SWITCH_SILENCE_LIMIT.total_seconds()) + 3 * 3600, step=600)
    with h.executor.engine.connect() as conn:
        [charge] = silent_not_charged(conn)
    return h, charge


@pytest.mark.parametrize("taken_by", ["operator", "switch"])
def test_a_charge_taken_as_never_charged_whose_switch_went_silent_is_listed_for_an_operator_and_marked_once(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    tmp_path: Path,
    taken_by: str,
) -> None:
    """A charge taken as never charged (an operator's "not charged", or the switch's "not found" on an order its
    merchant paid meanwhile) whose status checks then went unanswered for a day is asked no more: if a late send
    took the payment, only the log, a payload note and a counter said so. Now ``refunds-by-hand`` lists it (order,
    payment, connector, amount, since when the switch is silent: "check with the connector"), /metrics has its
    open gauge, and ``--resolve`` marks it dealt with, once."""
    h, charge = taken_as_never_charged_then_silent(make_harness, database_url, taken_by)
    check = next(a for a in of_kind(h, "charge_status") if a.action_id == charge.check_action_id)
    assert check.state == "dead", check
    assert "stays taken as never charged" in (check.last_error or ""), check
    assert (charge.order_id, charge.payment_id, charge.connector, charge.open) == ("ord_1", "ord_1_2", "adyen", True)

    listed = answered(database_url)
    assert listed.startswith(
        f"m_demo ord_1 ({h.view().state}): possibly charged: payment ord_1_2 via adyen, $499.00, taken as never "
        f"charged (charge action {of_kind(h, 'retry')[0].action_id}); its switch silent since "
        f"{to_the_second(charge.silent_since)}, asked no more at {to_the_second(charge.given_up_at)}: "
        "check with the connector"
    ), listed
    assert charge.given_up_at >= charge.silent_since + SWITCH_SILENCE_LIMIT
    api = Api(create_app(settings_for(tmp_path, database_url=database_url)))
    try:
        metrics = api.get("/metrics").text
    finally:
        api.close()
    assert 'winback_executor_silent_not_charged_total{merchant_id="m_demo"} 1.0' in metrics
    assert 'winback_executor_silent_not_charged_open{merchant_id="m_demo"} 1.0' in metrics
    note = "adyen has no payment ord_1_2"
    code, said = by_hand(database_url, "--resolve", "ord_1", "--note", note, "--by", "alice")
    assert (code, said) == (
        0,
        "m_demo ord_1: the charge taken as never charged, its switch silent (status check "
        f"{charge.check_action_id}) is marked dealt with by operator alice: {note}\n",
    )
    registry = CollectorRegistry()
    registry.register(SilentNotChargedCollector(h.executor.engine, read_every_seconds=0))
    assert registry.get_sample_value("winback_executor_silent_not_charged_open", {"merchant_id": "m_demo"}) == 0.0
    assert registry.get_sample_value("winback_executor_silent_not_charged_total", {"merchant_id": "m_demo"}) == 1.0
    assert answered(database_url) == (
        "no refund by hand, possible double payment or possibly charged payment open (1 case dealt with: --all lists "
        "them)\n"
    )
    everything = answered(database_url, "--all")
    assert "check with the connector; dealt with by operator alice at 20" in everything, everything
    again = answered(database_url, "--resolve", "ord_1", "--note", "again", "--by", "bob")
    assert again.startswith("order ord_1: already marked dealt with (the charge taken as never charged"), again
    assert again.rstrip().endswith(f"{note}); nothing changed"), again


def test_an_agent_marks_a_charge_taken_as_never_charged_whose_switch_went_silent_dealt_with_on_its_card(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    tmp_path: Path,
) -> None:
    """The console had no card for it (the route took its case all the same): the order's page said nothing of a
    payment the customer may have made. Now its card says which payment, via which connector, how much, since when
    the switch is silent, with "Mark as dealt with" as the other cases' cards; once marked, who, when and the note."""
    h, charge = taken_as_never_charged_then_silent(make_harness, database_url, "operator")
    api = Api(create_app(settings_for(tmp_path, database_url=database_url)))
    try:
        console = signed_in_console(api)
        page = console.get("/console/orders/ord_1").text
        assert 'data-testid="silent-not-charged"' in page, page
        assert "The customer may have been charged after all</h2>" in page
        shown = format_money(charge.amount, charge.currency)  # as the order's facts panel writes it
        assert f"Payment <code>ord_1_2</code> via <strong>adyen</strong>, {shown} (charge action" in page
        assert f"(status check {charge.check_action_id})" in page
        assert 'placeholder="adyen has no payment ord_1_2"' in page
        note = "adyen support: no payment ord_1_2, ref 4471"
        dealt = console.act(
            f"/console/orders/ord_1/by-hand/{charge.case_id}", {"note": note, "csrf_token": console.csrf()}
        )
        assert flash(dealt) == (
            "Marked as dealt with: the charge taken as never charged, its switch silent (status check "
            f"{charge.check_action_id}) is no longer open"
        )
        assert 'data-testid="silent-not-charged"' not in dealt.text
        assert 'data-testid="silent-not-charged-dealt-with"' in dealt.text
        assert "agent asha@m_demo marked it as dealt with at " in dealt.text
        assert note in dealt.text
        metrics = api.get("/metrics").text
        assert 'winback_executor_silent_not_charged_open{merchant_id="m_demo"} 0.0' in metrics
    finally:
        api.close()
    with h.executor.engine.connect() as conn:
        [marked] = silent_not_charged(conn)
    assert marked.done is not None
    assert (marked.done.by, marked.done.note) == ("agent asha@m_demo", note)


# ------------------------------------------------------------------------------- the amount of a case on its card

#: How each case kind's list reads on an order's page, by its card's data-testid.
CASES_OF = {"paid-twice": paid_twice, "silent-not-charged": silent_not_charged, "refund-by-hand": refunds_by_hand}


def case_handed_over(card: str, build: MakeHarness, database_url: str, **order: object) -> Harness:
    """Order ord_1 (``order``: the event's fields to change) with one open case of ``card``'s kind, handed to a
    person by the executor itself."""
    if card == "paid-twice":
        return paid_twice_case(build, database_url, **order)
    if card == "silent-not-charged":
        return taken_as_never_charged_then_silent(build, database_url, "operator", **order)[0]
    return handed_over_after_the_switchs_silence(build, database_url, FullSwitch(statuses=["succeeded"]), **order)


def card_on(page: str, testid: str) -> str:
    """The card ``testid`` of an order's page, its HTML up to the end of its section."""
    start = page.index(f'data-testid="{testid}"')
    return page[start : page.index("</section>", start)]


@pytest.mark.parametrize(
    ("card", "amount", "currency", "shown"),
    [
        ("paid-twice", 1234.5, "KWD", "1,234.500 KWD"),
        ("silent-not-charged", 1200.0, "JPY", "¥1,200"),
        ("refund-by-hand", 1200.0, "JPY", "¥1,200"),
    ],
)
def test_a_case_marked_dealt_with_keeps_its_amount_on_its_card(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    tmp_path: Path,
    card: str,
    amount: float,
    currency: str,
    shown: str,
) -> None:
    """An open case's card says how much (``format_money``: no minor unit for a yen, three for a dinar); once marked
    dealt with, its card said who, when and the note but not the amount, so an agent looking back could not see how
    much was involved. Now it writes the amount as the open card does, from the same data."""
    h = case_handed_over(card, make_harness, database_url, amount=amount, currency=currency)
    with h.executor.engine.connect() as conn:
        [case] = CASES_OF[card](conn)
    assert (case.amount, case.currency) == (amount, currency)
    api = Api(create_app(settings_for(tmp_path, database_url=database_url)))
    try:
        console = signed_in_console(api)
        assert shown in card_on(console.get("/console/orders/ord_1").text, card)
        dealt = console.act(
            f"/console/orders/ord_1/by-hand/{case.case_id}", {"note": "dealt with", "csrf_token": console.csrf()}
        )
        assert shown in card_on(dealt.text, f"{card}-dealt-with"), dealt.text
    finally:
        api.close()


@pytest.mark.parametrize("unreadable", [{"amount": None}, {"amount": "n/a"}, {"currency": None}])
def test_a_refund_by_hand_whose_payload_has_no_readable_amount_is_shown_without_one(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
    tmp_path: Path,
    unreadable: dict[str, object],
) -> None:
    """A refund's payload of an older release, or edited by hand, without a readable amount and currency: the
    order's page answered 500 and ``refunds-by-hand`` failed writing it. Now its card, open and dealt with, and the
    list say "amount not recorded"."""
    h = handed_over_after_the_switchs_silence(make_harness, database_url, FullSwitch(statuses=["succeeded"]))
    with h.executor.engine.begin() as conn:
        [refund] = refunds_by_hand(conn)
        its_row = actions.c.action_id == refund.refund_action_id
        payload = orjson.loads(conn.scalar(sa.select(actions.c.payload_json).where(its_row)))
        edited = {key: value for key, value in (payload | unreadable).items() if value is not None}
        conn.execute(actions.update().where(its_row).values(payload_json=orjson.dumps(edited).decode()))
    api = Api(create_app(settings_for(tmp_path, database_url=database_url)))
    try:
        console = signed_in_console(api)
        page = console.get("/console/orders/ord_1")
        assert page.status_code == 200, page.text
        assert (
            'ord_1_2</code> via <strong>adyen</strong>, <span class="muted">amount not recorded</span> (refund'
            in card_on(page.text, "refund-by-hand")
        )
        dealt = console.act(
            f"/console/orders/ord_1/by-hand/{refund.case_id}",
            {"note": "refunded by hand", "csrf_token": console.csrf()},
        )
        assert "amount not recorded" in card_on(dealt.text, "refund-by-hand-dealt-with"), dealt.text
    finally:
        api.close()
    assert "of payment ord_1_2 via adyen, amount not recorded: dead, given to an operator" in answered(
        database_url, "--all"
    )
    with h.executor.engine.connect() as conn:
        [odd] = refunds_by_hand(conn)
    assert (odd.amount, odd.currency) == (None, None)


# ------------------------------------------------------------------------------- marked by two people at once


@contextmanager
def row_held(engine: sa.Engine, key: sa.ColumnElement[int], value: int) -> Iterator[None]:
    """The row whose ``key`` is ``value`` held by a transaction of its own for the block, then rolled back:
    PostgreSQL locks the row (FOR UPDATE: others read it, and wait to change it); SQLite takes the database's write
    lock (the executor's engine begins every transaction IMMEDIATE, and renders no FOR UPDATE), so the others wait
    to begin."""
    with engine.connect() as conn:
        holding = conn.begin()
        try:
            conn.execute(sa.select(key).where(key == value).with_for_update()).one()
            yield
        finally:
            holding.rollback()


def until_waiting_on_locks(engine: sa.Engine, how_many: int, threads: list[threading.Thread]) -> None:
    """On PostgreSQL, return once ``how_many`` sessions of this database wait on a lock (each thread has read what
    it marks and waits to write it); an AssertionError when a thread ended first, or none came within a minute.
    SQLite's waiters cannot be seen: they queue at BEGIN, before reading anything."""
    if not is_postgres(engine):
        return
    waiting = sa.text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    deadline = time.monotonic() + 60
    with engine.connect() as conn:
        while conn.execute(waiting).scalar_one() < how_many:
            conn.rollback()  # a new snapshot of pg_stat_activity for the next look
            assert all(thread.is_alive() for thread in threads), "a mark ended before the other one waited"
            assert time.monotonic() < deadline, "the two marks did not both wait on the row within a minute"
            time.sleep(0.01)


def marked_by_two_at_once(
    h: Harness, key: sa.ColumnElement[int], value: int, mark: Callable[[AgentDesk, Agent], ActionResult]
) -> dict[str, ActionResult]:
    """``mark`` by two agents of m_demo at the same moment, on a row (``key`` = ``value``) held until both have
    read it as open and wait to write it (PostgreSQL), or both wait to begin (SQLite): each agent's result."""
    engine = h.executor.engine
    desk = AgentDesk(h.executor, h.executor.catalog)
    agents = [add_agent(engine, "m_demo", name, PASSWORD) for name in ("asha@m_demo", "bo@m_demo")]
    results: dict[str, ActionResult] = {}
    failures: list[BaseException] = []

    def one(agent: Agent) -> None:
        try:
            results[agent.name] = mark(desk, agent)
        except BaseException as exc:  # shown by the assertion below, not lost in the thread
            failures.append(exc)

    threads = [threading.Thread(target=one, args=(agent,)) for agent in agents]
    with row_held(engine, key, value):
        for thread in threads:
            thread.start()
        until_waiting_on_locks(engine, len(threads), threads)
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    assert sorted(results) == ["asha@m_demo", "bo@m_demo"], results
    return results


def audited(h: Harness) -> list[tuple[str, str, str]]:
    """The console's audit rows of ord_1: (agent, action, result), by agent."""
    with h.executor.engine.connect() as conn:
        rows = conn.execute(
            sa.select(audit_log.c.agent_name, audit_log.c.action, audit_log.c.result).where(
                audit_log.c.order_id == "ord_1"
            )
        ).all()
    return sorted((row.agent_name, row.action, row.result) for row in rows)


def one_done_one_unchanged(results: dict[str, ActionResult]) -> tuple[str, str]:
    """Who marked it (``done``) and who was told it was already (``unchanged``, naming the first, "nothing
    changed"): exactly one of each."""
    done = [name for name, result in results.items() if result.result == "done"]
    unchanged = [name for name, result in results.items() if result.result == "unchanged"]
    assert (len(done), len(unchanged)) == (1, 1), results
    told = results[unchanged[0]].message
    assert told.startswith("order ord_1: already marked dealt with ("), told
    assert f" by agent {done[0]} at " in told, told
    assert told.endswith(f"note of {done[0]}); nothing changed"), told
    return done[0], unchanged[0]


def test_a_charge_dispute_marked_by_two_agents_at_the_same_moment_is_marked_once(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """Two agents mark one dispute as dealt with at the same moment, both having read it open (PostgreSQL: both
    wait on its row; SQLite: on the write lock): one is done, with their note alone kept on the dispute and in
    the check's note; the other is told it was marked already, by whom, with nothing changed (not refused, not
    failed); each has one audit row saying so."""
    h = disputed(make_harness, database_url)
    check_id = disputes_of(h)[0].check_action_id
    results = marked_by_two_at_once(
        h,
        actions.c.action_id,
        check_id,
        lambda desk, agent: desk.resolve_dispute(agent, "ord_1", check_id, f"note of {agent.name}"),
    )
    done, unchanged = one_done_one_unchanged(results)
    assert results[done].message == "Marked as dealt with: the dispute of payment ord_1_2 is no longer open"
    [dispute] = disputes_of(h)
    assert (dispute.resolved_by, dispute.resolution_note) == (f"agent {done}", f"note of {done}")
    check = next(a for a in of_kind(h, "charge_status") if a.action_id == check_id)
    assert (check.last_error or "").count("dispute dealt with by") == 1, check.last_error
    assert audited(h) == sorted([(done, "resolve_dispute", "done"), (unchanged, "resolve_dispute", "unchanged")])


def test_a_case_by_hand_marked_by_two_agents_at_the_same_moment_is_marked_once(
    make_harness: MakeHarness,  # noqa: F811 - the fixture
    database_url: str,
) -> None:
    """As a dispute, a possible double payment's case marked by two agents at the same moment: one done, the other
    told it was marked already, with nothing changed; the first one's note alone is kept."""
    h = paid_twice_case(make_harness, database_url)
    with h.executor.engine.connect() as conn:
        [case] = paid_twice(conn)
    results = marked_by_two_at_once(
        h,
        cases_by_hand.c.case_id,
        case.case_id,
        lambda desk, agent: desk.resolve_by_hand(agent, "ord_1", case.case_id, f"note of {agent.name}"),
    )
    done, unchanged = one_done_one_unchanged(results)
    with h.executor.engine.connect() as conn:
        rows = conn.execute(sa.select(cases_by_hand.c.done_by, cases_by_hand.c.done_note)).all()
    assert [tuple(row) for row in rows] == [(f"agent {done}", f"note of {done}")]
    assert audited(h) == sorted([(done, "resolve_by_hand", "done"), (unchanged, "resolve_by_hand", "unchanged")])
