"""Decision points, IPS weights, calibration, the trained bundle and its behaviour on synthetic history."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from model.bundle import Calibrator, ModelBundle, path_bias, path_contributions
from model.catalog import MemoCatalog, load_catalog, normalise_request
from model.cellsupport import ARM_INDEX, N_SLOTS, SLOTS_PER_ARM
from model.gsm import with_overlay
from model.policy import DEFAULT_RETRYABLE_THRESHOLD, PolicyConfig, decide, verdict_probability
from model.rules import Candidate, build_context, enumerate_candidates, permitted
from model.textmodel import _DirectText
from model.training import (
    MIN_EXAMPLES,
    RETRYABLE_THRESHOLD_RANGE,
    TrainingResult,
    choose_retryable_threshold,
    decision_points,
    expected_calibration_error,
    fit_retryable_threshold,
    grouped_code_split,
    ips_weights,
    train,
    train_partitions,
)
from model.vocab import Action, Channel, Strategy
from tests.factories import (
    GSM_ONLY_CODE,
    make_attempts_frame,
    make_history_frames,
    make_merchant,
    make_nudges_frame,
    make_request,
)


def _utc(text: str) -> pd.Timestamp:
    return pd.Timestamp(text).tz_convert("UTC")


def test_decision_points_of_a_hand_made_history() -> None:
    points = decision_points(make_attempts_frame(), make_nudges_frame())
    by = {(row.order_id, row.kind, row.strategy or row.channel): row for row in points.itertuples()}
    assert set(by) == {
        ("ord_cascade", "retry", "cascade"),
        ("ord_link", "retry", "retry_same"),
        ("ord_link", "retarget", "whatsapp"),
        ("ord_lost", "retry", "step_up"),
        ("ord_lost", "retarget", "whatsapp"),
        ("ord_lost", "retarget", "sms"),
    }  # ord_ok succeeded at once: no decision point; a retarget_link attempt is the nudge's outcome, not an action

    cascade = by[("ord_cascade", "retry", "cascade")]
    assert cascade.label
    assert cascade.propensity == 0.9
    assert cascade.decision_time == _utc("2026-11-01T10:00:00Z")
    assert cascade.target_connector == "adyen"
    assert cascade.n_attempts == 1.0

    link = by[("ord_link", "retarget", "whatsapp")]
    assert link.label  # its link was used and the payment succeeded
    assert link.decision_time == _utc("2026-11-01T11:05:00.250Z")  # the failed retry before it
    assert link.n_attempts == 2.0
    assert link.n_silent_retries == 1.0
    assert link.tried_retry_same == 1.0

    sms = by[("ord_lost", "retarget", "sms")]
    assert not sms.label
    assert sms.propensity == 1.0
    # ndg_2 went unanswered: the next decision point is its follow-up, 24 h after it was sent.
    assert sms.decision_time == _utc("2026-11-03T04:30:00Z")
    assert sms.n_nudges == 1.0
    assert sms.last_channel == "whatsapp"
    assert sms.last_nudge_clicked == 0.0

    unknown = by[("ord_lost", "retry", "step_up")]
    assert math.isnan(unknown.propensity)
    assert unknown.decision_time == _utc("2026-11-01T06:30:00Z")


def test_ips_weights_are_clipped_normalised_and_unknown_counts_as_one() -> None:
    weights = ips_weights([0.5, 0.01, None, 0.25])
    raw = np.array([2.0, 20.0, 1.0, 4.0])  # 1/0.01 = 100 is clipped at 20
    np.testing.assert_allclose(weights, raw / raw.mean())
    assert weights.mean() == pytest.approx(1.0)
    np.testing.assert_allclose(ips_weights([0.2, 0.2], max_weight=3.0), [1.0, 1.0])


def test_grouped_split_holds_a_code_out_on_every_connector() -> None:
    # The boosters' error_code feature does not depend on the connector: a test code whose string the training side
    # saw on another connector (the simulator's made-up codes reach every connector) was not never-seen at all.
    rng = np.random.default_rng(0)
    connectors = rng.choice(["stripe", "adyen", "checkout"], size=600).astype(object)
    codes = rng.choice([f"code_{i}" for i in range(12)], size=600).astype(object)
    split = grouped_code_split(codes, seed=1)
    assert split is not None
    train_rows, test_rows = split
    assert sorted([*train_rows, *test_rows]) == list(range(600))
    assert len(set(connectors[test_rows])) == 3
    assert set(codes[test_rows])
    assert not set(codes[train_rows]) & set(codes[test_rows])
    assert grouped_code_split(codes[:3], seed=1) is None


def test_ece_and_calibrators() -> None:
    assert expected_calibration_error([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.0
    assert expected_calibration_error([1, 1], [0.05, 0.05]) == pytest.approx(0.95)
    rng = np.random.default_rng(0)
    raw = rng.random(3000)
    labels = (rng.random(3000) < raw**2).astype(float)  # the raw score is over-confident
    for size, kind in ((3000, "isotonic"), (500, "platt")):
        calibrator = Calibrator.fit(raw[:size], labels[:size], min_isotonic=1000)
        assert calibrator.kind == kind
        calibrated = calibrator(raw)
        assert calibrated.min() >= 0.0
        assert calibrated.max() <= 1.0
        assert expected_calibration_error(labels, calibrated) < expected_calibration_error(labels, raw) / 2
        assert Calibrator.from_dict(calibrator.to_dict()) == calibrator
    assert Calibrator.fit(raw[:10], np.zeros(10)).kind == "identity"


def test_an_isotonic_calibrator_does_not_answer_certainty_from_a_handful_of_examples() -> None:
    """Isotonic regression gives the highest raw scores a step of their own, however few: the champion of a
    50,000-order history served P(success) = 1.0 for retries with raw scores over 0.669 (14 of 10,877 holdout
    decisions answered "expected_success": 1.0) and 0.5 for retargets over 0.314 (66 decisions; observed 1 in 9).
    Each step now holds at least ``MIN_ISOTONIC_BLOCK`` examples."""
    from model.bundle import MIN_ISOTONIC_BLOCK

    rng = np.random.default_rng(0)
    raw = np.concatenate([rng.random(3000) * 0.3, [0.7, 0.75, 0.8]])  # three outliers at the top, all paid
    labels = np.concatenate([(rng.random(3000) < raw[:3000]).astype(float), [1.0, 1.0, 1.0]])
    calibrator = Calibrator.fit(raw, labels, min_isotonic=1000)
    assert calibrator.kind == "isotonic"
    assert calibrator(np.array([0.8]))[0] < 0.6  # the top examples pooled with their neighbours, not 1.0
    x, y = np.asarray(calibrator.x), np.asarray(calibrator.y)
    assert np.all(np.diff(x) > 0)
    assert np.all(np.diff(y) >= 0)
    order = np.argsort(raw)
    steps = np.unique(calibrator(raw[order]).round(4), return_counts=True)[1]
    assert steps.min() >= MIN_ISOTONIC_BLOCK, steps


@pytest.fixture(scope="module")
def trained() -> TrainingResult:
    attempts, nudges = make_history_frames(2500, seed=11)
    return train(attempts, nudges, seed=0, max_rounds=80)


def test_a_bundle_normalises_through_the_catalog_memo(trained: TrainingResult) -> None:
    """The bundle's features read the catalog through `model.catalog.MemoCatalog`, the API's memo, at 4,096."""
    memo = trained.bundle._catalog()
    request = make_request()

    assert type(memo) is MemoCatalog
    assert memo._maxsize == 4096
    assert trained.bundle.context(request) == trained.bundle.context(request)
    assert normalise_request(memo, request) is normalise_request(memo, request)


def test_a_bundle_scores_with_the_catalog_it_was_trained_with() -> None:
    """A model trained with a catalog of its own (an overlay here) reads that catalog when it scores in the same
    process (the threshold's and code levels' replays, an evaluation), not the shipped one: the same features."""
    overlaid = with_overlay(load_catalog(), [GSM_ONLY_CODE])
    attempts, nudges = make_history_frames(300, seed=5)
    bundle = train(attempts, nudges, seed=0, max_rounds=10, evaluate_unseen_codes=False, catalog=overlaid).bundle
    request = make_request(failure={"error_code": "gsm_only_code"})

    assert bundle.catalog_version == overlaid.version
    assert normalise_request(overlaid, request).known_code
    assert bundle.context(request)["known_code"] == 1.0


def test_training_reports_holdout_metrics(trained: TrainingResult) -> None:
    metrics = trained.metrics
    assert metrics["retry_holdout_auc"] > 0.75
    assert metrics["retry_holdout_ece"] < 0.08
    assert metrics["retarget_model_trained"] == 1.0
    assert not math.isnan(metrics["unseen_code_auc_with_text"])
    assert not math.isnan(metrics["unseen_code_auc_without_text"])
    table = trained.tables["per_error_class"]
    assert {"insufficient_funds", "hard_decline"} <= set(table["error_class"])
    assert list(trained.tables["splits"]["split"]) == ["train", "valid", "calibration", "holdout"]


def _candidates(at: datetime) -> list[Candidate]:
    return [
        Candidate(Action.RETRY, at + timedelta(seconds=2), strategy=Strategy.RETRY_SAME, connector="stripe"),
        Candidate(Action.RETRY, at + timedelta(hours=1), strategy=Strategy.CASCADE, connector="adyen"),
        Candidate(Action.RETARGET, at + timedelta(hours=20), channel=Channel.WHATSAPP),
        Candidate(Action.STOP, at),
    ]


def _failure(code: str, message: str, network: str, when: str = "2026-03-27T10:00:00Z") -> dict[str, object]:
    return {
        "event_time": when,
        "failure": {"connector": "stripe", "error_code": code, "error_message": message,
                    "network_decline_code": network},
        "history": {"attempts": [{"attempt_number": 1, "connector": "stripe", "strategy": "initial",
                                  "status": "failure", "error_code": code, "created_at": when}]},
    }  # fmt: skip


def test_scores_are_probabilities_and_stop_scores_zero(trained: TrainingResult) -> None:
    bundle = trained.bundle
    request = make_request(**_failure("processing_error", "An error occurred while processing your card.", "96"))
    scores = bundle.score(request, _candidates(request.event_time))
    assert scores.shape == (4,)
    assert np.all((scores >= 0.0) & (scores <= 1.0))
    assert scores[3] == 0.0
    assert bundle.score(request, []).shape == (0,)


def test_insufficient_funds_retry_after_payday_beats_retry_now(trained: TrainingResult) -> None:
    request = make_request(**_failure("insufficient_funds", "Your card has insufficient funds.", "51"))
    now = Candidate(Action.RETRY, request.event_time + timedelta(hours=2), strategy=Strategy.RETRY_SAME,
                    connector="stripe")  # fmt: skip
    after_payday = Candidate(Action.RETRY, datetime(2026, 4, 1, 6, 0, tzinfo=UTC), strategy=Strategy.RETRY_SAME,
                             connector="stripe")  # fmt: skip
    p_now, p_later = trained.bundle.score(request, [now, after_payday])
    assert p_later > p_now + 0.15


def test_stolen_card_gets_a_low_retry_probability(trained: TrainingResult) -> None:
    bundle = trained.bundle
    stolen = make_request(**_failure("stolen_card", "The card was reported stolen.", "43"))
    glitch = make_request(**_failure("processing_error", "An error occurred while processing your card.", "96"))
    candidates = _candidates(stolen.event_time)
    p_stolen = bundle.retry_probability(candidates, bundle.score(stolen, candidates))
    p_glitch = bundle.retry_probability(candidates, bundle.score(glitch, candidates))
    assert p_stolen < 0.05
    assert p_glitch > 0.4
    assert p_stolen < bundle.retryable_threshold <= p_glitch


def test_never_seen_error_code_and_connector_still_score(trained: TrainingResult) -> None:
    request = make_request(
        failure={"connector": "brand_new_psp", "error_code": "FUNDS_LOW_9", "error_message": "Insufficient balance",
                 "network_decline_code": None},
        payment={"payment_method": "bnpl_new"},
        currency="XYZ",
    )  # fmt: skip
    scores = trained.bundle.score(request, _candidates(request.event_time))
    assert np.all(np.isfinite(scores))
    assert np.all((scores >= 0) & (scores <= 1))


def test_bundle_round_trip_scores_identically(trained: TrainingResult, tmp_path: Path) -> None:
    bundle = trained.bundle
    request = make_request(**_failure("do_not_honor", "The card was declined.", "05"))
    candidates = _candidates(request.event_time)
    bundle.save(tmp_path / "bundle")
    loaded = ModelBundle.load(tmp_path / "bundle")
    np.testing.assert_array_equal(loaded.score(request, candidates), bundle.score(request, candidates))
    assert loaded.version == bundle.version
    assert loaded.version.startswith("wb-")
    assert loaded.retryable_threshold == bundle.retryable_threshold
    assert loaded.spec == bundle.spec
    reasons = loaded.explain(request, candidates[0], k=3)
    assert 1 <= len(reasons) <= 3
    assert all(isinstance(r, str) and r for r in reasons)
    assert loaded.explain(request, candidates[3]) == []
    with pytest.raises(FileNotFoundError, match=r"lacks bundle\.json"):
        ModelBundle.load(tmp_path / "nowhere")


def _edit_saved_spec(bundle_dir: Path, renamed: dict[str, str]) -> None:
    spec_file = bundle_dir / "feature_spec.json"
    spec = json.loads(spec_file.read_text(encoding="utf-8"))
    assert set(renamed) <= set(spec["numeric"])
    spec["numeric"] = [renamed.get(name, name) for name in spec["numeric"]]
    spec_file.write_text(json.dumps(spec), encoding="utf-8")


def test_a_bundle_trained_with_the_first_of_the_month_payday_features_loads_and_scores_as_trained(
    trained: TrainingResult, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A champion saved before the payday features followed the rules' paydays lists them under their old names: an
    upgrade must not leave it unloadable (every worker would serve rules only). It loads, says once that it should
    be retrained, and is scored with the 1st-of-the-month features it was trained with."""
    trained.bundle.save(tmp_path / "bundle")
    _edit_saved_spec(
        tmp_path / "bundle",
        {"days_to_next_payday": "days_to_payday", "exec_days_to_next_payday": "exec_days_to_payday",
         "next_payday_before_exec": "payday_before_exec"},
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="winback.model"):
        loaded = ModelBundle.load(tmp_path / "bundle")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"model version {trained.bundle.version} was trained with the retired payday features (days_to_payday, "
        "exec_days_to_payday, payday_before_exec: payday the 1st of the month, at the customer's local midnight); "
        "it is served with them as trained; retrain to use the rules' paydays"
    ]
    # 15 January, noon UTC, a customer of no known country: 17 days to the 1st; acting on the 20th: 12 days, no 1st
    # between; acting on 1 February: payday is today (0), and a 1st came between.
    request = make_request(event_time="2026-01-15T12:00:00Z", customer={"country": None})
    candidates = [
        Candidate(Action.RETRY, request.event_time + timedelta(days=5), strategy=Strategy.RETRY_SAME,
                  connector="stripe"),
        Candidate(Action.RETRY, request.event_time + timedelta(days=17, hours=1), strategy=Strategy.CASCADE,
                  connector="adyen"),
    ]  # fmt: skip
    matrix = loaded.matrix(request, candidates)
    retired = [loaded.spec.columns.index(name) for name in ("days_to_payday", "exec_days_to_payday",
                                                            "payday_before_exec")]  # fmt: skip
    assert matrix[:, retired].tolist() == [[17.0, 12.0, 0.0], [17.0, 0.0, 1.0]]
    scores = loaded.score(request, candidates)
    assert np.all(np.isfinite(scores))
    assert np.all((scores >= 0) & (scores <= 1))
    # Its reasons read its payday features as they did when it was trained.
    assert loaded.feature_reason("payday_before_exec", 1.0, raises=True) == (
        "a payday (the 1st) comes before the attempt: raises the chance of success"
    )
    assert loaded.feature_reason("days_to_payday", 17.0, raises=False) == (
        "17 days to the next payday (the 1st): lowers the chance of success"
    )


