"""The job behind ``winback evaluate``: a history and a set of policies in, tables and plots out.

On the time-based holdout of the history's logged decision points: classification metrics of each model
(overall, per logged action and per error class), off-policy estimates (IPS, SNIPS, DR) of every policy
against the logging policy, retryability by error class, and — when the history comes from the simulator —
online episodes of every policy in the simulated world with common random numbers. Everything is written to
``out_dir`` as ``evaluation.md``, CSVs and PNGs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from model import evaluation as ev
from model import plots
from model.catalog import ErrorCatalog
from model.money import Economics
from model.policy import CandidateScorer, ServedScorer
from model.wording import count_noun
from pipelines.gate import fitted_into_holdout

#: What the evaluation needs of a model: calibrated P(success) per candidate.
Scorer = CandidateScorer


@dataclass(frozen=True)
class EvaluationSummary:
    """What an evaluation produced: the tables, the files written, and flat metrics for MLflow."""

    out_dir: Path
    n_orders: int
    n_points: int
    n_holdout_points: int
    n_points_without_propensity: int
    holdout_start: datetime | None
    classification: pd.DataFrame
    ope: pd.DataFrame
    retryability: pd.DataFrame
    episodes: pd.DataFrame | None
    files: list[Path] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    # Per scored model, its prediction for each logged (non-stop) holdout action, with those actions' labels and
    # kinds: what a paired comparison of two models on the same points needs (the promotion gate's noise).
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    labels: np.ndarray = field(default_factory=lambda: np.empty(0))
    logged_actions: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=object))
    #: The OPE's points (the holdout's with a propensity) and every policy's replay on them (`model.evaluation.replay`),
    #: with the weight clip used: what a paired comparison of two policies' estimates needs.
    ope_points: pd.DataFrame = field(default_factory=pd.DataFrame)
    replayed: pd.DataFrame = field(default_factory=pd.DataFrame)
    max_weight: float | None = ev.DEFAULT_MAX_WEIGHT
    #: Whether the history came with a stops file (the logging policy's stop decisions and their propensities).
    has_stops: bool = False
    #: Holdout points whose logged action is a recorded stop with its propensity (in the OPE).
    n_logged_stops: int = 0
    #: Stops of the stops file that match no decision point (``merchant/order: why``), in the whole history read.
    unmatched_stops: tuple[str, ...] = ()
    #: No holdout point has a logged propensity: there is no off-policy estimate (``NO_PROPENSITY_NOTE``).
    no_propensity: bool = False

    @property
    def stops_note(self) -> str | None:
        """What the OPE leaves out for want of logged stops, in one line (None when nothing is)."""
        return stops_note(
            self.has_stops,
            self.n_points_without_propensity,
            self.n_holdout_points,
            self.unmatched_stops,
            no_propensity=self.no_propensity,
        )

    def __str__(self) -> str:
        lines = [
            f"evaluated {count_noun(self.n_holdout_points, 'holdout decision point')} of "
            f"{count_noun(self.n_orders, 'order')} ({count_noun(self.n_logged_stops, 'logged stop')} in the OPE, "
            f"{count_noun(self.n_points_without_propensity, 'point')} without a logged propensity left out of it)",
            f"wrote {count_noun(len(self.files), 'file')} to {self.out_dir}",
        ]
        if self.stops_note:
            lines.append(self.stops_note)
        return "\n".join(lines)


def holdout_line(holdout: int, first_time: object, points: int, orders: int, *, sampled: bool) -> str:
    """evaluation.md's first line: the holdout's decision points, and those of the history (or of the sampled
    orders) they were cut from."""
    where = "of sampled orders from then on" if sampled else "in the history"
    return (
        f"Holdout: {count_noun(holdout, 'decision point')} from {first_time} on "
        f"({count_noun(points, 'decision point')} {where}, {count_noun(orders, 'order')} in the history)."
    )


def ope_line(max_weight: float | None, resamples: int, logged_stops: int | None, without_propensity: int) -> str:
    """evaluation.md's line over the off-policy table: the clipping (``max_weight`` None: none), the bootstrap, and
    which points are in it (``logged_stops`` None: the history has no stops file)."""

    def are(count: int) -> str:
        return "is" if count == 1 else "are"

    stops = (
        ""
        if logged_stops is None
        else f"{count_noun(logged_stops, 'point')} where the logging policy stopped (stops file) {are(logged_stops)} "
        "in, with reward 0; "
    )
    clipping = "Unclipped weights" if max_weight is None else f"Clipped weights at {max_weight}"
    return (
        f"{clipping}; 95% bootstrap CIs ({count_noun(resamples, 'resample')}). {stops}"
        f"{count_noun(without_propensity, 'point')} without a logged propensity {are(without_propensity)} left out."
    )


#: Why the off-policy table has no estimate when no holdout point logs a propensity.
NO_PROPENSITY_NOTE = (
    "no holdout decision point has a logged propensity (the history's propensity column is empty, as in an export "
    "from a system that did not record them): IPS, SNIPS and DR weigh each logged action by the probability it was "
    "chosen with, so there is no off-policy estimate; the retryability table uses the points where an action was "
    "logged. Decisions served by winback carry their propensity"
)


def stops_note(
    has_stops: bool, left_out: int, holdout: int, unmatched: tuple[str, ...] = (), *, no_propensity: bool
) -> str | None:
    """One line on the decision points the OPE cannot use: all of them when none has a logged propensity
    (``no_propensity``, as `evaluate` found it), else without a stops file the logging policy's stops."""
    if no_propensity:
        return NO_PROPENSITY_NOTE
    share = (
        f"{left_out:,} of {count_noun(holdout, 'holdout decision point')} ({left_out / holdout:.0%})"
        if holdout
        else "none"
    )
    if not has_stops:
        if not left_out:
            return None
        return (
            f"the history has no stops file: logged stops are not in the off-policy estimate; {share}, where no "
            "action followed (the logging policy's stops, mostly), are left out of it, so IPS/SNIPS/DR value the "
            "policies on the points where the logging policy acted (simulate and history export write stops.parquet)"
        )
    parts = []
    if left_out:
        parts.append(
            f"{share} have no logged propensity (no action and no recorded stop followed them, or a stop was not a "
            "policy's choice) and are left out of the off-policy estimate"
        )
    if unmatched:
        parts.append(
            f"not used, matching no decision point: {count_noun(len(unmatched), 'stop')} (e.g. {unmatched[0]})"
        )
    return "; ".join(parts) or None


