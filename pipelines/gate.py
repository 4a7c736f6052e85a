"""The promotion gate: a challenger replaces the champion only if it is not worse on the same holdout.

Both models are scored on the challenger's time holdout of the new history, the newest data the challenger was
not fitted on, so the comparison is like for like. The champion was not fitted on it either, unless the new history
is older than the one the champion was trained on (a backfill, or the wrong export): the verdict then carries a
caveat (``champion_fitted_on_holdout``), since such a holdout favours the champion.

Each gate metric has a direction and a tolerance. The policy value, what a version is for, is a non-inferiority
test: the challenger passes only when its policy value is shown, at the one-sided level ``NON_INFERIORITY_LEVEL``,
to be worse than the champion's by no more than the margin (a share of the champion's value,
``DEFAULT_POLICY_VALUE_MARGIN`` unless the caller names another: `with_policy_value_margin`); a holdout too noisy
to show it keeps the champion. The log-loss and AUC checks are guardrails: the challenger passes when it is not
worse than the champion by more than the tolerance, which the holdout's own noise may widen (``NOISE_Z`` paired
standard errors), but never past the metric's ``ceiling``: a holdout too small to resolve a large loss does not let
that loss through. A metric the champion cannot be measured on (NaN) does not block; a metric the challenger cannot
be measured on does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from statistics import NormalDist

import numpy as np
import pandas as pd
from rich.table import Table

from pipelines.tables import compact_table, figure

__all__ = [
    "DEFAULT_POLICY_VALUE_MARGIN",
    "GATE_METRICS",
    "GATE_TABLE_LEGEND",
    "NON_INFERIORITY_LEVEL",
    "GateCheck",
    "GateMetric",
    "GateResult",
    "champion_fitted_on_holdout",
    "compare",
    "fitted_into_holdout",
    "gate_table",
    "paired_noise",
    "with_policy_value_margin",
]

#: A challenger may be worse than the champion by this many standard errors of the paired difference (or by the
#: metric's fixed tolerance, whichever is larger): differences inside the holdout's own noise do not block.
NOISE_Z = 2.0

#: The policy value's non-inferiority test (README, "The promotion gate's rule"): the challenger is promoted only when
#: the one-sided upper confidence bound, at this level, of how much worse its policy value is than the champion's
#: stays within the margin. 5% one-sided, the level of a 90% two-sided interval's bound.
NON_INFERIORITY_LEVEL = 0.05
#: The margin by default, a share of the champion's policy value. On the README's 20,000-order history (about 14,000
#: holdout points) the paired standard error of the difference is about 1.7% of the champion's value, so an equal
#: challenger is shown within 5% most of the time, and a challenger 7% worse almost never.
DEFAULT_POLICY_VALUE_MARGIN = 0.05


@dataclass(frozen=True)
class GateMetric:
    """One holdout metric the gate compares; ``tolerance`` is in the metric's own units, or a share of the
    champion's value when ``relative`` (for values whose scale depends on the data, like USD per decision).
    ``ceiling`` (same units) is the most the holdout's noise may widen the tolerance to."""

    name: str
    label: str  # in the verdict's reasons
    short_label: str  # in the gate table's first column: at most 17 characters, so the table fits 80 columns
    higher_is_better: bool
    tolerance: float
    ceiling: float
    relative: bool = False
    #: Tested for non-inferiority (``tolerance`` is then the margin, ``ceiling`` unused): passes only when shown
    #: within the margin at ``NON_INFERIORITY_LEVEL``, so noise narrows what the point difference may be.
    non_inferiority: bool = False

    def allowed(self, champion: float) -> float:
        """How much worse than ``champion`` the challenger may be."""
        return self.tolerance * abs(champion) if self.relative else self.tolerance

    def most_allowed(self, champion: float) -> float:
        """How much worse than ``champion`` the challenger may be however noisy the holdout."""
        return self.ceiling * abs(champion) if self.relative else self.ceiling

    def describe_tolerance(self) -> str:
        """The tolerance as shown in the gate table."""
        return f"{self.tolerance:.0%}" if self.relative else f"{self.tolerance:g}"

    def describe_margin(self, champion: float) -> str:
        """A non-inferiority margin in words: its amount and what it is a share of."""
        amount = self.allowed(champion)
        if not self.relative:
            return f"margin {amount:.4f}"
        return f"margin {amount:.4f} = {self.tolerance:.1%} of the champion's {abs(champion):.4f}"