def test_a_bundle_listing_a_feature_this_code_does_not_build_is_refused_at_load(
    trained: TrainingResult, tmp_path: Path
) -> None:
    trained.bundle.save(tmp_path / "bundle")
    _edit_saved_spec(tmp_path / "bundle", {"days_to_next_payday": "days_to_pension"})
    with pytest.raises(ValueError, match=r"does not build: days_to_pension \(not a feature of this version\)"):
        ModelBundle.load(tmp_path / "bundle")


def test_training_records_the_evidence_of_each_cell(trained: TrainingResult) -> None:
    rows = trained.bundle.metadata["cell_support"]
    splits = trained.tables["splits"].set_index("split")
    fitted = splits.loc[["train", "valid", "calibration"]]
    retries = [row for row in rows if row[2] in ("now", "hours", "later")]
    links = [row for row in rows if row[2] == "any"]
    # Every fitted decision point is in one cell: support n, successes s <= n, the model's predictions 0 <= m <= n.
    assert sum(row[3] for row in retries) == int(fitted["retry"].sum())
    assert sum(row[3] for row in links) == int(fitted["retarget"].sum())
    assert all(0 <= row[4] <= row[3] and 0.0 <= row[5] <= row[3] for row in rows)
    cells = {tuple(row[:3]): row[3:] for row in rows}
    now, later = cells["insufficient_funds", "retry_same", "now"], cells["insufficient_funds", "retry_same", "later"]
    assert later[1] / later[0] > 2 * now[1] / now[0]  # the synthetic world: 4% now, 55% after payday
    assert later[2] / later[0] == pytest.approx(later[1] / later[0], abs=0.1)  # calibrated where it saw much