def fitted_on_holdout(metadata: Mapping[str, Any], holdout_start: datetime | None) -> str | None:
    """A warning when a model's text model was fitted on part of the holdout it is evaluated on, else None.

    A version ``winback train`` registered with a refit (``pipelines.train.refitted``) has a text model fitted on
    every decision point up to its ``text_trained_to``; evaluated on the same history, its text features on the
    holdout's older part are in-sample, and the figures flatter it."""
    seen_to = metadata.get("text_trained_to") if metadata.get("text_refit") else None
    overlap = fitted_into_holdout(seen_to, holdout_start)
    if overlap is None:
        return None
    trained_to, start = overlap
    return (
        f"this model's text model was fitted on decision points up to {trained_to}, after the holdout's start "
        f"{start}: its figures on this history are partly in-sample (a refit version's holdout metrics are its "
        "judged fit's, in its training run)"
    )


def _markdown(frame: pd.DataFrame, index: bool = True) -> str:
    shown = frame.reset_index() if index else frame
    header = "| " + " | ".join(str(c) for c in shown.columns) + " |"
    rule = "|" + "|".join("---" for _ in shown.columns) + "|"

    def cell(value: Any) -> str:
        if isinstance(value, float | np.floating):
            number = float(value)
            if math.isnan(number):
                return ""
            # Four significant digits read well below 10,000; above, ".4g" turns to exponents (2.289e+04 USD).
            return f"{number:,.0f}" if abs(number) >= 10_000 else f"{number:.4g}"
        return str(value)

    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{str(k): v for k, v in row.items()} for row in frame.to_dict("records")]


def _simulator_merchants() -> frozenset[str]:
    """The simulator's demo merchant ids (empty when the simulator is not available)."""
    try:
        from model.simulation.params import WorldParams
    except ImportError:  # pragma: no cover - the simulator ships with winback; guard for partial installs
        return frozenset()
    return frozenset(p.merchant_id for p in WorldParams().merchants)


def is_simulated(attempts: pd.DataFrame) -> bool:
    """Whether a history comes from the simulator: all its merchants are the simulator's demo merchants."""
    merchants = set(attempts["merchant_id"].astype(str).unique())
    known = _simulator_merchants()
    return bool(merchants) and bool(known) and merchants <= known


