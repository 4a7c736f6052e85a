"""`winback train`: validate the history, train, evaluate, log to MLflow, register, optionally promote.

The job, in order (CONTRACT.md section 1):

1. read and validate the history files; a bad file stops here, before MLflow is touched, so nothing is
   logged or registered;
2. train the bundle (models, feature spec, catalog version, metrics) with a time holdout, its features reading the
   error catalog a scorer serves with: the shipped one, plus the gateway status map overlay of
   ``WINBACK_GSM_OVERLAY`` when it is set (a copy of which is logged with the model, and named in the output);
3. evaluate it on that holdout (metrics tables, calibration, retryability by error class, OPE vs baselines);
4. with ``--promote``, also evaluate the current champion on the same holdout;
5. log one MLflow run (params, metrics, tables and plots as artifacts), log the bundle as the pyfunc of the
   registered model ``winback`` and point ``challenger`` at the new version;
6. with ``--promote``, run the promotion gate and move ``champion`` when it passes.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from model import evaluation as ev
from model.catalog import ErrorCatalog, load_catalog
from model.codelevel import CodeLevelsOverTime
from model.datafiles import DEMO_MERCHANTS_FILE
from model.gsm import GSM_OVERLAY_KEY, GsmError, GsmOverlaySetting, TrainingOverlay, describe_overlay
from model.history import (
    DEFAULT_PARTITION_ROWS,
    History,
    HistoryError,
    PartitionedHistory,
    ValidationReport,
    refuse_a_history_without_attempts,
    split_history,
)
from model.merchant_config import MerchantConfig
from model.requests import DecisionRequest
from model.rules import Candidate
from model.wording import count_noun
from pipelines.gate import (
    DEFAULT_POLICY_VALUE_MARGIN,
    GATE_METRICS,
    NON_INFERIORITY_LEVEL,
    GateMetric,
    GateResult,
    champion_fitted_on_holdout,
    compare,
    gate_table,
    paired_noise,
    same_judged_fit,
    with_policy_value_margin,
)
from pipelines.progress import Steps, shown_steps
from pipelines.tables import MISSING, figure, print_note, print_titled

__all__ = [
    "TrainInputError",
    "TrainSummary",
    "format_history_error",
    "run_training",
    "train_command",
    "usable_tracking_store",
]

#: Steps of the job, as shown in the progress bar (with the refit, one more after "evaluate").
_STEPS = ("validate history", "train", "evaluate", "log to MLflow", "register")
#: Where the boosters are fitted: in this process, or with lightgbm.dask on a Dask cluster (``pipelines.dask_train``).
ENGINES = ("local", "dask")
#: The holdout decision points a training run's evaluation replays at most (a seeded sample beyond): which 5,000 of a
#: 20,000-order simulation's 13,900 were drawn moved the gate's policy-value difference of two equal models by 0.10
#: USD a decision (SD; README, "The promotion gate's noise"), as much as its tolerance. `winback evaluate` keeps 5,000.
_EVALUATION_MAX_POINTS = 20_000
#: Tells the evaluation's random stream from training's, which the same ``--seed`` seeds (`evaluation_seed`).
_EVALUATION_STREAM = 0x6576616C  # "eval"


def evaluation_seed(seed: int) -> int:
    """The seed of a training run's evaluation (its holdout sample, the reward model's folds, the replayed policies'
    exploration): derived from the run's ``seed`` but not equal to it, so what the evaluation draws does not follow
    what training drew from the same seed (a champion and its challenger, both trained with the default seed, are
    judged on draws neither of them was fitted with)."""
    return int(np.random.SeedSequence([seed, _EVALUATION_STREAM]).generate_state(1)[0])


_DEMO_CONFIG = DEMO_MERCHANTS_FILE


class TrainInputError(ValueError):
    """The job's input is unusable (bad history, unknown option); nothing was logged or registered."""


@dataclass(frozen=True)
class TrainSummary:
    """What one `winback train` did."""

    run_id: str
    experiment_id: str
    version: str  # the new version of the registered model `winback` (alias challenger)
    tracking_uri: str
    metrics: Mapping[str, float]
    champion_version: str | None  # where `champion` points after the job
    gate: GateResult | None = None  # only with promote=True
    artifacts: tuple[str, ...] = field(default_factory=tuple)
    #: Error codes the history retried after that this version has no training support for (``connector/code``,
    #: most retried first): all their retries fall in the time holdout, which the boosters are not fitted on.
    codes_not_learned: tuple[str, ...] = ()
    #: The gateway status map overlay the version was trained with (``WINBACK_GSM_OVERLAY``), None without one.
    gsm_overlay: TrainingOverlay | None = None

    @property
    def promoted(self) -> bool:
        """True when this job moved `champion` to its version."""
        return self.gate is not None and self.gate.promote


def format_history_error(error: HistoryError, limit: int = 5) -> str:
    """A one-line reason for a bad history: the count and the first ``limit`` problems (row, column, why)."""
    report = error.report
    shown = [problem.format() for problem in report.problems[:limit]]
    noun = "problem" if report.total == 1 else "problems"
    line = f"invalid history: {report.total} {noun}: " + "; ".join(shown)
    if report.total > len(shown):
        line += f"; ... and {report.total - len(shown)} more"
    return line


def print_history_warnings(out: Console, report: ValidationReport, limit: int = 10) -> None:
    """The history's warnings (values read other than as written, or worth a look; `History.warnings`), one line
    each, the first ``limit`` of them and a count of the rest."""
    for problem in report.problems[:limit]:
        print_note(out, problem.format(), "warning:")
    if report.total > min(limit, len(report.problems)):
        print_note(out, f"... and {report.total - min(limit, len(report.problems))} more", "warning:")