def test_the_cell_table_of_a_class_is_its_cells_of_the_metadata(trained: TrainingResult, tmp_path: Path) -> None:
    bundle = trained.bundle
    table = bundle.cell_table("insufficient_funds")
    assert table is not None
    assert table.shape == (3, N_SLOTS)
    cells = {tuple(row[:3]): row[3:] for row in bundle.metadata["cell_support"]}
    same, whatsapp = SLOTS_PER_ARM * ARM_INDEX["retry_same"], SLOTS_PER_ARM * ARM_INDEX["whatsapp"]
    np.testing.assert_allclose(table[:, same], cells["insufficient_funds", "retry_same", "now"])
    np.testing.assert_allclose(table[:, same + 1], cells["insufficient_funds", "retry_same", "hours"])
    np.testing.assert_allclose(table[:, same + 2], cells["insufficient_funds", "retry_same", "later"])
    for slot in range(whatsapp, whatsapp + SLOTS_PER_ARM):
        np.testing.assert_allclose(table[:, slot], cells["insufficient_funds", "whatsapp", "any"])
    assert not bundle.cell_table("a_class_never_seen").any()
    bundle.save(tmp_path / "bundle")
    np.testing.assert_array_equal(ModelBundle.load(tmp_path / "bundle").cell_table("insufficient_funds"), table)


def test_the_version_covers_the_cell_table_and_a_bundle_without_one_hashes_as_before(trained: TrainingResult) -> None:
    """The cell table bounds what decide() serves (model.cellsupport): two bundles that differ only there serve
    different P(success) and must not share a version; one without a table keeps the version it always had."""
    from model.bundle import bundle_version

    bundle = trained.bundle
    assert bundle.version == bundle_version(bundle)
    cells = bundle.metadata["cell_support"]
    other = [[*row[:3], row[3], 0, row[5]] for row in cells]  # same models, none of the cells' successes
    try:
        bundle.metadata["cell_support"] = other
        assert bundle_version(bundle) != bundle.version
        del bundle.metadata["cell_support"]
        digest = hashlib.sha256()  # the version before cells were recorded
        digest.update(bundle.spec.to_json().encode())
        digest.update(bundle.retry_booster.model_to_string().encode())
        assert bundle.retarget_booster is not None
        assert bundle.retarget_calibrator is not None
        digest.update(bundle.retarget_booster.model_to_string().encode())
        digest.update(json.dumps(bundle.retry_calibrator.to_dict()).encode())
        digest.update(json.dumps(bundle.retarget_calibrator.to_dict()).encode())
        digest.update(repr(bundle.retryable_threshold).encode())
        assert bundle_version(bundle) == f"wb-{digest.hexdigest()[:12]}"
    finally:
        bundle.metadata["cell_support"] = cells


