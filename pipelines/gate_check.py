"""How the promotion gate's policy-value check judges two registered models, against the simulator's truth.

    python -m pipelines.gate_check --history H --orders N --seed S --tracking-uri URI --versions A B

On the holdout ``winback evaluate`` replays (the latest 20% of the decision points by time, a seeded sample of at
most ``--max-points``), each version is the challenger once and the champion once. For each pairing it prints the
two policies' DR values under each one's reward model (the evaluation's clip), the gate's policy values (both under
the holdout's cross-fitted reward model, ``model.evaluation.crossfit_reward_model``, fitted here on the points with a
propensity; clipped at ``GATE_DR_MAX_WEIGHT``) with the gate's standard error (paired, with the reward model's fit
noise, ``gate_fit_noise``, added), the true one-step values
(``model.simulation.truth``) and the verdict of the gate's policy-value check (``pipelines.gate``), beside the
verdicts of the former rules: the same check with each model under the other's reward model, and under each model's
own, both to hold (same clip as the gate). The history must come from ``winback simulate --orders N --seed S`` (the
world is rebuilt from those).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd

from model import evaluation as ev
from pipelines.ope_check import (
    VersionPairCheck,
    add_simulated_history_arguments,
    add_version_pair_arguments,
    judged_holdout,
    policy_value_promotes,
)


def gate_check(check: VersionPairCheck) -> pd.DataFrame:
    """One row per (challenger, champion) pairing of ``check.versions``, as the module docstring says."""
    from model.simulation.truth import true_point_values
    from pipelines.evaluate import served_reward_model
    from pipelines.gate import GATE_METRICS, compare
    from pipelines.train import (
        CHALLENGER_NAME,
        CHAMPION_NAME,
        GATE_DR_MAX_WEIGHT,
        REWARD_MODEL_ESTIMATORS,
        comparison_policies,
        fit_noise_variance,
        gate_dr_noise,
        gate_metrics,
        merchants_for,
    )

    history, logged, economics, models, catalog = judged_holdout(check)
    versions, eval_seed = check.versions, check.eval_seed
    merchants = merchants_for(history.attempts)
    (policy_value,) = (metric for metric in GATE_METRICS if metric.name == "policy_value_dr")
    world = check.world()
    truth: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    for challenger, champion in (versions, versions[::-1]):
        bundles = {CHALLENGER_NAME: models[challenger], CHAMPION_NAME: models[champion]}
        policies, _ = comparison_policies(merchants, bundles, seed=eval_seed, catalog=catalog)
        chosen = {name: policies[name] for name in bundles}
        replayed = ev.replay(
            logged,
            chosen,
            served_reward_model(bundles[CHALLENGER_NAME], economics, catalog),
            other_reward_models={
                CHAMPION_NAME: served_reward_model(bundles[CHAMPION_NAME], economics, catalog),
                ev.HOLDOUT_REWARD_MODEL: ev.crossfit_reward_model(logged, economics, seed=eval_seed),
            }
            # The fits on resamples of the orders the training run adds to the gate's noise (`gate_dr_noise`).
            | ev.fit_noise_models(logged, economics, seed=eval_seed),
        )
        ope = ev.ope_from_replay(logged, replayed, seed=eval_seed).set_index(["policy", "estimator"])["value"]
        # What the training pipeline hands the gate (`pipelines.train.gate_metrics`), from this replay.
        summary = SimpleNamespace(classification=_NO_CLASSIFICATION, ope_points=logged, replayed=replayed)
        values = {name: gate_metrics(summary, name)["policy_value_dr"] for name in bundles}
        noise = gate_dr_noise(summary)
        verdict = compare(
            {policy_value.name: values[CHALLENGER_NAME]},
            {policy_value.name: values[CHAMPION_NAME]},
            challenger_version=challenger,
            champion_version=champion,
            metrics=(policy_value,),
            noise={policy_value.name: noise},
        )
        terms = {
            (name, view): ev.policy_dr_terms(logged, replayed, name, estimator, max_weight=GATE_DR_MAX_WEIGHT)
            for name in bundles
            for view, estimator in REWARD_MODEL_ESTIMATORS.items()
        }
        same_view = {
            view: policy_value_promotes(terms[CHALLENGER_NAME, view], terms[CHAMPION_NAME, view])
            for view in REWARD_MODEL_ESTIMATORS
        }
        other_view = policy_value_promotes(terms[CHALLENGER_NAME, CHAMPION_NAME], terms[CHAMPION_NAME, CHALLENGER_NAME])
        if not truth:
            true_values = true_point_values(
                world, logged, chosen, economics, history_seed=check.seed, draws=check.draws
            )
            by_policy = true_values.groupby("policy")["true_value"].mean()
            truth = {challenger: float(by_policy[CHALLENGER_NAME]), champion: float(by_policy[CHAMPION_NAME])}
        row: dict[str, Any] = {"challenger": challenger, "champion": champion, "points": len(logged)}
        for name, version in ((CHALLENGER_NAME, challenger), (CHAMPION_NAME, champion)):
            row[f"{name}_truth"] = truth[version]
            for estimator in REWARD_MODEL_ESTIMATORS.values():
                row[f"{name}_{estimator}"] = float(ope[(name, estimator)])
            row[f"{name}_gate_value"] = values[name]
        row["gate_noise"] = noise
        row["gate_fit_noise"] = math.sqrt(fit_noise_variance(summary))  # its reward model's fit's share
        row["promoted"] = verdict.promote
        row["promoted_by_other_views"] = other_view
        row["promoted_by_both_own_views"] = same_view[CHALLENGER_NAME] and same_view[CHAMPION_NAME]
        row["verdict"] = verdict.verdict
        rows.append(row)
    return pd.DataFrame(rows)


#: The classification table `pipelines.train.gate_metrics` reads the model metrics from (none here: NaN).
_NO_CLASSIFICATION = pd.DataFrame(columns=["model", "breakdown", "group", "log_loss", "auc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_simulated_history_arguments(parser)
    add_version_pair_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("gate_check.csv"))
    args = parser.parse_args()
    table = gate_check(VersionPairCheck.from_arguments(args))
    table.to_csv(args.out, index=False)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 400):
        print(table.drop(columns="verdict").round(3).to_string(index=False))
        for verdict in table["verdict"]:
            print(verdict)


if __name__ == "__main__":
    main()