def _progress(console: Console, show: bool, total: int) -> AbstractContextManager[Steps]:
    """The job's steps: a bar that erases itself when done in a terminal, ``training step N/M: <step>`` lines
    elsewhere (a log, a pipe, a dumb terminal)."""
    columns = (
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    return shown_steps(console, show, "training step", total, columns, first=_STEPS[0])


def _scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries of a metrics mapping, with MLflow-safe names."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        number = float(value)
        if math.isfinite(number):
            out[str(name).replace("@", "_at_").replace(" ", "_")] = number
    return out


def _params(values: Mapping[str, Any]) -> dict[str, str]:
    # MLflow keeps params as strings of at most 6000 characters.
    return {
        str(key): (value if isinstance(value, str) else json.dumps(value, default=str))[:6000]
        for key, value in values.items()
    }


def _write_tables(tables: Mapping[str, pd.DataFrame], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, table in tables.items():
        path = folder / f"{name}.csv"
        table.to_csv(path, index=not isinstance(table.index, pd.RangeIndex))
        paths.append(path)
    return paths


def _metrics_table(metrics: Mapping[str, float]) -> Table:
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in sorted(metrics.items()):
        table.add_row(name, figure(value, ".4f"))
    return table


def print_gate(out: Console, gate: GateResult) -> None:
    """The gate's table, its legend and verdict wrapped at its width like the rest of it; or the verdict alone
    (no champion, nothing compared) as one line, for the terminal to wrap."""
    if gate.checks:
        out.print(gate_table(gate), highlight=False)
    else:
        print_note(out, gate.verdict)


#: Why a holdout metric can be missing ("-" in its table), said under the table.
_WHY_MISSING: dict[str, str] = {
    "policy_value_dr": "no holdout decision point has a logged propensity, and the gate's policy value weighs the "
    "logged outcomes by it",
}


def missing_metrics_note(metrics: Mapping[str, float]) -> str | None:
    """One line on the metrics a table shows as "-" and why (None when none is missing)."""
    missing = [name for name, value in sorted(metrics.items()) if figure(value) == MISSING]
    reasons = (f"{name} is - because {_WHY_MISSING.get(name, 'this holdout has no points for it')}" for name in missing)
    return "; ".join(reasons) or None


CHALLENGER_NAME = "challenger"
CHAMPION_NAME = "champion"
#: The DR estimator of the evaluation under each model's reward model: the evaluation's first scorer is the
#: challenger (`_evaluate`), so ``dr`` is under its reward model and ``dr@champion`` under the champion's.
REWARD_MODEL_ESTIMATORS: dict[str, str] = {CHALLENGER_NAME: "dr", CHAMPION_NAME: f"dr@{CHAMPION_NAME}"}
#: The weight clip of the gate's policy value (the evaluation's tables keep theirs, ``ev.DEFAULT_MAX_WEIGHT``).
GATE_DR_MAX_WEIGHT = 10.0


#: The DR estimator the gate values both models with: under the holdout's cross-fitted reward model
#: (`model.evaluation.crossfit_reward_model`), which neither model's decisions came from.
GATE_ESTIMATOR = f"dr@{ev.HOLDOUT_REWARD_MODEL}"


def _gate_dr_terms(summary: Any, name: str) -> Any:
    """The per-point terms of the gate's policy value of model ``name`` (`pipelines.gate`): its DR under the
    holdout's cross-fitted reward model (``GATE_ESTIMATOR``), clipped at ``GATE_DR_MAX_WEIGHT``; None when the
    evaluation has no such estimate (no such policy, no point with a logged propensity)."""
    replayed = summary.replayed
    if not len(summary.ope_points) or name not in set(replayed.get("policy", ())):
        return None
    if GATE_ESTIMATOR not in ev.reward_model_columns(replayed):
        return None
    return ev.policy_dr_terms(summary.ope_points, replayed, name, GATE_ESTIMATOR, max_weight=GATE_DR_MAX_WEIGHT)


def gate_dr_noise(summary: Any) -> float:
    """The standard error of the challenger's gate policy value minus the champion's: both under the same reward
    model, on the same points, paired, each order's points as one draw (the reward model is cross-fitted by order);
    with the reward model's fit noise added in variance when the evaluation fitted it on resamples of the holdout's
    orders (`model.evaluation.fit_noise_models`): the standard deviation of the difference across those fits. The
    paired standard error alone sees which points were drawn, not that the reward model was fitted on them."""
    terms = [_gate_dr_terms(summary, name) for name in (CHALLENGER_NAME, CHAMPION_NAME)]
    if terms[0] is None or terms[1] is None:
        return math.nan
    points = summary.ope_points
    orders = points["merchant_id"].astype(str) + "/" + points["order_id"].astype(str)
    sampling = ev.paired_standard_error(terms[0], terms[1], groups=orders)
    return math.sqrt(sampling**2 + fit_noise_variance(summary))


def fit_noise_variance(summary: Any) -> float:
    """The variance of the gate's challenger-minus-champion difference across the holdout reward models fitted on
    resamples of its orders (0 without two of them)."""
    replayed = summary.replayed
    differences = []
    for estimator in ev.reward_model_columns(replayed):
        if not ev.is_fit_noise_estimator(estimator):
            continue
        challenger, champion = (
            ev.policy_dr_terms(summary.ope_points, replayed, name, estimator, max_weight=GATE_DR_MAX_WEIGHT)
            for name in (CHALLENGER_NAME, CHAMPION_NAME)
        )
        differences.append(float(challenger.mean() - champion.mean()))
    return float(np.var(differences, ddof=1)) if len(differences) > 1 else 0.0


def merchants_for(attempts: pd.DataFrame, config_path: str | Path | None = None) -> dict[str, MerchantConfig]:
    """Merchant configs for replaying policies over a history: from the config file (default: the shipped
    demo config, when present), and for any other merchant of the history a permissive default whose
    pecking order is its connectors by number of attempts. ``attempts`` is the attempts frame, or its
    :func:`connector_counts`."""
    from model.merchant_config import load_config

    path = Path(config_path) if config_path is not None else _DEMO_CONFIG
    merchants: dict[str, MerchantConfig] = {}
    if config_path is not None or path.is_file():
        merchants.update(load_config(path).merchants)
    counts = attempts if "attempts" in attempts.columns else connector_counts(attempts)
    for merchant_id, part in counts.groupby("merchant_id", sort=True, observed=True):
        if str(merchant_id) in merchants:
            continue
        ranked = part.groupby("connector", observed=True)["attempts"].sum().sort_values(ascending=False, kind="stable")
        merchants[str(merchant_id)] = MerchantConfig(api_key_sha256="0" * 64, connectors=[str(c) for c in ranked.index])
    return merchants


def connector_counts(attempts: pd.DataFrame) -> pd.DataFrame:
    """Attempts per (merchant_id, connector) of an attempts frame: columns merchant_id, connector, attempts."""
    return (
        attempts.groupby(["merchant_id", "connector"], sort=False, observed=True)
        .size()
        .rename("attempts")
        .reset_index()
    )


def feature_importance(bundle: Any) -> pd.DataFrame:
    """Gain of each feature in the bundle's boosters (columns ``model``, ``feature``, ``gain``)."""
    frames = []
    for model_name in ("retry", "retarget"):
        booster = getattr(bundle, f"{model_name}_booster", None)
        if booster is None:
            continue
        frames.append(
            pd.DataFrame(
                {
                    "model": model_name,
                    "feature": booster.feature_name(),
                    "gain": booster.feature_importance(importance_type="gain"),
                }
            )
        )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["model", "feature", "gain"])


def gate_metrics(summary: Any, name: str) -> dict[str, float]:
    """The promotion gate's metrics of model ``name`` from an evaluation summary (NaN where absent)."""
    out: dict[str, float] = {}
    table = summary.classification
    for kind in ("retry", "retarget"):
        row = table[(table["model"] == name) & (table["breakdown"] == "action") & (table["group"] == kind)]
        out[f"{kind}_log_loss"] = float(row["log_loss"].iloc[0]) if len(row) else math.nan
        out[f"{kind}_auc"] = float(row["auc"].iloc[0]) if len(row) else math.nan
    terms = _gate_dr_terms(summary, name)
    out["policy_value_dr"] = math.nan if terms is None or not len(terms) else float(terms.mean())
    return out


def codes_not_learned(parts: PartitionedHistory, bundle: Any) -> list[tuple[str, str, int]]:
    """(connector, code, silent retries) of each error code the history retried after and ``bundle`` has no
    training support for (``bundle.code_support`` 0), most retried first.

    Training keeps the newest decision points out of the boosters (time holdout, see ``model.training``), so a
    code that appeared only recently is in the history and still not learned by the version trained on it.
    """
    from model.vocab import RETRY_STRATEGIES

    retry = [strategy.value for strategy in RETRY_STRATEGIES]
    counts: Counter[tuple[str, str]] = Counter()
    columns = ("order_id", "attempt_number", "connector", "strategy", "status", "error_code")
    for index in range(len(parts)):
        attempts = parts.columns(index, columns, ("order_id",))[0]
        attempts = attempts.sort_values(["order_id", "attempt_number"], kind="mergesort")
        before = attempts.groupby("order_id", sort=False)[["connector", "status", "error_code"]].shift(1)
        after_failure = (
            attempts["strategy"].isin(retry).to_numpy(dtype=bool)
            & (before["status"] == "failure").fillna(False).to_numpy(dtype=bool)
            & before["error_code"].notna().to_numpy(dtype=bool)
        )
        counts.update(
            zip(
                before.loc[after_failure, "connector"].astype(str),
                before.loc[after_failure, "error_code"].astype(str),
                strict=True,
            )
        )
    return sorted(
        ((connector, code, n) for (connector, code), n in counts.items() if bundle.code_support(connector, code) == 0),
        key=lambda row: (-row[2], row[0], row[1]),
    )


def with_code_levels(bundle: Any, parts: Any, *, catalog: Any = None) -> None:
    """Give ``bundle`` its code levels (model.codelevel) over every silent retry of ``parts``, scored with
    ``catalog`` (default: the bundle's). They change its scores: the caller gives it the version that goes with them.
    (The fit the gate judges gets those of the history before its holdout: ``ForwardLevelsScorer.judging``.)"""
    from model.policy import PolicyConfig
    from model.training import code_levels

    strength = PolicyConfig().prior_strength
    normaliser = bundle.catalog if catalog is None else catalog
    _set_code_levels(bundle, code_levels(bundle, parts, normaliser, prior_strength=strength), strength)


def _set_code_levels(bundle: Any, rows: list[list[Any]], strength: float) -> None:
    from model.codelevel import CODE_LEVEL_KEY, CODE_LEVEL_PRIOR_STRENGTH_KEY

    bundle.metadata[CODE_LEVEL_KEY] = rows
    bundle.metadata[CODE_LEVEL_PRIOR_STRENGTH_KEY] = strength


class ForwardLevelsScorer:
    """The judged challenger as the gate values it: at each request, with its code levels as they stood at the
    request's time (`model.training.judged_code_levels`): the retries carried out before it, the holdout's earlier
    ones too, never the request's own outcome or a later one.

    The version registered has code levels over the whole history, the holdout's too (``refitted``), so a code that
    connectors started sending recently is learned there while every one of its retries sits in the holdout. Judged
    with the levels of the history before the holdout alone, such a retrain was judged blind to the code it learned,
    and the gate compared two fits blind to it: its verdict was their calibrators' noise."""

    def __init__(self, bundle: Any, levels: CodeLevelsOverTime) -> None:
        self.bundle = bundle
        self.levels = levels

    @classmethod
    def judging(cls, bundle: Any, parts: Any, *, before: datetime) -> ForwardLevelsScorer:
        """Give ``bundle`` the code levels of the silent retries of ``parts`` decided before ``before`` (its
        holdout's start), and the scorer that judges it with them as they stood at each request's time: both from one
        scoring of the retries (`model.training.judged_code_levels`; the bundle's catalog, the default
        ``PolicyConfig.prior_strength``). The bundle carries the former because decide() serves code levels, so the
        gate's policy values must see them, and must not see the holdout's outcomes through them (judged without
        them, a challenger's code levels never counted in the gate). They change its scores: the caller gives it the
        version that goes with them."""
        from model.policy import PolicyConfig
        from model.training import judged_code_levels

        strength = PolicyConfig().prior_strength
        rows, over_time = judged_code_levels(bundle, parts, bundle.catalog, before=before, prior_strength=strength)
        _set_code_levels(bundle, rows, strength)
        return cls(bundle, over_time)

    @property
    def version(self) -> str:
        return str(self.bundle.version)

    @property
    def retryable_threshold(self) -> float:
        return float(self.bundle.retryable_threshold)

    def for_request(self, request: DecisionRequest) -> _LevelsAt:
        """The bundle with the code levels of ``request``'s time (`model.policy.scorer_for`)."""
        return _LevelsAt(self.bundle, self.levels, pd.Timestamp(request.event_time).value)

    def score(self, request: DecisionRequest, candidates: list[Candidate]) -> np.ndarray:
        return np.asarray(self.bundle.score(request, candidates), dtype=np.float64)

    def explain(self, request: DecisionRequest, candidate: Candidate, k: int = 3) -> list[str]:
        return list(self.bundle.explain(request, candidate, k=k))


class _LevelsAt:
    """A bundle answering with the code levels of one moment (``ForwardLevelsScorer.for_request``); everything else
    is the bundle's."""

    def __init__(self, bundle: Any, levels: CodeLevelsOverTime, moment_ns: int) -> None:
        self._bundle = bundle
        self._levels = levels
        self._moment_ns = moment_ns

    def code_level(self, connector: str, code: str | None) -> tuple[float, float, float]:
        return self._levels.of_code_at(connector, code, self._moment_ns)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bundle, name)


