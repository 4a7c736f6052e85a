"""The feedback loop's parts: support-aware exploration, code inventory and report, gateway status map import,
the executor's history export, bounded new-code metrics, and the retrain helpers."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from model.catalog import load_catalog
from model.codewatch import KnownCode, code_inventory, code_key, nearest_codes
from model.gsm import GsmError, load_overlay, read_gsm, to_overlay, with_overlay, write_overlay
from model.history import read_history
from model.policy import DEFAULT_RETRYABLE_THRESHOLD, PolicyConfig, decide, exploration_rate
from model.vocab import Action, ErrorClass
from pipelines.retrain import gate_checks, parse_every, retrain_loop, window
from service.api.metrics import ApiMetrics
from service.api.store import decisions as decisions_table
from tests.factories import fail_the_nth_move_onto, make_merchant, make_request

# --------------------------------------------------------------------------------------------- exploration


@pytest.mark.parametrize(
    ("known_code", "support", "expected"),
    [
        (True, None, 0.05),  # no model support: the catalog decides
        (False, None, 0.15),
        (True, 0, 0.15),  # the model never trained on it: full rare-code exploration, even if catalogued
        (True, 30, 0.10),  # half-way at the half-life
        (False, 10_000, 0.05 + 0.10 * 30 / 10_030),  # plenty of evidence: back towards the base rate
    ],
)
def test_exploration_shrinks_with_training_support(known_code: bool, support: int | None, expected: float) -> None:
    assert exploration_rate(PolicyConfig(), known_code, support) == pytest.approx(expected)


class _FixedScorer:
    """A scorer that says no silent retry ever works, with a given training support for every code."""

    version = "test"
    retryable_threshold = DEFAULT_RETRYABLE_THRESHOLD

    def __init__(self, support: int) -> None:
        self.support = support

    def score(self, request: Any, candidates: list[Any]) -> np.ndarray:
        return np.array([0.0 if c.action == Action.RETRY else 0.3 for c in candidates])

    def explain(self, request: Any, candidate: Any, k: int = 3) -> list[str]:
        return []

    def code_support(self, connector: str, code: str | None) -> int:
        return self.support


def _retry_share(support: int, n: int = 600) -> tuple[float, list[float]]:
    rng = np.random.default_rng(0)
    catalog, merchant = load_catalog(), make_merchant()
    decisions = [decide(make_request(), merchant, _FixedScorer(support), catalog=catalog, rng=rng) for _ in range(n)]
    retries = [d for d in decisions if d.action == Action.RETRY]
    return len(retries) / n, [d.propensity for d in retries]


def test_a_code_judged_non_retryable_keeps_being_tried_more_while_evidence_is_thin() -> None:
    thin_share, thin_propensities = _retry_share(support=0)
    rich_share, _ = _retry_share(support=100_000)
    assert thin_share > rich_share > 0.0  # never zero: the code can still be found retryable
    # Explored retries are logged with their small propensity, for off-policy learning.
    assert thin_propensities
    assert max(thin_propensities) < 0.05


@pytest.mark.parametrize(("support", "seen"), [(3, "3 retries"), (1, "1 retry")])  # not "1 retries"
def test_thin_evidence_is_named_in_the_reasons(support: int, seen: str) -> None:
    decision = decide(
        make_request(), make_merchant(), _FixedScorer(support), catalog=load_catalog(), rng=np.random.default_rng(1)
    )
    assert f"thin evidence: the model saw {seen} after this code" in decision.reasons


# ----------------------------------------------------------------------------------------------- codewatch


def test_code_inventory_counts_retries_and_successes_per_code_case_insensitively() -> None:
    rows = code_inventory(
        ["stripe", "Stripe", "stripe", "adyen"],
        ["card_declined", "CARD_DECLINED", "card_declined", "Refused"],
        ["Declined", "Declined", None, "Refused"],
        [True, True, False, True],
        [True, False, True, False],
    )
    entries = {code_key(r[0], r[1]): KnownCode.from_list(r) for r in rows}
    assert entries["stripe|card_declined"].support == 2
    assert entries["stripe|card_declined"].successes == 1  # the non-retry point's label does not count
    assert entries["adyen|refused"].success_rate == 0.0


def test_nearest_codes_by_text_skip_the_code_itself() -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer

    inventory = [
        KnownCode("stripe", "insufficient_funds", "Your card has insufficient funds.", 50, 5),
        KnownCode("stripe", "processing_error", "An error occurred while processing your card.", 40, 20),
        KnownCode("adyen", "NEW_LOW_FUNDS", "Not enough funds", 0, 0),
    ]
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5)).fit(
        ["stripe insufficient funds", "processing error", "adyen new low funds not enough funds"]
    )
    found = nearest_codes(vectorizer, inventory, [("adyen", "NEW_LOW_FUNDS", "Not enough funds")], k=2)[0]
    assert [n.code for n in found] == ["insufficient_funds", "processing_error"]
    assert found[0].similarity > found[1].similarity
    assert "retry 10% of 50" in found[0].describe()


# ------------------------------------------------------------------------------------- gateway status map

_GSM_HEADER = (
    "connector,flow,sub_flow,code,message,status,router_error,decision,step_up_possible,unified_code,"
    "unified_message,error_category,clear_pan_possible\n"
)


def test_gsm_import_classifies_codes_and_extends_the_catalog_without_overriding_it(tmp_path: Path) -> None:
    source = tmp_path / "gsm.csv"
    source.write_text(
        _GSM_HEADER
        + "newpsp,Authorize,sub,N1,Gateway down,failure,,retry,false,,,processor_downtime,false\n"
        + "newpsp,Authorize,sub,N2,Please authenticate,failure,,do_default,true,,,,false\n"
        + "newpsp,Authorize,sub,N3,Tokenised card rejected,failure,,do_default,false,,,,true\n"
        + "newpsp,Authorize,sub,N4,Card details,failure,,do_default,false,UE_1000,,,false\n"
        + "newpsp,Authorize,sub,N5,???,failure,,do_default,false,,,,false\n"
        + "stripe,Authorize,sub,card_declined,Declined,failure,,retry,false,,,processor_downtime,false\n",
        encoding="utf-8",
    )
    entries = {e.code: e for e in to_overlay(read_gsm(source))}
    assert (entries["N1"].error_class, entries["N1"].class_from) == (ErrorClass.PROCESSOR_TECHNICAL, "error_category")
    assert entries["N1"].retryable_prior
    assert not entries["N2"].retryable_prior
    assert entries["N2"].error_class == ErrorClass.AUTHENTICATION_REQUIRED
    assert entries["N3"].error_class == ErrorClass.TOKEN_FAILURE
    assert (entries["N4"].error_class, entries["N4"].class_from) == (ErrorClass.BAD_CARD_DATA, "unified_code")
    assert entries["N5"].error_class == ErrorClass.UNKNOWN

    overlay = load_overlay(write_overlay(entries.values(), tmp_path / "generated" / "overlay.csv"))
    base = load_catalog()
    extended = with_overlay(base, overlay)
    assert extended.normalise("newpsp", "N1").error_class == ErrorClass.PROCESSOR_TECHNICAL
    assert extended.normalise("newpsp", "N1").known_code
    assert not extended.normalise("newpsp", "N5").known_code  # unknown class is not imported
    stripe = base.normalise("stripe", "card_declined")
    assert extended.normalise("stripe", "card_declined") == stripe  # the shipped catalog wins
    assert extended.version != base.version
    assert not base.normalise("newpsp", "N1").known_code  # the shared catalog is untouched


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("connector,code\nx,y\n", "missing column(s) message, decision"),
        (_GSM_HEADER + "x,f,s,C,m,failure,,maybe,false,,,,false\n", "line 2: decision must be one of"),
        (_GSM_HEADER + "x,f,s,C,m,failure,,retry,perhaps,,,,false\n", "line 2: column 'step_up_possible' must be"),
        (_GSM_HEADER + ",f,s,C,m,failure,,retry,false,,,,false\n", "line 2: column 'connector' is empty"),
    ],
)
def test_gsm_import_names_the_problem(tmp_path: Path, body: str, message: str) -> None:
    source = tmp_path / "gsm.csv"
    source.write_text(body, encoding="utf-8")
    with pytest.raises(GsmError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_gsm(source)


# ------------------------------------------------------------------------------------------- history export


def _executor_db(path: Path) -> str:
    from service.api.store import make_engine, metadata
    from service.executor.store import nudges, orders, transactions

    url = f"sqlite:///{path}"
    engine = make_engine(url)
    metadata.create_all(engine)
    t0 = datetime(2026, 11, 1, 10, 0, tzinfo=UTC)

    def order(order_id: str, start: datetime) -> None:
        request = make_request(order_id=order_id, event_time=start.isoformat())
        with engine.begin() as conn:
            conn.execute(
                orders.insert().values(
                    merchant_id="m_demo", order_id=order_id, state="SUCCEEDED", mode="autonomous", amount=499.0,
                    currency="INR", customer_id="cus_71", request_json=request.model_dump_json(exclude={"history"}),
                    failure_json=request.failure.model_dump_json(), attempt_count=3, first_failed_at=start,
                    created_at=start, updated_at=start,
                )
            )  # fmt: skip
            txn = {"merchant_id": "m_demo", "order_id": order_id, "processor_payment_id": "p"}
            rows = [
                    txn | {"txn_id": f"{order_id}_1", "attempt_number": 1, "strategy": "initial",
                           "connector": "stripe", "status": "failure", "error_code": "card_declined",
                           "created_at": start},
                    # Number 2 was reserved by an action that never ran: the export renumbers without a gap.
                    txn | {"txn_id": f"{order_id}_3", "attempt_number": 3, "strategy": "cascade",
                           "connector": "adyen", "status": "failure", "error_code": None,
                           "decision_id": f"dec_a_{order_id}", "propensity": 0.9,
                           "created_at": start.replace(minute=5)},
                    txn | {"txn_id": f"{order_id}_4", "attempt_number": 4, "strategy": "retarget_link",
                           "connector": "stripe", "status": "success", "nudge_id": f"ndg_{order_id}",
                           "decision_id": f"dec_b_{order_id}", "propensity": 0.05,
                           "created_at": start.replace(hour=13)},
                    txn | {"txn_id": f"{order_id}_5", "attempt_number": 5, "strategy": "retry_same",
                           "connector": "stripe", "status": "success", "created_at": start.replace(hour=14)},
            ]  # fmt: skip
            for row in rows:
                conn.execute(transactions.insert().values(**row))
            conn.execute(
                nudges.insert().values(
                    nudge_id=f"ndg_{order_id}", merchant_id="m_demo", order_id=order_id, channel="whatsapp",
                    template_id="payment_link", sent_at=start.replace(hour=12), status="accepted", delivered=True,
                    clicked_at=start.replace(hour=12, minute=30), decision_id=f"dec_b_{order_id}", propensity=0.05,
                )
            )  # fmt: skip

    order("ord_old", t0)
    order("ord_new", t0.replace(day=20))
    engine.dispose()
    return url


def test_executor_results_become_contract_history_with_decision_and_propensity(tmp_path: Path) -> None:
    from service.api.export import export_history

    url = _executor_db(tmp_path / "winback.db")
    summary = export_history(url, tmp_path / "out")
    assert (summary.orders, summary.attempts, summary.nudges, summary.dropped_after_success) == (2, 6, 2, 2)
    history = read_history(summary.attempts_path, summary.nudges_path)
    old = history.attempts[history.attempts["order_id"] == "ord_old"]
    assert old["attempt_number"].tolist() == [1, 2, 3]
    assert old["decision_id"].tolist()[1:] == ["dec_a_ord_old", "dec_b_ord_old"]
    assert old["propensity"].tolist()[1:] == [0.9, 0.05]
    assert old["error_code"].tolist()[1] == "unknown"  # a failure without any reason gets one, as the contract needs
    assert history.nudges["propensity"].tolist() == [0.05, 0.05]

    recent = export_history(url, tmp_path / "recent", since=datetime(2026, 11, 10, tzinfo=UTC))
    assert recent.orders == 1
    assert set(read_history(recent.attempts_path, recent.nudges_path).attempts["order_id"]) == {"ord_new"}
    with pytest.raises(ValueError, match="since must carry a timezone"):
        export_history(url, tmp_path / "x", since=datetime(2026, 11, 10))


def test_an_export_that_fails_between_moves_leaves_the_earlier_export_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The three files were moved into place one after another: a failure between two moves left the new attempts
    beside the earlier export's nudges and stops."""
    from service.api.export import export_history

    url = _executor_db(tmp_path / "winback.db")
    out = tmp_path / "out"
    export_history(url, out, since=datetime(2026, 11, 10, tzinfo=UTC))
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    names = ("attempts.parquet", "nudges.parquet", "stops.parquet")
    assert set(before) == set(names)
    fail_the_nth_move_onto(out, names, 2, monkeypatch)
    with pytest.raises(OSError, match="made to fail by the test"):
        export_history(url, out)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # nothing staged is left either
    monkeypatch.undo()
    assert export_history(url, out).orders == 2