#: Holdout log loss and AUC of the retry and retarget models, and the doubly robust policy value. The ceilings
#: (5x the fixed tolerances) keep a small holdout's noise from passing a challenger that is far worse: a retrain
#: on a 15-day window had a retry log loss of 2.01 against the champion's 0.40 and an AUC of 0.75 against 0.93,
#: and passed both with noise tolerances of 1.86 and 0.19.
#:
#: The policy value is both models' doubly robust value under one and the same reward model, neither model's: the
#: holdout's own outcomes, cross-fitted by order (``model.evaluation.crossfit_reward_model``: no point is valued by a
#: fit that saw it), weights clipped at 10 (``pipelines.train.GATE_DR_MAX_WEIGHT``), compared point by point with the
#: paired standard error as its noise, and the reward model's fit noise besides (``pipelines.train.gate_dr_noise``).
#: A model's own reward model overrates the actions that model chose (it chose them for their high predictions: the
#: optimizer's curse; README, "The promotion gate's policy value"); valuing each model
#: under the other's, as the gate did before, took that out but let one model's reward model decide the other's
#: value: a challenger whose reward model was degenerate could pass with a worse policy, or fail with the same one.
GATE_METRICS: tuple[GateMetric, ...] = (
    GateMetric(
        "retry_log_loss", "retry model log loss", "retry log loss", higher_is_better=False, tolerance=0.01, ceiling=0.05
    ),
    GateMetric("retry_auc", "retry model AUC", "retry AUC", higher_is_better=True, tolerance=0.01, ceiling=0.05),
    GateMetric(
        "retarget_log_loss",
        "retarget model log loss",
        "retarget log loss",
        higher_is_better=False,
        tolerance=0.01,
        ceiling=0.05,
    ),
    GateMetric(
        "retarget_auc", "retarget model AUC", "retarget AUC", higher_is_better=True, tolerance=0.01, ceiling=0.05
    ),
    GateMetric(
        "policy_value_dr",
        "policy value (DR, both under the holdout's reward model)",
        "policy value (DR)",
        higher_is_better=True,
        tolerance=DEFAULT_POLICY_VALUE_MARGIN,
        ceiling=DEFAULT_POLICY_VALUE_MARGIN,
        relative=True,
        non_inferiority=True,
    ),
)


def with_policy_value_margin(metrics: tuple[GateMetric, ...], margin: float) -> tuple[GateMetric, ...]:
    """``metrics`` with the non-inferiority margin of each tested for it set to ``margin`` (a share of the
    champion's value, from 0 up to 1); ValueError naming the margin otherwise."""
    if not (math.isfinite(margin) and 0.0 <= margin < 1.0):
        raise ValueError(
            "the policy value's margin (--gate-margin) is a share of the champion's value, from 0 up to "
            f"below 1; got {margin!r}"
        )
    return tuple(
        replace(metric, tolerance=margin, ceiling=margin) if metric.non_inferiority else metric for metric in metrics
    )


@dataclass(frozen=True)
class GateCheck:
    """The comparison of one metric."""

    metric: GateMetric
    challenger: float
    champion: float
    passed: bool
    reason: str
    allowed: float = math.nan  # how much worse the challenger could be on this holdout (NaN: not compared)

    @property
    def delta(self) -> float:
        """Challenger minus champion (NaN when either is missing)."""
        return self.challenger - self.champion


@dataclass(frozen=True)
class GateResult:
    """The verdict: promote or keep, with one check per metric and the reasons in words."""

    promote: bool
    challenger_version: str
    champion_version: str | None
    checks: tuple[GateCheck, ...] = ()
    reasons: tuple[str, ...] = field(default_factory=tuple)
    #: What the verdict should be read with, whichever way it went (the holdout the champion was fitted on).
    caveats: tuple[str, ...] = ()

    @property
    def verdict(self) -> str:
        """One line: which way it went and why, and its caveats."""
        caveats = "".join(f" (caveat: {caveat})" for caveat in self.caveats)
        return self._verdict() + caveats

    def _verdict(self) -> str:
        if self.champion_version is None:
            return f"promoted version {self.challenger_version}: there was no champion yet"
        if self.promote:
            return (
                f"promoted version {self.challenger_version} over version {self.champion_version}: "
                "not worse on any gate metric"
            )
        return (
            f"kept champion version {self.champion_version}; version {self.challenger_version} stays challenger: "
            + "; ".join(self.reasons)
        )


