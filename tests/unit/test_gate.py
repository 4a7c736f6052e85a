"""The promotion gate's verdict as a pure function of holdout metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from rich.console import Console

from pipelines.gate import GATE_METRICS, compare, gate_table, paired_noise

CHAMPION = {
    "retry_log_loss": 0.50,
    "retry_auc": 0.70,
    "retarget_log_loss": 0.40,
    "retarget_auc": 0.65,
    "policy_value_dr": 0.30,
}


def _render(result: object, width: int = 200) -> str:
    console = Console(width=width, record=True)
    console.print(gate_table(result))  # type: ignore[arg-type]
    return console.export_text()


def test_no_champion_promotes_and_says_so() -> None:
    result = compare(CHAMPION, None, challenger_version="1", champion_version=None)
    assert result.promote
    assert result.verdict == "promoted version 1: there was no champion yet"


def test_equal_metrics_promote() -> None:
    result = compare(CHAMPION, CHAMPION, challenger_version="2", champion_version="1")
    assert result.promote
    assert all(check.passed for check in result.checks)
    assert result.verdict.startswith("promoted version 2 over version 1")


@pytest.mark.parametrize(
    ("metric", "value"),
    [
        ("retry_log_loss", 0.52),
        ("retry_auc", 0.68),
        ("retarget_log_loss", 0.42),
        ("retarget_auc", 0.63),
        ("policy_value_dr", 0.29),
    ],
)
def test_worse_beyond_tolerance_on_any_metric_keeps_the_champion(metric: str, value: float) -> None:
    challenger = {**CHAMPION, metric: value}
    result = compare(challenger, CHAMPION, challenger_version="2", champion_version="1")
    assert not result.promote
    failed = [check.metric.name for check in result.checks if not check.passed]
    assert failed == [metric]
    label = next(m.label for m in GATE_METRICS if m.name == metric)
    assert result.verdict.startswith("kept champion version 1; version 2 stays challenger: " + label + " worse by")


@pytest.mark.parametrize("metric", [m.name for m in GATE_METRICS])
def test_worse_within_tolerance_passes(metric: str) -> None:
    gate_metric = next(m for m in GATE_METRICS if m.name == metric)
    step = gate_metric.allowed(CHAMPION[metric]) / 2
    challenger = {**CHAMPION, metric: CHAMPION[metric] + (-step if gate_metric.higher_is_better else step)}
    assert compare(challenger, CHAMPION, challenger_version="2", champion_version="1").promote


def test_undefined_challenger_metric_blocks_but_undefined_champion_metric_does_not() -> None:
    missing_challenger = {k: v for k, v in CHAMPION.items() if k != "retarget_auc"}
    blocked = compare(missing_challenger, CHAMPION, challenger_version="2", champion_version="1")
    assert not blocked.promote
    assert "retarget model AUC of the challenger is undefined" in blocked.reasons

    nan_champion = {**CHAMPION, "retarget_auc": math.nan}
    assert compare(CHAMPION, nan_champion, challenger_version="2", champion_version="1").promote


def test_table_shows_every_metric_and_the_verdict() -> None:
    challenger = {**CHAMPION, "retry_auc": 0.60}
    text = _render(compare(challenger, CHAMPION, challenger_version="2", champion_version="1"))
    for metric in GATE_METRICS:
        assert metric.short_label in text
    assert "both models under one reward model of the holdout's own outcomes" in " ".join(
        text.split()
    )  # what the short "policy value (DR)" leaves out
    assert "challenger v2 vs champion v1" in text
    assert "kept champion version 1" in text
    assert "0.6000" in text


def test_policy_value_tolerance_is_relative_to_the_champion() -> None:
    big = {**CHAMPION, "policy_value_dr": 100.0}
    assert compare({**big, "policy_value_dr": 98.5}, big, challenger_version="2", champion_version="1").promote
    kept = compare({**big, "policy_value_dr": 97.0}, big, challenger_version="2", champion_version="1")
    assert not kept.promote
    assert (
        "policy value (DR, both under the holdout's reward model) worse by 3.0000 (97.0000 vs 100.0000; "
        "tolerance 2%)" in kept.reasons
    )


def test_noise_widens_a_tolerance_but_never_narrows_it() -> None:
    challenger = {**CHAMPION, "retry_auc": 0.67}  # worse by 0.03: beyond the fixed 0.01
    assert not compare(challenger, CHAMPION, challenger_version="2", champion_version="1").promote
    noisy = compare(
        challenger, CHAMPION, challenger_version="2", champion_version="1", noise={"retry_auc": 0.02}
    )  # 2 standard errors = 0.04 > 0.03: the holdout cannot tell the two apart
    assert noisy.promote
    assert next(c for c in noisy.checks if c.metric.name == "retry_auc").allowed == pytest.approx(0.04)
    assert "0.0400" in _render(noisy)
    quiet = compare(
        {**CHAMPION, "retry_auc": 0.685},
        CHAMPION,
        challenger_version="2",
        champion_version="1",
        noise={"retry_auc": 0.001},
    )  # a tiny standard error keeps the fixed tolerance: 0.015 worse still fails
    assert not quiet.promote
    assert "tolerance 0.01" in quiet.verdict


def test_paired_noise_is_zero_for_identical_models_and_shrinks_with_more_points() -> None:
    rng = np.random.default_rng(3)

    def sample(n: int) -> tuple[np.ndarray, ...]:
        p = rng.uniform(0.05, 0.95, n)
        y = (rng.uniform(size=n) < p).astype(float)
        other = np.clip(p + rng.normal(0, 0.1, n), 0.01, 0.99)
        return y, np.array(["retry"] * n, dtype=object), p, other

    y, actions, p, other = sample(400)
    same = paired_noise(y, actions, p, p)
    assert same["retry_log_loss"] == 0.0
    assert same["retry_auc"] == 0.0
    assert math.isnan(same["retarget_log_loss"])  # no retarget rows
    small = paired_noise(y, actions, p, other)
    large = paired_noise(*sample(6400))
    assert small["retry_log_loss"] > 0.0
    assert small["retry_auc"] > 0.0
    assert large["retry_log_loss"] < small["retry_log_loss"] / 2
    assert large["retry_auc"] < small["retry_auc"] / 2


def test_noise_never_widens_a_tolerance_past_its_ceiling() -> None:
    """A retrain on a 15-day window (a few hundred holdout points) had these numbers: the paired standard errors
    were so large that a retry model with five times the champion's log loss and an AUC 0.18 lower passed."""
    champion = {**CHAMPION, "retry_log_loss": 0.4016, "retry_auc": 0.9298}
    challenger = {**CHAMPION, "retry_log_loss": 2.0054, "retry_auc": 0.7544}
    noise = {"retry_log_loss": 0.9294, "retry_auc": 0.0973}
    result = compare(challenger, champion, challenger_version="4", champion_version="2", noise=noise)
    assert not result.promote
    failed = {check.metric.name: check for check in result.checks if not check.passed}
    assert set(failed) == {"retry_log_loss", "retry_auc"}
    assert failed["retry_auc"].allowed == pytest.approx(0.05)
    assert "too small a holdout to tell more" in failed["retry_auc"].reason
    # Noise inside the ceiling still widens the tolerance (the small-holdout case the noise allowance is for).
    near = compare({**champion, "retry_auc": 0.89}, champion, challenger_version="4", champion_version="2", noise=noise)
    assert near.promote
    # The relative ceiling of the policy value: 10% of the champion's value.
    value = compare(
        {**CHAMPION, "policy_value_dr": 0.25},
        CHAMPION,
        challenger_version="2",
        champion_version="1",
        noise={"policy_value_dr": 0.5},
    )
    assert not value.promote
    assert next(c for c in value.checks if c.metric.name == "policy_value_dr").allowed == pytest.approx(0.03)