def _stopped_orders_db(path: Path) -> str:
    """The executor's records of four orders that failed once at 10:00 and were each decided once, at 10:00:01:
    ``ord_stop`` stopped (autonomous), ``ord_reject`` had a retry rejected by an agent (assisted), ``ord_wait`` has
    a stop waiting for an agent, ``ord_retry`` a retry (its attempt not back yet)."""
    from model.requests import Decision
    from service.api.store import decision_row, make_engine, metadata
    from service.executor.store import agent_queue, orders, transactions

    url = f"sqlite:///{path}"
    engine = make_engine(url)
    metadata.create_all(engine)
    t0 = datetime(2026, 11, 1, 10, 0, tzinfo=UTC)
    decided = t0.replace(second=1)
    plans = {"ord_stop": ("stop", None), "ord_reject": ("retry", "rejected"), "ord_wait": ("stop", "pending"),
             "ord_retry": ("retry", None)}  # fmt: skip
    with engine.begin() as conn:
        for order_id, (action, queued) in plans.items():
            request = make_request(order_id=order_id, event_time=decided.isoformat())
            conn.execute(
                orders.insert().values(
                    merchant_id="m_demo", order_id=order_id, state="FAILED",
                    mode="assisted" if queued else "autonomous", amount=499.0, currency="INR", customer_id="cus_71",
                    request_json=request.model_dump_json(exclude={"history"}),
                    failure_json=request.failure.model_dump_json(), attempt_count=1, first_failed_at=t0,
                    created_at=t0, updated_at=t0,
                )
            )  # fmt: skip
            conn.execute(
                transactions.insert().values(
                    txn_id=f"{order_id}_1", merchant_id="m_demo", order_id=order_id, attempt_number=1,
                    processor_payment_id="p", strategy="initial", connector="stripe", status="failure",
                    error_code="card_declined", created_at=t0,
                )
            )  # fmt: skip
            retry = {"strategy": "cascade", "connector": "adyen"} if action == "retry" else {}
            decision = Decision(
                decision_id=f"dec_{order_id}", model_version="7", action=action, execute_at=decided, retryable=True,
                retry_probability=0.3, expected_success=0.2, propensity=0.85, **retry,
            )  # fmt: skip
            conn.execute(sa.insert(decisions_table).values(**decision_row(request, decision, created_at=decided)))
            if queued:
                conn.execute(
                    agent_queue.insert().values(
                        merchant_id="m_demo", order_id=order_id, decision_id=decision.decision_id,
                        decision_json=decision.model_dump_json(), request_json=request.model_dump_json(),
                        state=queued, created_at=decided,
                    )
                )  # fmt: skip
    engine.dispose()
    return url


