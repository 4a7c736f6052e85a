"""Schema migrations on a database that already holds data, on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa

from model.vocab import Channel
from service.executor.optouts import is_opted_out, record_opt_out
from service.migrations import downgrade, upgrade

#: Rows per batch of migration 0017.
T = TypeVar("T")

MASK_BATCH: int = importlib.import_module("service.migrations.versions.0017_mask_stored_errors").BATCH


def _outcome(decision_id: str, merchant_id: str, status: str) -> dict[str, object]:
    moment = datetime(2026, 11, 2, 10, 15, tzinfo=UTC)
    return {
        "decision_id": decision_id, "merchant_id": merchant_id, "order_id": "ord_1", "status": status,
        "occurred_at": moment, "body_json": "{}", "recorded_at": moment,
    }  # fmt: skip


def _outcomes(engine: sa.Engine) -> list[tuple[str, str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT merchant_id, decision_id, status FROM outcomes ORDER BY merchant_id"))
        return [tuple(row) for row in rows]


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'winback.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


def test_outcomes_keyed_per_merchant_keep_the_stored_rows_and_downgrade_back(database_url: str) -> None:
    engine = sa.create_engine(database_url)
    try:
        upgrade(engine, "0003")
        table = sa.table("outcomes", *(sa.column(name) for name in _outcome("", "", "")))
        with engine.begin() as conn:
            conn.execute(sa.insert(table), [_outcome("dec_1", "m_a", "success")])
        upgrade(engine)
        with engine.begin() as conn:  # the same decision_id from another merchant is its own row now
            conn.execute(sa.insert(table), [_outcome("dec_1", "m_b", "failure")])
        assert _outcomes(engine) == [("m_a", "dec_1", "success"), ("m_b", "dec_1", "failure")]
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(sa.insert(table), [_outcome("dec_1", "m_a", "failure")])
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM outcomes WHERE merchant_id = 'm_b'"))
        downgrade(engine, "0003")
        assert _outcomes(engine) == [("m_a", "dec_1", "success")]
        indexes = {index["name"] for index in sa.inspect(engine).get_indexes("outcomes")}
        assert "ix_outcomes_merchant_order" in indexes
    finally:
        engine.dispose()


def test_opt_outs_table_is_created_and_dropped_by_0006(database_url: str) -> None:
    """0006 adds the per-address opt-outs (before, an opt-out lived only in open orders' requests)."""
    engine = sa.create_engine(database_url)
    try:
        upgrade(engine, "0005")
        assert "opt_outs" not in sa.inspect(engine).get_table_names()
        upgrade(engine)
        columns = {column["name"] for column in sa.inspect(engine).get_columns("opt_outs")}
        assert columns == {"merchant_id", "address_sha256", "channel", "source", "created_at"}
        with engine.begin() as conn:  # kept once, however often the STOP comes (on PostgreSQL too)
            moment = datetime(2026, 11, 2, 10, 15, tzinfo=UTC)
            first = record_opt_out(conn, "m_a", Channel.SMS, "+919800000001", "gupshup", moment)
            again = record_opt_out(conn, "m_a", Channel.SMS, "919800000001", "gupshup", moment)
            assert (first, again) == (True, False)
            assert is_opted_out(conn, "m_a", Channel.SMS, "+91 98000 00001")
            assert not is_opted_out(conn, "m_a", Channel.WHATSAPP, "+919800000001")
        downgrade(engine, "0005")
        assert "opt_outs" not in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_channel_outages_table_is_created_and_dropped_by_0007(database_url: str) -> None:
    """0007 adds the channels' outage streaks (before, a provider down for over an hour cost every customer a
    message)."""
    engine = sa.create_engine(database_url)
    try:
        upgrade(engine, "0006")
        assert "channel_outages" not in sa.inspect(engine).get_table_names()
        upgrade(engine, "0007")
        columns = {column["name"] for column in sa.inspect(engine).get_columns("channel_outages")}
        assert columns == {"merchant_id", "channel", "refused_since", "last_refused_at", "down_until", "times_down"}
        downgrade(engine, "0006")
        assert "channel_outages" not in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_the_probe_claim_is_added_by_0009_and_dropped_on_downgrade(database_url: str) -> None:
    """0009 adds the claim of the message that probes a channel after its hold (before, each worker probed)."""
    engine = sa.create_engine(database_url)
    try:
        upgrade(engine)
        columns = {column["name"] for column in sa.inspect(engine).get_columns("channel_outages")}
        assert "probe_until" in columns
        downgrade(engine, "0008")
        columns = {column["name"] for column in sa.inspect(engine).get_columns("channel_outages")}
        assert "probe_until" not in columns
        assert "down_until" in columns
    finally:
        engine.dispose()


def test_attempt_codes_of_any_length_are_kept_from_0008_and_cut_back_on_downgrade(database_url: str) -> None:
    """0008 makes an attempt's codes text: a connector's 35-character decline code did not fit PostgreSQL's
    VARCHAR(32), so the decline could not be recorded at all."""
    engine = sa.create_engine(database_url)
    code = "05 - Do Not Honor (issuer declined)"
    row = {
        "txn_id": "txn_1", "merchant_id": "m_a", "order_id": "ord_1", "attempt_number": 2,
        "processor_payment_id": "ord_1_2", "strategy": "cascade", "connector": "adyen", "status": "failure",
        "error_code": "e" * 300, "network_decline_code": code, "merchant_advice_code": code, "unified_code": "u" * 70,
        "created_at": datetime(2026, 11, 2, 10, 15, tzinfo=UTC),
    }  # fmt: skip
    table = sa.table("transactions", *(sa.column(name) for name in row))
    try:
        upgrade(engine)
        with engine.begin() as conn:
            conn.execute(sa.insert(table), [row])
        downgrade(engine, "0007")
        with engine.connect() as conn:
            kept = conn.execute(sa.text("SELECT network_decline_code, error_code, unified_code FROM transactions"))
            assert [tuple(found) for found in kept] == [(code[:32], "e" * 256, "u" * 64)]
        upgrade(engine)
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT count(*) FROM transactions")) == 1
    finally:
        engine.dispose()


def test_attempts_keyed_per_merchant_keep_the_stored_rows_and_downgrade_back(database_url: str) -> None:
    """0010 keys attempts by (merchant_id, txn_id): keyed by txn_id alone, one merchant's failure event could take
    (or probe for) another merchant's txn_id."""
    engine = sa.create_engine(database_url)
    moment = datetime(2026, 11, 2, 10, 15, tzinfo=UTC)

    def attempt(merchant_id: str, txn_id: str) -> dict[str, object]:
        return {
            "txn_id": txn_id, "merchant_id": merchant_id, "order_id": "ord_1", "attempt_number": 1,
            "processor_payment_id": "ord_1_1", "strategy": "initial", "connector": "stripe", "status": "failure",
            "idempotency_key": f"{merchant_id}:{txn_id}", "created_at": moment,
        }  # fmt: skip

    table = sa.table("transactions", *(sa.column(name) for name in attempt("m_a", "t")))

    def stored() -> list[tuple[str, str]]:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT merchant_id, txn_id FROM transactions ORDER BY merchant_id"))
            return [tuple(row) for row in rows]

    try:
        upgrade(engine, "0009")
        with engine.begin() as conn:
            conn.execute(sa.insert(table), [attempt("m_a", "pi_1")])
        upgrade(engine)
        assert stored() == [("m_a", "pi_1")]
        with engine.begin() as conn:
            conn.execute(sa.insert(table), [attempt("m_b", "pi_1")])
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(sa.insert(table), [attempt("m_b", "pi_1") | {"order_id": "ord_2", "idempotency_key": "k"}])
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM transactions WHERE merchant_id = 'm_b'"))
        downgrade(engine, "0009")
        assert stored() == [("m_a", "pi_1")]
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(sa.insert(table), [attempt("m_b", "pi_1") | {"order_id": "ord_2"}])
    finally:
        engine.dispose()


def test_an_approvals_withdrawal_is_added_by_0012_and_dropped_on_downgrade(database_url: str) -> None:
    """0012 adds when, by which decision and why an agent's approval was withdrawn before it was carried out."""
    engine = sa.create_engine(database_url)
    try:
        upgrade(engine)
        columns = {column["name"] for column in sa.inspect(engine).get_columns("agent_queue")}
        assert {"withdrawn_at", "withdrawn_by", "withdrawn_reason"} <= columns
        downgrade(engine, "0011")
        columns = {column["name"] for column in sa.inspect(engine).get_columns("agent_queue")}
        assert not {"withdrawn_at", "withdrawn_by", "withdrawn_reason"} & columns
        assert "acted_at" in columns
    finally:
        engine.dispose()


def _queue_items(merchants: int, orders: int) -> list[dict[str, object]]:
    """Agent queue items of ``merchants`` merchants with ``orders`` orders each, one in fifty withdrawn."""
    moment = datetime(2026, 11, 2, 10, 15, tzinfo=UTC)
    return [
        {
            "merchant_id": f"m_{merchant}", "order_id": f"ord_{order}", "decision_id": f"dec_{merchant}_{order}",
            "decision_json": "{}", "request_json": "{}", "state": "approved", "created_at": moment,
            "withdrawn_at": moment if order % 50 == 0 else None,
        }
        for merchant in range(merchants)
        for order in range(orders)
    ]  # fmt: skip


def test_the_consoles_withdrawn_approvals_are_read_through_0013s_index_dropped_on_downgrade(database_url: str) -> None:
    """0013: the queue page's look-up of a merchant's withdrawn approvals reads the partial index, not every item
    of the merchant's queue."""
    from service.console.views import withdrawn_approvals
    from service.executor.store import agent_queue

    engine = sa.create_engine(database_url)
    try:
        upgrade(engine)
        assert "ix_agent_queue_withdrawn" in {index["name"] for index in sa.inspect(engine).get_indexes("agent_queue")}
        with engine.begin() as conn:
            conn.execute(sa.insert(agent_queue), _queue_items(merchants=4, orders=1000))
            conn.exec_driver_sql("ANALYZE")
        query = withdrawn_approvals("m_1").compile(engine, compile_kwargs={"literal_binds": True})
        explain = "EXPLAIN QUERY PLAN" if engine.dialect.name == "sqlite" else "EXPLAIN"
        with engine.connect() as conn:
            plan = " ".join(str(row[-1]) for row in conn.exec_driver_sql(f"{explain} {query}"))
            assert "ix_agent_queue_withdrawn" in plan, plan
            assert len(conn.execute(withdrawn_approvals("m_1")).all()) == 20
        downgrade(engine, "0012")
        assert "ix_agent_queue_withdrawn" not in {
            index["name"] for index in sa.inspect(engine).get_indexes("agent_queue")
        }
        assert {"withdrawn_at", "withdrawn_by", "withdrawn_reason"} <= {
            column["name"] for column in sa.inspect(engine).get_columns("agent_queue")
        }
    finally:
        engine.dispose()


def test_the_consoles_unseen_withdrawals_read_the_withdrawn_orders_items_only(database_url: str) -> None:
    """Review: the queue page's second look-up (have agents acted on an order since its approval was withdrawn?)
    read every item the merchant's agents had ever approved or rejected. Every statement it runs now reads the
    partial index of 0013 or the withdrawn orders' own items (merchant and order bound in ix_agent_queue_order)."""
    from service.console.views import _approvals_withdrawn_unseen
    from service.executor.store import agent_queue

    engine = sa.create_engine(database_url)
    try:
        upgrade(engine)
        items = _queue_items(merchants=4, orders=1000)
        for item in items:  # every approval acted on; on every other withdrawn order, before its withdrawal
            order = int(str(item["order_id"]).removeprefix("ord_"))
            item["acted_at"] = datetime(2026, 11, 2, 10, 14 if order % 100 == 0 else 16, tzinfo=UTC)
        with engine.begin() as conn:
            conn.execute(sa.insert(agent_queue), items)
            conn.exec_driver_sql("ANALYZE")
        statements: list[tuple[str, Any]] = []

        def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
            statements.append((statement, parameters))

        explain = "EXPLAIN QUERY PLAN" if engine.dialect.name == "sqlite" else "EXPLAIN"
        with engine.connect() as conn:
            sa.event.listen(engine, "before_cursor_execute", capture)
            unseen = _approvals_withdrawn_unseen(conn, "m_1")
            sa.event.remove(engine, "before_cursor_execute", capture)
            assert unseen == {f"ord_{order}" for order in range(0, 1000, 100)}
            for statement, parameters in statements:
                plan = " ".join(str(row[-1]) for row in conn.exec_driver_sql(f"{explain} {statement}", parameters))
                order_bound = re.search(r"order_id(\)::text)? ?= ?(\?|ANY)", plan)
                assert "ix_agent_queue_withdrawn" in plan or ("ix_agent_queue_order" in plan and order_bound), plan
    finally:
        engine.dispose()


def test_receipt_ordering_and_pacing_are_added_by_0014_keeping_the_nudges_and_dropped_on_downgrade(
    database_url: str,
) -> None:
    """0014: each nudge keeps the receipt that decided its delivery, and channel_pacing holds a rate-limited sender;
    a nudge stored before keeps its row (no receipt known yet), and a downgrade drops both again."""
    engine = sa.create_engine(database_url)
    moment = datetime(2026, 11, 2, 10, 15, tzinfo=UTC)
    nudge = {
        "nudge_id": "ndg_1", "merchant_id": "m_a", "order_id": "ord_1", "channel": "whatsapp", "template_id": "t",
        "sent_at": moment, "status": "accepted", "delivered": True,
    }  # fmt: skip
    try:
        upgrade(engine, "0013")
        with engine.begin() as conn:
            conn.execute(sa.insert(sa.table("nudges", *(sa.column(name) for name in nudge))), [nudge])
        upgrade(engine, "0014")
        columns = {column["name"] for column in sa.inspect(engine).get_columns("nudges")}
        assert {"receipt_status", "receipt_at"} <= columns
        with engine.connect() as conn:
            kept = conn.execute(sa.text("SELECT nudge_id, delivered, receipt_status FROM nudges")).all()
        assert [tuple(row) for row in kept] == [("ndg_1", True, None)]
        pacing = {column["name"] for column in sa.inspect(engine).get_columns("channel_pacing")}
        assert pacing == {"merchant_id", "channel", "held_until", "last_limited_at", "times_limited"}
        downgrade(engine, "0013")
        columns = {column["name"] for column in sa.inspect(engine).get_columns("nudges")}
        assert not {"receipt_status", "receipt_at"} & columns
        assert "channel_pacing" not in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_customer_pacing_and_release_turns_are_added_by_0016_keeping_the_senders_holds_and_dropped_on_downgrade(
    database_url: str,
) -> None:
    """0016: a sender's hold stored before keeps its row (no release going on), customer_pacing is created, and a
    downgrade drops both again, the sender's hold kept."""
    engine = sa.create_engine(database_url)
    moment = datetime(2026, 11, 2, 10, 15, tzinfo=UTC)
    hold = {
        "merchant_id": "m_a", "channel": "whatsapp", "held_until": moment, "last_limited_at": moment,
        "times_limited": 1,
    }  # fmt: skip
    try:
        upgrade(engine, "0015")
        with engine.begin() as conn:
            conn.execute(sa.insert(sa.table("channel_pacing", *(sa.column(name) for name in hold))), [hold])
        upgrade(engine, "0016")
        with engine.connect() as conn:
            kept = conn.execute(sa.text("SELECT merchant_id, times_limited, next_turn_at FROM channel_pacing")).all()
        assert [tuple(row) for row in kept] == [("m_a", 1, None)]
        customers = {column["name"] for column in sa.inspect(engine).get_columns("customer_pacing")}
        assert customers == {
            "merchant_id", "channel", "address_sha256", "held_until", "last_limited_at", "times_limited",
            "next_turn_at",
        }  # fmt: skip
        downgrade(engine, "0015")
        columns = {column["name"] for column in sa.inspect(engine).get_columns("channel_pacing")}
        assert "next_turn_at" not in columns
        assert "customer_pacing" not in sa.inspect(engine).get_table_names()
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT count(*) FROM channel_pacing")) == 1
    finally:
        engine.dispose()


#: A stored decline text quoting a customer, as it is masked, and texts that stay as they are (0017).
RAW_DECLINE = "card holder jane.doe@example.com declined, OTP sent to +91 98765 43210 failed (51)"
MASKED_DECLINE = "card holder j***@example.com declined, OTP sent to +91********3210 failed (51)"
PLAIN_TEXTS = ("insufficient_funds (51), amount 1499.00 INR, order ord_8KQ2", "05 - Do Not Honor", None)


def test_decline_texts_and_action_errors_stored_raw_are_masked_by_0017_in_batches_and_again_harmlessly(
    database_url: str,
) -> None:
    """0017 masks the e-mail addresses and phone numbers of attempts' decline texts, actions' and merchant webhooks'
    errors and outcomes' decline texts (in their bodies, an extra integer beyond 64 bits kept) written before they
    were masked at write, across more than one batch of each table (merchants and ids interleaved in the key order),
    leaving every other text as it is; run again (down and up), it changes nothing."""
    engine = sa.create_engine(database_url)
    moment = datetime(2026, 11, 2, 10, 15, tzinfo=UTC)
    rows = 2 * MASK_BATCH + 7
    texts = [RAW_DECLINE if index % 3 == 0 else PLAIN_TEXTS[index % 3 - 1] for index in range(rows)]
    attempts = [
        {
            "txn_id": f"txn_{index // 2}", "merchant_id": f"m_{index % 2}", "order_id": f"ord_{index}",
            "attempt_number": 1, "processor_payment_id": f"ord_{index}_1", "strategy": "initial",
            "connector": "stripe", "status": "failure", "error_message": text, "created_at": moment,
        }
        for index, text in enumerate(texts)
    ]  # fmt: skip
    errors = [
        {
            "merchant_id": "m_0", "order_id": f"ord_{index}", "kind": "retry", "state": "dead", "due_at": moment,
            "planned_at": moment, "idempotency_key": f"key_{index}", "payload_json": "{}", "last_error": text,
            "created_at": moment, "updated_at": moment,
        }
        for index, text in enumerate(texts)
    ]  # fmt: skip
    hooks = [
        {
            "merchant_id": f"m_{index % 2}", "order_id": f"ord_{index}", "event": "order.failed",
            "url": "http://merchant.test/hooks", "body": "{}", "status": "pending", "attempts": 1,
            "last_error": text, "created_at": moment,
        }
        for index, text in enumerate(texts)
    ]  # fmt: skip

    reported = [
        {
            "decision_id": f"dec_{index // 2}", "merchant_id": f"m_{index % 2}", "order_id": f"ord_{index}",
            "status": "failure", "occurred_at": moment, "recorded_at": moment,
            "body_json": json.dumps(
                {"decision_id": f"dec_{index // 2}", "error_message": text, "amount": 10**20},
                sort_keys=True, separators=(",", ":"), ensure_ascii=False,
            ),
        }
        for index, text in enumerate(texts)
    ]  # fmt: skip
    not_json = reported[0] | {"decision_id": "dec_bad", "order_id": "ord_bad", "body_json": f"not JSON: {RAW_DECLINE}"}
    reported.append(not_json)  # left as it is: one row the migration cannot read must not stop every start

    def stored() -> list[tuple[str | None, str | None, str | None, str | None, int]]:
        with engine.connect() as conn:
            found = conn.execute(
                sa.text(
                    "SELECT t.error_message, a.last_error, w.last_error, o.body_json FROM transactions t "
                    "JOIN actions a ON a.order_id = t.order_id JOIN outcomes o ON o.order_id = t.order_id "
                    "JOIN webhook_deliveries w ON w.order_id = t.order_id ORDER BY t.order_id"
                )
            )
            bodies = [(kept, error, hook, json.loads(body)) for kept, error, hook, body in found]
            return [(kept, error, hook, body["error_message"], body["amount"]) for kept, error, hook, body in bodies]

    expected = sorted(zip((row["order_id"] for row in attempts), texts, strict=True))
    raw = [(text, text, text, text, 10**20) for _, text in expected]
    masked = [
        (text, text, text, text, 10**20)
        for text in (MASKED_DECLINE if text == RAW_DECLINE else text for _, text in expected)
    ]
    try:
        upgrade(engine, "0016")
        with engine.begin() as conn:  # as the code before 0017 wrote them: raw
            for table, rows in (
                ("transactions", attempts),
                ("actions", errors),
                ("webhook_deliveries", hooks),
                ("outcomes", reported),
            ):
                conn.execute(sa.insert(sa.table(table, *(sa.column(name) for name in rows[0]))), rows)
        assert stored() == raw
        upgrade(engine)
        assert stored() == masked
        with engine.connect() as conn:
            kept = conn.scalar(sa.text("SELECT body_json FROM outcomes WHERE decision_id = 'dec_bad'"))
        assert kept == not_json["body_json"]
        downgrade(engine, "0016")
        upgrade(engine)
        assert stored() == masked
    finally:
        engine.dispose()


def test_the_forms_sent_to_the_console_are_kept_from_0019_one_row_a_token_and_dropped_on_downgrade(
    database_url: str,
) -> None:
    """0019 keeps each form an agent sent, by its one-time token: a second POST of the form finds the first's row."""
    engine = sa.create_engine(database_url)
    row = {
        "token_sha256": "a" * 64, "agent_id": 1, "order_id": "ord_1", "form_path": "/console/orders/ord_1/actions",
        "created_at": datetime(2026, 12, 7, 5, 0, tzinfo=UTC),
    }  # fmt: skip
    table = sa.table("console_submissions", *(sa.column(name) for name in row))
    try:
        upgrade(engine)
        with engine.begin() as conn:
            conn.execute(sa.insert(table), [row])
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(sa.insert(table), [row])
        downgrade(engine, "0018")
        assert "console_submissions" not in sa.inspect(engine).get_table_names()
        upgrade(engine)
        assert "console_submissions" in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_what_a_forms_first_post_asked_is_kept_from_0021_and_dropped_on_downgrade(database_url: str) -> None:
    """0021 adds ``fields_sha256`` to the forms already kept (null: compared as before), and a downgrade drops it
    keeping the forms."""
    engine = sa.create_engine(database_url)
    row = {
        "token_sha256": "b" * 64, "agent_id": 1, "order_id": "ord_1", "form_path": "/console/orders/ord_1/actions",
        "created_at": datetime(2026, 12, 7, 5, 0, tzinfo=UTC),
    }  # fmt: skip
    table = sa.table("console_submissions", *(sa.column(name) for name in [*row, "fields_sha256"]))
    try:
        upgrade(engine, "0020")
        with engine.begin() as conn:
            conn.execute(sa.insert(sa.table("console_submissions", *(sa.column(name) for name in row))), [row])
        upgrade(engine)
        with engine.begin() as conn:
            conn.execute(sa.insert(table), [row | {"token_sha256": "c" * 64, "fields_sha256": "d" * 64}])
            kept = conn.execute(sa.select(table.c.token_sha256, table.c.fields_sha256).order_by("token_sha256"))
            assert [tuple(found) for found in kept] == [("b" * 64, None), ("c" * 64, "d" * 64)]
        downgrade(engine, "0020")
        columns = {column["name"] for column in sa.inspect(engine).get_columns("console_submissions")}
        assert "fields_sha256" not in columns
        with engine.connect() as conn:
            assert conn.scalar(sa.select(sa.func.count()).select_from(table)) == 2
        upgrade(engine)
    finally:
        engine.dispose()


def test_the_sender_holds_counted_for_metrics_are_kept_from_0022_and_dropped_on_downgrade(database_url: str) -> None:
    """0022 adds ``sender_holds`` beside the senders' pacing rows already kept (left as they are), and a downgrade
    drops it keeping them."""
    engine = sa.create_engine(database_url)
    moment = datetime(2026, 12, 7, 5, 0, tzinfo=UTC)
    paced = {"merchant_id": "m_a", "channel": "email", "held_until": moment, "last_limited_at": moment}
    pacing = sa.table("channel_pacing", *(sa.column(name) for name in [*paced, "times_limited"]))
    held = {"merchant_id": "m_a", "channel": "email", "held_for": "rate", "holds": 3}
    holds = sa.table("sender_holds", *(sa.column(name) for name in [*held, "held_until", "last_held_at"]))
    try:
        upgrade(engine, "0021")
        with engine.begin() as conn:
            conn.execute(sa.insert(pacing), [paced | {"times_limited": 2}])
        upgrade(engine)
        with engine.begin() as conn:
            conn.execute(sa.insert(holds), [held | {"held_until": moment, "last_held_at": moment}])
            assert [tuple(row) for row in conn.execute(sa.select(holds.c.held_for, holds.c.holds))] == [("rate", 3)]
            assert conn.scalar(sa.select(pacing.c.times_limited)) == 2
        downgrade(engine, "0021")
        assert "sender_holds" not in sa.inspect(engine).get_table_names()
        with engine.connect() as conn:
            assert conn.scalar(sa.select(pacing.c.times_limited)) == 2
        upgrade(engine)
    finally:
        engine.dispose()


def _planned(engine: sa.Engine, conn: sa.Connection, call: Callable[[], T]) -> tuple[T, str]:
    """What ``call`` returns, and the database's plan of the one statement it runs on ``conn``."""
    statements: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        result = call()
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)
    explain = "EXPLAIN QUERY PLAN" if engine.dialect.name == "sqlite" else "EXPLAIN"
    ((statement, parameters),) = statements
    return result, " ".join(str(row[-1]) for row in conn.exec_driver_sql(f"{explain} {statement}", parameters))