def test_evaluating_a_refit_on_the_history_it_was_fitted_on_warns() -> None:
    """(Review.) ``winback evaluate --alias champion`` on the training history scored a refit version partly on
    decision points its text model was fitted on, and called them the holdout."""
    from datetime import UTC, datetime

    from pipelines.evaluate import fitted_on_holdout

    start = datetime(2026, 7, 25, tzinfo=UTC)
    refit = {"text_refit": True, "text_trained_to": "2026-09-09 13:00:00+00:00", "trained_to": "2026-07-24"}
    warning = fitted_on_holdout(refit, start)
    assert warning is not None
    assert "in-sample" in warning
    assert fitted_on_holdout({**refit, "text_trained_to": "2026-07-24 11:59:28+00:00"}, start) is None
    # A version without a refit (or from before refits) is not flagged.
    assert fitted_on_holdout({"trained_to": "2026-09-09 13:00:00+00:00"}, start) is None


def test_the_table_keeps_each_metric_on_one_line_at_80_columns() -> None:
    # In `winback train --promote` / `retrain` at 80 columns, the labels folded over two to five lines each
    # ("policy value" / "(DR, each model" / "under the" / "other's reward" / "model)").
    challenger = {**CHAMPION, "retry_auc": 0.60}
    text = _render(compare(challenger, CHAMPION, challenger_version="2", champion_version="1"), width=80)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, text
    rows = [index for index, line in enumerate(lines) if line.rstrip("│ ").endswith((" yes", " no"))]
    assert rows == list(range(rows[0], rows[0] + len(GATE_METRICS))), text  # one line each, none folded between
    for metric, row in zip(GATE_METRICS, rows, strict=True):
        assert f"{CHAMPION[metric.name]:.4f}" in lines[row], text
    assert "policy value (DR)" in lines[rows[-1]], text


def test_train_prints_the_gate_s_legend_and_verdict_wrapped_to_80_columns() -> None:
    # `winback train --promote` printed the gate's caption as one 147-character line (legend) and the verdict with
    # its reasons as another, folded by an 80-column terminal mid-word; the table above them was 72 wide.
    import io

    from pipelines.train import print_gate

    challenger = {**CHAMPION, "retry_auc": 0.60}
    printed = io.StringIO()
    print_gate(
        Console(file=printed, width=80), compare(challenger, CHAMPION, challenger_version="2", champion_version="1")
    )
    lines = printed.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80, printed.getvalue()
    said = " ".join(printed.getvalue().split())
    assert "both models under one reward model of the holdout's own outcomes" in said
    assert "kept champion version 1; version 2 stays challenger: retry model AUC worse by 0.1000" in said