def refitted(judged: Any, refit: Any, parts: Any = None) -> Any:
    """The version to register: ``judged`` (the boosters, calibrators and threshold the gate judged), with the text
    model and the code inventory of ``refit`` (fitted on every decision point, the holdout's too), and, given the
    history's ``parts``, the code levels of that version over the whole history (model.codelevel).

    A recent error code's retries all sit in the holdout; what tells the boosters about a code they never saw is
    the text model's estimate for it (their features), so refitting that is what learns the code. The boosters
    themselves stay as judged: refit too, their calibration and threshold were re-estimated on one slice and never
    measured (review: threshold 0.267 became 0.207 and out-of-time ECE 0.033 became 0.097 on a 50,000-order
    history; judged boosters with the refit text model separated two recent codes as well as a full refit).

    The boosters make little use of the text features, though (unseen-code AUC 0.668 with them, 0.672 without, on
    that history): a recent code's served P(success) barely moved. Its level is learned by the code levels: per
    (connector, error code), the silent retries after it in the whole history, their successes and what this
    version serves for them; decide() rescales the code's retry candidates by them, shrunk by their evidence."""
    from model.bundle import ModelBundle
    from model.codelevel import CODE_LEVEL_KEY
    from model.codewatch import KNOWN_CODES_KEY

    text_digest = hashlib.sha256(pickle.dumps(refit.text_model, protocol=pickle.HIGHEST_PROTOCOL)).hexdigest()[:8]
    registered = ModelBundle(
        spec=judged.spec,
        text_model=refit.text_model,
        retry_booster=judged.retry_booster,
        retarget_booster=judged.retarget_booster,
        retry_calibrator=judged.retry_calibrator,
        retarget_calibrator=judged.retarget_calibrator,
        retryable_threshold=judged.retryable_threshold,
        metrics=dict(judged.metrics),
        catalog_version=judged.catalog_version,
        metadata={
            **judged.metadata,
            KNOWN_CODES_KEY: refit.metadata[KNOWN_CODES_KEY],
            "text_refit": True,
            "text_trained_to": refit.metadata["trained_to"],
            "judged_bundle_version": judged.version,
        },
        version=f"{judged.version}-t{text_digest}",  # the text model changes scores: its own version
    )
    if parts is not None:
        with_code_levels(registered, parts, catalog=judged.catalog)
        # The code levels change scores too (and depend on the history, not only on the text model).
        digest = hashlib.sha256(json.dumps(registered.metadata[CODE_LEVEL_KEY]).encode("utf-8"))
        digest.update(text_digest.encode("ascii"))
        registered.version = f"{judged.version}-t{digest.hexdigest()[:8]}"
    return registered