def _customer_rows(count: int, moment: datetime) -> list[dict[str, object]]:
    """``count`` customers of one merchant, each messaged (its next turn) a second after the one before."""
    return [
        {
            "merchant_id": "m_a", "channel": "whatsapp", "address_sha256": f"{number:064x}", "held_until": moment,
            "last_limited_at": moment, "times_limited": 0, "next_turn_at": moment + timedelta(seconds=number),
        }
        for number in range(count)
    ]  # fmt: skip


def test_idle_customers_are_found_through_0018s_index_and_the_last_send_kept_until_a_downgrade(
    database_url: str,
) -> None:
    """0018: the worker's clean-up of idle customers' pacing rows reads ``ix_customer_pacing_next_turn``, not the
    whole table (one row per customer messaged in the last hour); each row gets ``last_sent_at``, empty for a row
    stored before; a downgrade drops both and keeps the rows."""
    from service.executor.pacing import forget_idle_customers

    engine = sa.create_engine(database_url)
    moment = datetime(2026, 11, 2, 10, 15, tzinfo=UTC)
    rows = _customer_rows(5000, moment)
    try:
        upgrade(engine, "0017")
        with engine.begin() as conn:
            conn.execute(sa.insert(sa.table("customer_pacing", *(sa.column(name) for name in rows[0]))), rows)
        upgrade(engine, "0018")
        assert "ix_customer_pacing_next_turn" in {
            index["name"] for index in sa.inspect(engine).get_indexes("customer_pacing")
        }
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
            assert conn.scalar(sa.text("SELECT count(*) FROM customer_pacing WHERE last_sent_at IS NULL")) == 5000
            # 15 minutes after the 50th customer's turn: the first 50 are idle
            forgotten, plan = _planned(
                engine,
                conn,
                lambda: forget_idle_customers(conn, moment + timedelta(seconds=949.5), timedelta(minutes=15)),
            )
            assert forgotten == 50
            assert "ix_customer_pacing_next_turn" in plan, plan
        downgrade(engine, "0017")
        assert "ix_customer_pacing_next_turn" not in {
            index["name"] for index in sa.inspect(engine).get_indexes("customer_pacing")
        }
        assert "last_sent_at" not in {column["name"] for column in sa.inspect(engine).get_columns("customer_pacing")}
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT count(*) FROM customer_pacing")) == 4950
    finally:
        engine.dispose()