def test_the_export_writes_the_stops_the_executor_carried_out_with_their_propensity(tmp_path: Path) -> None:
    from service.api.export import export_history

    summary = export_history(_stopped_orders_db(tmp_path / "winback.db"), tmp_path / "out")
    assert summary.stops_path == tmp_path / "out" / "stops.parquet"
    assert (summary.orders, summary.stops) == (4, 2)
    history = read_history(summary.attempts_path, summary.nudges_path, stops_path=summary.stops_path)
    assert history.stops is not None
    stops = history.stops.set_index("order_id")
    assert sorted(stops.index) == ["ord_reject", "ord_stop"]  # not the one waiting for an agent, nor the retry
    assert stops.loc["ord_stop", "decision_id"] == "dec_ord_stop"
    assert stops.loc["ord_stop", "propensity"] == 0.85
    assert stops.loc["ord_stop", "decided_at"] == pd.Timestamp("2026-11-01T10:00:01Z")
    assert stops.loc["ord_stop", "attempt_number"] == 1
    assert np.isnan(stops.loc["ord_reject", "propensity"])  # an agent's reject: no policy chose that stop


def test_history_export_cli_writes_files(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipelines.cli import app

    url = _executor_db(tmp_path / "winback.db")
    result = CliRunner().invoke(
        app, ["history", "export", "--out", str(tmp_path / "out"), "--database-url", url, "--since", "2026-11-10"]
    )
    assert result.exit_code == 0, result.output

    def unwrapped(text: str) -> str:  # rich breaks a line at a space or inside a long path, wherever it ends up
        return "".join(text.split())

    assert unwrapped("/out/stops.parquet (0 stops) for 1 order;") in unwrapped(result.output)
    assert unwrapped("for 1 order; left out 2 attempts made after") in unwrapped(result.output)  # not "1 orders"
    bad = CliRunner().invoke(app, ["history", "export", "--out", str(tmp_path / "o"), "--database-url", url,
                                   "--since", "yesterday"])  # fmt: skip
    assert bad.exit_code == 2
    assert "--since must be an ISO date" in bad.output


# ------------------------------------------------------------------------------------------------- metrics


def test_new_code_metrics_have_bounded_labels_and_count_distinct_pairs() -> None:
    metrics = ApiMetrics(connectors=["stripe"])
    metrics.observe_error_code("Stripe", "NEW_1", known_code=True, support=0)
    metrics.observe_error_code("stripe", "NEW_1", known_code=True, support=0)
    metrics.observe_error_code("evilpsp-" + "x" * 50, "NEW_2", known_code=False, support=None)
    metrics.observe_error_code("stripe", "card_declined", known_code=True, support=500)
    text = metrics.render().decode()
    assert 'winback_new_error_codes_total{connector="stripe"} 2.0' in text
    assert 'winback_new_error_codes_total{connector="other"} 1.0' in text
    assert 'winback_unknown_error_codes_total{connector="other"} 1.0' in text
    assert "winback_new_error_code_pairs 2.0" in text
    metrics.set_model_version("1")
    metrics.set_model_version("2")  # new relative to the new model: the distinct count starts again
    assert "winback_new_error_code_pairs 0.0" in metrics.render().decode()


@pytest.mark.parametrize("code", [None, "", "  "])
def test_a_failure_without_an_error_code_is_not_a_new_or_unknown_code(code: str | None) -> None:
    # What the runtime reports for it: the catalog does not know an absent code, and no model support is looked up.
    metrics = ApiMetrics(connectors=["stripe"])
    metrics.observe_error_code("stripe", code, known_code=False, support=None if code is None else 0)
    text = metrics.render().decode()
    assert "winback_new_error_codes_total{" not in text
    assert "winback_unknown_error_codes_total{" not in text
    assert "winback_new_error_code_pairs 0.0" in text


# ------------------------------------------------------------------------------------------------- retrain


@pytest.mark.parametrize(("text", "seconds"), [("24h", 86_400.0), ("30m", 1800.0), ("1d", 86_400.0), ("90s", 90.0)])
def test_parse_every(text: str, seconds: float) -> None:
    assert parse_every(text) == seconds


@pytest.mark.parametrize("text", ["", "24", "0h", "daily", "-1h"])
def test_parse_every_rejects_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ValueError, match="--every must be a positive duration like 24h"):
        parse_every(text)


