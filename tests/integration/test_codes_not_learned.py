"""A code that appeared only recently: the version a retrain registers learns it (a refit on the whole history,
holdout included, once the model is judged), and without the refit ``winback train`` names it as not learned.

Hunt 31: 400 orders with two new codes posted through the API, exported and retrained on, and the promoted
version still said "the model saw 0 retries after this code"; ``acct_closed_x9`` (198 retries, none recovered)
stayed retryable at p=0.25, as a code never seen. The boosters were fitted on the oldest 60% of the decision
points and the code inventory on the oldest 80%.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from rich.console import Console

from model import registry
from model.catalog import load_catalog
from model.history import History, write_attempts, write_nudges
from model.policy import decide
from model.training import train_partitions
from pipelines.train import refitted, run_training
from tests.factories import NEW_CODE_MESSAGE, NEW_CODES, make_merchant, make_new_code_history, make_request

pytestmark = pytest.mark.slow

NEW = [new for new, _kind in NEW_CODES.values()]
TRAIN = {
    "train_options": {"max_rounds": 30, "evaluate_unseen_codes": False},
    "evaluation_options": {"simulated": False, "max_points": 200, "n_bootstrap": 10},
    "show_progress": False,
}


def recent_codes_frames(orders: int, late_orders: int) -> tuple[pd.DataFrame, pd.DataFrame, set[str]]:
    """A history whose new codes appear only after everything else (a code the connectors started sending last
    week), in ``late_orders`` orders: inside the newest 20% of decision points. The other orders with new codes
    are left out."""
    attempts, nudges = make_new_code_history(orders, seed=5)
    with_new = sorted(set(attempts.loc[attempts["error_code"].isin(NEW), "order_id"]))
    late = set(with_new[:late_orders])
    gone = set(with_new) - late
    attempts = attempts[~attempts["order_id"].isin(gone)].reset_index(drop=True)
    nudges = nudges[~nudges["order_id"].isin(gone)].reset_index(drop=True)
    shift = attempts["created_at"].max() - attempts["created_at"].min() + pd.Timedelta(days=1)
    attempts.loc[attempts["order_id"].isin(late), "created_at"] += shift
    for column in ("sent_at", "clicked_at"):
        nudges.loc[nudges["order_id"].isin(late), column] += shift
    return attempts, nudges, late


def recent_codes_history(folder: Path) -> tuple[pd.DataFrame, set[str]]:
    """``recent_codes_frames`` of 900 orders (80 late), written to ``folder`` as the history files."""
    attempts, nudges, late = recent_codes_frames(900, 80)
    write_attempts(attempts, folder / "attempts.parquet")
    write_nudges(nudges, folder / "nudges.parquet")
    return attempts, late


def retry_probability(bundle: Any, connector: str, code: str) -> float:
    request = make_request(
        failure={"connector": connector, "error_code": code, "error_message": NEW_CODE_MESSAGE,
                 "network_decline_code": None},
        available_connectors=["adyen", "cybersource", "stripe"],
    )  # fmt: skip
    decision = decide(request, make_merchant(), bundle, catalog=load_catalog())
    return float(decision.retry_probability)


def test_without_a_refit_train_names_the_codes_whose_retries_all_fall_in_the_holdout(
    tmp_path: Path, mlflow_store: str
) -> None:
    attempts, late = recent_codes_history(tmp_path)
    console = Console(width=400, record=True)
    summary = run_training(
        tmp_path / "attempts.parquet", tmp_path / "nudges.parquet", tracking_uri=mlflow_store, console=console,
        refit=False, **TRAIN,
    )  # fmt: skip
    named = set(summary.codes_not_learned)
    # The factory's most frequent pairs of new codes; every code the early history retried after is learned.
    assert {"adyen/ADY_NEW_H1", "cybersource/CYB_NEW_H2"} <= named, named
    early = attempts[~attempts["order_id"].isin(late)]
    assert not named & {f"{c}/{k}" for c, k in zip(early["connector"], early["error_code"], strict=True)}
    assert summary.metrics["codes_not_learned"] == len(named)
    assert "not learned yet:" in console.export_text()


def test_the_version_registered_is_refit_on_the_whole_history_and_learns_the_new_codes(
    tmp_path: Path, mlflow_store: str
) -> None:
    recent_codes_history(tmp_path)
    console = Console(width=400, record=True)
    summary = run_training(
        tmp_path / "attempts.parquet", tmp_path / "nudges.parquet", tracking_uri=mlflow_store, console=console,
        **TRAIN,
    )  # fmt: skip
    assert summary.codes_not_learned == ()
    assert "not learned yet:" not in console.export_text()
    bundle = registry.load_version(summary.version, tracking_uri=mlflow_store)
    assert bundle.metadata["text_refit"] is True
    assert bundle.metadata["text_trained_to"] > bundle.metadata["trained_to"]
    assert bundle.code_support("adyen", "ADY_NEW_H1") > 0
    level = bundle.code_level("adyen", "ADY_NEW_H1")  # recorded on the whole history, the holdout's retries too
    assert level is not None
    assert level[0] == bundle.code_support("adyen", "ADY_NEW_H1")
    assert bundle.metadata["code_levels_prior_strength"] == 30.0
    # The boosters, calibrators, threshold and metrics are the judged fit's, kept in the run for the next gate.
    judged = registry.load_judged(summary.version, tracking_uri=mlflow_store)
    assert judged.version == bundle.metadata["judged_bundle_version"] != bundle.version
    assert judged.retryable_threshold == bundle.retryable_threshold
    assert judged.retry_booster.model_to_string() == bundle.retry_booster.model_to_string()
    assert judged.code_support("adyen", "ADY_NEW_H1") == 0
    # The judged fit has the code levels of the history before its holdout, as the gate judged it: the new codes'
    # retries are all in the holdout, so none of their outcomes reached the gate through the levels.
    assert judged.code_level("adyen", "ADY_NEW_H1") == (0.0, 0.0, 0.0)
    assert judged.metadata["code_levels"]
    judged_retries = sum(row[2] for row in judged.metadata["code_levels"])
    assert 0 < judged_retries < sum(row[2] for row in bundle.metadata["code_levels"])
    assert bundle.metrics["retry_holdout_auc"] == pytest.approx(summary.metrics["retry_holdout_auc"])


def test_a_refit_tells_a_recent_final_code_from_a_recent_retryable_one() -> None:
    """2,218 orders, 300 of them late with the new codes. Each connector's two new codes carry the same bland
    message and no network code; underneath, one is a stolen card (retries recovered 10% and 6%), the other a
    technical error (44% and 53%). Fitted without the holdout's decision points, the model cannot tell them apart
    (measured: 0.180 and 0.180 on adyen, 0.158 and 0.158 on cybersource, as a code never seen); the version
    registered (the refit text model and code inventory, and the code levels of the whole history) does (0.053 and
    0.416; 0.057 and 0.405).

    The refit text model alone is not what tells them apart (``refitted``: the boosters make little use of the
    text features). This test asserted that it did, by more than 0.05: that held for this factory's seed 5 only,
    by 0.084 and 0.053 before the payday features followed the rules' paydays and by 0.050 and 0.048 after; seeds
    1, 2 and 3 gave -0.10 to 0.04 either way. With the code levels, seeds 1, 2, 3, 5 and 7 gave 0.29 to 0.56."""
    attempts, nudges, _late = recent_codes_frames(3000, 300)
    history = History(attempts, nudges)
    pairs = (("adyen", "ADY_NEW_H1", "ADY_NEW_T1"), ("cybersource", "CYB_NEW_H2", "CYB_NEW_T2"))
    judged = train_partitions([history], seed=0, evaluate_unseen_codes=False).bundle
    everything = train_partitions(
        [history], seed=0, time_holdout_fraction=0.0, evaluate_unseen_codes=False, max_rounds=1
    )
    registered = refitted(judged, everything.bundle, [history])
    for connector, final, technical in pairs:
        unseen_gap = retry_probability(judged, connector, technical) - retry_probability(judged, connector, final)
        learned_gap = retry_probability(registered, connector, technical) - retry_probability(
            registered, connector, final
        )
        assert abs(unseen_gap) < 0.02, (connector, unseen_gap)
        assert learned_gap > 0.2, (connector, learned_gap)


def test_the_code_levels_of_a_refit_move_a_recent_code_to_what_its_retries_showed() -> None:
    """The same history. The refit text model alone moves the served P(success) of a recent code a little (the
    boosters barely use the text features; on the 50,000-order simulation a renamed code stayed at 0.247 while its
    retries recovered 11.5%). With the code levels of the whole history (model.codelevel) measured: the final
    codes (no retry recovered) 0.186 -> 0.054 and 0.186 -> 0.062, the technical ones (42% and 50%) 0.292 -> 0.511
    and 0.331 -> 0.611; the served mean at their retries 0.13 -> 0.04 and 0.21 -> 0.36-0.39."""
    from model.codelevel import code_factor

    attempts, nudges, _late = recent_codes_frames(3000, 300)
    history = History(attempts, nudges)
    judged = train_partitions([history], seed=0, evaluate_unseen_codes=False).bundle
    everything = train_partitions(
        [history], seed=0, time_holdout_fraction=0.0, evaluate_unseen_codes=False, max_rounds=1
    )
    text_only, levelled = refitted(judged, everything.bundle), refitted(judged, everything.bundle, [history])
    assert text_only.code_level("adyen", "ADY_NEW_H1") is None
    assert levelled.version != text_only.version
    for connector, code in (("adyen", "ADY_NEW_H1"), ("adyen", "ADY_NEW_T1"), ("cybersource", "CYB_NEW_H2"),
                            ("cybersource", "CYB_NEW_T2")):  # fmt: skip
        level = levelled.code_level(connector, code)
        assert level is not None
        n, successes, served = level
        assert n >= 40, (code, n)
        observed, before = successes / n, served / n
        after = before * code_factor(n, successes, served, 30.0)
        assert abs(after - observed) < 0.6 * abs(before - observed), (code, observed, before, after)
        moved = retry_probability(levelled, connector, code) - retry_probability(text_only, connector, code)
        assert (moved > 0.1) if observed > before else (moved < -0.1), (code, observed, before, moved)


def test_winback_train_no_refit_registers_the_judged_fit(tmp_path: Path, mlflow_store: str) -> None:
    from typer.testing import CliRunner

    from pipelines.cli import app

    recent_codes_history(tmp_path)
    result = CliRunner().invoke(
        app,
        ["train", "--attempts", str(tmp_path / "attempts.parquet"), "--nudges", str(tmp_path / "nudges.parquet"),
         "--tracking-uri", mlflow_store, "--episodes", "0", "--no-refit"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "not learned yet:" in result.output
    bundle = registry.load_version("1", tracking_uri=mlflow_store)
    assert "text_refit" not in bundle.metadata
    # The judged fit as the gate judged it: code levels of the history before its holdout, none for the new code.
    assert bundle.code_level("adyen", "ADY_NEW_H1") == (0.0, 0.0, 0.0)
    assert bundle.metadata["time_holdout_fraction"] == pytest.approx(0.2)