def test_charge_disputes_are_read_through_0020s_index_dropped_on_downgrade(database_url: str) -> None:
    """0020: the charge disputes (every /metrics scrape, every console queue page) are read from the status checks
    through ``ix_actions_kind``, not from every action of the merchant or the store; a downgrade drops it. 5,000
    orders of one action each, one of them a status check with a dispute."""
    from service.executor.core import SWITCH_CONTRADICTS, charge_disputes

    engine = sa.create_engine(database_url)
    moment = datetime(2026, 12, 7, 5, 0, tzinfo=UTC)
    other_kinds = ("retry", "nudge", "follow_up", "webhook", "close")
    flag = {SWITCH_CONTRADICTS: {"switch_said": "declined (do_not_honor)", "at": moment.isoformat()}}
    rows = [
        {
            "merchant_id": "m_a", "order_id": f"ord_{number}",
            "kind": "charge_status" if number == 7 else other_kinds[number % len(other_kinds)],
            "state": "done", "due_at": moment, "planned_at": moment, "attempts": 0,
            "idempotency_key": f"key_{number}", "created_at": moment, "updated_at": moment,
            "payload_json": json.dumps(
                flag | {"charge_action_id": 1, "connector": "stripe", "payment_id": "ord_7_2"} if number == 7 else {}
            ),
        }
        for number in range(5000)
    ]  # fmt: skip
    orders = [
        {
            "merchant_id": "m_a", "order_id": f"ord_{number}", "state": "SUCCEEDED", "mode": "autonomous",
            "amount": 10.0, "currency": "USD", "customer_id": "cus_1", "request_json": "{}", "failure_json": "{}",
            "attempt_count": 2, "first_failed_at": moment, "created_at": moment, "updated_at": moment,
        }
        for number in range(5000)
    ]  # fmt: skip
    try:
        upgrade(engine)
        with engine.begin() as conn:
            conn.execute(sa.insert(sa.table("orders", *(sa.column(name) for name in orders[0]))), orders)
            conn.execute(sa.insert(sa.table("actions", *(sa.column(name) for name in rows[0]))), rows)
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql("ANALYZE")  # as its autovacuum would; winback never analyses a SQLite store
            for merchant in (None, "m_a"):
                found, plan = _planned(engine, conn, lambda merchant=merchant: charge_disputes(conn, merchant))
                assert [(d.order_id, d.payment_id) for d in found] == [("ord_7", "ord_7_2")]
                assert "ix_actions_kind" in plan, plan
        downgrade(engine, "0019")
        assert "ix_actions_kind" not in {index["name"] for index in sa.inspect(engine).get_indexes("actions")}
    finally:
        engine.dispose()