def _classification(
    holdout: pd.DataFrame, scorers: Mapping[str, Scorer], catalog: ErrorCatalog
) -> tuple[pd.DataFrame, dict[str, pd.DataFrame], dict[str, np.ndarray]]:
    """Per model: metrics overall / per logged action / per error class, on the logged non-stop actions, of the
    P(success) decide() serves for the logged action (`model.policy.served_probabilities`: the boosters' calibrated
    estimate with the cells' priors and the error code's level): the probability the policy acted on and the API
    reports. The boosters alone left out what a retrain learned of a new code (its code level): two fits blind to
    it were compared on the holdout's retries of it, and the gate's verdict was their calibrators' noise."""
    acted = holdout[holdout["action"] != "stop"]
    reports: list[pd.DataFrame] = []
    reliability: dict[str, pd.DataFrame] = {}
    predictions: dict[str, np.ndarray] = {}
    y = acted["label"].to_numpy(dtype=np.float64)
    for name, scorer in scorers.items():
        served = ServedScorer(scorer, catalog=catalog)
        p = np.array(
            [float(served.score(row["request"], [ev.logged_candidate(row)])[0]) for row in _records(acted)],
            dtype=np.float64,
        )
        predictions[name] = p
        by_action = ev.classification_report(y, p, acted["action"].to_numpy())
        parts = [by_action.assign(breakdown=lambda f: np.where(f.index == "overall", "overall", "action"))]
        if "error_class" in acted.columns:
            by_class = ev.classification_report(y, p, acted["error_class"].to_numpy()).drop(index="overall")
            parts.append(by_class.assign(breakdown="error_class"))
        report = pd.concat(parts).reset_index().assign(model=name)
        reports.append(report)
        reliability[name] = ev.reliability_table(y, p)
    columns = ["model", "breakdown", "group", "n", "positives", "base_rate", "mean_predicted", "auc", "log_loss"]
    columns += ["ece", "brier"]
    table = pd.concat(reports, ignore_index=True)[columns] if reports else pd.DataFrame(columns=columns)
    return table, reliability, predictions


def served_reward_model(
    scorer: Scorer, economics: Economics, catalog: ErrorCatalog, reward: Literal["value", "success"] = "value"
) -> ev.RewardModel:
    """A model's reward model for DR (``dr``, ``dr@name``): the P(success) decide() serves (`ServedScorer`: the
    boosters' estimate with the cells' priors and the code level), as the classification table scores it. The
    boosters' raw score valued a policy with another model than the one that acts for it."""
    served = ServedScorer(scorer, catalog=catalog)
    return ev.value_reward_model(served, economics) if reward == "value" else ev.success_reward_model(served)