def _check(metric: GateMetric, challenger: float, champion: float, noise: float = math.nan) -> GateCheck:
    if math.isnan(challenger):
        return GateCheck(metric, challenger, champion, False, f"{metric.label} of the challenger is undefined")
    if math.isnan(champion):
        return GateCheck(metric, challenger, champion, True, f"{metric.label} of the champion is undefined")
    worse_by = (champion - challenger) if metric.higher_is_better else (challenger - champion)
    if metric.non_inferiority:
        return _non_inferiority_check(metric, challenger, champion, worse_by, noise)
    allowed = metric.allowed(champion)
    tolerance = metric.describe_tolerance()
    if math.isfinite(noise) and NOISE_Z * noise > allowed:
        widened = NOISE_Z * noise
        ceiling = max(metric.most_allowed(champion), allowed)
        if widened <= ceiling:
            allowed = widened
            tolerance = f"{allowed:.4f} = {NOISE_Z:g} x the paired standard error on this holdout"
        else:
            allowed = ceiling
            tolerance = (
                f"{allowed:.4f}, the most noise may widen it to; {NOISE_Z:g} x the paired standard error on this "
                f"holdout is {widened:.4f}: too small a holdout to tell more"
            )
    if worse_by > allowed:
        return GateCheck(
            metric,
            challenger,
            champion,
            False,
            f"{metric.label} worse by {worse_by:.4f} ({challenger:.4f} vs {champion:.4f}; tolerance {tolerance})",
            allowed,
        )
    word = "better" if worse_by < 0 else "within tolerance"
    return GateCheck(
        metric, challenger, champion, True, f"{metric.label} {word} ({challenger:.4f} vs {champion:.4f})", allowed
    )


def _non_inferiority_check(
    metric: GateMetric, challenger: float, champion: float, worse_by: float, noise: float
) -> GateCheck:
    """Passed when the one-sided ``1 - NON_INFERIORITY_LEVEL`` upper bound of ``worse_by`` is within the margin;
    without a standard error (fewer than two orders), the point difference alone is compared with it."""
    margin = metric.allowed(champion)
    values = f"{challenger:.4f} vs {champion:.4f}"
    if math.isfinite(noise):
        z = NormalDist().inv_cdf(1.0 - NON_INFERIORITY_LEVEL)
        bound = worse_by + z * noise
        allowed = margin - z * noise
        shown = (
            f"worse by at most {bound:.4f} at {1.0 - NON_INFERIORITY_LEVEL:.0%} one-sided confidence ({values}, "
            f"standard error of the difference {noise:.4f})"
        )
    else:
        bound, allowed = worse_by, margin
        shown = f"worse by {worse_by:.4f} ({values}; no standard error on this holdout: the difference alone)"
    if bound > margin:
        return GateCheck(
            metric,
            challenger,
            champion,
            False,
            f"{metric.label} not shown within its margin: {shown}; {metric.describe_margin(champion)}",
            allowed,
        )
    return GateCheck(
        metric,
        challenger,
        champion,
        True,
        f"{metric.label} within its margin: {shown}; {metric.describe_margin(champion)}",
        allowed,
    )


def paired_noise(
    labels: np.ndarray,
    actions: np.ndarray,
    challenger: np.ndarray,
    champion: np.ndarray,
    *,
    n_bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, float]:
    """Standard errors of the challenger-minus-champion difference of each model metric on the same points.

    Log loss: the standard error of the mean per-point loss difference. AUC: a paired bootstrap (both models
    resampled on the same rows). ``actions`` tells retry rows from retarget rows. Missing groups give NaN.
    """
    from model.evaluation import roc_auc

    y = np.asarray(labels, dtype=np.float64)
    kinds = np.asarray(actions, dtype=object)
    a = np.clip(np.asarray(challenger, dtype=np.float64), 1e-12, 1 - 1e-12)
    b = np.clip(np.asarray(champion, dtype=np.float64), 1e-12, 1 - 1e-12)
    rng = np.random.default_rng(seed)
    out: dict[str, float] = {}
    for kind in ("retry", "retarget"):
        rows = np.flatnonzero(kinds == kind)
        out[f"{kind}_log_loss"] = out[f"{kind}_auc"] = math.nan
        if len(rows) < 2:
            continue
        yk, ak, bk = y[rows], a[rows], b[rows]
        diff = -(yk * np.log(ak) + (1 - yk) * np.log(1 - ak)) + (yk * np.log(bk) + (1 - yk) * np.log(1 - bk))
        out[f"{kind}_log_loss"] = float(diff.std(ddof=1) / math.sqrt(len(diff)))
        if 0 < yk.sum() < len(yk):
            deltas = []
            for _ in range(n_bootstrap):
                pick = rng.integers(0, len(yk), len(yk))
                if 0 < yk[pick].sum() < len(pick):
                    deltas.append(roc_auc(yk[pick], ak[pick]) - roc_auc(yk[pick], bk[pick]))
            if len(deltas) > 1:
                out[f"{kind}_auc"] = float(np.std(deltas, ddof=1))
    return out