def test_gate_checks_by_name() -> None:
    assert [m.name for m in gate_checks(["retry_auc"])] == ["retry_auc"]
    with pytest.raises(ValueError, match="unknown gate metric\\(s\\) auc; known: retry_log_loss"):
        gate_checks(["auc"])


def test_window_keeps_whole_recent_orders() -> None:
    attempts = pd.DataFrame(
        {
            "order_id": ["a", "a", "b", "c"],
            "created_at": pd.to_datetime(["2026-01-01", "2026-03-01", "2026-02-20", "2026-03-01"], utc=True),
        }
    )
    nudges = pd.DataFrame({"order_id": ["a", "c"]})
    kept_attempts, kept_nudges = window(attempts, nudges, days=10)
    assert kept_attempts["order_id"].tolist() == ["b", "c"]  # order a started long ago: left out whole
    assert kept_nudges["order_id"].tolist() == ["c"]


def test_retrain_loop_survives_a_failed_run_and_sleeps_the_rest_of_the_period() -> None:
    calls: list[int] = []
    slept: list[float] = []
    errors: list[str] = []

    def once() -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("bad export")
        return None

    done = retrain_loop(once, 60.0, runs=3, sleep=slept.append, on_error=lambda exc: errors.append(str(exc)))
    assert (done, len(calls), errors) == (2, 3, ["bad export"])
    assert len(slept) == 2
    assert all(55.0 < s <= 60.0 for s in slept)