def test_a_bundle_trained_before_cells_were_recorded_decides_as_before(trained: TrainingResult, tmp_path: Path) -> None:
    bundle = trained.bundle
    bundle.save(tmp_path / "bundle")
    meta_file = tmp_path / "bundle" / "bundle.json"
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    del meta["metadata"]["cell_support"]
    meta_file.write_text(json.dumps(meta), encoding="utf-8")
    older = ModelBundle.load(tmp_path / "bundle")
    catalog, merchant = load_catalog(), make_merchant()
    off = PolicyConfig(exploration=0.0, exploration_rare_code=0.0, prior_strength=0.0)
    on = PolicyConfig(exploration=0.0, exploration_rare_code=0.0)
    for code, message, network in (
        ("insufficient_funds", "Your card has insufficient funds.", "51"),
        ("processing_error", "An error occurred while processing your card.", "96"),
        ("do_not_honor", "The card was declined.", "05"),
    ):
        request = make_request(**_failure(code, message, network))
        assert older.cell_table("insufficient_funds") is None
        before = decide(request, merchant, older, catalog=catalog, config=off, decision_id="d")
        assert decide(request, merchant, older, catalog=catalog, config=on, decision_id="d") == before
        assert decide(request, merchant, bundle, catalog=catalog, config=off, decision_id="d") == before


def test_the_retryable_threshold_agrees_best_with_the_catalogs_published_verdicts() -> None:
    """Balanced accuracy against the catalog's verdicts (retryable: soft declines; not: hard ones), not the
    outcome of each retry: a code whose retries recover 10-30% is retryable."""
    rng = np.random.default_rng(3)
    soft, hard = rng.uniform(0.12, 0.6, 400), rng.uniform(0.0, 0.2, 100)
    scores, published = np.concatenate([soft, hard]), np.array([True] * 400 + [False] * 100)
    chosen = choose_retryable_threshold(scores, published)
    assert chosen is not None
    threshold, balanced = chosen
    grid = np.linspace(0.0, 0.7, 7001)
    by_brute_force = [0.5 * ((soft >= t).mean() + (hard < t).mean()) for t in grid]
    assert 0.5 * ((soft >= threshold).mean() + (hard < threshold).mean()) == pytest.approx(balanced)
    # Within one standard error of the best agreement (here about 0.02), the lowest threshold: more retries.
    assert max(by_brute_force) - 0.025 < balanced <= max(by_brute_force)
    assert 0.12 < threshold <= grid[int(np.argmax(by_brute_force))] < 0.2
    # Two sides apart: the cut between them, not the lowest retryable score.
    apart = choose_retryable_threshold(np.r_[np.full(50, 0.3), np.full(50, 0.1)], np.r_[[True] * 50, [False] * 50])
    assert apart == (pytest.approx(0.2), 1.0)
    # Within its range, and only with enough failures on each side.
    low, high = RETRYABLE_THRESHOLD_RANGE
    assert choose_retryable_threshold(np.r_[np.full(50, 0.9), np.full(50, 0.8)], np.r_[[True] * 50, [False] * 50])[
        0
    ] == pytest.approx(high)  # fmt: skip
    assert choose_retryable_threshold(np.r_[np.full(50, 0.01), np.zeros(50)], np.r_[[True] * 50, [False] * 50])[
        0
    ] == pytest.approx(low)  # fmt: skip
    few = np.r_[[True] * 100, [False] * (MIN_EXAMPLES - 1)]
    assert choose_retryable_threshold(np.linspace(0, 1, len(few)), few) is None


def test_decide_applies_the_threshold_the_bundle_carries(trained: TrainingResult, tmp_path: Path) -> None:
    bundle = replace(trained.bundle, metrics=dict(trained.bundle.metrics))
    catalog, merchant = load_catalog(), make_merchant()
    request = make_request(**_failure("do_not_honor", "The card was declined.", "05"))
    p = verdict_probability(request, merchant, bundle, catalog=catalog)
    assert 0.0 < p < 1.0
    for threshold, retryable in ((p, True), (p + 0.001, False)):
        bundle.retryable_threshold = threshold
        assert decide(request, merchant, bundle, catalog=catalog).retryable is retryable
        bundle.save(tmp_path / f"bundle-{threshold}")
        loaded = ModelBundle.load(tmp_path / f"bundle-{threshold}")
        assert loaded.retryable_threshold == threshold
        assert decide(request, merchant, loaded, catalog=catalog).retryable is retryable


def test_a_bundle_saved_before_it_carried_its_threshold_is_served_as_before(
    trained: TrainingResult, tmp_path: Path
) -> None:
    """Such a bundle's "threshold" was Youden's J on per-retry outcomes, which decide() never applied: it
    answered with the default 0.10, and still does."""
    trained.bundle.save(tmp_path / "bundle")
    meta_file = tmp_path / "bundle" / "bundle.json"
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    del meta["retryable_threshold"]
    meta["threshold"] = 0.309  # the Youden figure of the 50,000-order seed-1 history
    meta_file.write_text(json.dumps(meta), encoding="utf-8")
    older = ModelBundle.load(tmp_path / "bundle")
    assert older.retryable_threshold == DEFAULT_RETRYABLE_THRESHOLD
    catalog, merchant = load_catalog(), make_merchant()
    request = make_request(**_failure("do_not_honor", "The card was declined.", "05"))
    assert DEFAULT_RETRYABLE_THRESHOLD <= verdict_probability(request, merchant, older, catalog=catalog) < 0.309
    assert decide(request, merchant, older, catalog=catalog).retryable


def test_the_training_job_chooses_the_threshold_on_decides_verdicts(trained: TrainingResult) -> None:
    attempts, nudges = make_history_frames(2500, seed=11)
    bundle = replace(trained.bundle, metrics=dict(trained.bundle.metrics))
    merchants = {
        str(m): make_merchant(connectors=sorted(set(attempts.loc[attempts["merchant_id"] == m, "connector"])))
        for m in attempts["merchant_id"].unique()
    }
    before = pd.Timestamp(attempts["created_at"].quantile(0.8)).floor("s").to_pydatetime()
    measured = fit_retryable_threshold(bundle, [SimpleNamespace(attempts=attempts, nudges=nudges)], merchants,
                                       before=before, max_points=400)  # fmt: skip
    assert bundle.retryable_threshold == measured["retryable_threshold"] == bundle.metrics["retryable_threshold"]
    low, high = RETRYABLE_THRESHOLD_RANGE
    assert low <= bundle.retryable_threshold <= high
    assert 2 * MIN_EXAMPLES <= measured["retryable_threshold_points"] <= 400
    assert (
        measured["retryable_threshold_balanced_accuracy"] >= measured["retryable_threshold_balanced_accuracy_default"]
    )
    assert trained.bundle.retryable_threshold == DEFAULT_RETRYABLE_THRESHOLD  # train() alone leaves the default