def evaluate(
    attempts_path: str | Path,
    nudges_path: str | Path,
    out_dir: str | Path,
    policies: Mapping[str, ev.Policy],
    *,
    scorers: Mapping[str, Scorer] | None = None,
    reward_model: ev.RewardModel | None = None,
    reward: Literal["value", "success"] = "value",
    feature_importance: pd.DataFrame | None = None,
    simulated: bool | None = None,
    world: Any | None = None,
    episode_orders: int = 2_000,
    holdout_fraction: float = 0.2,
    holdout_start: datetime | None = None,
    max_points: int | None = 5_000,
    max_weight: float | None = ev.DEFAULT_MAX_WEIGHT,
    n_bootstrap: int = ev.DEFAULT_BOOTSTRAP,
    seed: int = 0,
    history: Any | None = None,
    history_orders: int | None = None,
    stops_path: str | Path | None = None,
    catalog: ErrorCatalog | None = None,
    fit_noise_resamples: int = 0,
) -> EvaluationSummary:
    """Evaluate ``policies`` (name -> ``policy(request) -> Decision``) on a history and write the report.

    ``scorers`` (name -> model with ``score(request, candidates)``) get classification metrics and
    calibration curves; the first one is the reward model for DR (``dr``) unless ``reward_model`` is given, and
    each other one gives a DR of its own (``dr@name``; not with ``reward_model``); ``dr@holdout`` is every policy's
    DR under a reward model of the holdout's own outcomes, cross-fitted (`model.evaluation.crossfit_reward_model`). The
    holdout is the decision points from ``holdout_start`` on, else the latest ``holdout_fraction`` of them by
    time; at most ``max_points`` of it (a seeded sample) are replayed. Episodes run when ``simulated`` (by
    default: when every merchant of the history is a simulator demo merchant), in ``world`` or a fresh
    simulated world of seed ``seed``. ``history`` is the files' content when the caller has already read and
    validated it (`model.history.History`; then the files are not read again): all of it, or a sample of
    whole orders that holds the holdout's, with ``history_orders`` the number of orders of the whole.

    ``stops_path`` is the history's stops file (read with the others; ``history.stops`` when ``history`` is given):
    the points where the logging policy stopped then enter the off-policy estimates with their propensity and
    reward 0. Without one, those points have no propensity and are left out, which ``stops_note`` says.

    ``catalog`` is the error catalog the logged decisions are read with (default: the shipped one); a training run
    passes the one its model was trained with (its gateway status map overlay included).

    ``fit_noise_resamples`` (the promotion gate's run: `model.evaluation.FIT_NOISE_RESAMPLES`) adds to ``replayed``
    the holdout's reward model fitted on that many resamples of its orders (`model.evaluation.fit_noise_models`), for
    the gate's noise; the tables leave them out.
    """
    from model.catalog import load_catalog
    from model.history import read_history
    from model.money import load_economics

    if not policies:
        raise ValueError("evaluate needs at least one policy to evaluate")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scorers = dict(scorers or {})
    economics = load_economics()
    catalog = load_catalog() if catalog is None else catalog
    if history is None:
        history = read_history(attempts_path, nudges_path, stops_path=stops_path)
    logged_stops = getattr(history, "stops", None)
    orders_in_history = int(history.attempts["order_id"].nunique()) if history_orders is None else history_orders
    cut = None
    if holdout_start is not None:
        cut = pd.Timestamp(holdout_start)
        cut = cut.tz_localize("UTC") if cut.tzinfo is None else cut.tz_convert("UTC")
    # With a known holdout start only the holdout's decision points are rebuilt (the costly part).
    points = ev.logged_decisions(
        history.attempts,
        history.nudges,
        economics,
        catalog=catalog,
        reward=reward,
        since=cut,
        # Every sampled order contributes at least one point: no more orders than points are needed.
        max_orders=max_points if cut is not None else None,
        seed=seed,
        stops=logged_stops,
    )
    if cut is not None:
        holdout = points[points["event_time"] >= cut]
    else:
        _, holdout = ev.time_holdout(points, "event_time", holdout_fraction)
    if max_points is not None and len(holdout) > max_points:
        holdout = holdout.sample(n=max_points, random_state=seed).sort_values("event_time", kind="stable")
    holdout = holdout.reset_index(drop=True)
    if holdout.empty:
        raise ValueError(f"the history has no decision points in the holdout ({len(points)} points in all)")

    files: list[Path] = []
    metrics: dict[str, float] = {}

    def save_csv(frame: pd.DataFrame, name: str, index: bool = False) -> None:
        path = out / name
        frame.to_csv(path, index=index)
        files.append(path)

    classification, reliability, predictions = _classification(holdout, scorers, catalog)
    acted = holdout[holdout["action"] != "stop"]
    save_csv(classification, "classification.csv")
    for row in _records(classification[classification["group"] == "overall"]):
        for metric in ("auc", "log_loss", "ece", "brier"):
            metrics[f"{row['model']}.{metric}"] = float(row[metric])

    def reward_model_of(scorer: Scorer) -> ev.RewardModel:
        return served_reward_model(scorer, economics, catalog, reward)

    # DR with each model's reward model (``dr`` the first's, ``dr@name`` the others'): a model's reward model
    # favours the actions that model would choose, so a comparison of two models under one model's view is not fair.
    others = list(scorers.items())[1:] if reward_model is None else []
    if reward_model is None and scorers:
        reward_model = reward_model_of(next(iter(scorers.values())))
    with_propensity = holdout[holdout["propensity"].notna()].reset_index(drop=True)
    missing_propensity = int(len(holdout) - len(with_propensity))
    n_logged_stops = int(with_propensity["logged_stop"].sum())
    unmatched = tuple(points.attrs.get("unmatched_stops", ()))
    # A history that logs no propensity at all (a first export from a system that did not record them) gives no
    # off-policy estimate, but its retried and messaged points still show what the model predicts per error class.
    no_propensity = with_propensity.empty
    replayed_points = acted.reset_index(drop=True) if no_propensity else with_propensity
    if ev.HOLDOUT_REWARD_MODEL in scorers:
        raise ValueError(f"a scorer may not be named {ev.HOLDOUT_REWARD_MODEL!r}: the holdout's reward model is")
    # Besides, a reward model of the holdout's own outcomes, cross-fitted (``dr@holdout``): no policy's own, so it
    # values every policy alike (the promotion gate's yardstick).
    yardstick = ev.crossfit_reward_model(holdout, economics, reward=reward, seed=seed)
    # And the same fitted on resamples of the holdout's orders: how much its fit moves the gate's difference.
    fit_noise = (
        ev.fit_noise_models(holdout, economics, reward=reward, seed=seed, resamples=fit_noise_resamples)
        if fit_noise_resamples
        else {}
    )
    replayed = ev.replay(
        replayed_points,
        policies,
        reward_model,
        other_reward_models={name: reward_model_of(scorer) for name, scorer in others}
        | {ev.HOLDOUT_REWARD_MODEL: yardstick}
        | fit_noise,
    )
    # Those are a noise gauge for the gate (`replayed` keeps them), not estimates for the evaluation's tables.
    gauges = [column for column in replayed.columns if f"@{ev.HOLDOUT_REWARD_MODEL}~" in str(column)]
    ope = ev.ope_from_replay(
        with_propensity,
        (replayed.iloc[:0] if no_propensity else replayed).drop(columns=gauges),
        max_weight=max_weight,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    save_csv(ope, "ope.csv")
    metrics["ope.logged_stops"] = float(n_logged_stops)
    metrics["ope.points_left_out"] = float(missing_propensity)
    for row in _records(ope):
        metrics[f"ope.{row['policy']}.{row['estimator']}"] = float(row["value"])

    first_policy = next(iter(policies))
    replay_first = replayed[replayed["policy"] == first_policy].sort_values("point")
    retryability = ev.retryability_by_class(
        replayed_points["error_class"].to_numpy(),
        replay_first["retry_probability"].to_numpy(dtype=np.float64),
        replayed_points["label"].to_numpy(dtype=np.float64),
        (replayed_points["action"] == "retry").to_numpy(),
    )
    save_csv(retryability, "retryability_by_error_class.csv", index=True)

    episodes: pd.DataFrame | None = None
    if simulated if simulated is not None else is_simulated(history.attempts):
        if world is None:
            from model.simulation.world import World

            world = World(seed, expected_orders=episode_orders)
        episodes = ev.episode_table(world, policies, episode_orders, seed)
        save_csv(episodes, "episodes.csv")
        for row in _records(episodes):
            metrics[f"episodes.{row['policy']}.net_value_usd"] = float(row["net_value_usd"])
            metrics[f"episodes.{row['policy']}.rule_violations"] = float(row["rule_violations"])

    if reliability:
        files.append(plots.calibration_curves(reliability, out / "calibration_curves.png"))
    if feature_importance is not None and not feature_importance.empty:
        files.append(plots.feature_importance(feature_importance, out / "feature_importance.png"))
    files.append(plots.retryability_by_error_class(retryability, out / "retryability_by_error_class.png"))
    files.append(plots.policy_value(ope, out / "policy_value.png", episodes))

    first_time = holdout["event_time"].min()
    note = stops_note(
        logged_stops is not None, missing_propensity, len(holdout), unmatched, no_propensity=no_propensity
    )
    sections = [
        "# winback evaluation",
        "",
        holdout_line(len(holdout), first_time, len(points), orders_in_history, sampled=cut is not None)
        + f" Reward: {reward}.",
        "",
        "## Classification (logged actions, holdout)",
        "",
        _markdown(classification, index=False) if not classification.empty else "_no model scored_",
        "",
        "## Off-policy value",
        "",
        ope_line(max_weight, n_bootstrap, n_logged_stops if logged_stops is not None else None, missing_propensity),
        "",
        *([f"**Note:** {note}.", ""] if note else []),
        "_no estimate (see the note)_" if no_propensity else _markdown(ope, index=False),
        "",
        f"## Retryability by error class (predicted by `{first_policy}`)",
        "",
        _markdown(retryability),
    ]
    if episodes is not None:
        sections += [
            "",
            f"## Simulated episodes ({count_noun(episode_orders, 'order')}, seed {seed})",
            "",
            _markdown(episodes, False),
        ]
    report = out / "evaluation.md"
    report.write_text("\n".join(sections) + "\n", encoding="utf-8")
    files.insert(0, report)

    return EvaluationSummary(
        out_dir=out,
        n_orders=orders_in_history,
        n_points=len(points),
        n_holdout_points=len(holdout),
        n_points_without_propensity=missing_propensity,
        holdout_start=None if pd.isna(first_time) else pd.Timestamp(first_time).to_pydatetime(),
        classification=classification,
        ope=ope,
        retryability=retryability,
        episodes=episodes,
        files=files,
        metrics=metrics,
        predictions=predictions,
        labels=acted["label"].to_numpy(dtype=np.float64),
        logged_actions=acted["action"].to_numpy(dtype=object),
        ope_points=with_propensity,
        replayed=replayed,
        max_weight=max_weight,
        has_stops=logged_stops is not None,
        n_logged_stops=n_logged_stops,
        unmatched_stops=unmatched,
        no_propensity=no_propensity,
    )