def test_retrain_on_a_window_hands_training_the_windows_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from model.history import write_attempts, write_nudges, write_stops
    from pipelines import retrain as retrain_module
    from tests.factories import make_attempts_frame, make_nudges_frame, make_stops_frame

    write_attempts(make_attempts_frame(), tmp_path / "attempts.parquet")
    write_nudges(make_nudges_frame(), tmp_path / "nudges.parquet")
    stops = make_stops_frame({"order_id": "ord_lost", "decided_at": "2026-11-05T04:30:00Z", "attempt_number": 2})
    write_stops(stops, tmp_path / "stops.parquet")
    seen: dict[str, Any] = {}

    def fake_training(attempts: Path, nudges: Path, *, stops: Path | None = None, **_: Any) -> Any:
        seen["history"] = read_history(attempts, nudges, stops_path=stops)
        raise RuntimeError("enough")

    monkeypatch.setattr(retrain_module, "run_training", fake_training)
    with pytest.raises(RuntimeError, match="enough"):
        retrain_module.retrain(
            tmp_path / "attempts.parquet",
            tmp_path / "nudges.parquet",
            stops=tmp_path / "stops.parquet",
            window_days=0.9,
        )
    # ord_lost starts 22 h before the history's last attempt: out of a 21.6 h window, and its stop with it.
    assert "ord_lost" not in set(seen["history"].attempts["order_id"])
    assert seen["history"].stops is not None
    assert seen["history"].stops.empty