def test_code_levels_sum_what_the_bundle_serves_at_every_retry_of_the_history(
    trained: TrainingResult, tmp_path: Path
) -> None:
    from model.codelevel import CODE_LEVEL_KEY
    from model.training import code_levels, request_at

    attempts, nudges = make_history_frames(2500, seed=11)  # the history of ``trained``
    bundle = trained.bundle
    assert bundle.code_level("stripe", "insufficient_funds") is None  # registered without the refit: none
    history = [SimpleNamespace(attempts=attempts, nudges=nudges)]
    rows = code_levels(bundle, history)
    raw = {(row[0], row[1]): row for row in code_levels(bundle, history, prior_strength=0.0)}
    points = decision_points(attempts, nudges)
    retries = points[points["kind"] == "retry"]
    # Every silent retry after a coded failure, the holdout's too: more than the inventory of the fitted rows.
    assert sum(row[2] for row in rows) == int(retries["error_code"].notna().sum())
    assert all(0 <= row[3] <= row[2] and 0.0 <= row[4] <= row[2] for row in rows)
    inventory = {(row[0].casefold(), row[1].casefold()): row[3] for row in bundle.metadata["known_codes"]}
    assert all(row[2] >= inventory.get((row[0], row[1]), 0) for row in rows)
    assert sum(row[2] > inventory.get((row[0], row[1]), 0) for row in rows) > 0  # the holdout's retries
    # Without the cells' priors, m is the sum of the bundle's scores of each retry's request and action.
    connector, code, n, won, predicted = min((row for row in raw.values() if row[2] >= 5), key=lambda row: row[2])
    mine = retries[(retries["error_code"].str.casefold() == code) & (retries["connector"].str.casefold() == connector)]
    assert len(mine) == n
    served = sum(float(bundle.score(*_one(request_at(attempts, nudges, point)))[0]) for _, point in mine.iterrows())
    assert served == pytest.approx(predicted, abs=1e-4)
    assert [(row[0], row[1], row[2], row[3]) for row in rows] == [tuple(row[:4]) for row in raw.values()]
    bundle.metadata[CODE_LEVEL_KEY] = list(raw.values())
    try:
        bundle._levels = None
        assert bundle.code_level(connector.upper(), f" {code}") == (n, won, predicted)
        assert bundle.code_level("stripe", "a_code_never_seen") == (0.0, 0.0, 0.0)
        bundle.save(tmp_path / "bundle")
        assert ModelBundle.load(tmp_path / "bundle").code_level(connector, code) == bundle.code_level(connector, code)
    finally:
        del bundle.metadata[CODE_LEVEL_KEY]
        bundle._levels = None


def test_code_levels_before_a_time_count_only_the_retries_decided_before_it(trained: TrainingResult) -> None:
    from model.training import code_levels

    attempts, nudges = make_history_frames(2500, seed=11)  # the history of ``trained``
    history = [SimpleNamespace(attempts=attempts, nudges=nudges)]
    retries = decision_points(attempts, nudges)
    retries = retries[(retries["kind"] == "retry") & retries["error_code"].notna()]
    cut = retries["decision_time"].quantile(0.6).floor("us")
    rows = code_levels(trained.bundle, history, before=cut.to_pydatetime())
    assert sum(row[2] for row in rows) == int((retries["decision_time"] < cut).sum())
    everything = {(row[0], row[1]): row for row in code_levels(trained.bundle, history)}
    assert all(row[2] <= everything[(row[0], row[1])][2] for row in rows)
    assert sum(row[2] for row in rows) < sum(row[2] for row in everything.values())


def test_the_bundle_version_changes_with_its_code_levels(trained: TrainingResult) -> None:
    from model.bundle import bundle_version
    from model.codelevel import CODE_LEVEL_KEY

    bundle = trained.bundle
    without = bundle_version(bundle)
    bundle.metadata[CODE_LEVEL_KEY] = [["stripe", "insufficient_funds", 10.0, 2.0, 3.0]]
    try:
        assert bundle_version(bundle) != without
    finally:
        del bundle.metadata[CODE_LEVEL_KEY]
    assert bundle_version(bundle) == without


def _one(found: tuple[object, Candidate]) -> tuple[object, list[Candidate]]:
    return found[0], [found[1]]


def test_a_bundle_without_code_levels_decides_as_before(trained: TrainingResult) -> None:
    """A version registered before code levels were recorded (or with --no-refit) decides exactly as before; one
    with them rescales only the retries of the codes they hold."""
    from model.codelevel import CODE_LEVEL_KEY

    bundle, catalog, merchant = trained.bundle, load_catalog(), make_merchant()
    greedy = PolicyConfig(exploration=0.0, exploration_rare_code=0.0)
    off = PolicyConfig(exploration=0.0, exploration_rare_code=0.0, code_strength=None)
    requests = [
        make_request(**_failure("insufficient_funds", "Your card has insufficient funds.", "51")),
        make_request(failure={"error_code": "zz_new_code", "error_message": "odd", "network_decline_code": None}),
    ]
    before = [decide(r, merchant, bundle, catalog=catalog, config=greedy, decision_id="d") for r in requests]
    assert bundle.code_level("stripe", "zz_new_code") is None
    assert [decide(r, merchant, bundle, catalog=catalog, config=off, decision_id="d") for r in requests] == before
    bundle.metadata[CODE_LEVEL_KEY] = [["stripe", "zz_new_code", 400, 4, 120.0]]  # the model said 30%, 1% came
    try:
        bundle._levels = None
        after = [decide(r, merchant, bundle, catalog=catalog, config=greedy, decision_id="d") for r in requests]
        assert after[0] == before[0]
        assert after[1].retry_probability < before[1].retry_probability
    finally:
        del bundle.metadata[CODE_LEVEL_KEY]
        bundle._levels = None


def _retry_rows(bundle: ModelBundle) -> np.ndarray:
    request = make_request(**_failure("do_not_honor", "The card was declined.", "05"))
    return bundle.matrix(request, [c for c in _candidates(request.event_time) if c.action == Action.RETRY])