def test_the_cases_by_hand_flagged_before_0023_are_copied_counted_without_reading_actions_and_dropped_on_downgrade(
    database_url: str,
) -> None:
    """0023 copies the refunds by hand and possible double payments flagged on the actions' payloads before it into
    ``cases_by_hand`` (one row per refund, one per merchant txn id), open; /metrics then counts them from that table,
    not by a ``LIKE`` over every charge's payload (3,000 actions, three cases); a downgrade drops it."""
    from service.executor.by_hand import PAID_TWICE_CASE, REFUND_CASE, cases_counted
    from service.executor.core import paid_twice, refunds_by_hand

    engine = sa.create_engine(database_url)
    moment = datetime(2026, 12, 7, 5, 0, tzinfo=UTC)
    payloads: dict[int, tuple[str, dict[str, object]]] = {
        7: ("refund", {"payment_id": "ord_7_2", "refund_by_hand": {"at": moment.isoformat(), "why": "refused"}}),
        8: (
            "retry",
            {"attempt_number": 2, "connector": "adyen", "merchant_paid_too": {"t1": {"at": moment.isoformat()}}}
            | {"other": "x"},
        ),
        9: ("link_payment", {"attempt_number": 3, "merchant_paid_too": {"t2": {"at": moment.isoformat()}}}),
        10: ("retry", {"note": "merchant_paid_too named in a text, not a flag"}),
    }
    rows = [
        {
            "merchant_id": "m_a", "order_id": f"ord_{number}", "kind": payloads.get(number, ("retry", {}))[0],
            "state": "dead" if number == 7 else "done", "due_at": moment, "planned_at": moment, "attempts": 0,
            "idempotency_key": f"key_{number}", "created_at": moment, "updated_at": moment,
            "payload_json": json.dumps(payloads.get(number, ("retry", {"attempt_number": 2}))[1]),
        }
        for number in range(3000)
    ]  # fmt: skip
    orders = [
        {
            "merchant_id": "m_a", "order_id": f"ord_{number}", "state": "SUCCEEDED", "mode": "autonomous",
            "amount": 10.0, "currency": "USD", "customer_id": "cus_1", "request_json": "{}", "failure_json": "{}",
            "attempt_count": 2, "first_failed_at": moment, "created_at": moment, "updated_at": moment,
        }
        for number in range(3000)
    ]  # fmt: skip
    try:
        upgrade(engine, "0022")
        with engine.begin() as conn:
            conn.execute(sa.insert(sa.table("orders", *(sa.column(name) for name in orders[0]))), orders)
            conn.execute(sa.insert(sa.table("actions", *(sa.column(name) for name in rows[0]))), rows)
        upgrade(engine)
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql("ANALYZE")
            assert [(r.order_id, r.why, r.handed_at, r.open) for r in refunds_by_hand(conn)] == [
                ("ord_7", "refused", moment, True)
            ]
            assert [(p.order_id, p.payment_id, p.merchant_txn_id, p.open) for p in paid_twice(conn)] == [
                ("ord_8", "ord_8_2", "t1", True),
                ("ord_9", "ord_9_3", "t2", True),
            ]
            for kind, labels in ((REFUND_CASE, ("m_a", "refused")), (PAID_TWICE_CASE, ("m_a",))):
                counted, plan = _planned(engine, conn, lambda kind=kind: cases_counted(conn, kind))
                assert (dict(counted.total), dict(counted.open)) == (
                    {labels: 1 if kind == REFUND_CASE else 2},
                    {labels: 1 if kind == REFUND_CASE else 2},
                )
                assert "cases_by_hand" in plan, plan
                assert "actions" not in plan, plan
        downgrade(engine, "0022")
        assert "cases_by_hand" not in sa.inspect(engine).get_table_names()
        upgrade(engine)
    finally:
        engine.dispose()