def _holdout_start(result: Any) -> datetime | None:
    splits = result.tables.get("splits")
    if splits is None:
        return None
    row = splits[splits["split"] == "holdout"]
    if row.empty or pd.isna(row["from"].iloc[0]):
        return None
    return pd.Timestamp(row["from"].iloc[0]).floor("us").to_pydatetime()


def comparison_policies(
    merchants: Mapping[str, MerchantConfig],
    models: Mapping[str, Any],
    *,
    seed: int,
    logging_epsilon: float = 0.15,
    catalog: ErrorCatalog | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The policies every evaluation compares, and the scorers among them (name -> model).

    Each model (``None`` = rules-only priors) is served through the one ``decide()``; beside them: the
    rules-only policy, the two rule baselines of the issue (a gateway-status-map style cascade, and that rule
    plus fixed-cadence retargeting) and the simulator's logging policy (the latter with its exploration). Their
    rules read ``catalog`` (default: the shipped one).
    """
    from model.baselines import RuleBook, StaticRetryPolicy, StaticRetryThenRetargetPolicy
    from model.policy import DecidePolicy
    from model.simulation.logging_policy import EpsilonGreedyLoggingPolicy

    catalog = load_catalog() if catalog is None else catalog
    policies: dict[str, Any] = {
        name: DecidePolicy(dict(merchants), model, catalog, seed=seed) for name, model in models.items()
    }
    scorers = {name: model for name, model in models.items() if model is not None}
    if "rules-only" not in policies:
        policies["rules-only"] = DecidePolicy(dict(merchants), None, catalog, seed=seed)
    policies["static_retry"] = StaticRetryPolicy(merchants, catalog)
    policies["static_retry_then_retarget"] = StaticRetryThenRetargetPolicy(merchants, catalog)
    policies["logging"] = EpsilonGreedyLoggingPolicy(RuleBook(merchants, catalog), epsilon=logging_epsilon, seed=seed)
    return policies, scorers


def _partition_counts(parts: PartitionedHistory) -> pd.DataFrame:
    frames = [
        connector_counts(parts.columns(index, ("merchant_id", "connector"), ("order_id",))[0])
        for index in range(len(parts))
    ]
    counts: pd.DataFrame = (
        pd.concat(frames, ignore_index=True).groupby(["merchant_id", "connector"])["attempts"].sum().reset_index()
    )
    return counts


def holdout_sample(parts: PartitionedHistory, holdout_start: datetime | None, size: int | None, seed: int) -> History:
    """A seeded sample of ``size`` orders that can have decision points in the holdout, as frames.

    What the evaluation replays of a partitioned history (it replays at most ``size`` orders anyway); all
    orders when ``size`` is None, every order when the holdout start is unknown.
    """
    from model.evaluation import orders_active_since
    from model.vocab import NUDGE_FOLLOW_UP_HOURS

    follow_up = pd.Timedelta(hours=NUDGE_FOLLOW_UP_HOURS)
    eligible: list[str] = []
    for index in range(len(parts)):
        attempts, nudges = parts.columns(index, ("order_id", "created_at"), ("order_id", "sent_at"))
        if holdout_start is None:
            eligible.extend(attempts["order_id"].astype(str).unique().tolist())
        else:
            cut = pd.Timestamp(holdout_start)
            cut = cut.tz_localize("UTC") if cut.tzinfo is None else cut.tz_convert("UTC")
            eligible.extend(orders_active_since(attempts, nudges, cut, follow_up))
    chosen = pd.Series(sorted(eligible), dtype=object)
    if size is not None and len(chosen) > size:
        chosen = chosen.sample(n=size, random_state=seed)
    return parts.orders(chosen.tolist())


def _evaluate(
    attempts: str | Path,
    nudges: str | Path,
    out_dir: Path,
    *,
    result: Any,
    history: Any,
    history_orders: int | None,
    champion: tuple[Any, str] | None,
    merchants: Mapping[str, MerchantConfig],
    seed: int,
    options: Mapping[str, Any],
    catalog: ErrorCatalog,
    challenger: Any = None,
) -> _Evaluation:
    """Evaluate the challenger (and the champion, when given) on the challenger's time holdout, the rules and the
    models' features reading ``catalog`` (the one the challenger was trained with). ``challenger`` is the model the
    challenger is judged as (default: ``result.bundle``; `ForwardLevelsScorer` when it has a holdout)."""
    from pipelines.evaluate import evaluate

    models: dict[str, Any] = {CHALLENGER_NAME: result.bundle if challenger is None else challenger}
    if champion is not None:
        models[CHAMPION_NAME] = champion[0]
    policies, scorers = comparison_policies(merchants, models, seed=seed, catalog=catalog)
    importance = feature_importance(result.bundle)
    summary = evaluate(
        attempts,
        nudges,
        out_dir,
        policies,
        scorers=scorers,
        feature_importance=importance,
        holdout_start=_holdout_start(result),
        seed=seed,
        history=history,
        history_orders=history_orders,
        catalog=catalog,
        **dict(options),
    )
    metrics = _scalar_metrics(result.metrics)
    metrics.update(_scalar_metrics({f"holdout.{k}": v for k, v in summary.metrics.items()}))
    challenger_gate = gate_metrics(summary, CHALLENGER_NAME)
    metrics.update(_scalar_metrics({f"gate.{k}": v for k, v in challenger_gate.items()}))
    tables = {f"training_{name}": table for name, table in result.tables.items()}
    tables["feature_importance"] = importance
    examples = tuple(_example_requests(history, limit=2))
    noise = None
    if champion is not None and {CHALLENGER_NAME, CHAMPION_NAME} <= set(summary.predictions):
        noise = paired_noise(
            summary.labels,
            summary.logged_actions,
            summary.predictions[CHALLENGER_NAME],
            summary.predictions[CHAMPION_NAME],
            seed=seed,
        )
        noise["policy_value_dr"] = gate_dr_noise(summary)
    return _Evaluation(
        metrics=metrics,
        gate_metrics=challenger_gate,
        champion_gate_metrics=None if champion is None else gate_metrics(summary, CHAMPION_NAME),
        gate_noise=noise,
        tables=tables,
        files=tuple(summary.files),
        example_requests=examples,
        stops_note=summary.stops_note,
    )


def _example_requests(history: Any, limit: int) -> list[str]:
    """Decision requests at the first failures of the history, as JSON (the pyfunc's input example)."""
    from model.training import decision_points, request_at

    orders = history.attempts["order_id"].drop_duplicates().head(20)
    attempts = history.attempts[history.attempts["order_id"].isin(orders)]
    nudges = history.nudges[history.nudges["order_id"].isin(orders)]
    points = decision_points(attempts, nudges)
    out = []
    for position in range(min(limit, len(points))):
        request, _ = request_at(attempts, nudges, {str(k): v for k, v in points.iloc[position].items()})
        out.append(request.model_dump_json())
    return out


@dataclass(frozen=True)
class _Evaluation:
    """The challenger's holdout evaluation: scalar metrics, the gate's subset, tables, plots, examples."""

    metrics: dict[str, float]
    gate_metrics: dict[str, float]
    champion_gate_metrics: dict[str, float] | None
    gate_noise: dict[str, float] | None  # standard errors of the paired challenger-champion differences
    tables: dict[str, pd.DataFrame]
    files: tuple[Path, ...]  # written by the evaluation: report, CSVs, PNGs
    example_requests: tuple[str, ...]  # decision request JSON, for the pyfunc's input example
    stops_note: str | None = None  # what the OPE leaves out for want of logged stops (pipelines.evaluate.stops_note)


@dataclass(frozen=True)
class _Logged:
    run_id: str
    experiment_id: str
    tracking_uri: str
    bundle_dir: Path
    input_example: pd.DataFrame | None
    model_metadata: dict[str, Any]
    artifacts: tuple[str, ...]


def _log_run(
    registry: Any,
    work: Path,
    *,
    bundle: Any,
    judged: Any | None,
    evaluation: _Evaluation,
    champion: tuple[Any, str] | None,
    gate: GateResult | None,
    params: Mapping[str, Any],
    tracking_uri: str,
) -> _Logged:
    import mlflow

    experiment_id = registry.ensure_experiment(tracking_uri)
    bundle_dir = work / "bundle"
    bundle.save(bundle_dir)
    table_paths = _write_tables(evaluation.tables, work / "tables")
    bundle_params = {"bundle_version": bundle.version, "catalog_version": bundle.catalog_version}
    metrics = dict(evaluation.metrics)
    if evaluation.champion_gate_metrics is not None:
        metrics.update(_scalar_metrics({f"champion.{k}": v for k, v in evaluation.champion_gate_metrics.items()}))
    artifacts: list[str] = []
    with registry.tracking(tracking_uri), mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_params(_params({**params, **bundle_params}))
        mlflow.log_metrics(metrics)
        mlflow.log_dict(evaluation.gate_metrics, "evaluation/gate_metrics.json")
        artifacts.append("evaluation/gate_metrics.json")
        for path in [*table_paths, *evaluation.files]:
            folder = "plots" if path.suffix == ".png" else "evaluation"
            mlflow.log_artifact(str(path), artifact_path=folder)
            artifacts.append(f"{folder}/{path.name}")
        if judged is not None:  # what the gate judged, for the next gate (``registry.load_judged``)
            judged.save(work / registry.JUDGED_ARTIFACT)
            mlflow.log_artifacts(str(work / registry.JUDGED_ARTIFACT), artifact_path=registry.JUDGED_ARTIFACT)
            artifacts.append(registry.JUDGED_ARTIFACT)
        tags = {"winback.bundle_version": bundle.version, "winback.catalog_version": bundle.catalog_version}
        if gate is not None:
            tags["winback.gate"] = "promote" if gate.promote else "keep"
            tags["winback.gate_reasons"] = "; ".join(gate.reasons)[:5000]
            if gate.caveats:
                tags["winback.gate_caveats"] = "; ".join(gate.caveats)[:5000]
            if champion is not None:
                tags["winback.gate_champion_version"] = champion[1]
            for check in gate.checks:
                if check.metric.non_inferiority:  # the rule the verdict's policy value was held to
                    tags[f"winback.gate_{check.metric.name}_margin"] = f"{check.metric.tolerance:g}"
                    tags["winback.gate_non_inferiority_level"] = f"{NON_INFERIORITY_LEVEL:g}"
        mlflow.set_tags(tags)
        run_id = run.info.run_id
    example = pd.DataFrame({"request": list(evaluation.example_requests)}) if evaluation.example_requests else None
    metadata: dict[str, Any] = {**bundle_params, "holdout_gate_metrics": evaluation.gate_metrics}
    return _Logged(run_id, experiment_id, tracking_uri, bundle_dir, example, metadata, tuple(artifacts))


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """For a SQLite store, one process at a time (a lock on its folder). MLflow creates a new store's tables on
    first use without a lock of its own, and of two trainings started together on a fresh store the second died
    in that creation ('table datasets already exists', 'No such constraint') with a traceback. The promotion's
    check-and-move of ``champion`` holds it too (``_promote``)."""
    import fcntl
    import os

    prefix = "sqlite:///"  # resolve_tracking_uri spells a SQLite store as this and an absolute path
    if not uri.startswith(prefix) or uri == f"{prefix}:memory:":
        yield
        return
    db_path = Path(uri[len(prefix) :])
    folder = os.open(db_path.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        yield
    finally:
        os.close(folder)  # closing the descriptor releases the lock


def _promote(registry: Any, gate: GateResult, version: str, judged_against: str | None, uri: str) -> GateResult:
    """Move ``champion`` to ``version``, which the gate passed against ``judged_against``, unless another run moved
    it meanwhile: two trainings promoting at once each judged against the old champion, and the last to move the
    alias won, never compared with the other. The gate's result, changed to a keep when the champion moved.

    The check and the move hold the store's lock (``_store_lock``: SQLite stores); with a tracking server, two
    runs can still both pass the check in the moment between it and the move."""
    with _store_lock(uri):
        now = registry.get_alias_version(registry.CHAMPION, tracking_uri=uri)
        if now == judged_against or now is None:  # unchanged, or removed: nothing to compare with
            registry.set_alias(registry.CHAMPION, version, tracking_uri=uri)
            return gate
    moved = (
        f"champion moved to version {now} during this run, which judged version {version} against "
        f"{'no champion' if judged_against is None else f'version {judged_against}'}: run the gate again "
        "(winback train --promote, or winback retrain) to compare the two"
    )
    return replace(gate, promote=False, champion_version=now, reasons=(moved,))


def usable_tracking_store(tracking_uri: str | None) -> str:
    """The resolved tracking URI, once its store answered (the experiment is created when new); `TrainInputError`
    with a one-line reason when it cannot be used (unreachable server or database, unknown scheme, unwritable
    folder). MLflow retries an unreachable server for some minutes first, as it would later in the job."""
    import os

    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    from model import registry
    from model.registry_client import RegistryError, unusable_store

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or registry.DEFAULT_TRACKING_URI
    try:
        uri = registry.resolve_tracking_uri(tracking_uri)
        with _store_lock(uri):
            registry.ensure_experiment(uri)
    except RegistryError as exc:  # a store this install cannot use (a missing driver): already the one line
        raise TrainInputError(str(exc)) from exc
    except (MlflowException, SQLAlchemyError, OSError) as exc:
        raise TrainInputError(unusable_store(uri, exc)) from exc
    return uri


def resolve_stops(attempts: str | Path, stops: str | Path | None) -> Path | None:
    """The stops file of a history: ``stops`` when given, else ``stops.parquet``/``stops.csv`` beside the attempts
    file when there is one (``model.history.stops_beside``; the simulator and ``winback history export`` write it
    there), else None: the history then says nothing of its logged stops."""
    from model.history import stops_beside

    return Path(stops) if stops is not None else stops_beside(attempts)


def history_params(attempts: str | Path, nudges: str | Path, stops: str | Path | None) -> dict[str, str]:
    """The run params naming the history files a run learned from (``stops_path`` "none" without a stops file).

    Absolute: a run read later, from another folder, names the files it learned from.
    """
    return {
        "attempts_path": str(Path(attempts).resolve()),
        "nudges_path": str(Path(nudges).resolve()),
        "stops_path": "none" if stops is None else str(Path(stops).resolve()),
    }


def training_catalog(folder: Path) -> tuple[TrainingOverlay | None, ErrorCatalog]:
    """The gateway status map overlay a training run reads (``WINBACK_GSM_OVERLAY``, as a scorer reads it; copied
    into ``folder``) and the error catalog its features read: the shipped one, with that overlay when one is set.
    A scorer serving with the same overlay then classifies every code as training did. `TrainInputError` names an
    overlay that cannot be read (before any work)."""
    configured = GsmOverlaySetting().gsm_overlay
    if configured is None:
        return None, load_catalog()
    try:
        overlay = TrainingOverlay.snapshot(configured, folder / "gsm_overlay")
        return overlay, overlay.catalog()
    except (GsmError, OSError) as exc:
        raise TrainInputError(f"WINBACK_GSM_OVERLAY: {exc}") from exc


def overlay_note(overlay: TrainingOverlay | None, catalog: ErrorCatalog) -> str:
    """The line of the job's output saying which overlay the version was trained with, or that it had none."""
    with_overlay = "no gateway status map overlay (WINBACK_GSM_OVERLAY is not set)"
    if overlay is not None:
        with_overlay = describe_overlay(overlay.recorded())
    return f"trained with error catalog {catalog.version} and {with_overlay}"


def run_training(
    attempts: str | Path,
    nudges: str | Path,
    *,
    stops: str | Path | None = None,
    tracking_uri: str | None = None,
    promote: bool = False,
    seed: int = 0,
    config: str | Path | None = None,
    train_options: Mapping[str, Any] | None = None,
    evaluation_options: Mapping[str, Any] | None = None,
    console: Console | None = None,
    show_progress: bool = True,
    gate_metrics: tuple[GateMetric, ...] = GATE_METRICS,
    engine: str = "local",
    scheduler: str | None = None,
    partition_rows: int = DEFAULT_PARTITION_ROWS,
    refit: bool = True,
    run_params: Mapping[str, Any] | None = None,
    history_warnings: bool = True,
) -> TrainSummary:
    """Run the whole training job (see the module docstring) and return what it did.

    Raises `TrainInputError` when the history is unusable; then MLflow was not touched. ``config`` is the
    merchant config used to replay policies in the evaluation (default: the shipped demo config, plus a
    permissive default for merchants it lacks). ``train_options`` go to `model.training.train` (e.g.
    ``max_rounds``), ``evaluation_options`` to `pipelines.evaluate.evaluate` (e.g. ``max_points``).
    ``gate_metrics`` are the promotion gate's checks (default: all of ``pipelines.gate.GATE_METRICS``).
    Histories of more than ``partition_rows`` attempts are validated and trained on in partitions of whole
    orders (`model.history.split_history`, `model.training.train_partitions`), so memory grows with the model
    matrix, not with the history's text; the evaluation then replays a seeded sample of the holdout's orders.
    ``engine="dask"`` fits the boosters with ``lightgbm.dask`` on the Dask scheduler at ``scheduler``
    (``pipelines.dask_train``); everything else runs here as with ``engine="local"``.

    With ``refit`` (the default), the version registered is the judged fit with its text model and code inventory
    fitted again, once judged, on every decision point of the history, the holdout's too (``refitted``): an error
    code that connectors started sending recently is learned by the retrain that first sees it, not one holdout
    later. Its boosters, calibrators, threshold and metrics are the judged fit's. The judged fit itself is kept in
    the run (``registry.JUDGED_ARTIFACT``), and a later gate judges a challenger against the champion's judged fit:
    the champion's text model was fitted on the older part of the new history's holdout.

    ``run_params`` are logged with the run's own params, and win over them: a caller that trains on a file it
    derived (``winback retrain --window-days``) names the history it came from and how; such a caller prints the
    warnings of the files it read itself and passes ``history_warnings=False`` (the derived file's would name a
    temporary file, and lose what its writing normalised, e.g. a clicked nudge marked undelivered).

    ``stops`` is the history's stops file (the logging policy's stop decisions; `resolve_stops` finds the one
    beside the attempts file): the evaluation's off-policy estimates, and so the gate's policy value, count the
    points where it stopped. Without one they cannot, and the job says so once.
    """
    from model import registry
    from model.bundle import bundle_version
    from model.training import InsufficientHistoryError, fit_retryable_threshold, train_partitions
    from pipelines.dask_train import DaskUnavailableError  # dask itself is imported only to connect

    if engine not in ENGINES:
        raise TrainInputError(f"unknown training engine {engine!r}: use one of {', '.join(ENGINES)}")
    if engine == "dask" and not scheduler:
        raise TrainInputError("--engine dask needs --scheduler, the address of a Dask scheduler (tcp://host:8786)")
    if engine == "local" and scheduler:
        raise TrainInputError("--scheduler is only used with --engine dask")
    try:  # a header-only history made an empty MLflow store before failing for want of retries
        refuse_a_history_without_attempts(attempts, nudges, stops)
    except HistoryError as exc:
        raise TrainInputError(format_history_error(exc)) from exc
    if config is not None:  # checked before any work: a bad config used to fail after training, with a traceback
        from model.merchant_config import ConfigError, load_config

        try:
            load_config(config)
        except ConfigError as exc:
            raise TrainInputError(str(exc)) from exc
    out = console or Console()
    options = dict(train_options or {})
    with (
        _progress(out, show_progress, len(_STEPS) + (1 if refit else 0)) as steps,
        tempfile.TemporaryDirectory(prefix="winback-train-") as tmp,
    ):
        work = Path(tmp)
        overlay, catalog = training_catalog(work)
        steps.start("validate history")
        try:
            parts = split_history(
                attempts,
                nudges,
                work / "history",
                partition_rows=partition_rows,
                workers=options.get("workers", 1),
                stops_path=stops,
            )
        except HistoryError as exc:
            raise TrainInputError(format_history_error(exc)) from exc
        if history_warnings:
            print_history_warnings(out, parts.warnings)
        # One partition stays in memory as frames; more are read back one at a time.
        whole = parts.part(0) if len(parts) == 1 else None
        frames: PartitionedHistory | list[History] = [whole] if whole is not None else parts
        # Before the hours of training a large history takes, which a store nobody can reach would throw away.
        uri = usable_tracking_store(tracking_uri)
        steps.done()

        def fitted(**more: Any) -> Any:
            try:
                if engine == "dask":
                    from pipelines.dask_train import DaskBoosterFitter, connect

                    assert scheduler is not None  # checked above
                    with connect(scheduler) as client:
                        return train_partitions(
                            frames,
                            seed=seed,
                            fit_booster=DaskBoosterFitter(client),
                            catalog=catalog,
                            **(options | more),
                        )
                return train_partitions(frames, seed=seed, catalog=catalog, **(options | more))
            except (InsufficientHistoryError, DaskUnavailableError) as exc:
                raise TrainInputError(str(exc)) from exc

        steps.start("train")
        result = fitted()
        # Which overlay the features read travels with the model (its copy is logged with the pyfunc).
        result.bundle.metadata[GSM_OVERLAY_KEY] = None if overlay is None else overlay.recorded()
        steps.done()

        steps.start("evaluate")
        # The champion's judged fit: a refit champion was fitted on the older part of this history's holdout.
        champion = registry.load_judged_champion(uri) if promote else None
        if champion is not None:  # judged on the same features as the challenger, as a scorer here would serve it
            champion[0].use_catalog(catalog)
        sample_size = (evaluation_options or {}).get("max_points", _EVALUATION_MAX_POINTS)
        holdout_start = _holdout_start(result)
        merchants = merchants_for(
            connector_counts(whole.attempts) if whole is not None else _partition_counts(parts), config
        )
        judged = (
            None if holdout_start is None else ForwardLevelsScorer.judging(result.bundle, frames, before=holdout_start)
        )
        # On decide()'s verdicts as served, code levels included: the newest points before the holdout.
        fit_retryable_threshold(result.bundle, frames, merchants, before=holdout_start, seed=seed, catalog=catalog)
        result.bundle.version = bundle_version(result.bundle)
        history = (
            whole if whole is not None else holdout_sample(parts, holdout_start, sample_size, evaluation_seed(seed))
        )
        evaluation = _evaluate(
            attempts,
            nudges,
            work / "evaluation",
            result=result,
            history=history,
            history_orders=None if whole is not None else parts.orders_count(),
            champion=champion,
            merchants=merchants,
            seed=evaluation_seed(seed),
            # Against a champion, the reward model's fit noise for the gate (`gate_dr_noise`).
            options={
                "max_points": sample_size,
                "fit_noise_resamples": 0 if champion is None else ev.FIT_NOISE_RESAMPLES,
                **(evaluation_options or {}),
            },
            catalog=catalog,
            challenger=judged,
        )
        gate: GateResult | None = None
        if promote:
            # The new version number is only known once registered; the verdict does not depend on it.
            gate = compare(
                evaluation.gate_metrics,
                evaluation.champion_gate_metrics,
                challenger_version="new",
                champion_version=None if champion is None else champion[1],
                metrics=gate_metrics,
                noise=evaluation.gate_noise,
            )
            if champion is not None:
                caveats = (
                    champion_fitted_on_holdout(champion[0].metadata, holdout_start),
                    same_judged_fit(result.bundle.version, champion[0].version),
                )
                gate = replace(gate, caveats=tuple(caveat for caveat in caveats if caveat is not None))
        steps.done()

        registered = result.bundle
        if refit:
            steps.start("refit on the whole history")
            # Only its text model and code inventory are kept (``refitted``): one boosting round is enough.
            text_fit = fitted(time_holdout_fraction=0.0, evaluate_unseen_codes=False, max_rounds=1)
            registered = refitted(result.bundle, text_fit.bundle, frames)
            evaluation.metrics["refit"] = 1.0
            steps.done()
        not_learned = codes_not_learned(parts, registered)
        evaluation.metrics["codes_not_learned"] = float(len(not_learned))

        steps.start("log to MLflow")
        logged = _log_run(
            registry,
            work,
            bundle=registered,
            judged=result.bundle if registered is not result.bundle else None,
            evaluation=evaluation,
            champion=champion,
            gate=gate,
            params={
                **history_params(attempts, nudges, stops),
                "attempts_rows": parts.attempt_rows,
                "stops_rows": "none" if parts.stop_rows is None else parts.stop_rows,
                "nudges_rows": parts.nudge_rows,
                "history_partitions": len(parts),
                "seed": seed,
                "promote": promote,
                "engine": engine,
                **({"scheduler": scheduler} if scheduler else {}),
                "gsm_overlay": "none" if overlay is None else str(overlay.source),
                **({"gsm_overlay_sha256": overlay.sha256} if overlay is not None else {}),
                **{f"train.{key}": value for key, value in options.items()},
                **{f"evaluate.{key}": value for key, value in (evaluation_options or {}).items()},
                **dict(run_params or {}),
            },
            tracking_uri=uri,
        )
        steps.done()

        steps.start("register")
        version = registry.register_bundle(
            logged.bundle_dir,
            logged.run_id,
            tracking_uri=uri,
            alias=registry.CHALLENGER,
            input_example=logged.input_example,
            metadata=logged.model_metadata,
            gsm_overlay=None if overlay is None else overlay.file,
        )
        if gate is not None:
            gate = replace(gate, challenger_version=version)
            if gate.promote:
                gate = _promote(registry, gate, version, None if champion is None else champion[1], uri)
        champion_version = registry.get_alias_version(registry.CHAMPION, tracking_uri=uri)
        steps.done()

    print_titled(out, f"Holdout metrics of winback version {version}", _metrics_table(evaluation.gate_metrics))
    print_note(out, f"version {version} was {overlay_note(overlay, catalog)}", "error catalog:")
    if missing := missing_metrics_note(evaluation.gate_metrics):
        print_note(out, missing, style="dim")
    if evaluation.stops_note:
        print_note(out, evaluation.stops_note, "note:")
    if gate is not None:
        print_gate(out, gate)
    named = tuple(f"{connector}/{code}" for connector, code, _ in not_learned)
    if not_learned:
        shown = ", ".join(
            f"{connector}/{code} ({count_noun(n, 'retry', 'retries')})" for connector, code, n in not_learned[:10]
        )
        more = f" and {len(not_learned) - 10} more" if len(not_learned) > 10 else ""
        print_note(
            out,
            f"version {version} has no training support for "
            f"{count_noun(len(not_learned), 'error code')} of this history that retries followed: {shown}{more}. "
            + (
                "None of their retries was among the decision points the models were fitted on."
                if refit
                else "Their retries all fall in the newest decision points (the time holdout, which the models are "
                "judged on and, without a refit, not fitted on); a later retrain fits on them once newer decision "
                "points push them out of the holdout."
            ),
            "not learned yet:",
        )
    return TrainSummary(
        run_id=logged.run_id,
        experiment_id=logged.experiment_id,
        version=version,
        tracking_uri=uri,
        metrics=evaluation.metrics,
        champion_version=champion_version,
        gate=gate,
        artifacts=logged.artifacts,
        codes_not_learned=named,
        gsm_overlay=overlay,
    )


def train_command(
    attempts: Path,
    nudges: Path,
    tracking_uri: str | None = None,
    promote: bool = False,
    *,
    seed: int = 0,
    config: Path | None = None,
    episodes: int | None = None,
    engine: str = "local",
    scheduler: str | None = None,
    partition_rows: int = DEFAULT_PARTITION_ROWS,
    threads: int = 1,
    refit: bool = True,
    console: Console | None = None,
    err_console: Console | None = None,
    stops: Path | None = None,
    policy_value_margin: float = DEFAULT_POLICY_VALUE_MARGIN,
) -> int:
    """The body of `winback train`: run the job, print the outcome; return the exit code (2 on bad input).

    Bad input prints one line, ``error: <reason>``, on stderr. ``stops``: the history's stops file (default: the
    one beside the attempts file, when there is one; `resolve_stops`). ``policy_value_margin``: the gate's
    non-inferiority margin of the policy value, a share of the champion's (`pipelines.gate`).
    """
    out = console or Console()
    err = err_console or Console(stderr=True)
    try:
        checks = with_policy_value_margin(GATE_METRICS, policy_value_margin)
    except ValueError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    stops_file = resolve_stops(attempts, stops)
    if stops is None and stops_file is not None:
        out.print(f"logged stops: {stops_file} (beside --attempts)", highlight=False, soft_wrap=True)
    try:
        summary = run_training(
            attempts,
            nudges,
            stops=stops_file,
            tracking_uri=tracking_uri,
            promote=promote,
            seed=seed,
            config=config,
            train_options={"num_threads": threads, "workers": threads},
            evaluation_options=None if episodes is None else {"episode_orders": episodes},
            console=out,
            engine=engine,
            scheduler=scheduler,
            partition_rows=partition_rows,
            refit=refit,
            gate_metrics=checks,
        )
    except TrainInputError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    from model.registry_client import shown_uri

    out.print(
        f"registered [bold]winback[/] version {summary.version} (alias challenger) "
        f"from run {summary.run_id} in {shown_uri(summary.tracking_uri)}",
        highlight=False,
        soft_wrap=True,
    )
    return 0