def test_a_saved_bundle_ships_its_path_tables_and_a_plain_pickle(
    trained: TrainingResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loading scorer reads each booster's explanation table (derived at save) instead of building it from the
    booster's dump, and the text model through pickle, not joblib's pure-Python unpickler (model/bundle.py)."""
    import model.bundle as bundle_module

    saved = trained.bundle.save(tmp_path / "bundle")
    # text_model.joblib too: what a scorer of an earlier release reads, should it be rolled back.
    files = {"retry_paths.npz", "retarget_paths.npz", "text_model.pkl", "text_model.joblib"}
    assert files <= {p.name for p in saved.iterdir()}

    def not_built(_booster: object) -> None:
        raise AssertionError("the path table was built, not read")

    def not_joblib(_file: object) -> None:
        raise AssertionError("the text model was read by joblib")

    monkeypatch.setattr(bundle_module._PathTable, "of", not_built)
    monkeypatch.setattr(bundle_module.joblib, "load", not_joblib)
    loaded = ModelBundle.load(saved)
    loaded.warm_up()
    x = _retry_rows(loaded)
    raw = loaded.retry_booster.predict(x, raw_score=True, num_threads=1)
    np.testing.assert_allclose(
        path_bias(loaded.retry_booster) + path_contributions(loaded.retry_booster, x).sum(axis=1), raw, atol=1e-9
    )
    np.testing.assert_array_equal(
        path_contributions(loaded.retry_booster, x), path_contributions(trained.bundle.retry_booster, x)
    )
    assert all(type(column) is int for column in loaded.text_model.vectorizer.vocabulary_.values())  # type: ignore[union-attr]


def test_loading_and_warming_a_bundle_up_pause_between_short_steps(trained: TrainingResult, tmp_path: Path) -> None:
    """A scorer loading a new version beside its requests lets them go first between the steps (api/inflight.py):
    after each file, each booster, and each few errors' text features, which go through the vectoriser in chunks
    and are cached as one call would have."""
    from model.textmodel import WARM_CHUNK

    saved = trained.bundle.save(tmp_path / "bundle")
    pauses: list[None] = []
    loaded = ModelBundle.load(saved, between_steps=lambda: pauses.append(None))
    assert len(pauses) == 3  # after the text model and after each booster
    errors = [("stripe", f"code_{i}", f"The card was declined ({i}).") for i in range(2 * WARM_CHUNK + 1)]
    pauses.clear()
    loaded.warm_up(errors, between_steps=lambda: pauses.append(None))
    assert len(pauses) == 2 + 2 + 3  # the boosters, the tables and inventory, three chunks of errors
    cold = ModelBundle.load(saved).text_model
    assert loaded.seen_errors() == errors
    assert [loaded.text_model.features_for(*error) for error in errors] == [cold.features_for(*e) for e in errors]
    # Without pauses (a worker's first load, the executor), the errors go through the vectoriser in one call.
    calls: list[int] = []
    fresh = ModelBundle.load(saved)
    predict = fresh.text_model.predict
    fresh.text_model.predict = lambda *columns: calls.append(len(columns[0])) or predict(*columns)  # type: ignore[method-assign]
    fresh.warm_up(errors)
    assert calls == [len(errors)]


def test_a_mirrored_bundle_is_loaded_pausing_between_its_files(trained: TrainingResult, tmp_path: Path) -> None:
    from service.api.mirror import MirrorSource, version_folder

    trained.bundle.save(version_folder(tmp_path, "7"))
    pauses: list[None] = []
    scorer = MirrorSource(tmp_path, 1.0, between_steps=lambda: pauses.append(None)).load("7")
    assert scorer.version == "7"
    assert len(pauses) == 3


def _errors_to_warm() -> list[tuple[str | None, str | None, str | None]]:
    """Errors to warm a version up on: two of the shipped codes, and enough others for three chunks."""
    from model.textmodel import WARM_CHUNK

    shipped = [("stripe", "do_not_honor", "The card was declined."), ("adyen", "Refused", "Not enough balance")]
    return shipped + [("stripe", f"code_{i}", f"The card was declined ({i}).") for i in range(2 * WARM_CHUNK + 1)]


def _decisions(scorer: object, errors: list[tuple[str | None, str | None, str | None]]) -> list[dict[str, object]]:
    """decide() on a request carrying each error, served as mirrored version 7."""
    from service.api.model_holder import VersionedScorer

    catalog, merchant = load_catalog(), make_merchant()
    scorer = scorer if isinstance(scorer, VersionedScorer) else VersionedScorer(scorer, "7")
    return [
        decide(make_request(**_failure(str(code), str(message), "05")), merchant, scorer, catalog=catalog,  # type: ignore[arg-type]
               rng=np.random.default_rng(0), decision_id="dec_same").model_dump()
        for _connector, code, message in errors
    ]  # fmt: skip


def test_a_mirrored_version_takes_the_text_features_a_sibling_worker_warmed(
    trained: TrainingResult, tmp_path: Path
) -> None:
    """The server's workers load a new version one after the other and warm it up on mostly the same errors: the
    first shares its text features through the version's folder (by a digest of each error, not its text), and the
    next computes none of them again, and decides as a bundle loaded and warmed on its own."""
    from service.api.mirror import WARMED_TEXT_FILE, MirrorSource, version_folder

    folder = trained.bundle.save(version_folder(tmp_path, "7"))
    errors = _errors_to_warm()
    first = MirrorSource(tmp_path, 1.0).load("7")
    first.warm_up(errors, between_steps=lambda: None)  # type: ignore[attr-defined]
    shared = (folder / WARMED_TEXT_FILE).read_text(encoding="utf-8")
    assert "declined" not in shared
    assert "do_not_honor" not in shared

    second = MirrorSource(tmp_path, 1.0).load("7")
    text_model = second.inner.text_model  # type: ignore[attr-defined]
    computed: list[int] = []
    predict = text_model.predict
    text_model.predict = lambda *columns: computed.append(len(columns[0])) or predict(*columns)
    checks: list[None] = []
    check = _DirectText.same_as_sklearn
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(_DirectText, "same_as_sklearn", lambda *a: checks.append(None) or check(*a))
        second.warm_up(errors, between_steps=lambda: None)  # type: ignore[attr-defined]
    assert computed == []
    assert checks == []  # the first worker checked the direct form with the same libraries
    assert text_model.has_direct_form()
    assert second.seen_errors() == errors  # type: ignore[attr-defined]

    alone = ModelBundle.load(folder)
    alone.warm_up(errors)
    assert [text_model.features_for(*e) for e in errors] == [alone.text_model.features_for(*e) for e in errors]
    assert _decisions(second, errors) == _decisions(alone, errors)
    # A worker that saw an error more computes that one alone, and shares it too.
    more = [*errors, ("razorpay", "BAD_REQUEST_ERROR", "Payment failed")]
    third = MirrorSource(tmp_path, 1.0).load("7")
    third_text = third.inner.text_model  # type: ignore[attr-defined]
    third_predict = third_text.predict
    third_text.predict = lambda *columns: computed.append(len(columns[0])) or third_predict(*columns)
    computed.clear()
    third.warm_up(more, between_steps=lambda: None)  # type: ignore[attr-defined]
    assert computed == [1]
    assert len(json.loads((folder / WARMED_TEXT_FILE).read_text(encoding="utf-8"))["rows"]) == len(more)


def test_shared_text_features_that_cannot_be_used_are_named_and_computed(
    trained: TrainingResult, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import os

    from service.api.mirror import WARMED_TEXT_FILE, MirrorSource, version_folder

    folder = trained.bundle.save(version_folder(tmp_path, "7"))
    errors = _errors_to_warm()
    MirrorSource(tmp_path, 1.0).load("7").warm_up(errors)  # type: ignore[attr-defined]
    alone = ModelBundle.load(folder)
    alone.warm_up(errors)
    model_file = folder / "text_model.pkl"
    written = (folder / WARMED_TEXT_FILE).read_text(encoding="utf-8")
    later = model_file.stat().st_mtime_ns + 1_000_000_000
    cases = {
        "Expecting value": lambda: (folder / WARMED_TEXT_FILE).write_text("not json", encoding="utf-8"),
        "its rows are not lists of numbers": lambda: (folder / WARMED_TEXT_FILE).write_text(
            json.dumps(json.loads(written) | {"rows": {"ab": ["x"]}}), encoding="utf-8"
        ),
        # Last: the file's own identity changes (a folder downloaded again).
        "it was written for another text_model.pkl": lambda: os.utime(model_file, ns=(later, later)),
    }
    # Written with other libraries: its rows are used, the direct form is checked again.
    (folder / WARMED_TEXT_FILE).write_text(
        json.dumps(json.loads(written) | {"direct_form_checked_with": {"numpy": "0"}}), encoding="utf-8"
    )
    checks: list[None] = []
    check = _DirectText.same_as_sklearn
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(_DirectText, "same_as_sklearn", lambda *a: checks.append(None) or check(*a))
        other_libraries = MirrorSource(tmp_path, 1.0).load("7")
        other_libraries.warm_up(errors, between_steps=lambda: None)  # type: ignore[attr-defined]
    assert checks == [None]
    assert _decisions(other_libraries, errors) == _decisions(alone, errors)
    for why, spoil in cases.items():
        (folder / WARMED_TEXT_FILE).write_text(written, encoding="utf-8")
        spoil()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="winback.api"):
            loaded = MirrorSource(tmp_path, 1.0).load("7")
            loaded.warm_up(errors, between_steps=lambda: None)  # type: ignore[attr-defined]
        assert f"{WARMED_TEXT_FILE} is not used" in caplog.text
        assert why in caplog.text
        assert _decisions(loaded, errors) == _decisions(alone, errors)


def test_a_bundle_saved_before_path_tables_and_the_pickle_loads_and_explains_the_same(
    trained: TrainingResult, tmp_path: Path
) -> None:
    import joblib

    saved = trained.bundle.save(tmp_path / "bundle")
    joblib.dump(trained.bundle.text_model, saved / "text_model.joblib")
    for name in ("text_model.pkl", "retry_paths.npz", "retarget_paths.npz"):
        (saved / name).unlink()
    loaded = ModelBundle.load(saved)
    x = _retry_rows(loaded)
    np.testing.assert_array_equal(
        path_contributions(loaded.retry_booster, x), path_contributions(trained.bundle.retry_booster, x)
    )
    request = make_request(**_failure("do_not_honor", "The card was declined.", "05"))
    candidates = _candidates(request.event_time)
    np.testing.assert_array_equal(loaded.score(request, candidates), trained.bundle.score(request, candidates))


def test_a_text_model_that_cannot_be_read_is_named(trained: TrainingResult, tmp_path: Path) -> None:
    saved = trained.bundle.save(tmp_path / "bundle")
    whole = (saved / "text_model.pkl").read_bytes()
    (saved / "text_model.pkl").write_bytes(whole[:1000])  # cut short: pickle's own error names no file
    with pytest.raises(ValueError, match=r"text_model\.pkl cannot be read \(UnpicklingError"):
        ModelBundle.load(saved)
    (saved / "text_model.pkl").unlink()
    (saved / "text_model.joblib").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"text_model\.joblib cannot be read"):
        ModelBundle.load(saved)


def test_a_path_table_that_cannot_be_used_is_named_and_built_from_the_booster(
    trained: TrainingResult, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The table is derived data: one derived from another booster file, or one that does not fit the booster or
    cannot be read, is named in a warning and built from the booster, and the explanations stay right."""
    saved = trained.bundle.save(tmp_path / "bundle")
    with np.load(saved / "retry_paths.npz") as own:
        fields = {name: own[name] for name in own.files}
    assert str(fields["booster_sha256"]) == hashlib.sha256((saved / "retry_model.txt").read_bytes()).hexdigest()
    trees, leaves, features = (int(n) for n in fields["shape"])

    def rewritten(**changes: object) -> None:
        np.savez(saved / "retry_paths.npz", **(fields | changes))

    no_cells = {"index": np.array([], dtype=np.int64), "values": np.array([])}
    broken = [
        ("it was derived from another retry_model.txt", lambda: (saved / "retry_paths.npz").write_bytes(
            (saved / "retarget_paths.npz").read_bytes()
        )),
        ("trees of at most", lambda: rewritten(shape=np.array([trees + 1, leaves, features]))),
        ("trees of at most", lambda: rewritten(shape=np.array([trees, 1, features]), **no_cells)),
        ("trees of at most", lambda: rewritten(shape=np.array([trees, 2**40, features]), **no_cells)),
        ("trees of at most", lambda: rewritten(shape=np.array([trees, -1, features]), **no_cells)),
        ("with 1 float64 cells", lambda: rewritten(index=np.array([0.0]), values=np.array([1.0]))),
        ("with 2 int64 cells", lambda: rewritten(index=np.array([0, 1]), values=np.array([1.0]))),
        ("with 1 int64 cells", lambda: rewritten(index=np.array([0]), values=np.array([1], dtype=np.int64))),
        ("cells lie outside", lambda: rewritten(index=np.array([-1]), values=np.array([1.0]))),
        ("cells lie outside", lambda: rewritten(index=np.array([trees * leaves * features]), values=np.array([1.0]))),
        ("it cannot be read", lambda: (saved / "retry_paths.npz").write_bytes(b"not a zip file")),
    ]  # fmt: skip
    for why, breaking in broken:
        breaking()
        caplog.clear()
        with caplog.at_level("WARNING", logger="winback.model"):
            loaded = ModelBundle.load(saved)
        assert "retry_paths.npz is not used: " in caplog.text
        assert why in caplog.text
        x = _retry_rows(loaded)
        np.testing.assert_allclose(
            path_bias(loaded.retry_booster) + path_contributions(loaded.retry_booster, x).sum(axis=1),
            loaded.retry_booster.predict(x, raw_score=True, num_threads=1),
            atol=1e-9,
        )


def test_training_refuses_a_history_without_retries() -> None:
    attempts, nudges = make_history_frames(20, seed=2)
    initial_only = attempts[attempts["attempt_number"] == 1]
    with pytest.raises(ValueError, match="need at least 30 with both outcomes to learn retryability"):
        train(initial_only, nudges.iloc[0:0], seed=0)


def test_path_contributions_add_up_to_the_raw_score(trained: TrainingResult) -> None:
    bundle = trained.bundle
    request = make_request()
    context = build_context(request, make_merchant(), load_catalog())
    candidates = permitted(context, enumerate_candidates(context))
    retries = [c for c in candidates if c.action == Action.RETRY]
    x = bundle.matrix(request, retries)
    contributions = path_contributions(bundle.retry_booster, x)
    raw = bundle.retry_booster.predict(x, raw_score=True, num_threads=1)
    bias = path_bias(bundle.retry_booster)
    assert contributions.shape == x.shape
    np.testing.assert_allclose(bias + contributions.sum(axis=1), raw, rtol=0, atol=1e-9)
    assert bundle.explain(request, retries[0], k=2)  # phrased from the same contributions


def test_path_contributions_handle_one_leaf_trees() -> None:
    import lightgbm as lgb

    rng = np.random.default_rng(0)
    x = rng.random((50, 3))
    y = np.zeros(50)
    y[:2] = 1.0  # too few positives to split: every tree is a single leaf
    params = {"objective": "binary", "verbose": -1, "min_data_in_leaf": 40, "num_leaves": 4}
    booster = lgb.train(params, lgb.Dataset(x, y), num_boost_round=3)
    contributions = path_contributions(booster, x[:5].astype(np.float32))
    assert np.all(contributions == 0.0)
    bias = path_bias(booster)
    np.testing.assert_allclose(bias + contributions.sum(axis=1), booster.predict(x[:5], raw_score=True), atol=1e-9)


def test_the_path_table_parses_the_dump_through_python_once_per_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsing a booster's dump calls Python for each tree node, so a scorer loading a model beside the serving one
    lets its requests take the GIL between nodes instead of waiting out one long parse (model/bundle.py)."""
    import lightgbm as lgb

    import model.bundle as bundle_module

    rng = np.random.default_rng(1)
    x = rng.random((400, 4))
    y = (x[:, 0] + 0.3 * rng.random(400) > 0.6).astype(float)
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 8}, lgb.Dataset(x, y), num_boost_round=5)
    nodes = sum(2 * tree["num_leaves"] - 1 for tree in booster.dump_model()["tree_info"])
    seen: list[dict[str, object]] = []
    as_parsed = bundle_module._each_json_object

    def counting(node: dict[str, object]) -> dict[str, object]:
        seen.append(node)
        return as_parsed(node)

    monkeypatch.setattr(bundle_module, "_each_json_object", counting)
    contributions = path_contributions(booster, x[:5].astype(np.float32))
    assert len(seen) >= nodes
    np.testing.assert_allclose(
        path_bias(booster) + contributions.sum(axis=1), booster.predict(x[:5], raw_score=True), atol=1e-9
    )


def test_partitions_of_whole_orders_train_the_same_bundle() -> None:
    attempts, nudges = make_history_frames(1_500, seed=4)
    whole = train(attempts, nudges, seed=0, max_rounds=40)
    orders = attempts["order_id"].drop_duplicates().to_numpy()
    parts = [
        SimpleNamespace(attempts=attempts[attempts["order_id"].isin(orders[i::3])],
                        nudges=nudges[nudges["order_id"].isin(orders[i::3])])
        for i in range(3)
    ]  # fmt: skip
    split = train_partitions(parts, seed=0, max_rounds=40, workers=2)  # two processes build the decision points
    assert split.metrics["n_partitions"] == 3.0
    assert split.bundle.retry_booster.model_to_string() == whole.bundle.retry_booster.model_to_string()
    assert split.bundle.spec == whole.bundle.spec
    assert split.bundle.metadata["known_codes"] == whole.bundle.metadata["known_codes"]
    cells, whole_cells = split.bundle.metadata["cell_support"], whole.bundle.metadata["cell_support"]
    assert [row[:5] for row in cells] == [row[:5] for row in whole_cells]
    assert [row[5] for row in cells] == pytest.approx([row[5] for row in whole_cells], abs=1e-5)
    same = {k: v for k, v in whole.metrics.items() if k not in ("train_seconds", "n_partitions")}
    assert {k: split.metrics[k] for k in same} == pytest.approx(same, nan_ok=True)


def test_a_nudge_answered_after_its_follow_up_still_had_its_follow_up_decision() -> None:
    """The executor decides again 24 h after a nudge whatever happens later: a link paid after that (links live
    48 h) cannot undo the follow-up decision. Training took "the nudge was ever answered" to mean "no follow-up",
    so the next nudge, decided at the follow-up, was built as decided at the first failure, two days earlier,
    with no nudge sent yet: information from after the decision (the customer's late answer) changed the row's
    features, and they no longer matched the request the executor sent (n_nudges 1, the nudge's channel)."""
    attempts = make_attempts_frame(
        {"order_id": "ord_late", "txn_id": "t_1", "attempt_number": 1, "created_at": "2026-11-01T10:00:00Z"},
        {
            "order_id": "ord_late",
            "txn_id": "t_2",
            "attempt_number": 2,
            "strategy": "retarget_link",
            "nudge_id": "ndg_1",
            "created_at": "2026-11-02T16:00:00Z",  # ndg_1's link, paid 30 h after it was sent
            "error_code": None,
            "error_message": None,
            "network_decline_code": None,
            "status": "success",
        },
    )
    late = {"order_id": "ord_late", "sent_at": "2026-11-01T10:00:05Z", "clicked_at": "2026-11-02T15:58:00Z"}
    nudges = make_nudges_frame(
        {**late, "nudge_id": "ndg_1"},
        {"order_id": "ord_late", "nudge_id": "ndg_2", "sent_at": "2026-11-02T10:00:05Z", "channel": "sms"},
    )
    points = decision_points(attempts, nudges)
    second = points[points["nudge_id"] == "ndg_2"].iloc[0]
    assert second["decision_time"] == _utc("2026-11-02T10:00:05Z")  # ndg_1's follow-up, 24 h after it
    assert second["n_nudges"] == 1.0
    assert second["last_channel"] == "whatsapp"
    assert second["last_nudge_clicked"] == 0.0  # clicked only later


def test_the_calibrated_probability_is_the_logged_rate_when_the_logging_policy_knew_more() -> None:
    """The calibrator maps the booster's score to the chance of success of decisions as the history took them,
    which the holdout (and the cell support) compares it with; the inverse-propensity weights are for the booster's
    fit and the policy's value. Here the logging policy knew what the features do not: 80% of the retries that went
    on to succeed were its own pick (propensity 0.8), 80% of those that failed were its exploration (0.05).
    Calibrated with the weights, the model answered 0.066 against an observed 0.187 on the holdout (on the
    simulator's 20,000 orders, seed 3: 0.150 against 0.214)."""
    attempts, nudges = make_history_frames(2500, seed=11)
    rng = np.random.default_rng(3)
    retries = attempts["propensity"].notna().to_numpy()
    succeeded = (attempts["status"] == "success").to_numpy()
    picked = np.where(succeeded, rng.random(len(attempts)) < 0.8, rng.random(len(attempts)) < 0.2)
    attempts.loc[retries, "propensity"] = np.where(picked, 0.8, 0.05)[retries]

    metrics = train(attempts, nudges, seed=0, max_rounds=80, evaluate_unseen_codes=False).metrics

    observed, predicted = metrics["retry_holdout_base_rate"], metrics["retry_holdout_mean_prediction"]
    assert predicted == pytest.approx(observed, abs=0.04), (predicted, observed)
    assert metrics["retry_holdout_ece"] < 0.06, metrics["retry_holdout_ece"]