def compare(
    challenger: Mapping[str, float],
    champion: Mapping[str, float] | None,
    *,
    challenger_version: str,
    champion_version: str | None,
    metrics: tuple[GateMetric, ...] = GATE_METRICS,
    noise: Mapping[str, float] | None = None,
) -> GateResult:
    """Judge a challenger against the champion on holdout metrics measured on the same holdout.

    ``champion=None`` (nothing promoted yet) promotes. A metric missing from a mapping counts as NaN.
    ``noise`` (metric -> standard error of the paired difference, see `paired_noise`) widens a guardrail's
    tolerance to ``NOISE_Z`` standard errors where that is larger: a small holdout cannot fail a challenger on
    differences it cannot resolve. A metric tested for non-inferiority (the policy value) is the other way round:
    its standard error narrows how much worse the challenger may look, since it must be shown within its margin.
    """
    if champion is None or champion_version is None:
        return GateResult(True, challenger_version, None, (), ("there was no champion yet",))
    noise = noise or {}
    checks = tuple(
        _check(
            metric,
            float(challenger.get(metric.name, math.nan)),
            float(champion.get(metric.name, math.nan)),
            float(noise.get(metric.name, math.nan)),
        )
        for metric in metrics
    )
    failed = tuple(check.reason for check in checks if not check.passed)
    return GateResult(
        promote=not failed,
        challenger_version=challenger_version,
        champion_version=champion_version,
        checks=checks,
        reasons=failed or tuple(check.reason for check in checks),
    )


def champion_fitted_on_holdout(champion_metadata: Mapping[str, object], holdout_start: datetime | None) -> str | None:
    """The caveat of a verdict whose holdout starts before the newest decision point the champion was fitted on
    (its ``trained_to``), else None."""
    overlap = fitted_into_holdout(champion_metadata.get("trained_to"), holdout_start)
    if overlap is None:
        return None
    trained_to, start = overlap
    return (
        f"the champion was fitted on decision points up to {trained_to}, after this holdout's start {start}: "
        "it is judged partly on data it was fitted on, which favours it; retrain on a history newer than its own"
    )


def same_judged_fit(challenger_bundle_version: str, champion_bundle_version: str) -> str | None:
    """The caveat of a verdict between two judged fits that are one and the same model (equal bundle versions: the
    history's new rows all fell in the holdout, so the fit saw nothing new), else None: every gate metric is then
    equal by construction, and "not worse on any gate metric" says nothing about the change."""
    if challenger_bundle_version != champion_bundle_version:
        return None
    return (
        f"the challenger's judged fit is the champion's ({challenger_bundle_version}): the history's new rows all fall "
        "in the holdout, so the gate compared a model with itself; only the refit (text model, code inventory and "
        "code levels) learned from them"
    )


def fitted_into_holdout(seen_to: object, holdout_start: datetime | None) -> tuple[pd.Timestamp, pd.Timestamp] | None:
    """(``seen_to``, ``holdout_start``) as UTC timestamps when a model fitted on decision points up to ``seen_to`` (a
    metadata value: a timestamp's text) saw the holdout's start or later, else None (nothing known, or no overlap)."""
    if holdout_start is None or not seen_to:
        return None
    trained_to = _utc(pd.Timestamp(str(seen_to)))
    start = _utc(pd.Timestamp(holdout_start))
    return None if trained_to < start else (trained_to, start)


def _utc(moment: pd.Timestamp) -> pd.Timestamp:
    return moment.tz_localize("UTC") if moment.tzinfo is None else moment.tz_convert("UTC")


def _fmt(value: float) -> str:
    return figure(value, ".4f")


#: Under the gate table: what its short labels leave out.
GATE_TABLE_LEGEND = (
    "policy value (DR): the doubly robust value per decision, both models under one reward model of the "
    "holdout's own outcomes (cross-fitted), promoted only when shown not worse than the champion's by more than "
    f"its margin (one-sided, at {NON_INFERIORITY_LEVEL:.0%}); "
    "tolerance: how much worse the challenger may be (the policy value: its margin less "
    f"{NormalDist().inv_cdf(1.0 - NON_INFERIORITY_LEVEL):.3f} standard errors)"
)


def gate_table(result: GateResult) -> Table:
    """A rich table of the comparison, one row per metric, with the verdict as its caption; in the compact style
    with short metric labels, so no row folds at 80 columns."""
    title = f"Promotion gate: challenger v{result.challenger_version}"
    if result.champion_version is not None:
        title += f" vs champion v{result.champion_version}"
    table = compact_table(title, caption=f"{GATE_TABLE_LEGEND}\n{result.verdict}", caption_justify="left")
    table.add_column("metric", no_wrap=True)
    table.add_column("better", justify="center")
    table.add_column("challenger", justify="right")
    table.add_column("champion", justify="right")
    table.add_column("delta", justify="right")
    table.add_column("tolerance", justify="right")
    table.add_column("ok", justify="center")
    for check in result.checks:
        table.add_row(
            check.metric.short_label,
            "higher" if check.metric.higher_is_better else "lower",
            _fmt(check.challenger),
            _fmt(check.champion),
            _fmt(check.delta),
            check.metric.describe_tolerance() if math.isnan(check.allowed) else f"{check.allowed:.4f}",
            "[green]yes[/]" if check.passed else "[red]no[/]",
        )
    return table
